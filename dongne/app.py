"""Putting it together: one trio process, one root nursery.

``run_server`` opens the store, loads the engine, starts the client server and
hypercorn on the ops port, and shuts everything down gracefully when asked
(SIGINT/SIGTERM, or ``stop()`` from a test).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import hypercorn.config
import hypercorn.trio
import trio

from .admin import AdminApp
from .auth import TokenVerifier, load_or_create_secret
from .clock import EngineClock
from .cluster import Listener, Membership
from .config import Settings
from .core import ConfigError, Engine, RegionSet, load_default_regions, load_hotspots
from .core.moderation import FOREVER
from .core.regions import RegionFileError
from .members import MemberSync
from .ops import OpsApp
from .pipeline import keep_wal_short
from .positions import PositionSync
from .push import MAX_QUEUED, PushDispatcher
from .runtime import collect_fully_every, watch_gc_pauses
from .server import ClientServer
from .snapshots import run_periodic_snapshots
from .store import Storage, Store, WriteFailed, hold_database_lock, is_postgres_url, store_for
from .web import WebApp

__all__ = ["Running", "run_server"]

log = logging.getLogger("dongne.app")


@attrs.define
class Running:
    """A started server, as reported by ``run_server``'s ``task_status``."""

    port: int
    ops_port: int
    clients: ClientServer
    pushes: PushDispatcher
    store: Storage
    engine: Engine
    membership: Membership
    _shutdown: trio.Event
    _stopped: trio.Event

    def stop(self) -> None:
        """Begin a graceful shutdown."""
        self._shutdown.set()

    async def wait_shutdown(self) -> None:
        """Return once a shutdown was asked for (``stop()``, SIGINT or SIGTERM)."""
        await self._shutdown.wait()

    async def aclose(self) -> None:
        """Shut down gracefully and wait until the database is closed."""
        self._shutdown.set()
        await self._stopped.wait()


def _ops_port(binds: list[str]) -> int:
    # hypercorn reports e.g. "http://127.0.0.1:41234".
    return int(binds[0].rsplit(":", 1)[1])


