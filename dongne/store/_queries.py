"""The read paths' queries: one indexed query a list (``core.reads``), run on the reader connection.

Each list is ordered by ``(created_at, id)`` (or ``seq``) and paged by a
position strictly before or after the last one seen, so a page costs an index
range scan of ``limit + 1`` rows whatever the history's size.
``tests/test_read_paths.py`` asserts each plan with ``EXPLAIN QUERY PLAN``.

The statements are written once for both backends, with ``?`` parameters
(the PostgreSQL store turns them into ``%s``). SQLite is told which index to
use (``INDEXED BY``, so that a plan never changes with the statistics);
PostgreSQL has no such hint: its indexes match these statements column for
column, and the same test checks its plans with ``EXPLAIN``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import msgpack

from ..core.inbox import CONTENT_EVENTS, removed, subject
from ..core.reads import (
    AnswerHome,
    AnswersOfAuthor,
    AuditPage,
    AuthorStats,
    Browse,
    ModerationItem,
    Notifications,
    QuestionPage,
    QuestionsOfAsker,
    Read,
    ReportsPage,
)
from ._rows import REPORT_COLS

__all__ = ["Dialect", "in_parts", "indexed_by", "plan", "run", "strip_removed", "taken_down"]


#: The one inbox type left out of ``events_by_user_type`` (the alerts: most rows, written in bulk).
UNINDEXED_TYPE = "new_question_notification"

ReadRows = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]
Dialect = Literal["sqlite", "postgres"]


def indexed_by(index: str, dialect: Dialect) -> str:
    """SQLite's hint to drive a table from ``index`` (``" INDEXED BY ..."``); nothing on PostgreSQL."""
    return f" INDEXED BY {index}" if dialect == "sqlite" else ""


