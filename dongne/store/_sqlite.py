"""The SQLite store: blocking calls, meant to run in a worker thread.

Resource handling: one writer connection (only the committer uses it, one
call at a time) and one reader connection guarded by a lock. WAL mode lets
readers run while a commit is in progress. ``close`` checkpoints the WAL.
"""

from __future__ import annotations

import contextlib
import queue
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ._base import READ_INCARNATION, SqlStore
from ._interface import Conflict, StoreError, WriteFailed
from ._schema import MIGRATIONS
from ._writes import Guard, PreparedCommit, SeqsGiven

__all__ = ["PreparedCommit", "Store", "StoreError", "WriteFailed"]


#: Page caches (``PRAGMA cache_size``), KiB. The writer keeps SQLite's
#: default, 2,000 KiB: its cache is reused from commit to commit, and the
#: inbox index's pages are what a fan-out commit touches (a smaller one
#: made the escalation bench's replies several times slower). The reader's
#: cache is dropped whenever the writer has committed, i.e. all the time, and
#: the checkpointer reads each page once: 512 KiB is plenty, and the soak
#: bench saw their caches fill up over its first minutes and stay.
WRITER_CACHE_KIB = 2000
#: Reader connections: as many reads run at once (each on a worker thread).
READERS = 4
CACHE_KIB = 512


def _connect(
    path: Path, synchronous: str, cache_kib: int = CACHE_KIB, busy_timeout_s: float = 30.0
) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    conn.execute(f"PRAGMA cache_size=-{cache_kib}")
    return conn


