"""The rows several nodes share on one PostgreSQL database: membership, the escalation lease, LISTEN.

Blocking calls, meant for a worker thread, like the store's. See
``CLUSTER.md`` for the design these serve: every node registers, heartbeats,
campaigns for the lease, writes its positions and room members, and listens.

Theory of operation: :class:`ClusterLink` has one connection of its own in
autocommit (not the store's writer, which is the committer's, one
transaction at a time), shared by the calls under a lock; every operation is
one statement, so each is atomic without a transaction. Times are
milliseconds given by the caller (the node's wall clock): the tests pin them,
and a lease's expiry is only ever compared with times of the same kind.

:class:`ListenConnection` is the other connection a node needs: it
``LISTEN``s, and is read without blocking (``drain``) whenever its socket is
readable (the trio side waits on ``fileno()``: ``dongne.cluster.Listener``).

Error handling: a broken connection is dropped and the next call connects
again (once, then ``StoreError``); a broken listen connection raises
``ListenLost`` from ``drain`` and is connected again by its owner.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import attrs
import psycopg
import psycopg.conninfo
import psycopg.pq
import psycopg.sql

from ..core.records import User
from ._interface import StoreError
from ._postgres import _one_line, redact
from ._rows import USER_COLS, user_from
from ._writes import NOTIFY_PAYLOAD_LIMIT

__all__ = [
    "MEMBERS_CHANNEL",
    "MEMBERS_KEY",
    "POSITIONS_CHANNEL",
    "POSITIONS_KEY",
    "ClusterLink",
    "Lease",
    "ListenConnection",
    "ListenLost",
    "NodeInfo",
    "connect_listener",
    "read_rows_news",
    "rows_news",
]

#: Where nodes announce the users whose rows in ``positions`` they changed (CLUSTER.md).
POSITIONS_CHANNEL = "dongne_positions"
#: The field of that news that names them.
POSITIONS_KEY = "users"
#: Where nodes announce the questions whose rows in ``room_members`` they changed (CLUSTER.md).
MEMBERS_CHANNEL = "dongne_members"
#: The field of that news that names them.
MEMBERS_KEY = "questions"
#: The tables of rows per node, each with the channel its changes are announced on: a node's rows go
#: when it leaves or is expired (``drop_node_rows``).
NODE_TABLES = (("positions", POSITIONS_CHANNEL), ("room_members", MEMBERS_CHANNEL))

#: The lease escalation leadership is (the only one so far).
ESCALATION_LEASE = "escalation"


@attrs.frozen
class NodeInfo:
    """One node's row in ``cluster_nodes``."""

    node_id: str
    host: str
    pid: int
    started_at: int  # ms
    heartbeat_at: int  # ms


@attrs.frozen
class Lease:
    """A lease row: who holds it, since which epoch, until when (ms)."""

    name: str
    holder: str | None
    epoch: int
    expires_at: int

    def held_by(self, node_id: str, now_ms: int) -> bool:
        """Whether ``node_id`` holds it at ``now_ms`` (not yet expired)."""
        return self.holder == node_id and now_ms < self.expires_at


class ListenLost(StoreError):
    """The LISTEN connection broke (PostgreSQL restarted, ``pg_terminate_backend``, the network)."""


def _conninfo(url: str, role: str, connect_timeout_s: float) -> str:
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise StoreError(f"{redact(url)} is not a PostgreSQL URL libpq accepts: {_one_line(exc)}") from None
    params.setdefault("connect_timeout", max(1, round(connect_timeout_s)))
    params["application_name"] = f"{params.get('application_name', 'dongne')} {role}"
    return psycopg.conninfo.make_conninfo("", **params)


_NODE_COLS = "node_id, host, pid, started_at, heartbeat_at"
_LEASE_COLS = "name, holder, epoch, expires_at"


