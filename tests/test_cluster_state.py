"""Questions and users another node changes (store/CLUSTER.md), over real sockets and real databases.

"Another node" is SQL from the test, on a connection of its own: it changes rows as another ``dongne serve``
would, with or without its notifications.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import attrs
import msgpack
import pytest
import trio
import trio.testing
import trio_websocket

from dongne.client import DongneClient, RequestError
from dongne.core.effects import (
    AcceptOnce,
    AddPoints,
    CloseOnce,
    CountAnswer,
    RoomNews,
    SaveAnswer,
    SaveEscalation,
    SaveNotified,
    SaveQuestion,
    SaveUser,
)
from dongne.core.lifecycle import QuestionStatus
from dongne.core.moderation import FOREVER
from dongne.core.records import Answer, Question, User
from dongne.store import is_postgres_url, store_for
from dongne.store._rows import USER_COLS
from dongne.store._writes import (
    NOTIFY_PAYLOAD_LIMIT,
    alerts_news,
    changes_news,
    prepare_writes,
    read_alerts_news,
    read_changes_news,
    read_room_news,
    room_news,
)

from .conftest import JEJU_CITY, Harness, db_rows, question_data, token


def other_node_runs(db: Path | str, sql: str, params: tuple[Any, ...] = ()) -> None:
    """Commit one statement (``?`` parameters) as another node would, on either backend."""
    if is_postgres_url(str(db)):
        import psycopg

        with psycopg.connect(str(db), autocommit=True) as conn:
            conn.execute(sql.replace("?", "%s"), params)
        return
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        conn.execute(sql, params)
        conn.commit()


def other_node_accepts(db: Path | str, question_id: str, answer_id: str) -> None:
    """Another node's accept of ``answer_id``, without its news: the question resolved in the store."""
    other_node_runs(
        db,
        "UPDATE questions SET status = 'resolved', accepted_answer_id = ?, closed_at = ? WHERE question_id = ?",
        (answer_id, 1_000, question_id),
    )


async def answered_twice(h: Harness, asker: DongneClient) -> tuple[str, str, str]:
    """A question of the asker's with answers by "local" and "other": ``(question, local's, other's)``."""
    qid: str = (await asker.request("create_question", question_data()))["question"]["question_id"]
    ids = []
    for author in ("local", "other"):
        async with h.connect(author) as client:
            reply = await client.request("create_answer", {"question_id": qid, "content": f"ask {author}"})
            ids.append(reply["answer"]["answer_id"])
    return qid, ids[0], ids[1]


@pytest.mark.backends("sqlite", "postgres")
async def test_an_accept_another_node_made_first_refuses_this_one_with_conflict(start_server: Any) -> None:
    """The asker accepted local's answer on another node; accepting other's here is refused with
    ``conflict``, and by then memory holds the store's question (the winner), nothing of the refused
    accept is stored, and writes go on."""
    h: Harness = await start_server()
    readiness: set[bool] = set()
    watching = True

    async def watch_ready() -> None:  # at every step of the loop: the reload after the conflict included
        while watching:
            readiness.add(h.running.clients.ready)
            await trio.lowlevel.checkpoint()

    async with h.connect("asker") as asker, trio.open_nursery() as nursery:
        qid, local_answer, other_answer = await answered_twice(h, asker)
        other_node_accepts(h.db, qid, local_answer)

        nursery.start_soon(watch_ready)
        with pytest.raises(RequestError) as refused:
            await asker.request("accept_answer", {"question_id": qid, "answer_id": other_answer})
        watching = False
        # The database worked all along: /ready stayed 200 (PROTOCOL.md: "no storage_alert, no 503").
        assert readiness == {True}

        assert refused.value.code == "conflict" and refused.value.error["question_id"] == qid
        question = h.running.engine.questions[qid]
        assert (question.status, question.accepted_answer_id) == (QuestionStatus.RESOLVED, local_answer)
        seen = await asker.request("get_question", {"question_id": qid})
        assert seen["question"]["accepted_answer_id"] == local_answer
        assert h.running.engine.users["other"].points == 0
        assert h.running.clients.writable
        await asker.request("create_question", question_data(title="And a second question, after the race"))
        with pytest.raises(RequestError) as again:  # now known here: the engine's own answer
            await asker.request("accept_answer", {"question_id": qid, "answer_id": other_answer})
        assert again.value.code == "already_accepted"

    assert db_rows(h.db, "SELECT accepted_answer_id FROM questions WHERE question_id = ?", (qid,)) == [(local_answer,)]
    assert db_rows(h.db, "SELECT points FROM users WHERE user_id = 'other'") == [(0,)]
    assert db_rows(h.db, "SELECT count(*) FROM questions") == [(2,)]
    assert "dongne_question_conflicts_total 1.0" in h.running.clients.metrics.render().decode()


@pytest.mark.backends("sqlite", "postgres")
async def test_points_another_node_gave_the_same_author_add_up_with_this_nodes(start_server: Any) -> None:
    """Another node accepted one of local's answers (+10) since this node read local's row; accepting
    local's answer here adds 10 more: the author ends with 20, not with this node's 10."""
    h: Harness = await start_server()
    async with h.connect("asker") as asker:
        qid, local_answer, _ = await answered_twice(h, asker)
        other_node_runs(h.db, "UPDATE users SET points = points + 10 WHERE user_id = 'local'")

        await asker.request("accept_answer", {"question_id": qid, "answer_id": local_answer})
        async with h.connect("local") as local:  # a later save of local's row keeps the points too
            await local.request("update_settings", {"quiet_hours": [22, 7]})

    assert db_rows(h.db, "SELECT points FROM users WHERE user_id = 'local'") == [(20,)]


