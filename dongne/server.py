"""The trio driver: sockets in, engine calls, effects out.

Everything here is I/O and scheduling; every rule lives in ``core.Engine``.

Task tree (one root nursery, see ``run_server`` in ``app.py``)::

    root
    ├── CommitPipeline.run          group commit, then act on outcomes in order
    ├── ClientServer._timers        wakes the engine at its next deadline
    ├── ClientServer._heartbeat     pings; closes peers that stopped answering
    ├── ClientServer._accept_loop   the client listener
    │     └── connections nursery: one handler per connection (+ a writer
    │         task while its socket is backed up, + a replay task on resume)
    └── hypercorn                   the ops port
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import socket
import time
from typing import Any

import msgpack
import trio

from .clock import EngineClock
from .config import LimitSettings, ServerSettings
from .core.effects import CancelEscalation, Close, Note, Observe, Outcome, Push, Replay, Send, StartEscalation
from .core.engine import Engine
from .core.errors import CloseConnection, ProtocolError
from .core.limits import BucketSpec, IpBlocklist, Limiter
from .core.protocol import decode_request, durable_event
from .metrics import Metrics
from .pipeline import CommitPipeline
from .store import Store
from .transport import FrameEncoder, WebSocketConnection, serve_handshake
from .transport._connection import TextFrame

__all__ = ["ClientServer", "ServerStats"]

log = logging.getLogger("dongne.server")


class ServerStats:
    """Counters read by /metrics and the benches."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.frames_in = 0
        self.frames_out = 0
        self.deliveries = 0
        self.slow_consumers = 0
        self.refused_connections = 0
        self.errors: dict[str, int] = {}


