"""Opaque page cursors: a list's position, bound to the list and its owner, signed.

A cursor is what a client hands back to get the next page. It names which
list it belongs to (``kind``) and for whom (``scope``: the user, the question,
the filter), so a cursor from another list or another user is refused with
``invalid_field`` rather than read as a position in this one; it is signed
(HMAC-SHA256, truncated to 96 bits) so that a forged one is refused too. It
is not encrypted: a position is only a time and an id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Any

import msgpack

from .errors import ProtocolError

__all__ = ["CursorCodec"]

_MAC_BYTES = 12


class CursorCodec:
    """Encodes and checks cursors with a server-side key.

    Args:
        key: the signing key (derived from the server's secret, so cursors
            survive restarts).
    """

    def __init__(self, key: bytes) -> None:
        self._key = key

    def encode(self, kind: str, scope: str, position: tuple[Any, ...]) -> str:
        body = msgpack.packb([kind, scope, list(position)])
        mac = hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_BYTES]
        return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode("ascii")

    def decode(self, kind: str, scope: str, cursor: object, field: str) -> tuple[Any, ...]:
        """The position in ``cursor``; raises ``invalid_field`` unless it is a cursor of this list, for this scope."""
        if not isinstance(cursor, str) or not 0 < len(cursor) <= 512:
            raise ProtocolError("invalid_field", f"'{field}' must be a cursor from a previous reply")
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        except (binascii.Error, ValueError):
            raise ProtocolError("invalid_field", f"'{field}' is not a valid cursor") from None
        body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if len(raw) <= _MAC_BYTES or not hmac.compare_digest(
            mac, hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_BYTES]
        ):
            raise ProtocolError("invalid_field", f"'{field}' is not a valid cursor")
        try:
            got_kind, got_scope, position = msgpack.unpackb(body, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException):
            raise ProtocolError("invalid_field", f"'{field}' is not a valid cursor") from None
        if got_kind != kind or got_scope != scope or not isinstance(position, list):
            raise ProtocolError("invalid_field", f"'{field}' belongs to another list")
        return tuple(position)
