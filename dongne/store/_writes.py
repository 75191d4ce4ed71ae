"""Writes to SQL: the statements of one group commit, built on the event loop, run on the writer thread.

Both backends get the same statements but for two things: the parameter
marker (``?`` or ``%s``) and how a save of an existing row is spelled. SQLite
says ``INSERT OR REPLACE`` (and ``OR IGNORE``); PostgreSQL says ``ON CONFLICT
(key) DO UPDATE SET`` every other column (``DO NOTHING``), and gets the rows
of each table in key order, so that two transactions lock rows in the same
order. PostgreSQL's commit gives the inbox events their seqs itself: it
moves each user's ``inbox_heads`` row on by the user's events and numbers
them from where the row was (:class:`InboxAppends`), so that writers on
several nodes never take the same seq.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any

import attrs
import msgpack

from ..core.effects import (
    AcceptOnce,
    AddPoints,
    AppendAudit,
    AppendEvent,
    CancelPushes,
    CloseOnce,
    CountAnswer,
    DeleteIpBlock,
    DeliverAnswer,
    EnqueuePush,
    IfOpen,
    RoomNews,
    SaveAnswer,
    SaveEscalation,
    SaveIpBlock,
    SaveNotified,
    SavePushStatus,
    SaveQuestion,
    SaveReport,
    SaveUser,
    StopEscalating,
    Write,
)
from ..core.records import Answer, IpBlock, PushJob, Question, Report, User
from ._queries import Dialect
from ._rows import ANSWER_COLS, QUESTION_COLS, REPORT_COLS, USER_COLS, answer_row, question_row, report_row, user_row

__all__ = [
    "ALERTS_CHANNEL",
    "APPEND_EVENTS_SQL",
    "CHANGES_CHANNEL",
    "EVENTS_CHANNEL",
    "MAX_ROWS_PER_STATEMENT",
    "NOTIFY_PAYLOAD_LIMIT",
    "RACED_QUESTION_COLS",
    "ROOMS_CHANNEL",
    "Guard",
    "InboxAppends",
    "PreparedCommit",
    "SeqsGiven",
    "alerts_news",
    "changes_news",
    "prepare_writes",
    "read_alerts_news",
    "read_changes_news",
    "read_inbox_news",
    "read_room_news",
    "room_news",
]


#: PostgreSQL's limit on a notification's payload, in bytes (8000 in a default build, the terminator included).
NOTIFY_PAYLOAD_LIMIT = 8000

#: Where commits announce new inbox heads (``news_from``; CLUSTER.md).
EVENTS_CHANNEL = "dongne_events"

#: Where commits announce the questions and users they changed (``news_from``; CLUSTER.md).
CHANGES_CHANNEL = "dongne_changes"

#: Where commits announce who their escalation stages alerted, for other nodes' hourly caps (``news_from``;
#: CLUSTER.md).
ALERTS_CHANNEL = "dongne_alerts"

#: Where room events go to the rooms' members on other nodes (CLUSTER.md, "Delivery across nodes").
ROOMS_CHANNEL = "dongne_rooms"

#: The most rows in one multi-row INSERT (a power of two); see PreparedCommit.insert.
MAX_ROWS_PER_STATEMENT = 256


#: The question columns several nodes race on: a ``SaveQuestion`` writes them only when it inserts the row;
#: ``CountAnswer``, ``AcceptOnce`` and ``CloseOnce`` change them in SQL (CLUSTER.md).
RACED_QUESTION_COLS = ("status", "accepted_answer_id", "answer_count", "first_answer_at", "closed_at")

#: The columns of each part of a user's row a ``SaveUser`` names in ``changed`` (the rest of an existing row stays).
_USER_PART_COLS = {
    "profile": ("nick", "local", "tags", "role"),
    "settings": ("immediate_alerts", "quiet_start", "quiet_end", "max_alerts_per_hour", "home_lat", "home_lng"),
    "ban": ("banned_until", "ban_reason"),
}

#: A question that may still be answered, accepted or closed: active (``lifecycle.ACTIVE``) and not taken down.
#: A delete or hide sets ``deleted_at`` and leaves the status as it was: a write that read the status alone let
#: an answer made on one node after the asker's delete on another be stored (and acknowledged).
_ACTIVE_SQL = "status IN ('open', 'answered') AND deleted_at IS NULL"


#: The seqs a commit gave where they differ from the engine's: ``{user: {seq the engine gave: seq stored}}``,
#: each such user with all of its events in the commit (the newest stored seq is the user's inbox head).
SeqsGiven = dict[str, dict[int, int]]

#: Appends a commit's inbox events in one statement (``InboxAppends``): each user's head moves on by the
#: user's events (rows locked in user order: two commits lock in the same order, so they cannot deadlock),
#: the events are numbered from where it was, and the new heads are returned; ``{news}`` is where the
#: announcement of the new heads goes, split under PostgreSQL's payload limit.
APPEND_EVENTS_SQL = """
WITH heads AS (
    INSERT INTO inbox_heads (user_id, last_seq)
    SELECT u, n FROM unnest(%(users)s::text[], %(counts)s::bigint[]) AS t(u, n) ORDER BY u
    ON CONFLICT (user_id) DO UPDATE SET last_seq = inbox_heads.last_seq + excluded.last_seq
    RETURNING user_id, last_seq
), appended AS (
    INSERT INTO events (user_id, seq, type, data, created_at)
    SELECT e.u, h.last_seq - c.n + e.r, e.t, e.d, e.c
    FROM unnest(%(event_users)s::text[], %(ranks)s::bigint[], %(types)s::text[], %(datas)b::bytea[],
                %(created)s::bigint[]) AS e(u, r, t, d, c)
    JOIN heads h ON h.user_id = e.u COLLATE "C"
    JOIN unnest(%(users)s::text[], %(counts)s::bigint[]) AS c(u, n) ON c.u = e.u
    RETURNING 1
){news}
SELECT user_id, last_seq FROM heads{news_join}
"""

_ANNOUNCE_HEADS_SQL = """, announced AS (
    SELECT pg_notify(%(channel)s, json_build_object('node', %(node)s::text, 'heads', json_object_agg(user_id, last_seq))::text)
    FROM (SELECT user_id, last_seq,
                 sum(octet_length(to_json(user_id)::text) + 24) OVER (ORDER BY user_id) / %(budget)s AS part
          FROM heads) AS p
    GROUP BY part
)"""

#: The bytes of heads each announcement may hold (the rest of its payload's 8000 is the node id and JSON).
_ANNOUNCE_BUDGET = 7000


@attrs.frozen
class Guard:
    """A statement of a commit that must change a row: if it changes none, the commit fails with ``Conflict``.
    A stage's (``what`` "stage", ``IfOpen``) must find its question's row open: else ``QuestionEnded``."""

    question_id: str
    what: str  # "answer" | "accept" | "close" | "stage"


class PreparedCommit:
    """The statements of one transaction, built by :meth:`Store.prepare`.

    Args:
        max_variables: the backend's limit on parameters in one statement.
        marker: the parameter marker, ``?`` (SQLite) or ``%s`` (psycopg).
    """

    def __init__(self, max_variables: int, marker: str = "?") -> None:
        self._max_variables = max_variables
        self._marker = marker
        # (sql, params, executemany? or the Guard of a statement that must change a row)
        self.statements: list[tuple[str, list[Any], bool | Guard]] = []
        self.rows = 0
        #: PostgreSQL: the inbox events, whose seqs the commit gives after the other statements.
        self.appends: InboxAppends | None = None

    def insert(self, head: str, rows: Sequence[tuple[Any, ...]], tail: str = "") -> None:
        """``head VALUES (...), (...), ... tail``: a few statements, each of a power-of-two number of rows.

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
        one = "(" + ",".join([self._marker] * width) + ")"
        start = 0
        while start < len(rows):
            size = min(largest, 1 << ((len(rows) - start).bit_length() - 1))
            part = rows[start : start + size]
            self.statements.append(
                (f"{head} VALUES {','.join([one] * size)}{tail}", list(chain.from_iterable(part)), False)
            )
            start += size
        self.rows += len(rows)

    def many(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """One statement run per row (for UPDATEs)."""
        self.statements.append((sql, list(rows), True))
        self.rows += len(rows)

    def guarded(self, sql: str, params: list[Any], guard: Guard) -> None:
        """One statement that must change a row (the backend checks its row count): ``Conflict`` otherwise."""
        self.statements.append((sql, params, guard))
        self.rows += 1

    def guard_lease(self, epoch: int, name: str = "escalation") -> None:
        """Commit only while lease ``name`` is still at ``epoch`` (PostgreSQL; see ``CLUSTER.md``).

        The check runs first and keeps the lease row locked (``FOR SHARE``)
        until the commit ends, so a steal waits for it; if the epoch moved on,
        the commit raises ``LeaseLost`` and nothing of it is written.

        Raises:
            TypeError: on SQLite, which has no lease (one node).
        """
        if self._marker != "%s":
            raise TypeError("a lease guard needs PostgreSQL")
        self.statements.insert(0, ("SELECT dongne_check_lease(%s, %s)", [name, epoch], False))

    def notify(self, channel: str, payload: str) -> None:
        """Send ``payload`` on ``channel`` if, and only if, the commit succeeds (PostgreSQL's ``pg_notify``).

        Raises:
            TypeError: on SQLite, which has no LISTEN/NOTIFY.
            ValueError: a payload over PostgreSQL's limit (7999 bytes).
        """
        if self._marker != "%s":
            raise TypeError("notifications need PostgreSQL")
        if len(payload.encode()) >= NOTIFY_PAYLOAD_LIMIT:
            raise ValueError(f"a notification payload must be under {NOTIFY_PAYLOAD_LIMIT} bytes")
        self.statements.append(("SELECT pg_notify(%s, %s)", [channel, payload], False))


class InboxAppends:
    """A PostgreSQL commit's inbox events: the commit gives their seqs (CLUSTER.md, "Seqs stay gap-free per user").

    The engine numbers each user's events from what it knows of the user's
    inbox head; another node may have appended to that inbox meanwhile. So
    the commit appends them with :data:`APPEND_EVENTS_SQL`, one statement
    built here (on the event loop: the writer thread only runs it): each
    user's head moves on by the user's events, the events are numbered from
    where it was, in the engine's order, and the new heads are announced on
    :data:`EVENTS_CHANNEL`. Where the numbers differ from the engine's
    (another node appended first), :meth:`given` says so from the heads the
    statement returns: the driver sends those frames with the stored seqs.
    Nothing is refused and nothing is read again.

    Args:
        rows: ``(user, seq the engine gave, type, data, created_at)``, in the engine's order.
        news_from: the node id whose commits announce new heads (None: no news).
    """

    def __init__(self, rows: list[tuple[str, int, str, bytes, int]], news_from: str | None = None) -> None:
        self.seqs: dict[str, list[int]] = {}  # each user's seqs as the engine gave them, in its order
        ranks = []
        for user, seq, _kind, _data, _created in rows:
            mine = self.seqs.setdefault(user, [])
            mine.append(seq)
            ranks.append(len(mine))
        users = sorted(self.seqs)
        params: dict[str, Any] = {
            "users": users,
            "counts": [len(self.seqs[u]) for u in users],
            "event_users": [r[0] for r in rows],
            "ranks": ranks,
            "types": [r[2] for r in rows],
            "datas": [r[3] for r in rows],
            "created": [r[4] for r in rows],
        }
        if news_from is None:
            sql = APPEND_EVENTS_SQL.format(news="", news_join="")
        else:
            sql = APPEND_EVENTS_SQL.format(
                news=_ANNOUNCE_HEADS_SQL, news_join=", (SELECT count(*) FROM announced) AS announcements"
            )
            params.update(channel=EVENTS_CHANNEL, node=news_from, budget=_ANNOUNCE_BUDGET)
        self.statement: tuple[str, dict[str, Any]] = (sql, params)

    def given(self, heads: Iterable[tuple[str, int]]) -> SeqsGiven:
        """The seqs the commit gave where they differ from the engine's, from the new ``heads`` it returned."""
        given: SeqsGiven = {}
        for user, head in heads:
            mine = self.seqs[user]
            first = head - len(mine) + 1
            if mine[0] != first or mine[-1] != head:  # the engine's are ascending: both ends tell
                given[user] = {seq: first + i for i, seq in enumerate(mine)}
        return given


def read_inbox_news(payload: str) -> tuple[str, dict[str, int]]:
    """``(origin node, {user: newest seq})`` of an announcement of new inbox heads (``InboxAppends``).

    Raises:
        ValueError: not such a payload.
    """
    try:
        news = json.loads(payload)
        origin, heads = news["node"], news["heads"]
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"not inbox news: {payload[:80]!r}") from None
    if not isinstance(origin, str) or not isinstance(heads, dict):
        raise ValueError(f"not inbox news: {payload[:80]!r}")
    return origin, {str(user): int(seq) for user, seq in heads.items()}


