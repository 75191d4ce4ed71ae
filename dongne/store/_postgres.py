"""The PostgreSQL store: blocking calls on psycopg 3 connections, meant to run in a worker thread.

Theory of operation: as with SQLite, one writer connection (the committer's,
one transaction at a time) and a pool of reader connections, each read on a
connection of its own in autocommit (every statement sees what was committed
before it started). The statements are SQLite's, written with ``?`` and
turned into psycopg's ``%s`` here; the writes differ where the dialects do
(``_writes.py``).

Several nodes per database (issue 15, stage 2; ``CLUSTER.md``): each node's
writer holds the session advisory lock :data:`NODE_LOCK` *shared* for as long
as it is connected. Nodes share it; a dongne from before clusters took it
exclusively, so it cannot start beside cluster nodes, and a cluster node
cannot start beside it (it would neither guard its seqs nor announce its
commits): whichever came second is refused at start-up.

Error handling: a connection can break under a running server (PostgreSQL
restarted, ``pg_terminate_backend``, the network). A commit on a broken
writer fails with ``WriteFailed`` (nothing of it is committed: PostgreSQL
rolls back a transaction whose session ends before ``COMMIT``), the
connection is dropped, and the next commit or probe connects again (and
takes the shared lock again). A read on a broken connection is retried
once on a new one; a read that still fails raises ``StoreError``.

Resource handling: ``close`` closes every connection (which releases the lock).
"""

from __future__ import annotations

import contextlib
import queue
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from typing import Any

import psycopg
import psycopg.conninfo
import psycopg.errors

from ..core.records import LoadedState, PushJob
from ._backup import DatabaseInUseError
from ._base import READ_INCARNATION, SqlStore
from ._interface import Conflict, LeaseLost, QuestionEnded, SeqConflict, StoreError, WriteFailed
from ._pg_schema import PG_MIGRATIONS
from ._rows import PUSH_COLS, push_from
from ._writes import CHANGES_CHANNEL, Guard, PreparedCommit, SeqsGiven, changes_news

__all__ = ["LEASE_LOST_SQLSTATE", "NODE_LOCK", "PUSH_JOB_BLOCK", "PostgresStore", "redact"]

#: Reader connections: as many reads run at once (each on a worker thread).
READERS = 4
#: The session advisory lock every node's writer holds shared (a pre-cluster dongne took it exclusively).
NODE_LOCK = 0x646F6E676E65  # "dongne"
#: How long start-up waits for the node lock (a pre-cluster node killed a moment ago still holds it).
NODE_LOCK_WAIT_S = 5.0
#: The transaction advisory lock migrations run under.
MIGRATION_LOCK = NODE_LOCK + 1
#: What ``dongne_check_lease`` raises when a commit's lease epoch is no longer current (migration 2).
LEASE_LOST_SQLSTATE = "DL001"
#: Push job ids are taken from the sequence ``push_job_blocks`` in blocks of this many (see ``_last_push_job_id``).
PUSH_JOB_BLOCK = 1 << 32
#: PostgreSQL's limit on parameters in one statement (a 16-bit count).
MAX_PARAMETERS = 65535


