"""A stage's alerts, packed once.

Every alert of a stage carries the same question brief, stage, priority,
sound and vibration; only the distance (in ``data``) and the recipient's seq
(in the frame) differ. Packing the whole frame per alert packed the brief
a hundred times a stage, and the store packed ``data`` once more for the
inbox row. Here the common parts are packed once per stage and each alert
is spliced from bytes: msgpack maps are their header followed by their
key/value pairs, each packed on its own, so the splice is byte for byte
what ``msgpack.packb`` makes of the same dict (the tests check it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgpack

__all__ = ["StageAlerts"]

_packb: Callable[[Any], bytes] = msgpack.packb
_FIXMAP_3: Final = b"\x83"
_FIXMAP_7: Final = b"\x87"


class StageAlerts:
    """The durable events of one stage about one question.

    Args:
        kind: the event's type (``new_question_notification``).
        question_id: the question.
        brief: the question as alerts show it (``Neighbourhood.brief``).
        stage: the stage's name.
        style: ``(priority, sound, vibration)`` (``planner.alert_style``).
    """

    __slots__ = ("_data_head", "_data_tail", "_frame_head", "_style", "brief", "kind", "question_id", "stage")

    def __init__(
        self, kind: str, question_id: str, brief: dict[str, Any], stage: str, style: tuple[str, str, str]
    ) -> None:
        self.kind = kind
        self.question_id = question_id
        self.brief = brief
        self.stage = stage
        self._style = style
        priority, sound, vibration = style
        self._data_head = b"".join(
            (_FIXMAP_7, _packb("question_id"), _packb(question_id), _packb("question"), _packb(brief))
        ) + _packb("distance_m")
        self._data_tail = b"".join(
            _packb(x) for x in ("stage", stage, "priority", priority, "sound", sound, "vibration", vibration)
        )
        self._frame_head = b"".join((_FIXMAP_3, _packb("type"), _packb(kind), _packb("seq")))

    def data(self, distance_m: float | None) -> tuple[dict[str, Any], bytes]:
        """One alert's ``data`` map, and its msgpack."""
        priority, sound, vibration = self._style
        data = {
            "question_id": self.question_id,
            "question": self.brief,
            "distance_m": distance_m,
            "stage": self.stage,
            "priority": priority,
            "sound": sound,
            "vibration": vibration,
        }
        return data, self.packed(distance_m)

    def packed(self, distance_m: float | None) -> bytes:
        """The msgpack of :meth:`data`'s map, without making the map."""
        return self._data_head + _packb(distance_m) + self._data_tail

    def frame(self, seq: int, packed_data: bytes) -> bytes:
        """The msgpack of ``durable_event(kind, seq, data)``, given ``data``'s msgpack."""
        return self._frame_head + _packb(seq) + _DATA_KEY + packed_data


_DATA_KEY: Final = _packb("data")
