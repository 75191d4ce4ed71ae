"""A restart loses nothing: questions, answers, points, inboxes; resume replays exactly what was missed."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest
import trio

from dongne.store import is_postgres_url, store_for
from dongne.store._base import (
    LOAD_ANSWERS,
    LOAD_ESCALATIONS,
    LOAD_NOTIFIED,
    LOAD_QUESTIONS,
    LOAD_UNDELIVERED,
    PRUNE_NOTIFIED,
    statement_for,
)

from .conftest import db_rows, question_data

pytestmark = pytest.mark.backends("sqlite", "postgres")


async def test_everything_survives_a_restart_and_resume_replays_the_gap(start_server) -> None:  # type: ignore[no-untyped-def]
    h = await start_server()
    async with h.connect("asker") as asker, h.connect("local") as local:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        aid = (await local.request("create_answer", {"question_id": qid, "content": "first"}))["answer"]["answer_id"]
        first = await asker.next_event("answer_notification")
        assert first["seq"] == 1
        seen = asker.last_seq
    # The asker is offline now; two more answers arrive and one is accepted.
    async with h.connect("local") as local, h.connect("other") as other:
        await local.request("create_answer", {"question_id": qid, "content": "second"})
        await other.request("create_answer", {"question_id": qid, "content": "third"})
    async with h.connect("asker") as asker:
        await asker.request("accept_answer", {"question_id": qid, "answer_id": aid})
    await h.running.aclose()

    h2 = await start_server()
    async with h2.connect("asker", resume_from=seen) as asker:
        assert asker.hello["last_seq"] == 3
        replayed = [await asker.next_event("answer_notification") for _ in range(2)]
        assert [e["seq"] for e in replayed] == [2, 3]
        assert [e["data"]["answer"]["content"] for e in replayed] == ["second", "third"]
        state = await asker.request("join_question", {"question_id": qid})
        assert state["question"]["status"] == "resolved"
        assert state["question"]["accepted_answer_id"] == aid
        assert [a["content"] for a in state["answers"]] == ["first", "second", "third"]
        assert [a["accepted"] for a in state["answers"]] == [True, False, False]
        assert asker.pending_events() == []  # nothing replayed twice
    async with h2.connect("local", resume_from=0) as local:
        assert local.hello["user"]["points"] == 10
        accepted = await local.next_event("answer_accepted_notification")
        assert accepted["seq"] == 1
        assert accepted["data"]["answer_id"] == aid
    await h2.running.aclose()

    assert db_rows(h2.db, "SELECT count(*) FROM events") == [(4,)]
    if not is_postgres_url(str(h2.db)):
        with sqlite3.connect(h2.db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    else:  # the heads agree with the inbox: each user's newest seq
        heads = db_rows(h2.db, "SELECT user_id, last_seq FROM inbox_heads ORDER BY user_id")
        assert heads == db_rows(h2.db, "SELECT user_id, max(seq) FROM events GROUP BY user_id ORDER BY user_id")


async def test_resume_delivers_missed_then_live_events_in_order(start_server) -> None:  # type: ignore[no-untyped-def]
    h = await start_server()
    async with h.connect("asker") as asker:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
    async with h.connect("local") as local:
        for i in range(30):
            await local.request("create_answer", {"question_id": qid, "content": f"answer {i}"})
        async with h.connect("asker", resume_from=10) as asker:
            # Live answers while the replay of 11..30 is in flight.
            for i in range(30, 40):
                await local.request("create_answer", {"question_id": qid, "content": f"answer {i}"})
            got = [await asker.next_event("answer_notification") for _ in range(29)]
            assert [e["seq"] for e in got] == list(range(11, 40))
            assert [e["data"]["answer"]["content"] for e in got] == [f"answer {i}" for i in range(10, 39)]
    await h.running.aclose()


async def test_old_question_is_loaded_on_demand(start_server) -> None:  # type: ignore[no-untyped-def]
    h = await start_server()
    async with h.connect("asker") as asker:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        await asker.request("close_question", {"question_id": qid})
    await h.running.aclose()
    # Keep only questions from the last millisecond-ish in memory: the closed one is not loaded.
    h2 = await start_server(engine={"hot_question_days": 1e-9}, alerts={"slo_window_days": 1e-9})
    assert qid not in h2.running.engine.questions
    async with h2.connect("reader") as reader:
        state = await reader.request("join_question", {"question_id": qid})
        assert state["question"]["status"] == "closed"
    await h2.running.aclose()


@pytest.mark.backends("sqlite")
async def test_inboxes_written_by_schema_3_survive_the_upgrade(start_server) -> None:  # type: ignore[no-untyped-def]
    h = await start_server()
    async with h.connect("asker") as asker:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
    async with h.connect("local") as local:
        for i in range(3):
            await local.request("create_answer", {"question_id": qid, "content": f"answer {i}"})
    await h.running.aclose()
    # Put the inbox back in schema 3's shape: one WITHOUT ROWID table keyed by (user_id, seq).
    with sqlite3.connect(h.db) as conn:
        conn.executescript(
            """
            CREATE TABLE events_v3 (user_id TEXT NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL,
                data BLOB NOT NULL, created_at INTEGER NOT NULL, PRIMARY KEY (user_id, seq)) WITHOUT ROWID;
            INSERT INTO events_v3 SELECT user_id, seq, type, data, created_at FROM events;
            DROP TABLE events;
            ALTER TABLE events_v3 RENAME TO events;
            -- and undo what the later migrations added elsewhere
            DROP TABLE store_probe;
            DROP INDEX questions_by_asker;
            DROP INDEX questions_by_region;
            DROP INDEX questions_listed;
            DROP INDEX questions_open;
            DROP INDEX questions_open_by_region;
            DROP INDEX answers_by_author;
            ALTER TABLE questions DROP COLUMN deleted_at;
            ALTER TABLE answers DROP COLUMN deleted_at;
            ALTER TABLE users DROP COLUMN read_seq;
            DROP TABLE audit_log;
            DROP TABLE reports;
            DROP TABLE ip_blocks;
            ALTER TABLE questions DROP COLUMN hidden;
            ALTER TABLE answers DROP COLUMN hidden;
            ALTER TABLE users DROP COLUMN banned_until;
            ALTER TABLE users DROP COLUMN ban_reason;
            DROP TABLE signin_codes_used;
            ALTER TABLE push_outbox DROP COLUMN node_id;
            DROP INDEX push_pending_by_question;
            DROP INDEX push_pending_by_user;
            ALTER TABLE push_outbox DROP COLUMN question_id;
            ALTER TABLE push_outbox DROP COLUMN answer_id;
            DROP TABLE store_incarnation;
            PRAGMA user_version = 3;
            """
        )

    h2 = await start_server()
    async with h2.connect("asker", resume_from=1) as asker, h2.connect("local") as local:
        assert asker.hello["last_seq"] == 3
        replayed = [await asker.next_event("answer_notification") for _ in range(2)]
        assert [e["seq"] for e in replayed] == [2, 3]
        assert [e["data"]["answer"]["content"] for e in replayed] == ["answer 1", "answer 2"]
        await local.request("create_answer", {"question_id": qid, "content": "after the upgrade"})
        live = await asker.next_event("answer_notification")
        assert (live["seq"], live["data"]["answer"]["content"]) == (4, "after the upgrade")
    await h2.running.aclose()
    with sqlite3.connect(h2.db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM events WHERE user_id = 'asker'").fetchone()[0] == 4
        # The log keeps the seq rule: a second row for (user, seq) is refused.
        try:
            conn.execute("INSERT INTO events (user_id, seq, type, data, created_at) VALUES ('asker', 4, 'x', x'80', 0)")
        except sqlite3.IntegrityError:
            pass
        else:
            raise AssertionError("a duplicate (user_id, seq) was stored")


@pytest.mark.backends("sqlite")
async def test_the_wal_is_checkpointed_beside_the_committer(start_server) -> None:  # type: ignore[no-untyped-def]
    from dongne.pipeline import WAL_CHECKPOINT_COMMITS

    h = await start_server(store={"synchronous": "NORMAL"})
    store = h.running.store
    async with h.connect("local", local=True) as local:
        for i in range(WAL_CHECKPOINT_COMMITS + 10):  # one commit each
            await local.request("update_settings", {"max_alerts_per_hour": 1 + i % 50})
        with trio.fail_after(10):
            while store.checkpoints == 0:  # the checkpointer runs between commits: keep committing
                await local.request("update_settings", {"max_alerts_per_hour": 1 + (WAL_CHECKPOINT_COMMITS + 9) % 50})
        assert store.commits > WAL_CHECKPOINT_COMMITS
    await h.running.aclose()
    # The writer never checkpointed on its own (that is what stalled commits).
    with sqlite3.connect(h.db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert (
            conn.execute("SELECT max_alerts_per_hour FROM users WHERE user_id = 'local'").fetchone()[0]
            == 1 + (WAL_CHECKPOINT_COMMITS + 9) % 50
        )


async def test_an_answer_sent_before_a_restart_is_delivered_when_its_asker_comes_back(start_server) -> None:  # type: ignore[no-untyped-def]
    """Receipts survive a restart: an answer its asker had not received yet turns ``delivered`` at the asker's
    next hello on the new server, and its author hears it."""
    h = await start_server()
    async with h.connect("asker") as asker:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
    async with h.connect("author") as author:
        answer = await author.request("create_answer", {"question_id": qid, "content": "Try Dongmun market"})
        aid = answer["answer"]["answer_id"]
        assert answer["answer"]["state"] == "sent"
    await h.running.aclose()

    h2 = await start_server()
    async with h2.connect("author") as author:
        async with h2.connect("asker"):
            receipt = await author.next_event("receipt")
        assert (receipt["data"]["answer_id"], receipt["data"]["state"]) == (aid, "delivered")
        assert [(a["answer_id"], a["state"]) for a in (await author.request("my_answers", {}))["answers"]] == [
            (aid, "delivered")
        ]
    await h2.running.aclose()
    assert db_rows(h2.db, "SELECT answer_id, state FROM answers") == [(aid, "delivered")]


#: Start-up reads with the parameters they take (``hot_since``, ms).
START_UP_READS = [
    (LOAD_QUESTIONS, (HOT_SINCE := 19_800,)),
    (LOAD_ANSWERS, (HOT_SINCE,)),
    (LOAD_UNDELIVERED, (HOT_SINCE,)),
    (LOAD_ESCALATIONS, ()),
    (LOAD_NOTIFIED, (HOT_SINCE, HOT_SINCE)),
    (PRUNE_NOTIFIED, (HOT_SINCE, 1000)),  # and the pruner's, oldest first
]

#: A history: 20,000 questions, 1% of them still active, each with two answers, its escalation and five alerts.
SEED = [
    "WITH RECURSIVE i(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM i WHERE n < 20000)"
    " INSERT INTO users (user_id, nick, local, tags, role, points, last_seq, created_at)"
    " SELECT 'u' || n, 'n', 0, '[]', 'user', 0, 0, 0 FROM i WHERE n <= 200",
    "WITH RECURSIVE i(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM i WHERE n < 20000)"
    " INSERT INTO questions (question_id, asker_id, asker_nick, title, body, lat, lng, region, hashtags, urgency,"
    " status, created_at, answer_count)"
    " SELECT 'q' || n, 'u' || (n % 200 + 1), 'n', 't', 'b', 33.5, 126.5, 'r', '[]', 'normal',"
    " CASE WHEN n % 100 = 0 THEN 'open' WHEN n % 3 = 0 THEN 'expired' ELSE 'closed' END, n, 2 FROM i",
    "WITH RECURSIVE i(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM i WHERE n < 40000)"
    " INSERT INTO answers (answer_id, question_id, author_id, author_nick, content, created_at, state, accepted)"
    " SELECT 'a' || n, 'q' || (n % 20000 + 1), 'u' || (n % 200 + 1), 'n', 'c', n, 'sent', 0 FROM i",
    "INSERT INTO escalations (question_id, next_stage, updated_at) SELECT question_id, 3, created_at FROM questions",
    "WITH RECURSIVE i(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM i WHERE n < 100000)"
    " INSERT INTO notified (question_id, user_id, stage, distance_m, online, at)"
    " SELECT 'q' || (n / 5 + 1), 'u' || n, 'QUICK', 10.0, 1, n / 5 FROM i",
]


def test_start_up_reads_search_indexes_never_the_whole_history(db: str) -> None:
    """Every read at start-up (and at each reload) reaches what is active or recent through an index: its
    cost follows those, not the history (one ``notified`` row per alert ever sent, every question)."""
    store = store_for(db)
    store.open()
    store.close()
    if is_postgres_url(str(db)):
        import psycopg

        from dongne.store._postgres import _pg

        with psycopg.connect(str(db), autocommit=True) as conn:
            for statement in SEED:
                conn.execute(statement.encode())
            conn.execute(b"ANALYZE")
            # On a history this small PostgreSQL rightly reads some table whole (answers: a hash join
            # beats 700 index probes); with sequential scans priced out, each part must still have an
            # index to go by, which is what the statements' shape decides.
            conn.execute(b"SET enable_seqscan = off")
            for statement, params in START_UP_READS:
                sql = _pg(statement_for(statement, "postgres"))
                steps = "\n".join(str(row[0]) for row in conn.execute(("EXPLAIN " + sql).encode(), params))
                assert "Index" in steps and "Seq Scan" not in steps, (sql, steps)
        return
    with closing(sqlite3.connect(db)) as conn:
        for statement in SEED:
            conn.execute(statement)
        conn.commit()
        # Without statistics (as the server runs) and with them (after an operator's ANALYZE or optimize).
        for analysed in (False, True):
            if analysed:
                conn.execute("ANALYZE")
            for statement, params in START_UP_READS:
                sql = statement_for(statement, "sqlite")
                steps = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
                # Only searches: no SCAN, not even of an index.
                tables = [s for s in steps if s.startswith(("SCAN", "SEARCH"))]
                assert tables and all(s.startswith("SEARCH") for s in tables), (analysed, sql, steps)
            # The alerts' two parts cannot overlap: no temporary B-tree removes duplicates from the recent ones.
            steps = [
                row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement_for(LOAD_NOTIFIED, "sqlite"), (1, 1))
            ]
            assert not [s for s in steps if "TEMP B-TREE" in s], steps
