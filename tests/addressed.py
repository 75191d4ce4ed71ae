"""A WebSocket client that picks its source address, headers and TLS, and says how each step went."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import msgpack
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    RejectConnection,
    RejectData,
    Request,
)
from wsproto.utilities import RemoteProtocolError


@attrs.define
class Attempt:
    """How a connection attempt went: the HTTP status, then the hello's reply or close code."""

    status: int = 0
    headers: dict[str, str] = attrs.Factory(dict)
    reply: dict[str, Any] | None = None
    close_code: int | None = None
    stream: trio.abc.Stream | None = None

    @property
    def ok(self) -> bool:
        return self.status == 101 and self.reply is not None and bool(self.reply.get("ok"))


async def _open(
    port: int, bind: str, tls: ssl.SSLContext | None, prefix: bytes
) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((bind, 0))
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    if prefix:
        await stream.send_all(prefix)
    if tls is None:
        return stream
    secure = trio.SSLStream(stream, tls, server_hostname="127.0.0.1")
    await secure.do_handshake()
    return secure


@asynccontextmanager
async def attempt(
    port: int,
    token: str | None,
    *,
    bind: str = "127.0.0.1",
    tls: ssl.SSLContext | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    prefix: bytes = b"",
) -> AsyncIterator[Attempt]:
    """Connect from ``bind``, upgrade with ``headers``, say hello with ``token`` (``None``: no hello).

    Yields the ``Attempt`` with the connection still open (closed on exit).
    """
    result = Attempt()
    stream = await _open(port, bind, tls, prefix)
    ws = WSConnection(ConnectionType.CLIENT)

    eof = False

    async def events() -> list[Any]:
        nonlocal eof
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        eof = not data
        try:
            ws.receive_data(data or None)
        except RemoteProtocolError:  # closed before a whole response came
            return []
        return list(ws.events())

    try:
        await stream.send_all(ws.send(Request(host="127.0.0.1", target="/", extra_headers=headers or [])))
        while not result.status:
            got = await events()
            if not got and eof:
                break
            for ev in got:
                if isinstance(ev, AcceptConnection):
                    result.status = 101
                elif isinstance(ev, RejectConnection):
                    result.status = ev.status_code
                    result.headers = {k.decode().lower(): v.decode() for k, v in ev.headers}
                elif isinstance(ev, RejectData):
                    pass
        if result.status == 101 and token is not None:
            hello = {"type": "hello", "id": 1, "data": {"token": token}}
            await stream.send_all(ws.send(BytesMessage(data=msgpack.packb(hello))))
            while result.reply is None and result.close_code is None:
                got = await events()
                if not got and eof:
                    break
                for ev in got:
                    if isinstance(ev, BytesMessage):
                        frame = msgpack.unpackb(ev.data)
                        if frame.get("type") == "reply":
                            result.reply = frame
                    elif isinstance(ev, CloseConnection):
                        result.close_code = ev.code
        result.stream = stream
        yield result
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await stream.aclose()
