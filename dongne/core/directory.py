"""The directory of locals: who may be alerted, with their notification settings; questions and targets as the planner sees them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from .geo import valid_lat_lng
from .records import Question
from .stages import (
    _URGENCIES,
    MAX_ALERTS_PER_HOUR_LIMIT,
    _normalize_tag,
)

# ---------------------------------------------------------------------------
# Per-user settings and directory entries
# ---------------------------------------------------------------------------


def _check_quiet_hours(value: object) -> None:
    if value is None:
        return
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h <= 23 for h in value)
    ):
        raise ValueError(f"'quiet_hours' must be null or [start_hour, end_hour] with hours 0-23, got {value!r}")
    if value[0] == value[1]:
        raise ValueError(f"'quiet_hours' start and end must differ (an empty window is null), got {value!r}")


def _check_max_alerts(value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ALERTS_PER_HOUR_LIMIT:
        raise ValueError(f"'max_alerts_per_hour' must be an integer 0-{MAX_ALERTS_PER_HOUR_LIMIT}, got {value!r}")


@attrs.frozen
class NotificationSettings:
    """A user's notification preferences.

    Attributes:
        immediate_alerts: Receive stages with ``requires_immediate_alerts``.
        quiet_hours: ``(start_hour, end_hour)``, the local-time window
            ``[start, end)`` in which only urgent questions notify the user;
            wraps midnight when ``start > end`` (``(22, 7)``: 22:00-06:59).
            Hours are 0-23 and must differ. ``None``: no quiet hours.
        max_alerts_per_hour: Cap on alerts over any sliding 60 minutes,
            across all questions; 0 mutes escalation alerts entirely.

    Raises:
        ValueError: Naming the field, if a value is invalid.
    """

    immediate_alerts: bool = True
    quiet_hours: tuple[int, int] | None = None
    max_alerts_per_hour: int = 20

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.immediate_alerts, bool):
            raise ValueError(f"'immediate_alerts' must be true or false, got {self.immediate_alerts!r}")
        _check_quiet_hours(self.quiet_hours)
        _check_max_alerts(self.max_alerts_per_hour)

    @classmethod
    def from_wire(cls, data: object, *, base: NotificationSettings | None = None) -> NotificationSettings:
        """Parse settings from a wire map.

        ``quiet_hours`` travels as ``null`` or ``[start_hour, end_hour]``.
        Missing keys keep their value from ``base`` (the defaults when
        ``base`` is ``None``), so a client may send a partial update.

        Args:
            data: The decoded wire value.
            base: Settings the missing keys are taken from.

        Returns:
            The new settings.

        Raises:
            ValueError: Naming the field, if ``data`` is not a map, has an
                unknown key, or holds an invalid value.
        """
        if not isinstance(data, Mapping):
            raise ValueError("notification settings must be an object")
        unknown = sorted(str(key) for key in data if key not in _SETTINGS_KEYS)
        if unknown:
            raise ValueError(f"unknown notification setting(s): {', '.join(unknown)}")
        base = base if base is not None else cls()
        immediate_alerts = data.get("immediate_alerts", base.immediate_alerts)
        if not isinstance(immediate_alerts, bool):
            raise ValueError(f"'immediate_alerts' must be true or false, got {immediate_alerts!r}")
        quiet_raw = data.get("quiet_hours", base.quiet_hours)
        quiet: tuple[int, int] | None = None
        if quiet_raw is not None:
            if not isinstance(quiet_raw, (list, tuple)) or len(quiet_raw) != 2:
                raise ValueError(f"'quiet_hours' must be null or [start_hour, end_hour], got {quiet_raw!r}")
            quiet = (quiet_raw[0], quiet_raw[1])
        return cls(
            immediate_alerts=immediate_alerts,
            quiet_hours=quiet,
            max_alerts_per_hour=data.get("max_alerts_per_hour", base.max_alerts_per_hour),
        )

    def to_wire(self) -> dict[str, Any]:
        """Return the wire map that :meth:`from_wire` reads back.

        Returns:
            ``{"immediate_alerts", "quiet_hours", "max_alerts_per_hour"}``.
        """
        return {
            "immediate_alerts": self.immediate_alerts,
            "quiet_hours": None if self.quiet_hours is None else list(self.quiet_hours),
            "max_alerts_per_hour": self.max_alerts_per_hour,
        }


_SETTINGS_KEYS: Final = ("immediate_alerts", "quiet_hours", "max_alerts_per_hour")


def _to_tags(tags: Iterable[str]) -> frozenset[str]:
    return frozenset(_normalize_tag(t) for t in tags)


def _check_home(instance: object, attribute: object, value: tuple[float, float] | None) -> None:
    if value is not None and (len(value) != 2 or not valid_lat_lng(value[0], value[1])):
        raise ValueError(f"'home' must be None or a valid (lat, lng), got {value!r}")


@attrs.frozen
class LocalInfo:
    """What the planner knows about one verified local.

    Attributes:
        user_id: The user.
        tags: Expertise tags, normalized like hashtags (``#`` stripped,
            lowercased) on construction.
        home: Stored home ``(lat, lng)``, used while the user is offline;
            ``None`` if unknown.
        settings: The user's :class:`NotificationSettings`.
    """

    user_id: str
    tags: frozenset[str] = attrs.field(default=frozenset(), converter=_to_tags)
    home: tuple[float, float] | None = attrs.field(default=None, validator=_check_home)
    settings: NotificationSettings = NotificationSettings()


def _check_position(instance: QuestionBrief, attribute: object, value: float) -> None:
    if not valid_lat_lng(instance.lat, instance.lng):
        raise ValueError(f"invalid question position: ({instance.lat!r}, {instance.lng!r})")


def _check_urgency(instance: object, attribute: object, value: str) -> None:
    if value not in _URGENCIES:
        raise ValueError(f"'urgency' must be 'normal' or 'urgent', got {value!r}")


def _to_hashtags(tags: Iterable[str]) -> tuple[str, ...]:
    return tuple(_normalize_tag(t) for t in tags)


@attrs.frozen
class QuestionBrief:
    """The facts about a question that escalation needs.

    Attributes:
        question_id: The question.
        asker_id: Its asker, never notified.
        lat: Latitude of the question, in degrees.
        lng: Longitude of the question, in degrees.
        hashtags: The question's hashtags (normalized on construction).
        urgency: ``"normal"`` or ``"urgent"``.
        answered: Whether it has at least one answer.
    """

    question_id: str
    asker_id: str
    lat: float
    lng: float = attrs.field(validator=_check_position)
    hashtags: tuple[str, ...] = attrs.field(default=(), converter=_to_hashtags)
    urgency: str = attrs.field(default="normal", validator=_check_urgency)
    answered: bool = False

    @classmethod
    def from_record(cls, question: Question) -> QuestionBrief:
        """Summarize a question record; answered means ``answer_count > 0``.

        Args:
            question: The record.

        Returns:
            Its brief.
        """
        return cls(
            question_id=question.question_id,
            asker_id=question.asker_id,
            lat=question.lat,
            lng=question.lng,
            hashtags=question.hashtags,
            urgency=question.urgency,
            answered=question.answer_count > 0,
        )


@attrs.frozen
class Target:
    """One user to notify at one stage.

    Attributes:
        user_id: The user.
        distance_m: Great-circle metres from the question to the position
            used (live if online, home if offline); ``None`` if the user has
            no such position (possible in ``experts`` / ``everyone``).
        online: Whether the user is online; offline targets need a push job.
        stage: The stage's name.
        priority: ``critical``, ``high`` or ``normal`` (see the module
            docstring for the exact rule).
        sound: ``urgent`` or ``normal``.
        vibration: ``strong`` or ``light``.
    """

    user_id: str
    distance_m: float | None
    online: bool
    stage: str
    priority: str
    sound: str
    vibration: str

    def to_wire(self) -> dict[str, Any]:
        """Return the snake_case wire map of this target.

        Returns:
            A dict with every attribute (built literally: this runs once per
            alert, and ``attrs.asdict`` costs several times more).
        """
        return {
            "user_id": self.user_id,
            "distance_m": self.distance_m,
            "online": self.online,
            "stage": self.stage,
            "priority": self.priority,
            "sound": self.sound,
            "vibration": self.vibration,
        }