def test_a_new_users_first_save_gives_its_points_and_later_ones_leave_them() -> None:
    """A user created and given points in one commit: the insert takes the first save's points (before the
    AddPoints), so the points are not counted twice."""
    writes = [
        SaveUser(User("u", "U", points=0)),
        AddPoints("u", 10),
        SaveUser(User("u", "U", points=10)),
    ]
    batch = prepare_writes(writes, 999)
    inserts = [params for sql, params, _ in batch.statements if sql.startswith("INSERT INTO users")]
    adds = [params for sql, params, _ in batch.statements if sql.startswith("UPDATE users SET points")]
    assert len(inserts) == 1 and inserts[0][[c.strip() for c in USER_COLS.split(",")].index("points")] == 0
    assert adds == [[(10, "u")]]


@pytest.mark.backends("sqlite", "postgres")
async def test_an_answer_to_a_question_another_node_closed_is_refused_with_conflict(start_server: Any) -> None:
    h: Harness = await start_server()
    async with h.connect("asker") as asker, h.connect("local") as local:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        other_node_runs(h.db, "UPDATE questions SET status = 'closed', closed_at = 1000 WHERE question_id = ?", (qid,))

        with pytest.raises(RequestError) as refused:
            await local.request("create_answer", {"question_id": qid, "content": "Too late, it seems"})

        assert refused.value.code == "conflict"
        assert h.running.engine.questions[qid].status == QuestionStatus.CLOSED
        with pytest.raises(RequestError) as again:
            await local.request("create_answer", {"question_id": qid, "content": "Too late, it seems"})
        assert again.value.code == "question_closed"
    assert db_rows(h.db, "SELECT count(*), 0 FROM answers") == [(0, 0)]
    assert db_rows(h.db, "SELECT answer_count FROM questions") == [(0,)]


@pytest.mark.backends("sqlite", "postgres")
@pytest.mark.parametrize("op", ["create_answer", "accept_answer", "close_question"])
async def test_a_write_to_a_question_another_node_deleted_is_refused_with_conflict(start_server: Any, op: str) -> None:
    """The asker deleted the question on another node (its news not read here): an answer, accept or close
    here is refused with ``conflict`` and the question leaves memory. A delete leaves the status as it was,
    and the guards read the status alone: the answer was stored under the deleted question, and acknowledged."""
    h: Harness = await start_server()
    async with h.connect("asker") as asker:
        qid, local_answer, _ = await answered_twice(h, asker)
        other_node_runs(h.db, "UPDATE questions SET deleted_at = 1000 WHERE question_id = ?", (qid,))
        request = {
            "create_answer": ("local", {"question_id": qid, "content": "Just in time?"}),
            "accept_answer": ("asker", {"question_id": qid, "answer_id": local_answer}),
            "close_question": ("asker", {"question_id": qid}),
        }
        user, data = request[op]
        async with h.connect(user) as client:
            with pytest.raises(RequestError) as refused:
                await client.request(op, data)

            assert refused.value.code == "conflict"
            assert qid not in h.running.engine.questions
            with pytest.raises(RequestError) as again:
                await client.request(op, data)
            assert again.value.code == "not_found"
    row = "SELECT status, answer_count, accepted_answer_id, deleted_at FROM questions WHERE question_id = ?"
    assert db_rows(h.db, row, (qid,)) == [("answered", 2, None, 1000)]
    assert db_rows(h.db, "SELECT count(*) FROM answers WHERE question_id = ?", (qid,)) == [(2,)]


# ---- questions and users another node changed (PostgreSQL: notifications and the catch-up) -------------

OTHER_NODE = "node-b-4242-abcdef"


def other_node_commits(db: Path | str, writes: list[Any], *, notify: bool = True) -> None:
    """Commit ``writes`` as another node would (its statements, its ``dongne_changes`` news unless not)."""
    import psycopg

    batch = prepare_writes(writes, 65535, "postgres", news_from=OTHER_NODE if notify else None)
    with psycopg.connect(str(db)) as conn, conn.transaction():
        for sql, params, many in batch.statements:
            if many is True:
                conn.cursor().executemany(sql, params)
            else:
                conn.execute(sql, params)


async def until(condition: Any, timeout: float = 10.0) -> None:
    """Wait (bounded) for what another session's commit causes here."""
    with trio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - changed by another session, announced or caught up
            await trio.sleep(0.01)