def redact(url: str) -> str:
    """``url`` without its password (for logs and error messages)."""
    url = re.sub(r"^(postgres(?:ql)?://[^:/@?]*):[^@/?]*@", r"\1:***@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url)


def _one_line(exc: BaseException) -> str:
    """libpq's messages span lines (a hint on the second): one line for the log and the CLI."""
    return " ".join(str(exc).split()) or type(exc).__name__


@lru_cache(maxsize=512)
def _pg(sql: str) -> str:
    """A statement written with ``?`` parameters, for psycopg (``%s``; a literal ``%`` doubled).

    The shared statements never put a ``?`` inside a string literal.
    """
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresStore(SqlStore):
    """PostgreSQL persistence for users, questions, answers and inboxes.

    Args:
        url: a libpq connection URL, ``postgresql://[user[:password]@][host][:port]/dbname[?param=value&...]``
            (a unix socket: ``?host=/socket/dir``).
        lock_timeout_s: how long a commit waits for a row or table lock another program
            holds before it fails with ``WriteFailed`` (SQLite's busy timeout).
        connect_timeout_s: how long connecting may take, unless the URL says.

    Raises:
        StoreError: libpq cannot parse ``url``.
    """

    dialect = "postgres"

    def __init__(self, url: str, *, lock_timeout_s: float = 30.0, connect_timeout_s: float = 10.0) -> None:
        super().__init__()
        self.url = url
        self._max_variables = MAX_PARAMETERS
        self._lock_timeout_ms = max(1, int(lock_timeout_s * 1000))
        try:
            params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise StoreError(f"{redact(url)} is not a PostgreSQL URL libpq accepts: {_one_line(exc)}") from None
        params.setdefault("connect_timeout", max(1, round(connect_timeout_s)))
        params.setdefault("application_name", "dongne")
        self._params_name = str(params["application_name"])
        self._conninfo = psycopg.conninfo.make_conninfo("", **params)
        self._writer: psycopg.Connection[Any] | None = None
        # None: a reader to connect when it is next used.
        self._readers: queue.SimpleQueue[psycopg.Connection[Any] | None] = queue.SimpleQueue()
        self._reader_count = 0
        self._changes_from = "0"  # read_changes: the xid from which rows may be unseen

    @property
    def location(self) -> str:
        return redact(self.url)

    # ---- lifecycle -------------------------------------------------------------

    def open(self) -> None:
        """Connect, create or migrate the schema, and take the node lock (shared with the other nodes).

        Raises:
            StoreError: PostgreSQL cannot be reached, or refuses (a newer schema, no such database,
                authentication); the message is one line.
            DatabaseInUseError: a dongne from before clusters (one node per database) holds the database.
        """
        try:
            writer = self._connect()
            try:
                self._migrate(writer)
                row = writer.execute(READ_INCARNATION).fetchone()
                assert row is not None  # migration 12 wrote it
                self.incarnation = str(row[0])
                self._take_node_lock(writer)
            except BaseException:
                writer.close()
                raise
        except psycopg.Error as exc:
            raise StoreError(f"cannot open the database {self.location}: {_one_line(exc)}") from None
        self._writer = writer
        for _ in range(READERS):
            self._readers.put(None)
        self._reader_count = READERS

    def close(self) -> None:
        while self._reader_count:
            reader = self._readers.get()
            if reader is not None:
                reader.close()
            self._reader_count -= 1
        if self._writer is not None:
            # Release the node lock before closing: a closed session's backend ends (and frees its locks) a
            # moment later, and a node started right after this one closed must not find it still held.
            with contextlib.suppress(psycopg.Error):
                self._writer.execute("SELECT pg_advisory_unlock_all()")
            self._writer.close()
            self._writer = None

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self._conninfo, autocommit=True)

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS dongne_schema (version integer NOT NULL)")
            row = conn.execute("SELECT version FROM dongne_schema").fetchone()
            if row is None:
                conn.execute("INSERT INTO dongne_schema (version) VALUES (0)")
            version = 0 if row is None else int(row[0])
            if version > len(PG_MIGRATIONS):
                raise StoreError(
                    f"{self.location} has schema version {version}, newer than this dongne"
                    f" ({len(PG_MIGRATIONS)}); upgrade dongne"
                )
            for number, script in enumerate(PG_MIGRATIONS[version:], start=version + 1):
                with conn.transaction():  # a savepoint: each migration whole or not at all
                    conn.execute(script.encode())  # no parameters: several statements at once
                    conn.execute("UPDATE dongne_schema SET version = %s", (number,))

    def _take_node_lock(self, conn: psycopg.Connection[Any], wait_s: float | None = None) -> None:
        """Take the node lock, shared, on the writer's session, waiting ``wait_s`` for an exclusive holder
        that is going away.

        Every cluster node holds it shared; a dongne from before clusters
        takes it exclusively (``pg_try_advisory_lock``), so it is refused
        while any cluster node runs, and refuses them while it runs. A node
        killed a moment ago holds it until PostgreSQL notices its session is
        gone (at once for a local process; for a dead host, when TCP
        keepalives give up: the writer asks for them every 10 s).
        """
        for setting, value in (
            ("application_name", f"{self._params_name} writer"),  # which session is which, in pg_stat_activity
            ("lock_timeout", f"{self._lock_timeout_ms}ms"),
            ("tcp_keepalives_idle", "10"),
            ("tcp_keepalives_interval", "5"),
            ("tcp_keepalives_count", "3"),
        ):
            conn.execute("SELECT set_config(%s, %s, false)", (setting, value))
        deadline = time.monotonic() + (NODE_LOCK_WAIT_S if wait_s is None else wait_s)
        while True:
            row = conn.execute("SELECT pg_try_advisory_lock_shared(%s)", (NODE_LOCK,)).fetchone()
            if row and row[0]:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        holder = conn.execute(
            "SELECT a.pid, a.client_addr, a.backend_start FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.mode = 'ExclusiveLock'"
            " AND l.classid = %s AND l.objid = %s AND l.objsubid = 1",
            (NODE_LOCK >> 32, NODE_LOCK & 0xFFFFFFFF),
        ).fetchone()
        who = f" (its session: PostgreSQL pid {holder[0]}, from {holder[1] or 'a unix socket'})" if holder else ""
        raise DatabaseInUseError(
            f"{self.location} is used by a dongne that runs one node per database{who};"
            " stop it (or upgrade it) before starting cluster nodes"
        )

    def _writer_connection(self) -> psycopg.Connection[Any]:
        """The writer, connected again (with the shared node lock) if it was lost."""
        if self._reader_count == 0 and self._writer is None:
            raise StoreError("store is not open")
        if self._writer is not None and not self._writer.closed:
            return self._writer
        self._writer = None
        writer = self._connect()
        try:
            self._take_node_lock(writer, wait_s=0.0)
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        return writer

    # ---- writes ------------------------------------------------------------------

    def commit(self, batch: PreparedCommit) -> SeqsGiven:
        """Run a prepared transaction (blocking: on a worker thread), its statements pipelined.

        The inbox events go last, in one statement that numbers them from the
        inbox heads it moves on (``InboxAppends``): the heads' rows are locked
        only for the end of the transaction. Returns the seqs that differ from
        the engine's.

        Raises:
            WriteFailed: PostgreSQL refused it or the connection broke; nothing of it was committed.
        """
        appended: psycopg.Cursor[Any] | None = None
        with self._transaction("commit", pipeline=True) as conn:
            checks: list[tuple[psycopg.Cursor[Any], Guard]] = []
            self._run(conn, batch.statements, checks)
            if batch.appends is not None:
                appended = conn.execute(*batch.appends.statement)
            if checks:
                with conn.pipeline() as pipeline:
                    pipeline.sync()  # the guarded statements' row counts, before COMMIT
                ended: list[str] = []
                for cursor, guard in checks:
                    if cursor.rowcount == 0 and guard.what == "stage":
                        ended.append(guard.question_id)
                    elif cursor.rowcount == 0:  # raised in the transaction: rolled back
                        raise Conflict(f"commit refused: question {guard.question_id} changed ({guard.what})",
                                       guard.question_id, guard.what)  # fmt: skip
                if ended:  # rolled back as well: the pipeline commits the rest again, without those stages
                    raise QuestionEnded(f"commit refused: stages of ended questions {ended}", tuple(ended))
        given: SeqsGiven = {}
        if appended is not None and batch.appends is not None:
            given = batch.appends.given((str(row[0]), int(row[1])) for row in appended.fetchall())
        self.commits += 1
        self.rows_committed += batch.rows
        return given

    @staticmethod
    def _run(
        conn: psycopg.Connection[Any],
        statements: list[tuple[str, list[Any], bool | Guard]],
        checks: list[tuple[psycopg.Cursor[Any], Guard]],
    ) -> None:
        """Queue ``statements`` on the pipeline; a guarded one's cursor goes to ``checks``."""
        for sql, params, many in statements:
            if isinstance(many, Guard):
                checks.append((conn.execute(sql, params), many))
            elif many:
                conn.cursor().executemany(sql, params)
            else:
                conn.execute(sql, params)

    def probe(self) -> None:
        with self._transaction("probe") as conn:
            conn.execute(
                "INSERT INTO store_probe (id, at) VALUES (1, %s) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                (time.time(),),
            )

    def _write(self, what: str, statements: Sequence[tuple[str, tuple[Any, ...]]]) -> list[int]:
        with self._transaction(what) as conn:
            return [conn.execute(_pg(sql), params).rowcount for sql, params in statements]

    @contextlib.contextmanager
    def _transaction(self, what: str, *, pipeline: bool = False) -> Iterator[psycopg.Connection[Any]]:
        """A transaction on the writer; any database error becomes ``WriteFailed`` with nothing committed."""
        conn: psycopg.Connection[Any] | None = None
        try:
            conn = self._writer_connection()
            with conn.pipeline() if pipeline else contextlib.nullcontext(), conn.transaction():
                yield conn
        except (psycopg.Error, DatabaseInUseError) as exc:
            if conn is not None and conn.broken:
                conn.close()  # the next transaction connects again
            if isinstance(exc, psycopg.Error) and exc.sqlstate == LEASE_LOST_SQLSTATE:
                raise LeaseLost(f"{what} refused: {_one_line(exc)}") from exc
            if isinstance(exc, psycopg.errors.UniqueViolation) and exc.diag.constraint_name == "events_by_user":
                raise SeqConflict(f"{what} refused: {_one_line(exc)}") from exc
            raise WriteFailed(f"{what} failed: {_one_line(exc)}") from exc

    def prune_events(self, before_ms: int, limit: int) -> dict[str, int]:
        """Delete at most ``limit`` durable events older than ``before_ms`` (blocking: on a worker thread).

        Each user's newest event (``inbox_heads``) is kept whatever its age: seqs must never go back.
        Other nodes learn where these users' kept events start as from any change of theirs (their
        ``unread`` counts only those): the users' rows are marked changed (``read_changes``, the
        catch-up) and, with ``news_from``, announced on ``dongne_changes`` with the deletion.
        """
        with self._transaction("pruning") as conn:
            users = sorted(
                {
                    row[0]
                    for row in conn.execute(
                        "DELETE FROM events e USING (SELECT d.user_id, d.seq FROM events d"
                        " JOIN inbox_heads h ON h.user_id = d.user_id"
                        " WHERE d.created_at < %s AND d.seq < h.last_seq ORDER BY d.created_at LIMIT %s) doomed"
                        " WHERE e.user_id = doomed.user_id AND e.seq = doomed.seq RETURNING e.user_id",
                        (before_ms, limit),
                    ).fetchall()
                }
            )
            oldest: dict[str, int] = {}
            for user in users:
                row = conn.execute("SELECT min(seq) FROM events WHERE user_id = %s", (user,)).fetchone()
                assert row is not None
                oldest[user] = int(row[0])
            if users:  # in key order, as commits lock users' rows
                conn.execute(
                    "UPDATE users SET changed_xid = pg_current_xact_id() WHERE user_id IN"
                    " (SELECT user_id FROM users WHERE user_id = ANY(%s) ORDER BY user_id FOR UPDATE)",
                    (users,),
                )
            for payload in changes_news(self.news_from, [], users) if self.news_from is not None else ():
                conn.execute("SELECT pg_notify(%s, %s)", (CHANGES_CHANNEL, payload))
        return oldest

    def adopt_push_jobs(self, limit: int, since_ms: int) -> list[PushJob]:
        """Take over at most ``limit`` pending push jobs of nodes gone from ``cluster_nodes`` (stopped, or
        expired), oldest first: their ``node_id`` becomes ``'<this node> adopted'``, in one statement, so no
        other node takes them too, and this node's own read-back (``node_id`` its own) never meets them: their
        ids are another node's block, which must not move its cursor. Should this node go too, they are
        adopted again. A job the gone node had POSTed but not recorded is sent again (``Idempotency-Key``).
        Their jobs made before ``since_ms`` can no longer be sent: they are marked ``expired`` instead."""
        if self.news_from is None or limit <= 0:
            return []
        gone = "split_part(node_id, ' ', 1) NOT IN (SELECT node_id FROM cluster_nodes)"
        with self._transaction("adopting push jobs") as conn:
            conn.execute(
                "UPDATE push_outbox SET status = 'expired', last_error = 'too old to send', updated_at = %(since)s"
                f" WHERE status = 'pending' AND node_id <> %(me)s AND created_at < %(since)s AND {gone}",
                {"me": self.news_from, "since": since_ms},
            )
            rows = conn.execute(
                f"UPDATE push_outbox SET node_id = %(adopted)s WHERE job_id IN (SELECT job_id FROM push_outbox"
                " WHERE status = 'pending' AND node_id <> %(me)s AND node_id <> %(adopted)s"
                f" AND {gone} ORDER BY job_id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
                f" RETURNING {PUSH_COLS}",
                {"me": self.news_from, "adopted": f"{self.news_from} adopted", "limit": limit},
            ).fetchall()
        return sorted((push_from(r) for r in rows), key=lambda job: job.job_id)

    # ---- reads -------------------------------------------------------------------

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        if not self._reader_count:
            raise StoreError("store is not open")
        text, args = _pg(sql), tuple(params)
        reader = self._readers.get()
        try:
            for attempt in (1, 2):
                try:
                    if reader is None or reader.closed:
                        reader = None
                        reader = self._connect()
                    return reader.execute(text, args).fetchall()
                except psycopg.OperationalError as exc:
                    if reader is not None and reader.broken:
                        reader.close()
                        reader = None
                        if attempt == 1:
                            continue  # a connection lost since its last use: once more on a new one
                    raise StoreError(f"read failed: {_one_line(exc)}") from exc
            raise AssertionError("unreachable")
        finally:
            self._readers.put(reader)

    def _last_push_job_id(self) -> int:
        """A fresh block of push job ids, at every load: no other node, and no earlier load, has it.

        The engine numbers jobs from here on in memory (``job_id + 1``, ...);
        with blocks of 2^32 it never reaches the next block, and ids stay
        increasing (the dispatcher pages by them) and exact in JavaScript for
        two million loads. Were a node ever to run past its block, the push
        outbox's primary key refuses the commit and the reload that follows
        takes a new block.
        """
        return int(self._read("SELECT nextval('push_job_blocks')")[0][0]) * PUSH_JOB_BLOCK

    def load(
        self, *, hot_since: int, alerts_since: int | None = None, pushes_since: int | None = None, pushes: int = -1
    ) -> LoadedState:
        """As ``SqlStore.load``; changes from here on are what :meth:`read_changes` reads first."""
        self._changes_from = self._snapshot_xmin()
        return super().load(hot_since=hot_since, alerts_since=alerts_since, pushes_since=pushes_since, pushes=pushes)

    def _snapshot_xmin(self) -> str:
        """The oldest transaction still running (or the next one): every older one is committed or gone."""
        return str(self._read("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")[0][0])

    def read_changes(self) -> tuple[list[str], list[str]]:
        """The questions and users changed by transactions from the oldest one running at the last call on.

        Rows whose ``changed_xid`` (migration 4) is at or above that
        transaction: those it may not have seen committed. One statement,
        one snapshot: its own xmin is where the next call starts, so a
        transaction that commits late (its xid older than one seen) is read
        then. A row may be read twice; never missed.
        """
        since = self._changes_from
        rows = self._read(
            "SELECT 'q', question_id FROM questions WHERE changed_xid >= ?::xid8"
            " UNION SELECT 'q', question_id FROM answers WHERE changed_xid >= ?::xid8"
            " UNION SELECT 'u', user_id FROM users WHERE changed_xid >= ?::xid8"
            " UNION ALL SELECT 'x', pg_snapshot_xmin(pg_current_snapshot())::text",
            (since, since, since),
        )
        questions = sorted(ident for kind, ident in rows if kind == "q")
        users = sorted(ident for kind, ident in rows if kind == "u")
        self._changes_from = next(ident for kind, ident in rows if kind == "x")
        return questions, users

    def _event_rows(self, wanted: Sequence[tuple[str, int, int]]) -> dict[str, list[tuple[int, str, bytes]]]:
        """:meth:`SqlStore._event_rows` in one statement, whatever the number of users."""
        found: dict[str, list[tuple[int, str, bytes]]] = {user_id: [] for user_id, _after, _up_to in wanted}
        rows = self._read(
            "SELECT e.user_id, e.seq, e.type, e.data FROM unnest(?::text[], ?::bigint[], ?::bigint[]) AS w(u, a, b)"
            ' JOIN events e ON e.user_id = w.u COLLATE "C" AND e.seq > w.a AND e.seq <= w.b ORDER BY e.user_id, e.seq',
            ([w[0] for w in wanted], [w[1] for w in wanted], [w[2] for w in wanted]),
        )
        for user_id, seq, kind, data in rows:
            found[user_id].append((int(seq), kind, bytes(data)))
        return found

    def read_heads(self, user_ids: Iterable[str]) -> dict[str, int]:
        """Each user's newest durable seq (0: none), from ``inbox_heads`` (kept whatever was pruned)."""
        wanted = sorted(set(user_ids))
        heads = dict.fromkeys(wanted, 0)
        for user, seq in self._read("SELECT user_id, last_seq FROM inbox_heads WHERE user_id = ANY(?)", (wanted,)):
            heads[user] = int(seq)
        return heads

    def _seq_ranges(self) -> list[tuple[str, int, int]]:
        return [
            (user, int(low), int(high))
            for user, low, high in self._read(
                "SELECT h.user_id, coalesce((SELECT min(seq) FROM events e WHERE e.user_id = h.user_id), h.last_seq),"
                " h.last_seq FROM inbox_heads h"
            )
        ]
