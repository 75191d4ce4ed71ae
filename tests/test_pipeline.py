"""The commit pipeline over a real SQLite file: order, durability before acting, and fan-out yielding to requests."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

import pytest
import trio

from dongne.core.effects import AppendEvent, Note, Outcome, SaveUser
from dongne.core.records import User
from dongne.pipeline import CommitPipeline, keep_wal_short
from dongne.store import Store, WriteFailed

ROWS_PER_STAGE = 50
BUDGET = 100


def _outcome(name: str, rows: int, seqs: itertools.count[int]) -> Outcome:
    writes = tuple(AppendEvent(f"user-{name}", next(seqs), "x", {"n": i}, 0) for i in range(rows))
    return Outcome(writes, (Note(name, {}),))


async def test_requests_do_not_wait_behind_queued_fan_out(tmp_path: Path) -> None:
    store = Store(tmp_path / "p.sqlite3", synchronous="NORMAL")
    store.open()
    acted: list[str] = []
    committed_before_acting: list[int] = []

    def act(outcome: Outcome, _token: object, _given: object) -> None:
        acted.append(outcome.actions[0].event)  # type: ignore[union-attr]
        committed_before_acting.append(store.rows_committed)

    pipeline = CommitPipeline(store, act, bulk_budget=BUDGET, bulk_time_budget=10.0)
    seqs = itertools.count(1)
    async with trio.open_nursery() as nursery:
        for stage in range(20):  # 20 stages of 50 rows fall due together
            nursery.start_soon(
                pipeline.submit_bulk, lambda stage=stage: _outcome(f"stage{stage}", ROWS_PER_STAGE, seqs)
            )
        # The committer is not running yet: one commit's share of stages is
        # computed and queued, the rest wait for room. Then a request comes.
        await trio.testing.wait_all_tasks_blocked()
        pipeline.submit(_outcome("request", 1, seqs))
        await nursery.start(pipeline.run)
        while len(acted) < 21:
            await pipeline.wait_idle()
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    # Every stage ran, and each outcome was acted on only after its rows were committed.
    assert sorted(acted) == sorted([f"stage{i}" for i in range(20)] + ["request"])
    assert committed_before_acting == sorted(committed_before_acting)
    assert store.rows_committed == 20 * ROWS_PER_STAGE + 1
    # The request went out behind one commit's share of fan-out (what was
    # queued when it came), not behind all 20 stages.
    assert acted.index("request") == BUDGET // ROWS_PER_STAGE, acted
    store.close()


async def test_fan_out_is_computed_when_there_is_room(tmp_path: Path) -> None:
    """A stage computes at its turn (seeing the state of that moment), not when it is queued."""
    store = Store(tmp_path / "p.sqlite3", synchronous="NORMAL")
    store.open()
    pipeline = CommitPipeline(store, lambda outcome, token, given: None, bulk_budget=BUDGET, bulk_time_budget=10.0)
    seqs = itertools.count(1)
    computed: list[int] = []

    def compute(stage: int) -> Outcome:
        computed.append(stage)
        return _outcome(f"s{stage}", ROWS_PER_STAGE, seqs)

    async with trio.open_nursery() as nursery:
        for stage in range(6):
            nursery.start_soon(pipeline.submit_bulk, lambda stage=stage: compute(stage))
        await trio.testing.wait_all_tasks_blocked()
        # The committer is not running: only the first commit's share was computed.
        assert len(computed) == BUDGET // ROWS_PER_STAGE
        await nursery.start(pipeline.run)
        while len(computed) < 6:
            await trio.testing.wait_all_tasks_blocked()
        await pipeline.wait_idle()
        nursery.cancel_scope.cancel()
    assert store.rows_committed == 6 * ROWS_PER_STAGE
    store.close()


async def test_the_wal_starts_over_under_steady_commits(tmp_path: Path) -> None:
    """Checkpoints beside a committer that never stops still let the WAL start over.

    The WAL file only grows when SQLite cannot start it over; its size is its
    high-water mark. A checkpoint that only ran beside commits never caught
    up, and the file grew with every cycle.
    """
    store = Store(tmp_path / "w.sqlite3", synchronous="NORMAL", background_checkpoints=True)
    store.open()
    pipeline = CommitPipeline(store, lambda outcome, token, given: None)
    seqs = itertools.count(1)
    wal = tmp_path / "w.sqlite3-wal"
    sizes: list[int] = []

    async def write_forever() -> None:
        # While one commit runs, the next one's writes are queued: the
        # committer never pauses (and the queue does not grow).
        while True:
            pipeline.submit(_outcome("w", 20, seqs))
            pipeline.submit(_outcome("w", 20, seqs))
            await pipeline.wait_for_commit()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.run)
            nursery.start_soon(functools.partial(keep_wal_short, store, pipeline, commits=40, rows=10**9))
            nursery.start_soon(write_forever)
            for cycles in (2, 16):  # two checkpoints a cycle
                with trio.fail_after(60):
                    while store.checkpoints < 2 * cycles:
                        await pipeline.wait_for_commit()
                sizes.append(wal.stat().st_size)
            nursery.cancel_scope.cancel()
        assert store.commits > 16 * 40
        # Eight times the commits, not eight times the WAL (a WAL that never starts over
        # grows with them). On a loaded machine a restart may slip past a few cycles and
        # raise the high-water mark: 3.6x was seen at a load average of 3 on 2 cores.
        assert sizes[1] < 5 * sizes[0], sizes
    finally:
        store.close()


async def _fifty_then(pipeline: CommitPipeline, seqs: itertools.count[int], then: Any) -> None:
    """Run the pipeline: 50 outcomes ``a0``..``a49`` committed together, then, while they are acted on,
    ``then()``; return once all is done."""
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        for i in range(50):
            pipeline.submit(_outcome(f"a{i}", 1, seqs))
        await pipeline.wait_for_commit()  # the 50 are committed together, and being acted on
        then()
        with trio.fail_after(10):
            await pipeline.wait_idle()
        nursery.cancel_scope.cancel()


async def test_the_next_batch_commits_while_the_last_is_acted_on(tmp_path: Path) -> None:
    import time

    store = Store(tmp_path / "o.sqlite3", synchronous="NORMAL")
    store.open()
    seqs = itertools.count(1)
    acted: list[tuple[str, int]] = []

    def act(outcome: Outcome, _token: object, _given: object) -> None:
        acted.append((outcome.actions[0].event, store.commits))  # type: ignore[union-attr]
        time.sleep(0.002)  # writing to a socket; the GIL is free meanwhile

    pipeline = CommitPipeline(store, act)
    try:
        await _fifty_then(pipeline, seqs, lambda: pipeline.submit(_outcome("b", 1, seqs)))
        assert [name for name, _ in acted] == [f"a{i}" for i in range(50)] + ["b"]  # in order
        assert acted[0][1] == 1
        assert acted[49][1] == 2  # "b" was committed before the first batch was all acted on
    finally:
        store.close()


class _Driver:
    """Acts as the driver would: each outcome written out (2 ms, the GIL free meanwhile), and a failure's
    answers given through ``after_acting`` (a write refused, an outcome without writes acted on as it is).
    ``acted``: what went out, in order; ``failures_at``: how much had, when each failure was handled;
    ``failures``: the errors."""

    def __init__(self, store: Store) -> None:
        self.acted: list[str] = []
        self.failures_at: list[int] = []
        self.failures: list[WriteFailed] = []
        self.pipeline = CommitPipeline(store, self.act, on_write_failed=self.write_failed)

    def act(self, outcome: Outcome, _token: object, _given: object) -> None:
        import time

        self.acted.append(outcome.actions[0].event)  # type: ignore[union-attr]
        time.sleep(0.002)

    def write_failed(self, exc: WriteFailed, refused: list[tuple[Outcome, object]]) -> None:
        self.failures_at.append(len(self.acted))
        self.failures.append(exc)
        answers = [f"refused {o.actions[0].event}" if o.writes else o.actions[0].event for o, _ in refused]  # type: ignore[union-attr]
        self.pipeline.after_acting(lambda: self.acted.extend(answers))


@pytest.mark.parametrize(
    ("failing", "refuse", "later", "answers"),
    [
        (["b"], False, [], ["refused b"]),  # the next commit fails
        ([], True, ["ping", "W"], ["ping", "refused W"]),  # writes refused (a takeover), the queue commits
        (["A"], True, ["ping", "W"], ["refused A", "ping", "refused W"]),  # and the queued batch fails too
    ],
)
async def test_answers_keep_the_order_of_the_requests_when_commits_fail_or_writes_are_refused(
    tmp_path: Path, failing: list[str], refuse: bool, later: list[str], answers: list[str]
) -> None:
    """While 50 outcomes go out in slices: writes in ``failing`` are queued with the write lock held
    elsewhere (their commit fails), then writes are refused if ``refuse``, then ``later`` is submitted
    ("ping" without writes, queued; "W" a write, refused at once). Every failure is handled at once; the
    answers go out after the 50, in the order of the requests."""
    import sqlite3

    store = Store(tmp_path / "o.sqlite3", synchronous="NORMAL", busy_timeout_s=0.0)
    store.open()
    holder = sqlite3.connect(store.path, isolation_level=None)
    seqs = itertools.count(1)
    driver = _Driver(store)

    def then() -> None:
        if failing:
            holder.execute("BEGIN IMMEDIATE")  # another program takes the write lock: the next commit fails
            for name in failing:
                driver.pipeline.submit(_outcome(name, 1, seqs))
        if refuse:
            driver.pipeline.refuse_writes(WriteFailed("taking over"))
        for name in later:
            driver.pipeline.submit(_outcome(name, 1 if name == "W" else 0, seqs))

    try:
        await _fifty_then(driver.pipeline, seqs, then)
        assert driver.acted == [f"a{i}" for i in range(50)] + answers
        assert driver.failures_at[0] < 50  # handled while the 50 went out
    finally:
        holder.close()
        store.close()


@pytest.mark.parametrize(
    "poison",
    [
        SaveUser(User("emoji-fan", "Mina \ud83d")),  # text SQLite cannot encode: commit raises UnicodeEncodeError
        AppendEvent("u", 10**6, "x", {"n": {1, 2}}, 0),  # data msgpack cannot pack: prepare raises TypeError
    ],
    ids=["in-commit", "in-prepare"],
)
async def test_a_batch_that_raises_anything_else_is_refused_as_a_failed_commit(
    tmp_path: Path, poison: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Not only ``WriteFailed``: the batch, and what is queued behind it, are refused (with the traceback
    logged), the committer goes on, it does not try them again, and writes work again after ``writes_work``."""
    store = Store(tmp_path / "x.sqlite3", synchronous="NORMAL")
    store.open()
    seqs = itertools.count(1)
    driver = _Driver(store)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.pipeline.run)
            driver.pipeline.submit(Outcome((poison,), (Note("poisoned", {}),)))
            driver.pipeline.submit(_outcome("behind", 1, seqs))
            with trio.fail_after(10):  # a committer trying again and again would never be idle
                await driver.pipeline.wait_idle()
                await trio.testing.wait_all_tasks_blocked()
            assert driver.acted == ["refused poisoned", "refused behind"]
            assert [str(f).split(":")[0] for f in driver.failures] == ["commit failed"]
            assert [r.exc_info is not None for r in caplog.records if r.getMessage() == "commit_crashed"] == [True]
            assert driver.pipeline.failing and store.commits == 0
            driver.pipeline.writes_work()  # the driver's probe committed
            driver.pipeline.submit(_outcome("after", 1, seqs))
            with trio.fail_after(10):
                await driver.pipeline.wait_idle()
            assert driver.acted[-1] == "after" and store.commits == 1
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_waiting_fan_out_goes_in_turn_and_a_cancelled_waiter_gives_up_its_place(tmp_path: Path) -> None:
    """One stage's room per commit: stages run in the order they came, a cancelled one is skipped, none is stranded."""
    store = Store(tmp_path / "t.sqlite3", synchronous="NORMAL")
    store.open()
    pipeline = CommitPipeline(
        store, lambda outcome, token, given: None, bulk_budget=ROWS_PER_STAGE, bulk_time_budget=10.0
    )
    seqs = itertools.count(1)
    computed: list[int] = []

    def compute(stage: int) -> Outcome:
        computed.append(stage)
        return _outcome(f"s{stage}", ROWS_PER_STAGE, seqs)

    async def stage_task(stage: int, scope: trio.CancelScope) -> None:
        with scope:
            await pipeline.submit_bulk(lambda: compute(stage))

    try:
        async with trio.open_nursery() as nursery:
            scopes = [trio.CancelScope() for _ in range(6)]
            for stage in range(6):
                nursery.start_soon(stage_task, stage, scopes[stage])
                await trio.testing.wait_all_tasks_blocked()  # they queue in this order
            assert computed == [0]  # the committer is not running: one stage's room
            scopes[2].cancel()
            await nursery.start(pipeline.run)
            with trio.fail_after(10):
                while len(computed) < 5:
                    await trio.testing.wait_all_tasks_blocked()
                await pipeline.wait_idle()
            nursery.cancel_scope.cancel()
        assert computed == [0, 1, 3, 4, 5]
        assert store.rows_committed == 5 * ROWS_PER_STAGE
    finally:
        store.close()
