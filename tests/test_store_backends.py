"""The store's own guarantees on each backend, without a server: one ``Storage`` interface, the same answers."""

from __future__ import annotations

from pathlib import Path

import attrs
import msgpack
import pytest

from dongne.core.effects import (
    AcceptOnce,
    AddPoints,
    AppendAudit,
    AppendEvent,
    CancelPushes,
    CloseOnce,
    CountAnswer,
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
    StopEscalating,
)
from dongne.core.lifecycle import QuestionStatus
from dongne.core.records import Answer, IpBlock, PushJob, Question, Report, User, stopped_for_good
from dongne.store import MAX_ROWS_PER_STATEMENT, Conflict, Storage, WriteFailed, store_for

from .conftest import db_rows

pytestmark = pytest.mark.backends("sqlite", "postgres")


def question(qid: str, asker: str, at: int, **fields: object) -> Question:
    return Question(
        qid, asker, asker, f"title {qid}", "body", 33.5, 126.5, "Jeju-si", ("food",), "normal", at, **fields
    )  # type: ignore[arg-type]


def test_saves_replace_rows_and_the_load_returns_the_last_of_each(store: Storage, db: Path | str) -> None:
    store.apply([SaveUser(User("asker", "Mina", created_at=1)), SaveUser(User("jun", "Jun", local=True))])
    store.apply([SaveQuestion(question("q1", "asker", 10)), SaveQuestion(question("q2", "asker", 5))])
    answers = [Answer(f"a{i}", "q1", "jun", "Jun", f"answer {i}", 20 - i, "sent", None, None, False) for i in range(3)]
    store.apply([SaveAnswer(a) for a in answers])
    # One commit saves the same rows twice: the last save of each wins.
    store.apply(
        [
            SaveUser(User("jun", "Jun", local=True, points=5, home=(33.4, 126.4), quiet_hours=(22, 7))),
            SaveUser(User("jun", "Jun", local=True, points=99, home=(33.4, 126.4), quiet_hours=(22, 7))),
            # A save of an existing row leaves its points alone: they are only added to (CLUSTER.md).
            AddPoints("jun", 4),
            AddPoints("jun", 6),
            SaveQuestion(attrs.evolve(question("q1", "asker", 10), title="first")),
            SaveQuestion(attrs.evolve(question("q1", "asker", 10), title="second")),
            # A save of an existing row leaves the raced columns alone: these writes change them (CLUSTER.md).
            CountAnswer("q1", 1, answered_at=30),
            AcceptOnce("q1", "a2", 40),
            SaveEscalation("q2", 1, 11),
            SaveEscalation("q2", 2, 12),
            SaveNotified("q2", (("jun", "IMMEDIATE", 120.5, True),), 11),
            SaveNotified("q2", (("jun", "QUICK", 120.5, False),), 12),  # once per question and user: kept first
        ]
    )
    loaded = store.load(hot_since=0)

    users = {u.user_id: u for u in loaded.users}
    assert (users["jun"].points, users["jun"].home, users["jun"].quiet_hours, users["jun"].local) == (
        10,
        (33.4, 126.4),
        (22, 7),
        True,
    )
    assert [q.question_id for q in loaded.questions] == ["q2", "q1"]  # by (created_at, id)
    q1 = loaded.questions[1]
    assert (q1.title, q1.status, q1.accepted_answer_id, q1.answer_count, q1.first_answer_at, q1.closed_at) == (
        "second",
        QuestionStatus.RESOLVED,
        "a2",
        1,
        30,
        40,
    )
    assert [a.answer_id for a in loaded.answers] == ["a2", "a1", "a0"]  # by (created_at, id)
    assert loaded.escalations == {"q2": 2}
    assert loaded.notified == [("q2", "jun", 11)]
    assert db_rows(db, "SELECT stage FROM notified") == [("IMMEDIATE",)]
    found = store.find_question("q1")
    assert found is not None and [a.content for a in found[1]] == ["answer 2", "answer 1", "answer 0"]


