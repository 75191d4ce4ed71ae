"""The node's place among nodes sharing one database: its identity, its peers, and LISTEN (the trio side).

Several nodes serve one PostgreSQL database (``dongne/store/CLUSTER.md``). A
PostgreSQL node registers in ``cluster_nodes`` and heartbeats
(:meth:`Membership.run`); a SQLite node is a cluster of itself, held in
memory. :class:`Listener` keeps a LISTEN connection open across drops; the
app runs one and hands other nodes' news to the client server
(``ClientServer.inbox_news``, ``news.NodeNews``, ``positions.PositionSync``).

The blocking SQL is ``store._cluster``'s, run on worker threads; this
module only waits, sleeps and retries.
"""

from __future__ import annotations

import logging
import math
import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:  # psycopg is optional (the postgres extra)
    from .store._cluster import ClusterLink, Lease, ListenConnection, NodeInfo

__all__ = ["Listener", "Membership", "backoff", "new_node_id"]

log = logging.getLogger("dongne.cluster")


def wall_ms() -> int:
    """The wall clock in ms: membership and leases compare times of different processes."""
    return int(time.time() * 1000)


def new_node_id(host: str | None = None, pid: int | None = None) -> str:
    """A node id for this run: ``host-pid-random`` (a restarted node is a new node)."""
    return f"{host or socket.gethostname()}-{os.getpid() if pid is None else pid}-{secrets.token_hex(3)}"


def backoff(attempt: int, rand: Callable[[], float] = random.random, *, base: float = 0.1, cap: float = 5.0) -> float:
    """Seconds before reconnect ``attempt`` (0, 1, ...): full jitter, the exponent capped."""
    return min(cap, base * 2.0 ** min(attempt, 16)) * rand()


