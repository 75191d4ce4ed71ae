"""What both SQL backends share: the reads, written once over a ``_read`` each backend provides.

Statements here use ``?`` parameters; the PostgreSQL store turns them into
``%s``. Lists the engine keeps in order (questions, a question's answers) are
read in ``(created_at, id)`` order, the order page cursors use: PostgreSQL
returns rows in no particular order without one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ..core.effects import Write
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
from ..core.records import Answer, EscalationProgress, IpBlock, LoadedState, PushJob, Question, User
from . import _queries
from ._queries import Dialect
from ._rows import (
    ANSWER_COLS,
    PUSH_COLS,
    QUESTION_COLS,
    REPORT_COLS,
    USER_COLS,
    answer_from,
    push_from,
    question_from,
    report_from,
    user_from,
)
from ._writes import PreparedCommit, SeqsGiven, prepare_writes

__all__ = ["SqlStore"]

# What ``SqlStore.load`` reads besides the users and the inbox heads, each with ``hot_since`` (ms) where it
# has a parameter (given once per ``?``). Each part is a search of an index (what is active, by status;
# what is recent, by time), never a scan of the whole history: with an OR of the two, SQLite read every
# question and every alert ever sent (``notified`` keeps one row per alert) at each start and reload.
# SQLite is told which index drives each part (``INDEXED BY``, as in ``_queries``: with statistics it
# would scan the questions for the joins); PostgreSQL takes no hints (:func:`statement_for`).
# ``tests/test_restart.py`` checks the plans on both backends.

#: Active questions, and the others asked since ``hot_since``, oldest first.
LOAD_QUESTIONS = (
    f"SELECT {QUESTION_COLS} FROM questions{{by_status}} WHERE deleted_at IS NULL AND status IN ('open', 'answered')"
    f" UNION ALL SELECT {QUESTION_COLS} FROM questions{{by_time}} WHERE deleted_at IS NULL AND created_at >= ?"
    " AND status NOT IN ('open', 'answered')"
    " ORDER BY created_at, question_id"
)
#: The answers of those questions, but for the expired ones'.
LOAD_ANSWERS = (
    f"SELECT {ANSWER_COLS} FROM answers{{answers_by_question}} WHERE deleted_at IS NULL AND question_id IN"
    " (SELECT question_id FROM questions{by_status} WHERE deleted_at IS NULL AND status IN ('open', 'answered')"
    " UNION SELECT question_id FROM questions{by_time} WHERE deleted_at IS NULL AND created_at >= ?"
    " AND status != 'expired')"
    " ORDER BY created_at, answer_id"
)
#: ``(asker, question, answer, author)`` of each answer still ``sent`` to a question that expired since ``hot_since``.
LOAD_UNDELIVERED = (
    "SELECT q.asker_id, a.question_id, a.answer_id, a.author_id FROM questions q{by_status}"
    " JOIN answers a{answers_by_question} USING (question_id) WHERE q.status = 'expired' AND q.created_at >= ?"
    " AND q.deleted_at IS NULL AND a.state = 'sent' AND a.deleted_at IS NULL"
    " ORDER BY a.created_at, a.answer_id"
)
#: ``(question, next stage)`` of each active question; not of a deleted one (its status stays as it was) nor of a
#: hidden one: the engine loads neither (shown again, a question is read with its escalation at the next start).
LOAD_ESCALATIONS = (
    "SELECT e.question_id, e.next_stage FROM questions q{by_status} JOIN escalations e USING (question_id)"
    " WHERE q.status IN ('open', 'answered') AND q.deleted_at IS NULL"
)
#: ``(question, user, at, stage)`` of every alert since ``hot_since`` (each local's cap counts the recent ones), and
#: of the older ones of the active questions ``LOAD_ESCALATIONS`` reads (they keep an escalation from alerting anyone
#: twice). Two parts that cannot overlap: no duplicates to remove.
LOAD_NOTIFIED = (
    "SELECT n.question_id, n.user_id, n.at, n.stage FROM questions q{by_status} JOIN notified n USING (question_id)"
    " WHERE q.status IN ('open', 'answered') AND q.deleted_at IS NULL AND n.at < ?"
    " UNION ALL SELECT question_id, user_id, at, stage FROM notified{notified_by_time} WHERE at >= ?"
)
#: The ``LOAD_`` statements' holes, and the index each names on SQLite.
_LOAD_INDEXES = {
    "by_status": "questions_by_status",
    "by_time": "questions_by_time",
    "answers_by_question": "answers_by_question",
    "notified_by_time": "notified_by_time",
}


def statement_for(statement: str, dialect: Dialect) -> str:
    """One of the ``LOAD_`` statements, or ``PRUNE_NOTIFIED``, for ``dialect``: SQLite's names its indexes,
    PostgreSQL's does not."""
    return statement.format(**{hole: _queries.indexed_by(index, dialect) for hole, index in _LOAD_INDEXES.items()})


