"""The HTTP side of the client port: the WebSocket upgrade and plain probes.

h11 parses the request. A WebSocket upgrade is answered with 101 and the
connection carries on as WebSocket; ``GET /health`` and ``GET /ready`` get a
small JSON answer (load balancers probe the port they route to); anything
else gets 404 or 426.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable

import attrs
import h11
import trio
from wsproto.utilities import generate_accept_token

__all__ = ["HandshakeResult", "recv_some", "send_all", "serve_handshake"]

MAX_REQUEST_BYTES = 16384


@attrs.frozen
class HandshakeResult:
    path: str
    trailing: bytes  # bytes the client sent after the request head (early frames)


_recv = threading.local()  # .view: recv_some's buffer in this thread


async def recv_some(sock: socket.socket, max_bytes: int = 65536) -> bytes:
    """Wait until ``sock`` is readable and read what is there (b"" at EOF).

    Reads into one reusable buffer per thread and returns a copy of what
    arrived. ``sock.recv(65536)`` mallocs 64 KiB for every read and then
    shrinks it to the size of what came (a request is a few hundred bytes):
    the small block left where the 64 KiB was splits that free space, so the
    next read's 64 KiB comes from elsewhere, and under a steady load the main
    heap fills with free memory it cannot reuse (the soak bench measured
    +2.5 MB of it per 10 minutes at 40 requests/s).
    """
    while True:
        await trio.lowlevel.wait_readable(sock)
        view = getattr(_recv, "view", None)
        if view is None or len(view) < max_bytes:
            view = _recv.view = memoryview(bytearray(max_bytes))
        try:
            n = sock.recv_into(view, max_bytes)
        except (BlockingIOError, InterruptedError):
            continue
        return view[:n].tobytes()


async def send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except (BlockingIOError, InterruptedError):
            sent = 0
        view = view[sent:]
        if view:
            await trio.lowlevel.wait_writable(sock)


def _header(request: h11.Request, name: bytes) -> bytes:
    for key, value in request.headers:
        if key == name:
            return bytes(value)
    return b""


def _json_response(conn: h11.Connection, status: int, body: dict[str, object]) -> bytes:
    payload = json.dumps(body).encode()
    head = conn.send(
        h11.Response(
            status_code=status,
            headers=[
                ("content-type", "application/json"),
                ("content-length", str(len(payload))),
                ("connection", "close"),
                ("cache-control", "no-store"),
            ],
        )
    )
    return (head or b"") + (conn.send(h11.Data(data=payload)) or b"") + (conn.send(h11.EndOfMessage()) or b"")


async def serve_handshake(sock: socket.socket, *, is_ready: Callable[[], bool]) -> HandshakeResult | None:
    """Read one HTTP request; upgrade it or answer it.

    Returns:
        a ``HandshakeResult`` once the 101 response is written, or ``None``
        when the request was a plain HTTP one (answered) or malformed.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            await _try_send(sock, _json_response_raw(400, {"error": "bad request"}))
            return None
        if event is h11.NEED_DATA:
            data = await recv_some(sock)
            if not data:
                return None
            conn.receive_data(data)
            continue
        if not isinstance(event, h11.Request):
            return None
        break
    path = event.target.decode("ascii", "replace").split("?", 1)[0]
    upgrade = _header(event, b"upgrade").lower()
    if upgrade != b"websocket":
        if event.method == b"GET" and path == "/health":
            await _try_send(sock, _json_response(conn, 200, {"status": "ok"}))
        elif event.method == b"GET" and path == "/ready":
            ready = is_ready()
            await _try_send(sock, _json_response(conn, 200 if ready else 503, {"ready": ready}))
        elif event.method == b"GET" and path == "/":
            await _try_send(sock, _json_response(conn, 426, {"error": "this port speaks WebSocket (see PROTOCOL.md)"}))
        else:
            await _try_send(sock, _json_response(conn, 404, {"error": "not found"}))
        return None
    key = _header(event, b"sec-websocket-key")
    if event.method != b"GET" or _header(event, b"sec-websocket-version") != b"13" or not key:
        await _try_send(sock, _json_response(conn, 400, {"error": "bad WebSocket upgrade request"}))
        return None
    response = conn.send(
        h11.InformationalResponse(
            status_code=101,
            headers=[
                (b"upgrade", b"websocket"),
                (b"connection", b"Upgrade"),
                (b"sec-websocket-accept", generate_accept_token(key)),
            ],
        )
    )
    await send_all(sock, response or b"")
    trailing, _closed = conn.trailing_data
    return HandshakeResult(path=path, trailing=bytes(trailing))


def _json_response_raw(status: int, body: dict[str, object]) -> bytes:
    payload = json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status} Bad Request\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    ).encode() + payload


async def _try_send(sock: socket.socket, data: bytes) -> None:
    try:
        with trio.move_on_after(5):
            await send_all(sock, data)
    except OSError:
        pass
