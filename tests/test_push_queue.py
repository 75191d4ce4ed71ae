"""The push dispatcher's bounded queue: jobs past the bound wait in the durable outbox, and all go out once."""

from __future__ import annotations

from pathlib import Path

import trio

from dongne.clock import EngineClock
from dongne.config import EscalationSettings
from dongne.core import EnqueuePush, Outcome, PushJob
from dongne.push import PushDispatcher
from dongne.store import Store

from .test_push import FakeGateway


async def test_jobs_past_the_queue_bound_wait_in_the_outbox_and_are_each_sent_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "outbox.sqlite3", synchronous="NORMAL")
    store.open()
    clock = EngineClock()
    payload = {"title": "t", "region": "Jeju-si", "data": {}}
    jobs = [PushJob(i, f"local{i}", "new_question_notification", False, payload, clock.now_ms()) for i in range(1, 13)]
    store.apply([EnqueuePush(job) for job in jobs])  # committed, as the engine's jobs are before they are offered
    gateway = FakeGateway(200)
    all_recorded = trio.Event()
    recorded: list[Outcome] = []

    def submit(outcome: Outcome) -> None:
        store.apply(outcome.writes)  # the delivery status, as the pipeline would commit it
        recorded.append(outcome)
        if len(recorded) == len(jobs):
            all_recorded.set()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve)
            settings = EscalationSettings(push_url=f"http://127.0.0.1:{gateway.port}/push")
            dispatcher = PushDispatcher(settings, submit, clock, read_pending=store.pending_push_jobs, max_queued=3)
            for job in jobs:
                dispatcher.offer(job)
            held = dispatcher.statistics()
            await nursery.start(dispatcher.run)
            with trio.fail_after(20):
                await all_recorded.wait()
            dispatcher.close()
            nursery.cancel_scope.cancel()
    finally:
        store.close()

    assert (held.queued, held.overflows) == (3, 1)  # memory holds the bound, not the backlog
    keys = sorted(int(headers["idempotency-key"].rsplit("-", 1)[1]) for headers, _ in gateway.requests)
    assert keys == list(range(1, 13))  # every job once, none lost, none twice
    assert dispatcher.statistics() == type(held)(queued=0, sent=12, failed=0, overflows=1)


async def test_a_job_offered_while_the_outbox_is_read_back_is_sent_once(tmp_path: Path) -> None:
    """The engine commits and offers a job while the dispatcher reads the outbox back (on a worker thread):
    whether that read returns it or not, it goes out once."""
    store = Store(tmp_path / "outbox.sqlite3", synchronous="NORMAL")
    store.open()
    clock = EngineClock()
    payload = {"title": "t", "region": "Jeju-si", "data": {}}
    jobs = [PushJob(i, f"local{i}", "new_question_notification", False, payload, clock.now_ms()) for i in range(1, 7)]
    store.apply([EnqueuePush(job) for job in jobs[:4]])
    gateway = FakeGateway(200)
    reads: list[tuple[int, int]] = []

    def read_pending(after: int, limit: int) -> list[PushJob]:
        reads.append((after, limit))
        if len(reads) == 1:  # job 5 committed before this read looks, job 6 after it: both offered during it
            trio.from_thread.run_sync(lambda: (store.apply([EnqueuePush(jobs[4])]), dispatcher.offer(jobs[4])))
            found = store.pending_push_jobs(after, limit)
            trio.from_thread.run_sync(lambda: (store.apply([EnqueuePush(jobs[5])]), dispatcher.offer(jobs[5])))
            return found
        return store.pending_push_jobs(after, limit)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve)
            settings = EscalationSettings(push_url=f"http://127.0.0.1:{gateway.port}/push")
            dispatcher = PushDispatcher(
                settings, lambda o: store.apply(o.writes), clock, read_pending=read_pending, max_queued=3
            )
            for job in jobs[:4]:
                dispatcher.offer(job)  # the 4th overflows
            await nursery.start(dispatcher.run)
            with trio.fail_after(20):
                await dispatcher.wait_sent(6)
            dispatcher.close()
            nursery.cancel_scope.cancel()
    finally:
        store.close()

    keys = sorted(int(headers["idempotency-key"].rsplit("-", 1)[1]) for headers, _ in gateway.requests)
    assert keys == [1, 2, 3, 4, 5, 6]
    assert reads == [(3, 3), (5, 3)]  # read again after the first read's last id: job 6 was skipped during it