def changes_news(origin: str, questions: Sequence[str], users: Sequence[str]) -> list[str]:
    """The payloads that announce a commit's changed questions and users on :data:`CHANGES_CHANNEL`.

    Each is JSON, ``{"node": origin, "questions": [id, ...], "users": [id, ...]}``,
    under PostgreSQL's payload limit: a commit changing many rows sends
    several. A listener reads the rows themselves from the store.
    """
    payloads: list[str] = []
    empty = len(json.dumps({"node": origin, "questions": [], "users": []}, ensure_ascii=False).encode())
    budget = NOTIFY_PAYLOAD_LIMIT - 1 - empty
    part: dict[str, list[str]] = {"questions": [], "users": []}
    used = 0

    def flush() -> None:
        nonlocal part, used
        if part["questions"] or part["users"]:
            payloads.append(json.dumps({"node": origin, **part}, ensure_ascii=False))
        part, used = {"questions": [], "users": []}, 0

    for kind, ids in (("questions", sorted(set(questions))), ("users", sorted(set(users)))):
        for ident in ids:
            size = len(json.dumps(ident, ensure_ascii=False).encode()) + 2  # ", " between items
            if size > budget:
                raise ValueError(f"an id too long to announce: {ident[:40]!r}...")
            if used + size > budget:
                flush()
            part[kind].append(ident)
            used += size
    flush()
    return payloads