def test_an_escalation_stopped_for_good_stays_stopped_whoever_saves_its_progress(
    store: Storage, db: Path | str
) -> None:
    """``StopEscalating`` marks the stored progress stopped, of the most stages run that it or the row counts,
    whatever memory followed (a question, or every active one of an asker); a question without a row gets
    none, an ended one is left alone. A stage's progress saved after the stop (another node's) keeps it
    stopped, counting the stages that save says ran."""
    store.apply([SaveUser(User("asker", "Mina")), SaveUser(User("other", "Oh"))])
    store.apply([SaveQuestion(question(q, "asker", 1)) for q in ("q1", "q2", "q3", "q4")])
    store.apply([SaveQuestion(question("q5", "other", 1)), CloseOnce("q4", "closed", 2)])
    store.apply([SaveEscalation(q, 2, 3) for q in ("q1", "q2", "q4", "q5")])
    store.apply([SaveEscalation("q2", 3, 4), StopEscalating(5, question_id="q2", stages_run=1)])  # the row counts 3
    store.apply([StopEscalating(5, question_id="q1", stages_run=0), StopEscalating(5, question_id="q3")])
    store.apply([SaveEscalation("q1", 3, 6), SaveEscalation("q2", 1, 6)])  # stages committed after the stop
    rows = "SELECT question_id, next_stage FROM escalations ORDER BY question_id"
    assert db_rows(db, rows) == [("q1", stopped_for_good(3)), ("q2", stopped_for_good(3)), ("q4", 2), ("q5", 2)]
    store.apply([SaveEscalation("q5", 3, 7), StopEscalating(7, asker_id="other")])  # the asker banned
    store.apply([StopEscalating(8, asker_id="asker"), StopEscalating(8, question_id="q1", stages_run=4)])

    assert db_rows(db, rows) == [
        ("q1", stopped_for_good(4)),
        ("q2", stopped_for_good(3)),
        ("q4", 2),  # closed: no stage runs again
        ("q5", stopped_for_good(3)),
    ]
    assert store.load(hot_since=0).escalations == {"q1": -5, "q2": -4, "q5": -4}


def test_guarded_question_writes_refuse_the_race_another_node_won(store: Storage, db: Path | str) -> None:
    """Counted in SQL, accepted once, closed once: a guard that changes no row refuses the whole commit."""
    store.apply([SaveUser(User("asker", "Mina")), SaveQuestion(question("q1", "asker", 10))])
    store.apply([SaveQuestion(question("q2", "asker", 11))])
    store.apply([CountAnswer("q1", 1, answered_at=20)])
    store.apply([CountAnswer("q1", 1, answered_at=21)])
    store.apply([AcceptOnce("q1", "a1", 30)])  # "another node" accepts first

    with pytest.raises(Conflict) as refused:
        store.apply([SaveUser(User("jun", "Jun", points=10)), AcceptOnce("q1", "a2", 31)])

    assert isinstance(refused.value, WriteFailed)
    assert (refused.value.question_id, refused.value.what) == ("q1", "accept")
    assert db_rows(db, "SELECT count(*) FROM users WHERE user_id = 'jun'") == [(0,)]  # nothing of that commit
    row = "SELECT status, accepted_answer_id, answer_count, first_answer_at, closed_at FROM questions WHERE question_id = ?"
    assert db_rows(db, row, ("q1",)) == [("resolved", "a1", 2, 20, 30)]
    with pytest.raises(Conflict) as refused:
        store.apply([CloseOnce("q1", "closed", 32)])
    assert refused.value.what == "close"
    with pytest.raises(Conflict) as refused:
        store.apply([CountAnswer("q1", 1, answered_at=33)])
    assert refused.value.what == "answer"
    store.apply([CloseOnce("q2", "closed", 40)])
    with pytest.raises(Conflict):
        store.apply([CloseOnce("q2", "closed", 41)])
    store.apply([CloseOnce("q2", "expired", 42, conflict=False)])  # an expiry another node beat: no conflict
    # Taking an answer down (or showing it again) is counted without a guard, and never below 0.
    store.apply([CountAnswer("q1", -1), CountAnswer("q2", -1)])
    assert db_rows(db, row, ("q1",)) == [("resolved", "a1", 1, 20, 30)]
    assert db_rows(db, row, ("q2",)) == [("closed", None, 0, None, 40)]