async def test_an_alert_job_with_no_webhook_is_settled_unsent(tmp_path: Path) -> None:
    """A slow-response alert's job with ``push_url`` set but no alert webhook: recorded ``unsent``, not left
    pending to be read again at every start."""
    store = Store(tmp_path / "outbox.sqlite3", synchronous="NORMAL")
    store.open()
    clock = EngineClock()
    job = PushJob(1, "", "slow_response_alert", False, {"title": "t", "region": "r", "data": {}}, clock.now_ms())
    store.apply([EnqueuePush(job)])
    recorded = trio.Event()

    def submit(outcome: Outcome) -> None:
        store.apply(outcome.writes)
        recorded.set()

    try:
        async with trio.open_nursery() as nursery:
            settings = EscalationSettings(push_url="http://127.0.0.1:9/push")
            dispatcher = PushDispatcher(settings, submit, clock, store.load(hot_since=0).pending_pushes)
            await nursery.start(dispatcher.run)
            with trio.fail_after(10):
                await recorded.wait()
            dispatcher.close()
        assert store.load(hot_since=0).pending_pushes == []
        assert store._read("SELECT status, last_error FROM push_outbox") == [("unsent", "no URL configured")]
    finally:
        store.close()


async def test_start_up_queues_at_most_the_bound_of_recent_jobs_and_old_ones_expire(tmp_path: Path) -> None:
    """Start-up expires the pending jobs older than push_max_age_s, reads at most the queue's bound of the
    others and pages through the rest; settled jobs past the retention are pruned."""
    store = Store(tmp_path / "outbox.sqlite3", synchronous="NORMAL")
    store.open()
    clock = EngineClock()
    now = clock.now_ms()
    payload = {"title": "t", "region": "Jeju-si", "data": {}}
    old = [
        PushJob(i, f"l{i}", "new_question_notification", False, payload, now - 30 * 86_400_000) for i in range(1, 41)
    ]
    recent = [PushJob(i, f"l{i}", "new_question_notification", False, payload, now) for i in range(41, 53)]
    store.apply([EnqueuePush(job) for job in old + recent])
    gateway = FakeGateway(200)
    settings = EscalationSettings(push_max_age_s=600.0)
    try:
        loaded = store.load(hot_since=now, pushes_since=now - 600_000, pushes=5)
        assert [job.job_id for job in loaded.pending_pushes] == [41, 42, 43, 44, 45]
        assert store._read("SELECT count(*) FROM push_outbox WHERE status = 'expired'") == [(40,)]
        unbounded = PushDispatcher(settings, lambda o: None, clock, old + recent, max_queued=5)
        assert unbounded.statistics().queued == 5  # whatever it is handed
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve)
            settings = EscalationSettings(push_url=f"http://127.0.0.1:{gateway.port}/push", push_max_age_s=600.0)
            dispatcher = PushDispatcher(
                settings,
                lambda o: store.apply(o.writes),
                clock,
                loaded.pending_pushes,
                read_pending=store.pending_push_jobs,
                max_queued=5,
            )
            await nursery.start(dispatcher.run)
            with trio.fail_after(20):
                await dispatcher.wait_sent(12)
            dispatcher.close()
            nursery.cancel_scope.cancel()
        keys = sorted(int(headers["idempotency-key"].rsplit("-", 1)[1]) for headers, _ in gateway.requests)
        assert keys == list(range(41, 53))
        assert store.prune_pushes(now - 1, 30) == 30  # the expired ones, last changed at the load's cutoff
        assert store.prune_pushes(now - 1, 30) == 10
        assert store.prune_pushes(now - 1, 30) == 0  # the sent ones are recent
        assert store._read("SELECT count(*) FROM push_outbox") == [(12,)]
    finally:
        store.close()