class Store(SqlStore):
    """SQLite persistence for users, questions, answers and inboxes (the default backend).

    Args:
        path: the database file (created if missing).
        synchronous: ``FULL`` (default: a commit survives power loss),
            ``NORMAL`` or ``EXTRA``.
        background_checkpoints: the writer never checkpoints; ``checkpoint``
            does, on a connection of its own.
        busy_timeout_s: how long a write waits for a lock another program
            holds before it fails with ``WriteFailed``.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: str = "FULL",
        background_checkpoints: bool = False,
        busy_timeout_s: float = 30.0,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.synchronous = synchronous
        self.busy_timeout_s = busy_timeout_s
        self.background_checkpoints = background_checkpoints
        self._writer: sqlite3.Connection | None = None
        # Reads run on worker threads, each on a connection of its own from
        # this pool (SQLite releases the GIL while it reads, and WAL readers
        # do not block each other or the writer).
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._reader_count = 0
        self._checkpointer: sqlite3.Connection | None = None
        self.checkpoints = 0  # background checkpoints run

    @property
    def location(self) -> str:
        return str(self.path)

    # ---- lifecycle -------------------------------------------------------------

    def open(self) -> None:
        """Open (creating or migrating) the database.

        Raises:
            StoreError: it cannot be opened or migrated (a full disk, a newer
                schema, not a database); the message says which.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open()
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"cannot open the database {self.path}: {exc}") from None

    def _open(self) -> None:
        self._writer = _connect(self.path, self.synchronous, WRITER_CACHE_KIB, self.busy_timeout_s)
        self._max_variables = self._writer.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self._migrate(self._writer)
        self.incarnation = str(self._writer.execute(READ_INCARNATION).fetchone()[0])
        for _ in range(READERS):
            self._readers.put(_connect(self.path, self.synchronous))
        self._reader_count = READERS
        if self.background_checkpoints:
            # By default the commit that takes the WAL past 1000 pages copies
            # them into the database file (and syncs it) before it returns:
            # measured 0.1-2 s under load, with every reply queued behind it.
            # Here the committer only appends to the WAL; checkpoint() runs
            # beside it on its own connection.
            self._writer.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = _connect(self.path, self.synchronous)

    def checkpoint(self) -> tuple[int, int]:
        """Copy committed WAL pages into the database file without blocking the writer (blocking call).

        A PASSIVE checkpoint: it never waits for the writer or readers, so
        commits go on meanwhile; once it has caught up, the next commit starts
        the WAL file over from its beginning.

        Returns:
            ``(pages in the WAL, pages checkpointed)``.

        Raises:
            WriteFailed: SQLite could not write the database file (a checkpoint
                that must grow it on a full disk, an I/O error); the WAL keeps
                every page, so nothing is lost, and it can be tried again.
        """
        if self._checkpointer is None:
            raise StoreError("store is not open with background checkpoints")
        try:
            _busy, wal_pages, done = self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            raise WriteFailed(f"checkpoint failed: {exc}") from exc
        self.checkpoints += 1
        return int(wal_pages), int(done)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        while self._reader_count:
            self._readers.get().close()
            self._reader_count -= 1
        if self._writer is not None:
            try:
                # Without waiting: another program's read transaction (the sqlite3 shell, a backup) would hold
                # a TRUNCATE for the whole busy timeout, past the shutdown's bound. What it leaves in the WAL
                # is replayed at the next open.
                self._writer.execute("PRAGMA busy_timeout = 0")
                self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # a full disk: the WAL stays, and SQLite replays it at the next open
            finally:
                self._writer.close()
                self._writer = None

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this dongne ({len(MIGRATIONS)}); upgrade dongne"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={number}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @property
    def _w(self) -> sqlite3.Connection:
        if self._writer is None:
            raise StoreError("store is not open")
        return self._writer

    # ---- writes ------------------------------------------------------------------

    def commit(self, batch: PreparedCommit) -> SeqsGiven:
        """Run a prepared transaction (blocking: on a worker thread). The engine's seqs are the stored ones
        (one writer): nothing is renumbered.

        Raises:
            WriteFailed: SQLite could not write it (disk full, I/O error,
                locked); nothing of it was committed.
        """
        with self._transaction("commit") as conn:
            for sql, params, many in batch.statements:
                if isinstance(many, Guard):
                    if conn.execute(sql, params).rowcount == 0:  # raised in the transaction: rolled back
                        raise Conflict(f"commit refused: question {many.question_id} changed ({many.what})",
                                       many.question_id, many.what)  # fmt: skip
                elif many:
                    conn.executemany(sql, params)
                else:
                    conn.execute(sql, params)
        self.commits += 1
        self.rows_committed += batch.rows
        return {}

    def probe(self) -> None:
        """Commit a write that changes nothing but needs the disk, to learn whether writes work again.

        Raises:
            WriteFailed: they do not.
        """
        with self._transaction("probe") as conn:
            conn.execute("INSERT OR REPLACE INTO store_probe (id, at) VALUES (1, ?)", (time.time(),))

    def _write(self, what: str, statements: Sequence[tuple[str, tuple[Any, ...]]]) -> list[int]:
        with self._transaction(what) as conn:
            return [conn.execute(sql, params).rowcount for sql, params in statements]

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """A write transaction on the writer; any SQLite error becomes ``WriteFailed`` with nothing committed."""
        conn = self._w
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            finally:
                # A failed COMMIT may have rolled back already (SQLite does on
                # SQLITE_FULL and I/O errors): a second ROLLBACK would raise.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        except (sqlite3.OperationalError, sqlite3.DatabaseError) as exc:
            raise WriteFailed(f"{what} failed: {exc}") from exc

    # ---- reads -------------------------------------------------------------------

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        if not self._reader_count:
            raise StoreError("store is not open")
        reader = self._readers.get()
        try:
            return reader.execute(sql, tuple(params)).fetchall()
        finally:
            self._readers.put(reader)

    def _seq_ranges(self) -> list[tuple[str, int, int]]:
        # users.last_seq is only rewritten with the rest of the row; the inbox
        # holds the truth (AppendEvent does not touch the user's row).
        return [
            (user, int(low), int(high))
            for user, low, high in self._read("SELECT user_id, min(seq), max(seq) FROM events GROUP BY user_id")
        ]

    def prune_events(self, before_ms: int, limit: int) -> dict[str, int]:
        """Delete at most ``limit`` durable events older than ``before_ms`` (blocking: on a worker thread).

        Each user's newest event is kept whatever its age: it records the
        user's ``last_seq``, and seqs must never go back.

        Returns:
            The new oldest seq of each user who lost events.
        """
        with self._transaction("pruning") as conn:
            doomed = conn.execute(
                "SELECT id, user_id FROM events e WHERE created_at < ?"
                " AND seq < (SELECT max(seq) FROM events n WHERE n.user_id = e.user_id) ORDER BY id LIMIT ?",
                (before_ms, limit),
            ).fetchall()
            conn.executemany("DELETE FROM events WHERE id = ?", [(row[0],) for row in doomed])
            users = sorted({row[1] for row in doomed})
            oldest = {
                user: int(conn.execute("SELECT min(seq) FROM events WHERE user_id = ?", (user,)).fetchone()[0])
                for user in users
            }
        return oldest

    def integrity_check(self) -> str:
        return str(self._read("PRAGMA integrity_check")[0][0])