def plan(
    query: Read, question_cols: str, answer_cols: str, dialect: Dialect = "sqlite"
) -> list[tuple[str, tuple[Any, ...]]]:
    """The SQL statements (with parameters) that answer ``query``, in order."""

    def by(index: str) -> str:
        return indexed_by(index, dialect)

    q_cols = ", ".join(f"q.{c.strip()}" for c in question_cols.split(","))
    a_cols = ", ".join(f"a.{c.strip()}" for c in answer_cols.split(","))
    if isinstance(query, QuestionPage):
        after = query.after or (-1, "")
        return [
            (
                f"SELECT {q_cols} FROM questions q WHERE q.question_id = ? AND q.deleted_at IS NULL",
                (query.question_id,),
            ),
            (
                f"SELECT {a_cols} FROM answers a WHERE a.question_id = ? AND a.deleted_at IS NULL"
                " AND (a.created_at, a.answer_id) > (?, ?) ORDER BY a.created_at, a.answer_id LIMIT ?",
                (query.question_id, after[0], after[1], query.limit + 1),
            ),
        ]
    if isinstance(query, QuestionsOfAsker):
        where = ["q.asker_id = ?", "q.deleted_at IS NULL"]
        params: list[Any] = [query.user_id]
        if query.statuses is not None:
            where.append(f"q.status IN ({', '.join('?' * len(query.statuses))})")
            params.extend(query.statuses)
        if query.answered:
            where.append("q.answer_count > 0")
        if query.before is not None:
            where.append("(q.created_at, q.question_id) < (?, ?)")
            params.extend(query.before)
        unread = (
            "(SELECT count(*) FROM answers a WHERE a.question_id = q.question_id"
            " AND a.deleted_at IS NULL AND a.state != 'read')"
        )
        return [
            (
                f"SELECT {q_cols}, {unread} FROM questions q{by('questions_by_asker')} WHERE {' AND '.join(where)}"
                " ORDER BY q.created_at DESC, q.question_id DESC LIMIT ?",
                (*params, query.limit + 1),
            )
        ]
    if isinstance(query, AnswersOfAuthor):
        # An answer to a question deleted (or hidden) since is gone from the list with its question.
        where = ["a.author_id = ?", "a.deleted_at IS NULL", "q.deleted_at IS NULL"]
        params = [query.user_id]
        if query.before is not None:
            where.append("(a.created_at, a.answer_id) < (?, ?)")
            params.extend(query.before)
        return [
            (
                f"SELECT {a_cols}, q.title, q.status FROM answers a{by('answers_by_author')}"
                f" JOIN questions q ON q.question_id = a.question_id WHERE {' AND '.join(where)}"
                " ORDER BY a.created_at DESC, a.answer_id DESC LIMIT ?",
                (*params, query.limit + 1),
            )
        ]
    if isinstance(query, Browse):
        # Open questions are few whatever the history: a browse of open ones
        # walks the open-only index (by region if given) and checks the
        # hashtag per question. Otherwise the hashtag's, the region's or the
        # whole list's index.
        where = ["q.deleted_at IS NULL"]
        params = []
        if query.open_only or query.hashtag is None:
            if query.open_only:
                index = "questions_open_by_region" if query.region is not None else "questions_open"
                where.append("q.status IN ('open', 'answered')")
            else:
                index = "questions_by_region" if query.region is not None else "questions_listed"
            source = f"questions q{by(index)}"
            order = "q.created_at DESC, q.question_id DESC"
            position = "(q.created_at, q.question_id) < (?, ?)"
            if query.hashtag is not None:
                where.append(
                    "EXISTS (SELECT 1 FROM question_hashtags h WHERE h.question_id = q.question_id AND h.tag = ?)"
                )
                params.append(query.hashtag)
        else:
            source = f"question_hashtags h{by('hashtags_by_tag')} JOIN questions q ON q.question_id = h.question_id"
            where.insert(0, "h.tag = ?")
            params.append(query.hashtag)
            order = "h.created_at DESC, h.question_id DESC"
            position = "(h.created_at, h.question_id) < (?, ?)"
        if query.region is not None:
            where.append("q.region = ?")
            params.append(query.region)
        if query.before is not None:
            where.append(position)
            params.extend(query.before)
        return [
            (
                f"SELECT {q_cols} FROM {source} WHERE {' AND '.join(where)} ORDER BY {order} LIMIT ?",
                (*params, query.limit + 1),
            )
        ]
    if isinstance(query, AuthorStats):
        return [
            (
                # Each answer's question by its key (a subplan per answer, not a scan of the questions).
                f"SELECT count(*), coalesce(sum(a.accepted), 0) FROM answers a{by('answers_by_author')}"
                " WHERE a.author_id = ? AND a.deleted_at IS NULL"
                " AND (SELECT q.deleted_at FROM questions q WHERE q.question_id = a.question_id) IS NULL",
                (query.user_id,),
            )
        ]
    if isinstance(query, Notifications):
        before = query.before_seq if query.before_seq is not None else 2**62
        if query.types is None:
            return [
                (
                    f"SELECT seq, type, data, created_at FROM events{by('events_by_user')}"
                    " WHERE user_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                    (query.user_id, before, query.limit + 1),
                )
            ]
        # One index range per type, merged: each is already in seq order.
        # Alerts are not in the per-type index (schema migration 8): theirs is
        # the user's whole range, filtered.
        return [
            (
                f"SELECT seq, type, data, created_at FROM events{by('events_by_user')}"
                " WHERE user_id = ? AND type = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                (query.user_id, kind, before, query.limit + 1),
            )
            if kind == UNINDEXED_TYPE
            else (
                f"SELECT seq, type, data, created_at FROM events{by('events_by_user_type')}"
                f" WHERE user_id = ? AND type = ? AND type <> '{UNINDEXED_TYPE}' AND seq < ? ORDER BY seq DESC LIMIT ?",
                (query.user_id, kind, before, query.limit + 1),
            )
            for kind in query.types
        ]
    if isinstance(query, ReportsPage):
        where, params = [], []
        if query.status is not None:
            where.append("r.status = ?")
            params.append(query.status)
        if query.before is not None:
            where.append("(r.created_at, r.report_id) < (?, ?)")
            params.extend(query.before)
        index = "reports_by_status" if query.status is not None else "reports_listed"
        newline = "char(10)" if dialect == "sqlite" else "chr(10)"
        text = (
            f"CASE r.item_kind WHEN 'question' THEN (SELECT q.title || {newline} || q.body FROM questions q"
            " WHERE q.question_id = r.item_id) ELSE (SELECT a.content FROM answers a WHERE a.answer_id = r.item_id) END"
        )
        author = (
            "CASE r.item_kind WHEN 'question' THEN (SELECT q.asker_id FROM questions q WHERE q.question_id = r.item_id)"
            " ELSE (SELECT a.author_id FROM answers a WHERE a.answer_id = r.item_id) END"
        )
        hidden = (
            "CASE r.item_kind WHEN 'question' THEN (SELECT q.hidden FROM questions q WHERE q.question_id = r.item_id)"
            " ELSE (SELECT a.hidden FROM answers a WHERE a.answer_id = r.item_id) END"
        )
        return [
            (
                f"SELECT {', '.join('r.' + c.strip() for c in REPORT_COLS.split(','))}, {text}, {author}, {hidden}"
                f" FROM reports r{by(index)}"
                f"{' WHERE ' + ' AND '.join(where) if where else ''}"
                " ORDER BY r.created_at DESC, r.report_id DESC LIMIT ?",
                (*params, query.limit + 1),
            )
        ]
    if isinstance(query, ModerationItem):
        if query.kind == "question":
            home = ("SELECT ?", (query.item_id,))
        else:
            home = ("SELECT question_id FROM answers WHERE answer_id = ?", (query.item_id,))
        return [
            home,
            (f"SELECT {q_cols} FROM questions q WHERE q.question_id = ({home[0]})", home[1]),
            (f"SELECT {a_cols} FROM answers a WHERE a.question_id = ({home[0]})", home[1]),
        ]
    if isinstance(query, AuditPage):
        return [
            (
                "SELECT id, at, admin_id, action, target, reason FROM audit_log WHERE id < ? ORDER BY id DESC LIMIT ?",
                (query.before_id if query.before_id is not None else 2**62, query.limit + 1),
            )
        ]
    if isinstance(query, AnswerHome):
        return [("SELECT question_id FROM answers WHERE answer_id = ? AND deleted_at IS NULL", (query.answer_id,))]
    raise TypeError(f"not a read: {query!r}")


