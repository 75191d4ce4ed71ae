"""A minimal WebSocket client (RFC 6455): sans-I/O frame parts and a blocking client.

``handshake_request``, ``encode_client_frame`` and ``split_frames`` serve the
load clients' event loops; ``BlockingWebSocket`` the few control connections
a bench needs.
"""

from __future__ import annotations

import base64
import collections
import os
import socket
import threading

__all__ = [
    "LINGER_RST",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "BlockingWebSocket",
    "WebSocketClosed",
    "encode_client_frame",
    "handshake_request",
    "split_frames",
]

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
LINGER_RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {1, 0}: close with RST, no TIME_WAIT


def handshake_request(host: str, port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def encode_client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    if n:
        stream = (key * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return head + key + payload


def _length_prefix(n: int) -> bytes:
    """The (unmasked) payload length field of a frame header."""
    if n < 126:
        return bytes((n,))
    if n < 65536:
        return bytes((126,)) + n.to_bytes(2, "big")
    return bytes((127,)) + n.to_bytes(8, "big")


def split_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Split server frames (unmasked) off the front of ``data``.

    Returns ``([(opcode, payload), ...], rest)``; ``rest`` is an incomplete frame.
    Fragmented messages are not expected from the servers benched here and raise.
    """
    frames: list[tuple[int, bytes]] = []
    pos = 0
    end_all = len(data)
    while end_all - pos >= 2:
        b0 = data[pos]
        length = data[pos + 1] & 0x7F
        head = 2
        if length == 126:
            if end_all - pos < 4:
                break
            length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            head = 4
        elif length == 127:
            if end_all - pos < 10:
                break
            length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            head = 10
        end = pos + head + length
        if end > end_all:
            break
        if not b0 & 0x80:
            raise ValueError("fragmented server message")
        frames.append((b0 & 0x0F, data[pos + head : end]))
        pos = end
    return frames, data[pos:]


class WebSocketClosed(Exception):
    """The server closed the connection (``code`` from its close frame, if any)."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed with code {code}")
        self.code = code


class BlockingWebSocket:
    """A blocking WebSocket client for a bench's control connections (asker, answerer).

    Pings are answered inside ``recv``. Not thread-safe, except that one thread
    may ``recv`` while ``close`` is called from another.
    """

    def __init__(self, host: str, port: int, path: str = "/", *, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(handshake_request(host, port, path))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the WebSocket handshake")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"handshake refused: {head.splitlines()[0]!r}")
        self._buf = rest
        self._frames: collections.deque[tuple[int, bytes]] = collections.deque()
        self._send_lock = threading.Lock()

    def send(self, opcode: int, payload: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(encode_client_frame(opcode, payload))

    def recv(self) -> tuple[int, bytes]:
        """The next data frame ``(opcode, payload)``.

        Raises:
            WebSocketClosed: a close frame or EOF.
        """
        while True:
            while self._frames:
                opcode, payload = self._frames.popleft()
                if opcode == OP_PING:
                    self.send(OP_PONG, payload)
                elif opcode == OP_CLOSE:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                    raise WebSocketClosed(code)
                elif opcode != OP_PONG:
                    return opcode, payload
            chunk = self.sock.recv(262144)
            if not chunk:
                raise WebSocketClosed(None)
            frames, self._buf = split_frames(self._buf + chunk)
            self._frames.extend(frames)

    def detach(self) -> tuple[socket.socket, bytes]:
        """Hand over the socket and the bytes read past the last returned frame (for an event loop).

        Frames already split off but not yet returned by ``recv`` are re-encoded into those bytes.
        """
        pending = b"".join(bytes((0x80 | op,)) + _length_prefix(len(payload)) + payload for op, payload in self._frames)
        self._frames.clear()
        rest, self._buf = pending + self._buf, b""
        return self.sock, rest

    def close(self) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
