"""Snapshots of the live database, and putting one back.

Blocking calls, meant to run in a worker thread (``trio.to_thread.run_sync``)
or from the command line.

Theory of operation:

- **Taking a snapshot** uses SQLite's online backup API on its own connection,
  inside one read transaction that is held for the whole copy. In WAL mode a
  reader never blocks the writer, so the server keeps committing while the
  snapshot is taken, and the snapshot is exactly the database as of the moment
  the read transaction began. (Without that held transaction,
  ``sqlite3_backup_step`` restarts from page one whenever another connection
  commits, and under a steady write load it may never finish.) The copy goes
  ``pages_per_step`` pages at a time with a short pause between steps, so it
  does not monopolise the disk; while it runs the WAL cannot be checkpointed
  past its start and grows a little.
- A snapshot is written to a hidden temp name in the snapshot folder, switched
  to rollback-journal mode (one self-contained file), checked with ``PRAGMA
  integrity_check`` and ``PRAGMA user_version``, synced, then hard-linked to its
  final name ``<stem>-YYYYmmddTHHMMSSZ.sqlite3``, ``<stem>`` being the
  database's file name without its suffix (``dongne`` for ``dongne.sqlite3``),
  with ``-1``, ``-2``, ... added if that second is taken: the link fails rather
  than overwrite. A crash leaves at most a hidden ``.<stem>-*.tmp`` file,
  never a half-written snapshot under a snapshot name.
- **Several databases may share a folder** (``prod.sqlite3`` and
  ``staging.sqlite3``, with the default ``snapshots/`` beside them): the stem
  in the names keeps them apart, and listing and pruning see only the names
  of the database they are given.
- **Is a server using the database?** Every SQLite connection in WAL mode
  keeps a SHARED lock on the database file for as long as it is open, idle or
  not. ``check_not_in_use`` opens the database with ``PRAGMA
  locking_mode=EXCLUSIVE`` and runs ``BEGIN EXCLUSIVE``: that needs an
  EXCLUSIVE lock on the file, which it gets only if no other connection, in
  any process (this one included), has the database open. ``BEGIN EXCLUSIVE``
  alone is not enough: in WAL mode it excludes writers only, and an idle
  server is not writing. This is best effort: it cannot see a server that
  opens the database after the check (``hold_database_lock`` closes that gap
  once the server takes the same lock), nor one on a network file system
  whose locks do not work.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from ..core.errors import DongneError
from ._schema import SCHEMA_VERSION

__all__ = [
    "DatabaseInUseError",
    "InvalidSnapshotError",
    "SnapshotCancelled",
    "SnapshotError",
    "check_not_in_use",
    "hold_database_lock",
    "list_snapshots",
    "prune_snapshots",
    "restore_snapshot",
    "take_snapshot",
]

_STAMP = "%Y%m%dT%H%M%SZ"


def _snapshot_name(db_path: Path) -> re.Pattern[str]:
    """The names of ``db_path``'s snapshots: for ``dongne.sqlite3``, ``dongne-20250101T120000Z.sqlite3``, or
    ``dongne-20250101T120000Z-2.sqlite3`` for the third snapshot taken in that second."""
    return re.compile(rf"^{re.escape(db_path.stem)}-(\d{{8}}T\d{{6}}Z)(?:-(\d+))?\.sqlite3$")


class SnapshotError(DongneError):
    """A snapshot could not be taken or restored."""


class InvalidSnapshotError(SnapshotError, ValueError):
    """The file is not a usable snapshot: not SQLite, corrupt, not a dongne
    database, or a schema newer than this dongne."""


class DatabaseInUseError(SnapshotError):
    """Restore refused: a server (or another program) has the database open."""


class SnapshotCancelled(SnapshotError):
    """``should_stop`` asked ``take_snapshot`` to give up; nothing was written."""


def _stamp(now: datetime | None) -> str:
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    return now.astimezone(UTC).strftime(_STAMP)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # So a rename or link survives power loss. Not every platform can open a
    # directory; there is nothing more to do there.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse
        pass
    finally:
        os.close(fd)


def _link_unique(source: Path, directory: Path, stem: str, suffix: str, *, first: int = 0) -> Path:
    """Give ``source`` a new name ``<stem><suffix>`` (or ``<stem>-N<suffix>``,
    N >= ``first``) without ever replacing an existing file; returns the new name."""
    n = first
    while True:
        target = directory / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
        try:
            os.link(source, target)
        except FileExistsError:
            n += 1
            continue
        return target


def _sidecar(db_path: Path, suffix: str) -> Path:
    return db_path.with_name(db_path.name + suffix)


def take_snapshot(
    db_path: Path | str,
    snapshot_dir: Path | str,
    *,
    now: datetime | None = None,
    pages_per_step: int = 1024,
    step_pause_s: float = 0.005,
    should_stop: Callable[[], bool] | None = None,
) -> Path:
    """Copy the database, consistently, while a server may be writing to it.

    Args:
        db_path: the live database.
        snapshot_dir: where to put the snapshot (created if missing).
        now: an aware datetime naming the snapshot; the current time if omitted.
        pages_per_step: pages copied per backup step.
        step_pause_s: pause between steps, leaving the disk to the server.
        should_stop: called between steps; returning true abandons the
            snapshot (raises ``SnapshotCancelled``). Lets an async caller give
            up promptly when it is cancelled.

    Returns:
        The new snapshot, ``<snapshot_dir>/<stem>-YYYYmmddTHHMMSSZ[-N].sqlite3``
        (``<stem>``: ``db_path``'s name without its suffix).

    Raises:
        SnapshotError: no database at ``db_path``; SQLite failed; the copy did
            not pass its checks.
        SnapshotCancelled: ``should_stop`` returned true.
        OSError: the folder cannot be created or written.

    Resource handling: the temp file is removed on every failure.
    """
    db_path = Path(db_path)
    snapshot_dir = Path(snapshot_dir)
    if not db_path.is_file():
        raise SnapshotError(f"no database at {db_path}")
    stamp = _stamp(now)
    snapshot_dir.mkdir(parents=True, exist_ok=True)
    tmp = snapshot_dir / f".{db_path.stem}-{stamp}-{os.getpid()}-{threading.get_ident()}.tmp"

    def between_steps(status: int, remaining: int, total: int) -> None:
        if should_stop is not None and should_stop():
            raise SnapshotCancelled(f"snapshot of {db_path} cancelled")
        if remaining and step_pause_s > 0:
            time.sleep(step_pause_s)

    try:
        try:
            # mode=rw: never create an empty database by mistake.
            src = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=rw", uri=True, isolation_level=None, timeout=30.0)
            try:
                # Hold one read transaction across every step (see module docstring).
                src.execute("BEGIN")
                src.execute("SELECT count(*) FROM sqlite_master").fetchone()
                version = int(src.execute("PRAGMA user_version").fetchone()[0])
                dst = sqlite3.connect(tmp, isolation_level=None)
                try:
                    src.backup(dst, pages=pages_per_step, progress=between_steps)
                    src.execute("COMMIT")
                    # The copy carries the source's WAL flag; make it one self-contained file.
                    dst.execute("PRAGMA journal_mode=DELETE")
                    _check(dst, tmp)
                    copied = int(dst.execute("PRAGMA user_version").fetchone()[0])
                finally:
                    dst.close()
            finally:
                src.close()
        except sqlite3.Error as exc:
            raise SnapshotError(f"snapshot of {db_path} failed: {exc}") from exc
        if copied != version:
            raise SnapshotError(f"snapshot of {db_path} has schema version {copied}, expected {version}")
        _fsync_file(tmp)
        # After the newest of this second, never in a gap left by pruning:
        # names must sort in the order the snapshots were taken.
        name = _snapshot_name(db_path)
        taken = [name.match(p.name) for p in list_snapshots(snapshot_dir, db_path)]
        same_second = [int(m.group(2) or 0) for m in taken if m is not None and m.group(1) == stamp]
        final = _link_unique(
            tmp, snapshot_dir, f"{db_path.stem}-{stamp}", ".sqlite3", first=max(same_second) + 1 if same_second else 0
        )
        _fsync_dir(snapshot_dir)
        return final
    finally:
        for leftover in (tmp, _sidecar(tmp, "-journal"), _sidecar(tmp, "-wal"), _sidecar(tmp, "-shm")):
            leftover.unlink(missing_ok=True)


def _check(conn: sqlite3.Connection, path: Path) -> None:
    rows = conn.execute("PRAGMA integrity_check").fetchall()
    if [r[0] for r in rows] != ["ok"]:
        problems = "; ".join(str(r[0]) for r in rows[:3])
        raise InvalidSnapshotError(f"{path} fails the integrity check: {problems}")


def list_snapshots(snapshot_dir: Path | str, db_path: Path | str) -> list[Path]:
    """The snapshots of ``db_path`` in ``snapshot_dir``, oldest first, by the time in their names.

    Only files named like ``<stem>-YYYYmmddTHHMMSSZ[-N].sqlite3`` count,
    ``<stem>`` being ``db_path``'s name without its suffix: another
    database's snapshots in the same folder do not. A missing folder has none.
    """
    directory = Path(snapshot_dir)
    name = _snapshot_name(Path(db_path))
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    found: list[tuple[str, int, Path]] = []
    for entry in entries:
        match = name.match(entry.name)
        if match and entry.is_file():
            found.append((match.group(1), int(match.group(2) or 0), entry))
    found.sort(key=lambda item: item[:2])
    return [path for _, _, path in found]


def prune_snapshots(
    snapshot_dir: Path | str, db_path: Path | str, keep: int, *, just_taken: Path | None = None
) -> list[Path]:
    """Delete all but the newest ``keep`` snapshots of ``db_path``; returns what was deleted.

    Other files in the folder (another database's snapshots among them) are
    never touched.

    Args:
        snapshot_dir: the folder.
        db_path: the database.
        keep: how many to keep.
        just_taken: the snapshot the caller has just taken: the newest,
            whatever its name says. Names sort by the wall clock, and after
            the clock was ahead (wrong at boot, a VM resumed from an old
            image) older snapshots carry later times.

    Raises:
        ValueError: ``keep`` is less than 1.
        OSError: a snapshot could not be deleted.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    found = list_snapshots(snapshot_dir, db_path)
    if just_taken in found:
        found.remove(just_taken)
        found.append(just_taken)
    doomed = found[:-keep]
    for path in doomed:
        path.unlink(missing_ok=True)  # another pruner may have been first
    return doomed


@contextlib.contextmanager
def hold_database_lock(db_path: Path | str) -> Iterator[Path]:
    """Hold the advisory lock ``<db>.lock`` (``flock``), or refuse at once.

    Restore holds it while it swaps files. A server that holds it for its
    whole life can neither start on a database being restored nor be
    restored under. The lock file itself is left in place: deleting it would
    let two holders lock two different files.

    Raises:
        DatabaseInUseError: someone else holds it.
    """
    lock_path = _sidecar(Path(db_path), ".lock")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: rely on check_not_in_use
        yield lock_path
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatabaseInUseError(f"{db_path} is locked by a running server ({lock_path})") from None
        yield lock_path
    finally:
        os.close(fd)  # releases the lock


def check_not_in_use(db_path: Path | str, *, timeout_s: float = 0.5) -> None:
    """Refuse if any connection, in any process, has ``db_path`` open.

    Best effort; see "Is a server using the database?" in the module
    docstring. As a side effect, an unused database's WAL (left by a crash)
    is checkpointed into the file and removed.

    Raises:
        DatabaseInUseError: the database is open elsewhere.
    """
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=timeout_s)
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            raise DatabaseInUseError(f"{db_path} is in use (is the server still running? stop it first)") from None
        # Anything else (a damaged file, say): nobody can be using it successfully.
    except sqlite3.DatabaseError:
        pass  # not a database at all: the same
    finally:
        conn.close()


def _verify_snapshot(path: Path) -> int:
    """Integrity and schema checks; returns the schema version."""
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            _check(conn, path)
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise InvalidSnapshotError(f"{path} is not a usable SQLite database: {exc}") from None
    if version == 0:
        raise InvalidSnapshotError(f"{path} is not a dongne database (schema version 0)")
    if version > SCHEMA_VERSION:
        raise InvalidSnapshotError(
            f"{path} has schema version {version}, newer than this dongne ({SCHEMA_VERSION}); upgrade dongne first"
        )
    return version


def _new_incarnation(path: Path) -> None:
    """Give the database at ``path`` a new incarnation (migration 12; an older snapshot gets one when it is
    migrated). Push job ids continue from the highest in the snapshot: ids that jobs made after it had, and
    that the gateway received. The new incarnation in their Idempotency-Key keeps it from dropping them."""
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            if conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'store_incarnation'"
            ).fetchone():
                conn.execute("UPDATE store_incarnation SET incarnation = ?", (secrets.token_hex(16),))
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise SnapshotError(f"cannot give {path} a new incarnation: {exc}") from exc


