"""The trio driver: sockets in, engine calls, effects out.

Everything here is I/O and scheduling; every rule lives in ``core.Engine``.

Task tree (one root nursery, see ``run_server`` in ``app.py``)::

    root
    ├── CommitPipeline.run          group commit, then act on outcomes in order
    ├── PushDispatcher.run          the push outbox's deliveries
    ├── ClientServer._timers        wakes the engine at its next deadline
    ├── heartbeat.keep_alive        pings; closes peers that stopped answering
    ├── ClientServer._storage_supervisor   after a failed commit: reload, probe, resume
    ├── ClientServer._prune_periodically   the inbox's retention
    ├── ClientServer._accept_loop   the client listener (admission: doorman.Doorman)
    │     └── connections nursery: one handler per connection (+ a writer
    │         task while its socket is backed up, + at most one replay task:
    │         a resume, or events another node appended; delivery.Deliveries)
    ├── cluster.Membership.run      cluster_nodes heartbeat, the escalation lease (PostgreSQL):
    │                               ClientServer.lease_changed (only its holder runs escalation)
    ├── app._follow_news            PostgreSQL: cluster.Listener on dongne_events (other nodes'
    │                               commits: heads_moved), dongne_changes and dongne_rooms
    │                               (news.NodeNews: follow_changes, room_news; relay_rooms: this
    │                               node's typing and presence out), dongne_positions
    │                               (positions.PositionSync: this node's positions out in batches,
    │                               other nodes' in: RemotePositions), dongne_members (likewise
    │                               members.MemberSync: RemoteMembers); ClientServer.catch_up_periodically
    └── hypercorn                   the ops port
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import math
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import msgpack
import trio

from .clock import EngineClock
from .config import EscalationSettings, InboxSettings, LimitSettings, ServerSettings
from .core import (
    AcceptOnce,
    Alert,
    AppendEvent,
    BlockAddresses,
    CancelEscalation,
    Close,
    CloseOnce,
    Connected,
    CountAnswer,
    Disconnected,
    DropPushes,
    Engine,
    EscalationDue,
    Event,
    FrameReceived,
    IfOpen,
    InboxPruned,
    Note,
    Observe,
    Outcome,
    Push,
    PushJob,
    QuestionChanged,
    QuestionLoaded,
    ReadDone,
    ReadFailed,
    RelayRoom,
    Reloaded,
    Replay,
    Send,
    SendEach,
    SeqsMoved,
    StageRefused,
    StartEscalation,
    Tick,
    UserLoaded,
    WritesFailing,
    WritesWork,
)
from .core.engine import UNAVAILABLE_RETRY_MS
from .core.protocol import reply_error
from .core.records import User
from .delivery import Deliveries
from .doorman import Doorman
from .heartbeat import keep_alive
from .metrics import Metrics, ServerStatistics
from .news import NodeNews
from .pipeline import NO_SEQS_GIVEN, CommitPipeline
from .push import PushDispatcher
from .runtime import YoungCollections
from .store import Conflict, LeaseLost, SeqsGiven, Storage, StoreError, WriteFailed
from .store._writes import read_inbox_news
from .transport import (
    CLOSE_GRACE_S,
    BinaryFrame,
    FrameEncoder,
    Site,
    TextFrame,
    WebSocketConnection,
    accept_upgrade,
    normalize_address,
    read_request,
    refuse_upgrade,
)

__all__ = ["ClientServer", "ServerStatistics"]

log = logging.getLogger("dongne.server")


class ClientServer:
    """Serves the client port and drives the engine.

    Args:
        settings: the ``[server]`` settings.
        engine: the loaded engine.
        store: the open store (commits, reads for loading questions and replay).
        clock: the engine clock.
        startup: what ``Engine.load`` returned (escalations to resume).
        limits: the ``[limits]`` settings (per-address connections).
        escalation: the ``[escalation]`` settings (the push gateway).
        alert_url: where slow-response alerts are POSTed.
        pending_pushes: push jobs an earlier run left pending.
        max_batch: the most outcomes committed together.
        hot_days: how far back the engine keeps questions in memory (for
            the reload after a failed commit).
        inbox: the ``[inbox]`` settings (retention of durable events).
        lease_epoch: the escalation lease's epoch if this node holds it, else None (then it runs no
            escalation stages until :meth:`lease_changed` says it holds it). SQLite: 0, for good.
        guard_lease: escalation commits carry the epoch (PostgreSQL; ``store/CLUSTER.md``).
        adopt_interval_s: while holding the lease, how often to adopt the pending push jobs of nodes gone
            (PostgreSQL; the app passes the heartbeat's interval: nodes expire at heartbeats).
    """

    def __init__(
        self,
        settings: ServerSettings,
        engine: Engine,
        store: Storage,
        clock: EngineClock,
        *,
        startup: Outcome = Outcome(),
        limits: LimitSettings = LimitSettings(),
        escalation: EscalationSettings = EscalationSettings(),
        alert_url: str = "",
        pending_pushes: Iterable[PushJob] = (),
        max_batch: int = 1000,
        hot_days: float = 7.0,
        inbox: InboxSettings = InboxSettings(),
        site: Site | None = None,
        lease_epoch: int | None = 0,
        guard_lease: bool = False,
        adopt_interval_s: float = 10.0,
    ) -> None:
        self._inbox = inbox
        self._lease_epoch = lease_epoch
        self._guard_lease = guard_lease
        #: Questions with stages left that this node does not run: another node holds the lease.
        self.escalations_waiting: set[str] = set()
        #: Told when a commit finds the lease taken (the app passes ``Membership.forget_lease``).
        self.on_lease_lost: Callable[[], None] = lambda: None
        # The next reload follows no storage failure (a lease lost or taken): it first waits for the queue to
        # commit (a race may be lost meanwhile), then reads the store; cleared once the queue is done.
        self._quiet_reload = False
        self._takeover_pending = False  # the lease was taken: memory must be read again after that
        self._site = site
        self.settings = settings
        self._startup = startup
        self.engine = engine
        self._alerts_follow_the_lease()
        self.store = store
        self.clock = clock
        self.encoder = FrameEncoder()
        self.young_collections = YoungCollections()
        #: More live gauges, read at scrape time (the app adds the cluster's).
        self.gauge_sources: list[Callable[[], dict[str, Any]]] = []
        self.metrics = Metrics(self._gauges)
        self.door = Doorman(settings, limits, on_refused=self.metrics.rate_limit_hits.labels("connection").inc)
        self._connections_total = self.metrics.connections_total
        self.pipeline = CommitPipeline(
            store,
            self._act,
            max_batch=max_batch,
            on_commit=self._on_commit,
            on_write_failed=self._write_failed,
            on_stage_refused=self._stages_refused,
        )
        self._hot_ms = int(hot_days * 86_400_000)
        self._writes_ok = trio.Event()  # set while writes are taken
        self._writes_ok.set()
        self._storage_failing = False  # commits fail (not: a conflict's or a takeover's reload)
        self._writes_failed = trio.Event()  # wakes the storage supervisor
        self._reloaded = trio.Event()  # set once memory is rebuilt after the latest failed commit (or none failed)
        self._reloaded.set()
        # Set as well once a reload's read of the store failed (the database out of reach): frames stop waiting
        # for the rebuild then, and what they decide is refused until it is done (_on_message).
        self._reload_settled = trio.Event()
        self._reload_settled.set()
        # Requests being handled (a store read may hold one for a while): a shutdown decides them before its 1001.
        self._handling = 0
        self._all_handled = trio.Event()
        # Writes taken again on trial after the probe committed: set at the next commit, or failure.
        self._trial = trio.Event()
        self._trial.set()
        self._probe_delay = PROBE_INTERVAL_S  # doubles with each probe or trial that fails, in one outage
        self.pushes = PushDispatcher(
            escalation,
            self.pipeline.submit,
            clock,
            pending_pushes,
            read_pending=store.pending_push_jobs,
            # Several nodes: the lease holder sends the pending jobs of nodes gone (store/CLUSTER.md).
            # On the writer's connection: between the pipeline's commits, never beside one.
            adopt=(
                (
                    lambda limit, since: self.pipeline.run_between_commits(
                        functools.partial(store.adopt_push_jobs, limit, since)
                    )
                )
                if guard_lease
                else None
            ),
            adopt_interval_s=adopt_interval_s,
            alert_url=alert_url,
            incarnation=store.incarnation,
        )
        self.pushes.adopting = lease_epoch is not None
        self.conns: dict[int, WebSocketConnection] = {}
        self.accepting = False
        self.port: int | None = None
        self._ids = itertools.count(1)
        self._timer_wakeup = trio.Event()
        self._timer_at = math.inf
        self._conn_nursery: trio.Nursery | None = None
        self._escalation_nursery: trio.Nursery | None = None
        self.escalation_scopes: dict[str, trio.CancelScope] = {}
        self._listener: socket.socket | None = None
        self._accept_scope = trio.CancelScope()
        self._seqs_moved: set[str] | None = None  # users of a Conflict's refused events, for the storage supervisor
        # A Conflict's question and what its losers' connections are owed, until memory has the store's copy.
        self._conflicted: _Conflicted | None = None
        self._catch_up_wakeup = trio.Event()
        #: This node's id in news on ``dongne_events`` (the app sets it; its own news is skipped).
        self.node_id = ""
        #: The LISTEN connection's keeper on PostgreSQL (the app sets it), for /admin, logs and tests.
        self.listener: Any = None
        #: Positions through the store on PostgreSQL (the app sets it: ``positions.PositionSync``), for tests.
        self.positions: Any = None
        #: Room members through the store on PostgreSQL (the app sets it: ``members.MemberSync``), for tests.
        self.members: Any = None
        #: Each connection's durable stream (exactly once, in seq order; replays from the store).
        self.deliveries = Deliveries(store.read_event_rows, self.encoder, self._spawn)
        #: Other nodes' changed rows and room events in, this node's room events out (PostgreSQL).
        self.news = NodeNews(store, self._feed, self._spawn, lambda: self.node_id, engine.follows_escalation)

    # ---- running ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, serve, and report the bound port via ``task_status``."""
        listener = self._open_listener()
        self._listener = listener
        self.port = listener.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(self.pipeline.run)
            await nursery.start(self.pushes.run)
            nursery.start_soon(self._timers)
            nursery.start_soon(keep_alive, self.conns, self.settings.ping_interval_s)
            nursery.start_soon(self._storage_supervisor)
            nursery.start_soon(self._prune_periodically)
            await nursery.start(self._hold_escalations)
            self._perform(self._startup)
            async with trio.open_nursery() as conn_nursery:
                self._conn_nursery = conn_nursery
                self.accepting = True
                task_status.started(self.port)
                await self._accept_loop(listener, conn_nursery)
                # Stopped accepting, and reading requests (see _on_message). What was decided before goes out
                # first: a write committed meanwhile is acknowledged, not lost to the close (a client told
                # nothing would ask again: a second question). Then every client gets 1001. All bounded.
                deadline = trio.current_time() + self.settings.shutdown_timeout_s
                with trio.move_on_at(deadline):
                    if self._handling:  # requests read before, still waiting for a store read: decided first
                        self._all_handled = trio.Event()
                        await self._all_handled.wait()
                    await self.pipeline.wait_acted()
                for conn in list(self.conns.values()):
                    conn.close(1001, "server shutting down")
                conn_nursery.cancel_scope.deadline = deadline
            # No new push delivery; those under way end, recorded, within the same deadline.
            self.pushes.close()
            with trio.move_on_at(deadline):
                await self.pushes.wait_finished()
            with trio.move_on_at(deadline) as flush:
                await self.pipeline.wait_idle()
            if flush.cancelled_caught:  # pragma: no cover - a commit stuck for seconds
                log.warning("shutdown: pipeline did not drain in time")
            nursery.cancel_scope.cancel()

    def _gauges(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        for source in self.gauge_sources:
            extra.update(source())
        return {
            **extra,
            **self.engine.counts(),
            "escalations_running": len(self.escalation_scopes),
            "escalations_waiting": len(self.escalations_waiting),
            "store_writes_failing": 1 if self._storage_failing else 0,
        }

    def _on_commit(self, seconds: float, outcomes: int, given: SeqsGiven) -> None:
        self._trial.set()  # a real commit went through
        self.metrics.commit_seconds.observe(seconds)
        self.metrics.commit_batch.observe(outcomes)
        if given:  # another node appended to these inboxes first: the engine's next seqs follow the store's
            self.metrics.seqs_renumbered.inc(len(given))
            users = self.engine.users
            heads = {u: h for u, seqs in given.items() if u in users and (h := max(seqs.values())) > users[u].last_seq}
            if heads:
                self._feed(SeqsMoved(heads))

    def _stages_refused(self, stages: list[Outcome]) -> None:
        """Escalation stages a commit took out: another node had ended their questions (``IfOpen``). Nothing
        of them was stored or sent; the engine takes their alerts back and ends those escalations."""
        for outcome in stages:
            for guard in (w for w in outcome.writes if isinstance(w, IfOpen)):
                seqs = tuple((w.user_id, w.seq) for w in outcome.writes if isinstance(w, AppendEvent))
                self._feed(StageRefused(guard.question_id, guard.alerted, seqs))

    def statistics(self) -> ServerStatistics:
        """Traffic so far (from the metrics registry, where it is counted)."""
        return self.metrics.statistics()

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
                    peer = normalize_address(addr[0])
                    if self.door.blocked(peer) and not self.door.proxies.trusts(peer):
                        self.metrics.rate_limit_hits.labels("connection").inc()
                        sock.close()  # a blocked client, not behind a proxy: no handshake, no reply
                        continue
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    nursery.start_soon(self._handle_connection, sock, peer)
        finally:
            trio.lowlevel.notify_closing(listener)
            listener.close()

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        """Start a task beside the connections (a replay: it ends with them)."""
        if self._conn_nursery is not None:
            self._conn_nursery.start_soon(fn, *args)

    # ---- one connection ----------------------------------------------------------

    def address_of(self, conn_id: int) -> str | None:
        """The client address of an open connection (behind trusted proxies, the real one)."""
        return self.door.address_of(conn_id)

    def _block_addresses(self, cidrs: tuple[str, ...]) -> None:
        """Run-time blocks changed: new connections from them are refused, open ones closed with 4003."""
        for conn_id in self.door.block(cidrs):
            conn = self.conns.get(conn_id)
            if conn is not None:
                log.info("connection_blocked", extra={"conn": conn_id, "address": self.door.address_of(conn_id)})
                conn.close(4003, "this address is blocked")

    async def _handle_connection(self, sock: socket.socket, peer: str = "") -> None:
        conn: WebSocketConnection | None = None
        conn_id = next(self._ids)
        opened = trio.current_time()
        admitted: str | None = None  # the address whose unauthenticated handshake this is
        authenticated = False
        disconnected = False  # the engine was told (Disconnected)
        answered_peer = False  # the close sent was the answer to the peer's own (its code, not ours)
        user_id: str | None = None  # whose connection it was, when the engine was told early
        try:
            handshake = None
            with trio.move_on_after(self.settings.hello_timeout_s):
                request = await read_request(
                    sock,
                    peer=peer,
                    is_ready=lambda: self.accepting,
                    proxies=self.door.proxies,
                    proxy_protocol=self.settings.proxy_protocol,
                    site=self._site,
                )
                if request is not None:
                    refusal = self.door.admit(request, self.clock.now_ms())
                    if refusal is not None:
                        await refuse_upgrade(sock, request, refusal)
                    else:
                        admitted = request.address
                        handshake = await accept_upgrade(sock, request)
            if handshake is None or admitted is None or not self.accepting:
                return
            assert self._conn_nursery is not None
            conn = WebSocketConnection(
                sock,
                self._conn_nursery,
                self.encoder,
                max_message_bytes=self.settings.max_frame_bytes,
                max_buffer_bytes=self.settings.outbound_buffer_bytes,
                trailing=handshake.trailing,
                on_receive=self.young_collections.woke,
            )
            self.conns[conn_id] = conn
            self.door.remember(conn_id, admitted)
            log.info(
                "connection_opened",
                extra={"conn": conn_id, "address": admitted, "user_agent": request.user_agent if request else ""},
            )
            self._connections_total.inc()
            self._feed(Connected(conn_id))
            with conn.read_scope:  # close() bounds it: the peer gets a grace period to answer
                async for message in conn.messages():
                    self._handling += 1
                    try:
                        await self._on_message(conn_id, message)
                    finally:
                        self._handling -= 1
                        if not self._handling:
                            self._all_handled.set()
                    if not authenticated and self.engine.user_of(conn_id) is not None:
                        authenticated = True  # a valid hello: the address's handshake is settled
                        self.door.addresses.authenticated(admitted, self.clock.now_ms())
            if not conn.closing and not conn.socket_closed:
                # The peer is done: the engine hears it now (its user goes offline, and may come back at once
                # under the per-user cap); the replies it is still owed go out before the close.
                user_id = self.engine.user_of(conn_id)
                self._feed(Disconnected(conn_id))
                disconnected = True
                answered_peer = await self._answer_the_peers_close(conn)
        except trio.Cancelled:
            raise
        except OSError as exc:  # the peer reset or broke the socket (in the handshake, say): not a server fault
            log.info("connection_lost", extra={"conn": conn_id, "error": type(exc).__name__})
        except Exception:
            log.exception("connection_failed", extra={"conn": conn_id})
        finally:
            self.door.forget(conn_id)
            if admitted is not None:
                # The server's own close decides, not a code the peer chose for its close frame (a close the
                # server decided before, even if acted on after the peer's close frame was read, is its own).
                ours = conn.close_code if conn is not None and not answered_peer else None
                if not authenticated and ours in _NOT_THE_CLIENTS_FAULT:
                    self.door.addresses.released(admitted, self.clock.now_ms())  # settled, not charged
                elif not authenticated:  # bad token, no hello in time, a bad first frame, dropped
                    self.door.addresses.failed(admitted, self.clock.now_ms())
                elif ours == 4008:  # a flood, after authenticating
                    self.door.addresses.offence(admitted, self.clock.now_ms())
            if conn is not None:
                log.info(
                    "connection_closed",
                    extra={
                        "conn": conn_id,
                        "user": user_id if disconnected else self.engine.user_of(conn_id),
                        "close_code": conn.close_code,
                        "slow_consumer": conn.overflowed,
                        "duration_ms": round((trio.current_time() - opened) * 1000, 1),
                    },
                )
                self.conns.pop(conn_id, None)
                self.deliveries.forget(conn_id)
                if conn.overflowed:
                    self.metrics.overflows.inc()
                    self.metrics.errors.labels("close_4009").inc()
                if not disconnected:
                    self._feed(Disconnected(conn_id))
                with trio.CancelScope(shield=True):
                    await conn.aclose(timeout=0.5)
            else:
                with contextlib.suppress(OSError):
                    trio.lowlevel.notify_closing(sock)
                sock.close()

    async def _answer_the_peers_close(self, conn: WebSocketConnection) -> bool:
        """The peer closed its side (a close frame, or the end of its stream) after requests: their replies
        (a write's acknowledgement among them) go out first, for at most ``CLOSE_GRACE_S``; then the close
        frame answers the peer's. Returns whether it did (a close the server had decided before, queued
        with those replies, may have gone out instead)."""
        with trio.move_on_after(CLOSE_GRACE_S):
            await self.pipeline.wait_acted()
        if conn.peer_close_code is None or conn.closing:
            return False
        conn.close(conn.peer_close_code, "")
        return True

    def _read_user(self, user_id: str) -> tuple[User | None, int | None]:
        """A hello's user as stored, and the oldest seq of theirs still kept (blocking: on a worker thread)."""
        _, people = self.store.read_rows([], [user_id])
        return (people[0] if people else None), self.store.read_oldest([user_id]).get(user_id)

    async def _on_message(self, conn_id: int, message: BinaryFrame | TextFrame) -> None:
        if not self.accepting:
            return  # shutting down: not applied, and the 1001 that follows tells the client its reply is lost
        # A commit failed and memory is not rebuilt yet: it may hold the refused writes (a question, an answer,
        # a seq), so nothing is decided on it until then (a request that lost a race waits so too: its replies
        # wait for the refresh, in order). If the store cannot be read for the rebuild, requests are answered
        # meanwhile, with ``unavailable`` (below).
        if not self._reload_settled.is_set():  # (a wait on a set event is still a trip through the scheduler)
            await self._reload_settled.wait()
        started = time.perf_counter()
        text = isinstance(message, TextFrame)
        payload = b"" if isinstance(message, TextFrame) else message.payload
        outcome = self._handle(FrameReceived(conn_id, payload, text))
        while outcome.load_question is not None or outcome.read is not None or outcome.load_user is not None:
            # The request needs the database (a question not in memory, a
            # list, a hello's user another node may have made): read it on a
            # worker thread, then hand it back. Frames of this connection wait meanwhile. The read waits for
            # the writes queued before it, so that it sees them (its reply would wait for their commit anyway:
            # replies leave in order, behind the outcomes queued and in flight).
            await self.pipeline.wait_committed()
            if self._conflicted is not None and conn_id in self._conflicted.conns:
                await self._reloaded.wait()  # a write of its lost a race meanwhile: its replies wait, in order
            try:
                if outcome.read is not None:
                    rows = await trio.to_thread.run_sync(self.store.read, outcome.read)
                    outcome = self._handle(ReadDone(conn_id, rows))
                    continue
                if outcome.load_user is not None:
                    person, oldest = await trio.to_thread.run_sync(self._read_user, outcome.load_user)
                    outcome = self._handle(UserLoaded(conn_id, person, oldest))
                    continue
                found = await trio.to_thread.run_sync(self.store.find_question, str(outcome.load_question))
            except Exception:  # a read the database refused: this request fails, not the connection
                log.exception("read_failed", extra={"conn": conn_id, "op": outcome.op})
                outcome = self._handle(ReadFailed(conn_id))
                break
            question, answers = found if found is not None else (None, [])
            adopted: list[User] = []
            if question is not None:
                # Its asker and authors another node made, whose news has not come: read with it.
                unknown = {question.asker_id, *(a.author_id for a in answers)} - self.engine.users.keys()
                if unknown:
                    try:
                        _, adopted = await trio.to_thread.run_sync(self.store.read_rows, [], sorted(unknown))
                    except Exception:  # as above: this request fails, not the connection
                        log.exception("read_failed", extra={"conn": conn_id, "op": outcome.op})
                        outcome = self._handle(ReadFailed(conn_id))
                        break
            outcome = self._handle(QuestionLoaded(conn_id, question, tuple(answers), tuple(adopted)))
        self.metrics.request_counted(outcome.op, outcome.error)
        token = started if outcome.op not in ("", "invalid", "unknown") else None
        if self._reloaded.is_set() or outcome.writes:  # writes: refused by the pipeline, failing meanwhile
            self.pipeline.submit(outcome, token)
        else:  # decided on memory that may hold refused writes (a commit failed while it read the store, or
            # the store cannot be read for the rebuild)
            self._refuse_in_order([(outcome, token)])
        self._schedule_timer()
        if self.pipeline.full:
            await self.pipeline.wait_room()  # stop reading this socket until the commits catch up

    def _handle(self, event: Event) -> Outcome:
        return self.engine.handle(event, self.clock.now_ms())

    def _feed(self, event: Event) -> None:
        """Hand the engine an event and its outcome to the pipeline."""
        self.pipeline.submit(self._handle(event))
        self._schedule_timer()

    def feed(self, event: Event) -> None:
        """Hand the engine an event from outside the client port (``positions.PositionSync``)."""
        self._feed(event)

    def _stored_seq(self, given: Mapping[str, Mapping[int, int]], conn_id: int, seq: int) -> int:
        """The seq the store gave the event the engine numbered ``seq`` for the user of ``conn_id``."""
        user_id = self.deliveries.user_of(conn_id)
        if user_id is None:
            state = self.engine.conns.get(conn_id)
            user_id = state.user_id if state is not None else None
        return given.get(user_id, {}).get(seq, seq) if user_id is not None else seq

    def _stored_seq_of_any(self, given: Mapping[str, Mapping[int, int]], conn_ids: Iterable[int], seq: int) -> int:
        """:meth:`_stored_seq` for an alert to one user's connections: the first still known tells whose (one
        closed since the commit no longer does)."""
        for conn_id in conn_ids:
            if conn_id in self.conns:
                return self._stored_seq(given, conn_id, seq)
        return seq

    # ---- acting on outcomes ------------------------------------------------------

    def _act(self, outcome: Outcome, started: float | None, given: Mapping[str, Mapping[int, int]]) -> None:
        self._perform(outcome, given)
        if started is not None:
            self.metrics.request_done(outcome.op, time.perf_counter() - started)

    def _perform(self, outcome: Outcome, given: Mapping[str, Mapping[int, int]] = NO_SEQS_GIVEN) -> None:
        """Carry out an outcome's actions; ``given``: seqs its commit stored other than the engine's (a durable
        event's frame goes out with the stored seq: ``CommitPipeline``)."""
        # Frames are counted per outcome and type, not per frame: a batch of
        # a stage's alerts is a hundred sends and one count.
        counts: dict[str, int] = {}
        conns = self.conns
        binary = self.encoder.binary
        for action in outcome.actions:
            if isinstance(action, Send):
                frame = binary(msgpack.packb(action.frame))
                sent = 0
                seq = action.frame.get("seq")
                for conn_id in action.conn_ids:
                    conn = conns.get(conn_id)
                    if conn is not None:
                        if seq is None:
                            conn.send_nowait(frame)
                        elif given and (stored := self._stored_seq(given, conn_id, seq)) != seq:
                            again = binary(msgpack.packb({**action.frame, "seq": stored}))
                            self.deliveries.live(conn, conn_id, stored, again)
                        else:  # a durable event: in order, once (see delivery.py)
                            self.deliveries.live(conn, conn_id, seq, frame)
                        sent += 1
                kind = action.frame["type"]
                counts[kind] = counts.get(kind, 0) + sent
            elif isinstance(action, SendEach):
                sent = 0
                live = self.deliveries.live
                for conn_ids, seq, packed in action.frames:
                    if given and (stored := self._stored_seq_of_any(given, conn_ids, seq)) != seq:
                        seq, packed = stored, msgpack.packb({**msgpack.unpackb(packed), "seq": stored})
                    frame = binary(packed)
                    for conn_id in conn_ids:
                        conn = conns.get(conn_id)
                        if conn is not None:
                            live(conn, conn_id, seq, frame)  # durable: in order, once (see delivery.py)
                            sent += 1
                counts[action.kind] = counts.get(action.kind, 0) + sent
            elif isinstance(action, Close):
                conn = self.conns.get(action.conn_id)
                if conn is not None:
                    log.info(
                        "connection_refused",
                        extra={"conn": action.conn_id, "close_code": action.code, "reason": action.reason},
                    )
                    conn.close(action.code, action.reason)
            elif isinstance(action, Replay):
                conn = self.conns.get(action.conn_id)
                if conn is not None:
                    self.deliveries.start(conn, action.conn_id, action.user_id, action.after_seq, action.up_to_seq)
            elif isinstance(action, RelayRoom):
                self.news.relay(action)
            elif isinstance(action, StartEscalation):
                self._start_escalation(action)
            elif isinstance(action, CancelEscalation):
                self.escalations_waiting.discard(action.question_id)
                scope = self.escalation_scopes.pop(action.question_id, None)
                if scope is not None:
                    scope.cancel()
            elif isinstance(action, Note):
                log.info(action.event, extra=action.fields)
            elif isinstance(action, Observe):
                self.metrics.observe(action.metric, (self.clock.now_ms() - action.since_ms) / 1000, action.label)
            elif isinstance(action, Push):
                self.pushes.offer(action.job)
            elif isinstance(action, DropPushes):
                self.pushes.drop(action.question_id, action.answer_id, action.user_id)
            elif isinstance(action, Alert):
                self.pushes.alert_now(action.kind, action.data)
            elif isinstance(action, BlockAddresses):
                self._block_addresses(action.cidrs)
        for kind, sent in counts.items():
            self.metrics.frames_sent(kind, sent)

    # ---- escalation ----------------------------------------------------------------

    async def _hold_escalations(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The nursery of the escalation tasks, as long as the server runs. Once it is closed (shutting down)
        there is none: an escalation started then (a rebuild's, acted on during the shutdown) is not run here,
        and the next start resumes it from the store."""
        async with trio.open_nursery() as nursery:
            self._escalation_nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                # As soon as the body is cancelled, not once the nursery has closed: trio closes it when its last
                # task ends, and resumes this task only later, so a task run in between would find it closed.
                self._escalation_nursery = None

    def _start_escalation(self, start: StartEscalation) -> None:
        if self._escalation_nursery is None:
            return
        epoch = self._lease_epoch
        if epoch is None:  # another node runs it; we read it from the store if we take the lease over
            self.escalations_waiting.add(start.question_id)
            return
        self.escalations_waiting.discard(start.question_id)
        running = self.escalation_scopes.get(start.question_id)
        if running is not None:
            # It sleeps until a due time decided before: after a reload (a refused commit) a stage it
            # counted as run may be due again now. A new task looks again; no stage runs twice (the
            # engine runs only stages not yet run).
            running.cancel()
        # The task sleeps at most until a second after its last stage is due;
        # overdue stages (after a restart, or a late start) run at once.
        ends_at = max(self.clock.trio_time_at(start.until), trio.current_time()) + 1.0
        scope = trio.CancelScope()
        self.escalation_scopes[start.question_id] = scope
        self._escalation_nursery.start_soon(self._escalate, start.question_id, scope, epoch, ends_at)

    async def _escalate(self, question_id: str, scope: trio.CancelScope, epoch: int, ends_at: float) -> None:
        """One question's escalation: sleep until each stage is due, run it.

        The task lives in a cancel scope that accepting or closing the question
        cancels. Its deadline, ``ends_at`` (the last stage's due time plus a
        second), bounds its sleeping, not its work: a stage that is due is
        delivered, batch after batch, however long its commits take (a
        deadline on the scope cut a stage off in the middle when commits
        stalled, and the engine kept it half-sent until the next reload).
        Stages already past due (after a restart) run at once, in order. Each
        stage's commit carries ``epoch``, the lease's when the task started
        (PostgreSQL): once another node took the lease, it is refused.
        """
        guard = epoch if self._guard_lease else None
        try:
            with scope:
                while (due := self.engine.escalation_due(question_id)) is not None:
                    at = self.clock.trio_time_at(due)
                    if at > ends_at:
                        break  # no stage of the plan it was started for is left
                    await trio.sleep_until(at)
                    await self._writes_ok.wait()  # a stage that cannot be committed runs late, not never
                    await self.pipeline.submit_bulk(lambda: self._handle(EscalationDue(question_id)), lease_epoch=guard)
        finally:
            if self.escalation_scopes.get(question_id) is scope:
                del self.escalation_scopes[question_id]

    def lease_changed(self, epoch: int | None) -> None:
        """The escalation lease (``Membership.on_lease``): held at ``epoch``, or not held (None).

        Losing it cancels every escalation task (a commit decided before is
        refused by its epoch anyway). Taking it, or holding it at a new epoch
        (another node may have held it in between), rebuilds memory from the
        store once every commit queued before is done: the escalations'
        progress and ``notified`` as the previous holder left them (the
        hourly caps count every node's alerts), and the reload's
        ``StartEscalation`` runs overdue stages at once.
        """
        if epoch == self._lease_epoch:
            return
        was, self._lease_epoch = self._lease_epoch, epoch
        self._alerts_follow_the_lease()
        self.pushes.adopt_now(epoch is not None)
        log.info("escalation_lease", extra={"epoch": epoch, "was": was})
        if was is not None:
            for question_id, scope in list(self.escalation_scopes.items()):
                self.escalations_waiting.add(question_id)
                scope.cancel()
            self.escalation_scopes.clear()
        if epoch is not None and self._escalation_nursery is not None:
            self._begin_takeover()

    def _alerts_follow_the_lease(self) -> None:
        """Slow-response alerts are raised here when alone, or, with several nodes, while holding the lease."""
        self.engine.oversight.raises_alerts = self._lease_epoch is not None or not self._guard_lease

    def _begin_takeover(self) -> None:
        """Rebuild memory from the store, read after the lease was taken (see :meth:`lease_changed`)."""
        self._takeover_pending = True
        if not self.pipeline.failing:
            self.pipeline.refuse_writes(TakingOver("this node is taking escalation over; retry"))
        # Else the storage supervisor is at work: it reads the store again before writes are taken.

    # ---- the inbox's retention ----------------------------------------------------

    async def prune_inbox(self) -> int:
        """Delete durable events older than ``[inbox] retention_days``, in bounded commits; returns how many users lost some."""
        cutoff = self.clock.now_ms() - int(self._inbox.retention_days * 86_400_000)
        users = 0
        while True:
            try:
                oldest = await self.pipeline.run_between_commits(
                    functools.partial(self.store.prune_events, cutoff, self._inbox.prune_batch)
                )
            except WriteFailed:
                return users  # the storage supervisor deals with it; next round
            if not oldest:
                return users
            users += len(oldest)
            self._feed(InboxPruned(oldest))

    async def prune_alerts(self) -> int:
        """Delete the records of who was alerted (``notified``) older than ``[inbox] retention_days``, but for
        questions still active, in bounded commits; returns how many.

        An alert's record keeps a question's escalation from alerting anyone
        twice, and the last hour's count each local's cap; past the inbox's
        retention neither needs it, and it grew by a row per alert. A
        retention shorter than the caps' window keeps them for that window.
        """
        keep_ms = max(int(self._inbox.retention_days * 86_400_000), self.engine.where.ledger.window_ms)
        return await self._delete_in_batches(self.store.prune_alerts, self.clock.now_ms() - keep_ms)

    async def prune_pushes(self) -> int:
        """Delete the push jobs settled (sent, failed, expired, cancelled, unsent) more than ``[inbox]
        retention_days`` ago, in bounded commits; returns how many. Pending ones stay (start-up expires the
        old ones): the outbox keeps what is owed, and the recent history, not a row per push for good."""
        cutoff = self.clock.now_ms() - int(self._inbox.retention_days * 86_400_000)
        return await self._delete_in_batches(self.store.prune_pushes, cutoff)

    async def _delete_in_batches(self, delete: Callable[[int, int], int], cutoff: int) -> int:
        """``delete(cutoff, batch)`` again and again, between the pipeline's commits, until a batch is not full;
        returns how many rows went."""
        deleted = 0
        while True:
            try:
                batch: int = await self.pipeline.run_between_commits(
                    functools.partial(delete, cutoff, self._inbox.prune_batch)
                )
            except WriteFailed:
                return deleted  # the storage supervisor deals with it; next round
            deleted += batch
            if batch < self._inbox.prune_batch:
                return deleted

    async def _prune_periodically(self) -> None:
        if math.isinf(self._inbox.prune_interval_s):
            return
        while True:
            await trio.sleep(self._inbox.prune_interval_s)
            pruned = await self.prune_inbox()
            if pruned:
                log.info("inbox_pruned", extra={"users": pruned})
            alerts = await self.prune_alerts()
            if alerts:
                log.info("alerts_pruned", extra={"alerts": alerts})
            pushes = await self.prune_pushes()
            if pushes:
                log.info("push_jobs_pruned", extra={"jobs": pushes})

    # ---- storage faults ------------------------------------------------------------

    @property
    def writable(self) -> bool:
        """False while writes are refused: commits fail, or memory is read again after a conflict or a
        takeover (a moment)."""
        return self._writes_ok.is_set()

    @property
    def ready(self) -> bool:
        """What ``/ready`` on the ops port says: taking connections, and the database takes writes."""
        return self.accepting and not self._storage_failing

    @property
    def storage_failing(self) -> bool:
        """True while commits to the database fail (``/ready`` answers 503, ``store_writes_failing`` is 1);
        not while memory is read again after a conflict or a takeover: the database works then."""
        return self._storage_failing

    def _write_failed(self, exc: WriteFailed, refused: list[tuple[Outcome, Any]]) -> None:
        """A commit failed (or writes came while failing): refuse what will not be committed.

        Called synchronously by the pipeline, before any other task runs: the
        engine stops taking writes at once. A ``Conflict`` (another node
        answered, accepted or closed a question first) is no storage failure:
        the store works, so no alert and no probe; the supervisor reads the
        heads of the users whose events were refused (``SeqsMoved``) and
        rebuilds memory, and writes are taken again as soon as that is done;
        the requests whose guarded write lost are answered
        ``conflict`` by the supervisor once the question is read again, and
        everything else their connections are owed waits with them, so that
        replies keep the order of the requests (their reading pauses until
        then: ``_on_message``). So do a ``LeaseLost`` (another node took the
        escalation lease; this one stops escalating) and a ``TakingOver``
        (this node took it and reads the store again), without those replies;
        a race lost by what they let commit first is answered ``conflict``
        after their rebuild, as any other.
        """
        if not isinstance(exc, TakingOver):
            self.metrics.store_write_failures.inc()
        if isinstance(exc, LeaseLost) and (exc.epoch is None or exc.epoch == self._lease_epoch):
            # Refused for the epoch we hold (an older one: decided before a takeover the reload covers).
            log.warning("escalation_lease_lost_on_commit", extra={"epoch": exc.epoch, "error": str(exc)})
            self.lease_changed(None)
            self.on_lease_lost()  # the next heartbeat says whether we hold it again, at a new epoch
        if self._writes_ok.is_set():
            self._writes_ok = trio.Event()
            self._reloaded = trio.Event()
            self._reload_settled = trio.Event()
            self._writes_failed.set()
            self._trial.set()  # writes taken on trial failed again
            if isinstance(exc, (TakingOver, LeaseLost)):
                self._quiet_reload = True  # no storage failure: rebuild memory, then take writes again
            elif isinstance(exc, Conflict):
                self._lost_race(exc, refused)
                # Every user whose seqs the refused outcomes counted in memory.
                self._seqs_moved = {
                    w.user_id for outcome, _ in refused for w in outcome.writes if isinstance(w, AppendEvent)
                }
            else:
                if self._storage_failing:  # writes taken on trial: the same outage, told once
                    log.warning("storage_still_failing", extra={"error": str(exc)})
                else:
                    log.error("storage_failing", extra={"error": str(exc)})
                self._storage_failing = True
                self._perform(self._handle(WritesFailing(str(exc))))
        elif isinstance(exc, Conflict) and self._quiet_reload and self._conflicted is None:
            # Lost while memory is read again for a takeover (what was queued still commits, first): the
            # losers are answered ``conflict`` after that rebuild, as after any lost race.
            self._lost_race(exc, refused)
        self._refuse_in_order(refused)

    def _refuse_in_order(self, refused: list[tuple[Outcome, Any]]) -> None:
        """Refuse outcomes after what their connections are owed before them: behind the replies of what was
        committed before (they may still be going out), or, for a connection whose request lost a race, after
        the rebuild (``_settle_lost_race``)."""
        conflicted = self._conflicted
        now_refused = []
        for outcome, token in refused:
            if conflicted is not None and outcome.request is not None and outcome.request[0] in conflicted.conns:
                conflicted.owed.append((outcome, token))  # in order, after the rebuild
                continue
            now_refused.append((outcome, token))
        if now_refused:
            self.pipeline.after_acting(lambda: self._refuse_all(now_refused))

    def _lost_race(self, exc: Conflict, refused: list[tuple[Outcome, Any]]) -> None:
        """Note a race lost to another node: the connections whose requests lost wait for the rebuild."""
        log.warning("question_conflict", extra={"question_id": exc.question_id, "what": exc.what})
        self.metrics.question_conflicts.inc()
        losers = {o.request[0] for o, _ in refused if o.request and _raced(o, exc.question_id)}
        self._conflicted = _Conflicted(exc.question_id, losers)

    def _refuse_all(self, refused: list[tuple[Outcome, Any]], conflict: str | None = None) -> None:
        for outcome, token in refused:
            self._refuse_outcome(outcome, token, conflict)

    def _refuse_outcome(self, outcome: Outcome, token: Any, conflict: str | None = None) -> None:
        """Act on an outcome that will not be committed, or that was decided on memory holding writes that
        were not (queued behind a failed commit): ``unavailable`` to its request (``conflict`` when it lost
        the race for question ``conflict``), a hello closed with 1013; its reply, a read's page, a hello's
        ``last_seq`` and replay, could show what was refused. An outcome of no request (an error reply, a
        close, live events) or a ``ping``'s is acted on as it is if it has no writes."""
        if outcome.request is None or (outcome.op == "ping" and not outcome.writes):  # ping: the time, no state
            if not outcome.writes:
                self._act(outcome, token, NO_SEQS_GIVEN)
            return  # with writes: an escalation batch or an alert, which the reload makes due again
        conn_id, request_id = outcome.request
        conn = self.conns.get(conn_id)
        if conn is None:
            return
        if outcome.op == "hello":
            conn.close(1013, "the server cannot store your session now; reconnect later")
            return
        what = _raced(outcome, conflict) if conflict is not None else None
        if what is not None:
            assert conflict is not None
            frame = reply_error(request_id, "conflict", _CONFLICT_MESSAGES[what], question_id=conflict)
            conn.send_nowait(self.encoder.binary(msgpack.packb(frame)))
            self.metrics.errors.labels("conflict").inc()
            return
        frame = reply_error(
            request_id,
            "unavailable",
            "the server could not store this; nothing was changed"
            if outcome.writes
            else "the server is reading its state again after a failed write; try again",
            retry_after_ms=UNAVAILABLE_RETRY_MS,
        )
        conn.send_nowait(self.encoder.binary(msgpack.packb(frame)))
        self.metrics.errors.labels("unavailable").inc()
        self.engine.not_applied(conn_id, outcome.op)

    async def wait_reloaded(self) -> None:
        """Return once memory has been rebuilt from the database after the latest failed commit."""
        await self._reloaded.wait()

    async def _storage_supervisor(self) -> None:
        """After a failed commit: rebuild memory from the database, then probe until writes work again.

        After a ``Conflict``: the heads of the users whose events were refused
        first (``SeqsMoved``, and what they miss replayed to their
        connections), then the rebuild (the refused outcomes changed more than
        seqs: questions, answers, escalation stages), then writes again, with
        no probe. After a
        ``LeaseLost`` or a takeover of the lease: what was queued first is
        committed, then the rebuild, then writes again, with no probe. A lease
        taken meanwhile is read after: the store is read again.
        """
        while True:
            await self._writes_failed.wait()
            self._writes_failed = trio.Event()
            quiet = self._quiet_reload
            if quiet:
                await self.pipeline.wait_idle()  # new writes are refused; those queued commit first
                self._quiet_reload = False  # a race they lost is noted (_write_failed): read below
            moved, self._seqs_moved = self._seqs_moved, None
            if moved is not None:
                try:
                    heads = await trio.to_thread.run_sync(self.store.read_heads, sorted(moved))
                except StoreError as exc:  # the database out of reach after all: the storage failure path
                    log.error("storage_failing", extra={"error": str(exc)})
                    self._perform(self._handle(WritesFailing(str(exc))))
                    moved = None
                else:
                    self.heads_moved(heads, exact=True)
            while True:
                hot_since = self.clock.now_ms() - self._hot_ms
                self._takeover_pending = False
                try:
                    alerts_since = self.clock.now_ms() - self.engine.where.ledger.window_ms
                    state = await trio.to_thread.run_sync(
                        functools.partial(self.store.load, hot_since=hot_since, alerts_since=alerts_since)
                    )
                except StoreError as exc:  # PostgreSQL out of reach: reads fail too, for now
                    log.warning("storage_reload_failed", extra={"error": str(exc)})
                    self._reload_settled.set()  # requests are refused until the rebuild: not held meanwhile
                    await trio.sleep(PROBE_INTERVAL_S)
                    continue
                if not self._takeover_pending:
                    break
                # The lease was taken while reading: the previous holder may have committed since.
            conflicted = self._conflicted
            won = await self._read_race_winner(conflicted) if conflicted is not None else None
            # From the rebuild to writes working again, nothing awaits: a request handled in
            # between would change memory and then be refused, with nothing rebuilt after it.
            self._perform(self._handle(Reloaded(state)))
            self._schedule_timer()  # the reload's deadlines (overdue alerts, expiries) are due now
            if conflicted is not None:
                self._settle_lost_race(conflicted, won)
                self._conflicted = None
            self._reloaded.set()
            self._reload_settled.set()
            if moved is not None or quiet:
                self.pipeline.writes_work()
                self._writes_ok.set()
                if moved is not None:
                    log.info("conflict_resolved", extra={"users": len(moved)})
                else:
                    log.info("state_reloaded_for_escalation", extra={"epoch": self._lease_epoch})
                if self._takeover_pending:
                    self._begin_takeover()
                if not self._storage_failing:
                    continue
                # Came while writes were on trial after an outage: that one is not over yet.
            probed = False
            while True:
                # Writes may be on here (after a race's rebuild, on trial): a commit failing meanwhile ends the
                # wait, and memory is read again first, rather than probed around while requests wait for it.
                with trio.move_on_after(self._probe_delay):
                    await self._writes_failed.wait()
                if self._writes_failed.is_set():
                    break
                self._probe_delay = min(2 * self._probe_delay, PROBE_MAX_INTERVAL_S)
                try:
                    await self.pipeline.run_between_commits(self.store.probe)
                except WriteFailed:
                    self.metrics.store_write_failures.inc()
                    continue
                probed = True
                break
            if not probed:
                continue
            # The probe's one row may fit where a real commit does not (on a full disk, into the room the
            # failed commit left): writes are taken on trial. The outage is over once a real commit went
            # through, or nothing failed for TRIAL_S (an idle server); a failure meanwhile is the same
            # outage (_write_failed): memory is read again and the probe tried later.
            self._trial = trio.Event()
            self.pipeline.writes_work()
            self._writes_ok.set()
            self._perform(self._handle(WritesWork(confirmed=False)))
            self._schedule_timer()
            if self._takeover_pending:  # the lease was taken after the reload above
                self._begin_takeover()
            with trio.move_on_after(TRIAL_S):
                await self._trial.wait()
            if not self._writes_ok.is_set():
                continue
            self._storage_failing = False
            self._probe_delay = PROBE_INTERVAL_S
            log.warning("storage_recovered")
            self._perform(self._handle(WritesWork()))

    async def _read_race_winner(self, conflicted: _Conflicted) -> QuestionChanged | None:
        """After a ``Conflict``: the question as the store holds it (the winner), or None if it cannot be read."""
        question_id = conflicted.question_id
        try:
            found = await trio.to_thread.run_sync(self.store.find_question, question_id)
        except StoreError as exc:  # memory is reloaded anyway; only a question outside the hot set stays stale
            log.warning("question_refresh_failed", extra={"question_id": question_id, "error": str(exc)})
            return None
        question, answers = found if found is not None else (None, [])
        return QuestionChanged(question_id, question, tuple(answers))

    def _settle_lost_race(self, conflicted: _Conflicted, won: QuestionChanged | None) -> None:
        """After the rebuild: the winner into memory, then what the losers' connections are owed, in order
        (``conflict`` to the requests that lost), so that a client reading the question next sees what won."""
        if won is not None:
            self._feed(won)
        owed = conflicted.owed
        self.pipeline.after_acting(lambda: self._refuse_all(owed, conflicted.question_id))

    # ---- other nodes' events (store/CLUSTER.md) -------------------------------------

    def heads_moved(self, heads: dict[str, int], *, exact: bool = False) -> None:
        """Users' inbox heads as the store holds them: the engine's seqs follow, connections get what they miss.

        ``exact``: read after a ``Conflict``, they replace what memory
        counted (up or down); otherwise (news, the catch-up) only a head above
        the engine's moves it.
        """
        users = self.engine.users
        moved = heads if exact else {u: h for u, h in heads.items() if u in users and h > users[u].last_seq}
        if moved:
            self._feed(SeqsMoved(moved))
        for user_id, head in heads.items():
            for conn_id in self.engine.user_conns.get(user_id, ()):
                conn = self.conns.get(conn_id)
                if conn is not None:
                    self.deliveries.want(conn, conn_id, user_id, head)

    def inbox_news(self, channel: str, payload: str) -> None:
        """A notification on ``dongne_events`` (``cluster.Listener``): another node's commit; our own are skipped."""
        try:
            origin, heads = read_inbox_news(payload)
        except ValueError:
            log.warning("inbox_news_unreadable", extra={"channel": channel, "payload": payload[:80]})
            return
        if origin != self.node_id:
            self.heads_moved(heads)

    def catch_up_soon(self) -> None:
        """Compare heads now (the Listener connected: notifications may have been missed meanwhile)."""
        self._catch_up_wakeup.set()

    async def catch_up(self) -> int:
        """Read the inbox heads of the users connected here and deliver what is missing; returns how many users."""
        users = sorted(self.engine.user_conns)
        if not users:
            return 0
        try:
            heads = await trio.to_thread.run_sync(self.store.read_heads, users)
        except StoreError as exc:
            log.warning("catch_up_failed", extra={"error": str(exc)})
            return 0
        self.heads_moved(heads)
        return len(heads)

    async def catch_up_periodically(self, interval_s: float) -> None:
        """:meth:`catch_up` every ``interval_s``, and at once when :meth:`catch_up_soon` asks."""
        while True:
            with trio.move_on_after(interval_s):
                await self._catch_up_wakeup.wait()
            self._catch_up_wakeup = trio.Event()
            await self.news.catch_up_changes()
            await self.catch_up()

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
            self.pipeline.submit(self._handle(Tick()))


#: Close codes of a hello the server refused for its own reasons, which do not count against the address's
#: failed handshakes (behind a carrier NAT, that would throttle everyone there): shutting down, storage
#: refusing (1013), the user's connection cap (4008 before a hello is accepted).
_NOT_THE_CLIENTS_FAULT = frozenset((1001, 1013, 4008))


@attrs.define
class _Conflicted:
    """A ``Conflict``: its question, the connections whose requests lost its race, and what those connections
    are owed (refused outcomes, in order) until the question is read again."""

    question_id: str
    conns: set[int]
    owed: list[tuple[Outcome, Any]] = attrs.Factory(list)


#: The message of a ``conflict`` reply, by the guarded write that lost its race (``Conflict.what``).
_CONFLICT_MESSAGES = {
    "answer": "the question was closed on another server first; the answer was not posted",
    "accept": "an answer was accepted, or the question closed, on another server first; nothing was changed",
    "close": "the question was resolved, closed or expired on another server first; nothing was changed",
}


def _raced(outcome: Outcome, question_id: str) -> str | None:
    """Which guarded write of ``outcome`` is on ``question_id`` (``Conflict.what``), if any."""
    for write in outcome.writes:
        if getattr(write, "question_id", None) != question_id:
            continue
        if isinstance(write, AcceptOnce):
            return "accept"
        if isinstance(write, CloseOnce):
            return "close"
        if isinstance(write, CountAnswer) and write.answered_at is not None:
            return "answer"
    return None


class TakingOver(WriteFailed):
    """Writes refused while this node reads the escalation state from the store, having taken the lease."""


#: How long after a failed commit the store is first probed; each probe (or trial) that fails in the same
#: outage doubles it, up to ``PROBE_MAX_INTERVAL_S``.
PROBE_INTERVAL_S = 1.0
PROBE_MAX_INTERVAL_S = 30.0
#: After the probe committed, how long writes are taken on trial with none committed (an idle server)
#: before the outage is declared over anyway.
TRIAL_S = 10.0
