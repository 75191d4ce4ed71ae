"""The whole question flow over real sockets: ask, join, answer, accept."""

from __future__ import annotations

import socket
import sqlite3

import msgpack
import pytest
import trio
from wsproto.events import BytesMessage, CloseConnection

from dongne.client import RequestError

from .conftest import Harness, db_rows, question_data, token
from .rawws import RawWebSocket

pytestmark = pytest.mark.backends("sqlite", "postgres")


async def test_ask_join_answer_accept(server: Harness) -> None:
    async with (
        server.connect("traveller", nick="Mina") as asker,
        server.connect("local1", nick="Jun", local=True) as local,
    ):
        assert asker.hello["user"]["nick"] == "Mina"
        assert asker.hello["last_seq"] == 0

        created = await asker.request("create_question", question_data())
        q = created["question"]
        assert q["status"] == "open"
        assert q["hashtags"] == ["food", "blackpork"]
        assert q["region"] == "Jeju-si"
        qid = q["question_id"]

        joined = await local.request("join_question", {"question_id": qid})
        assert joined["question"]["question_id"] == qid
        assert joined["answers"] == []
        assert [u["user_id"] for u in joined["online"]] == ["local1", "traveller"]
        assert joined["online_count"] == 2
        assert joined["typing"] == []
        online = await asker.next_event("user_online")
        assert online["data"] == {"question_id": qid, "user_id": "local1", "nick": "Jun"}

        answer = (
            await local.request("create_answer", {"question_id": qid, "content": "Try Dombedon, open till 2am."})
        )["answer"]
        assert answer["author_id"] == "local1"
        assert answer["state"] == "delivered"  # the asker is connected

        new_answer = await asker.next_event("new_answer")
        assert new_answer["data"]["question_id"] == qid
        assert new_answer["data"]["answer"]["answer_id"] == answer["answer_id"]
        note = await asker.next_event("answer_notification")
        assert note["seq"] == 1
        assert note["data"]["answer"]["content"] == "Try Dombedon, open till 2am."

        accepted = await asker.request("accept_answer", {"question_id": qid, "answer_id": answer["answer_id"]})
        assert accepted["question"]["status"] == "resolved"
        assert accepted["question"]["accepted_answer_id"] == answer["answer_id"]

        room_event = await local.next_event("answer_accepted")
        assert room_event["data"] == {
            "question_id": qid,
            "answer_id": answer["answer_id"],
            "author_id": "local1",
            "points": 10,
        }
        durable = await local.next_event("answer_accepted_notification")
        assert durable["seq"] == 1
        assert durable["data"]["total_points"] == 10
        profile = await local.request("get_profile")
        assert profile["user"]["points"] == 10

        with pytest.raises(RequestError) as again:
            await asker.request("accept_answer", {"question_id": qid, "answer_id": answer["answer_id"]})
        assert again.value.code == "already_accepted"
        with pytest.raises(RequestError) as late:
            await local.request("create_answer", {"question_id": qid, "content": "also good"})
        assert late.value.code == "question_closed"


async def test_only_the_asker_accepts_and_closes(server: Harness) -> None:
    async with server.connect("asker") as asker, server.connect("a1") as a1, server.connect("a2") as a2:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        aid = (await a1.request("create_answer", {"question_id": qid, "content": "here"}))["answer"]["answer_id"]
        for op, data in (
            ("accept_answer", {"question_id": qid, "answer_id": aid}),
            ("close_question", {"question_id": qid}),
        ):
            with pytest.raises(RequestError) as refused:
                await a2.request(op, data)
            assert refused.value.code == "forbidden"
        with pytest.raises(RequestError) as own:
            await asker.request("create_answer", {"question_id": qid, "content": "me"})
        assert own.value.code == "forbidden"
        closed = await asker.request("close_question", {"question_id": qid})
        assert closed["question"]["status"] == "closed"
        with pytest.raises(RequestError) as after:
            await asker.request("accept_answer", {"question_id": qid, "answer_id": aid})
        assert after.value.code == "question_closed"


