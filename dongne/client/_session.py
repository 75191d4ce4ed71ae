"""A session: a connection that comes back (``open_session``)."""

from __future__ import annotations

import contextlib
import copy
import enum
import inspect
import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeVar, final

import attrs
import trio
import trio_websocket

from ._backoff import Backoff
from ._connection import DongneClient, _close_transport, _drain, _reply_data
from ._errors import (
    FATAL_CLOSE_CODES,
    AuthenticationFailed,
    ConnectFailed,
    ConnectionLost,
    RequestError,
    SessionClosed,
)

log = logging.getLogger("dongne.client")

#: Times a re-join refused for now (rate_limited, unavailable) is tried again after a reconnect.
REJOIN_TRIES = 5

T = TypeVar("T")

#: A token, or a callable (sync or async) returning a fresh one; it is called
#: for every connection, so an expired token is replaced on reconnect.
TokenSource = str | Callable[[], str] | Callable[[], Awaitable[str]]


#: Close codes after which reconnecting cannot help (PROTOCOL.md, "Close
#: codes": "get a new token" / "fix the client"). Anything else (1001 shutting
#: down, 4009 slow consumer, 1006 a dropped connection, ...) is reconnected.
class SessionState(enum.Enum):
    CONNECTING = "connecting"  # before the first hello
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


@attrs.frozen
class SessionStatistics:
    state: SessionState
    reconnects: int  # successful reconnections
    failed_attempts: int  # connection attempts that failed, in all
    last_seq: int
    rooms: tuple[str, ...]
    events_queued: int
    # From the last hello: whether its resume replayed everything (None: it
    # did not resume), and if not, the oldest seq the server still had.
    resumed: bool | None = None
    oldest_seq: int | None = None
    # Hellos whose resume could not be whole (durable events were lost to the server's retention).
    incomplete_resumes: int = 0


class _NoPublicConstructor(type):
    """Only the factory creates these (as trio's ``NoPublicConstructor``)."""

    def __call__(cls, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} has no public constructor; use open_session()")

    def _create(cls: type[T], *args: object, **kwargs: object) -> T:
        return super().__call__(*args, **kwargs)  # type: ignore[misc,no-any-return]


def _retry_after_s(error: BaseException | None) -> float:
    """How long an HTTP 429 refusal of the handshake asks to wait (``Retry-After``, s); 0 for anything else."""
    if isinstance(error, trio_websocket.ConnectionRejected) and error.status_code == 429:
        for name, value in error.headers:
            if name.lower() == b"retry-after":
                try:
                    return max(0.0, float(value))
                except ValueError:
                    return 0.0
    return 0.0


@attrs.frozen
class _Ended:
    """How one connection (or attempt at one) ended."""

    connected: bool  # hello and restore completed
    code: int | None = None  # the close code, if the WebSocket was closed
    reason: str | None = None
    error: BaseException | None = None  # what failed, if something raised