def read_changes_news(payload: str) -> tuple[str, list[str], list[str]]:
    """``(origin node, question ids, user ids)`` of a payload :func:`changes_news` made.

    Raises:
        ValueError: not such a payload.
    """
    try:
        news = json.loads(payload)
        origin, questions, users = news["node"], news.get("questions", []), news.get("users", [])
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ValueError(f"not changes news: {payload[:80]!r}") from None
    if not isinstance(origin, str) or not isinstance(questions, list) or not isinstance(users, list):
        raise ValueError(f"not changes news: {payload[:80]!r}")
    return origin, [str(q) for q in questions], [str(u) for u in users]


#: Who a commit alerted: ``(question id, when (ms), user ids)`` for each ``SaveNotified``.
Alerted = tuple[str, int, tuple[str, ...]]


def alerts_news(origin: str, alerts: Iterable[Alerted]) -> list[str]:
    """The payloads that announce a commit's alerts on :data:`ALERTS_CHANNEL`, for other nodes' hourly caps.

    Each is JSON, ``{"node": origin, "alerts": [[question id, at, [user id, ...]], ...]}``,
    under PostgreSQL's payload limit: a commit alerting many users sends
    several, a long list of one question's going on in the next.

    Raises:
        ValueError: an id too long to announce.
    """
    payloads: list[str] = []
    budget = NOTIFY_PAYLOAD_LIMIT - 1 - len(json.dumps({"node": origin, "alerts": []}, ensure_ascii=False).encode())
    part: list[list[Any]] = []
    used = 0

    def flush() -> None:
        nonlocal part, used
        if part:
            payloads.append(json.dumps({"node": origin, "alerts": part}, ensure_ascii=False))
        part, used = [], 0

    for question_id, at, user_ids in alerts:
        opening = len(json.dumps([question_id, at, []], ensure_ascii=False).encode()) + 2  # ", " before it
        group: list[str] | None = None
        for user_id in user_ids:
            size = len(json.dumps(user_id, ensure_ascii=False).encode()) + 2
            if opening + size > budget:
                raise ValueError(f"an id too long to announce: {(question_id + ' ' + user_id)[:40]!r}...")
            if group is None or used + size > budget:
                if used + opening + size > budget:
                    flush()
                group = []
                part.append([question_id, at, group])
                used += opening
            group.append(user_id)
            used += size
    flush()
    return payloads