async def test_typing_and_presence_reach_only_the_room(server: Harness) -> None:
    async with (
        server.connect("asker") as asker,
        server.connect("helper") as helper,
        server.connect("bystander") as bystander,
    ):
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        other = (await bystander.request("create_question", question_data(title="another")))["question"]["question_id"]
        await helper.request("join_question", {"question_id": qid})
        await asker.next_event("user_online")

        with pytest.raises(RequestError) as not_joined:
            await bystander.request("typing_start", {"question_id": qid})
        assert not_joined.value.code == "not_joined"

        await helper.request("typing_start", {"question_id": qid})
        typing = await asker.next_event()
        assert typing == {"type": "user_typing", "data": {"question_id": qid, "user_id": "helper", "nick": "helper"}}
        state = await bystander.request("join_question", {"question_id": qid})
        assert [u["user_id"] for u in state["typing"]] == ["helper"]
        await asker.next_event("user_online")
        await helper.request("typing_stop", {"question_id": qid})
        assert (await asker.next_event())["type"] == "user_stop_typing"

        await helper.request("leave_question", {"question_id": qid})
        gone = await asker.next_event()
        assert gone == {"type": "user_offline", "data": {"question_id": qid, "user_id": "helper", "nick": "helper"}}
        # Nothing about the asker's room reached the room of the other question.
        await bystander.request("leave_question", {"question_id": qid})
        assert other != qid


async def test_presence_counts_users_not_connections(server: Harness) -> None:
    async with server.connect("asker") as asker:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        async with server.connect("multi") as first:
            async with server.connect("multi") as second:
                await first.request("join_question", {"question_id": qid})
                await asker.next_event("user_online")
                await second.request("join_question", {"question_id": qid})
                await first.request("leave_question", {"question_id": qid})
                # Still present through the second connection: no offline event yet.
                state = await asker.request("join_question", {"question_id": qid})
                assert [u["user_id"] for u in state["online"]] == ["asker", "multi"]
            offline = await asker.next_event()
            assert offline["type"] == "user_offline"
            assert offline["data"]["user_id"] == "multi"


async def test_read_receipts_flow_to_the_author(server: Harness) -> None:
    async with server.connect("asker") as asker:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
    async with server.connect("author") as author:
        # The asker is offline: the answer is only sent.
        answer = (await author.request("create_answer", {"question_id": qid, "content": "Gogi-guksu at Jamaeguksu"}))[
            "answer"
        ]
        assert answer["state"] == "sent"
        async with server.connect("asker", resume_from=0) as asker:
            delivered = await author.next_event("receipt")
            assert delivered["data"]["answer_id"] == answer["answer_id"]
            assert delivered["data"]["state"] == "delivered"
            replayed = await asker.next_event("answer_notification")
            assert replayed["seq"] == 1
            with pytest.raises(RequestError) as forbidden:
                await author.request("mark_read", {"question_id": qid})
            assert forbidden.value.code == "forbidden"
            marked = await asker.request("mark_read", {"question_id": qid, "answer_ids": [answer["answer_id"]]})
            assert marked["answer_ids"] == [answer["answer_id"]]
            read = await author.next_event("receipt")
            assert read["data"]["state"] == "read"
            state = await asker.request("join_question", {"question_id": qid})
            assert state["answers"][0]["state"] == "read"
            again = await asker.request("mark_read", {"question_id": qid})
            assert again["answer_ids"] == []


@pytest.mark.parametrize("how", ["close frame", "half-close"])
async def test_requests_sent_just_before_the_peer_closes_are_all_answered(start_server, how: str) -> None:  # type: ignore[no-untyped-def]
    """A client that sends requests and closes at once (a close frame, or the end of its stream) still gets
    every reply, a write's acknowledgement among them, before the server's close."""
    h: Harness = await start_server()
    peer = await RawWebSocket.connect(h.running.port)
    requests = [
        {"type": "hello", "id": 1, "data": {"token": token("alice")}},
        {"type": "create_question", "id": 2, "data": question_data()},
        {"type": "ping", "id": 3, "data": {}},
        {"type": "get_profile", "id": 4, "data": {}},
    ]
    batch = b"".join(peer.ws.send(BytesMessage(data=msgpack.packb(r))) for r in requests)
    if how == "close frame":
        batch += peer.ws.send(CloseConnection(code=1000))
    await peer.sock.send(batch)
    if how == "half-close":
        peer.sock.shutdown(socket.SHUT_WR)
    frames = await peer.read_until_closed()
    replies = [f for f in frames if f.get("type") == "reply"]
    assert [(r["id"], r["ok"]) for r in replies] == [(1, True), (2, True), (3, True), (4, True)]
    assert peer.close_code == (1000 if how == "close frame" else 1006)  # 1006: the stream ended, no close frame
    peer.close()
    assert db_rows(h.db, "SELECT question_id FROM questions") == [(replies[1]["data"]["question"]["question_id"],)]
    await h.running.aclose()


