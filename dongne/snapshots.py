"""Periodic snapshots of the database: a trio task for the root nursery.

The copying itself is blocking (``dongne.store.take_snapshot``) and runs in a
worker thread; the theory of operation in ``dongne/store/_backup.py`` says why
a snapshot is consistent while the server writes.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import attrs
import trio

from .config import SnapshotSettings
from .store import SnapshotError, prune_snapshots, take_snapshot

__all__ = ["SnapshotProgress", "SnapshotStatistics", "resolve_snapshot_dir", "run_periodic_snapshots"]

log = logging.getLogger("dongne.snapshots")


def resolve_snapshot_dir(db_path: Path, settings: SnapshotSettings) -> Path:
    """The snapshot folder: ``settings.dir``, relative to the database's folder."""
    directory = Path(settings.dir)
    return directory if directory.is_absolute() else Path(db_path).parent / directory


@attrs.frozen
class SnapshotStatistics:
    """What the periodic task has done so far.

    Attributes:
        written: snapshots taken (and pruned after).
        failed: attempts that failed and were logged.
    """

    written: int
    failed: int


class SnapshotProgress:
    """The periodic task's progress, reported by ``run_periodic_snapshots`` once started."""

    def __init__(self) -> None:
        self._written = 0
        self._failed = 0
        self._changed = trio.Event()

    def statistics(self) -> SnapshotStatistics:
        return SnapshotStatistics(written=self._written, failed=self._failed)

    async def wait_attempts(self, count: int) -> SnapshotStatistics:
        """Wait until ``count`` attempts (written or failed) have ended; return the statistics then."""
        while self._written + self._failed < count:
            await self._changed.wait()
        return self.statistics()

    def _ended(self, *, ok: bool) -> None:
        if ok:
            self._written += 1
        else:
            self._failed += 1
        self._changed.set()
        self._changed = trio.Event()


async def _snapshot_and_prune(db_path: Path, directory: Path, keep: int) -> tuple[Path, list[Path]]:
    stop = threading.Event()

    def work() -> tuple[Path, list[Path]]:
        path = take_snapshot(db_path, directory, should_stop=stop.is_set)
        return path, prune_snapshots(directory, db_path, keep, just_taken=path)

    try:
        # Abandoned on cancel, so shutdown need not wait for a big copy: the
        # thread sees ``stop`` after at most one backup step, gives up and
        # removes its temp file.
        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
    except trio.Cancelled:
        stop.set()
        raise


async def run_periodic_snapshots(
    db_path: Path,
    settings: SnapshotSettings,
    *,
    task_status: trio.TaskStatus[SnapshotProgress] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Every ``settings.interval_s`` seconds, snapshot the database and keep
    the newest ``settings.keep`` snapshots. Runs until cancelled.

    Args:
        db_path: the live database.
        settings: the ``[snapshots]`` settings; ``interval_s == 0`` returns at
            once (after reporting started).
        task_status: started with a :class:`SnapshotProgress` to watch the task by.

    Error handling: a snapshot that fails (disk full, folder not writable,
    SQLite error) is logged and tried again at the next interval; it never
    takes the server down.
    """
    progress = SnapshotProgress()
    task_status.started(progress)
    if settings.interval_s == 0:
        return
    directory = resolve_snapshot_dir(db_path, settings)
    log.info("snapshots every %g s to %s, keeping %d", settings.interval_s, directory, settings.keep)
    while True:
        await trio.sleep(settings.interval_s)
        started = time.perf_counter()
        try:
            path, pruned = await _snapshot_and_prune(db_path, directory, settings.keep)
        except (OSError, SnapshotError) as exc:
            log.error("snapshot failed, next try in %g s: %s", settings.interval_s, exc)
            progress._ended(ok=False)
            continue
        log.info(
            "snapshot %s written in %.0f ms; %d old snapshot(s) deleted",
            path,
            (time.perf_counter() - started) * 1000,
            len(pruned),
        )
        progress._ended(ok=True)
