"""Server-to-client frames, encoded once.

Server frames are never masked, so one encoded binary frame is the same bytes
for every recipient of a broadcast.
"""

from __future__ import annotations

from wsproto.frame_protocol import FrameProtocol

__all__ = ["FrameEncoder"]


class FrameEncoder:
    """Turns payloads into complete, unmasked WebSocket frames."""

    __slots__ = ("_proto",)

    def __init__(self) -> None:
        # No extensions: permessage-deflate would cost ~128 KB per connection
        # and its output would differ per connection.
        self._proto = FrameProtocol(client=False, extensions=[])

    def binary(self, payload: bytes) -> bytes:
        # Always a whole message (fin=True), so the encoder keeps no state between calls.
        return bytes(self._proto.send_data(payload, fin=True))

    def ping(self, payload: bytes = b"") -> bytes:
        return bytes(self._proto.ping(payload))

    def pong(self, payload: bytes = b"") -> bytes:
        return bytes(self._proto.pong(payload))

    def close(self, code: int, reason: str) -> bytes:
        return bytes(self._proto.close(code, reason))