def restore_snapshot(snapshot_path: Path | str, db_path: Path | str, *, now: datetime | None = None) -> Path | None:
    """Put a snapshot in place of the database. The server must be stopped.

    The snapshot is copied beside the database and the copy is verified
    (integrity check; a dongne schema no newer than this one) before anything
    else is touched, and given a new incarnation (push job ids start again
    from the snapshot's; see ``_new_incarnation``). Then the current database keeps its content under
    ``<db>.before-restore-YYYYmmddTHHMMSSZ`` (with its ``-wal``, if any), stale
    ``-wal``/``-shm`` files are removed so SQLite cannot replay them onto the
    restored file, and the copy is renamed over the database (atomic: the
    path always holds a whole database).

    Args:
        snapshot_path: a snapshot file (a single SQLite file, no ``-wal``).
        db_path: the database to replace; need not exist.
        now: an aware datetime naming the kept copy; the current time if omitted.

    Returns:
        Where the previous database was kept, or ``None`` if there was none.

    Raises:
        FileNotFoundError: no file at ``snapshot_path``.
        InvalidSnapshotError: the snapshot is corrupt, not dongne's, or newer.
        DatabaseInUseError: the database is open (``check_not_in_use``) or
            locked (``hold_database_lock``).
        OSError: files could not be copied or renamed.
    """
    snapshot_path = Path(snapshot_path)
    db_path = Path(db_path)
    if not snapshot_path.is_file():
        raise FileNotFoundError(f"no snapshot at {snapshot_path}")
    stamp = _stamp(now)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.with_name(f".{db_path.name}.restore-{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        shutil.copyfile(snapshot_path, tmp)
        _verify_snapshot(tmp)  # the copy, not the original: what is checked is what goes in
        _new_incarnation(tmp)
        _fsync_file(tmp)
        with hold_database_lock(db_path):
            kept: Path | None = None
            if db_path.exists():
                check_not_in_use(db_path)
                kept = _link_unique(db_path, db_path.parent, f"{db_path.name}.before-restore-{stamp}", "")
                wal = _sidecar(db_path, "-wal")
                if wal.exists():  # normally checkpointed away by check_not_in_use
                    os.replace(wal, _sidecar(kept, "-wal"))
            for stale in ("-wal", "-shm", "-journal"):
                _sidecar(db_path, stale).unlink(missing_ok=True)
            os.replace(tmp, db_path)
            _fsync_dir(db_path.parent)
            return kept
    finally:
        for leftover in (tmp, _sidecar(tmp, "-journal"), _sidecar(tmp, "-wal"), _sidecar(tmp, "-shm")):
            leftover.unlink(missing_ok=True)
