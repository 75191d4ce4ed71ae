"""Group commit: outcomes are committed in batches, then acted on in order.

Theory of operation: every outcome the engine returns is submitted here. The
committer task takes everything queued, commits all its writes in one
transaction (SQLite or PostgreSQL) on a worker thread, and only then are the actions of each
outcome performed, in submission order, by the actor task. The two overlap:
while one batch is acted on (sending frames, on the event loop), the next
one commits (the database, on the worker thread); a third waits for both. So a
reply that acknowledges a write never leaves before the write is durable, a
read never shows a write that could still be lost, and durable events reach
each user in seq order. While one commit runs,
new outcomes queue up and share the next one: throughput does not collapse to
one fsync per request.

Priority: an escalation stage can alert hundreds of locals at once. Such bulk
outcomes go through :meth:`CommitPipeline.submit_bulk`, which computes them
only while the next commit holds fewer than ``bulk_budget`` rows of bulk
writes and they took less than ``bulk_time_budget`` to compute. A
request's outcome never waits for that, so a reply waits for at most one
commit's share of fan-out, however many stages fall due together: under
overload the wider stages run late (and say so in their ``late_ms``), the
replies and the IMMEDIATE alerts they carry do not.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import trio
import trio.lowlevel

from .core.effects import IfOpen, Outcome, Write, rows_of
from .store import LeaseLost, QuestionEnded, SeqsGiven, Storage, Store, WriteFailed

__all__ = ["CommitPipeline", "keep_wal_short"]

log = logging.getLogger("dongne.pipeline")

#: Longest stretch of acting on committed outcomes without letting other tasks run.
ACT_SLICE_S = 0.002

#: What ``act`` is given for outcomes whose seqs are all the engine's (no commit, or nothing renumbered).
NO_SEQS_GIVEN: Mapping[str, Mapping[int, int]] = {}


class CommitPipeline:
    """Commits outcomes' writes in groups and hands each outcome to ``act`` afterwards.

    Each outcome may carry a token (the driver passes when its request was
    read), handed back to ``act`` with it, and with the seqs its commit gave
    where they differ from the engine's (``Storage.commit``; PostgreSQL when
    another node appended to a user's inbox first): frames of durable
    events go out with the stored seq.

    The queue is bounded by ``max_queued`` outcomes, by backpressure: past
    it, ``submit`` still queues (what is decided is never dropped), but
    ``full`` turns true and ``wait_room`` blocks until the queue is back
    under the bound; the driver stops reading the sockets of connections
    whose requests would add to it, so TCP pushes back on their clients.

    Args:
        store: the open store; ``commit`` runs on a worker thread.
        act: performs an outcome's actions (must not block), given its token.
        max_batch: the most outcomes in one transaction.
        max_queued: the queue length past which ``full`` is true.
        on_write_failed: called when a commit fails (``WriteFailed``; any other exception out of
            ``prepare`` or ``commit`` is logged with its traceback and becomes one), with the error and every
            outcome that will not be committed: the failed batch and all
            queued behind it (their writes were decided on top of it). The
            pipeline is then ``failing``: it refuses outcomes with writes
            the same way, at once, until ``writes_work()`` is called.
        bulk_budget: the most rows of bulk outcomes queued for one commit.
            Every request committed beside them waits for them to commit
            and to be acted on, so this bounds what bulk work adds to a
            reply's latency (README's benchmark section has the figures).
        bulk_time_budget: the most event-loop seconds spent computing them.
        on_stage_refused: called with the escalation stages a commit took out, unacted, because their
            questions had ended in the store (``QuestionEnded``; the rest of the batch is committed).
    """

    def __init__(
        self,
        store: Storage,
        act: Callable[[Outcome, Any, Mapping[str, Mapping[int, int]]], None],
        *,
        max_batch: int = 1000,
        max_queued: int = 10_000,
        bulk_budget: int = 200,
        bulk_time_budget: float = 0.010,
        on_commit: Callable[[float, int, SeqsGiven], None] | None = None,
        on_write_failed: Callable[[WriteFailed, list[tuple[Outcome, Any]]], None] | None = None,
        on_stage_refused: Callable[[list[Outcome]], None] | None = None,
    ) -> None:
        self._on_write_failed = on_write_failed
        self._on_stage_refused = on_stage_refused
        self.failing = False  # a commit failed and writes_work() was not called since
        self._failure: WriteFailed | None = None
        self._store = store
        self._on_commit = on_commit
        self._act = act
        self._max_batch = max_batch
        self._queue: list[tuple[Outcome, Any]] = []
        self._max_queued = max_queued
        self._room = trio.Event()
        self._room.set()
        self._wakeup = trio.Event()
        self._in_flight = 0  # batches taken from the queue and not yet acted on
        # Committed, for the actor, with the seqs the commit gave.
        self._committed_batches: deque[tuple[list[tuple[Outcome, Any]], SeqsGiven]] = deque()
        self._batch_committed = trio.Event()
        self._batch_taken = trio.Event()
        self._bulk_budget = bulk_budget
        self._bulk_time_budget = bulk_time_budget
        self._bulk_queued = 0  # rows of bulk outcomes waiting for the next commit
        self._bulk_seconds = 0.0  # event-loop time spent computing them
        # Bulk outcomes waiting for room, first come first served; only the
        # head is woken (see submit_bulk).
        self._bulk_waiters: deque[trio.Event] = deque()
        self._idle = trio.Event()
        self._idle.set()
        # Queued outcomes are numbered 1, 2, ... (``_queued`` is the last number given). They end up acted
        # on (in batches, in order) or refused (a failed commit's batch and all queued behind it): each
        # stretch of numbers, [last number, done], in order; ``_done_upto``: every outcome up to it is.
        self._taken = 0  # the last number taken from the queue into a batch
        self._stretches: deque[list[Any]] = deque()
        self._done_upto = 0
        self._after: deque[tuple[int, Callable[[], None]]] = deque()  # after_acting's, with the number they follow
        self._refusing_after: int | None = None  # while a failed commit's outcomes are refused: the number before
        self._queued = 0  # outcomes ever queued: the last number given
        self._settled_upto = 0  # every outcome up to this number is committed or refused
        self._settling = trio.Event()  # set (and replaced) as it moves
        self._committed = trio.Event()
        self._between: list[tuple[Callable[[], Any], trio.Event, list[Any]]] = []
        # Queued outcomes decided as the holder of the escalation lease, by id: their commit carries the
        # epoch (PreparedCommit.guard_lease) and is refused with LeaseLost once another node took the lease.
        self._epochs: dict[int, int] = {}
        self.commit_seconds: list[float] = []  # recent commit durations, for metrics
        self.batches = 0
        self.outcomes = 0

    def submit(self, outcome: Outcome, token: Any = None, *, lease_epoch: int | None = None) -> None:
        """Queue an outcome; one with no writes and nothing ahead of it is acted on at once.

        ``lease_epoch``: the outcome was decided as the escalation lease's holder at that epoch; the
        commit that holds it checks the epoch first (PostgreSQL; ``store/CLUSTER.md``).
        """
        if not outcome.writes and not outcome.actions:
            return
        if outcome.writes and self.failing:
            self._refuse(self._failure or WriteFailed("writes are failing"), [(outcome, token)])
            return
        if lease_epoch is not None and outcome.writes:
            self._epochs[id(outcome)] = lease_epoch
        if not outcome.writes and not self._queue and not self._in_flight:
            self._act(outcome, token, NO_SEQS_GIVEN)
            return
        self._queue.append((outcome, token))
        self._queued += 1
        if len(self._queue) >= self._max_queued and self._room.is_set():
            self._room = trio.Event()
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wakeup.set()

    @property
    def full(self) -> bool:
        """Whether the queue is at its bound (see the class docstring)."""
        return not self._room.is_set()

    async def wait_room(self) -> None:
        """Return once the queue is under its bound."""
        await self._room.wait()

    async def submit_bulk(self, compute: Callable[[], Outcome], *, lease_epoch: int | None = None) -> None:
        """Compute a low-priority outcome once the next commit has room for it, and queue it.

        ``compute`` runs only then (so it sees the state and time of that
        moment, and a cancelled caller computes nothing). Room is counted in
        rows and in event-loop time: a stage that alerts no one (everyone at
        their hourly cap) writes one row but may scan thousands of locals.

        Waiters go in turn: room wakes the first, which computes and, if room
        is left, wakes the next. Under load hundreds of escalation stages
        wait here; waking them all at every commit to let one or two through
        cost a scheduler round trip each (6% of the server's samples in the
        escalation bench, plus the tasks' own loops).

        ``lease_epoch``: the epoch its commit must carry (see :meth:`submit`).
        """
        if self._bulk_waiters or not self._bulk_has_room():
            turn = trio.Event()
            self._bulk_waiters.append(turn)
            try:
                while True:
                    await turn.wait()
                    if self._bulk_has_room():
                        break
                    turn = trio.Event()  # woken too early: back to the head of the line
                    self._bulk_waiters.appendleft(turn)
            except BaseException:
                if turn in self._bulk_waiters:
                    self._bulk_waiters.remove(turn)
                else:
                    self._wake_bulk()  # woken, but gone: the next one's turn
                raise
        started = time.perf_counter()
        outcome = compute()
        self._bulk_seconds += time.perf_counter() - started
        self._bulk_queued += rows_of(outcome.writes)
        self.submit(outcome, lease_epoch=lease_epoch)
        self._wake_bulk()

    def _wake_bulk(self) -> None:
        """Wake the first bulk outcome waiting, if there is room for it."""
        if self._bulk_waiters and self._bulk_has_room():
            self._bulk_waiters.popleft().set()

    def _bulk_has_room(self) -> bool:
        if not self._queue and not self._in_flight:
            self._bulk_queued, self._bulk_seconds = 0, 0.0  # no request can be waiting behind bulk work
        return self._bulk_queued < self._bulk_budget and self._bulk_seconds < self._bulk_time_budget

    async def run_between_commits(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on a worker thread while no commit runs, and return its result.

        The committer runs it before its next commit (which waits meanwhile):
        for store maintenance that needs the writer to hold still.
        """
        done, result = trio.Event(), list[Any]()
        self._between.append((fn, done, result))
        self._wakeup.set()
        await done.wait()
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    async def wait_for_commit(self) -> None:
        """Return after the next commit."""
        await self._committed.wait()

    async def wait_committed(self) -> None:
        """Return once every outcome queued so far is committed or refused (acted on or not).

        The driver calls it before it reads the store for a request: a read
        then sees every write decided before it, whichever connection's (not
        the copy from before a receipt still queued, say, of a question
        memory let go meanwhile).
        """
        mark = self._queued
        while self._settled_upto < mark:
            await self._settling.wait()

    def _settle(self) -> None:
        """Everything taken from the queue so far is committed or refused."""
        self._settled_upto = self._taken
        self._settling.set()
        self._settling = trio.Event()

    async def wait_acted(self) -> None:
        """Return once every outcome queued so far is acted on (or refused): :meth:`after_acting`, awaited."""
        acted = trio.Event()
        self.after_acting(acted.set)
        await acted.wait()

    def after_acting(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once every outcome queued so far is acted on (or refused): at once if none is left.

        For replies decided outside the queue (a failed commit's refusals,
        a write refused while writes fail): the batch before may still be
        going out in slices, and requests queued before them must be
        answered first. Whatever else the failure changes happens at once.
        """
        after = self._queued if self._refusing_after is None else self._refusing_after
        if self._done_upto >= after:
            fn()
        else:  # in number order: a failed batch's answers go ahead of later ones waiting
            bisect.insort_right(self._after, (after, fn), key=lambda waiting: waiting[0])

    def _stretch_done(self, last: int | None = None) -> None:
        """The oldest stretch acted on (``last`` None), or a refused one up to ``last``: call what waited."""
        if last is None:
            next(s for s in self._stretches if not s[1])[1] = True
        else:
            self._stretches.append([last, True])
        while self._stretches and self._stretches[0][1]:
            self._done_upto = self._stretches.popleft()[0]
        while self._after and self._after[0][0] <= self._done_upto:
            self._after.popleft()[1]()

    async def wait_idle(self) -> None:
        """Return once everything submitted so far is committed and acted on."""
        while self._queue or self._in_flight:
            await self._idle.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._act_committed)
            task_status.started()
            await self._commit_forever()

    async def _commit_forever(self) -> None:
        while True:
            if self._between:
                await self._run_between()
            if not self._queue:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                if not self._queue:
                    continue  # woken for work between commits
            while self._committed_batches:
                # The actor is still on the batch before: at most one waits.
                self._batch_taken = trio.Event()
                await self._batch_taken.wait()
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            self._taken += len(batch)
            if len(self._queue) < self._max_queued:
                self._room.set()
            self._in_flight += 1
            if not self._queue:
                # What comes next goes into the next commit: bulk work may fill it.
                self._bulk_queued, self._bulk_seconds = 0, 0.0
                self._wake_bulk()
            epochs = {id(o): e for o, _t in batch if (e := self._epochs.pop(id(o), None)) is not None}
            committed = await self._commit(batch, epochs, self._taken - len(batch))
            if committed is None:
                continue  # refused
            batch, given = committed
            self._settle()
            self._stretches.append([self._taken, False])
            self._committed_batches.append((batch, given))
            self._batch_committed.set()

    async def _commit(
        self, batch: list[tuple[Outcome, Any]], epochs: dict[int, int], before: int
    ) -> tuple[list[tuple[Outcome, Any]], SeqsGiven] | None:
        """Commit ``batch``'s writes (``epochs``: its outcomes' lease epochs; ``before``: the number of the
        outcome before it). Returns what is to be acted on and the seqs given, or None once it is refused.

        A stage of a question another node ended before this node heard (``QuestionEnded``) is taken out
        of the batch, which is committed again without it: it is not acted on, ``on_stage_refused`` is told.
        """
        while True:
            writes: list[Write] = [w for outcome, _token in batch for w in outcome.writes]
            if not writes:
                return batch, {}
            started = time.perf_counter()
            lease = [epochs[id(o)] for o, _t in batch if id(o) in epochs]
            try:
                # Statements are built here (GIL-bound work either way); the
                # worker thread only runs SQLite. Not abandoned on cancel: a
                # commit in flight always finishes.
                prepared = self._store.prepare(writes)
                if lease:  # the oldest: a commit decided under an epoch since replaced must be refused
                    prepared.guard_lease(min(lease))
                given = await trio.to_thread.run_sync(self._store.commit, prepared)
            except QuestionEnded as exc:
                ended = [o for o, _t in batch if _stage_of(o, exc.question_ids)]
                if not ended:  # nothing to take out (a bug): refused like any failed commit
                    self._failed(exc, batch, before)
                    return None
                batch = [(o, t) for o, t in batch if not _stage_of(o, exc.question_ids)]
                if self._on_stage_refused is not None:
                    self._on_stage_refused(ended)
                continue
            except WriteFailed as exc:
                if isinstance(exc, LeaseLost) and lease:
                    exc.epoch = min(lease)
                self._failed(exc, batch, before)
                return None
            except Exception as exc:
                # A bug (a value no statement can take, say): what the batch holds cannot be stored,
                # so it is refused like any failed commit (rolled back: ``Storage.commit``), memory is
                # rebuilt and the probe, a second later, lets writes in again; nothing else stops.
                log.exception("commit_crashed", extra={"outcomes": len(batch), "rows": len(writes)})
                failure = WriteFailed(f"commit failed: {exc!r}")
                failure.__cause__ = exc
                self._failed(failure, batch, before)
                return None
            self._committed.set()
            self._committed = trio.Event()
            self._record(time.perf_counter() - started)
            if self._on_commit is not None:
                self._on_commit(time.perf_counter() - started, len(batch), given)
            return batch, given

    def refuse_writes(self, exc: WriteFailed) -> None:
        """Refuse writes from now on, as after a failed commit (``on_write_failed`` is told, with nothing
        refused yet), until :meth:`writes_work`; what is queued already still commits.

        For a rebuild of memory from the store that no write may race (the driver's takeover of escalation).
        """
        if not self.failing:
            self.failing = True
            self._failure = exc
            self._refuse(exc, [])

    def writes_work(self) -> None:
        """Writes succeed again (the driver's probe committed): commit as before."""
        self.failing = False
        self._failure = None

    def _failed(self, exc: WriteFailed, batch: list[tuple[Outcome, Any]], before: int) -> None:
        """A commit failed: nothing of ``batch`` (after outcome number ``before``) or of what is queued behind
        it will be committed."""
        refused = batch + self._queue
        self._queue = []
        self._taken = self._queued
        self._settle()
        self._epochs.clear()
        self._in_flight -= 1
        self.failing = True
        self._failure = exc
        self._room.set()
        if not self._in_flight:
            self._idle.set()
            self._wake_bulk()
        # What after_acting is given meanwhile answers these outcomes: in their place, ahead of any refusal
        # of a later request waiting already (one refused while writes were refused, the queue committing).
        self._refusing_after = before
        try:
            self._refuse(exc, refused)
        finally:
            self._refusing_after = None
        self._stretch_done(self._queued)

    def _refuse(self, exc: WriteFailed, refused: list[tuple[Outcome, Any]]) -> None:
        if self._on_write_failed is None:
            raise exc
        self._on_write_failed(exc, refused)

    async def _act_committed(self) -> None:
        while True:
            if not self._committed_batches:
                self._batch_committed = trio.Event()
                await self._batch_committed.wait()
                continue
            batch, given = self._committed_batches.popleft()
            self._batch_taken.set()
            try:
                with trio.CancelScope(shield=True):  # what is committed is acted on
                    await self._act_in_slices(batch, given)
            finally:
                self._in_flight -= 1
            self.batches += 1
            self.outcomes += len(batch)
            self._stretch_done()
            if not self._queue and not self._in_flight:
                self._idle.set()
                self._wake_bulk()

    async def _run_between(self) -> None:
        jobs, self._between = self._between, []
        with trio.CancelScope(shield=True):  # whoever waits gets an answer
            for fn, done, result in jobs:
                try:
                    result.append(await trio.to_thread.run_sync(fn))
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    result.append(exc)
                done.set()

    async def _act_in_slices(self, batch: list[tuple[Outcome, Any]], given: SeqsGiven) -> None:
        """Act on a batch in order, letting other tasks run every ``ACT_SLICE_S``.

        A batch of fan-out can mean a thousand frames to write; requests read
        meanwhile are handled (their outcomes queue for the next commit), so
        the event loop never stalls for the whole batch.
        """
        slice_end = time.perf_counter() + ACT_SLICE_S
        for outcome, token in batch:
            self._act(outcome, token, given)
            if time.perf_counter() > slice_end:
                await trio.lowlevel.checkpoint()
                slice_end = time.perf_counter() + ACT_SLICE_S

    def _record(self, seconds: float) -> None:
        self.commit_seconds.append(seconds)
        if len(self.commit_seconds) > 1024:
            del self.commit_seconds[:512]


def _stage_of(outcome: Outcome, questions: tuple[str, ...]) -> bool:
    """Whether ``outcome`` is a stage of one of ``questions`` (it holds their ``IfOpen``)."""
    return any(isinstance(w, IfOpen) and w.question_id in questions for w in outcome.writes)


#: The WAL is checkpointed beside the committer after this many commits or
#: rows, whichever comes first (SQLite's own default is every 1000 pages).
WAL_CHECKPOINT_COMMITS = 1000
WAL_CHECKPOINT_ROWS = 20_000


async def keep_wal_short(
    store: Store,
    pipeline: CommitPipeline,
    *,
    commits: int = WAL_CHECKPOINT_COMMITS,
    rows: int = WAL_CHECKPOINT_ROWS,
    on_failed: Callable[[WriteFailed], None] | None = None,
) -> None:
    """Keep the WAL short: checkpoint it once enough was committed.

    In two steps. A passive checkpoint on a worker thread, beside the
    committer, copies what the WAL holds into the database file; commits go
    on meanwhile. Under steady load they always add frames while it runs, so
    it never catches up, and SQLite starts the WAL over only once every frame
    was copied: the WAL grew without end (to 650 MB in the escalation
    bench's 30 s, each checkpoint slower than the last). So a second passive
    checkpoint runs between two commits, copying only what came meanwhile;
    the next commit then starts the WAL from its beginning.

    Driven by commits, not a timer: an idle server does no work, and tests on
    trio's autojump clock see no extra deadline.

    Error handling: a checkpoint that fails (one that must grow the database
    file on a full disk, while commits still fit into the WAL's old frames)
    loses nothing: the WAL keeps every page. It is logged
    (``wal_checkpoint_failed``), ``on_failed`` is told, and it is tried again
    after as many commits or rows again; the commits themselves fail, and the
    storage supervisor takes over, once the WAL cannot grow either.
    """
    seen_commits, seen_rows = store.commits, store.rows_committed
    while True:
        await pipeline.wait_for_commit()
        if store.commits - seen_commits >= commits or store.rows_committed - seen_rows >= rows:
            seen_commits, seen_rows = store.commits, store.rows_committed
            try:
                await trio.to_thread.run_sync(store.checkpoint)
                await pipeline.run_between_commits(store.checkpoint)
            except WriteFailed as exc:
                log.warning("wal_checkpoint_failed", extra={"error": str(exc)})
                if on_failed is not None:
                    on_failed(exc)