def test_a_user_saved_from_an_older_copy_keeps_the_parts_the_save_did_not_change(
    store: Storage, db: Path | str
) -> None:
    """Another node banned mina and marked more of her inbox read after this node read her row: this node's
    settings, profile and read saves from its copy write their own part only (CLUSTER.md)."""
    copy = User("mina", "Mina", created_at=1, last_seq=9, read_seq=4)
    store.apply([SaveUser(copy)])
    store.apply([SaveUser(attrs.evolve(copy, banned_until=500, ban_reason="spam", read_seq=8), changed={"ban"})])

    store.apply([SaveUser(attrs.evolve(copy, max_alerts_per_hour=3), changed={"settings"})])
    store.apply([SaveUser(attrs.evolve(copy, nick="Mina K", read_seq=6), changed={"profile"})])
    store.apply([SaveUser(attrs.evolve(copy, read_seq=5), changed=set())])

    row = "SELECT nick, max_alerts_per_hour, banned_until, ban_reason, read_seq, last_seq FROM users"
    assert db_rows(db, row) == [("Mina K", 3, 500, "spam", 8, 9)]
    store.apply([SaveUser(attrs.evolve(copy, nick="Mina K"), changed={"ban"})])  # the unban
    assert db_rows(db, row) == [("Mina K", 3, None, None, 8, 9)]


def test_a_save_from_an_older_copy_brings_back_nothing_taken_down_and_no_earlier_receipt(
    store: Storage, db: Path | str
) -> None:
    """Another node deleted an answer, hid a question and read an answer since this node read them: this
    node's saves of its copies (a receipt, a slow-response alert) change none of that; an unhide does."""
    q1, q2 = question("q1", "asker", 10), question("q2", "asker", 11)
    a1, a2, a3 = (Answer(f"a{i}", "q1", "jun", "Jun", "hi", 20 + i, "sent", None, None, False) for i in (1, 2, 3))
    store.apply([SaveUser(User("asker", "Mina")), SaveUser(User("jun", "Jun")), SaveQuestion(q1), SaveQuestion(q2)])
    store.apply([SaveAnswer(a1), SaveAnswer(a2), SaveAnswer(a3)])
    store.apply(
        [
            SaveAnswer(attrs.evolve(a1, state="read", delivered_at=30, read_at=40, accepted=True)),
            SaveAnswer(attrs.evolve(a2, deleted_at=50)),
            SaveAnswer(attrs.evolve(a3, deleted_at=55, hidden=True)),
            SaveQuestion(attrs.evolve(q2, deleted_at=60, hidden=True)),
        ]
    )

    store.apply(
        [
            SaveAnswer(attrs.evolve(a1, state="delivered", delivered_at=35)),
            SaveAnswer(attrs.evolve(a2, state="read", delivered_at=36, read_at=36)),
            SaveAnswer(attrs.evolve(a3, deleted_at=70)),  # its author's delete, after the hide
            SaveQuestion(attrs.evolve(q2, alerted_at=80)),
        ]
    )

    answer = "SELECT answer_id, state, delivered_at, read_at, accepted, deleted_at, hidden FROM answers ORDER BY 1"
    assert db_rows(db, answer) == [
        ("a1", "read", 30, 40, 1, None, 0),
        ("a2", "read", 36, 36, 0, 50, 0),
        ("a3", "sent", None, None, 0, 55, 1),
    ]
    question_row = "SELECT deleted_at, hidden, alerted_at FROM questions WHERE question_id = 'q2'"
    assert db_rows(db, question_row) == [(60, 1, 80)]
    store.apply([SaveQuestion(attrs.evolve(q2, alerted_at=80), unhide=True), SaveAnswer(a3, unhide=True)])
    assert db_rows(db, question_row) == [(None, 0, 80)]
    assert db_rows(db, "SELECT deleted_at, hidden FROM answers WHERE answer_id = 'a3'") == [(None, 0)]


def test_a_question_saved_again_in_the_commit_that_creates_and_answers_it_is_counted_once(
    store: Storage, db: Path | str
) -> None:
    created = question("q1", "asker", 10)
    later = attrs.evolve(created, status=QuestionStatus.ANSWERED, answer_count=1, first_answer_at=20, hidden=True)
    writes = [SaveUser(User("asker", "Mina")), SaveQuestion(created), CountAnswer("q1", 1, answered_at=20)]
    store.apply([*writes, SaveQuestion(later)])

    (loaded,) = store.load(hot_since=0).questions
    assert (loaded.status, loaded.answer_count, loaded.first_answer_at, loaded.hidden) == (
        QuestionStatus.ANSWERED,
        1,
        20,
        True,
    )


