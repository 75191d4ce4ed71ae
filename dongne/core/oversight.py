"""Oversight: answer-time SLOs, slow-response alerts to admins, and what the dashboard shows.

A question still unanswered ``slow_response_s`` after it was asked raises one
``slow_response_alert``: a durable event to every admin, a job for the alert
webhook, and a line in the dashboard's recent alerts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import attrs

from .connections import Call
from .deadlines import Deadlines
from .effects import Alert, Observe, Outcome, OutcomeBuilder, SaveQuestion
from .errors import ProtocolError
from .inbox import Inbox
from .lifecycle import ACTIVE, QuestionStatus
from .neighbourhood import Neighbourhood
from .protocol import event
from .records import Question, User
from .settings import AlertSettings
from .slo import SloTracker

__all__ = ["OPEN_LISTED", "Oversight"]

#: The dashboard lists this many open questions, the newest; its counts (``open_questions``,
#: ``open_by_region``) are over all of them.
OPEN_LISTED = 200


class Oversight:
    """SLOs, slow-response alerts and the admin views.

    Args:
        settings: the ``[alerts]`` settings.
        deadlines: the engine's deadline heap (alerts fall due there).
        inbox: where admins' alerts go.
        where: positions and escalation progress (for the views).
        questions: every question in memory (shared with the engine).
        counts: the engine's live counts (connections, users online, ...).
    """

    def __init__(
        self,
        settings: AlertSettings,
        deadlines: Deadlines,
        inbox: Inbox,
        where: Neighbourhood,
        questions: dict[str, Question],
        counts: Callable[[], dict[str, int]],
    ) -> None:
        self._settings = settings
        self._deadlines = deadlines
        self._inbox = inbox
        self._where = where
        self._questions = questions
        self._counts = counts
        self.slo = SloTracker(settings.slo_window_days)
        #: Whether this node raises slow-response alerts: always alone. With several nodes every node
        #: holding an unanswered question owes it its alert, and admins would get one from each: only
        #: the escalation lease's holder raises them (the driver says which node it is). The holder has
        #: every active question (each one reaches every node), and a node taking the lease over
        #: reloads, which makes the overdue ones due at once.
        self.raises_alerts = True
        self.recent_alerts: deque[dict[str, Any]] = deque(maxlen=50)
        self.admins: set[str] = set()

    def forget_durable(self) -> None:
        """Drop what is rebuilt from stored records (after a failed commit); recent alerts stay."""
        self.slo = SloTracker(self._settings.slo_window_days)
        self.admins.clear()

    def admin_conns(self, user_conns: dict[str, set[int]]) -> list[int]:
        return [c for admin in sorted(self.admins) for c in sorted(user_conns.get(admin, ()))]

    # ---- who is an admin -----------------------------------------------------------

    def role_is(self, user: User) -> None:
        """Keep the admin list in step with a user's role."""
        if user.role == "admin":
            self.admins.add(user.user_id)
        else:
            self.admins.discard(user.user_id)

    # ---- questions -------------------------------------------------------------------

    def asked(self, question: Question) -> None:
        """Track a question's answer time, and owe it an alert if it goes unanswered."""
        self.track(question)
        self.unanswered(question)

    def track(self, question: Question) -> None:
        """Track (or track again, with its first answer) a question's answer time: one of this node's, or
        one another node asked or answered (the SLO counts every node's questions, as after a restart)."""
        self.slo.asked(
            question.question_id,
            question.created_at,
            question.region,
            question.urgency == "urgent",
            question.first_answer_at,
        )

    def withdrawn(self, question_id: str) -> None:
        """A question deleted or hidden leaves the answer-time SLO."""
        self.slo.forget(question_id)

    def unanswered(self, question: Question) -> None:
        """Owe the question its alert while it is open without answers (asked, or its last answer taken
        down: then at once if overdue)."""
        if self._awaits_alert(question):
            due = question.created_at + int(self._settings.slow_response_s * 1000)
            self._deadlines.add(due, "slow_response", question.question_id)

    def first_answer(self, question: Question, now: int, out: OutcomeBuilder) -> None:
        self.slo.answered(question.question_id, now)
        out.act(Observe("time_to_first_answer", question.created_at, question.region or ""))

    def _awaits_alert(self, question: Question) -> bool:
        return question.status == QuestionStatus.OPEN and question.answer_count == 0 and question.alerted_at is None

    def alert_due(self, question_id: str, now: int, out: OutcomeBuilder) -> None:
        """A slow-response deadline fell due: raise the alert if the question still has no answer."""
        question = self._questions.get(question_id)
        if question is None or not self._awaits_alert(question) or not self.raises_alerts:
            return  # with several nodes, the escalation lease's holder raises it (see raises_alerts)
        question.alerted_at = now
        out.write(SaveQuestion(attrs.evolve(question)))
        data = {
            "question_id": question_id,
            "question": self._where.brief(question),
            "age_s": round((now - question.created_at) / 1000, 1),
            "threshold_s": self._settings.slow_response_s,
            "stage": self._where.stage_reached(question_id),
            "notified": self._where.alerted_count(question_id),
            "raised_at": now,
        }
        self.recent_alerts.appendleft(data)
        out.note("slow_response_alert", question_id=question_id, region=question.region, admins=len(self.admins))
        for admin_id in sorted(self.admins):
            self._inbox.append(admin_id, "slow_response_alert", data, now, out)
        self._inbox.enqueue_push("", "slow_response_alert", question, data, now, out)

    # ---- views -------------------------------------------------------------------------

    def metrics_op(self, call: Call) -> dict[str, Any]:
        """The ``metrics`` operation (admins only)."""
        if call.user.role != "admin":
            raise ProtocolError("forbidden", "metrics is an admin operation")
        return self.metrics(call.now)

    def storage_alert(self, state: str, error: str | None, now: int, user_conns: dict[str, set[int]]) -> Outcome:
        """Writes to the database started failing, or work again: every admin's connections, and the webhook."""
        out = OutcomeBuilder()
        data = {"state": state, "error": error, "at": now}
        out.send(self.admin_conns(user_conns), event("storage_alert", data))
        out.act(Alert("storage_alert", data))
        return out.build()

    def metrics(self, now: int) -> dict[str, Any]:
        """The ``metrics`` operation's reply."""
        return {"slo": self.slo.snapshot(now), "recent_alerts": list(self.recent_alerts)[:10], **self._counts()}

    def overview(self, now: int) -> dict[str, Any]:
        """What the admin dashboard shows: open questions, per-region SLO and locals, alerts."""
        where = self._where
        open_questions = [
            {
                **where.brief(q),
                "age_s": round((now - q.created_at) / 1000, 1),
                "stage": where.stage_reached(q.question_id),
                "answer_count": q.answer_count,
                "status": q.status.value,
                "alerted": q.alerted_at is not None,
            }
            for q in sorted((q for q in self._questions.values() if q.status in ACTIVE), key=lambda q: q.created_at)
        ]
        by_region = where.online_locals_by_region()
        open_by_region: dict[str, int] = {}
        for q in open_questions:
            if q["region"]:
                open_by_region[q["region"]] = open_by_region.get(q["region"], 0) + 1
        return {
            "now": now,
            **self._counts(),
            "locals_by_region": by_region,
            "open_by_region": open_by_region,
            "slo": self.slo.snapshot(now),
            "open": open_questions[-OPEN_LISTED:],
            "alerts": list(self.recent_alerts)[:20],
            "hotspots": where.hotspots.snapshot(now, by_region, 10),
        }
