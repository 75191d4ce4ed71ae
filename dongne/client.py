"""A Python client for dongne, on trio-websocket.

    async with open_client("ws://127.0.0.1:8765", token) as client:
        reply = await client.request("create_question", {...})
        event = await client.next_event("answer_notification")

Every request gets an integer id; ``request`` waits for the matching reply and
raises ``RequestError`` (with the wire ``code``) when it is an error. Server
events are queued for ``next_event`` / ``events()``. The client tracks
``last_seq`` and drops a durable event it has already seen.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import trio
import trio_websocket

__all__ = ["DongneClient", "RequestError", "open_client"]


class RequestError(Exception):
    """The server refused a request; ``code`` is the documented error code."""

    def __init__(self, code: str, message: str, error: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.error = error


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
        self.closed: trio_websocket.ConnectionClosed | None = None

    async def send_raw(self, payload: bytes | str) -> None:
        """Send a frame as is (for tests of bad input)."""
        await self.ws.send_message(payload)

    async def request(self, op: str, data: dict[str, Any] | None = None, *, timeout: float | None = None) -> dict[str, Any]:
        """Send a request and return its reply's ``data``.

        Raises:
            RequestError: the reply was an error.
            trio.TooSlowError: no reply within ``timeout`` (default ``self.timeout``).
        """
        reply = await self.request_raw({"type": op, "data": data or {}}, timeout=timeout)
        if not reply.get("ok"):
            error = reply.get("error", {})
            raise RequestError(error.get("code", "?"), error.get("message", ""), error)
        return dict(reply.get("data", {}))

    async def request_raw(self, frame: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """Send a frame (``id`` added) and return the whole reply frame."""
        rid = next(self._ids)
        send, recv = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[rid] = send
        try:
            await self.ws.send_message(msgpack.packb({**frame, "id": rid}))
            with trio.fail_after(self.timeout if timeout is None else timeout):
                return await recv.receive()
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
        out = []
        while True:
            try:
                out.append(self._events_recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return out

    async def _read(self) -> None:
        try:
            while True:
                message = await self.ws.get_message()
                frame = msgpack.unpackb(message, raw=False)
                self._dispatch(frame)
        except trio_websocket.ConnectionClosed as exc:
            self.closed = exc
        finally:
            self._events_send.close()

    def _dispatch(self, frame: dict[str, Any]) -> None:
        if frame.get("type") == "reply":
            waiter = self._waiting.get(frame.get("id"))  # type: ignore[arg-type]
            if waiter is not None:
                waiter.send_nowait(frame)
            elif frame.get("id") is None:
                self._events_send.send_nowait(frame)  # an error for a frame with no id
            return
        seq = frame.get("seq")
        if isinstance(seq, int):
            if seq <= self.last_seq:
                return  # already seen: resume may overlap
            self.last_seq = seq
        self._events_send.send_nowait(frame)


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
                nursery.cancel_scope.cancel()