def test_an_answer_taken_down_twice_or_shown_twice_is_counted_once(store: Storage, db: Path | str) -> None:
    """Its author deletes it and an admin hides it (two nodes: two commits; one node's retry: maybe one
    commit); two admins show it again: the question's count changes once each way (it went two down)."""
    store.apply(
        [SaveUser(User("asker", "Mina")), SaveUser(User("jun", "Jun")), SaveQuestion(question("q1", "asker", 10))]
    )
    answers = [Answer(aid, "q1", "jun", "Jun", aid, 20 + i) for i, aid in enumerate(("a1", "a2"))]
    for answer in answers:
        store.apply([SaveAnswer(answer), CountAnswer("q1", 1, answered_at=answer.created_at)])
    a1, a2 = answers

    def down(answer: Answer, at: int) -> list[object]:
        return [SaveAnswer(attrs.evolve(answer, deleted_at=at)), CountAnswer("q1", -1, answer_id=answer.answer_id)]

    row = "SELECT answer_count, status FROM questions WHERE question_id = 'q1'"
    store.apply([*down(a1, 30), *down(a1, 31)])
    assert db_rows(db, row) == [(1, "answered")]
    store.apply(down(a2, 32))
    store.apply(down(a2, 33))
    assert db_rows(db, row) == [(0, "open")]
    for _ in range(2):
        store.apply([SaveAnswer(a2, unhide=True), CountAnswer("q1", 1, answer_id="a2")])
    assert db_rows(db, row) == [(1, "answered")]


def test_moderation_and_push_rows_round_trip(store: Storage, db: Path | str) -> None:
    """The one-row-at-a-time statements (reports, IP blocks, push status) beside the multi-row ones."""
    report = Report("r1", "answer", "a1", "q1", "mina", "spam", "", 5)
    store.apply(
        [
            SaveReport(report),
            SaveIpBlock(IpBlock("10.0.0.0/8", None, "abuse", "admin", 5)),
            SaveIpBlock(IpBlock("192.0.2.1/32", 99, "spam", "admin", 5)),
            AppendAudit(5, "admin", "block_ip", "10.0.0.0/8", "abuse"),
            *(EnqueuePush(PushJob(i, f"u{i}", "answer_notification", i == 1, {"i": i}, 5)) for i in (1, 2, 3)),
        ]
    )
    store.apply(
        [
            SaveReport(Report("r1", "answer", "a1", "q1", "mina", "spam", "", 5, "resolved", "admin", 6, "dismiss")),
            SaveReport(Report("r2", "question", "q1", "q1", "jun", "wrong", "note", 7)),
            SaveIpBlock(IpBlock("10.0.0.0/8", 50, "abuse, for a while", "admin", 6)),
            DeleteIpBlock("192.0.2.1/32"),
            SavePushStatus(1, "sent", 1, None, 6),
            SavePushStatus(2, "failed", 3, "gateway said 500", 6),
        ]
    )
    loaded = store.load(hot_since=0)

    assert [(r.report_id, r.status) for r in loaded.open_reports] == [("r2", "open")]
    assert loaded.ip_blocks == [IpBlock("10.0.0.0/8", 50, "abuse, for a while", "admin", 6)]
    assert [(j.job_id, j.urgent, j.payload) for j in loaded.pending_pushes] == [(3, False, {"i": 3})]
    if isinstance(db, Path):
        assert loaded.last_push_job_id == 3
    else:  # a fresh block of ids, above every id given (test_cluster.py)
        assert loaded.last_push_job_id > 3 and loaded.last_push_job_id % (1 << 32) == 0
    assert store.pending_push_jobs(0, 10) == loaded.pending_pushes
    assert db_rows(db, "SELECT status, attempts, last_error FROM push_outbox ORDER BY job_id")[:2] == [
        ("sent", 1, None),
        ("failed", 3, "gateway said 500"),
    ]
    assert db_rows(db, "SELECT id, action, target FROM audit_log") == [(1, "block_ip", "10.0.0.0/8")]
    assert db_rows(db, "SELECT status, action FROM reports WHERE report_id = 'r1'") == [("resolved", "dismiss")]


