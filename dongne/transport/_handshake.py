"""The HTTP side of the client port: the WebSocket upgrade and plain probes.

h11 parses the request (after a PROXY protocol header, when configured). A
WebSocket upgrade is handed to the driver (``read_request``), which admits it
(``accept_upgrade``: 101, and the connection carries on as WebSocket) or
refuses it (``refuse_upgrade``: 400, 403 or 429); ``GET /health`` and ``GET /ready`` get a
small JSON answer (load balancers probe the port they route to); a ``site``
(the web app) may answer other plain requests; anything else gets 404 or 426.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus

import attrs
import h11
import trio
from wsproto.utilities import generate_accept_token

from ._addresses import TrustedProxies
from ._proxy_protocol import ProxyHeader, ProxyProtocolError, parse_proxy_header

__all__ = [
    "HandshakeResult",
    "HttpAnswer",
    "Refusal",
    "Site",
    "UpgradeRequest",
    "accept_upgrade",
    "read_request",
    "recv_some",
    "refuse_upgrade",
    "send_all",
    "serve_handshake",
]

MAX_REQUEST_BYTES = 16384


@attrs.frozen
class HttpAnswer:
    """A complete answer to a plain HTTP request: status, headers, body (empty for HEAD and 304)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""


#: Answers plain (non-upgrade) requests: ``(method, path, headers)`` -> an answer, or ``None`` (not its path).
Site = Callable[[str, str, list[tuple[bytes, bytes]]], HttpAnswer | None]


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


def _json_response(
    conn: h11.Connection, status: int, body: dict[str, object], extra: list[tuple[str, str]] | None = None
) -> bytes:
    payload = json.dumps(body).encode()
    head = conn.send(
        h11.Response(
            status_code=status,
            reason=HTTPStatus(status).phrase,
            headers=[
                ("content-type", "application/json"),
                ("content-length", str(len(payload))),
                ("connection", "close"),
                ("cache-control", "no-store"),
                *(extra or []),
            ],
        )
    )
    return (head or b"") + (conn.send(h11.Data(data=payload)) or b"") + (conn.send(h11.EndOfMessage()) or b"")


def _plain_response(conn: h11.Connection, answer: HttpAnswer) -> bytes:
    head = conn.send(
        h11.Response(status_code=answer.status, reason=HTTPStatus(answer.status).phrase, headers=list(answer.headers))
    )
    body = conn.send(h11.Data(data=answer.body)) if answer.body else b""
    return (head or b"") + (body or b"") + (conn.send(h11.EndOfMessage()) or b"")


@attrs.define
class UpgradeRequest:
    """A WebSocket upgrade request, read and not yet answered.

    Attributes:
        path: the request's path, without the query.
        peer: the socket's peer (or, with the PROXY protocol, the source a
            trusted balancer named).
        address: the client's address: ``peer``, or what trusted proxies say
            (``TrustedProxies.client_address``).
        origin: the ``Origin`` header (browsers send it), if any.
        host: the ``Host`` header ("" without one).
        user_agent: the ``User-Agent`` header ("" without one).
        error: why the upgrade is malformed (answer it with 400), or ``None``.
    """

    path: str
    peer: str
    address: str
    origin: str | None
    host: str
    user_agent: str
    error: str | None
    _conn: h11.Connection = attrs.field(repr=False, alias="conn")
    _key: bytes = attrs.field(repr=False, alias="key")
    _trailing: bytes = attrs.field(repr=False, alias="trailing")


@attrs.frozen
class Refusal:
    """An HTTP answer refusing an upgrade: ``status`` with a JSON ``{"error": message}``."""

    status: int
    message: str
    retry_after_ms: int = 0


async def _read_proxy_header(sock: socket.socket) -> tuple[ProxyHeader, bytes] | None:
    data = b""
    while True:
        try:
            header = parse_proxy_header(data)
        except ProxyProtocolError:
            return None
        if header is not None:
            return header, data[header.length :]
        chunk = await recv_some(sock, 4096)
        if not chunk:
            return None
        data += chunk


