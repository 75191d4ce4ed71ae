"""Server-to-client frames, encoded once.

Server frames are never masked, so one encoded binary frame is the same bytes
for every recipient of a broadcast.
"""

from __future__ import annotations

import struct

from wsproto.frame_protocol import FrameProtocol

__all__ = ["FrameEncoder"]


# Headers of binary frames: payloads under 126 bytes carry their length in
# the second byte, up to 65535 in a 16-bit field after it, else in 64 bits.
_SHORT = tuple(bytes((0x82, n)) for n in range(126))
_PACK_MEDIUM = struct.Struct("!BBH").pack
_PACK_LONG = struct.Struct("!BBQ").pack


class FrameEncoder:
    """Turns payloads into complete, unmasked WebSocket frames."""

    __slots__ = ("_pings", "_proto")

    def __init__(self) -> None:
        # No extensions: permessage-deflate would cost ~128 KB per connection
        # and its output would differ per connection.
        self._proto = FrameProtocol(client=False, extensions=[])
        self._pings: dict[bytes, bytes] = {}  # the heartbeat sends the same ping to every client

    def binary(self, payload: bytes) -> bytes:
        """One whole binary message (FIN set, opcode 2, unmasked), as wsproto's ``send_data(payload, fin=True)`` makes it.

        The header is built here: it runs once per frame sent (every alert of
        a stage), and wsproto's general path (extensions, fragmentation state,
        masking) cost ~4 us of Python per frame (RFC 6455, section 5.2).
        """
        n = len(payload)
        if n < 126:
            return _SHORT[n] + payload
        if n < 65536:
            return _PACK_MEDIUM(0x82, 126, n) + payload
        return _PACK_LONG(0x82, 127, n) + payload

    def ping(self, payload: bytes = b"") -> bytes:
        frame = self._pings.get(payload)
        if frame is None:
            frame = bytes(self._proto.ping(payload))
            if len(self._pings) < 8:
                self._pings[payload] = frame
        return frame

    def pong(self, payload: bytes = b"") -> bytes:
        return bytes(self._proto.pong(payload))

    def close(self, code: int, reason: str) -> bytes:
        return bytes(self._proto.close(code, reason))