async def next_of(client: DongneClient, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while True:
            frame = await client.next_event()
            if frame["type"] == kind:
                return frame


@pytest.mark.backends("postgres")
async def test_a_question_another_node_creates_answers_and_resolves_is_seen_here(start_server: Any) -> None:
    """Announced on dongne_changes: the question is listed nearby and joinable here, its answer appears, and
    the accept ends it here (the room hears question_closed, its copy is resolved)."""
    h: Harness = await start_server()
    engine = h.running.engine
    now = int(time.time() * 1000)
    asked = Question("q-elsewhere", "asker", "Asker", "Open late?", "", 33.4996, 126.5312, None, (), "normal", now)
    other_node_commits(h.db, [SaveUser(User("asker", "Asker", created_at=now)), SaveQuestion(asked)])
    await until(lambda: "q-elsewhere" in engine.questions)

    async with h.connect("local") as local:
        nearby = await local.request("nearby_questions", {"location": JEJU_CITY})
        assert [q["question_id"] for q in nearby["questions"]] == ["q-elsewhere"]
        await local.request("join_question", {"question_id": "q-elsewhere"})
        answer = Answer("a-elsewhere", "q-elsewhere", "jun", "Jun", "By the port", now + 1)
        other_node_commits(
            h.db, [SaveUser(User("jun", "Jun")), SaveAnswer(answer), CountAnswer("q-elsewhere", 1, answered_at=now + 1)]
        )
        await until(lambda: engine.questions["q-elsewhere"].answer_count == 1)
        assert engine.questions["q-elsewhere"].status == QuestionStatus.ANSWERED
        assert "jun" in engine.users
        # The answer-time SLO here counts the other node's question and its answer, as a restart would.
        slo = engine.oversight.slo.snapshot(now + 2)["overall"]
        assert (slo["questions"], slo["answered"], slo["within_1m"]) == (1, 1, 1.0)
        other_node_commits(
            h.db, [AcceptOnce("q-elsewhere", "a-elsewhere", now + 2), SaveAnswer(attrs.evolve(answer, accepted=True))]
        )
        closed = await next_of(local, "question_closed")

    assert closed["data"] == {"question_id": "q-elsewhere", "reason": "accepted"}
    held = engine.questions["q-elsewhere"]
    assert (held.status, held.accepted_answer_id) == (QuestionStatus.RESOLVED, "a-elsewhere")
    assert engine.answers["q-elsewhere"]["a-elsewhere"].accepted


@pytest.mark.backends("postgres")
async def test_trending_here_follows_what_another_node_shows_and_takes_down(start_server: Any) -> None:
    """Another node unhides a closed question (it comes back ended): it counts in trending here too; the
    other node deletes it: it stops counting here."""
    h: Harness = await start_server()
    engine = h.running.engine
    now = int(time.time() * 1000)
    shown = Question(
        "q-shown", "asker", "Asker", "Sunrise?", "", 33.4996, 126.5312, "Jeju-si", ("sunrise",), "normal", now,
        status=QuestionStatus.CLOSED, closed_at=now + 1,
    )  # fmt: skip
    other_node_commits(h.db, [SaveUser(User("asker", "Asker", created_at=now)), SaveQuestion(shown)])
    await until(lambda: engine.where.trending.top("Jeju-si", "15m", now) == [("sunrise", 1)])
    assert "q-shown" not in engine.questions  # ended: read when asked for, as any old question
    other_node_commits(h.db, [SaveQuestion(attrs.evolve(shown, deleted_at=now + 2))])
    await until(lambda: engine.where.trending.top("Jeju-si", "15m", now) == [])


@pytest.mark.backends("postgres")
async def test_a_question_whose_only_answer_another_node_deleted_is_open_and_alerted_here(
    start_server: Any,
) -> None:
    """This node holds the lease and raises slow-response alerts: another node's question, answered and then
    stripped of its only answer there, is open again here, and its alert comes (as for one never answered)."""
    h: Harness = await start_server(alerts={"slow_response_s": 1.0})
    engine = h.running.engine
    assert engine.oversight.raises_alerts
    now = int(time.time() * 1000)

    def asked(qid: str) -> Question:
        return Question(qid, "asker", "Asker", "Open late?", "", 33.4996, 126.5312, None, (), "normal", now)

    other_node_commits(
        h.db,
        [SaveUser(User("asker", "Asker", created_at=now)), SaveUser(User("jun", "Jun")), SaveQuestion(asked("q-control")),
         SaveQuestion(asked("q-reopened"))],
    )  # fmt: skip
    await until(lambda: {"q-control", "q-reopened"} <= set(engine.questions))
    answer = Answer("a1", "q-reopened", "jun", "Jun", "By the port", now + 1)
    other_node_commits(h.db, [SaveAnswer(answer), CountAnswer("q-reopened", 1, answered_at=now + 1)])
    await until(lambda: engine.questions["q-reopened"].answer_count == 1)
    other_node_commits(h.db, [SaveAnswer(attrs.evolve(answer, deleted_at=now + 2)), CountAnswer("q-reopened", -1)])
    await until(lambda: engine.questions["q-reopened"].answer_count == 0)
    assert engine.questions["q-reopened"].status == QuestionStatus.OPEN
    await until(lambda: {a["question_id"] for a in engine.oversight.recent_alerts} == {"q-control", "q-reopened"})


@pytest.mark.backends("postgres")
@pytest.mark.parametrize("race", ["committed_first", "concurrent"])
async def test_an_answer_taken_down_on_two_nodes_is_counted_out_once(start_server: Any, race: str) -> None:
    """Another node hid an answer (committed before this node's delete, its news not read here; or its commit
    still open while this node's waits): the author's delete here takes it out of the count no more (the
    question counted 0 of its 2 answers, and was open again)."""
    import psycopg

    h: Harness = await start_server()
    async with h.connect("asker") as asker, h.connect("local") as local:
        qid, local_answer, _ = await answered_twice(h, asker)
        now = int(time.time() * 1000)
        hidden = attrs.evolve(h.running.engine.answers[qid][local_answer], deleted_at=now, hidden=True)
        batch = prepare_writes([SaveAnswer(hidden), CountAnswer(qid, -1, answer_id=local_answer)], 65535, "postgres")
        with psycopg.connect(str(h.db)) as other, psycopg.connect(str(h.db), autocommit=True) as watching:
            for sql, params, many in batch.statements:
                other.cursor().executemany(sql, params) if many is True else other.execute(sql, params)
            if race == "committed_first":
                other.commit()
                await local.request("delete_answer", {"question_id": qid, "answer_id": local_answer})
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(local.request, "delete_answer", {"question_id": qid, "answer_id": local_answer})
                    waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    await until(lambda: watching.execute(waiting).fetchone() == (1,))  # this node's commit waits
                    other.commit()

    row = "SELECT answer_count, status FROM questions WHERE question_id = ?"
    assert db_rows(h.db, row, (qid,)) == [(1, "answered")]


@pytest.mark.backends("postgres")
async def test_saves_here_before_another_nodes_news_bring_back_nothing_it_deleted(start_server: Any) -> None:
    """Another node deleted an answer and a question, its news not read here yet: the asker's mark_read here
    (which saves this node's copy of the answer) and the slow-response alert here (which saves its copy of
    the question) leave both deleted; they wrote the whole stale rows back, undeleting them."""
    h: Harness = await start_server(alerts={"slow_response_s": 1.0})
    engine = h.running.engine
    assert engine.oversight.raises_alerts
    async with h.connect("asker") as asker, h.connect("local", local=True) as local:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        reply = await local.request("create_answer", {"question_id": qid, "content": "A link to spam"})
        aid = reply["answer"]["answer_id"]
        gone = attrs.evolve(engine.answers[qid][aid], deleted_at=1_000)
        other_node_commits(h.db, [SaveAnswer(gone), CountAnswer(qid, -1)], notify=False)

        await asker.request("mark_read", {"question_id": qid})

        assert db_rows(h.db, "SELECT deleted_at FROM answers WHERE answer_id = ?", (aid,)) == [(1_000,)]
        unanswered = (await asker.request("create_question", question_data(title="Nobody?")))["question"]
        deleted = attrs.evolve(engine.questions[unanswered["question_id"]], deleted_at=2_000)
        other_node_commits(h.db, [SaveQuestion(deleted)], notify=False)

        await until(lambda: unanswered["question_id"] in {a["question_id"] for a in engine.oversight.recent_alerts})
        await h.running.clients.pipeline.wait_idle()

    row = "SELECT deleted_at, alerted_at IS NOT NULL FROM questions WHERE question_id = ?"
    assert db_rows(h.db, row, (unanswered["question_id"],)) == [(2_000, True)]


@pytest.mark.backends("postgres")
async def test_a_question_read_before_its_askers_news_brings_the_asker_with_it(start_server: Any) -> None:
    """Another node made a user and their question, and neither news has arrived: answering it here reads
    the question and its asker together, and the answer is accepted at once (no retry)."""
    h: Harness = await start_server()
    engine = h.running.engine
    now = int(time.time() * 1000)
    asked = Question("q-quiet", "newcomer", "Newcomer", "Open late?", "", 33.4996, 126.5312, None, (), "normal", now)
    other_node_commits(
        h.db, [SaveUser(User("newcomer", "Newcomer", created_at=now)), SaveQuestion(asked)], notify=False
    )
    assert "newcomer" not in engine.users and "q-quiet" not in engine.questions

    async with h.connect("local") as local:
        reply = await local.request("create_answer", {"question_id": "q-quiet", "content": "Until ten"})

    assert reply["answer"]["question_id"] == "q-quiet"
    assert engine.users["newcomer"].nick == "Newcomer"
    assert db_rows(h.db, "SELECT status, answer_count FROM questions WHERE question_id = 'q-quiet'") == [
        ("answered", 1)
    ]


@pytest.mark.backends("postgres")
async def test_a_ban_set_on_another_node_holds_here(start_server: Any) -> None:
    h: Harness = await start_server()
    async with h.connect("mallory") as mallory, h.connect("bystander") as bystander:
        banned = attrs.evolve(h.running.engine.users["mallory"], banned_until=FOREVER, ban_reason="casino spam")
        other_node_commits(h.db, [SaveUser(banned)])

        await mallory.wait_closed()
        assert mallory.closed is not None and mallory.closed.reason.code == 4003
        await bystander.request("ping", {})
    async with trio_websocket.open_websocket_url(h.url) as ws:
        await ws.send_message(msgpack.packb({"type": "hello", "id": 1, "data": {"token": token("mallory")}}))
        with pytest.raises(trio_websocket.ConnectionClosed) as refused:
            await ws.get_message()
    assert refused.value.reason.code == 4003


@pytest.mark.backends("postgres")
async def test_a_ban_set_on_another_node_survives_this_nodes_saves_of_the_user_before_its_news(
    start_server: Any,
) -> None:
    """Committed elsewhere, its news not read yet: mallory's settings save and a hello with a new nick here
    write those parts of her row only (they wrote her whole stale copy: the ban undone); the news then
    closes her connection with 4003."""
    h: Harness = await start_server()
    async with h.connect("mallory") as mallory:
        banned = attrs.evolve(
            h.running.engine.users["mallory"], banned_until=FOREVER, ban_reason="casino spam", read_seq=7
        )
        other_node_commits(h.db, [SaveUser(banned)], notify=False)

        await mallory.request("update_settings", {"max_alerts_per_hour": 3})
        async with h.connect("mallory", nick="Mal"):
            pass

        row = "SELECT nick, max_alerts_per_hour, banned_until, read_seq FROM users WHERE user_id = 'mallory'"
        assert db_rows(h.db, row) == [("Mal", 3, FOREVER, 7)]
        other_node_commits(h.db, [SaveUser(banned, changed=())])  # its news, late
        await mallory.wait_closed()
        assert mallory.closed is not None and mallory.closed.reason.code == 4003
    assert db_rows(h.db, row) == [("Mal", 3, FOREVER, 7)]


@pytest.mark.backends("postgres")
async def test_without_notifications_the_catch_up_reads_what_changed(start_server: Any) -> None:
    """Nothing announced: within ``catch_up_interval_s`` the rows changed since the last look are read."""
    h: Harness = await start_server(cluster={"catch_up_interval_s": 0.2})
    engine = h.running.engine
    async with h.connect("asker") as asker, h.connect("watcher") as watcher:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        await watcher.request("join_question", {"question_id": qid})
        other_node_commits(h.db, [CloseOnce(qid, "closed", int(time.time() * 1000))], notify=False)

        closed = await next_of(watcher, "question_closed", timeout=5.0)

        assert closed["data"] == {"question_id": qid, "reason": "closed"}
        assert engine.questions[qid].status == QuestionStatus.CLOSED
        settings = attrs.evolve(engine.users["watcher"], max_alerts_per_hour=3, quiet_hours=(23, 6))
        other_node_commits(h.db, [SaveUser(settings)], notify=False)
        await until(lambda: engine.users["watcher"].max_alerts_per_hour == 3, timeout=5.0)
        assert engine.users["watcher"].quiet_hours == (23, 6)


@pytest.mark.backends("postgres")
@pytest.mark.parametrize("announced", [True, False], ids=["announced", "caught_up"])
async def test_unread_here_leaves_out_the_events_another_nodes_pruner_deleted(
    start_server: Any, announced: bool
) -> None:
    """Another node's pruner deletes the asker's events 1-2 of 3 (its news lost, or none: the catch-up): this
    node's unread no longer counts them (it counted 3, as its memory still started the inbox at 1)."""
    h: Harness = await start_server(cluster={"catch_up_interval_s": 60 if announced else 0.2})
    async with h.connect("asker") as asker, h.connect("local") as local:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        for i in range(3):
            await local.request("create_answer", {"question_id": qid, "content": f"answer {i}"})
        assert (await asker.request("list_notifications", {}))["unread"] == 3
        other = store_for(h.db)  # another node's store
        other.news_from = OTHER_NODE if announced else None
        other.open()
        try:
            pruned = other.prune_events(int(time.time() * 1000) + 60_000, 1000)  # all but each user's newest
        finally:
            other.close()
        assert pruned["asker"] == 3

        with trio.fail_after(5):
            while (await asker.request("list_notifications", {}))["unread"] != 1:  # noqa: ASYNC110 - other node
                await trio.sleep(0.05)
    async with h.connect("asker") as again:
        listed = await again.request("list_notifications", {})

        assert (again.hello["unread"], len(listed["notifications"]), listed["unread"]) == (1, 1, 1)


@pytest.mark.backends("postgres")
async def test_this_nodes_commits_announce_what_they_changed_with_its_node_id(start_server: Any) -> None:
    import psycopg

    h: Harness = await start_server()
    with psycopg.connect(str(h.db), autocommit=True) as listening:
        listening.execute("LISTEN dongne_changes")
        async with h.connect("asker") as asker:
            qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        news = hear(listening, 2)

    announced = [read_changes_news(p) for p in news]
    assert (h.running.clients.node_id, [], ["asker"]) in announced  # the hello created the user
    assert (h.running.clients.node_id, [qid], []) in announced


def test_a_commit_that_only_adds_points_announces_the_user() -> None:
    """An accept writes the author's points alone (AddPoints): other nodes must still read the row back."""
    batch = prepare_writes([AddPoints("author", 10)], 30000, "postgres", news_from="node-a")
    news = [params[1] for sql, params, _ in batch.statements if "pg_notify" in sql]
    assert [read_changes_news(p) for p in news] == [("node-a", [], ["author"])]


def test_changes_news_is_split_under_postgresqls_payload_limit() -> None:
    questions = [f"q-{i:05d}-{'한' * 10}" for i in range(600)]
    users = [f"user-{i:05d}" for i in range(400)]

    payloads = changes_news("node-a", questions, users)

    assert len(payloads) > 1
    assert all(len(p.encode()) < NOTIFY_PAYLOAD_LIMIT for p in payloads)
    assert max(len(p.encode()) for p in payloads) > NOTIFY_PAYLOAD_LIMIT - 100  # packed, not one per row
    read = [read_changes_news(p) for p in payloads]
    assert {origin for origin, _, _ in read} == {"node-a"}
    assert [q for _, qs, _ in read for q in qs] == questions
    assert [u for _, _, us in read for u in us] == users
    assert changes_news("node-a", [], []) == []


def test_a_stage_commit_announces_who_it_alerted_split_under_postgresqls_payload_limit() -> None:
    """One list per ``SaveNotified`` (question, when, users), a long one going on in the next payload."""
    crowd = tuple((f"local-{i:05d}-{'한' * 4}", "QUICK", 10.0 * i, True) for i in range(700))
    writes = [SaveNotified("q-1", (("near", "IMMEDIATE", 800.0, True),), 1_000), SaveNotified("q-2", crowd, 3_000)]

    batch = prepare_writes(writes, 65535, "postgres", news_from="node-a")

    payloads = [params[1] for sql, params, _ in batch.statements if "pg_notify" in sql and params[0] == "dongne_alerts"]
    assert len(payloads) > 1
    assert all(len(p.encode()) < NOTIFY_PAYLOAD_LIMIT for p in payloads)
    read = [read_alerts_news(p) for p in payloads]
    assert {origin for origin, _ in read} == {"node-a"}
    assert [(q, at) for _, alerts in read for q, at, _ in alerts][:2] == [("q-1", 1_000), ("q-2", 3_000)]
    assert [u for _, alerts in read for q, _, users in alerts if q == "q-2" for u in users] == [t[0] for t in crowd]
    assert alerts_news("node-a", [("q-3", 1, ())]) == []
    assert [sql for sql, *_ in prepare_writes(writes, 65535, "postgres").statements if "pg_notify" in sql] == []


@pytest.mark.backends("postgres")
async def test_this_nodes_stage_commits_announce_who_they_alerted_with_its_node_id(start_server: Any) -> None:
    import psycopg

    h: Harness = await start_server()
    with psycopg.connect(str(h.db), autocommit=True) as listening:
        listening.execute("LISTEN dongne_alerts")
        async with h.connect("near", local=True) as near, h.connect("asker") as asker:
            await near.request("update_location", {"location": JEJU_CITY})
            asked = (await asker.request("create_question", question_data()))["question"]
        news = hear(listening, 1)

    assert [read_alerts_news(p) for p in news] == [
        (h.running.clients.node_id, [(asked["question_id"], asked["created_at"], ("near",))])
    ]


@pytest.mark.backends("postgres")
async def test_an_alert_another_nodes_stage_sent_counts_towards_the_hourly_cap_here(start_server: Any) -> None:
    """A question asked on another node, followed here; another node's stage alerts a local whose cap is 1
    (its commit's news, on dongne_alerts): the IMMEDIATE stage of a question asked here leaves the local out."""
    h: Harness = await start_server()
    engine = h.running.engine
    now = int(time.time() * 1000)
    asked = Question("q-elsewhere", "other", "Other", "Open late?", "", 33.4996, 126.5312, None, (), "normal", now)
    async with h.connect("capped", local=True) as capped, h.connect("asker") as asker:
        await capped.request("update_settings", {"max_alerts_per_hour": 1})
        await capped.request("update_location", {"location": JEJU_CITY})
        other_node_commits(
            h.db, [SaveUser(User("other", "Other")), SaveQuestion(asked), SaveEscalation(asked.question_id, 1, now)]
        )
        await until(lambda: engine.follows_escalation("q-elsewhere"))
        quick = SaveNotified("q-elsewhere", (("capped", "QUICK", 10.0, True),), now + 1)
        other_node_commits(h.db, [quick, SaveEscalation("q-elsewhere", 2, now + 1)])
        await until(lambda: "capped" in engine.where.escalations["q-elsewhere"].notified)

        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        await capped.request("get_profile")
        alerted = [
            e["data"]["question"]["question_id"]
            for e in capped.pending_events()
            if e["type"] == "new_question_notification"
        ]

    assert alerted == []
    assert db_rows(h.db, "SELECT question_id, stage FROM notified WHERE user_id = 'capped'") == [
        ("q-elsewhere", "QUICK")
    ]
    assert qid in engine.questions


@pytest.mark.backends("postgres")
def test_read_changes_names_each_row_changed_since_the_last_look_once_it_is_committed(store: Any) -> None:
    """From ``load``'s snapshot on; a transaction still open at a look is read at the next one after it commits."""
    import psycopg

    store.apply([SaveUser(User("asker", "Asker")), SaveQuestion(question_of("q1"))])
    store.load(hot_since=0)
    assert store.read_changes() == ([], [])
    store.apply([CountAnswer("q1", 1, answered_at=5)])
    with psycopg.connect(store.url) as slow:
        slow.execute("UPDATE users SET points = 5 WHERE user_id = 'asker'")  # open, uncommitted
        assert store.read_changes() == (["q1"], [])
        store.apply([SaveUser(User("jun", "Jun"))])  # a later transaction commits first
        assert store.read_changes() == ([], ["jun"])
        slow.commit()
    assert store.read_changes() == ([], ["asker", "jun"])  # read again (harmless), the late one not missed
    assert store.read_changes() == ([], [])


def question_of(qid: str) -> Question:
    return Question(qid, "asker", "Asker", "Open late?", "", 33.5, 126.5, None, (), "normal", 1)


# ---- room events across nodes (dongne_rooms) ---------------------------------------------------------------


def other_node_relays(db: Path | str, question_id: str, kind: str, data: dict[str, Any]) -> None:
    """A typing or presence event as another node sends it: one notification, outside any commit."""
    import psycopg

    with psycopg.connect(str(db), autocommit=True) as conn:
        conn.execute("SELECT pg_notify('dongne_rooms', %s)", (room_news(OTHER_NODE, question_id, kind, data),))


@pytest.mark.backends("postgres")
async def test_another_nodes_room_events_reach_this_nodes_members_of_the_room(start_server: Any) -> None:
    """An answer committed elsewhere (its new_answer inside that commit), a long one relayed by reference,
    and typing and presence sent outside commits: each reaches the room here once."""
    h: Harness = await start_server()
    async with h.connect("asker") as asker, h.connect("watcher") as watcher:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        await watcher.request("join_question", {"question_id": qid})
        await next_of(asker, "user_online")
        now = int(time.time() * 1000)
        who = {"question_id": qid, "user_id": "far", "nick": "Far"}
        other_node_relays(h.db, qid, "user_online", who)
        other_node_relays(h.db, qid, "user_typing", who)
        assert (await next_of(watcher, "user_online"))["data"] == who
        assert (await next_of(watcher, "user_typing"))["data"] == who
        answer = Answer("a-far", qid, "far", "Far", "By the port", now)
        wire = {**answer.to_wire(), "author_local": False, "author_points": 0}
        other_node_commits(
            h.db,
            [
                SaveUser(User("far", "Far")),
                SaveAnswer(answer),
                CountAnswer(qid, 1, answered_at=now),
                RoomNews(qid, "new_answer", {"question_id": qid, "answer": wire}),
            ],
        )
        assert (await next_of(watcher, "new_answer"))["data"] == {"question_id": qid, "answer": wire}
        assert (await next_of(asker, "new_answer"))["data"]["answer"]["answer_id"] == "a-far"
        long = Answer("a-long", qid, "far", "Far", "🍊" * 2000, now + 1)  # 8,000 bytes: relayed by reference
        long_wire = {**long.to_wire(), "author_local": False, "author_points": 0}
        other_node_commits(
            h.db,
            [
                SaveAnswer(long),
                CountAnswer(qid, 1, answered_at=now + 1),
                RoomNews(qid, "new_answer", {"question_id": qid, "answer": long_wire}),
            ],
        )
        relayed = await next_of(watcher, "new_answer")
        assert relayed["data"]["answer"]["content"] == "🍊" * 2000
        await watcher.request("ping", {})
        assert [f["type"] for f in watcher.pending_events()] == []  # each once


def hear(conn: Any, count: int, timeout: float = 5.0) -> list[str]:
    """The payloads of ``count`` notifications on a listening psycopg connection (bounded wait)."""
    payloads: list[str] = []
    deadline = time.monotonic() + timeout
    while len(payloads) < count and time.monotonic() < deadline:
        payloads.extend(n.payload for n in conn.notifies(timeout=0.1, stop_after=count - len(payloads)))
    return payloads


@pytest.mark.backends("postgres")
async def test_this_nodes_typing_goes_to_other_nodes_and_its_own_news_is_ignored(start_server: Any) -> None:
    import psycopg

    h: Harness = await start_server()
    with psycopg.connect(str(h.db), autocommit=True) as listening:
        listening.execute("LISTEN dongne_rooms")
        async with h.connect("asker") as asker, h.connect("watcher") as watcher:
            qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
            await watcher.request("join_question", {"question_id": qid})
            await watcher.request("typing_start", {"question_id": qid})
            assert (await next_of(asker, "user_online"))["data"]["user_id"] == "watcher"
            assert (await next_of(asker, "user_typing"))["data"]["user_id"] == "watcher"
            heard = [read_room_news(p) for p in await trio.to_thread.run_sync(hear, listening, 3)]
            await asker.request("ping", {})
            assert asker.pending_events() == []  # its own news came back to it, and was ignored

    node = h.running.clients.node_id
    asker_card = {"question_id": qid, "user_id": "asker", "nick": "asker"}  # the asker is in its question's room
    who = {"question_id": qid, "user_id": "watcher", "nick": "watcher"}
    assert heard == [
        (node, qid, "user_online", asker_card),
        (node, qid, "user_online", who),
        (node, qid, "user_typing", who),
    ]


@pytest.mark.backends("postgres")
async def test_a_change_made_while_the_listen_connection_was_down_is_read_when_it_comes_back(
    start_server: Any,
) -> None:
    """Committed unannounced, then pg_terminate_backend of the LISTEN connection: the catch-up made when the
    listener connects again (``on_connected``) reads it; the periodic one is too far off to."""
    h: Harness = await start_server(cluster={"catch_up_interval_s": 600.0})
    engine = h.running.engine
    listener = h.running.clients.listener
    async with h.connect("watcher") as watcher:
        settings = attrs.evolve(engine.users["watcher"], max_alerts_per_hour=4)
        other_node_commits(h.db, [SaveUser(settings)], notify=False)
        assert db_rows(h.db, "SELECT pg_terminate_backend(?)", (listener.backend_pid,)) == [(True,)]

        await until(lambda: engine.users["watcher"].max_alerts_per_hour == 4)

        assert listener.connections == 2
        await watcher.request("ping", {})


@pytest.mark.backends("sqlite", "postgres")
@pytest.mark.parametrize("op", ["ping", "my_questions"])
async def test_a_lost_race_is_answered_in_request_order_then_reads_see_the_winner(start_server: Any, op: str) -> None:
    """A request pipelined behind the accept that loses is answered after ``conflict`` (from memory, or a
    list read from the store); a read sent on the ``conflict`` shows the answer another node accepted."""
    h: Harness = await start_server()
    async with h.connect("asker") as asker:
        qid, local_answer, other_answer = await answered_twice(h, asker)
    other_node_accepts(h.db, qid, local_answer)
    replies: list[dict[str, Any]] = []
    async with trio_websocket.open_websocket_url(h.url + "/ws") as ws:

        async def reply() -> dict[str, Any]:
            with trio.fail_after(10):
                while True:
                    frame: dict[str, Any] = msgpack.unpackb(await ws.get_message())
                    if frame["type"] == "reply":
                        return frame

        await ws.send_message(msgpack.packb({"type": "hello", "id": 1, "data": {"token": token("asker")}}))
        accept = {"question_id": qid, "answer_id": other_answer}
        await ws.send_message(msgpack.packb({"type": "accept_answer", "id": 2, "data": accept}))
        await ws.send_message(msgpack.packb({"type": op, "id": 3, "data": {}}))
        replies += [await reply(), await reply(), await reply()]
        await ws.send_message(msgpack.packb({"type": "join_question", "id": 4, "data": {"question_id": qid}}))
        replies.append(await reply())

    assert [(r["id"], r["ok"]) for r in replies] == [(1, True), (2, False), (3, True), (4, True)]
    assert replies[1]["error"]["code"] == "conflict"
    assert replies[3]["data"]["question"]["accepted_answer_id"] == local_answer


@pytest.mark.backends("sqlite")
async def test_a_race_lost_while_memory_is_read_again_for_a_takeover_is_still_a_conflict(
    start_server: Any, db_path: Path
) -> None:
    """A takeover of the escalation lease refuses new writes while what is queued commits; an accept
    queued then, which loses its race to another node's, is answered ``conflict`` (not ``unavailable``)
    once memory is read again, and memory holds the winner."""
    h: Harness = await start_server()
    async with h.connect("asker") as asker:
        qid, local_answer, other_answer = await answered_twice(h, asker)
        other_node_accepts(h.db, qid, local_answer)
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the accept's commit waits for it
        try:
            async with trio.open_nursery() as nursery:
                outcome: list[Any] = []

                async def accept() -> None:
                    try:
                        await asker.request("accept_answer", {"question_id": qid, "answer_id": other_answer})
                    except RequestError as exc:
                        outcome.append(exc.code)

                nursery.start_soon(accept)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # decided; its commit waits
                h.running.clients._begin_takeover()  # as when this node takes the lease
                holder.execute("ROLLBACK")
        finally:
            holder.close()
        assert outcome == ["conflict"]
        state = await asker.request("join_question", {"question_id": qid})
        assert state["question"]["accepted_answer_id"] == local_answer
    await h.running.aclose()


@pytest.mark.backends("sqlite", "postgres")
async def test_writes_made_while_a_conflict_is_resolved_are_stored_or_leave_no_trace(start_server: Any) -> None:
    """Others keep answering while an accept loses its race and memory is rebuilt: every answer memory
    holds afterwards is stored, and every one acknowledged is too (none made between the rebuild and
    writes working again lingers in memory only)."""
    h: Harness = await start_server(limits={"writes_per_minute": 6000.0, "writes_burst": 1000.0})
    writers = [f"writer{i}" for i in range(6)]
    acknowledged: set[str] = set()
    refused: list[str] = []
    async with h.connect("asker") as asker, h.connect("elsewhere") as elsewhere, trio.open_nursery() as nursery:
        qid, local_answer, other_answer = await answered_twice(h, asker)
        busy = await elsewhere.request("create_question", question_data(title="A busy second question"))
        busy_id = busy["question"]["question_id"]
        race_over = trio.Event()
        all_writing = trio.Event()
        writing: set[str] = set()

        async def keep_answering(user: str) -> None:
            async with h.connect(user) as client:
                n = 0
                while not race_over.is_set():
                    n += 1
                    try:
                        reply = await client.request(
                            "create_answer", {"question_id": busy_id, "content": f"{user} {n}"}
                        )
                    except RequestError as exc:
                        refused.append(exc.code)
                    else:
                        acknowledged.add(reply["answer"]["answer_id"])
                    writing.add(user)
                    if len(writing) == len(writers):
                        all_writing.set()

        for user in writers:
            nursery.start_soon(keep_answering, user)
        with trio.fail_after(10):
            await all_writing.wait()  # connected (a hello during the reload would be refused) and writing
        other_node_accepts(h.db, qid, local_answer)
        with pytest.raises(RequestError) as lost:
            await asker.request("accept_answer", {"question_id": qid, "answer_id": other_answer})
        assert lost.value.code == "conflict"
        await trio.sleep(0.05)
        race_over.set()

    stored = {row[0] for row in db_rows(h.db, "SELECT answer_id FROM answers WHERE question_id = ?", (busy_id,))}
    in_memory = set(h.running.engine.answers[busy_id])
    assert acknowledged <= stored
    assert in_memory == stored
    assert h.running.engine.questions[busy_id].answer_count == len(stored)
    assert set(refused) <= {"unavailable"}
