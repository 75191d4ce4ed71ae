"""Records: the durable facts of the system, as small values.

The engine keeps these in memory and hands copies of them to the store in
write effects; ``to_wire`` gives the snake_case map that clients see.
"""

from __future__ import annotations

from typing import Any

import attrs

from .lifecycle import QuestionStatus

__all__ = [
    "Answer",
    "Claims",
    "EscalationProgress",
    "IpBlock",
    "LoadedState",
    "PushJob",
    "Question",
    "ReceiptState",
    "Report",
    "User",
    "stopped_for_good",
    "stored_progress",
]


class ReceiptState:
    SENT = "sent"
    DELIVERED = "delivered"
    READ = "read"


@attrs.frozen
class Claims:
    """What a valid token says about its holder."""

    user_id: str
    nick: str
    local: bool
    tags: tuple[str, ...]
    role: str  # "user" | "admin"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@attrs.define
class User:
    user_id: str
    nick: str
    local: bool = False
    tags: tuple[str, ...] = ()
    role: str = "user"
    points: int = 0
    last_seq: int = 0
    created_at: int = 0
    # Notification settings (see core.escalation.NotificationSettings) and
    # the home position used to reach a local who is offline.
    immediate_alerts: bool = True
    quiet_hours: tuple[int, int] | None = None
    max_alerts_per_hour: int = 20
    home: tuple[float, float] | None = None
    read_seq: int = 0  # durable events up to this seq are marked read
    banned_until: int | None = None  # ms; None: not banned
    ban_reason: str | None = None

    def banned_at(self, now: int) -> bool:
        return self.banned_until is not None and now < self.banned_until

    def to_wire(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "nick": self.nick,
            "local": self.local,
            "tags": list(self.tags),
            "role": self.role,
            "points": self.points,
        }

    def settings_wire(self) -> dict[str, Any]:
        return {
            "immediate_alerts": self.immediate_alerts,
            "quiet_hours": list(self.quiet_hours) if self.quiet_hours else None,
            "max_alerts_per_hour": self.max_alerts_per_hour,
            "home": {"lat": self.home[0], "lng": self.home[1]} if self.home else None,
        }


@attrs.define
class Question:
    question_id: str
    asker_id: str
    asker_nick: str
    title: str
    body: str
    lat: float
    lng: float
    region: str | None
    hashtags: tuple[str, ...]
    urgency: str
    created_at: int
    status: QuestionStatus = QuestionStatus.OPEN
    accepted_answer_id: str | None = None
    answer_count: int = 0
    first_answer_at: int | None = None
    closed_at: int | None = None
    alerted_at: int | None = None  # when its slow-response alert fired
    deleted_at: int | None = None  # soft-deleted by its asker (or hidden)
    hidden: bool = False  # hidden by moderation (deleted_at set too)

    def to_wire(self) -> dict[str, Any]:
        return {
            "question_id": self.question_id,
            "asker_id": self.asker_id,
            "asker_nick": self.asker_nick,
            "title": self.title,
            "body": self.body,
            "location": {"lat": self.lat, "lng": self.lng},
            "region": self.region,
            "hashtags": list(self.hashtags),
            "urgency": self.urgency,
            "status": self.status.value,
            "created_at": self.created_at,
            "accepted_answer_id": self.accepted_answer_id,
            "answer_count": self.answer_count,
            "first_answer_at": self.first_answer_at,
            "closed_at": self.closed_at,
        }


@attrs.define
class Answer:
    answer_id: str
    question_id: str
    author_id: str
    author_nick: str
    content: str
    created_at: int
    state: str = ReceiptState.SENT
    delivered_at: int | None = None
    read_at: int | None = None
    accepted: bool = False
    deleted_at: int | None = None
    hidden: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "answer_id": self.answer_id,
            "question_id": self.question_id,
            "author_id": self.author_id,
            "author_nick": self.author_nick,
            "content": self.content,
            "created_at": self.created_at,
            "state": self.state,
            "accepted": self.accepted,
        }


@attrs.define
class Report:
    """A user's report of a question or an answer, and how an admin resolved it."""

    report_id: str
    item_kind: str  # "question" | "answer"
    item_id: str
    question_id: str
    reporter_id: str
    reason: str  # spam | abuse | wrong | other
    note: str
    created_at: int
    status: str = "open"  # open | resolved
    resolved_by: str | None = None
    resolved_at: int | None = None
    action: str | None = None  # dismiss | hide | ban


@attrs.frozen
class IpBlock:
    """An address or network an admin blocked at run time (besides ``[limits] ip_blocklist``)."""

    cidr: str
    until: int | None
    reason: str
    admin_id: str
    created_at: int

    def active(self, now: int) -> bool:
        return self.until is None or now < self.until


@attrs.frozen
class PushJob:
    """A notification for a user who is offline, for the push gateway."""

    job_id: int
    user_id: str
    kind: str
    urgent: bool
    payload: dict[str, Any]
    created_at: int
    attempts: int = 0
    status: str = "pending"  # pending | sent | failed | expired | cancelled | unsent
    question_id: str = ""  # the question it is about (every kind is about one)
    answer_id: str = ""  # the answer it carries, if any


def stopped_for_good(stages_run: int) -> int:
    """What the store keeps as ``next_stage`` for an escalation stopped for good (its asker banned, the question
    hidden) after ``stages_run`` stages: ``-1 - stages_run``.

    Below zero whatever the plan: a count of stages run (what an escalation not stopped keeps) is read against
    the plan in force, so a plan made longer would take up again one stored as "every stage run". The count
    is kept for the stage a slow-response alert reports (:func:`stored_progress` reads both back).
    """
    return -1 - stages_run


def stored_progress(next_stage: int) -> tuple[int, bool]:
    """``(stages run, stopped for good)`` of a stored ``next_stage`` (:func:`stopped_for_good`). Rows written
    before the mark existed are never below zero: read as they always were."""
    return (-1 - next_stage, True) if next_stage < 0 else (next_stage, False)


@attrs.frozen
class EscalationProgress:
    """A question's escalation as the store holds it: the stages already run and who was alerted when."""

    next_stage: int  # as stored: below zero for one stopped for good (stored_progress)
    notified: tuple[tuple[str, int], ...] = ()  # (user id, at)
    # How many were alerted in each stage (by name): a stage delivered in batches and cut short (a restart,
    # a reload) is planned again for what its limit leaves.
    per_stage: dict[str, int] = attrs.Factory(dict)


@attrs.frozen
class LoadedState:
    """What the store hands the engine at start-up."""

    users: list[User]
    questions: list[Question]
    answers: list[Answer]
    escalations: dict[str, int] = attrs.Factory(dict)  # question id -> next_stage as stored (stored_progress)
    notified: list[tuple[str, str, int]] = attrs.Factory(list)  # (question id, user id, at)
    notified_per_stage: dict[str, dict[str, int]] = attrs.Factory(dict)  # question id -> stage -> alerts
    pending_pushes: list[PushJob] = attrs.Factory(list)
    last_push_job_id: int = 0
    oldest_seqs: dict[str, int] = attrs.Factory(dict)  # user id -> oldest durable event kept
    open_reports: list[Report] = attrs.Factory(list)
    ip_blocks: list[IpBlock] = attrs.Factory(list)
    # Answers still ``sent`` to expired questions of the hot set, which memory does not hold:
    # (asker id, question id, answer id, author id); delivered at their asker's next hello.
    undelivered: list[tuple[str, str, str, str]] = attrs.Factory(list)