async def read_request(
    sock: socket.socket,
    *,
    peer: str,
    is_ready: Callable[[], bool],
    proxies: TrustedProxies | None = None,
    proxy_protocol: bool = False,
    site: Site | None = None,
) -> UpgradeRequest | None:
    """Read one HTTP request; answer it unless it asks for a WebSocket.

    Args:
        sock: the accepted socket.
        peer: its peer's address.
        is_ready: what ``GET /ready`` reports.
        proxies: the trusted proxies (none: the peer is the client).
        proxy_protocol: the connection starts with a PROXY header (v1 or v2),
            believed only from a trusted proxy; without one it is closed.
        site: answers the plain requests it knows (the web app's files).

    Returns:
        the upgrade request, to be answered with ``accept_upgrade`` or
        ``refuse_upgrade``; ``None`` when the request was plain HTTP (and is
        answered), not HTTP, or the connection ended.
    """
    proxies = proxies if proxies is not None else TrustedProxies()
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    if proxy_protocol:
        found = await _read_proxy_header(sock)
        if found is None:
            return None
        header, rest = found
        if header.source is not None and proxies.trusts(peer):
            peer = header.source
        conn.receive_data(rest)
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
        elif (
            site is not None
            and (answer := site(event.method.decode("ascii", "replace"), path, list(event.headers))) is not None
        ):
            await _try_send(sock, _plain_response(conn, answer))
        elif event.method == b"GET" and path == "/":
            await _try_send(sock, _json_response(conn, 426, {"error": "this port speaks WebSocket (see PROTOCOL.md)"}))
        else:
            await _try_send(sock, _json_response(conn, 404, {"error": "not found"}))
        return None
    key = _header(event, b"sec-websocket-key")
    error = None
    if event.method != b"GET" or _header(event, b"sec-websocket-version") != b"13" or not key:
        error = "bad WebSocket upgrade request"
    origin = _header(event, b"origin")
    trailing, _closed = conn.trailing_data
    return UpgradeRequest(
        path=path,
        peer=peer,
        address=proxies.client_address(peer, event.headers),
        origin=origin.decode("latin-1") if origin else None,
        host=_header(event, b"host").decode("latin-1")[:256],
        user_agent=_header(event, b"user-agent").decode("latin-1")[:256],
        error=error,
        conn=conn,
        key=key,
        trailing=bytes(trailing),
    )


async def accept_upgrade(sock: socket.socket, request: UpgradeRequest) -> HandshakeResult:
    """Answer the upgrade with 101; the connection speaks WebSocket from here."""
    response = request._conn.send(
        h11.InformationalResponse(
            status_code=101,
            headers=[
                (b"upgrade", b"websocket"),
                (b"connection", b"Upgrade"),
                (b"sec-websocket-accept", generate_accept_token(request._key)),
            ],
        )
    )
    await send_all(sock, response or b"")
    return HandshakeResult(path=request.path, trailing=request._trailing)


async def refuse_upgrade(sock: socket.socket, request: UpgradeRequest, refusal: Refusal) -> None:
    """Answer the upgrade with ``refusal`` (429 carries ``Retry-After``) and leave the socket to be closed."""
    extra: list[tuple[str, str]] = []
    if refusal.retry_after_ms:
        extra.append(("retry-after", str(max(1, -(-refusal.retry_after_ms // 1000)))))
    await _try_send(sock, _json_response(request._conn, refusal.status, {"error": refusal.message}, extra))


async def serve_handshake(
    sock: socket.socket, *, is_ready: Callable[[], bool], peer: str = ""
) -> HandshakeResult | None:
    """Read one HTTP request; upgrade it (any well-formed one) or answer it.

    Returns:
        a ``HandshakeResult`` once the 101 response is written, or ``None``
        when the request was a plain HTTP one (answered) or malformed.
    """
    request = await read_request(sock, peer=peer, is_ready=is_ready)
    if request is None:
        return None
    if request.error is not None:
        await refuse_upgrade(sock, request, Refusal(400, request.error))
        return None
    return await accept_upgrade(sock, request)


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
