"""A bare WebSocket client on a trio socket, for tests that need control of the socket."""

from __future__ import annotations

import socket
from typing import Any

import msgpack
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request


class RawWebSocket:
    """Connects with a small receive buffer and reads only when asked to."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.close_code: int | None = None

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int = 4096) -> RawWebSocket:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
        self = cls(sock)
        await self.sock.send(self.ws.send(Request(host="127.0.0.1", target="/")))
        while True:
            for ev in await self._events():
                if isinstance(ev, AcceptConnection):
                    return self

    async def _events(self) -> list[Any]:
        data = await self.sock.recv(65536)
        if not data:
            self.ws.receive_data(None)
        else:
            self.ws.receive_data(data)
        return list(self.ws.events())

    async def send(self, frame: dict[str, Any]) -> None:
        await self.sock.send(self.ws.send(BytesMessage(data=msgpack.packb(frame))))

    async def read_until_closed(self, limit: int = 100_000) -> list[dict[str, Any]]:
        """Read every frame until the server closes (bounded by ``limit`` reads)."""
        frames: list[dict[str, Any]] = []
        parts: list[bytes] = []
        for _ in range(limit):
            try:
                events = await self._events()
            except OSError:
                return frames
            for ev in events:
                if isinstance(ev, BytesMessage):
                    parts.append(ev.data)
                    if ev.message_finished:
                        frames.append(msgpack.unpackb(b"".join(parts)))
                        parts = []
                elif isinstance(ev, CloseConnection):
                    self.close_code = ev.code
                    return frames
            if not events and self.ws.state.name == "CLOSED":
                return frames
        return frames

    def close(self) -> None:
        self.sock.close()