def test_a_refused_commit_leaves_nothing_and_writes_work_at_once(store: Storage, db: Path | str) -> None:
    store.apply([SaveUser(User("u", "U"))])
    store.apply([AppendEvent("u", seq, "answer_notification", {"n": seq, "text": "한라산"}, seq) for seq in (1, 2, 3)])
    with pytest.raises(WriteFailed):
        # An answer counted on a question that is not there: the whole commit is refused, the new user too.
        store.apply([SaveUser(User("v", "V")), AppendEvent("u", 4, "x", {}, 9), CountAnswer("q?", 1, answered_at=9)])
    store.probe()  # writes work again at once
    store.apply([AppendEvent("u", 4, "receipt", {"n": 4}, 4)])

    rows = store.read_event_rows([("u", 1, 10)])["u"]
    assert [(seq, kind, msgpack.unpackb(data)) for seq, kind, data in rows] == [
        (2, "answer_notification", {"n": 2, "text": "한라산"}),
        (3, "answer_notification", {"n": 3, "text": "한라산"}),
        (4, "receipt", {"n": 4}),
    ]
    loaded = store.load(hot_since=0)
    assert [u.user_id for u in loaded.users] == ["u"]
    assert (loaded.users[0].last_seq, loaded.oldest_seqs) == (4, {"u": 1})
    assert db_rows(db, "SELECT count(*) FROM events") == [(4,)]


def test_heads_are_each_users_newest_seq_even_after_pruning(store: Storage) -> None:
    store.apply([AppendEvent("old", seq, "x", {}, 100 + seq) for seq in (1, 2, 3)])
    store.apply([AppendEvent("new", 1, "x", {}, 10_000)])
    store.prune_events(before_ms=1_000, limit=100)

    assert store.read_heads(["old", "new", "none", "old"]) == {"new": 1, "none": 0, "old": 3}
    assert store.read_oldest(["old", "new", "none"]) == {"new": 1, "old": 3}


def test_pruning_keeps_each_users_newest_event(store: Storage) -> None:
    store.apply([AppendEvent("old", seq, "x", {}, 100 + seq) for seq in (1, 2, 3)])
    store.apply([AppendEvent("new", 1, "x", {}, 10_000), AppendEvent("lone", 1, "x", {}, 5)])

    assert store.prune_events(before_ms=1_000, limit=1) == {"old": 2}
    assert store.prune_events(before_ms=1_000, limit=100) == {"old": 3}  # "lone" keeps its only (newest) one
    assert store.prune_events(before_ms=1_000, limit=100) == {}
    loaded = store.load(hot_since=0)
    assert loaded.oldest_seqs == {"old": 3, "new": 1, "lone": 1}


