"""One connection: ``open_client`` and ``DongneClient``."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import msgpack
import trio
import trio_websocket

from ._errors import RequestError

log = logging.getLogger("dongne.client")


class DongneClient:
    """One authenticated connection. Create with ``open_client``."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, *, last_seq: int = 0, timeout: float = 10.0) -> None:
        self.ws = ws
        self.timeout = timeout  # default for request() and next_event()
        self.last_seq = last_seq
        self.hello: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._events_send, self._events_recv = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._done = trio.Event()
        self.closed: trio_websocket.ConnectionClosed | None = None
        self._hello_sent: tuple[int, bool] | None = None  # the hello's request id, and whether it resumes

    async def send_raw(self, payload: bytes | str) -> None:
        """Send a frame as is (for tests of bad input)."""
        await self.ws.send_message(payload)

    async def request(
        self, op: str, data: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send a request and return its reply's ``data``.

        Raises:
            RequestError: the reply was an error.
            trio.TooSlowError: no reply within ``timeout`` (default ``self.timeout``).
            trio_websocket.ConnectionClosed: the connection closed before the reply.
        """
        return _reply_data(await self.request_raw({"type": op, "data": data or {}}, timeout=timeout))

    async def request_raw(self, frame: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """Send a frame (``id`` added) and return the whole reply frame.

        Raises:
            trio.TooSlowError: no reply within ``timeout`` (default ``self.timeout``).
            trio_websocket.ConnectionClosed: the connection closed before the reply.
        """
        if self._done.is_set():  # nothing would read the reply
            raise trio_websocket.ConnectionClosed(self.ws.closed)
        rid = next(self._ids)
        frame = {**frame, "id": rid}
        send, recv = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[rid] = send
        self._sending(frame)
        try:
            with trio.fail_after(self.timeout if timeout is None else timeout):
                await self.ws.send_message(msgpack.packb(frame))
                try:
                    return await recv.receive()
                except trio.EndOfChannel:
                    raise trio_websocket.ConnectionClosed(self.ws.closed) from None
        finally:
            self._waiting.pop(rid, None)

    async def next_event(self, kind: str | None = None, *, timeout: float | None = None) -> dict[str, Any]:
        """The next event (of type ``kind`` if given; others before it are dropped)."""
        with trio.fail_after(self.timeout if timeout is None else timeout):
            while True:
                ev = await self._events_recv.receive()
                if kind is None or ev.get("type") == kind:
                    return ev

    def pending_events(self) -> list[dict[str, Any]]:
        """Events received and not yet taken, without waiting."""
        return _drain(self._events_recv)

    def _alive(self) -> bool:
        return not self._done.is_set() and self.ws.closed is None

    async def wait_closed(self) -> None:
        """Wait until the connection has closed (either side) and reading has stopped."""
        await self._done.wait()

    async def _read(self) -> None:
        try:
            while True:
                message = await self.ws.get_message()
                if not self._dispatch(msgpack.unpackb(message, raw=False)):
                    return
        except trio_websocket.ConnectionClosed as exc:
            self.closed = exc
        finally:
            self._events_send.close()
            # Requests still waiting will never get their reply on this connection.
            for waiter in self._waiting.values():
                waiter.close()
            self._done.set()

    def _sending(self, frame: dict[str, Any]) -> None:
        """Called with each request frame (``id`` set) just before it is sent."""
        if frame.get("type") == "hello":
            self._hello_sent = (frame["id"], "resume" in (frame.get("data") or {}))

    def _dispatch(self, frame: dict[str, Any]) -> bool:
        """Route one inbound frame; returning False stops reading this connection."""
        if frame.get("type") == "reply":
            if self._hello_sent is not None and frame.get("id") == self._hello_sent[0] and frame.get("ok"):
                self._follow_hello(frame.get("data") or {}, resuming=self._hello_sent[1])
            waiter = self._waiting.pop(frame.get("id"), None)  # type: ignore[arg-type]
            if waiter is not None:
                waiter.send_nowait(frame)
            elif frame.get("id") is None:
                self._events_send.send_nowait(frame)  # an error for a frame with no id
            return True
        seq = frame.get("seq")
        if isinstance(seq, int):
            if seq <= self.last_seq:
                return True  # already seen: resume may overlap
            self.last_seq = seq
        self._events_send.send_nowait(frame)
        return True

    def _follow_hello(self, hello: dict[str, Any], *, resuming: bool) -> None:
        """Take the server's ``last_seq`` where the client's cannot stand, before any event after the reply.

        Without a resume nothing is replayed: the next event is the server's
        ``last_seq`` + 1. With one from beyond the server's (another
        deployment's seqs, a restored backup), the server continues from its
        own: keeping ours would drop its next events as already seen.
        """
        server_seq = hello.get("last_seq")
        if isinstance(server_seq, int) and (not resuming or server_seq < self.last_seq):
            self.last_seq = server_seq


def _reply_data(reply: dict[str, Any]) -> dict[str, Any]:
    if not reply.get("ok"):
        error = reply.get("error", {})
        raise RequestError(error.get("code", "?"), error.get("message", ""), error)
    return dict(reply.get("data", {}))


def _drain(recv: trio.MemoryReceiveChannel[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    while True:
        try:
            out.append(recv.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return out


@asynccontextmanager
async def open_client(
    url: str,
    token: str,
    *,
    resume_from: int | None = None,
    hello: bool = True,
    timeout: float = 10.0,
) -> AsyncIterator[DongneClient]:
    """Connect, say hello (with ``resume`` when ``resume_from`` is given) and yield the client.

    Raises:
        RequestError: the hello was refused.
        trio_websocket.ConnectionClosed: the server closed (e.g. 4001).
    """
    async with trio_websocket.open_websocket_url(url, message_queue_size=0) as ws:
        try:
            client = DongneClient(ws, last_seq=resume_from or 0, timeout=timeout)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._read)
                if hello:
                    data: dict[str, Any] = {"token": token}
                    if resume_from is not None:
                        data["resume"] = {"last_seq": resume_from}
                    client.hello = await client.request("hello", data)
                try:
                    yield client
                finally:
                    # Close while our reader still takes frames: trio-websocket's
                    # reader blocks handing a frame to its zero-size queue, so a
                    # close after cancelling ours could wait forever for a peer
                    # that keeps sending.
                    with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        finally:
            await _close_transport(ws)


CLOSE_TIMEOUT_S = 5.0


async def _close_transport(ws: trio_websocket.WebSocketConnection) -> None:
    """Close the TCP stream under ``ws``.

    trio-websocket closes it when this side closes first, but when the server
    does (1001, 4009, a dropped connection) it only waits for the server's FIN
    and leaves its own socket to the garbage collector (a ResourceWarning).
    Closing twice is harmless.
    """
    stream = getattr(ws, "_stream", None)  # private in trio-websocket 0.12
    if isinstance(stream, trio.abc.AsyncResource):
        with trio.CancelScope(shield=True), suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.aclose()