@pytest.mark.backends("sqlite")
async def test_a_peer_that_closed_is_gone_at_once_while_its_replies_wait(start_server, db) -> None:  # type: ignore[no-untyped-def]
    """The engine hears of the close at once (the user may connect again right away under a per-user cap of one),
    while the reply it is owed waits for its commit, held here by another program's lock."""
    h: Harness = await start_server(limits={"connections_per_user": 1})
    peer = await h.raw_hello("alice")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the question's commit waits for it
    ask = peer.ws.send(BytesMessage(data=msgpack.packb({"type": "create_question", "id": 2, "data": question_data()})))
    await peer.sock.send(ask + peer.ws.send(CloseConnection(code=1000)))
    with trio.fail_after(10):
        while h.running.engine.user_conns.get("alice"):  # noqa: ASYNC110 - the server's reading of the close
            await trio.sleep(0.01)
    assert h.running.engine.counts()["open_questions"] == 1  # decided; its commit waits
    holder.execute("ROLLBACK")
    holder.close()
    frames = await peer.read_until_closed()
    assert [(f["id"], f["ok"]) for f in frames if f.get("type") == "reply"] == [(1, True), (2, True)]
    assert peer.close_code == 1000
    peer.close()
    await h.running.aclose()


@pytest.mark.backends("sqlite")
async def test_a_shutdown_answers_what_it_read_before_its_1001(start_server, db) -> None:  # type: ignore[no-untyped-def]
    """A write decided before the shutdown began is committed and acknowledged before the 1001 (the client,
    told nothing, would ask again: a second question); a request sent after it is not applied at all."""
    h: Harness = await start_server()
    peer = await h.raw_hello("alice")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the question's commit waits for it
    await peer.send({"type": "create_question", "id": 2, "data": question_data()})
    with trio.fail_after(10):
        while h.running.engine.counts()["open_questions"] == 0:  # noqa: ASYNC110 - decided; its commit waits
            await trio.sleep(0.01)
    h.running.stop()  # what SIGTERM does
    with trio.fail_after(10):
        while h.running.clients.accepting:  # noqa: ASYNC110 - the shutdown has begun
            await trio.sleep(0.01)
    await peer.send({"type": "create_question", "id": 3, "data": question_data(title="After the signal")})
    holder.execute("ROLLBACK")
    holder.close()
    with trio.fail_after(10):
        frames = await peer.read_until_closed()
    replies = [(f["id"], f["ok"]) for f in frames if f.get("type") == "reply"]
    assert replies == [(1, True), (2, True)]
    assert peer.close_code == 1001
    peer.close()
    with trio.fail_after(10):
        await h.running.aclose()
    assert db_rows(db, "SELECT title FROM questions") == [(question_data()["title"],)]


@pytest.mark.backends("sqlite")
async def test_a_shutdown_decides_a_request_waiting_on_a_store_read_before_its_1001(start_server, db) -> None:  # type: ignore[no-untyped-def]
    """A request read before the signal may still be waiting for a store read (its question is not in memory,
    and the read waits for the commit ahead of it): it is decided, committed and answered before the 1001."""
    h: Harness = await start_server()
    async with h.connect("alice") as alice:
        qid = (await alice.request("create_question", question_data(title="An old one")))["question"]["question_id"]
        await alice.request("close_question", {"question_id": qid})
    await h.running.aclose()
    day_ms = 86_400_000
    with sqlite3.connect(db) as conn:  # asked 90 days ago: not in memory at the next start
        conn.execute("UPDATE questions SET created_at = created_at - ?, closed_at = closed_at - ?", (90 * day_ms,) * 2)
    h = await start_server()
    assert qid not in h.running.engine.questions
    peer = await h.raw_hello("alice")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the next commit waits for it
    await peer.send({"type": "create_question", "id": 2, "data": question_data()})
    await peer.send({"type": "delete_question", "id": 3, "data": {"question_id": qid}})  # needs a store read
    clients = h.running.clients
    with trio.fail_after(10):
        while h.running.engine.counts()["open_questions"] == 0 or not clients._handling:  # noqa: ASYNC110
            await trio.sleep(0.01)
    h.running.stop()  # what SIGTERM does
    with trio.fail_after(10):
        while clients.accepting:  # noqa: ASYNC110 - the shutdown has begun
            await trio.sleep(0.01)
    holder.execute("ROLLBACK")
    holder.close()
    with trio.fail_after(10):
        frames = await peer.read_until_closed()
    assert [(f["id"], f["ok"]) for f in frames if f.get("type") == "reply"] == [(1, True), (2, True), (3, True)]
    assert peer.close_code == 1001
    peer.close()
    with trio.fail_after(10):
        await h.running.aclose()
    assert db_rows(db, "SELECT deleted_at IS NOT NULL FROM questions WHERE question_id = ?", (qid,)) == [(1,)]