def test_a_commit_of_many_rows_goes_in_power_of_two_statements(store: Storage, db: Path | str) -> None:
    n = 3 * MAX_ROWS_PER_STATEMENT + 5
    batch = store.prepare([AppendEvent(f"u{i % 7}", i // 7 + 1, "x", {"i": i}, i) for i in range(n)])
    if batch.appends is None:
        sizes = [len(params) // 5 for sql, params, _many in batch.statements if sql.startswith("INSERT INTO events ")]
        assert sum(sizes) == n and all(size & (size - 1) == 0 for size in sizes)
    else:  # PostgreSQL: one statement gives the seqs and inserts every event (InboxAppends), arrays as parameters
        assert len(batch.appends.statement[1]["datas"]) == n
    store.commit(batch)
    assert db_rows(db, "SELECT count(*), sum(seq), max(seq) FROM events") == [
        (n, sum(i // 7 + 1 for i in range(n)), (n - 1) // 7 + 1)
    ]


@pytest.mark.backends("postgres")
def test_cluster_nodes_share_a_postgresql_database_and_a_pre_cluster_node_is_refused(
    store: Storage, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes hold the node lock shared: a second opens beside the first. A dongne from before clusters took
    it exclusively: it cannot get it while a node runs, and a node cannot start while it holds it."""
    import psycopg

    from dongne.store import DatabaseInUseError, _postgres

    monkeypatch.setattr(_postgres, "NODE_LOCK_WAIT_S", 0.2)
    second = store_for(db)
    second.open()
    with psycopg.connect(db, autocommit=True) as old:
        assert old.execute("SELECT pg_try_advisory_lock(%s)", (_postgres.NODE_LOCK,)).fetchone() == (False,)
        store.close()
        second.close()
        assert old.execute("SELECT pg_try_advisory_lock(%s)", (_postgres.NODE_LOCK,)).fetchone() == (True,)
        third = store_for(db)
        with pytest.raises(DatabaseInUseError) as refused:
            third.open()
        assert "one node per database" in str(refused.value) and "pid" in str(refused.value)
    third.open()  # the old version's lock went with its session
    third.close()


@pytest.mark.backends("postgres")
def test_a_newer_postgresql_schema_is_refused(db: str) -> None:
    from dongne.store import StoreError

    first = store_for(db)
    first.open()  # creates the schema
    first.close()
    db_rows(db, "UPDATE dongne_schema SET version = 999 RETURNING version")
    with pytest.raises(StoreError, match="newer than this dongne"):
        store_for(db).open()


def test_a_database_keeps_the_random_incarnation_its_creation_gave_it(store: Storage, db: Path | str) -> None:
    """Push job ids are unique within one incarnation (their Idempotency-Keys name both): every open reads the
    one the schema's creation drew (a restore draws another: test_push.py)."""
    again = store_for(db)
    again.open()
    again.close()

    assert len(store.incarnation) == 32 and int(store.incarnation, 16) >= 0
    assert again.incarnation == store.incarnation == db_rows(db, "SELECT incarnation FROM store_incarnation")[0][0]


def test_urls_in_logs_and_errors_carry_no_password() -> None:
    from dongne.store._postgres import redact

    assert redact("postgresql://dongne:s3cret@db:5432/dongne") == "postgresql://dongne:***@db:5432/dongne"
    assert (
        redact("postgres://u:p@h/d?sslmode=require&password=x&a=b")
        == "postgres://u:***@h/d?sslmode=require&password=***&a=b"
    )
    assert redact("postgresql:///dongne?host=/run/postgresql") == "postgresql:///dongne?host=/run/postgresql"


def test_a_take_down_or_a_ban_cancels_the_pending_push_jobs_about_it(store: Storage, db: Path | str) -> None:
    """``CancelPushes`` by question, by question and answer, or by target user: only pending rows change."""

    def job(i: int, user: str, question: str, answer: str = "") -> EnqueuePush:
        return EnqueuePush(
            PushJob(i, user, "answer_notification", False, {}, 5, question_id=question, answer_id=answer)
        )

    store.apply([job(1, "u1", "q1"), job(2, "u2", "q1", "a1"), job(3, "u2", "q2", "a2"), job(4, "u3", "q2", "a3")])
    store.apply([SavePushStatus(4, "sent", 1, None, 6)])
    store.apply([CancelPushes(7, question_id="q2", answer_id="a2"), job(5, "u4", "q3")])
    store.apply([CancelPushes(8, user_id="u4"), CancelPushes(8, question_id="q1"), job(6, "u5", "q1")])

    assert db_rows(db, "SELECT job_id, status, updated_at FROM push_outbox ORDER BY job_id") == [
        (1, "cancelled", 8),
        (2, "cancelled", 8),
        (3, "cancelled", 7),
        (4, "sent", 6),
        (5, "cancelled", 8),
        (6, "cancelled", 8),  # made in the commit that cancels its question's: cancelled too
    ]
    assert store.pending_push_jobs(0, 10) == []
    store.apply([job(7, "u6", "q4"), job(8, "u6", "q4")])
    assert store.expire_push_jobs(6) == 2  # type: ignore[attr-defined]  # pending, made at 5
    # Settled before 8: the sent one, the two expired at 6, job 3 (at 7); but the newest job (8) stays, as
    # job ids are numbered on from the highest kept and must never be given twice.
    assert store.prune_pushes(8, 100) == 3
    assert [r[0] for r in db_rows(db, "SELECT job_id FROM push_outbox ORDER BY job_id")] == [1, 2, 5, 6, 8]