#: The database's incarnation (migration 12), which a backend reads once its schema is migrated.
READ_INCARNATION = "SELECT incarnation FROM store_incarnation"

#: Deletes up to ``limit`` (the second parameter) alert records older than the first, oldest first, but none of
#: a question still active (they keep its escalation from alerting anyone twice). A deleted question has ended,
#: whatever its status (deletion only sets ``deleted_at``); a hidden one (``deleted_at`` set too) may be shown
#: again, and its escalation taken up at the next start: its records stay.
PRUNE_NOTIFIED = (
    "DELETE FROM notified WHERE (question_id, user_id) IN (SELECT n.question_id, n.user_id"
    " FROM notified n{notified_by_time} JOIN questions q USING (question_id) WHERE n.at < ?"
    " AND (q.status NOT IN ('open', 'answered') OR (q.deleted_at IS NOT NULL AND q.hidden = 0))"
    " ORDER BY n.at LIMIT ?)"
)


class SqlStore:
    """The reads and the preparation of writes; a backend adds connections, commits and pruning."""

    dialect: Dialect = "sqlite"

    def __init__(self) -> None:
        self.commits = 0
        self.rows_committed = 0
        self._max_variables = 999  # SQLite's oldest default; a backend sets its real limit when it opens
        #: PostgreSQL: a node id, and each commit announces its new inbox heads (CLUSTER.md); None: it does not.
        self.news_from: str | None = None
        #: The database's incarnation (read at ``open``): in each push job's Idempotency-Key beside its id, which
        #: is unique in one incarnation only (a restore numbers again from its snapshot's highest).
        self.incarnation = ""

    # ---- what a backend provides ---------------------------------------------------

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one read statement (``?`` parameters) on a reader connection; all its rows."""
        raise NotImplementedError

    def _write(self, what: str, statements: Sequence[tuple[str, tuple[Any, ...]]]) -> list[int]:
        """Run statements (``?`` parameters) in one write transaction on the writer; their row counts.

        Raises:
            WriteFailed: nothing was committed.
        """
        raise NotImplementedError

    def _seq_ranges(self) -> Iterable[tuple[str, int, int]]:
        """``(user, oldest seq kept, newest seq)`` of every user with durable events."""
        raise NotImplementedError

    def commit(self, batch: PreparedCommit) -> SeqsGiven:
        raise NotImplementedError

    def _last_push_job_id(self) -> int:
        """Where the engine's push job ids continue from (it adds one before each): the highest given so far."""
        return int(self._read("SELECT coalesce(max(job_id), 0) FROM push_outbox")[0][0])

    # ---- writes ------------------------------------------------------------------

    def claim_signin_code(self, nonce: str, expires_s: float, now_s: float) -> bool:
        """Record an admin sign-in code as used until ``expires_s`` (see ``Storage``); True if this use is the first."""
        _, added = self._write(
            "signin code",
            [
                ("DELETE FROM signin_codes_used WHERE expires_at <= ?", (now_s,)),
                (
                    "INSERT INTO signin_codes_used (nonce, expires_at) VALUES (?, ?) ON CONFLICT (nonce) DO NOTHING",
                    (nonce, expires_s),
                ),
            ],
        )
        return added == 1

    def apply(self, writes: Sequence[Write]) -> SeqsGiven:
        """Commit ``writes`` in one transaction (group commit): :meth:`prepare` then :meth:`commit`."""
        return self.commit(self.prepare(writes))

    def prepare(self, writes: Sequence[Write]) -> PreparedCommit:
        """Turn writes into the statements of one transaction (see ``prepare_writes``); pure Python, no I/O."""
        return prepare_writes(writes, self._max_variables, self.dialect, news_from=self.news_from)

    def prune_alerts(self, before_ms: int, limit: int) -> int:
        """Delete at most ``limit`` alert records older than ``before_ms``, but for active (or hidden) questions'
        (blocking: on a worker thread); returns how many."""
        return self._write("pruning alerts", [(statement_for(PRUNE_NOTIFIED, self.dialect), (before_ms, limit))])[0]

    # ---- reads -------------------------------------------------------------------

    def load(
        self, *, hot_since: int, alerts_since: int | None = None, pushes_since: int | None = None, pushes: int = -1
    ) -> LoadedState:
        """Everything the engine keeps in memory: all users, active questions
        and questions created since ``hot_since`` (ms), with their answers (the
        expired ones without: the engine only counts them, for its SLO, trending
        and hotspots, and delivers the answers their askers have not received),
        and the records of alerts for active questions and since ``hot_since``,
        or since ``alerts_since`` if that is earlier (each local's cap counts
        the last hour's, whatever the hot set's length). Of this node's pending
        push jobs, those made before ``pushes_since`` are marked expired, and
        at most ``pushes`` of the others read: the dispatcher queues no more
        than its bound, and pages through the rest of the outbox."""
        users = [user_from(r) for r in self._read(f"SELECT {USER_COLS} FROM users")]
        # users.last_seq is only rewritten with the rest of the row; the inbox
        # (its heads, in PostgreSQL) holds the truth.
        seqs = {user: (low, high) for user, low, high in self._seq_ranges()}
        for user in users:
            user.last_seq = max(user.last_seq, seqs.get(user.user_id, (0, 0))[1])

        def read(statement: str, *params: int) -> list[tuple[Any, ...]]:
            return self._read(statement_for(statement, self.dialect), params)

        questions = [question_from(r) for r in read(LOAD_QUESTIONS, hot_since)]
        answers = [answer_from(r) for r in read(LOAD_ANSWERS, hot_since)]
        undelivered = [
            (str(asker), str(qid), str(aid), str(author))
            for asker, qid, aid, author in read(LOAD_UNDELIVERED, hot_since)
        ]
        escalations = {qid: next_stage for qid, next_stage in read(LOAD_ESCALATIONS)}
        since = hot_since if alerts_since is None else min(hot_since, alerts_since)
        notified: list[tuple[str, str, int]] = []
        per_stage: dict[str, dict[str, int]] = {}
        for qid, uid, at, stage in read(LOAD_NOTIFIED, since, since):
            notified.append((qid, uid, at))
            counts = per_stage.setdefault(qid, {})
            counts[stage] = counts.get(stage, 0) + 1
        if pushes_since is not None:
            self.expire_push_jobs(pushes_since)
        pending_pushes = self.pending_push_jobs(0, pushes)
        last_job = self._last_push_job_id()
        return LoadedState(
            users=users,
            questions=questions,
            answers=answers,
            undelivered=undelivered,
            escalations=escalations,
            notified=notified,
            notified_per_stage=per_stage,
            pending_pushes=pending_pushes,
            last_push_job_id=int(last_job),
            oldest_seqs={user: low for user, (low, _high) in seqs.items()},
            ip_blocks=[
                IpBlock(*r) for r in self._read("SELECT cidr, until, reason, admin_id, created_at FROM ip_blocks")
            ],
            open_reports=[
                report_from(r)
                for r in self._read(f"SELECT {REPORT_COLS} FROM reports WHERE status = 'open' ORDER BY created_at")
            ],
        )

    def pending_push_jobs(self, after_job_id: int, limit: int) -> list[PushJob]:
        """At most ``limit`` pending jobs of the push outbox with ids above ``after_job_id``, oldest first:
        this node's own (``news_from``'s, on PostgreSQL; another node sends its own, CLUSTER.md)."""
        mine, node = self._this_node()
        rows = self._read(
            f"SELECT {PUSH_COLS} FROM push_outbox WHERE status = 'pending'{mine} AND job_id > ? ORDER BY job_id LIMIT ?",
            (*node, after_job_id, limit if limit >= 0 else 2**62),
        )
        return [push_from(r) for r in rows]

    def _this_node(self) -> tuple[str, tuple[str, ...]]:
        """The condition (and its parameters) that keeps a push outbox query to this node's jobs: all of them
        with one node (SQLite), ``node_id`` = this node's with several (CLUSTER.md)."""
        return ("", ()) if self.news_from is None else (" AND node_id = ?", (self.news_from,))

    def expire_push_jobs(self, before_ms: int) -> int:
        """Mark ``expired`` this node's pending push jobs made before ``before_ms`` (too old to send); how many."""
        mine, node = self._this_node()
        return self._write(
            "expiring push jobs",
            [
                (
                    "UPDATE push_outbox SET status = 'expired', last_error = 'too old to send', updated_at = ?"
                    f" WHERE status = 'pending'{mine} AND created_at < ?",
                    (before_ms, *node, before_ms),
                )
            ],
        )[0]

    def prune_pushes(self, before_ms: int, limit: int) -> int:
        """Delete at most ``limit`` settled push jobs last changed before ``before_ms`` (blocking: on a worker
        thread); returns how many. Pending ones stay, whatever their age: a read at start-up expires them."""
        return self._write(
            "pruning push jobs",
            [
                (
                    "DELETE FROM push_outbox WHERE job_id IN (SELECT job_id FROM push_outbox"
                    " WHERE status IN ('sent', 'failed', 'expired', 'cancelled', 'unsent') AND updated_at < ?"
                    # The newest job stays, whatever its age: ids (and the gateway's Idempotency-Keys) are
                    # numbered on from the highest kept, and must never be given twice.
                    " AND job_id < (SELECT max(job_id) FROM push_outbox)"
                    " ORDER BY job_id LIMIT ?)",  # by push_by_status
                    (before_ms, limit),
                )
            ],
        )[0]

    def adopt_push_jobs(self, limit: int, since_ms: int) -> list[PushJob]:
        """Take over at most ``limit`` pending push jobs of nodes gone from the cluster, oldest first, for
        this node to send (the lease holder's task; CLUSTER.md). SQLite: one node, none to adopt."""
        return []

    def read(self, query: Read) -> Any:
        """Answer a read path's query (``core.reads``) with records (blocking: on a worker thread)."""
        rows = _queries.run(query, self._read, QUESTION_COLS, ANSWER_COLS, self.dialect)
        if isinstance(query, QuestionPage):
            question = question_from(rows[0][0]) if rows[0] else None
            return question, [answer_from(r) for r in rows[1]] if question is not None else []
        if isinstance(query, QuestionsOfAsker):
            return [(question_from(r[:-1]), int(r[-1])) for r in rows[0]]
        if isinstance(query, AnswersOfAuthor):
            return [(answer_from(r[:-2]), r[-2], r[-1]) for r in rows[0]]
        if isinstance(query, Browse):
            return [question_from(r) for r in rows[0]]
        if isinstance(query, AuthorStats):
            given, accepted = rows[0][0]
            return int(given), int(accepted)
        if isinstance(query, Notifications):
            return rows[0][: query.limit + 1]
        if isinstance(query, AnswerHome):
            return self.find_question(rows[0][0][0]) if rows[0] else None
        if isinstance(query, AuditPage):
            return rows[0]
        if isinstance(query, ReportsPage):
            return [(report_from(r[:12]), r[12], r[13], bool(r[14])) for r in rows[0]]
        if isinstance(query, ModerationItem):
            if not rows[1]:
                return None
            return question_from(rows[1][0]), [answer_from(r) for r in rows[2]]
        raise TypeError(f"not a read: {query!r}")

    def find_question(self, question_id: str) -> tuple[Question, list[Answer]] | None:
        rows = self._read(
            f"SELECT {QUESTION_COLS} FROM questions WHERE question_id = ? AND deleted_at IS NULL", (question_id,)
        )
        if not rows:
            return None
        answers = self._read(
            f"SELECT {ANSWER_COLS} FROM answers WHERE question_id = ? AND deleted_at IS NULL"
            " ORDER BY created_at, answer_id",
            (question_id,),
        )
        return question_from(rows[0]), [answer_from(r) for r in answers]

    def read_rows(
        self, question_ids: Iterable[str], user_ids: Iterable[str]
    ) -> tuple[list[tuple[str, Question | None, list[Answer]]], list[User]]:
        """Questions (deleted ones too) with all their answers (deleted ones too), and users, as committed:
        what another node changed (CLUSTER.md). A user's ``last_seq`` is their inbox head.

        Returns:
            ``(question id, question or None: no such row, answers)`` for each question asked for, and the
            users found.
        """
        wanted = sorted(set(question_ids))
        questions: dict[str, Question] = {}
        answers: dict[str, list[Answer]] = {}
        for part, marks in _queries.in_parts(wanted):
            for row in self._read(f"SELECT {QUESTION_COLS} FROM questions WHERE question_id IN ({marks})", part):
                question = question_from(row)
                questions[question.question_id] = question
            for row in self._read(
                f"SELECT {ANSWER_COLS} FROM answers WHERE question_id IN ({marks}) ORDER BY created_at, answer_id",
                part,
            ):
                answer = answer_from(row)
                answers.setdefault(answer.question_id, []).append(answer)
        people = sorted(set(user_ids))
        users: list[User] = []
        for part, marks in _queries.in_parts(people):
            users.extend(
                user_from(r) for r in self._read(f"SELECT {USER_COLS} FROM users WHERE user_id IN ({marks})", part)
            )
        heads = self.read_heads(u.user_id for u in users) if users else {}
        for user in users:
            user.last_seq = max(user.last_seq, heads.get(user.user_id, 0))
        return [(qid, questions.get(qid), answers.get(qid, [])) for qid in wanted], users

    def read_escalations(self, question_ids: Iterable[str]) -> dict[str, EscalationProgress]:
        """The escalation progress of those active questions that have one, as committed: another node asked
        them (CLUSTER.md); the node holding the escalation lease runs their stages left."""
        wanted = sorted(set(question_ids))
        progress: dict[str, EscalationProgress] = {}
        for part, marks in _queries.in_parts(wanted):
            stages = {
                qid: int(next_stage)
                for qid, next_stage in self._read(
                    "SELECT e.question_id, e.next_stage FROM escalations e JOIN questions q USING (question_id)"
                    f" WHERE e.question_id IN ({marks}) AND q.status IN ('open', 'answered')",
                    part,
                )
            }
            if not stages:
                continue
            alerted: dict[str, list[tuple[str, int]]] = {}
            per_stage: dict[str, dict[str, int]] = {}
            marks = ",".join("?" * len(stages))
            for qid, uid, at, stage in self._read(
                f"SELECT question_id, user_id, at, stage FROM notified WHERE question_id IN ({marks})"
                " ORDER BY question_id, at, user_id",
                sorted(stages),
            ):
                alerted.setdefault(qid, []).append((uid, int(at)))
                counts = per_stage.setdefault(qid, {})
                counts[stage] = counts.get(stage, 0) + 1
            for qid, next_stage in stages.items():
                progress[qid] = EscalationProgress(next_stage, tuple(alerted.get(qid, ())), per_stage.get(qid, {}))
        return progress

    def read_changes(self) -> tuple[list[str], list[str]]:
        """The questions and users changed since the last call (or the last ``load``), whoever changed them:
        the catch-up for lost notifications (CLUSTER.md). SQLite: one node, nothing to catch up: empty."""
        return [], []

    def read_heads(self, user_ids: Iterable[str]) -> dict[str, int]:
        """Each user's newest durable seq (0: none), as committed."""
        wanted = set(user_ids)
        return {**dict.fromkeys(sorted(wanted), 0), **self._seq_by_user("max", wanted)}

    def read_oldest(self, user_ids: Iterable[str]) -> dict[str, int]:
        """Each user's oldest durable seq still kept (older ones were pruned, by whichever node)."""
        return self._seq_by_user("min", user_ids)

    def _seq_by_user(self, aggregate: str, user_ids: Iterable[str]) -> dict[str, int]:
        """``aggregate(seq)`` of each user's durable events, users without any left out; 500 users a statement."""
        wanted = sorted(set(user_ids))
        found: dict[str, int] = {}
        for part, marks in _queries.in_parts(wanted):
            sql = f"SELECT user_id, {aggregate}(seq) FROM events WHERE user_id IN ({marks}) GROUP BY user_id"
            found.update((user, int(seq)) for user, seq in self._read(sql, part))
        return found

    def read_event_rows(self, wanted: Sequence[tuple[str, int, int]]) -> dict[str, list[tuple[int, str, bytes]]]:
        """For each ``(user, after_seq, up_to_seq)``, the user's durable events in that range, in seq order,
        their ``data`` as stored (msgpack): several connections' replays in one call (``delivery.py``). An
        event whose question or answer is deleted or hidden keeps only its ids (``_queries.strip_removed``)."""
        return _queries.strip_removed(self._event_rows(wanted), self._read)

    def _event_rows(self, wanted: Sequence[tuple[str, int, int]]) -> dict[str, list[tuple[int, str, bytes]]]:
        """:meth:`read_event_rows` as stored: a statement per user."""
        found: dict[str, list[tuple[int, str, bytes]]] = {}
        for user_id, after_seq, up_to_seq in wanted:
            found[user_id] = [
                (int(seq), kind, bytes(data))
                for seq, kind, data in self._read(
                    "SELECT seq, type, data FROM events WHERE user_id = ? AND seq > ? AND seq <= ? ORDER BY seq",
                    (user_id, after_seq, up_to_seq),
                )
            ]
        return found