async def run_server(
    settings: Settings,
    *,
    regions: RegionSet | None = None,
    clock: EngineClock | None = None,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run dongne until shut down.

    Args:
        settings: validated settings.
        regions: the service area; the bundled Jeju regions when omitted.
        clock: the engine clock; a new one anchored on the wall clock when
            omitted (tests share one across restarts on a mock clock).
        handle_signals: shut down gracefully on SIGINT/SIGTERM (the CLI sets it).
    """
    target = settings.store.target
    # A SQLite file, or None: a PostgreSQL database (no file beside it for a lock, secret or snapshots).
    db_path = None if is_postgres_url(target) else Path(await trio.Path(target).resolve())
    secret = load_or_create_secret(settings.auth.jwt_secret, db_path)
    verifier = TokenVerifier(secret)
    if regions is not None:
        region_set = regions
    elif settings.location.regions_file:
        try:
            region_set = RegionSet.from_file(settings.location.regions_file)
        except RegionFileError as exc:
            raise ConfigError(f"[location] regions_file: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"[location] regions_file: cannot read {exc.filename}: {exc.strerror}") from None
    else:
        region_set = load_default_regions()
    store = store_for(
        db_path or target,
        synchronous=settings.store.synchronous,
        background_checkpoints=True,
        busy_timeout_s=settings.store.busy_timeout_s,
    )
    stopped = trio.Event()
    if db_path is not None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
    # One server per SQLite file, and no restore under a running server (on PostgreSQL
    # several nodes share a database: the store takes the node lock shared when it opens).
    lock = hold_database_lock(db_path) if db_path is not None else contextlib.nullcontext()
    try:
        # The signal handlers stay ours until the database is closed: a second
        # Ctrl+C during the graceful shutdown is queued and ignored, not a
        # KeyboardInterrupt raised into it.
        with lock, _signals(handle_signals) as signals:
            await _serve(settings, db_path, store, verifier, region_set, clock, signals, stopped, task_status)
    finally:
        stopped.set()  # after the lock is released: a restart may follow at once


def web_app(settings: Settings, regions: RegionSet) -> WebApp:
    """The web app on the client port, with what its page needs to know about this server."""
    radii = sorted({s.radius_m for s in settings.escalation.stages if s.radius_m is not None})
    config = {
        "protocol": 1,
        "ws_path": "/ws",
        "tile_url": settings.web.tile_url,
        "tile_attribution": settings.web.tile_attribution,
        "token_url": settings.web.token_url,
        "min_update_interval_s": settings.location.min_update_interval_s,
        "nearby_radii_m": radii[:2],
    }
    return WebApp(config, regions.to_geojson(), tile_url=settings.web.tile_url, token_url=settings.web.token_url)


async def _serve(
    settings: Settings,
    db_path: Path | None,
    store: Storage,
    verifier: TokenVerifier,
    region_set: RegionSet,
    clock: EngineClock | None,
    signals: AsyncIterator[int] | None,
    stopped: trio.Event,
    task_status: trio.TaskStatus[Running],
) -> None:
    await trio.to_thread.run_sync(store.open)
    link = None  # PostgreSQL: the cluster's rows (store/CLUSTER.md); SQLite: a cluster of one, in memory
    if not isinstance(store, Store):
        from .store._cluster import ClusterLink

        link = ClusterLink(settings.store.target)
    membership = Membership(
        link,
        interval_s=settings.cluster.heartbeat_interval_s,
        ttl_s=settings.cluster.node_ttl_s,
        lease_ttl_s=settings.cluster.lease_ttl_s,
    )
    if link is not None:
        # Every commit announces the inbox heads it moved; the Listener below reads other nodes' news
        # (store/CLUSTER.md).
        store.news_from = membership.node_id  # type: ignore[attr-defined]
    try:
        clock = clock if clock is not None else EngineClock()
        engine = Engine(
            settings.core(),
            lambda token, now_s: verifier.verify(token, now_s=now_s),
            region_of=region_set.region_of,
            hotspots=load_hotspots(),
            region_names=region_set.names,
            cursor_key=verifier.derive_key(b"dongne page cursors"),
        )
        engine.shared_store = link is not None  # a hello's user may have been made by another node
        if link is not None:
            # Campaign for the escalation lease before loading: a node that takes it reads the
            # escalations as the previous holder left them (it can commit no more: its epoch is old).
            from .store import StoreError

            try:
                await membership.beat_async()
            except StoreError as exc:  # Membership.run tries again; no escalation runs here meanwhile
                log.warning("cluster_heartbeat_failed", extra={"error": str(exc)})
        keep_days = max(settings.engine.hot_question_days, settings.alerts.slo_window_days)
        hot_since = clock.now_ms() - int(keep_days * 86400 * 1000)
        started = time.perf_counter()
        alerts_since = clock.now_ms() - engine.where.ledger.window_ms  # the caps count the last hour's
        loaded = await trio.to_thread.run_sync(
            functools.partial(
                store.load,
                hot_since=hot_since,
                alerts_since=alerts_since,
                # Older pending push jobs are expired; the dispatcher queues at most MAX_QUEUED, and reads
                # the rest of the outbox back once those are out.
                pushes_since=clock.now_ms() - int(settings.escalation.push_max_age_s * 1000),
                pushes=MAX_QUEUED,
            )
        )
        startup = engine.load(loaded, clock.now_ms())
        log.info(
            "loaded %d users, %d questions in %.0f ms from %s",
            len(engine.users),
            len(engine.questions),
            (time.perf_counter() - started) * 1000,
            store.location,
        )
        clients = ClientServer(
            settings.server,
            engine,
            store,
            clock,
            startup=startup,
            limits=settings.limits,
            escalation=settings.escalation,
            alert_url=settings.alerts.webhook_url,
            pending_pushes=loaded.pending_pushes,
            max_batch=settings.store.max_batch,
            hot_days=keep_days,
            inbox=settings.inbox,
            site=web_app(settings, region_set).answer if settings.web.enabled else None,
            lease_epoch=membership.lease_epoch,
            guard_lease=link is not None,
            adopt_interval_s=settings.cluster.heartbeat_interval_s,
        )
        # Only the lease's holder runs escalation stages (store/CLUSTER.md, "Escalation leadership").
        membership.on_lease = clients.lease_changed
        clients.on_lease_lost = membership.forget_lease
        shutdown = trio.Event()

        def status() -> dict[str, Any]:
            return {"connections": len(clients.conns), "users_online": len(engine.user_conns)}

        def overview() -> dict[str, Any]:
            """The admin dashboard's data: the engine's overview plus traffic counters."""
            stats = clients.statistics()
            return {
                **engine.overview(clock.now_ms()),
                "frames_in": stats.frames_in,
                "deliveries": stats.deliveries,
                "slow_consumers": stats.slow_consumers,
                "cluster": membership.state(),
            }

        client_port: list[int] = []  # known once the client server listens

        def active_bans() -> list[dict[str, Any]]:
            """The admin page's list of bans in force (no protocol operation lists them)."""
            now = clock.now_ms()
            return [
                {
                    "user_id": u.user_id,
                    "nick": u.nick,
                    "banned_until": None if u.banned_until == FOREVER else u.banned_until,
                    "reason": u.ban_reason,
                }
                for u in sorted(engine.users.values(), key=lambda u: u.user_id)
                if u.banned_at(now)
            ]

        async def claim_signin_code(nonce: str, expires_s: float) -> bool | None:
            """A sign-in code's use, in the database (once across restarts and nodes); None if it refuses writes."""
            claim = functools.partial(store.claim_signin_code, nonce, expires_s, time.time())
            try:
                first: bool = await clients.pipeline.run_between_commits(claim)
            except WriteFailed as exc:
                log.warning("signin_code_not_recorded", extra={"error": str(exc)})
                return None
            return first

        admin = AdminApp(
            overview,
            region_set.to_geojson(),
            verifier,
            closing=shutdown.wait,
            client_url=settings.server.public_url.rstrip("/")
            or (lambda: f"ws://{_url_host(settings.server.host)}:{client_port[0]}" if client_port else None),
            bans=active_bans,
            is_banned=lambda user_id: (
                (user := engine.users.get(user_id)) is not None and user.banned_at(clock.now_ms())
            ),
            claim_code=claim_signin_code,
        )  # mounted at /admin
        ops = OpsApp(lambda: clients.ready, status, clients.metrics.render, admin)
        hconfig = hypercorn.config.Config()
        hconfig.bind = [f"{settings.server.ops_host}:{settings.server.ops_port}"]
        hconfig.accesslog = None
        hconfig.errorlog = logging.getLogger("dongne.ops")
        hconfig.backlog = 1024
        hconfig.graceful_timeout = min(settings.server.shutdown_timeout_s, 2.0)
        pushes = clients.pushes
        clients.gauge_sources.append(membership.gauges)
        clients.node_id = membership.node_id
        if link is not None:
            clients.news.notify_outside = link.notify  # typing and presence to other nodes' rooms (CLUSTER.md)
        with watch_gc_pauses(clients.metrics.gc_pause):
            async with trio.open_nursery() as root:
                port = await root.start(clients.run)
                client_port.append(port)
                cluster_scope = trio.CancelScope()
                await root.start(_started_in_scope, cluster_scope, membership.run)
                news_scope = trio.CancelScope()
                if link is not None:
                    follow = functools.partial(_follow_news, settings, clients, membership)
                    await root.start(_started_in_scope, news_scope, follow)
                peers = [n["node_id"] for n in membership.state()["nodes"] if not n["self"]]
                log.info("node %s; peers: %s", membership.node_id, ", ".join(peers) or "none")
                snapshots = trio.CancelScope()
                checkpoints = trio.CancelScope()
                if db_path is not None and isinstance(store, Store):  # SQLite's own upkeep
                    root.start_soon(
                        _in_scope, snapshots, functools.partial(run_periodic_snapshots, db_path, settings.snapshots)
                    )
                    keep_short = functools.partial(
                        keep_wal_short,
                        store,
                        clients.pipeline,
                        on_failed=lambda _exc: clients.metrics.store_write_failures.inc(),  # the disk fills up
                    )
                    root.start_soon(_in_scope, checkpoints, keep_short)
                elif settings.snapshots.interval_s > 0:
                    log.info("no periodic snapshots of a PostgreSQL database: back it up with pg_dump")
                full_gc = trio.CancelScope()
                root.start_soon(
                    _in_scope, full_gc, functools.partial(collect_fully_every, settings.server.full_gc_interval_s)
                )
                binds = await root.start(
                    functools.partial(hypercorn.trio.serve, ops, hconfig, shutdown_trigger=shutdown.wait)
                )
                ops_port = _ops_port(binds)
                log.info(
                    "dongne listening: clients ws://%s:%d  ops http://%s:%d%s",
                    _url_host(settings.server.host),
                    port,
                    _url_host(settings.server.ops_host),
                    ops_port,
                    f"  app http://{_url_host(settings.server.host)}:{port}/" if settings.web.enabled else "",
                )
                watcher = trio.CancelScope()
                if signals is not None:
                    root.start_soon(_in_scope, watcher, functools.partial(_watch_signals, signals, shutdown))
                task_status.started(
                    Running(port, ops_port, clients, pushes, store, engine, membership, shutdown, stopped)
                )
                await shutdown.wait()
                log.info("shutting down")
                snapshots.cancel()
                checkpoints.cancel()
                full_gc.cancel()
                watcher.cancel()  # a stop() from code rather than a signal
                clients.stop_accepting()
                cluster_scope.cancel()  # leaves cluster_nodes
                news_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if link is not None:
                await trio.to_thread.run_sync(link.close)
            await trio.to_thread.run_sync(store.close)
        log.info("database closed")


#: How long start-up waits for the LISTEN connection before serving without it (the catch-up covers).
LISTEN_START_WAIT_S = 5.0


async def _follow_news(
    settings: Settings,
    clients: ClientServer,
    membership: Membership,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Other nodes' commits (PostgreSQL): LISTEN for their news (``dongne_events``: inbox heads;
    ``dongne_changes``: questions and users to read again; ``dongne_alerts``: who their stages alerted, for
    the hourly caps; ``dongne_rooms``: room events for this node's
    members, and this node's typing and presence out; ``dongne_positions`` and ``dongne_members``: other
    nodes' positions and room members, kept in the engine, rebuilt after each (re)connection), write this
    node's positions and room members every ``[cluster] positions_interval_s``, and catch up after each
    (re)connection and every ``[cluster] catch_up_interval_s`` (store/CLUSTER.md).

    Reports started once listening, or after ``LISTEN_START_WAIT_S`` without
    (logged): a node that cannot LISTEN still serves, its periodic catch-up
    delivering other nodes' events, and the Listener keeps trying.
    """
    from .store._cluster import MEMBERS_CHANNEL, POSITIONS_CHANNEL, ClusterLink, connect_listener
    from .store._writes import ALERTS_CHANNEL, CHANGES_CHANNEL, EVENTS_CHANNEL, ROOMS_CHANNEL

    listening = trio.Event()
    link = ClusterLink(settings.store.target)  # its own connection: a heartbeat never waits for a batch
    shape = (link, membership.node_id, clients.engine, clients.feed)
    positions = PositionSync(*shape, clock=clients.clock, interval_s=settings.cluster.positions_interval_s)
    members = MemberSync(*shape, interval_s=settings.cluster.positions_interval_s)
    clients.positions, clients.members = positions, members
    replicas = (positions, members)

    def registered() -> None:  # the node's peers expired it and deleted its rows: write them all again
        for replica in replicas:
            replica.write_all_again()

    membership.on_registered = registered

    def connected() -> None:
        listening.set()
        clients.catch_up_soon()  # news sent while there was no LISTEN connection is lost
        for replica in replicas:
            replica.rebuild_soon()

    def notified(channel: str, payload: str) -> None:
        if channel == CHANGES_CHANNEL:
            clients.news.changes_news(channel, payload)
        elif channel == ALERTS_CHANNEL:
            clients.news.alerts_news(channel, payload)
        elif channel == ROOMS_CHANNEL:
            clients.news.room_news(channel, payload)
        elif channel == POSITIONS_CHANNEL:
            positions.news(channel, payload)
        elif channel == MEMBERS_CHANNEL:
            members.news(channel, payload)
        else:
            clients.inbox_news(channel, payload)

    channels = (EVENTS_CHANNEL, CHANGES_CHANNEL, ALERTS_CHANNEL, ROOMS_CHANNEL, POSITIONS_CHANNEL, MEMBERS_CHANNEL)
    connect = functools.partial(connect_listener, settings.store.target, channels)
    listener = Listener(connect, notified, connected)
    clients.listener = listener
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_closing, link)
        for replica in replicas:
            nursery.start_soon(replica.apply_forever)
            nursery.start_soon(replica.publish_periodically)
        nursery.start_soon(listener.run)
        nursery.start_soon(clients.news.follow_changes)
        if clients.news.notify_outside is not None:
            nursery.start_soon(clients.news.relay_rooms)
        nursery.start_soon(clients.catch_up_periodically, settings.cluster.catch_up_interval_s)
        with trio.move_on_after(LISTEN_START_WAIT_S):
            await listening.wait()
        if not listening.is_set():
            log.warning("serving without a LISTEN connection yet; other nodes' events come by the catch-up")
        task_status.started()


async def _closing(link: Any) -> None:
    """Close ``link`` when cancelled."""
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(link.close)


async def _in_scope(scope: trio.CancelScope, fn: Any) -> None:
    with scope:
        await fn()


async def _started_in_scope(
    scope: trio.CancelScope, fn: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with scope:
        await fn(task_status=task_status)


def _signals(handle: bool) -> contextlib.AbstractContextManager[AsyncIterator[int] | None]:
    """SIGINT and SIGTERM as a stream while the block runs (``None`` when not handled)."""
    return trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) if handle else contextlib.nullcontext()


async def _watch_signals(signals: AsyncIterator[int], shutdown: trio.Event) -> None:
    async for signum in signals:
        log.info("received %s", signal.Signals(signum).name)
        shutdown.set()
        return


def _url_host(host: str) -> str:
    """A host as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
