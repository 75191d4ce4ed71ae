"""Group commit: outcomes are committed in batches, then acted on in order.

Theory of operation: every outcome the engine returns is submitted here. The
committer task takes everything queued, commits all its writes in one SQLite
transaction on a worker thread, and only then performs the actions of each
outcome in submission order. So a reply that acknowledges a write never leaves
before the write is durable, a read never shows a write that could still be
lost, and durable events reach each user in seq order. While one commit runs,
new outcomes queue up and share the next one: throughput does not collapse to
one fsync per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from .core.effects import Outcome, Write
from .store import Store

__all__ = ["CommitPipeline"]


class CommitPipeline:
    """Commits outcomes' writes in groups and hands each outcome to ``act`` afterwards.

    Args:
        store: the open store; ``apply`` runs on a worker thread.
        act: performs an outcome's actions (must not block).
        max_batch: the most outcomes in one transaction.
    """

    def __init__(
        self,
        store: Store,
        act: Callable[[Outcome], None],
        *,
        max_batch: int = 1000,
        on_commit: Callable[[float, int], None] | None = None,
    ) -> None:
        self._store = store
        self._on_commit = on_commit
        self._act = act
        self._max_batch = max_batch
        self._queue: list[Outcome] = []
        self._wakeup = trio.Event()
        self._committing = False
        self._idle = trio.Event()
        self._idle.set()
        self.commit_seconds: list[float] = []  # recent commit durations, for metrics
        self.batches = 0
        self.outcomes = 0

    def submit(self, outcome: Outcome) -> None:
        """Queue an outcome; one with no writes and nothing ahead of it is acted on at once."""
        if not outcome.writes and not outcome.actions:
            return
        if not outcome.writes and not self._queue and not self._committing:
            self._act(outcome)
            return
        self._queue.append(outcome)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wakeup.set()

    async def wait_idle(self) -> None:
        """Return once everything submitted so far is committed and acted on."""
        while self._queue or self._committing:
            await self._idle.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self._queue:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            writes: list[Write] = [w for outcome in batch for w in outcome.writes]
            self._committing = True
            try:
                if writes:
                    started = time.perf_counter()
                    # Not abandoned on cancel: a commit in flight always finishes.
                    await trio.to_thread.run_sync(self._store.apply, writes)
                    self._record(time.perf_counter() - started)
                    if self._on_commit is not None:
                        self._on_commit(time.perf_counter() - started, len(batch))
            finally:
                self._committing = False
            for outcome in batch:
                self._act(outcome)
            self.batches += 1
            self.outcomes += len(batch)
            if not self._queue:
                self._idle.set()

    def _record(self, seconds: float) -> None:
        self.commit_seconds.append(seconds)
        if len(self.commit_seconds) > 1024:
            del self.commit_seconds[:512]
