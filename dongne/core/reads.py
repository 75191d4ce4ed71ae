"""What the engine asks the store to read for a list or a page: small frozen queries.

A read operation that needs the database returns one of these in
``Outcome.read``; the driver runs it on the store's reader (a worker thread)
and hands the rows back in a ``ReadDone`` event, and the engine builds the
reply. Every query asks for one row more than the page (``limit + 1``), so
the engine knows whether there is a next page. Positions are
``(created_at, id)`` pairs (or a seq): the lists are ordered by them.
"""

from __future__ import annotations

import attrs

__all__ = [
    "AnswerHome",
    "AnswersOfAuthor",
    "AuditPage",
    "AuthorStats",
    "Browse",
    "ModerationItem",
    "Notifications",
    "QuestionPage",
    "QuestionsOfAsker",
    "Read",
    "ReportsPage",
]

Position = tuple[int, str]


@attrs.frozen
class QuestionPage:
    """A question (``None`` if there is none, or it was deleted) and its answers after ``after``, oldest first."""

    question_id: str
    after: Position | None
    limit: int


@attrs.frozen
class QuestionsOfAsker:
    """An asker's questions before ``before``, newest first, each with its unread answers.

    ``statuses``: only these (``None``: all); ``answered``: only those with an answer.
    """

    user_id: str
    statuses: tuple[str, ...] | None
    answered: bool
    before: Position | None
    limit: int


@attrs.frozen
class AnswersOfAuthor:
    """An author's answers before ``before``, newest first, each with its question's title and status."""

    user_id: str
    before: Position | None
    limit: int


@attrs.frozen
class Browse:
    """Questions before ``before``, newest first, in a region and/or under a hashtag; ``open_only``."""

    region: str | None
    hashtag: str | None
    open_only: bool
    before: Position | None
    limit: int


@attrs.frozen
class AuthorStats:
    """How many answers a user gave (not deleted) and how many were accepted."""

    user_id: str


@attrs.frozen
class Notifications:
    """A user's durable events with ``seq < before_seq``, newest first, of ``types`` (``None``: all)."""

    user_id: str
    before_seq: int | None
    types: tuple[str, ...] | None
    limit: int


@attrs.frozen
class AnswerHome:
    """The question an answer belongs to, with its answers (to bring it into memory)."""

    answer_id: str


@attrs.frozen
class AuditPage:
    """Admin actions with ids below ``before_id``, newest first."""

    before_id: int | None
    limit: int


@attrs.frozen
class ReportsPage:
    """Reports (``status``: open, resolved or ``None`` for all) before ``before``, newest first, with the reported text."""

    status: str | None
    before: Position | None
    limit: int


@attrs.frozen
class ModerationItem:
    """A question (``kind`` question) or an answer's question (``kind`` answer) with all its answers, hidden ones too."""

    kind: str
    item_id: str


Read = (
    QuestionPage
    | QuestionsOfAsker
    | AnswersOfAuthor
    | Browse
    | AuthorStats
    | Notifications
    | AnswerHome
    | AuditPage
    | ReportsPage
    | ModerationItem
)