class ClientServer:
    """Serves the client port and drives the engine.

    Args:
        settings: the ``[server]`` settings.
        engine: the loaded engine.
        store: the open store (reads for join and replay).
        clock: the engine clock.
    """

    def __init__(
        self,
        settings: ServerSettings,
        engine: Engine,
        store: Store,
        clock: EngineClock,
        limits: LimitSettings = LimitSettings(),
    ) -> None:
        self.settings = settings
        per_minute = limits.connections_per_ip_per_minute
        self._ip_limiter = Limiter({"ip": BucketSpec(per_minute / 60, per_minute)}, abuse_limit=1)
        self._blocklist = IpBlocklist(limits.ip_blocklist)
        self.engine = engine
        self.store = store
        self.clock = clock
        self.encoder = FrameEncoder()
        self.metrics = Metrics(self._gauges)
        self.pipeline = CommitPipeline(store, self._act, max_batch=1000, on_commit=self._on_commit)
        self.conns: dict[int, WebSocketConnection] = {}
        self.stats = ServerStats()
        self.accepting = False
        self.port: int | None = None
        self._ids = itertools.count(1)
        # id(outcome) -> (operation, when its request was read): for dongne_request_seconds.
        self._request_started: dict[int, tuple[str, float]] = {}
        self._timer_wakeup = trio.Event()
        self._timer_at = math.inf
        self._conn_nursery: trio.Nursery | None = None
        self._escalation_nursery: trio.Nursery | None = None
        self.escalation_scopes: dict[str, trio.CancelScope] = {}
        self.push_send, self.push_receive = trio.open_memory_channel[Any](math.inf)
        self._listener: socket.socket | None = None
        self._accept_scope = trio.CancelScope()

    # ---- running ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, serve, and report the bound port via ``task_status``."""
        listener = self._open_listener()
        self._listener = listener
        self.port = listener.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(self.pipeline.run)
            nursery.start_soon(self._timers)
            nursery.start_soon(self._heartbeat)
            self._escalation_nursery = await nursery.start(_nursery_holder)
            for question_id in self.engine.escalating():
                self._start_escalation(question_id)
            async with trio.open_nursery() as conn_nursery:
                self._conn_nursery = conn_nursery
                self.accepting = True
                task_status.started(self.port)
                await self._accept_loop(listener, conn_nursery)
                # Stopped accepting: close every client with 1001, bounded.
                for conn in list(self.conns.values()):
                    conn.close(1001, "server shutting down")
                conn_nursery.cancel_scope.deadline = trio.current_time() + self.settings.shutdown_timeout_s
            with trio.move_on_after(self.settings.shutdown_timeout_s) as flush:
                await self.pipeline.wait_idle()
            if flush.cancelled_caught:  # pragma: no cover - a commit stuck for seconds
                log.warning("shutdown: pipeline did not drain in time")
            self.push_send.close()
            nursery.cancel_scope.cancel()

    def _gauges(self) -> dict[str, Any]:
        return {**self.engine.counts(), "escalations_running": len(self.escalation_scopes)}

    def _on_commit(self, seconds: float, outcomes: int) -> None:
        self.metrics.commit_seconds.observe(seconds)
        self.metrics.commit_batch.observe(outcomes)

    def stop_accepting(self) -> None:
        """Begin a graceful shutdown: stop accepting and close clients with 1001."""
        self.accepting = False
        self._accept_scope.cancel()

    def _open_listener(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.settings.host, self.settings.port))
        sock.listen(self.settings.backlog)
        sock.setblocking(False)
        return sock

    async def _accept_loop(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        try:
            with self._accept_scope:
                while True:
                    await trio.lowlevel.wait_readable(listener)
                    try:
                        sock, addr = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            log.warning("accept: %s; pausing", exc)
                            await trio.sleep(0.1)
                            continue
                        raise
                    if not self._admit(addr[0]):
                        self.stats.refused_connections += 1
                        self.metrics.rate_limit_hits.labels("connection").inc()
                        sock.close()  # blocked or over its rate: no handshake, no reply
                        continue
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    nursery.start_soon(self._handle_connection, sock)
        finally:
            trio.lowlevel.notify_closing(listener)
            listener.close()

    # ---- one connection ----------------------------------------------------------

    def _admit(self, address: str) -> bool:
        """False for a blocked address or one over its connection rate."""
        if self._blocklist.blocks(address):
            return False
        now = self.clock.now_ms()
        if len(self._ip_limiter) > 10_000:
            self._ip_limiter.sweep(now)
        return self._ip_limiter.take("ip", address, now) == 0

    async def _handle_connection(self, sock: socket.socket) -> None:
        conn: WebSocketConnection | None = None
        conn_id = next(self._ids)
        opened = trio.current_time()
        try:
            with trio.move_on_after(self.settings.hello_timeout_s):
                handshake = await serve_handshake(sock, is_ready=lambda: self.accepting)
            if handshake is None or not self.accepting:
                return
            assert self._conn_nursery is not None
            conn = WebSocketConnection(
                sock,
                self._conn_nursery,
                self.encoder,
                max_message_bytes=self.settings.max_frame_bytes,
                max_buffer_bytes=self.settings.outbound_buffer_bytes,
                trailing=handshake.trailing,
            )
            self.conns[conn_id] = conn
            self.engine.open_connection(conn_id)
            self.stats.connections_total += 1
            conn.read_scope.deadline = trio.current_time() + self.settings.hello_timeout_s
            with conn.read_scope:
                async for message in conn.messages():
                    await self._on_message(conn_id, conn, message)
            if conn.read_scope.cancelled_caught and not conn.closing and not self.engine.is_authenticated(conn_id):
                conn.close(4001, "no hello within the time limit")
                await conn.aclose()
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("connection_failed", extra={"conn": conn_id})
        finally:
            if conn is not None:
                log.info(
                    "connection_closed",
                    extra={
                        "conn": conn_id,
                        "user": self.engine.user_of(conn_id),
                        "close_code": conn.close_code,
                        "slow_consumer": conn.overflowed,
                        "duration_ms": round((trio.current_time() - opened) * 1000, 1),
                    },
                )
                self.conns.pop(conn_id, None)
                if conn.overflowed:
                    self.stats.slow_consumers += 1
                    self.metrics.overflows.inc()
                self.stats.frames_out += conn.frames_out
                self.pipeline.submit(self.engine.close_connection(conn_id, self.clock.now_ms()))
                with trio.CancelScope(shield=True):
                    await conn.aclose(timeout=0.5)
            else:
                try:
                    trio.lowlevel.notify_closing(sock)
                except Exception:
                    pass
                sock.close()

    async def _on_message(self, conn_id: int, conn: WebSocketConnection, message: Any) -> None:
        self.stats.frames_in += 1
        if not self.engine.is_authenticated(conn_id) and (
            isinstance(message, TextFrame) or not _looks_like_request(message.payload)
        ):
            # PROTOCOL.md: the first frame must be hello; anything else closes with 4001.
            self.metrics.frames_in.labels("invalid").inc()
            conn.close(4001, "the first frame must be hello")
            return
        if isinstance(message, TextFrame):
            self.metrics.frames_in.labels("invalid").inc()
            self._refuse(conn_id, None, ProtocolError("bad_frame", "text frames are not accepted; send binary msgpack"))
            return
        started = time.perf_counter()
        try:
            request = decode_request(message.payload)
        except ProtocolError as exc:
            self.metrics.frames_in.labels("invalid").inc()
            rid = exc.extra.get("id")
            self._refuse(conn_id, rid if isinstance(rid, int) else None, exc)
            return
        known_op = self.engine.knows_op(request.op)
        self.metrics.frames_in.labels(request.op if known_op else "unknown").inc()
        missing = self.engine.missing_question(request) if self.engine.is_authenticated(conn_id) else None
        if missing is not None:
            found = await trio.to_thread.run_sync(self.store.find_question, missing)
            if found is not None:
                self.engine.adopt_question(*found)
        try:
            outcome = self.engine.receive(conn_id, request, self.clock.now_ms())
        except CloseConnection as exc:
            log.info("connection_refused", extra={"conn": conn_id, "close_code": exc.code, "reason": exc.reason})
            self.stats.errors[f"close_{exc.code}"] = self.stats.errors.get(f"close_{exc.code}", 0) + 1
            self.metrics.errors.labels(f"close_{exc.code}").inc()
            conn.close(exc.code, exc.reason)
            return
        except Exception:
            log.exception(
                "request_failed", extra={"conn": conn_id, "op": request.op, "user": self.engine.user_of(conn_id)}
            )
            self._refuse(conn_id, request.id, ProtocolError("internal", "internal error; the request was not applied"))
            return
        if outcome.actions and known_op:
            self._request_started[id(outcome)] = (request.op, started)
        self.pipeline.submit(outcome)
        self._schedule_timer()
        if conn.read_scope.deadline != math.inf and self.engine.is_authenticated(conn_id):
            conn.read_scope.deadline = math.inf

    def _refuse(self, conn_id: int, request_id: int | None, error: ProtocolError) -> None:
        try:
            outcome = self.engine.refuse_frame(conn_id, request_id, error, self.clock.now_ms())
        except CloseConnection as exc:
            conn = self.conns.get(conn_id)
            if conn is not None:
                conn.close(exc.code, exc.reason)
            return
        self.pipeline.submit(outcome)

    # ---- acting on outcomes ------------------------------------------------------

    def _act(self, outcome: Outcome) -> None:
        self._perform(outcome)
        started = self._request_started.pop(id(outcome), None)
        if started is not None:
            self.metrics.request_done(started[0], time.perf_counter() - started[1])

    def _perform(self, outcome: Outcome) -> None:
        for action in outcome.actions:
            if isinstance(action, Send):
                frame = self.encoder.binary(msgpack.packb(action.frame))
                sent = 0
                for conn_id in action.conn_ids:
                    conn = self.conns.get(conn_id)
                    if conn is not None:
                        conn.send_nowait(frame)
                        sent += 1
                self.stats.deliveries += sent
                self.metrics.frames_sent(action.frame["type"], sent)
                if action.frame["type"] == "reply" and not action.frame["ok"]:
                    code = action.frame["error"]["code"]
                    self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
                    self.metrics.errors.labels(code).inc()
                    if code == "rate_limited":
                        self.metrics.rate_limit_hits.labels("request").inc()
            elif isinstance(action, Close):
                conn = self.conns.get(action.conn_id)
                if conn is not None:
                    conn.close(action.code, action.reason)
            elif isinstance(action, Replay):
                conn = self.conns.get(action.conn_id)
                if conn is not None and self._conn_nursery is not None:
                    conn.hold()
                    self._conn_nursery.start_soon(self._replay, conn, action)
            elif isinstance(action, StartEscalation):
                self._start_escalation(action.question_id)
            elif isinstance(action, CancelEscalation):
                scope = self.escalation_scopes.pop(action.question_id, None)
                if scope is not None:
                    scope.cancel()
            elif isinstance(action, Note):
                log.info(action.event, extra=action.fields)
            elif isinstance(action, Observe):
                self.metrics.observe(action.metric, (self.clock.now_ms() - action.since_ms) / 1000, action.label)
            elif isinstance(action, Push):
                try:
                    self.push_send.send_nowait(action.job)
                except trio.ClosedResourceError:
                    pass  # shutting down: the job stays pending and is sent at the next start

    async def _replay(self, conn: WebSocketConnection, action: Replay) -> None:
        """Send missed durable events in order, then the live frames held meanwhile."""
        try:
            rows = await trio.to_thread.run_sync(
                self.store.read_events, action.user_id, action.after_seq, action.up_to_seq
            )
            for seq, kind, data in rows:
                await conn.send_paced(self.encoder.binary(msgpack.packb(durable_event(kind, seq, data))))
        finally:
            conn.release()

    # ---- escalation ----------------------------------------------------------------

    def _start_escalation(self, question_id: str) -> None:
        if question_id in self.escalation_scopes or self._escalation_nursery is None:
            return
        scope = trio.CancelScope()
        self.escalation_scopes[question_id] = scope
        self._escalation_nursery.start_soon(self._escalate, question_id, scope)

    async def _escalate(self, question_id: str, scope: trio.CancelScope) -> None:
        """One question's escalation: sleep until each stage is due, run it.

        The task lives in a cancel scope that accepting or closing the question
        cancels, and whose deadline is the last stage's due time (plus a
        second), so it ends by itself. Stages already past due (after a
        restart) run at once, in order.
        """
        try:
            with scope:
                last = self.engine.last_stage_due(question_id)
                if last is not None:
                    # Overdue stages (after a restart, or a late start) run at
                    # once; the deadline only bounds the task's life.
                    scope.deadline = max(self.clock.trio_time_at(last), trio.current_time()) + 1.0
                while (due := self.engine.escalation_due(question_id)) is not None:
                    await trio.sleep_until(self.clock.trio_time_at(due))
                    await self.pipeline.submit_bulk(
                        lambda: self.engine.fire_escalation(question_id, self.clock.now_ms())
                    )
        finally:
            if self.escalation_scopes.get(question_id) is scope:
                del self.escalation_scopes[question_id]

    # ---- time ------------------------------------------------------------------

    def _schedule_timer(self) -> None:
        deadline = self.engine.next_deadline()
        if deadline is not None and self.clock.trio_time_at(deadline) < self._timer_at:
            self._timer_wakeup.set()

    async def _timers(self) -> None:
        while True:
            deadline = self.engine.next_deadline()
            self._timer_at = math.inf if deadline is None else self.clock.trio_time_at(deadline)
            self._timer_wakeup = trio.Event()
            with trio.move_on_at(self._timer_at):
                await self._timer_wakeup.wait()
            self.pipeline.submit(self.engine.tick(self.clock.now_ms()))

    async def _heartbeat(self) -> None:
        """Ping every connection once per ``ping_interval_s``; drop one that sent nothing since its last ping.

        The round is spread over the interval in slices ``HEARTBEAT_SLICE_S``
        apart: 10,000 pings written in one go (and their 10,000 pongs coming
        back together) stalled everything else for a few hundred ms.
        """
        interval = self.settings.ping_interval_s
        if math.isinf(interval):
            await trio.sleep_forever()
        slices = max(1, int(interval / HEARTBEAT_SLICE_S))
        next_round = trio.current_time() + interval
        while True:
            await trio.sleep_until(next_round)
            round_start, next_round = next_round, next_round + interval
            conns = list(self.conns.items())
            per_slice = max(1, -(-len(conns) // slices))
            for i in range(0, len(conns), per_slice):
                await trio.sleep_until(round_start + interval * (i // per_slice) / slices)
                for conn_id, conn in conns[i : i + per_slice]:
                    if self.conns.get(conn_id) is not conn:
                        continue  # gone meanwhile
                    if not conn.alive:
                        log.info("connection_dead", extra={"reason": "no answer to ping"})
                        conn.abort()
                        continue
                    conn.alive = False
                    conn.ping()


#: The heartbeat pings a share of the connections this often (see ``_heartbeat``).
HEARTBEAT_SLICE_S = 0.1


def _looks_like_request(payload: bytes) -> bool:
    """Whether a frame decodes as a request at all (the hello check comes later)."""
    try:
        decode_request(payload)
    except ProtocolError:
        return False
    return True


async def _nursery_holder(*, task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED) -> None:
    """A nursery that lives as long as its parent: it holds the escalation tasks."""
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()
