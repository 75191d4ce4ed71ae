"""The push outbox's dispatcher: offline targets' notifications to a push gateway,
slow-response alerts to the alert webhook.

Jobs are committed to the ``push_outbox`` table in the same transaction as the
notification they belong to, then handed here. Each job is POSTed as JSON to
``[escalation] push_url`` with up to ``push_attempts`` attempts and
exponential backoff; the outcome (``sent`` / ``failed`` / ``expired``) is
committed back through the pipeline. Pending jobs found at start-up are sent
again, so a job may be delivered twice across a crash: the gateway gets an
``Idempotency-Key`` header to drop repeats. With no URL configured for a
job's kind nothing is sent: the job is recorded ``unsent``.

httpx is the HTTP client: it runs on trio natively and handles connection
pooling, timeouts and TLS, which a push gateway on the internet needs.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import attrs
import httpx
import trio

from .clock import EngineClock
from .config import EscalationSettings
from .core.effects import Outcome, SavePushStatus
from .core.records import PushJob
from .store import StoreError

__all__ = ["MAX_QUEUED", "PushDispatcher", "PushStatistics", "push_body"]

log = logging.getLogger("dongne.push")

CONCURRENCY = 16
#: The most jobs queued in memory, by default; start-up reads no more than this from the outbox.
MAX_QUEUED = 10_000


def _idempotency_key(job: PushJob, incarnation: str) -> str:
    if job.job_id == 0:  # an alert_now(): unique per alert, not per outbox row
        return f"dongne-{job.kind}-{job.created_at}"
    # Ids are unique in one incarnation of the database only: a restore gives them again, with a new one.
    return f"dongne-push-{incarnation}-{job.job_id}"


def push_body(job: PushJob) -> dict[str, Any]:
    """The JSON a push gateway receives for one job."""
    return {
        "job_id": job.job_id,
        "user_id": job.user_id,
        "type": job.kind,
        "kind": job.kind,  # the name for it; "type" stays for gateways written before
        "urgent": job.urgent,
        "created_at": job.created_at,
        **job.payload,
    }


@attrs.frozen
class PushStatistics:
    """The dispatcher's state: jobs queued in memory, sent, failed, times the queue was full, and jobs dropped
    (cancelled: their question or answer taken down, or their target banned), and jobs with no URL."""

    queued: int
    sent: int
    failed: int
    overflows: int
    dropped: int = 0
    unsent: int = 0  # recorded with no URL to send them to


class PushDispatcher:
    """Sends push jobs; records each outcome through ``submit``.

    Jobs come through ``offer`` once committed to the outbox, into a queue of
    at most ``max_queued``. At the bound a job is not queued but stays
    ``pending`` in the outbox (nothing is lost), and ``read_pending`` is asked
    for the outbox's pending jobs once the queue has drained: a gateway that
    falls behind costs memory only up to the bound.

    Args:
        settings: the ``[escalation]`` settings (URL, attempts, backoff, timeout, max age).
        submit: the commit pipeline's ``submit``.
        clock: the engine clock.
        pending: jobs left pending by an earlier run.
        read_pending: ``read_pending(after_id, limit)`` reads at most
            ``limit`` of this node's pending jobs in the outbox with ids
            above ``after_id``, oldest first (blocking: run on a worker thread).
        adopt: ``await adopt(limit, since_ms)`` takes over at most ``limit`` pending jobs (made since
            ``since_ms``) of nodes gone from the cluster (on the writer's connection: between the pipeline's
            commits, as the driver runs it); called every
            ``adopt_interval_s`` while :attr:`adopting` (the escalation
            lease's holder: one node adopts).
        alert_url: where slow-response alerts go.
        max_queued: the most jobs queued in memory.
        incarnation: the store's incarnation (``Storage.incarnation``), in each job's ``Idempotency-Key``.
    """

    def __init__(
        self,
        settings: EscalationSettings,
        submit: Callable[[Outcome], None],
        clock: EngineClock,
        pending: Iterable[PushJob] = (),
        *,
        read_pending: Callable[[int, int], list[PushJob]] | None = None,
        adopt: Callable[[int, int], Awaitable[list[PushJob]]] | None = None,
        adopt_interval_s: float = 10.0,
        alert_url: str = "",
        max_queued: int = MAX_QUEUED,
        incarnation: str = "",
    ) -> None:
        self.settings = settings
        self._incarnation = incarnation
        self._urls = {"slow_response_alert": alert_url, "storage_alert": alert_url}
        self._max_queued = max_queued
        self._queue: deque[PushJob] = deque(itertools.islice(pending, max_queued))
        self._queued = trio.Event()
        self._read_pending = read_pending
        self._skipped_after: int | None = None  # jobs after this id were left in the outbox
        self._read_up_to = 0  # the newest job read back from the outbox
        if len(self._queue) >= max_queued:  # more may wait in the outbox: read them back once these are out
            self._skipped_after = self._read_up_to = self._queue[-1].job_id
        self._reading = False  # a read of the outbox runs
        self._skipped_while_reading = False  # a job was offered (and skipped) while it ran
        self._adopt = adopt
        self._adopt_interval_s = adopt_interval_s
        #: Whether this node adopts gone nodes' jobs (it holds the escalation lease); see :meth:`adopt_now`.
        self.adopting = False
        self._adopt_wakeup = trio.Event()
        self._submit = submit
        self._clock = clock
        self._closed = False
        self._finished = trio.Event()  # run() has returned: no delivery is under way
        self._resting: set[trio.CancelScope] = set()  # deliveries waiting out a backoff between attempts
        self.sent = 0
        self.failed = 0
        self.overflows = 0
        self._settled = trio.Event()  # set, then replaced, each time a job is sent or fails
        #: Jobs being delivered, by id (alerts, id 0, are not), each with the scope ``drop`` cancels.
        self._in_flight: dict[int, tuple[PushJob, trio.CancelScope]] = {}
        self.dropped = 0
        self.unsent = 0

    def statistics(self) -> PushStatistics:
        return PushStatistics(len(self._queue), self.sent, self.failed, self.overflows, self.dropped, self.unsent)

    async def wait_sent(self, count: int) -> None:
        """Return once ``count`` jobs have been sent since start-up."""
        while self.sent < count:
            await self._settled.wait()

    async def wait_failed(self, count: int) -> None:
        """Return once ``count`` jobs have failed (out of attempts) since start-up."""
        while self.failed < count:
            await self._settled.wait()

    def _settle(self) -> None:
        self._settled.set()
        self._settled = trio.Event()

    def offer(self, job: PushJob) -> None:
        """Queue a committed job for sending (never blocks; see the class docstring for the bound)."""
        if self._closed or job.job_id <= self._read_up_to:
            return  # shutting down (the job stays pending, sent at the next start), or read back already
        if len(self._queue) >= self._max_queued or self._skipped_after is not None:
            self._skipped_while_reading = self._reading  # then read again, after what that read returns
            if self._skipped_after is None:
                self._skipped_after = job.job_id - 1
                self.overflows += 1
                log.warning("push queue full (%d jobs): later jobs wait in the outbox", len(self._queue))
            return
        self._queue.append(job)
        self._queued.set()

    def adopt_now(self, adopting: bool) -> None:
        """Adopt gone nodes' pending jobs from now on (at once, then every ``adopt_interval_s``), or stop."""
        self.adopting = adopting
        self._adopt_wakeup.set()

    async def adopt_pending(self) -> int:
        """Take over gone nodes' pending jobs, as many as the queue has room for, and queue them; how many.

        They are queued whatever :meth:`offer` is doing and leave its cursor
        alone: their ids are another node's, above or below this node's own.
        """
        room = self._max_queued - len(self._queue)
        if self._adopt is None or self._closed or room <= 0:
            return 0
        since = self._clock.now_ms() - int(self.settings.push_max_age_s * 1000)  # older ones: expired, not held
        jobs = await self._adopt(room, since)
        if self._closed:
            return 0  # they stay pending, adopted by this node: adopted again once it has left
        self._queue.extend(jobs)
        if jobs:
            log.info("adopted %d pending push jobs of nodes gone", len(jobs))
            self._queued.set()
        return len(jobs)

    async def _adopt_periodically(self) -> None:
        while not self._closed:
            if self.adopting:
                try:
                    await self.adopt_pending()
                except StoreError as exc:  # the next round tries again
                    log.warning("adopting push jobs failed: %s", exc)
            self._adopt_wakeup = trio.Event()
            with trio.move_on_after(self._adopt_interval_s):
                await self._adopt_wakeup.wait()

    def drop(self, question_id: str = "", answer_id: str = "", user_id: str = "") -> None:
        """Drop the jobs held here about a question (or one of its answers), or to a user: a commit cancelled
        them in the outbox (``CancelPushes``). A job between attempts makes no more, and records nothing."""

        def dropped(job: PushJob) -> bool:
            return (
                (not question_id or job.question_id == question_id)
                and (not answer_id or job.answer_id == answer_id)
                and (not user_id or job.user_id == user_id)
            )

        kept = deque(job for job in self._queue if not dropped(job))
        self.dropped += len(self._queue) - len(kept)
        self._queue = kept
        for job, scope in self._in_flight.values():
            if dropped(job):
                scope.cancel()  # between attempts, or during one: no more, and nothing recorded

    def alert_now(self, kind: str, data: dict[str, Any]) -> None:
        """POST an operators' alert to the alert webhook now, outside the outbox.

        For alerts about the outbox's own storage (``storage_alert``): they
        cannot wait for a commit. Best effort: not recorded, not resent
        after a restart; its job id is 0.
        """
        if self._closed or not self._urls.get(kind):
            return
        self._queue.appendleft(PushJob(0, "", kind, True, {"data": data}, self._clock.now_ms()))
        self._queued.set()

    def close(self) -> None:
        """Stop taking jobs and starting deliveries; ``run`` returns once those under way have ended (the
        jobs still queued stay pending in the outbox, for the next start)."""
        self._closed = True
        self._queued.set()
        self._adopt_wakeup.set()
        for resting in self._resting:
            resting.cancel()

    async def wait_finished(self) -> None:
        """Return once ``run`` has returned after :meth:`close`: every delivery under way ended, and recorded."""
        await self._finished.wait()

    async def _jobs(self) -> AsyncIterator[PushJob]:
        while True:
            while self._queue and not self._closed:
                yield self._queue.popleft()
            if self._closed:
                return
            if self._skipped_after is not None and self._read_pending is not None:
                # Offers stay skipped while the read runs (``_skipped_after`` is kept): a job committed
                # meanwhile may be in what it returns, and would be queued twice. Those skipped during the
                # read that it missed (committed after it looked) are read next, after its last id.
                after = self._skipped_after
                self._reading, self._skipped_while_reading = True, False
                try:
                    jobs = await trio.to_thread.run_sync(self._read_pending, after, self._max_queued)
                finally:
                    self._reading = False
                if jobs:
                    self._read_up_to = max(self._read_up_to, jobs[-1].job_id)
                more = len(jobs) >= self._max_queued or self._skipped_while_reading
                self._skipped_after = (jobs[-1].job_id if jobs else after) if more else None
                self._queue.extend(jobs)
                continue
            self._queued = trio.Event()
            await self._queued.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # With no URL at all the jobs still go through: each is recorded 'unsent' (settled), not left
        # pending for every later start to read again.
        limiter = trio.Semaphore(CONCURRENCY)  # acquired by the loop, released by the delivery task
        try:
            async with (
                httpx.AsyncClient(timeout=self.settings.push_timeout_s) as client,
                trio.open_nursery() as nursery,
            ):
                task_status.started()
                if self._adopt is not None:
                    nursery.start_soon(self._adopt_periodically)
                async for job in self._jobs():
                    # A delivery slot first: jobs wait in the bounded queue (and
                    # the outbox past it), not in tasks, while the gateway is slow.
                    await limiter.acquire()
                    if self._closed:
                        limiter.release()
                        break
                    nursery.start_soon(self._deliver, client, limiter, job)
                # Closed (the server is shutting down): deliveries under way end on their own, recorded (one sent
                # again at the next start would reach the gateway twice), unless the shutdown's deadline comes
                # first. No new attempt starts; what is left stays pending in the outbox.
        finally:
            self._finished.set()

    def _record(self, job: PushJob, status: str, attempts: int, error: str | None) -> None:
        if job.job_id == 0:
            return  # an alert_now(): not in the outbox
        self._submit(Outcome(writes=(SavePushStatus(job.job_id, status, attempts, error, self._clock.now_ms()),)))

    def url_for(self, job: PushJob) -> str:
        """Alerts go to the alert webhook, notifications to the push gateway."""
        return self._urls.get(job.kind, self.settings.push_url)

    async def _deliver(self, client: httpx.AsyncClient, limiter: trio.Semaphore, job: PushJob) -> None:
        try:
            with trio.CancelScope() as scope:
                if job.job_id:
                    self._in_flight[job.job_id] = (job, scope)
                await self._deliver_held(client, job)
            if scope.cancelled_caught:
                self.dropped += 1
                self._settle()
        finally:
            self._in_flight.pop(job.job_id, None)
            limiter.release()

    async def _deliver_held(self, client: httpx.AsyncClient, job: PushJob) -> None:
        url = self.url_for(job)
        if not url:  # no destination for this kind (an alert, with no [alerts] webhook_url): settled as such
            self.unsent += 1
            self._record(job, "unsent", job.attempts, "no URL configured")
            self._settle()
            return
        if self._clock.now_ms() - job.created_at > self.settings.push_max_age_s * 1000:
            self._record(job, "expired", job.attempts, "too old to send")
            return
        attempts = job.attempts
        error: str | None = None
        while attempts < self.settings.push_attempts:
            if attempts > job.attempts:
                with trio.CancelScope() as resting:  # close() cuts it short
                    self._resting.add(resting)
                    try:
                        await trio.sleep(self.settings.push_backoff_s * 2 ** (attempts - job.attempts - 1))
                    finally:
                        self._resting.discard(resting)
                if self._closed:
                    return  # shutting down: no new attempt; pending in the outbox for the next start
            attempts += 1
            try:
                response = await client.post(
                    url,
                    json=push_body(job),
                    headers={"Idempotency-Key": _idempotency_key(job, self._incarnation)},
                )
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:200]
                continue
            if 200 <= response.status_code < 300:
                self.sent += 1
                self._record(job, "sent", attempts, None)
                self._settle()
                return
            error = f"HTTP {response.status_code}"
        self.failed += 1
        log.warning("push job %d to %s failed after %d attempts: %s", job.job_id, job.user_id, attempts, error)
        self._record(job, "failed", attempts, error)
        self._settle()