def read_alerts_news(payload: str) -> tuple[str, list[Alerted]]:
    """``(origin node, [(question id, at, user ids), ...])`` of a payload :func:`alerts_news` made.

    Raises:
        ValueError: not such a payload.
    """
    try:
        news = json.loads(payload)
        origin = news["node"]
        alerts = [(q, at, users) for q, at, users in news["alerts"]]
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"not alerts news: {payload[:80]!r}") from None
    if not isinstance(origin, str) or not all(
        isinstance(q, str) and type(at) is int and isinstance(users, list) and all(isinstance(u, str) for u in users)
        for q, at, users in alerts
    ):
        raise ValueError(f"not alerts news: {payload[:80]!r}")
    return origin, [(q, at, tuple(users)) for q, at, users in alerts]


def room_news(origin: str, question_id: str, kind: str, data: dict[str, Any]) -> str:
    """The payload of a room event on :data:`ROOMS_CHANNEL`: JSON ``{"node", "question_id", "kind", "data"}``.

    A ``new_answer`` over PostgreSQL's payload limit (a long answer in a
    script of 3- and 4-byte characters) goes as ``answer_id`` alone: the
    listener reads the answer from the store.

    Raises:
        ValueError: an event over the limit even so.
    """
    payload = json.dumps({"node": origin, "question_id": question_id, "kind": kind, "data": data}, ensure_ascii=False)
    if len(payload.encode()) >= NOTIFY_PAYLOAD_LIMIT and kind == "new_answer" and isinstance(data.get("answer"), dict):
        ref = {"question_id": question_id, "answer_id": data["answer"].get("answer_id")}
        payload = json.dumps({"node": origin, "question_id": question_id, "kind": kind, "data": ref})
    if len(payload.encode()) >= NOTIFY_PAYLOAD_LIMIT:
        raise ValueError(f"a room event too large to announce: {kind} in {question_id[:40]!r}")
    return payload


def read_room_news(payload: str) -> tuple[str, str, str, dict[str, Any]]:
    """``(origin node, question id, kind, data)`` of a payload :func:`room_news` made.

    Raises:
        ValueError: not such a payload.
    """
    try:
        news = json.loads(payload)
        origin, question_id, kind, data = news["node"], news["question_id"], news["kind"], news["data"]
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"not room news: {payload[:80]!r}") from None
    if not all(isinstance(x, str) for x in (origin, question_id, kind)) or not isinstance(data, dict):
        raise ValueError(f"not room news: {payload[:80]!r}")
    return origin, question_id, kind, data


