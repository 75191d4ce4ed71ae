"""Writes to SQL: the statements of one group commit, built on the event loop, run on the writer thread."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

import msgpack

from ..core.effects import (
    AppendAudit,
    AppendEvent,
    DeleteIpBlock,
    EnqueuePush,
    SaveAnswer,
    SaveEscalation,
    SaveIpBlock,
    SaveNotified,
    SavePushStatus,
    SaveQuestion,
    SaveReport,
    SaveUser,
    Write,
)
from ..core.records import Answer, IpBlock, PushJob, Question, Report, User
from ._rows import ANSWER_COLS, QUESTION_COLS, REPORT_COLS, USER_COLS, answer_row, question_row, report_row, user_row

__all__ = ["MAX_ROWS_PER_STATEMENT", "PreparedCommit", "prepare_writes"]


#: The most rows in one multi-row INSERT (a power of two); see PreparedCommit.insert.
MAX_ROWS_PER_STATEMENT = 256


class PreparedCommit:
    """The statements of one transaction, built by :meth:`Store.prepare`.

    Args:
        max_variables: SQLite's limit on ``?`` parameters in one statement.
    """

    def __init__(self, max_variables: int) -> None:
        self._max_variables = max_variables
        self.statements: list[tuple[str, list[Any], bool]] = []  # (sql, params, executemany?)
        self.rows = 0

    def insert(self, head: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """``head VALUES (...), (...), ...``: a few statements, each of a power-of-two number of rows.

        The sqlite3 module keeps the last 128 distinct statements compiled,
        per connection, and a compiled statement grows with its rows (50
        rows of an inbox event: 28 KiB; 500: 325 KiB). One statement per row
        count would fill that cache with every count seen (measured: +1.3 MB
        for commits of 1-60 events, +14 MB for 1-400). Powers of two up to
        ``MAX_ROWS_PER_STATEMENT`` keep it to 9 statements per table; 1,000
        rows take 7 statements instead of 1.
        """
        if not rows:
            return
        width = len(rows[0])
        largest = min(MAX_ROWS_PER_STATEMENT, max(1, self._max_variables // width))
        largest = 1 << (largest.bit_length() - 1)
        one = "(" + ",".join("?" * width) + ")"
        start = 0
        while start < len(rows):
            size = min(largest, 1 << ((len(rows) - start).bit_length() - 1))
            part = rows[start : start + size]
            self.statements.append((f"{head} VALUES {','.join([one] * size)}", list(chain.from_iterable(part)), False))
            start += size
        self.rows += len(rows)

    def many(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """One statement run per row (for UPDATEs)."""
        self.statements.append((sql, list(rows), True))
        self.rows += len(rows)


def prepare_writes(writes: Sequence[Write], max_variables: int) -> PreparedCommit:
    """Turn writes into the statements of one transaction; pure Python, no I/O.

    Saves of the same row collapse to the last one; inbox appends are all
    kept. Rows are packed into multi-row ``INSERT ... VALUES`` statements
    so that a commit is a handful of SQLite calls whatever its size. That
    matters because the commit runs on a worker thread: the sqlite3 module
    releases the GIL around every step, and ``executemany`` steps once per
    row, so while the event loop is busy each row waited for the GIL
    (an order of magnitude slower than one statement). The committer runs this part on
    the event loop, where it would hold the GIL anyway.
    """
    users: dict[str, User] = {}
    questions: dict[str, Question] = {}
    answers: dict[str, Answer] = {}
    events: list[AppendEvent] = []
    escalations: dict[str, SaveEscalation] = {}
    notified: list[tuple[Any, ...]] = []
    pushes: list[PushJob] = []
    push_status: dict[int, SavePushStatus] = {}
    audit: list[AppendAudit] = []
    reports: dict[str, Report] = {}
    ip_blocks: dict[str, IpBlock | None] = {}  # None: deleted
    for item in writes:
        if isinstance(item, AppendEvent):
            events.append(item)
        elif isinstance(item, SaveNotified):
            notified.extend(
                (item.question_id, uid, stage, dist, int(online), item.at) for uid, stage, dist, online in item.targets
            )
        elif isinstance(item, SaveUser):
            users[item.user.user_id] = item.user
        elif isinstance(item, SaveQuestion):
            questions[item.question.question_id] = item.question
        elif isinstance(item, SaveAnswer):
            answers[item.answer.answer_id] = item.answer
        elif isinstance(item, SaveEscalation):
            escalations[item.question_id] = item
        elif isinstance(item, EnqueuePush):
            pushes.append(item.job)
        elif isinstance(item, SavePushStatus):
            push_status[item.job_id] = item
        elif isinstance(item, AppendAudit):
            audit.append(item)
        elif isinstance(item, SaveReport):
            reports[item.report.report_id] = item.report
        elif isinstance(item, SaveIpBlock):
            ip_blocks[item.block.cidr] = item.block
        elif isinstance(item, DeleteIpBlock):
            ip_blocks[item.cidr] = None
        else:  # pragma: no cover - a new write type without a case here
            raise TypeError(f"unknown write {item!r}")
    batch = PreparedCommit(max_variables)
    batch.insert(f"INSERT OR REPLACE INTO users ({USER_COLS})", [user_row(u) for u in users.values()])
    batch.insert(f"INSERT OR REPLACE INTO questions ({QUESTION_COLS})", [question_row(q) for q in questions.values()])
    batch.insert(
        "INSERT OR IGNORE INTO question_hashtags (question_id, tag, created_at)",
        [(q.question_id, tag, q.created_at) for q in questions.values() for tag in q.hashtags],
    )
    batch.insert(f"INSERT OR REPLACE INTO answers ({ANSWER_COLS})", [answer_row(a) for a in answers.values()])
    packb = msgpack.packb
    batch.insert(
        "INSERT INTO events (user_id, seq, type, data, created_at)",
        [(e.user_id, e.seq, e.type, e.packed or packb(e.data), e.created_at) for e in events],
    )
    batch.insert(
        "INSERT OR REPLACE INTO escalations (question_id, next_stage, updated_at)",
        [(e.question_id, e.next_stage, e.updated_at) for e in escalations.values()],
    )
    batch.insert("INSERT OR IGNORE INTO notified (question_id, user_id, stage, distance_m, online, at)", notified)
    batch.insert(
        "INSERT INTO push_outbox (job_id, user_id, kind, urgent, payload, status, attempts, last_error,"
        " created_at, updated_at)",
        [
            (j.job_id, j.user_id, j.kind, int(j.urgent), packb(j.payload), j.status, j.attempts, None,
             j.created_at, j.created_at)
            for j in pushes
        ],
    )  # fmt: skip
    # A resolution updates the report's row (report ids are never reused);
    # the engine keeps one open report per user and item (reports_open_once).
    if reports:
        batch.many(
            f"INSERT INTO reports ({REPORT_COLS}) VALUES ({', '.join('?' * 12)})"
            " ON CONFLICT (report_id) DO UPDATE SET status = excluded.status, resolved_by = excluded.resolved_by,"
            " resolved_at = excluded.resolved_at, action = excluded.action",
            [report_row(r) for r in reports.values()],
        )
    for cidr, block in ip_blocks.items():
        if block is None:
            batch.many("DELETE FROM ip_blocks WHERE cidr = ?", [(cidr,)])
        else:
            batch.many(
                "INSERT OR REPLACE INTO ip_blocks (cidr, until, reason, admin_id, created_at) VALUES (?, ?, ?, ?, ?)",
                [(block.cidr, block.until, block.reason, block.admin_id, block.created_at)],
            )
    batch.insert(
        "INSERT INTO audit_log (at, admin_id, action, target, reason)",
        [(a.at, a.admin_id, a.action, a.target, a.reason) for a in audit],
    )
    if push_status:
        batch.many(
            "UPDATE push_outbox SET status = ?, attempts = ?, last_error = ?, updated_at = ? WHERE job_id = ?",
            [(p.status, p.attempts, p.last_error, p.at, p.job_id) for p in push_status.values()],
        )
    return batch