class _SessionClient(DongneClient):
    """One connection of a session: replies are tracked and events go to the session."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, session: Session) -> None:
        super().__init__(ws, last_seq=session.last_seq, timeout=session.timeout)
        self._session = session
        self._requests: dict[int, dict[str, Any]] = {}
        self._intents: dict[int, int] = {}  # a join's place among the joins and leaves of its room
        self.restoring = False

    def _sending(self, frame: dict[str, Any]) -> None:
        self._requests[frame["id"]] = frame
        intent = self._session._sending(frame)
        if intent is not None:
            self._intents[frame["id"]] = intent

    def _dispatch(self, frame: dict[str, Any]) -> bool:
        if frame.get("type") != "reply" or frame.get("id") is None:
            return self._session._event(frame)  # an event, or an error for a frame with no id
        request = self._requests.pop(frame["id"], None)
        if request is not None:
            intent = self._intents.pop(frame["id"], None)
            self._session._replied(request, frame, restoring=self.restoring, intent=intent)
        return super()._dispatch(frame)


@final
class Session(metaclass=_NoPublicConstructor):
    """A connection that comes back. Create with ``open_session``.

    ``request``, ``request_raw``, ``next_event`` and ``pending_events`` work as
    on ``DongneClient``, across reconnects. Attributes: ``state``,
    ``reconnects``, ``last_seq`` (the last durable seq queued), ``hello`` (the
    latest hello reply), ``rooms``, ``location``, ``client`` (the current
    connection, ``None`` while there is none), ``closed`` (why the session
    ended, once it has), ``timeout``, ``resumed`` and ``oldest_seq`` (what the
    latest hello said of its resume).

    Rooms whose question is gone (``question_deleted``, or ``question_closed``
    with reason ``expired``) are forgotten, so a reconnect does not re-join
    them. When a resume cannot be whole (the server no longer keeps some
    events after ``last_seq``: ``resumed`` is ``False``), the session accepts
    the gap, continues from ``oldest_seq`` and counts it in
    ``statistics().incomplete_resumes``: tell the user that some
    notifications were missed (``list_notifications`` has what is kept).
    """

    def __init__(
        self,
        url: str,
        token: TokenSource,
        *,
        backoff: Backoff,
        jitter: Callable[[], float] | None,
        timeout: float,
        on_state: Callable[[SessionState], object] | None,
        resume_from: int | None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.last_seq = resume_from or 0
        self.hello: dict[str, Any] = {}
        self.reconnects = 0
        self.failed_attempts = 0
        self.closed: SessionClosed | None = None
        self.incomplete_resumes = 0
        self._token = token
        self._backoff = backoff
        self._jitter = jitter
        self._on_state = on_state
        self._resume_from = resume_from
        self._state = SessionState.CONNECTING
        self._changed = trio.Event()
        self._client: _SessionClient | None = None
        self._rooms: dict[str, None] = {}  # an ordered set: rejoined in join order
        self._room_intents: dict[str, int] = {}  # room -> the number of its latest join or leave
        self._intents_made = 0
        self._replay_end: tuple[int, trio.Event] | None = None  # set when this seq is queued
        self._location: dict[str, Any] | None = None
        self._events_send, self._events_recv = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._driver = trio.CancelScope()

    # ---- public ----------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def client(self) -> DongneClient | None:
        return self._client

    @property
    def rooms(self) -> tuple[str, ...]:
        """The questions this session is in (and re-joins after a reconnect)."""
        return tuple(self._rooms)

    @property
    def location(self) -> dict[str, Any] | None:
        """The last ``update_location`` data sent (re-sent after a reconnect)."""
        return copy.deepcopy(self._location)

    @property
    def resumed(self) -> bool | None:
        """The latest hello's ``resumed``: ``True`` if its replay was whole, ``False`` if events were missed,
        ``None`` if it did not resume (a fresh start)."""
        value = self.hello.get("resumed")
        return value if isinstance(value, bool) else None

    @property
    def oldest_seq(self) -> int | None:
        """The latest hello's ``oldest_seq``: the oldest durable event the server still had (when ``resumed`` is False)."""
        value = self.hello.get("oldest_seq")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def statistics(self) -> SessionStatistics:
        queued = self._events_recv.statistics().current_buffer_used
        return SessionStatistics(
            self._state,
            self.reconnects,
            self.failed_attempts,
            self.last_seq,
            self.rooms,
            queued,
            self.resumed,
            self.oldest_seq,
            self.incomplete_resumes,
        )

    async def request(
        self, op: str, data: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send a request and return its reply's ``data``; waits for a connection first.

        Raises:
            RequestError: the reply was an error.
            ConnectionLost: the connection dropped before the reply (applied or not: unknown).
            SessionClosed: the session is over (closed, refused, or out of attempts).
            trio.TooSlowError: no reply within ``timeout`` (default ``self.timeout``),
                waiting for a reconnection included.
        """
        return _reply_data(await self.request_raw({"type": op, "data": data or {}}, timeout=timeout))

    async def request_raw(self, frame: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """Send a frame (``id`` added) and return the whole reply frame; raises as ``request``."""
        if frame.get("type") == "leave_question":
            # Leaving is the app's intent whatever becomes of the request (lost, timed out): the room is
            # not re-joined after a reconnect. A leave twice is harmless.
            question_id = (frame.get("data") or {}).get("question_id")
            self._rooms.pop(question_id, None)  # type: ignore[arg-type]
            if isinstance(question_id, str):
                self._room_intent(question_id)
        with trio.fail_after(self.timeout if timeout is None else timeout):
            client = await self._connected_client()
            try:
                return await client.request_raw(frame, timeout=math.inf)
            except trio_websocket.ConnectionClosed:
                self._raise_if_closed()
                raise ConnectionLost(
                    f"the connection was lost before the reply to {frame.get('type')!r}; "
                    "it may or may not have been applied"
                ) from None

    async def next_event(self, kind: str | None = None, *, timeout: float | None = None) -> dict[str, Any]:
        """The next event (of type ``kind`` if given; others before it are dropped).

        Events queued before the session ended are still returned; then
        ``SessionClosed`` is raised.
        """
        with trio.fail_after(self.timeout if timeout is None else timeout):
            while True:
                try:
                    ev = await self._events_recv.receive()
                except trio.EndOfChannel:
                    self._raise_if_closed()
                    raise  # pragma: no cover - the channel is closed only with the session
                if kind is None or ev.get("type") == kind:
                    return ev

    def pending_events(self) -> list[dict[str, Any]]:
        """Events received and not yet taken, without waiting."""
        return _drain(self._events_recv)

    async def wait_connected(self) -> None:
        """Return once the session is connected (at once if it is).

        Raises:
            SessionClosed: the session is over.
        """
        await self._connected_client()

    async def aclose(self) -> None:
        """End the session: close the connection politely (bounded by ``timeout``) and stop reconnecting.

        Requests in flight or waiting, and ``next_event`` once the queue is
        empty, raise ``SessionClosed``. Idempotent.
        """
        self._finish(SessionClosed("the session was closed"))
        client, self._client = self._client, None
        if client is not None and client.ws.closed is None:
            with trio.move_on_after(self.timeout) as cleanup:
                cleanup.shield = True
                await client.ws.aclose()
        self._driver.cancel()

    # ---- state ----------------------------------------------------------------

    def _set_state(self, state: SessionState) -> None:
        if state is self._state:
            return
        self._state = state
        self._changed.set()
        self._changed = trio.Event()
        if self._on_state is not None:
            self._on_state(state)

    def _finish(self, error: SessionClosed) -> None:
        if self.closed is not None:
            return
        self.closed = error
        self._events_send.close()
        self._set_state(SessionState.CLOSED)

    def _raise_if_closed(self) -> None:
        if self.closed is not None:
            # A copy per raise: several tasks may raise it at once.
            raise copy.copy(self.closed) from self.closed.__cause__

    async def _connected_client(self) -> _SessionClient:
        while True:
            self._raise_if_closed()
            client = self._client
            if self._state is SessionState.CONNECTED and client is not None and client._alive():
                return client
            # Not connected, or lost and the driver has not noticed yet: a
            # request sent now could only fail, so wait for the next connection.
            await self._changed.wait()

    # ---- tracking (called by the reader, in wire order) -------------------------

    def _sending(self, frame: dict[str, Any]) -> int | None:
        """Note a frame going out; a ``join_question``'s place among its room's joins and leaves (see
        ``_room_intent``)."""
        data = frame.get("data")
        # The same location again keeps the same object: a deferred re-send checks identity.
        if frame.get("type") == "update_location" and isinstance(data, dict) and data != self._location:
            self._location = copy.deepcopy(data)
        if frame.get("type") == "join_question" and isinstance(data, dict) and isinstance(data.get("question_id"), str):
            return self._room_intent(data["question_id"])
        return None

    def _room_intent(self, question_id: str) -> int:
        """Number the latest join or leave of a room: a join's reply adds the room only if no leave came after
        it (a join and a leave in flight together, the join answered last, leave the room left)."""
        self._intents_made += 1
        self._room_intents[question_id] = self._intents_made
        return self._intents_made

    def _replied(
        self, request: dict[str, Any], reply: dict[str, Any], *, restoring: bool, intent: int | None = None
    ) -> None:
        op = request.get("type")
        data = request.get("data") or {}
        result = reply.get("data") or {}
        ok = bool(reply.get("ok"))
        if op == "hello" and ok:
            self.hello = dict(result)
            server_seq = result.get("last_seq")
            if not isinstance(server_seq, int):
                return
            oldest = self.oldest_seq
            if "resume" not in data:
                self.last_seq = server_seq  # a fresh start: only events from now on
            elif result.get("resumed") is False and oldest is not None and oldest - 1 > self.last_seq:
                # The server pruned events after ours: the replay starts at
                # oldest_seq. Take the gap (waiting cannot fill it; resuming
                # again would only meet it again) and let the app know.
                log.warning(
                    "durable events %d..%d are no longer kept; resuming from %d", self.last_seq + 1, oldest - 1, oldest
                )
                self.incomplete_resumes += 1
                self.last_seq = min(oldest - 1, server_seq)
            elif server_seq < self.last_seq:
                log.warning(
                    "the server's last_seq %d is behind ours (%d); following the server", server_seq, self.last_seq
                )
                self.last_seq = server_seq
        elif op in ("create_question", "join_question") and ok and result.get("joined") is not False:
            # (A connection at its cap of rooms asks without joining the new room: nothing to re-join.)
            qid = (result.get("question") or {}).get("question_id")
            if isinstance(qid, str) and (intent is None or self._room_intents.get(qid) == intent):
                self._rooms[qid] = None
                if restoring:
                    self._queue({"type": "rejoined", "data": result})
        elif op == "delete_question" and ok:
            # Deleted by this session (the room's event goes to the others). A leave is forgotten when asked.
            self._rooms.pop(data.get("question_id"), None)  # type: ignore[arg-type]

    def _event(self, frame: dict[str, Any]) -> bool:
        kind, data = frame.get("type"), frame.get("data")
        # The question is gone, or expired (the server dropped its room): do not re-join it.
        if isinstance(data, dict) and (
            kind == "question_deleted" or (kind == "question_closed" and data.get("reason") == "expired")
        ):
            self._rooms.pop(data.get("question_id"), None)  # type: ignore[arg-type]
        seq = frame.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            if seq <= self.last_seq:
                return True  # a replay overlap: already queued
            if seq != self.last_seq + 1:
                log.warning("durable event %d after %d: a gap; reconnecting to resume", seq, self.last_seq)
                return False
            self.last_seq = seq
            if self._replay_end is not None and seq >= self._replay_end[0]:
                self._replay_end[1].set()
        self._queue(frame)
        return True

    def _queue(self, frame: dict[str, Any]) -> None:
        with contextlib.suppress(trio.ClosedResourceError):  # the session is over
            self._events_send.send_nowait(frame)

    # ---- the driver --------------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect; then, each time the connection is lost, reconnect until told to stop.

        Error handling: a failure of the first connection is raised (through
        ``task_status``); later, a fatal close or too many failed attempts end
        the session with ``SessionClosed``, raised by its methods.
        """
        with self._driver:
            ended = await self._connect_once(task_status)
            if not ended.connected:
                raise self._failure(ended, attempts=1)
            failed = 0
            while self.closed is None:
                if ended.connected:
                    failed = 0
                else:
                    failed += 1
                    self.failed_attempts += 1
                fatal = self._fatal(ended)
                if fatal is None and self._backoff.gives_up_after(failed):
                    fatal = self._failure(ended, attempts=failed)
                if fatal is not None:
                    self._finish(fatal)
                    return
                self._set_state(SessionState.RECONNECTING)
                await trio.sleep(max(self._backoff.delay(failed + 1, self._jitter), _retry_after_s(ended.error)))
                ended = await self._connect_once(None)

    async def _connect_once(self, task_status: trio.TaskStatus[None] | None) -> _Ended:
        """Connect, hello, restore, serve until the connection ends; never raises for I/O.

        ``task_status`` is given for the first connection only.
        """
        first = task_status is not None
        client: _SessionClient | None = None
        connected = False
        error: BaseException | None = None
        try:
            token = await self._fresh_token()
            async with trio_websocket.open_websocket_url(
                self.url, message_queue_size=0, connect_timeout=self.timeout, disconnect_timeout=self.timeout
            ) as ws:
                client = _SessionClient(ws, self)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client._read)
                    try:
                        # Errors are caught in here: out of the nursery they would come in groups.
                        await self._handshake(client, token, resume=not first or self._resume_from is not None)
                        resend_in = None if first else await self._restore(client)
                        if resend_in is not None:
                            nursery.start_soon(self._resend_location, client, self._location, resend_in)
                        connected = True
                        self._client = client
                        if first:
                            assert task_status is not None
                            task_status.started()
                        else:
                            self.reconnects += 1
                        self._set_state(SessionState.CONNECTED)
                        await client.wait_closed()
                        # Say so now: closing the socket below may take a moment.
                        self._client = None
                        closed = ws.closed
                        if self.closed is None and self._fatal(_Ended(True, closed.code if closed else None)) is None:
                            self._set_state(SessionState.RECONNECTING)
                    except (RequestError, trio.TooSlowError, trio_websocket.ConnectionClosed) as exc:
                        error = exc
                    finally:
                        if self._client is client:
                            self._client = None
                        nursery.cancel_scope.cancel()
        except (trio_websocket.HandshakeError, OSError, _TokenUnavailable) as exc:
            error = exc.__cause__ if isinstance(exc, _TokenUnavailable) else exc
        finally:
            if client is not None:
                await _close_transport(client.ws)
        closed = client.ws.closed if client is not None else None
        return _Ended(connected, closed.code if closed else None, closed.reason if closed else None, error)

    async def _fresh_token(self) -> str:
        if isinstance(self._token, str):
            return self._token
        try:
            value = self._token()
            if inspect.isawaitable(value):
                value = await value
            if not isinstance(value, str):
                raise TypeError(f"the token callable returned {type(value).__name__}, not str")
        except Exception as exc:
            raise _TokenUnavailable from exc
        return value

    async def _handshake(self, client: _SessionClient, token: str, *, resume: bool) -> None:
        data: dict[str, Any] = {"token": token}
        if resume:
            data["resume"] = {"last_seq": self.last_seq}
        await client.request("hello", data)  # the reply is tracked by _replied

    async def _restore(self, client: _SessionClient) -> float | None:
        """Re-join the rooms, re-send the location; a refusal is logged, not fatal.

        Returns:
            In how many seconds to try the location again (the server
            rate-limited it: it still counts the update sent before the
            loss), or ``None``.
        """
        client.restoring = True
        try:
            await self._wait_replayed(client)
            for qid in list(self._rooms):
                await self._rejoin(client, qid)
            if self._location is not None:
                try:
                    await client.request("update_location", self._location)
                except RequestError as exc:
                    return self._location_refused(exc)
            return None
        finally:
            client.restoring = False

    async def _rejoin(self, client: _SessionClient, qid: str) -> None:
        """Re-join one room. Refused for now (``rate_limited``, ``unavailable``): again after
        ``retry_after_ms``, up to 5 times, one room at a time (every refusal counts towards the server's
        4008); refused for good, or five times over: forgotten."""
        for tries in range(REJOIN_TRIES + 1):
            try:
                await client.request("join_question", {"question_id": qid})
                return
            except RequestError as exc:
                if exc.code in ("rate_limited", "unavailable") and tries < REJOIN_TRIES:
                    wait_ms = exc.error.get("retry_after_ms")
                    await trio.sleep(wait_ms / 1000 if isinstance(wait_ms, int) else 2.0**tries)
                    continue
                log.warning("could not re-join question %s: %s", qid, exc)
                self._rooms.pop(qid, None)
                return

    async def _wait_replayed(self, client: _SessionClient) -> None:
        """Wait until the hello's replay is queued (or the connection ends), before re-joining rooms.

        The server holds live frames back while it replays and counts them
        against its slow-consumer bound: a room's join reply (every answer)
        arriving then could close the connection with 4009 before anything was
        replayed, on every reconnect.
        """
        target = self.hello.get("last_seq")
        if not self._rooms or not isinstance(target, int) or self.last_seq >= target:
            return
        replayed = trio.Event()
        self._replay_end = (target, replayed)
        try:
            async with trio.open_nursery() as nursery:

                async def closed() -> None:
                    await client.wait_closed()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(closed)
                await replayed.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._replay_end = None

    async def _resend_location(self, client: _SessionClient, location: dict[str, Any] | None, wait: float) -> None:
        """Re-send a rate-limited location later, unless a newer one was sent meanwhile.

        Runs beside the connection (cancelled with it), at most a few times.
        """
        for _ in range(3):
            await trio.sleep(wait)
            if location is None or self._location is not location or self._client is not client:
                return
            try:
                await client.request("update_location", location)
                return
            except RequestError as exc:
                retry = self._location_refused(exc)
                if retry is None:
                    return
                wait = retry
            except (trio_websocket.ConnectionClosed, trio.TooSlowError):
                return  # the connection is going: the next one restores it

    def _location_refused(self, exc: RequestError) -> float | None:
        """Act on a refused location re-send; returns seconds until a retry, if one is due."""
        if exc.code == "rate_limited":
            after = exc.error.get("retry_after_ms")
            return max(0.0, after / 1000) if isinstance(after, (int, float)) else 1.0
        if exc.code != "unknown_op":  # unknown_op: a server without locations, nothing to restore
            log.warning("could not restore the location: %s", exc)
            self._location = None
        return None

    def _fatal(self, ended: _Ended) -> SessionClosed | None:
        """The error that ends the session after ``ended``, or ``None`` to reconnect."""
        code, reason = ended.code, ended.reason
        if code == 4001:
            message = f"the server refused the token (4001: {reason}); get a new token"
            return AuthenticationFailed(message, code=code, reason=reason)
        if code in FATAL_CLOSE_CODES and not (code == 4008 and not ended.connected):
            # 4008 before the connection was up is the per-user connection cap: it frees when another
            # of the user's connections ends (a dead one the server has not noticed yet): back off.
            message = f"the server closed the connection with {code} ({reason}); not reconnecting"
            return SessionClosed(message, code=code, reason=reason)
        if isinstance(ended.error, RequestError):
            error = SessionClosed(f"hello was refused: {ended.error}")
            error.__cause__ = ended.error
            return error
        if isinstance(ended.error, trio_websocket.ConnectionRejected) and ended.error.status_code == 403:
            # An address blocked, or an origin not admitted (PROTOCOL.md, "Connecting"): do not retry.
            error = SessionClosed(f"the server refused the connection to {self.url} (HTTP 403); not reconnecting")
            error.__cause__ = ended.error
            return error
        return None

    def _failure(self, ended: _Ended, *, attempts: int) -> SessionClosed:
        """Why connecting failed, ``attempts`` times in a row."""
        fatal = self._fatal(ended)
        if fatal is not None:
            return fatal
        err = ended.error
        what = f"closed with {ended.code} ({ended.reason})" if err is None else repr(err)
        if err is not None and err.__cause__ is not None:  # HandshakeError() says nothing by itself
            what += f" from {err.__cause__!r}"
        if attempts == 0:
            message = f"the connection to {self.url} was lost ({what}) and max_attempts is 0"
        else:
            message = (
                f"could not connect to {self.url} ({attempts} failed attempt{'s' if attempts > 1 else ''}): {what}"
            )
        error = ConnectFailed(message, attempts=attempts, last_error=ended.error, code=ended.code, reason=ended.reason)
        error.__cause__ = ended.error
        return error