class Membership:
    """This node and its peers, as shown on /admin and /metrics, and the campaign for the escalation lease.

    Each heartbeat also takes or renews the escalation lease (for
    ``lease_ttl_s``): the first node leads, and a peer takes over once the
    leader stopped renewing for that long. The holder runs the escalation
    stages (``ClientServer.lease_changed``, told through ``on_lease``).

    Args:
        link: the PostgreSQL database's cluster rows; None on SQLite (the node is alone, by construction).
        interval_s: how often to heartbeat (inf: register once, at start).
        ttl_s: a node silent this long is removed from ``cluster_nodes``.
        lease_ttl_s: how long a taken or renewed lease lasts (default: ``ttl_s``).
        now_ms: the wall clock (ms).
        on_lease: called on the event loop after a heartbeat that changed ``lease_epoch`` (taken, lost,
            or held at a new epoch), with the new value.
        on_registered: called on the event loop after a heartbeat that made the node's row: its first, or
            one after its peers expired it (and deleted its rows in ``positions`` and ``room_members``).
    """

    def __init__(
        self,
        link: ClusterLink | None,
        *,
        interval_s: float = 2.0,
        ttl_s: float = 10.0,
        lease_ttl_s: float | None = None,
        now_ms: Callable[[], int] = wall_ms,
        node_id: str | None = None,
        on_lease: Callable[[int | None], None] = lambda epoch: None,
        on_registered: Callable[[], None] = lambda: None,
    ) -> None:
        self.link = link
        self.node_id = node_id or new_node_id()
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started_at = now_ms()
        self._interval_s = interval_s
        self._ttl_ms = int(ttl_s * 1000)
        self._lease_ttl_ms = int((ttl_s if lease_ttl_s is None else lease_ttl_s) * 1000)
        self.on_lease = on_lease
        self.on_registered = on_registered
        self._registered = False  # a heartbeat made the node's row, and on_registered has not run since
        self._gone: set[str] = set()  # nodes expired whose rows are not dropped yet
        self._drop_owed = False  # a beat failed between expiring nodes and dropping their rows
        self._now_ms = now_ms
        self._nodes: list[dict[str, Any]] = [self._me(self.started_at)]
        self._lease: dict[str, Any] | None = None
        #: The escalation lease's epoch while this node holds it, else None (as of the last heartbeat).
        self.lease_epoch: int | None = None if link is not None else 0
        self._told: int | None = self.lease_epoch  # what on_lease was last told

    def _me(self, at: int) -> dict[str, Any]:
        return {"node_id": self.node_id, "host": self.host, "pid": self.pid, "started_at": self.started_at,
                "heartbeat_at": at}  # fmt: skip

    def _info(self) -> NodeInfo:
        from .store._cluster import NodeInfo

        return NodeInfo(self.node_id, self.host, self.pid, self.started_at, self._now_ms())

    def beat(self) -> None:
        """One heartbeat (blocking: on a worker thread): say we are alive, drop the silent, read the peers.

        Raises:
            StoreError: the database cannot be reached.
        """
        if self.link is None:
            self._nodes = [self._me(self._now_ms())]
            self.lease_epoch = 0  # alone: it leads, and no other node can commit
            return
        now = self._now_ms()
        # Each statement commits on its own: what one said holds even if a later one of the beat fails.
        if self.link.heartbeat(self._info(), now):
            self._registered = True  # until on_registered ran: a later failure of this beat must not lose it
        # An expiry is not seen twice (its rows are gone): the nodes it removed are dropped until a drop works,
        # and a beat that failed in between (its expiry may have committed unseen) owes the next one a drop,
        # which also removes the rows of every node no longer registered.
        owed, self._drop_owed = self._drop_owed, True
        gone = self.link.expire_nodes(now - self._ttl_ms)
        if gone:
            log.info("cluster_nodes_expired", extra={"nodes": gone})
            self._gone.update(gone)
        if self._gone or owed:
            self.link.drop_node_rows(sorted(self._gone))  # their users are online (and in rooms) there no more
            self._gone.clear()
        self._drop_owed = False
        self._nodes = [
            {"node_id": n.node_id, "host": n.host, "pid": n.pid, "started_at": n.started_at,
             "heartbeat_at": n.heartbeat_at}
            for n in self.link.nodes()
        ]  # fmt: skip
        # Campaign for the escalation lease: renewed while we heartbeat, taken over once its holder
        # stopped renewing for a lease ttl (CLUSTER.md, "Escalation leadership").
        lease: Lease = self.link.acquire_lease(self.node_id, now, self._lease_ttl_ms) or self.link.lease()
        leading = lease.held_by(self.node_id, now)
        if leading != (self.lease_epoch is not None):
            log.info("escalation_lease_taken" if leading else "escalation_lease_lost", extra={"epoch": lease.epoch})
        self.lease_epoch = lease.epoch if leading else None
        self._lease = {"holder": lease.holder, "epoch": lease.epoch, "expires_at": lease.expires_at}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Register, report started, heartbeat every interval; leave the table when cancelled.

        Error handling: a failed heartbeat is logged and tried again at the
        next interval (the node keeps serving; its peers may expire it
        meanwhile and it comes back with the next heartbeat that works).
        """
        try:
            await self._beat_logged()
            task_status.started()
            if math.isinf(self._interval_s):
                await trio.sleep_forever()
            while True:
                await trio.sleep(self._interval_s)
                await self._beat_logged()
        finally:
            if self.link is not None:
                from .store import StoreError

                with trio.move_on_after(2.0) as leaving:
                    leaving.shield = True
                    try:
                        await trio.to_thread.run_sync(self._leave, abandon_on_cancel=True)
                    except StoreError as exc:  # a stop with the database gone: the row expires instead
                        log.warning("cluster_leave_failed", extra={"error": str(exc)})

    def _leave(self) -> None:
        """Leave the table, give the lease up and delete this node's positions and room members: a peer need
        not wait for any of them to expire."""
        assert self.link is not None
        self.link.leave(self.node_id)
        if self.lease_epoch is not None:
            self.link.release_lease(self.node_id, self.lease_epoch)
            self.lease_epoch = None
        self.link.drop_node_rows([self.node_id])  # its users are online (and in rooms) here no more

    async def beat_async(self) -> None:
        """:meth:`beat` on a worker thread, then ``on_lease`` if the lease's epoch (or None) changed.

        Raises:
            StoreError: the database cannot be reached.
        """
        try:
            await trio.to_thread.run_sync(self.beat)
        finally:  # the row was made even if the rest of the beat failed: the peers deleted our rows
            if self._registered:
                self._registered = False
                self.on_registered()
        epoch = self.lease_epoch
        if epoch != self._told:
            self._told = epoch
            self.on_lease(epoch)

    def forget_lease(self) -> None:
        """A commit guarded by our epoch was refused (``LeaseLost``): we do not lead; the next heartbeat says
        whether we hold the lease again (at a new epoch), and ``on_lease`` tells."""
        if self.link is not None:
            self.lease_epoch = self._told = None

    async def _beat_logged(self) -> None:
        from .store import StoreError

        try:
            await self.beat_async()
        except StoreError as exc:
            log.warning("cluster_heartbeat_failed", extra={"error": str(exc)})

    def state(self) -> dict[str, Any]:
        """For /admin: this node, every node listed (``self`` marks this one), the escalation lease."""
        return {
            "node_id": self.node_id,
            "shared": self.link is not None,
            "nodes": [{**node, "self": node["node_id"] == self.node_id} for node in self._nodes],
            "lease": self._lease,
        }

    def gauges(self) -> dict[str, Any]:
        """For /metrics."""
        return {"cluster_nodes": len(self._nodes), "escalation_lease_held": int(self.lease_epoch is not None)}


class Listener:
    """A LISTEN connection kept open: notifications to ``on_notify``, each (re)connection to ``on_connected``.

    Args:
        connect: opens a listening connection (blocking: run on a worker thread); e.g.
            ``functools.partial(connect_listener, url, ("dongne_events",))``.
        on_notify: called with ``(channel, payload)`` for each notification, in order.
        on_connected: called after every connection, the first included: notifications sent
            while there was none are lost, so a consumer catches up from the store then.
        rand: the jitter's random source.

    Error handling: a connection that breaks, or cannot be made, is retried
    with :func:`backoff`; the attempt counter starts over once connected.
    """

    def __init__(
        self,
        connect: Callable[[], ListenConnection],
        on_notify: Callable[[str, str], None],
        on_connected: Callable[[], None] = lambda: None,
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._connect = connect
        self._on_notify = on_notify
        self._on_connected = on_connected
        self._rand = rand
        self.connections = 0  # made so far
        self.backend_pid: int | None = None  # the current connection's, for tests and logs

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; reports started once the first connection listens."""
        from .store import StoreError

        attempt = 0
        started = False
        while True:
            try:
                conn = await trio.to_thread.run_sync(self._connect)
            except StoreError as exc:
                log.warning("listen_connect_failed", extra={"error": str(exc), "attempt": attempt})
                await trio.sleep(backoff(attempt, self._rand))
                attempt += 1
                continue
            attempt = 0
            self.connections += 1
            self.backend_pid = conn.backend_pid
            try:
                self._on_connected()
                if not started:
                    started = True
                    task_status.started()
                await self._pump(conn)
            except StoreError as exc:  # ListenLost: the connection is closed already
                log.warning("listen_connection_lost", extra={"error": str(exc)})
            finally:
                conn.close()
            self.backend_pid = None
            await trio.sleep(backoff(attempt, self._rand))
            attempt += 1

    async def _pump(self, conn: ListenConnection) -> None:
        """Hand on notifications as their bytes arrive; returns never, raises ``ListenLost``."""
        while True:
            for channel, payload in conn.drain():
                self._on_notify(channel, payload)
            await trio.lowlevel.wait_readable(conn.fileno())