def prepare_writes(
    writes: Sequence[Write],
    max_variables: int,
    dialect: Dialect = "sqlite",
    *,
    news_from: str | None = None,
) -> PreparedCommit:
    """Turn writes into the statements of one transaction; pure Python, no I/O.

    Saves of the same row collapse to the last one; inbox appends are all
    kept. Rows are packed into multi-row ``INSERT ... VALUES`` statements
    so that a commit is a handful of SQLite calls whatever its size. That
    matters because the commit runs on a worker thread: the sqlite3 module
    releases the GIL around every step, and ``executemany`` steps once per
    row, so while the event loop is busy each row waited for the GIL
    (an order of magnitude slower than one statement). The committer runs this part on
    the event loop, where it would hold the GIL anyway.

    ``news_from`` (PostgreSQL): a node id; the commit then announces its new
    inbox heads on :data:`EVENTS_CHANNEL` (:class:`InboxAppends`), the
    questions and users it changed on :data:`CHANGES_CHANNEL`
    (:func:`changes_news`) and who its stages alerted on
    :data:`ALERTS_CHANNEL` (:func:`alerts_news`).
    PostgreSQL's inbox events go to :attr:`PreparedCommit.appends`: the
    commit gives their seqs (:class:`InboxAppends`).
    """
    users: dict[str, tuple[User, frozenset[str]]] = {}  # the last copy, the parts all saves changed
    questions: dict[str, tuple[Question, bool]] = {}  # the last copy, unhidden by a save of the commit?
    answers: dict[str, tuple[Answer, bool]] = {}  # likewise
    delivered: list[DeliverAnswer] = []
    events: list[AppendEvent] = []
    escalations: dict[str, SaveEscalation] = {}
    stops: list[StopEscalating] = []
    notified: list[tuple[Any, ...]] = []
    alerted: list[SaveNotified] = []
    raced: list[CountAnswer | AcceptOnce | CloseOnce] = []  # in order
    points: dict[str, int] = {}  # user -> points added
    rooms: list[RoomNews] = []
    pushes: list[PushJob] = []
    push_status: dict[int, SavePushStatus] = {}
    push_cancels: list[CancelPushes] = []
    audit: list[AppendAudit] = []
    reports: dict[str, Report] = {}
    ip_blocks: dict[str, IpBlock | None] = {}  # None: deleted
    still_open: set[str] = set()  # questions of the stages in the commit (IfOpen)
    for item in writes:
        if isinstance(item, AppendEvent):
            events.append(item)
        elif isinstance(item, SaveNotified):
            alerted.append(item)
            notified.extend(
                (item.question_id, uid, stage, dist, int(online), item.at) for uid, stage, dist, online in item.targets
            )
        elif isinstance(item, SaveUser):
            user, changed = item.user, item.changed
            saved = users.get(user.user_id)
            if saved is not None:  # points: as for the raced question columns, the first save is the insert's
                user, changed = attrs.evolve(user, points=saved[0].points), changed | saved[1]
            users[user.user_id] = user, changed
        elif isinstance(item, AddPoints):
            points[item.user_id] = points.get(item.user_id, 0) + item.points
        elif isinstance(item, SaveQuestion):
            question, unhide = item.question, item.unhide
            first = questions.get(question.question_id)
            if first is not None:
                # The raced columns are written only by an insert, and the first save is the one that
                # inserts: later ones count what the guarded writes in between add (again) in SQL.
                question = attrs.evolve(question, **{c: getattr(first[0], c) for c in RACED_QUESTION_COLS})
                unhide = unhide or first[1]  # the last copy says whether it is hidden again since
            questions[question.question_id] = question, unhide
        elif isinstance(item, (CountAnswer, AcceptOnce, CloseOnce)):
            if isinstance(item, CountAnswer) and item.answer_id:  # an answer's last change here is the one to count:
                raced = [op for op in raced if not (isinstance(op, CountAnswer) and op.answer_id == item.answer_id)]
            raced.append(item)
        elif isinstance(item, RoomNews):
            rooms.append(item)
        elif isinstance(item, IfOpen):
            still_open.add(item.question_id)
        elif isinstance(item, SaveAnswer):
            saved_answer = answers.get(item.answer.answer_id)
            answers[item.answer.answer_id] = item.answer, item.unhide or (saved_answer is not None and saved_answer[1])
        elif isinstance(item, DeliverAnswer):
            delivered.append(item)
        elif isinstance(item, SaveEscalation):
            escalations[item.question_id] = item
        elif isinstance(item, StopEscalating):
            stops.append(item)
        elif isinstance(item, EnqueuePush):
            pushes.append(item.job)
        elif isinstance(item, SavePushStatus):
            push_status[item.job_id] = item
        elif isinstance(item, CancelPushes):
            push_cancels.append(item)
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
    pg = dialect == "postgres"
    batch = PreparedCommit(max_variables, "%s" if pg else "?")
    if pg and news_from is not None:
        changed_questions = {
            *questions,
            *(op.question_id for op in raced),
            *(a.question_id for a, _ in answers.values()),
            *(d.question_id for d in delivered),
        }
        for payload in changes_news(news_from, sorted(changed_questions), sorted({*users, *points})):
            batch.notify(CHANGES_CHANNEL, payload)
        announced = ((a.question_id, a.at, tuple(uid for uid, *_ in a.targets)) for a in alerted if a.targets)
        for payload in alerts_news(news_from, announced):
            batch.notify(ALERTS_CHANNEL, payload)
        for news in rooms:  # after the changes: a listener may read the answer a news names
            try:
                batch.notify(ROOMS_CHANNEL, room_news(news_from, news.question_id, news.kind, news.data))
            except ValueError:  # too large even by reference: other nodes' rooms miss it (lossy, as designed)
                continue
    mark = "%s" if pg else "?"

    def save(
        table: str, cols: str, key: str, rows: list[tuple[Any, ...]], *, keep: Sequence[str] = (), **guarded: str
    ) -> None:
        """Insert ``rows``, each replacing the row with the same ``key``; ``guarded``: a column's own update;
        ``keep``: columns an existing row keeps (then SQLite upserts too, rather than replacing the row)."""
        if not pg and not keep and not guarded:
            batch.insert(f"INSERT OR REPLACE INTO {table} ({cols})", rows)
            return
        sets = [
            f"{c} = {guarded.get(c, f'excluded.{c}')}"
            for c in (c.strip() for c in cols.split(","))
            if c != key and c not in keep
        ]
        batch.insert(
            f"INSERT INTO {table} ({cols})",
            sorted(rows, key=lambda r: r[0]),
            f" ON CONFLICT ({key}) DO UPDATE SET {', '.join(sets)}",
        )

    def keep(table: str, cols: str, rows: list[tuple[Any, ...]]) -> None:
        """Insert ``rows``, leaving an existing row with the same key alone."""
        if not pg:
            batch.insert(f"INSERT OR IGNORE INTO {table} ({cols})", rows)
            return
        batch.insert(f"INSERT INTO {table} ({cols})", sorted(rows, key=lambda r: r[:2]), " ON CONFLICT DO NOTHING")

    def lock_first(table: str, key: str, ids: Iterable[str], several: bool) -> None:
        """PostgreSQL, rows of ``table`` written in several passes (statements): lock them all first, in key
        order, or two commits (one saving alice and pointing bob, the other the reverse) deadlock."""
        if pg and several:
            batch.many(
                f"SELECT 1 FROM {table} WHERE {key} = ANY(%s::text[]) ORDER BY {key} FOR UPDATE", [(sorted(ids),)]
            )

    # A save is decided on this node's copy of the user, which may be older than the row (PostgreSQL: another
    # node's ban, settings, reads): an existing row changes only in the parts the save names, and its
    # last_seq and read_seq never go back; points are written by an insert, then only added to (AddPoints).
    # One statement per set of parts named.
    by_parts: dict[frozenset[str], list[tuple[Any, ...]]] = {}
    for user, changed in users.values():
        by_parts.setdefault(changed, []).append(user_row(user))
    lock_first("users", "user_id", {*users, *points}, bool(points) or len(by_parts) > 1)
    greatest = "greatest" if pg else "max"
    for changed, rows in sorted(by_parts.items(), key=lambda item: sorted(item[0])):
        kept = [c for part, cols in _USER_PART_COLS.items() if part not in changed for c in cols]
        save("users", USER_COLS, "user_id", rows, keep=("points", *kept),
             last_seq=f"{greatest}(users.last_seq, excluded.last_seq)",
             read_seq=f"{greatest}(users.read_seq, excluded.read_seq)")  # fmt: skip
    if points:
        batch.many(
            f"UPDATE users SET points = points + {mark} WHERE user_id = {mark}",
            [(n, user_id) for user_id, n in sorted(points.items())],
        )

    def taken_down(table: str, unhide: bool) -> dict[str, str]:
        """A save keeps a row taken down (deleted or hidden) as the first take-down wrote it, unless it unhides:
        it is decided on this node's copy, which may be older than the row (taken down on another node)."""
        if unhide:
            return {}
        return {
            "deleted_at": f"coalesce({table}.deleted_at, excluded.deleted_at)",
            "hidden": f"CASE WHEN {table}.deleted_at IS NULL THEN excluded.hidden ELSE {table}.hidden END",
        }

    question_groups = [
        [question_row(q) for q, unhide in questions.values() if unhide is shown] for shown in (False, True)
    ]
    lock_first("questions", "question_id", questions, all(question_groups))
    for shown, rows in zip((False, True), question_groups, strict=True):
        if rows:
            save("questions", QUESTION_COLS, "question_id", rows, keep=RACED_QUESTION_COLS,
                 alerted_at="coalesce(questions.alerted_at, excluded.alerted_at)",
                 **taken_down("questions", shown))  # fmt: skip
    if pg:
        # A stage is committed only while its question is open in the store (CLUSTER.md): one look at its
        # row, after the saves (a question created in this commit is there), before this commit's accepts
        # and closes (decided after the stage). FOR SHARE: another node's end waits for this commit. SQLite
        # has one writer, whose memory saw every end before it ran a stage. Nor an escalation stopped for good
        # (a hide, a ban of the asker): hidden and shown again on another node, a question is open again, and
        # the holder may read both news as one (or neither yet), its escalation still running in its memory.
        for question_id in sorted(still_open):
            batch.statements.append(
                (f"SELECT 1 FROM questions q WHERE question_id = %s AND {_ACTIVE_SQL} AND NOT EXISTS"
                 " (SELECT 1 FROM escalations e WHERE e.question_id = q.question_id AND e.next_stage < 0)"
                 " FOR SHARE OF q", [question_id], Guard(question_id, "stage"))
            )  # fmt: skip
    for op in raced:  # after the saves: a question created in this commit is there
        if isinstance(op, CountAnswer) and op.answered_at is None:
            # A question whose last answer goes is open again, and answered again when one comes back
            # (an unhidden answer); the right-hand sides read the row as it was.
            counted, args = "", [op.delta, op.delta, op.delta, op.delta, op.question_id]
            if op.answer_id:
                # Only if this commit changes the answer's row (saved below): another node may have taken it down
                # (or shown it) first. Every such change counts under the question's row lock, taken first: a
                # commit waiting for it reads the answer (a new statement, a new snapshot) as the other left it.
                if pg:
                    batch.many(f"SELECT 1 FROM questions WHERE question_id = {mark} FOR UPDATE", [(op.question_id,)])
                gone = "IS NULL" if op.delta < 0 else "IS NOT NULL"
                counted = f" AND EXISTS (SELECT 1 FROM answers WHERE answer_id = {mark} AND deleted_at {gone})"
                args.append(op.answer_id)
            batch.many(
                f"UPDATE questions SET answer_count = CASE WHEN answer_count + {mark} < 0 THEN 0"
                f" ELSE answer_count + {mark} END,"
                f" status = CASE WHEN status = 'answered' AND answer_count + {mark} <= 0 THEN 'open'"
                f" WHEN status = 'open' AND answer_count + {mark} > 0 THEN 'answered' ELSE status END"
                f" WHERE question_id = {mark}{counted}",
                [tuple(args)],
            )
        elif isinstance(op, CountAnswer):
            batch.guarded(
                f"UPDATE questions SET answer_count = answer_count + {mark},"
                " status = CASE WHEN status = 'open' THEN 'answered' ELSE status END,"
                f" first_answer_at = coalesce(first_answer_at, {mark}) WHERE question_id = {mark} AND {_ACTIVE_SQL}",
                [op.delta, op.answered_at, op.question_id],
                Guard(op.question_id, "answer"),
            )
        elif isinstance(op, AcceptOnce):
            batch.guarded(
                f"UPDATE questions SET accepted_answer_id = {mark}, status = 'resolved', closed_at = {mark}"
                f" WHERE question_id = {mark} AND accepted_answer_id IS NULL AND {_ACTIVE_SQL}",
                [op.answer_id, op.at, op.question_id],
                Guard(op.question_id, "accept"),
            )
        else:
            close = (
                f"UPDATE questions SET status = {mark}, closed_at = {mark} WHERE question_id = {mark} AND {_ACTIVE_SQL}"
            )
            if op.conflict:
                batch.guarded(close, [op.status, op.at, op.question_id], Guard(op.question_id, "close"))
            else:
                batch.many(close, [(op.status, op.at, op.question_id)])
    keep(
        "question_hashtags",
        "question_id, tag, created_at",
        [(q.question_id, tag, q.created_at) for q, _ in questions.values() for tag in q.hashtags],
    )
    # An answer's receipt only moves forward and an accept stays (a save from an older copy would undo them).
    answer_groups = [[answer_row(a) for a, unhide in answers.values() if unhide is shown] for shown in (False, True)]
    lock_first("answers", "answer_id", answers, all(answer_groups))
    for shown, rows in zip((False, True), answer_groups, strict=True):
        if rows:
            save("answers", ANSWER_COLS, "answer_id", rows,
                 state="CASE WHEN answers.state = 'read' OR excluded.state = 'sent' THEN answers.state"
                       " ELSE excluded.state END",
                 delivered_at="coalesce(answers.delivered_at, excluded.delivered_at)",
                 read_at="coalesce(answers.read_at, excluded.read_at)",
                 accepted=f"{greatest}(answers.accepted, excluded.accepted)",
                 **taken_down("answers", shown))  # fmt: skip
    if delivered:  # after the saves; an answer another node (or a read) marked already keeps its receipt
        batch.many(
            f"UPDATE answers SET state = 'delivered', delivered_at = {mark}"
            f" WHERE answer_id = {mark} AND state = 'sent' AND deleted_at IS NULL"
            " AND question_id IN (SELECT question_id FROM questions WHERE deleted_at IS NULL)",
            [(d.at, d.answer_id) for d in delivered],
        )
    packb = msgpack.packb
    event_rows = [(e.user_id, e.seq, e.type, e.packed or packb(e.data), e.created_at) for e in events]
    if pg and event_rows:
        batch.appends = InboxAppends(event_rows, news_from)
        batch.rows += len(event_rows)
    else:
        batch.insert("INSERT INTO events (user_id, seq, type, data, created_at)", event_rows)
    # An escalation stopped for good (below zero, records.stopped_for_good) stays stopped: a stage committed
    # after the stop (another node's, planned before a hide and committed after the unhide) only adds to the
    # stages it counts as run. A stop (after the saves: a stage of this commit counts) marks what the row
    # holds, whoever wrote it, with the most stages run either counts.
    least = "least" if pg else "min"
    save(
        "escalations",
        "question_id, next_stage, updated_at",
        "question_id",
        [(e.question_id, e.next_stage, e.updated_at) for e in escalations.values()],
        next_stage="CASE WHEN escalations.next_stage < 0 AND excluded.next_stage >= 0"
        f" THEN {least}(escalations.next_stage, -1 - excluded.next_stage) ELSE excluded.next_stage END",
    )
    stopped = f"{least}(-1 - {mark}, CASE WHEN next_stage < 0 THEN next_stage ELSE -1 - next_stage END)"
    for stop in stops:
        if stop.question_id:
            batch.many(
                f"UPDATE escalations SET next_stage = {stopped}, updated_at = {mark} WHERE question_id = {mark}",
                [(stop.stages_run, stop.at, stop.question_id)],
            )
        if stop.asker_id:
            batch.many(
                f"UPDATE escalations SET next_stage = {stopped}, updated_at = {mark} WHERE question_id IN"
                f" (SELECT question_id FROM questions WHERE asker_id = {mark} AND status IN ('open', 'answered'))",
                [(stop.stages_run, stop.at, stop.asker_id)],
            )
    keep("notified", "question_id, user_id, stage, distance_m, online, at", notified)
    batch.insert(
        "INSERT INTO push_outbox (job_id, user_id, kind, urgent, payload, status, attempts, last_error,"
        " created_at, updated_at, node_id, question_id, answer_id)",
        [
            (j.job_id, j.user_id, j.kind, int(j.urgent), packb(j.payload), j.status, j.attempts, None,
             j.created_at, j.created_at, news_from or "", j.question_id, j.answer_id)  # node: CLUSTER.md
            for j in pushes
        ],
    )  # fmt: skip
    for cancel in push_cancels:  # after the inserts: a job made in this commit is cancelled too
        keys = [(c, v) for c, v in (("question_id", cancel.question_id), ("answer_id", cancel.answer_id),
                                    ("user_id", cancel.user_id)) if v]  # fmt: skip
        batch.many(
            f"UPDATE push_outbox SET status = 'cancelled', updated_at = {mark} WHERE status = 'pending' AND "
            + " AND ".join(f"{c} = {mark}" for c, _ in keys),
            [(cancel.at, *(v for _, v in keys))],
        )
    # A resolution updates the report's row (report ids are never reused);
    # the engine keeps one open report per user and item (reports_open_once).
    if reports:
        batch.many(
            f"INSERT INTO reports ({REPORT_COLS}) VALUES ({', '.join([mark] * 12)})"
            " ON CONFLICT (report_id) DO UPDATE SET status = excluded.status, resolved_by = excluded.resolved_by,"
            " resolved_at = excluded.resolved_at, action = excluded.action",
            [report_row(r) for r in reports.values()],
        )
    for cidr, block in ip_blocks.items():
        if block is None:
            batch.many(f"DELETE FROM ip_blocks WHERE cidr = {mark}", [(cidr,)])
        else:
            row = (block.cidr, block.until, block.reason, block.admin_id, block.created_at)
            if pg:
                batch.many(
                    "INSERT INTO ip_blocks (cidr, until, reason, admin_id, created_at) VALUES (%s, %s, %s, %s, %s)"
                    " ON CONFLICT (cidr) DO UPDATE SET until = excluded.until, reason = excluded.reason,"
                    " admin_id = excluded.admin_id, created_at = excluded.created_at",
                    [row],
                )
            else:
                batch.many(
                    "INSERT OR REPLACE INTO ip_blocks (cidr, until, reason, admin_id, created_at) VALUES (?, ?, ?, ?, ?)",
                    [row],
                )
    batch.insert(
        "INSERT INTO audit_log (at, admin_id, action, target, reason)",
        [(a.at, a.admin_id, a.action, a.target, a.reason) for a in audit],
    )
    if push_status:
        batch.many(
            f"UPDATE push_outbox SET status = {mark}, attempts = {mark}, last_error = {mark}, updated_at = {mark} WHERE job_id = {mark}",
            [(p.status, p.attempts, p.last_error, p.at, p.job_id) for p in push_status.values()],
        )
    return batch