def run(
    query: Read, read: ReadRows, question_cols: str, answer_cols: str, dialect: Dialect = "sqlite"
) -> list[list[tuple[Any, ...]]]:
    """Run ``query``'s statements; returns their rows (event data decoded)."""
    results = [read(sql, params) for sql, params in plan(query, question_cols, answer_cols, dialect)]
    if isinstance(query, Notifications):
        merged = sorted((row for rows in results for row in rows), key=lambda row: row[0], reverse=True)
        decoded = [
            (seq, kind, msgpack.unpackb(data, raw=False), at) for seq, kind, data, at in merged[: query.limit + 1]
        ]
        about = [subject(kind, data) for _seq, kind, data, _at in decoded]
        gone = taken_down(read, about)
        results = [
            [
                (seq, kind, removed(ids) if ids is not None and gone[i] else data, at)
                for i, ((seq, kind, data, at), ids) in enumerate(zip(decoded, about, strict=True))
            ]
        ]
    return results


def in_parts(ids: Sequence[str]) -> Iterator[tuple[Sequence[str], str]]:
    """``ids`` 500 at a time, each part with its ``?`` marks for ``IN (...)``: a statement's parameters stay
    under every backend's limit."""
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        yield part, ",".join("?" * len(part))


def taken_down(read: ReadRows, about: Sequence[tuple[str, str | None] | None]) -> list[bool]:
    """For each durable event's subject (``core.inbox.subject``), whether its question or its answer is
    deleted or hidden (hidden ones carry ``deleted_at`` too; an unhidden one is shown again). Two statements
    by primary key, 500 ids each, whatever the number of events: a page of the inbox, or a replay.
    """
    question_ids = sorted({ids[0] for ids in about if ids is not None})
    answer_ids = sorted({ids[1] for ids in about if ids is not None and ids[1] is not None})
    gone: set[tuple[str, str]] = set()
    for table, column, wanted in (("questions", "question_id", question_ids), ("answers", "answer_id", answer_ids)):
        for part, marks in in_parts(wanted):
            sql = f"SELECT {column} FROM {table} WHERE {column} IN ({marks}) AND deleted_at IS NOT NULL"
            gone.update((table, ident) for (ident,) in read(sql, part))
    return [
        ids is not None and (("questions", ids[0]) in gone or (ids[1] is not None and ("answers", ids[1]) in gone))
        for ids in about
    ]


def strip_removed(
    found: dict[str, list[tuple[int, str, bytes]]], read: ReadRows
) -> dict[str, list[tuple[int, str, bytes]]]:
    """Replayed events (``Storage.read_event_rows``) whose question or answer is taken down keep their seq and
    only its ids (``core.inbox.removed``); the others are left as stored, bytes for the splice."""
    rows = [(user_id, i, row) for user_id, user_rows in found.items() for i, row in enumerate(user_rows)]
    about = [
        subject(kind, msgpack.unpackb(data, raw=False)) if kind in CONTENT_EVENTS else None
        for _user, _i, (_seq, kind, data) in rows
    ]
    gone = taken_down(read, about)
    for (user_id, i, (seq, kind, _data)), ids, down in zip(rows, about, gone, strict=True):
        if down and ids is not None:
            found[user_id][i] = (seq, kind, msgpack.packb(removed(ids)))
    return found