class _TokenUnavailable(Exception):
    """The token callable raised (its error is the ``__cause__``): a failed attempt."""


@asynccontextmanager
async def open_session(
    url: str,
    token: TokenSource,
    *,
    resume_from: int | None = None,
    backoff_base: float = 1.0,
    backoff_factor: float = 2.0,
    backoff_max: float = 30.0,
    max_attempts: int | None = 5,
    jitter: Callable[[], float] | None = random.random,
    timeout: float = 10.0,
    on_state: Callable[[SessionState], object] | None = None,
) -> AsyncIterator[Session]:
    """Connect and yield a ``Session`` that reconnects whenever the connection is lost.

    Args:
        url: the server's client port, ``ws://host:port``.
        token: a token, or a callable (sync or async) returning a fresh one; it
            is called for each connection.
        resume_from: replay the durable events after this seq on the first
            connection; ``None``: only events from now on.
        backoff_base, backoff_factor, backoff_max: attempt ``n`` after a loss
            waits up to ``min(backoff_max, backoff_base * backoff_factor ** (n - 1))`` s.
        max_attempts: failed attempts in a row before giving up; ``None``: never.
        jitter: a source of uniform floats in [0, 1) scaling each wait (full
            jitter); ``None`` waits the full ceiling.
        timeout: connect and hello timeout, and the default for ``request`` and
            ``next_event``.
        on_state: called with each new ``SessionState``.

    Raises:
        AuthenticationFailed: the first hello was refused (4001).
        ConnectFailed: the first connection failed (it is not retried).
        SessionClosed: the server closed the first connection with another fatal code.

    Resource handling: on exit the connection is closed politely (bounded by
    ``timeout``) and reconnecting stops.

    Error handling: after the first connection nothing is raised here: a
    connection lost with 1001, 4009, 1006 (a drop), any code not in
    ``FATAL_CLOSE_CODES``, or 4008 closing a hello (the per-user connection cap, which
    frees by itself) is reconnected; a fatal close (4001: ``AuthenticationFailed``),
    a refused hello or ``max_attempts`` failures in a row (``ConnectFailed``)
    end the session, and its methods raise that error.
    """
    backoff = Backoff(base=backoff_base, factor=backoff_factor, cap=backoff_max, max_attempts=max_attempts)
    session: Session = Session._create(
        url, token, backoff=backoff, jitter=jitter, timeout=timeout, on_state=on_state, resume_from=resume_from
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(session._run)
            try:
                yield session
            finally:
                await session.aclose()
    except BaseExceptionGroup as group:
        # The driver raises only on bugs: what comes out is the caller's own
        # exception (or the first connection's failure), which the nursery wrapped.
        if len(group.exceptions) != 1:
            raise
        _reraise(group.exceptions[0])


def _reraise(exc: BaseException) -> NoReturn:
    """Raise ``exc`` unwrapped, keeping its own ``__context__`` (as trio-websocket does)."""
    __tracebackhide__ = True
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context
