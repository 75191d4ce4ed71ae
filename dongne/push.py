"""The push outbox's dispatcher: offline targets' notifications to a push gateway,
slow-response alerts to the alert webhook.

Jobs are committed to the ``push_outbox`` table in the same transaction as the
notification they belong to, then handed here. Each job is POSTed as JSON to
``[escalation] push_url`` with up to ``push_attempts`` attempts and
exponential backoff; the outcome (``sent`` / ``failed`` / ``expired``) is
committed back through the pipeline. Pending jobs found at start-up are sent
again, so a job may be delivered twice across a crash: the gateway gets an
``Idempotency-Key`` header to drop repeats. With no URL configured the jobs
stay recorded as ``pending`` and nothing is sent.

httpx is the HTTP client: it runs on trio natively and handles connection
pooling, timeouts and TLS, which a push gateway on the internet needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import httpx
import trio

from .clock import EngineClock
from .config import EscalationSettings
from .core.effects import Outcome, SavePushStatus
from .core.records import PushJob

__all__ = ["PushDispatcher", "push_body"]

log = logging.getLogger("dongne.push")

CONCURRENCY = 16


def push_body(job: PushJob) -> dict[str, Any]:
    """The JSON a push gateway receives for one job."""
    return {
        "job_id": job.job_id,
        "user_id": job.user_id,
        "type": job.kind,
        "urgent": job.urgent,
        "created_at": job.created_at,
        **job.payload,
    }


class PushDispatcher:
    """Sends push jobs; records each outcome through ``submit``.

    Args:
        settings: the ``[escalation]`` settings (URL, attempts, backoff, timeout, max age).
        jobs: newly committed jobs.
        submit: the commit pipeline's ``submit``.
        clock: the engine clock.
        pending: jobs left pending by an earlier run.
    """

    def __init__(
        self,
        settings: EscalationSettings,
        jobs: trio.MemoryReceiveChannel[PushJob],
        submit: Callable[[Outcome], None],
        clock: EngineClock,
        pending: Iterable[PushJob] = (),
        *,
        alert_url: str = "",
    ) -> None:
        self.settings = settings
        self._urls = {"slow_response_alert": alert_url}
        self._jobs = jobs
        self._submit = submit
        self._clock = clock
        self._pending = list(pending)
        self.sent = 0
        self.failed = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self.settings.push_url and not any(self._urls.values()):
            self._pending.clear()  # nowhere to send them: they stay recorded in the outbox only
            task_status.started()
            async for _job in self._jobs:  # recorded in the outbox only
                pass
            return
        limiter = trio.CapacityLimiter(CONCURRENCY)
        async with httpx.AsyncClient(timeout=self.settings.push_timeout_s) as client:
            async with trio.open_nursery() as nursery:
                task_status.started()
                for job in self._pending:
                    nursery.start_soon(self._deliver, client, limiter, job)
                self._pending.clear()
                async for job in self._jobs:
                    nursery.start_soon(self._deliver, client, limiter, job)
                # The server is shutting down: jobs still in flight stay
                # pending in the outbox and are sent again at the next start.
                nursery.cancel_scope.cancel()

    def _record(self, job: PushJob, status: str, attempts: int, error: str | None) -> None:
        self._submit(Outcome(writes=(SavePushStatus(job.job_id, status, attempts, error, self._clock.now_ms()),)))

    def url_for(self, job: PushJob) -> str:
        """Alerts go to the alert webhook, notifications to the push gateway."""
        return self._urls.get(job.kind, self.settings.push_url)

    async def _deliver(self, client: httpx.AsyncClient, limiter: trio.CapacityLimiter, job: PushJob) -> None:
        url = self.url_for(job)
        if not url:
            return  # no destination configured for this kind: recorded only
        async with limiter:
            if self._clock.now_ms() - job.created_at > self.settings.push_max_age_s * 1000:
                self._record(job, "expired", job.attempts, "too old to send")
                return
            attempts = job.attempts
            error: str | None = None
            while attempts < self.settings.push_attempts:
                if attempts > job.attempts:
                    await trio.sleep(self.settings.push_backoff_s * 2 ** (attempts - job.attempts - 1))
                attempts += 1
                try:
                    response = await client.post(
                        url,
                        json=push_body(job),
                        headers={"Idempotency-Key": f"dongne-push-{job.job_id}"},
                    )
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"[:200]
                    continue
                if 200 <= response.status_code < 300:
                    self.sent += 1
                    self._record(job, "sent", attempts, None)
                    return
                error = f"HTTP {response.status_code}"
            self.failed += 1
            log.warning("push job %d to %s failed after %d attempts: %s", job.job_id, job.user_id, attempts, error)
            self._record(job, "failed", attempts, error)
