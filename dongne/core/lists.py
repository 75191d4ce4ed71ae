"""The read paths: pages and lists an app's screens show, without joining rooms.

``get_question``, ``my_questions``, ``my_answers``, ``browse_questions``,
``get_user`` and ``list_notifications``. What memory holds (a question that
is open or recent) is answered at once; the rest is a query for the store
(``core.reads``): the handler returns ``Pending(read, finish)``, the driver
runs the read and ``finish`` turns its rows into the reply. Lists are newest
first (a question's answers oldest first) and paged by opaque cursors
(``core.cursors``) bound to the list and its owner.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from .connections import Call
from .cursors import CursorCodec
from .errors import ProtocolError
from .inbox import DURABLE_EVENTS
from .protocol import HASHTAG, Fields
from .reads import (
    AnswersOfAuthor,
    AuthorStats,
    Browse,
    Notifications,
    QuestionPage,
    QuestionsOfAsker,
    Read,
)
from .records import Answer, Question, User

__all__ = ["READ_OPS", "RETRY", "Lists", "Pending", "Retry"]

#: The read operations (they draw from the ``read`` rate bucket, and never need a question in memory).
READ_OPS = frozenset(
    {"get_question", "my_questions", "my_answers", "browse_questions", "get_user", "list_notifications"}
)

#: my_questions' ``status`` filter -> the statuses it lists (``None``: all) and whether only answered ones.
_MINE: dict[str, tuple[tuple[str, ...] | None, bool]] = {
    "all": (None, False),
    "open": (("open", "answered"), False),
    "answered": (None, True),
    "closed": (("resolved", "closed", "expired"), False),
}


@attrs.frozen
class Pending:
    """A reply that needs the store: run ``read``, then ``finish(rows)`` is the reply's data.

    ``finish`` may instead return a ``Retry``: the operation then runs
    again, with ``Call.retried`` set and the retry's ``found`` as
    ``Call.found`` (``RETRY`` when what was read went into memory).
    """

    read: Read
    finish: Callable[[Any], dict[str, Any] | Retry]


@attrs.frozen
class Retry:
    """Run the operation again with ``found``: what was read, kept with its own request (not in the engine,
    where a request that ends another way would leave it behind for the next one)."""

    found: Any = None


RETRY = Retry()


class Lists:
    """The read operations.

    Args:
        cursors: signs and checks page cursors.
        users, questions, answers: the engine's records (shared).
        answer_wire: an answer as the wire shows it (with its author's standing).
        region_names: the service regions ``browse_questions`` accepts.
    """

    def __init__(
        self,
        cursors: CursorCodec,
        *,
        users: dict[str, User],
        questions: dict[str, Question],
        answers: dict[str, dict[str, Answer]],
        answer_wire: Callable[[Answer], dict[str, Any]],
        unread: Callable[[User], int],
        region_names: frozenset[str] | None,
    ) -> None:
        self._cursors = cursors
        self._unread = unread
        self._users = users
        self._questions = questions
        self._answers = answers
        self._answer_wire = answer_wire
        self._regions = region_names

    def operations(self) -> dict[str, Callable[[Call], dict[str, Any] | Pending]]:
        return {
            "get_question": self.get_question,
            "my_questions": self.my_questions,
            "my_answers": self.my_answers,
            "browse_questions": self.browse_questions,
            "get_user": self.get_user,
            "list_notifications": self.list_notifications,
        }

    # ---- paging ------------------------------------------------------------------

    def _position(self, f: Fields, field: str, kind: str, scope: str) -> tuple[int, str] | None:
        if not f.has(field):
            return None
        created_at, ident = self._cursors.decode(kind, scope, f.raw(field), field)
        if not isinstance(created_at, int) or not isinstance(ident, str):
            raise ProtocolError("invalid_field", f"'{field}' is not a valid cursor")
        return created_at, ident

    def _next(
        self, kind: str, scope: str, rows: list[Any], limit: int, key: Callable[[Any], tuple[int, str]]
    ) -> str | None:
        return self._cursors.encode(kind, scope, key(rows[limit - 1])) if len(rows) > limit else None

    # ---- operations --------------------------------------------------------------

    def get_question(self, call: Call) -> dict[str, Any] | Pending:
        f = call.f
        question_id = f.ident("question_id")
        limit = f.integer("limit", minimum=1, maximum=100, default=20)
        after = self._position(f, "answers_after", "answers", question_id)

        def reply(question: Question | None, answers: list[Answer]) -> dict[str, Any]:
            if question is None:
                raise ProtocolError("not_found", "no such question")
            return {
                "question": question.to_wire(),
                "answers": [self._answer_wire(a) for a in answers[:limit]],
                "next": self._next("answers", question_id, answers, limit, _answer_position),
            }

        question = self._questions.get(question_id)
        if question is not None:
            kept = sorted(self._answers.get(question_id, {}).values(), key=_answer_position)
            return reply(question, [a for a in kept if after is None or _answer_position(a) > after][: limit + 1])
        return Pending(QuestionPage(question_id, after, limit), lambda rows: reply(*rows))

    def my_questions(self, call: Call) -> Pending:
        f, user_id = call.f, call.user.user_id
        status = f.choice("status", tuple(_MINE), default="all")
        limit = f.integer("limit", minimum=1, maximum=100, default=20)
        scope = f"{user_id}:{status}"
        before = self._position(f, "before", "my_questions", scope)
        statuses, answered = _MINE[status]

        def reply(rows: list[tuple[Question, int]]) -> dict[str, Any]:
            return {
                "questions": [{**q.to_wire(), "unread_answers": unread} for q, unread in rows[:limit]],
                "next": self._next("my_questions", scope, rows, limit, lambda row: _question_position(row[0])),
            }

        return Pending(QuestionsOfAsker(user_id, statuses, answered, before, limit), reply)

    def my_answers(self, call: Call) -> Pending:
        f, user_id = call.f, call.user.user_id
        limit = f.integer("limit", minimum=1, maximum=100, default=20)
        before = self._position(f, "before", "my_answers", user_id)

        def reply(rows: list[tuple[Answer, str, str]]) -> dict[str, Any]:
            return {
                "answers": [
                    {**self._answer_wire(a), "question_title": title, "question_status": status}
                    for a, title, status in rows[:limit]
                ],
                "next": self._next("my_answers", user_id, rows, limit, lambda row: _answer_position(row[0])),
            }

        return Pending(AnswersOfAuthor(user_id, before, limit), reply)

    def browse_questions(self, call: Call) -> Pending:
        f = call.f
        region = f.string("region", max_len=64) if f.has("region") else None
        if region is not None and self._regions is not None and region not in self._regions:
            raise ProtocolError("invalid_field", f"'region' must be one of the service regions, not {region[:40]!r}")
        hashtag = None
        if f.has("hashtag"):
            hashtag = f.string("hashtag", max_len=31).lstrip("#").lower()
            if not HASHTAG.fullmatch(hashtag):
                raise ProtocolError("invalid_field", "'hashtag' must be 1-30 letters a-z, digits, '_' or Hangul")
        status = f.choice("status", ("open", "all"), default="open")
        limit = f.integer("limit", minimum=1, maximum=100, default=20)
        scope = f"{region or ''}#{hashtag or ''}:{status}"
        before = self._position(f, "before", "browse", scope)

        def reply(rows: list[Question]) -> dict[str, Any]:
            return {
                "questions": [q.to_wire() for q in rows[:limit]],
                "next": self._next("browse", scope, rows, limit, _question_position),
            }

        return Pending(Browse(region, hashtag, status == "open", before, limit), reply)

    def get_user(self, call: Call) -> Pending:
        user = self._users.get(call.f.ident("user_id"))
        if user is None:
            raise ProtocolError("not_found", "no such user")

        def reply(stats: tuple[int, int]) -> dict[str, Any]:
            given, accepted = stats
            return {
                "user": {
                    "user_id": user.user_id,
                    "nick": user.nick,
                    "local": user.local,
                    "tags": list(user.tags),
                    "points": user.points,
                    "answers_given": given,
                    "answers_accepted": accepted,
                    "member_since": user.created_at,
                }
            }

        return Pending(AuthorStats(user.user_id), reply)

    def list_notifications(self, call: Call) -> Pending:
        f, user = call.f, call.user
        before_seq = f.integer("before_seq", minimum=1, maximum=2**53, default=0) or None
        limit = f.integer("limit", minimum=1, maximum=100, default=30)
        types = f.ident_list("types", max_items=len(DURABLE_EVENTS))
        if types is not None:
            unknown = [t for t in types if t not in DURABLE_EVENTS]
            if unknown or not types:
                raise ProtocolError(
                    "invalid_field", f"'types' must name durable events: {', '.join(sorted(DURABLE_EVENTS))}"
                )

        def reply(rows: list[tuple[int, str, dict[str, Any], int]]) -> dict[str, Any]:
            return {
                "notifications": [
                    {"seq": seq, "type": kind, "data": data, "created_at": at, "read": seq <= user.read_seq}
                    for seq, kind, data, at in rows[:limit]
                ],
                "next_before_seq": rows[limit - 1][0] if len(rows) > limit else None,
                "unread": self._unread(user),
            }

        return Pending(
            Notifications(user.user_id, before_seq, tuple(sorted(set(types))) if types else None, limit), reply
        )


def _answer_position(answer: Answer) -> tuple[int, str]:
    return answer.created_at, answer.answer_id


def _question_position(question: Question) -> tuple[int, str]:
    return question.created_at, question.question_id
