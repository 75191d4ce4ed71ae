"""Records to rows and back: the column lists and the mapping of each table the store reads whole."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import msgpack

from ..core.lifecycle import QuestionStatus
from ..core.records import Answer, PushJob, Question, Report, User

__all__ = [
    "ANSWER_COLS",
    "PUSH_COLS",
    "QUESTION_COLS",
    "REPORT_COLS",
    "USER_COLS",
    "answer_from",
    "answer_row",
    "push_from",
    "question_from",
    "question_row",
    "report_from",
    "report_row",
    "user_from",
    "user_row",
]

USER_COLS = (
    "user_id, nick, local, tags, role, points, last_seq, created_at,"
    " immediate_alerts, quiet_start, quiet_end, max_alerts_per_hour, home_lat, home_lng, read_seq,"
    " banned_until, ban_reason"
)
QUESTION_COLS = (
    "question_id, asker_id, asker_nick, title, body, lat, lng, region, hashtags, urgency, status,"
    " created_at, accepted_answer_id, answer_count, first_answer_at, closed_at, alerted_at, deleted_at, hidden"
)
ANSWER_COLS = (
    "answer_id, question_id, author_id, author_nick, content, created_at, state, delivered_at, read_at, accepted,"
    " deleted_at, hidden"
)


def user_row(u: User) -> tuple[Any, ...]:
    quiet = u.quiet_hours or (None, None)
    home = u.home or (None, None)
    return (
        u.user_id, u.nick, int(u.local), json.dumps(list(u.tags)), u.role, u.points, u.last_seq, u.created_at,
        int(u.immediate_alerts), quiet[0], quiet[1], u.max_alerts_per_hour, home[0], home[1], u.read_seq,
        u.banned_until, u.ban_reason,
    )  # fmt: skip


def user_from(r: Sequence[Any]) -> User:
    return User(
        r[0], r[1], bool(r[2]), tuple(json.loads(r[3])), r[4], r[5], r[6], r[7],
        immediate_alerts=bool(r[8]),
        quiet_hours=(r[9], r[10]) if r[9] is not None else None,
        max_alerts_per_hour=r[11],
        home=(r[12], r[13]) if r[12] is not None else None,
        read_seq=r[14], banned_until=r[15], ban_reason=r[16],
    )  # fmt: skip


#: The columns ``push_from`` reads, in its order.
PUSH_COLS = "job_id, user_id, kind, urgent, payload, created_at, attempts, status, question_id, answer_id"


def push_from(r: Sequence[Any]) -> PushJob:
    return PushJob(
        job_id=r[0], user_id=r[1], kind=r[2], urgent=bool(r[3]), payload=msgpack.unpackb(r[4], raw=False),
        created_at=r[5], attempts=r[6], status=r[7], question_id=r[8], answer_id=r[9],
    )  # fmt: skip


def question_row(q: Question) -> tuple[Any, ...]:
    return (
        q.question_id, q.asker_id, q.asker_nick, q.title, q.body, q.lat, q.lng, q.region,
        json.dumps(list(q.hashtags), ensure_ascii=False), q.urgency, q.status.value, q.created_at,
        q.accepted_answer_id, q.answer_count, q.first_answer_at, q.closed_at, q.alerted_at, q.deleted_at,
        int(q.hidden),
    )  # fmt: skip


def question_from(r: Sequence[Any]) -> Question:
    return Question(
        question_id=r[0], asker_id=r[1], asker_nick=r[2], title=r[3], body=r[4], lat=r[5], lng=r[6],
        region=r[7], hashtags=tuple(json.loads(r[8])), urgency=r[9], status=QuestionStatus(r[10]),
        created_at=r[11], accepted_answer_id=r[12], answer_count=r[13], first_answer_at=r[14], closed_at=r[15],
        alerted_at=r[16], deleted_at=r[17], hidden=bool(r[18]),
    )  # fmt: skip


def answer_row(a: Answer) -> tuple[Any, ...]:
    return (
        a.answer_id, a.question_id, a.author_id, a.author_nick, a.content, a.created_at, a.state,
        a.delivered_at, a.read_at, int(a.accepted), a.deleted_at, int(a.hidden),
    )  # fmt: skip


def answer_from(r: Sequence[Any]) -> Answer:
    return Answer(
        r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], bool(r[9]), deleted_at=r[10], hidden=bool(r[11])
    )


REPORT_COLS = (
    "report_id, item_kind, item_id, question_id, reporter_id, reason, note, created_at, status, resolved_by,"
    " resolved_at, action"
)


def report_row(r: Report) -> tuple[Any, ...]:
    return (
        r.report_id, r.item_kind, r.item_id, r.question_id, r.reporter_id, r.reason, r.note, r.created_at,
        r.status, r.resolved_by, r.resolved_at, r.action,
    )  # fmt: skip


def report_from(r: Sequence[Any]) -> Report:
    return Report(*r)
