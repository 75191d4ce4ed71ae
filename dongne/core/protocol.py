"""Protocol v1 frames: decoding requests and building server frames.

Every client frame is one msgpack map ``{"type": OP, "id": INT, "data": MAP}``.
Decoding never raises anything but ``ProtocolError`` with a documented code.
"""

from __future__ import annotations

import math
import re
from typing import Any

import attrs
import msgpack

from .errors import ProtocolError
from .text import normalize_text, plain_text

__all__ = [
    "MAX_INT",
    "MIN_INT",
    "Fields",
    "Request",
    "decode_request",
    "durable_event",
    "event",
    "reply_error",
    "reply_ok",
]

# msgpack integers are limited to this range; anything we echo back must fit.
MAX_INT = 2**63 - 1
MIN_INT = -(2**63)
MAX_DEPTH = 32


@attrs.frozen
class Request:
    op: str
    id: int
    data: dict[str, Any]


def _unpack(payload: bytes) -> Any:
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
        )
    except (msgpack.ExtraData, ValueError, msgpack.UnpackException, TypeError, RecursionError) as exc:
        raise ProtocolError("bad_frame", f"frame is not one msgpack value: {type(exc).__name__}") from None


def _depth_ok(value: Any, depth: int = 0) -> bool:
    if depth > MAX_DEPTH:
        return False
    if isinstance(value, dict):
        return all(_depth_ok(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(_depth_ok(v, depth + 1) for v in value)
    return True


def decode_request(payload: bytes) -> Request:
    """Decode one binary frame into a ``Request``.

    Raises:
        ProtocolError: ``bad_frame`` when the frame is not a msgpack map with an
            integer ``id`` and a string ``type``, or ``data`` is not a map.
            The error's ``extra["id"]`` carries the id when it could be read.
    """
    obj = _unpack(payload)
    if not isinstance(obj, dict):
        raise ProtocolError("bad_frame", "frame must be a msgpack map")
    rid = obj.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool) or not (MIN_INT <= rid <= MAX_INT):
        raise ProtocolError("bad_frame", "frame needs an integer 'id'")
    op = obj.get("type")
    if not isinstance(op, str):
        raise ProtocolError("bad_frame", "frame needs a string 'type'", id=rid)
    data = obj.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProtocolError("bad_frame", "'data' must be a map", id=rid)
    if not _depth_ok(data):
        raise ProtocolError("bad_frame", "'data' is nested too deeply", id=rid)
    return Request(op=op, id=rid, data=data)


def reply_ok(rid: int | None, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": "reply", "id": rid, "ok": True, "data": data}


def reply_error(rid: int | None, code: str, message: str, **extra: Any) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    error.update(extra)
    return {"type": "reply", "id": rid, "ok": False, "error": error}


def event(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "data": data}


def durable_event(kind: str, seq: int, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "seq": seq, "data": data}


class Fields:
    """Typed access to a request's ``data`` map; each failure is an ``invalid_field``."""

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def has(self, name: str) -> bool:
        return self._data.get(name) is not None

    def raw(self, name: str) -> object:
        """The value as sent, unchecked (for values another module checks, such as cursors)."""
        return self._data.get(name)

    def string(
        self, name: str, *, max_len: int, min_len: int = 1, default: str | None = None, multiline: bool = False
    ) -> str:
        value = self._data.get(name)
        if value is None:
            if default is not None:
                return default
            raise ProtocolError("invalid_field", f"'{name}' is required")
        if not isinstance(value, str):
            raise ProtocolError("invalid_field", f"'{name}' must be a string")
        value = normalize_text(value, multiline=multiline).strip()  # lengths count what the user wrote
        if len(value) > max_len:
            raise ProtocolError("too_long", f"'{name}' is longer than {max_len} characters", field=name, max=max_len)
        if len(value) < min_len:
            raise ProtocolError("invalid_field", f"'{name}' must not be empty")
        return value

    def text(self, name: str, *, max_len: int, min_len: int = 1, default: str | None = None) -> str:
        """A user-written string: HTML stripped (see ``core.text``), then length-checked.

        Markup may take the raw string up to four times ``max_len`` (so the
        sanitizer's work stays bounded); past that the text is too long
        whatever it holds, refused with the same ``max`` as any other.
        """
        too_long = ProtocolError("too_long", f"'{name}' is longer than {max_len} characters", field=name, max=max_len)
        try:
            raw = self.string(name, max_len=max_len * 4, min_len=0, default=default, multiline=True)
        except ProtocolError as exc:
            if exc.code == "too_long":
                raise too_long from None
            raise
        value = plain_text(raw)
        if len(value) > max_len:
            raise too_long
        if len(value) < min_len:
            raise ProtocolError("invalid_field", f"'{name}' must not be empty")
        return value

    def ident(self, name: str) -> str:
        value = self._data.get(name)
        if not isinstance(value, str) or not (0 < len(value) <= 64):
            raise ProtocolError("invalid_field", f"'{name}' must be an id string")
        return value

    def ident_list(self, name: str, *, max_items: int) -> list[str] | None:
        value = self._data.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) > max_items:
            raise ProtocolError("invalid_field", f"'{name}' must be a list of at most {max_items} ids")
        out = []
        for item in value:
            if not isinstance(item, str) or not (0 < len(item) <= 64):
                raise ProtocolError("invalid_field", f"'{name}' must contain id strings")
            out.append(item)
        return out

    def choice(self, name: str, choices: tuple[str, ...], *, default: str) -> str:
        value = self._data.get(name, default)
        if value is None:
            value = default
        if value not in choices:
            raise ProtocolError("invalid_field", f"'{name}' must be one of {', '.join(choices)}")
        return str(value)

    def integer(self, name: str, *, minimum: int, maximum: int, default: int | None = None) -> int:
        value = self._data.get(name)
        if value is None:
            if default is not None:
                return default
            raise ProtocolError("invalid_field", f"'{name}' is required")
        if not isinstance(value, int) or isinstance(value, bool) or not (minimum <= value <= maximum):
            raise ProtocolError("invalid_field", f"'{name}' must be an integer {minimum}..{maximum}")
        return value

    def number(self, name: str, *, minimum: float, maximum: float) -> float:
        value = self._data.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not (minimum <= value <= maximum):
            raise ProtocolError("invalid_field", f"'{name}' must be a number {minimum:g}..{maximum:g}")
        return float(value)

    def location(self, name: str = "location") -> tuple[float, float]:
        value = self._data.get(name)
        if not isinstance(value, dict):
            raise ProtocolError("invalid_location", f"'{name}' must be a map with 'lat' and 'lng'")
        lat, lng = value.get("lat"), value.get("lng")
        for axis, v in (("lat", lat), ("lng", lng)):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ProtocolError("invalid_location", f"'{name}.{axis}' must be a number")
        flat, flng = float(lat), float(lng)  # type: ignore[arg-type]
        if not (math.isfinite(flat) and math.isfinite(flng)):
            raise ProtocolError("invalid_location", f"'{name}' must be finite numbers")
        if not (-90.0 <= flat <= 90.0 and -180.0 <= flng <= 180.0):
            raise ProtocolError("invalid_location", f"'{name}' is out of range (lat -90..90, lng -180..180)")
        return flat, flng

    def hashtags(self, name: str, *, max_items: int) -> tuple[str, ...]:
        """Hashtags: a list of strings, ``#`` optional, lowercased, deduplicated.

        A hashtag is 1..30 of ``a-z``, ``0-9``, ``_`` or Hangul.
        """
        value = self._data.get(name)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise ProtocolError("invalid_field", f"'{name}' must be a list of strings")
        if len(value) > max_items:
            raise ProtocolError("invalid_field", f"'{name}' allows at most {max_items} hashtags")
        out: list[str] = []
        for item in value:
            if not isinstance(item, str):
                raise ProtocolError("invalid_field", f"'{name}' must be a list of strings")
            tag = normalize_text(item).strip().lstrip("#").lower()
            if not HASHTAG.fullmatch(tag):
                raise ProtocolError(
                    "invalid_field", f"hashtag {item[:40]!r} must be 1-30 letters a-z, digits, '_' or Hangul"
                )
            if tag not in out:
                out.append(tag)
        return tuple(out)


HASHTAG = re.compile(r"[0-9a-z_\u3131-\u318e\uac00-\ud7a3]{1,30}")