class ClusterLink:
    """Membership and leases on a PostgreSQL database (blocking: call from a worker thread).

    Args:
        url: the database's libpq URL (the store's).
        connect_timeout_s: how long connecting may take, unless the URL says.

    Resource handling: ``close`` closes the connection; the link connects on first use.
    """

    def __init__(self, url: str, *, connect_timeout_s: float = 10.0) -> None:
        self.url = url
        self._conninfo = _conninfo(url, "cluster", connect_timeout_s)
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _run(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        """One statement in autocommit; its rows. A connection lost since its last use is replaced once.

        Raises:
            StoreError: the database cannot be reached, or refused the statement.
        """
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._conn is None or self._conn.closed:
                        self._conn = psycopg.connect(self._conninfo, autocommit=True)
                    cur = self._conn.execute(sql, params)
                    return cur.fetchall() if cur.description is not None else []
                except psycopg.Error as exc:
                    if self._conn is not None and self._conn.broken:
                        self._conn.close()
                        self._conn = None
                        if attempt == 1 and isinstance(exc, psycopg.OperationalError):
                            continue
                    raise StoreError(f"cluster: {_one_line(exc)}") from exc
            raise AssertionError("unreachable")

    # ---- membership ------------------------------------------------------------

    def heartbeat(self, node: NodeInfo, now_ms: int) -> bool:
        """Register ``node``, or say it is alive at ``now_ms`` (its row comes back if it was expired).

        Returns:
            True if the row was made: the node's first heartbeat, or one after its peers expired it
            (and deleted its positions: it writes them all again).
        """
        rows = self._run(
            f"INSERT INTO cluster_nodes ({_NODE_COLS}) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (node_id) DO UPDATE SET heartbeat_at = greatest(cluster_nodes.heartbeat_at, excluded.heartbeat_at)"
            " RETURNING xmax = 0",
            (node.node_id, node.host, node.pid, node.started_at, now_ms),
        )
        return bool(rows and rows[0][0])

    def expire_nodes(self, before_ms: int) -> list[str]:
        """Remove the nodes whose last heartbeat is older than ``before_ms``; their ids, sorted."""
        rows = self._run("DELETE FROM cluster_nodes WHERE heartbeat_at < %s RETURNING node_id", (before_ms,))
        return sorted(row[0] for row in rows)

    def leave(self, node_id: str) -> None:
        """Remove ``node_id`` (a graceful stop: its peers need not wait for it to expire)."""
        self._run("DELETE FROM cluster_nodes WHERE node_id = %s", (node_id,))

    def nodes(self) -> list[NodeInfo]:
        """Every registered node, by id."""
        return [NodeInfo(*row) for row in self._run(f"SELECT {_NODE_COLS} FROM cluster_nodes ORDER BY node_id")]

    # ---- positions (CLUSTER.md, "Nearest locals across nodes") --------------------

    def write_positions(
        self,
        node_id: str,
        moved: Sequence[tuple[str, float | None, float | None, int, str | None]],
        gone: Sequence[str],
    ) -> None:
        """One batch of this node's positions: ``moved`` ``(user, lat, lng, at, region)`` upserted, ``gone``
        users' rows deleted, and the users announced on :data:`POSITIONS_CHANNEL`, all in one statement (so one
        transaction: the news goes out only if the rows changed)."""
        users = sorted({m[0] for m in moved} | set(gone))
        self._run(
            "WITH moved AS (INSERT INTO positions (user_id, lat, lng, at, region, node_id)"
            " SELECT u, la, ln, a, r, %(node)s FROM unnest(%(users)s::text[], %(lats)s::float8[], %(lngs)s::float8[],"
            " %(ats)s::bigint[], %(regions)s::text[]) AS m(u, la, ln, a, r) ORDER BY u"
            " ON CONFLICT (user_id, node_id) DO UPDATE SET lat = excluded.lat, lng = excluded.lng, at = excluded.at,"
            " region = excluded.region"
            " RETURNING 1),"
            " gone AS (DELETE FROM positions WHERE node_id = %(node)s AND user_id = ANY(%(gone)s::text[]) RETURNING 1)"
            " SELECT pg_notify(%(channel)s, p) FROM unnest(%(news)s::text[]) AS p",
            {
                "node": node_id,
                "users": [m[0] for m in moved],
                "lats": [m[1] for m in moved],
                "lngs": [m[2] for m in moved],
                "ats": [m[3] for m in moved],
                "regions": [m[4] for m in moved],
                "gone": list(gone),
                "channel": POSITIONS_CHANNEL,
                "news": rows_news(node_id, POSITIONS_KEY, users),
            },
        )

    def drop_node_rows(self, node_ids: Sequence[str]) -> None:
        """Delete the rows (positions, room members) of nodes that left or were expired, and of any node no
        longer registered (a batch that outlived its node's leaving); every node rebuilds the replica of a
        table that lost rows."""
        ctes = ", ".join(
            f"d{i} AS (DELETE FROM {table} WHERE node_id = ANY(%(nodes)s::text[])"
            " OR node_id NOT IN (SELECT node_id FROM cluster_nodes) RETURNING 1)"
            for i, (table, _channel) in enumerate(NODE_TABLES)
        )
        notify = " UNION ALL ".join(
            f"SELECT pg_notify('{channel}', %(all)s) FROM (SELECT 1 FROM d{i} LIMIT 1) AS any{i}"
            for i, (_table, channel) in enumerate(NODE_TABLES)
        )
        self._run(f"WITH {ctes} {notify}", {"nodes": list(node_ids), "all": json.dumps({"node": "", "all": True})})

    def read_positions(
        self, not_node: str, users: Sequence[str] | None = None
    ) -> list[tuple[str, float | None, float | None, str | None]]:
        """``(user, lat, lng, region)`` of every user (of ``users``, if given) connected to a node other than
        ``not_node``; a user on several, by the newest position; None: connected, no position shared."""
        rows = self._other_nodes_rows(
            "SELECT DISTINCT ON (user_id) user_id, lat, lng, region FROM positions",
            not_node,
            "user_id",
            users,
            "ORDER BY user_id, lat IS NULL, at DESC",
        )
        return [
            (str(u), None if lat is None else float(lat), None if lng is None else float(lng), region)
            for u, lat, lng, region in rows
        ]

    # ---- room members (CLUSTER.md, "Room members across nodes") -------------------

    def write_members(self, node_id: str, joined: Sequence[tuple[str, str]], left: Sequence[tuple[str, str]]) -> None:
        """One batch of this node's room members, ``(question, user)``: ``joined`` inserted, ``left`` deleted,
        and the questions announced on :data:`MEMBERS_CHANNEL`, in one statement (one transaction)."""
        questions = sorted({q for q, _u in joined} | {q for q, _u in left})
        self._run(
            "WITH joined AS (INSERT INTO room_members (question_id, user_id, node_id)"
            " SELECT q, u, %(node)s FROM unnest(%(jq)s::text[], %(ju)s::text[]) AS j(q, u) ORDER BY q, u"
            " ON CONFLICT DO NOTHING RETURNING 1),"
            " gone AS (DELETE FROM room_members m USING unnest(%(lq)s::text[], %(lu)s::text[]) AS l(q, u)"
            " WHERE m.node_id = %(node)s AND m.question_id = l.q AND m.user_id = l.u RETURNING 1)"
            " SELECT pg_notify(%(channel)s, p) FROM unnest(%(news)s::text[]) AS p",
            {
                "node": node_id,
                "jq": [q for q, _u in joined],
                "ju": [u for _q, u in joined],
                "lq": [q for q, _u in left],
                "lu": [u for _q, u in left],
                "channel": MEMBERS_CHANNEL,
                "news": rows_news(node_id, MEMBERS_KEY, questions),
            },
        )

    def read_members(self, not_node: str, questions: Sequence[str] | None = None) -> list[tuple[str, str]]:
        """``(question, user)`` of every member (of ``questions``' rooms, if given) connected to a node other
        than ``not_node``, once each however many nodes they are in the room on; sorted."""
        rows = self._other_nodes_rows(
            "SELECT DISTINCT question_id, user_id FROM room_members",
            not_node,
            "question_id",
            questions,
            "ORDER BY question_id, user_id",
        )
        return [(str(q), str(u)) for q, u in rows]

    def _other_nodes_rows(
        self, select: str, not_node: str, key: str, keys: Sequence[str] | None, order: str
    ) -> list[tuple[Any, ...]]:
        """``select`` (``SELECT ... FROM`` a table of rows per node) of nodes other than ``not_node``, only
        the rows whose ``key`` column is in ``keys`` if given, then ``order``."""
        where = "" if keys is None else f" AND {key} = ANY(%s::text[])"
        params: tuple[Any, ...] = (not_node,) if keys is None else (not_node, list(keys))
        return self._run(f"{select} WHERE node_id <> %s{where} {order}", params)

    def read_users(self, user_ids: Sequence[str]) -> list[User]:
        """The rows of ``user_ids`` (those that exist), ``last_seq`` raised to their inbox heads."""
        users = [user_from(r) for r in self._run(f"SELECT {USER_COLS} FROM users WHERE user_id = ANY(%s::text[])",
                                                 (list(user_ids),))]  # fmt: skip
        heads = dict(self._run("SELECT user_id, last_seq FROM inbox_heads WHERE user_id = ANY(%s::text[])",
                               (list(user_ids),)))  # fmt: skip
        for user in users:
            user.last_seq = max(user.last_seq, int(heads.get(user.user_id, 0)))
        return users

    # ---- leases ----------------------------------------------------------------

    def acquire_lease(self, node_id: str, now_ms: int, ttl_ms: int, name: str = ESCALATION_LEASE) -> Lease | None:
        """Take lease ``name`` until ``now_ms + ttl_ms`` if it is free, expired, or already ``node_id``'s.

        A new holder bumps the epoch (so commits guarded by the old one are
        refused); a holder renewing its own lease keeps it, even after it
        expired, since nobody held it in between.

        Returns:
            The lease as now held, or None: another node holds it and it has not expired.
        """
        rows = self._run(
            "UPDATE escalation_lease SET epoch = CASE WHEN holder IS NOT DISTINCT FROM %(node)s"
            " THEN epoch ELSE epoch + 1 END, holder = %(node)s, expires_at = %(until)s"
            " WHERE name = %(name)s AND (holder IS NULL OR holder = %(node)s OR expires_at <= %(now)s)"
            f" RETURNING {_LEASE_COLS}",
            {"node": node_id, "until": now_ms + ttl_ms, "now": now_ms, "name": name},
        )
        return Lease(*rows[0]) if rows else None

    def release_lease(self, node_id: str, epoch: int, name: str = ESCALATION_LEASE) -> bool:
        """Give the lease up (a graceful stop: the next node takes it at once); False if it was not ours."""
        rows = self._run(
            "UPDATE escalation_lease SET holder = NULL, expires_at = 0"
            " WHERE name = %s AND holder = %s AND epoch = %s RETURNING name",
            (name, node_id, epoch),
        )
        return bool(rows)

    def lease(self, name: str = ESCALATION_LEASE) -> Lease:
        """The lease's row as it is now."""
        return Lease(*self._run(f"SELECT {_LEASE_COLS} FROM escalation_lease WHERE name = %s", (name,))[0])

    def notify(self, channel: str, payload: str) -> None:
        """Send a notification outside any commit (ephemeral news: typing, presence)."""
        self._run("SELECT pg_notify(%s, %s)", (channel, payload))


def rows_news(origin: str, field: str, keys: Sequence[str]) -> list[str]:
    """Payloads announcing that ``origin`` changed the rows of these keys in a table of rows per node
    (``positions``: users; ``room_members``: questions), each under the limit: ``{"node": origin, field: [...]}``."""
    payloads: list[str] = []
    part: list[str] = []
    used = len(json.dumps({"node": origin, field: []}).encode())
    budget = NOTIFY_PAYLOAD_LIMIT - 1
    size = used
    for key in keys:
        cost = len(json.dumps(key).encode()) + 1
        if part and size + cost > budget:
            payloads.append(json.dumps({"node": origin, field: part}))
            part, size = [], used
        part.append(key)
        size += cost
    if part:
        payloads.append(json.dumps({"node": origin, field: part}))
    return payloads


def read_rows_news(payload: str, field: str) -> tuple[str, list[str] | None]:
    """``(origin node, keys)`` of a payload :func:`rows_news` made (or ``drop_node_rows``'s, keys None:
    everything, a rebuild).

    Raises:
        ValueError: not such a payload.
    """
    try:
        news = json.loads(payload)
        origin = news["node"]
        keys = None if news.get("all") else news[field]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ValueError(f"not {field} news: {payload[:80]!r}") from None
    if not isinstance(origin, str) or not (keys is None or isinstance(keys, list)):
        raise ValueError(f"not {field} news: {payload[:80]!r}")
    return origin, None if keys is None else [str(k) for k in keys]


class ListenConnection:
    """A connection that ``LISTEN``s on some channels; made by :func:`connect_listener`.

    Resource handling: ``close`` it; after ``ListenLost`` it is closed already.
    """

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    @property
    def backend_pid(self) -> int:
        """The PostgreSQL process serving it (what ``pg_terminate_backend`` takes)."""
        return int(self._conn.info.backend_pid)

    def fileno(self) -> int:
        """The socket to wait on: readable when a notification (or the connection's end) arrives."""
        return self._conn.fileno()

    def drain(self) -> list[tuple[str, str]]:
        """Every notification received so far, as ``(channel, payload)``, oldest first; never blocks.

        Raises:
            ListenLost: the connection broke (it is closed).
        """
        pgconn = self._conn.pgconn
        try:
            pgconn.consume_input()
        except psycopg.Error as exc:
            self.close()
            raise ListenLost(f"listen connection lost: {_one_line(exc)}") from exc
        if pgconn.status != psycopg.pq.ConnStatus.OK:
            self.close()
            raise ListenLost("listen connection lost")
        received: list[tuple[str, str]] = []
        while (note := pgconn.notifies()) is not None:
            received.append((note.relname.decode(), note.extra.decode()))
        return received

    def close(self) -> None:
        self._conn.close()


def connect_listener(url: str, channels: tuple[str, ...], *, connect_timeout_s: float = 10.0) -> ListenConnection:
    """Connect and ``LISTEN`` on ``channels`` (blocking: from a worker thread).

    Raises:
        StoreError: the database cannot be reached.
    """
    try:
        conn = psycopg.connect(_conninfo(url, "listener", connect_timeout_s), autocommit=True)
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to listen: {_one_line(exc)}") from exc
    try:
        for channel in channels:
            conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
    except psycopg.Error as exc:
        conn.close()
        raise StoreError(f"cannot listen: {_one_line(exc)}") from exc
    return ListenConnection(conn)
