"""The read paths over real sockets: pages and lists without joining rooms, the notification inbox,
retention, expiry, author deletes, push for people who are not connected, and the query plans."""

from __future__ import annotations

import base64
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.lowlevel
import trio.testing

from dongne.client import DongneClient, RequestError
from dongne.clock import EngineClock
from dongne.core.reads import (
    AnswerHome,
    AnswersOfAuthor,
    AuthorStats,
    Browse,
    Notifications,
    QuestionPage,
    QuestionsOfAsker,
)
from dongne.store import Store, store_for
from dongne.store._queries import plan
from dongne.store._rows import ANSWER_COLS, QUESTION_COLS

from .conftest import JEJU_CITY, NO_TIMERS, Harness, db_rows, question_data
from .test_push import FakeGateway

pytestmark = pytest.mark.backends("sqlite", "postgres")

AEWOL = {"lat": 33.4620, "lng": 126.3300}  # Aewol-eup, west of Jeju City


async def refused(client: Any, op: str, data: dict[str, Any]) -> str:
    with pytest.raises(RequestError) as caught:
        await client.request(op, data)
    return caught.value.code


async def test_get_question_reads_without_joining_and_pages_answers_oldest_first(start_server: Any) -> None:
    h: Harness = await start_server()
    async with h.connect("asker") as asker, h.connect("local", local=True) as local, h.connect("reader") as reader:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        answers = [
            (await local.request("create_answer", {"question_id": qid, "content": f"answer {i}"}))["answer"]
            for i in range(5)
        ]
        await asker.next_event("answer_notification")
        page = await reader.request("get_question", {"question_id": qid, "limit": 2})
        seen = [a["answer_id"] for a in page["answers"]]
        while page["next"] is not None:
            page = await reader.request("get_question", {"question_id": qid, "limit": 2, "answers_after": page["next"]})
            seen += [a["answer_id"] for a in page["answers"]]
        assert seen == [a["answer_id"] for a in answers]
        assert page["answers"][-1]["author_local"] is True and page["answers"][-1]["author_points"] == 0
        # Read-only: the asker, in the room, heard of nobody new; the reader is in no room.
        await asker.request("close_question", {"question_id": qid})
        assert [e for e in asker.pending_events() if e["type"] == "user_online"] == []
        assert (await reader.request("get_question", {"question_id": qid}))["question"]["status"] == "closed"
        assert await refused(reader, "typing_start", {"question_id": qid}) == "not_joined"
        assert await refused(reader, "get_question", {"question_id": "q-none"}) == "not_found"


async def test_my_questions_are_newest_first_with_unread_answers_and_paged_by_own_cursors(start_server: Any) -> None:
    h: Harness = await start_server()
    async with h.connect("asker") as asker, h.connect("local") as local, h.connect("other") as other:
        qids = [
            (await asker.request("create_question", question_data(title=f"question {i}")))["question"]["question_id"]
            for i in range(5)
        ]
        await other.request("create_question", question_data(title="not mine"))
        for _ in range(2):
            await local.request("create_answer", {"question_id": qids[1], "content": "try the market"})
        await asker.request("close_question", {"question_id": qids[0]})

        first = await asker.request("my_questions", {"limit": 3})
        second = await asker.request("my_questions", {"limit": 3, "before": first["next"]})
        listed = [q["question_id"] for q in first["questions"] + second["questions"]]
        assert listed == qids[::-1] and second["next"] is None
        unread = {q["question_id"]: q["unread_answers"] for q in first["questions"] + second["questions"]}
        assert unread[qids[1]] == 2 and unread[qids[4]] == 0
        answered = await asker.request("my_questions", {"status": "answered"})
        assert [q["question_id"] for q in answered["questions"]] == [qids[1]]
        closed = await asker.request("my_questions", {"status": "closed"})
        assert [q["question_id"] for q in closed["questions"]] == [qids[0]]
        open_ = await asker.request("my_questions", {"status": "open"})
        assert [q["question_id"] for q in open_["questions"]] == qids[1:][::-1]

        # Someone else's cursor, a cursor of another list, a forged one: refused, never their data.
        assert await refused(other, "my_questions", {"before": first["next"]}) == "invalid_field"
        assert await refused(asker, "my_questions", {"status": "open", "before": first["next"]}) == "invalid_field"
        raw = bytearray(base64.urlsafe_b64decode(first["next"] + "=" * (-len(first["next"]) % 4)))
        raw[3] ^= 1
        forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
        assert await refused(asker, "my_questions", {"before": forged}) == "invalid_field"
        assert await refused(asker, "my_questions", {"before": "not-a-cursor!"}) == "invalid_field"


async def test_my_answers_browse_and_public_profiles(start_server: Any) -> None:
    h: Harness = await start_server()
    async with h.connect("asker") as asker, h.connect("jun", local=True, tags=["food"]) as jun:
        city = (await asker.request("create_question", question_data(hashtags=["food"])))["question"]
        aewol = (await asker.request("create_question", question_data(location=AEWOL, hashtags=["beach"])))["question"]
        done = (await asker.request("create_question", question_data(hashtags=["food"])))["question"]
        a1 = (await jun.request("create_answer", {"question_id": city["question_id"], "content": "Dombedon"}))["answer"]
        a2 = (await jun.request("create_answer", {"question_id": done["question_id"], "content": "Ojo"}))["answer"]
        await asker.request("accept_answer", {"question_id": done["question_id"], "answer_id": a2["answer_id"]})

        mine = (await jun.request("my_answers", {}))["answers"]
        assert [(a["answer_id"], a["question_status"], a["accepted"]) for a in mine] == [
            (a2["answer_id"], "resolved", True),
            (a1["answer_id"], "answered", False),
        ]
        assert mine[1]["question_title"] == city["title"]

        food = await asker.request("browse_questions", {"hashtag": "#Food"})
        assert [q["question_id"] for q in food["questions"]] == [city["question_id"]]  # open ones by default
        everything = await asker.request("browse_questions", {"hashtag": "food", "status": "all"})
        assert [q["question_id"] for q in everything["questions"]] == [done["question_id"], city["question_id"]]
        west = await asker.request("browse_questions", {"region": aewol["region"]})
        assert [q["question_id"] for q in west["questions"]] == [aewol["question_id"]]
        assert await refused(asker, "browse_questions", {"region": "Atlantis"}) == "invalid_field"

        profile = (await asker.request("get_user", {"user_id": "jun"}))["user"]
        assert (profile["local"], profile["tags"], profile["points"]) == (True, ["food"], 10)
        assert (profile["answers_given"], profile["answers_accepted"]) == (2, 1)
        assert profile["member_since"] > 0
        assert await refused(asker, "get_user", {"user_id": "nobody"}) == "not_found"


async def test_the_notification_inbox_and_badges_that_agree_across_devices(start_server: Any) -> None:
    h: Harness = await start_server()
    async with h.connect("asker") as phone, h.connect("asker") as laptop, h.connect("local") as local:
        qid = (await phone.request("create_question", question_data()))["question"]["question_id"]
        for i in range(4):
            await local.request("create_answer", {"question_id": qid, "content": f"answer {i}"})
        inbox = await phone.request("list_notifications", {"limit": 3})
        assert [n["seq"] for n in inbox["notifications"]] == [4, 3, 2]
        assert inbox["unread"] == 4 and not any(n["read"] for n in inbox["notifications"])
        rest = await phone.request("list_notifications", {"limit": 3, "before_seq": inbox["next_before_seq"]})
        assert [n["seq"] for n in rest["notifications"]] == [1] and rest["next_before_seq"] is None
        only = await phone.request("list_notifications", {"types": ["answer_accepted_notification"]})
        assert only["notifications"] == []
        assert await refused(phone, "list_notifications", {"types": ["user_typing"]}) == "invalid_field"

        assert await phone.request("mark_notifications_read", {"up_to_seq": 3}) == {"unread": 1}
        assert (await laptop.next_event("unread_count"))["data"] == {"unread": 1}
        assert (await phone.next_event("unread_count"))["data"] == {"unread": 1}
        after = await phone.request("list_notifications", {})
        assert [n["read"] for n in after["notifications"]] == [False, True, True, True]
    async with h.connect("asker") as tablet:
        assert tablet.hello["unread"] == 1


async def test_a_resume_from_before_the_kept_events_says_so_and_unread_counts_what_is_kept(
    start_server: Any, db: Path | str
) -> None:
    forty_days_ago = int(time.time() * 1000) - 40 * 86_400_000
    old: Harness = await start_server(clock=EngineClock(forty_days_ago))
    async with old.connect("asker") as asker, old.connect("local") as local:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        for i in range(3):
            await local.request("create_answer", {"question_id": qid, "content": f"old answer {i}"})
    await old.running.aclose()
    h: Harness = await start_server()
    async with h.connect("local") as local:
        await local.request("create_answer", {"question_id": qid, "content": "new answer"})
    assert await h.running.clients.prune_inbox() == 1  # the asker's three old events, not the newest one
    assert db_rows(db, "SELECT seq FROM events WHERE user_id = 'asker'") == [(4,)]
    async with h.connect("asker", resume_from=1) as behind, h.connect("asker", resume_from=3) as current:
        assert (behind.hello["resumed"], behind.hello["oldest_seq"]) == (False, 4)
        assert current.hello["resumed"] is True and "oldest_seq" not in current.hello
        assert (await behind.next_event("answer_notification"))["seq"] == 4
        # Unread counts what is kept: the three deleted events, never read, no longer count.
        assert behind.hello["unread"] == current.hello["unread"] == 1
        listed = await current.request("list_notifications", {})
        assert [n["seq"] for n in listed["notifications"]] == [4] and listed["unread"] == 1
    await h.running.aclose()
    again: Harness = await start_server()
    async with again.connect("asker") as asker:
        assert asker.hello["unread"] == 1
        assert await asker.request("mark_notifications_read", {"up_to_seq": 4}) == {"unread": 0}


async def test_what_is_taken_down_leaves_the_inbox_and_its_replays_but_not_their_seqs(start_server: Any) -> None:
    """A hidden or deleted answer, a deleted question: their notifications, listed or replayed, keep their
    seq and their ids, marked removed, and none of the text; an unhidden answer shows again."""
    h: Harness = await start_server()
    async with (
        h.connect("ops", admin=True) as admin,
        h.connect("asker") as asker,
        h.connect("jun", local=True) as jun,
        h.connect("mina") as mina,
    ):
        await jun.request("update_location", {"location": JEJU_CITY})
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        await jun.next_event("new_question_notification")
        spam = (await mina.request("create_answer", {"question_id": qid, "content": "buy followers here"}))["answer"]
        oops = (await mina.request("create_answer", {"question_id": qid, "content": "wrong thread"}))["answer"]
        await jun.request("create_answer", {"question_id": qid, "content": "Dombedon"})
        gone = (await asker.request("create_question", question_data(title="Cheap followers?")))["question"]
        await jun.next_event("new_question_notification")
        await admin.request("hide_answer", {"id": spam["answer_id"], "reason": "spam"})
        await mina.request("delete_answer", {"answer_id": oops["answer_id"]})
        await asker.request("delete_question", {"question_id": gone["question_id"]})

        def shown(event: dict[str, Any]) -> tuple[int, Any]:
            """An answer_notification's seq and its answer's text, or its data if it has no answer."""
            data = event["data"]
            return event["seq"], data["answer"]["content"] if "answer" in data else data

        def removed(answer: dict[str, Any]) -> dict[str, Any]:
            return {"question_id": qid, "answer_id": answer["answer_id"], "removed": True}

        expected = [(3, "Dombedon"), (2, removed(oops)), (1, removed(spam))]
        assert [shown(n) for n in (await asker.request("list_notifications", {}))["notifications"]] == expected
        alerts = (await jun.request("list_notifications", {"types": ["new_question_notification"]}))["notifications"]
        assert alerts[0]["data"] == {"question_id": gone["question_id"], "removed": True}
        assert alerts[1]["data"]["question"]["title"] == question_data()["title"]
    async with h.connect("asker", resume_from=0) as again, h.connect("jun", resume_from=0) as local:
        replayed = [await again.next_event("answer_notification") for _ in range(3)]
        assert [shown(e) for e in replayed] == expected[::-1]
        alerted = [await local.next_event("new_question_notification") for _ in range(2)]
        assert [e["data"].get("removed", False) for e in alerted] == [False, True]
        async with h.connect("ops", admin=True) as admin:
            await admin.request("unhide_answer", {"id": spam["answer_id"]})
        back = (await again.request("list_notifications", {"before_seq": 2}))["notifications"]
        assert [shown(n) for n in back] == [(1, "buy followers here")]
    async with h.connect("asker", resume_from=0) as later:
        assert (await later.next_event("answer_notification"))["data"]["answer"]["content"] == "buy followers here"


async def test_questions_expire_stop_escalating_leave_memory_and_stay_readable(
    start_server: Any, autojump_clock: trio.testing.MockClock
) -> None:
    h: Harness = await start_server(server=NO_TIMERS, questions={"ttl_s": 600.0})
    async with (
        h.connect("asker", timeout=math.inf) as asker,
        h.connect("local", local=True, timeout=math.inf) as local,
    ):
        started = trio.current_time()
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        # The asker is in the room from the start. (The autojump clock may reach the
        # deadline while any commit runs, so nothing else is assumed about when.)
        closed = await asker.next_event("question_closed")
        assert closed["data"] == {"question_id": qid, "reason": "expired"}
        assert trio.current_time() - started >= 600.0 - 0.001
        assert qid not in h.running.clients.escalation_scopes
        assert h.running.engine.counts()["open_questions"] == 0
        assert (await local.request("get_question", {"question_id": qid}))["question"]["status"] == "expired"
        assert await refused(local, "create_answer", {"question_id": qid, "content": "too late"}) == "question_closed"
        mine = await asker.request("my_questions", {"status": "closed"})
        assert [q["question_id"] for q in mine["questions"]] == [qid]


async def test_an_expiry_that_came_due_while_down_happens_at_start(
    start_server: Any, autojump_clock: trio.testing.MockClock
) -> None:
    clock = EngineClock()
    h: Harness = await start_server(clock=clock, server=NO_TIMERS, questions={"ttl_s": 600.0})
    async with h.connect("asker", timeout=math.inf) as asker:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
    await h.running.aclose()
    await trio.sleep(3600)  # down for an hour
    h2: Harness = await start_server(clock=clock, server=NO_TIMERS, questions={"ttl_s": 600.0})
    # The overdue deadline is the first thing the restarted engine does.
    await trio.testing.wait_all_tasks_blocked()
    await h2.running.clients.pipeline.wait_idle()
    assert h2.running.engine.counts()["open_questions"] == 0
    async with h2.connect("asker", timeout=math.inf) as asker:
        assert (await asker.request("get_question", {"question_id": qid}))["question"]["status"] == "expired"
    await h2.running.aclose()


async def receipts(h: Harness, author: DongneClient) -> list[tuple[str, str]]:
    """The receipts an author has been sent by now: the commits done, a round trip after them."""
    await h.running.clients.pipeline.wait_idle()
    await author.request("ping")  # the events sent before its reply came before it
    return [(e["data"]["answer_id"], e["data"]["state"]) for e in author.pending_events() if e["type"] == "receipt"]


async def test_answers_to_an_expired_question_are_delivered_when_the_asker_comes_back(
    start_server: Any, autojump_clock: trio.testing.MockClock
) -> None:
    """An expired question leaves memory at once; the answers its asker had not received yet still turn
    ``delivered`` at the asker's next hello (in the store, and their author hears it), while the server runs
    and after a restart."""
    autojump_clock.autojump_threshold = math.inf  # time moves only when the test moves it (the expiry is due)
    clock = EngineClock()
    settings = {"server": NO_TIMERS, "questions": {"ttl_s": 600.0}}
    h: Harness = await start_server(clock=clock, **settings)
    asked, answered = {}, {}
    for asker in ("mina", "jun"):
        async with h.connect(asker, timeout=math.inf) as client:
            asked[asker] = (await client.request("create_question", question_data()))["question"]["question_id"]
    async with h.connect("author", timeout=math.inf) as author:
        for asker, qid in asked.items():
            reply = await author.request("create_answer", {"question_id": qid, "content": "Dongmun market"})
            answered[asker] = reply["answer"]["answer_id"]
            assert reply["answer"]["state"] == "sent"
        autojump_clock.jump(3600)  # both expire, and leave memory
        await trio.testing.wait_all_tasks_blocked()
        await h.running.clients.pipeline.wait_idle()
        assert not set(asked.values()) & h.running.engine.questions.keys()
        async with h.connect("mina", timeout=math.inf):
            assert await receipts(h, author) == [(answered["mina"], "delivered")]
    await h.running.aclose()

    h2: Harness = await start_server(clock=clock, **settings)
    async with h2.connect("author", timeout=math.inf) as author:
        async with h2.connect("jun", timeout=math.inf):
            assert await receipts(h2, author) == [(answered["jun"], "delivered")]
        async with h2.connect("mina", timeout=math.inf):  # delivered already: nothing more to say
            assert await receipts(h2, author) == []
        mine = (await author.request("my_answers", {}))["answers"]
        assert sorted((a["answer_id"], a["state"]) for a in mine) == sorted((a, "delivered") for a in answered.values())
    await h2.running.aclose()


@pytest.mark.parametrize(
    ("steps", "owed"),
    [(["delete_answer"], False), (["hide_answer"], False), (["hide_question"], False),
     (["hide_answer", "unhide_answer"], True), (["hide_question", "unhide_question"], True),
     (["hide_answer", "hide_question", "unhide_answer"], False)],
)  # fmt: skip
async def test_an_answer_taken_down_is_owed_no_receipt_unless_shown_again(
    start_server: Any, autojump_clock: trio.testing.MockClock, steps: list[str], owed: bool
) -> None:
    """An answer deleted or hidden (or its question hidden) while its asker was away is no longer owed a
    ``delivered`` receipt when the asker comes back after the question expired; shown again meanwhile (and
    its question shown), it is. Take-downs come before the expiry, unhides after it."""
    autojump_clock.autojump_threshold = math.inf  # time moves only when the test moves it
    h: Harness = await start_server(clock=EngineClock(), server=NO_TIMERS, questions={"ttl_s": 600.0})
    async with h.connect("mina", timeout=math.inf) as mina:
        qid = (await mina.request("create_question", question_data()))["question"]["question_id"]
    async with h.connect("author", timeout=math.inf) as author, h.connect("ops", admin=True, timeout=math.inf) as admin:
        aid = (await author.request("create_answer", {"question_id": qid, "content": "x"}))["answer"]["answer_id"]
        for step in steps:
            if step.startswith("unhide"):
                break
            if step == "delete_answer":
                await author.request("delete_answer", {"answer_id": aid})
            else:
                await admin.request(step, {"id": qid if step.endswith("question") else aid, "reason": "spam"})
        autojump_clock.jump(3600)  # the question expires (if it is in memory)
        await trio.testing.wait_all_tasks_blocked()
        for step in steps:
            if step.startswith("unhide"):
                changed = await admin.request(step, {"id": qid if step.endswith("question") else aid})
                assert changed["changed"] is True
        async with h.connect("mina", timeout=math.inf):
            assert await receipts(h, author) == ([(aid, "delivered")] if owed else [])
    await h.running.aclose()
    assert db_rows(h.db, "SELECT answer_id, state FROM answers") == [(aid, "delivered" if owed else "sent")]


@pytest.mark.backends("sqlite")
async def test_a_read_of_the_store_waits_for_the_writes_queued_before_it(
    start_server: Any, autojump_clock: trio.testing.MockClock, db_path: Path
) -> None:
    """A question read from the store for a request shows the writes decided before the request, even those
    still waiting for their commit: here the ``delivered`` a hello wrote for an expired question's answer,
    while another program holds the database's write lock."""
    autojump_clock.autojump_threshold = math.inf  # time moves only when the test moves it
    h: Harness = await start_server(clock=EngineClock(), server=NO_TIMERS, questions={"ttl_s": 600.0})
    async with h.connect("mina", timeout=math.inf) as mina:
        qid = (await mina.request("create_question", question_data()))["question"]["question_id"]
    async with h.connect("author", timeout=math.inf) as author:
        aid = (await author.request("create_answer", {"question_id": qid, "content": "x"}))["answer"]["answer_id"]
        autojump_clock.jump(3600)  # the question expires and leaves memory
        await trio.testing.wait_all_tasks_blocked()
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the hello's commit waits for it
        seen: list[str] = []
        back = trio.Event()

        async def come_back() -> None:
            async with h.connect("mina", timeout=math.inf):
                await back.wait()

        async def look() -> None:
            page = await author.request("get_question", {"question_id": qid})
            seen.extend(a["state"] for a in page["answers"])

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(come_back)
                await trio.testing.wait_all_tasks_blocked()  # the hello is decided, its commit waiting
                nursery.start_soon(look)
                await trio.testing.wait_all_tasks_blocked()
                assert seen == []  # the read waits for the commit before it
                holder.execute("ROLLBACK")
                while not seen:
                    await trio.testing.wait_all_tasks_blocked()
                    await trio.lowlevel.checkpoint()
                back.set()
        finally:
            holder.close()
        assert seen == ["delivered"]
        assert await receipts(h, author) == [(aid, "delivered")]  # once
    await h.running.aclose()


@pytest.mark.backends("sqlite")
async def test_a_list_sent_right_behind_a_write_shows_it(start_server: Any, db_path: Path) -> None:
    """``create_question`` and ``my_questions`` sent back to back, the first one's commit held up by another
    program's write lock: the list waits for the commit, and has the question."""
    h: Harness = await start_server()
    async with h.connect("asker") as asker:
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        listed: list[str] = []

        async def ask_then_list() -> None:
            create = {"type": "create_question", "id": 9001, "data": question_data(title="Right behind it")}
            await asker.ws.send_message(msgpack.packb(create))  # its reply is not waited for
            page = await asker.request("my_questions", {})
            listed.extend(q["title"] for q in page["questions"])

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask_then_list)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert listed == []  # waiting for the commit
                holder.execute("ROLLBACK")
        finally:
            holder.close()
        assert listed == ["Right behind it"]
    await h.running.aclose()


async def test_memory_lets_go_of_ended_questions_older_than_the_hot_set(
    start_server: Any, autojump_clock: trio.testing.MockClock
) -> None:
    """A server that runs for days keeps what a restart would load: ended questions asked before the hot
    set leave memory (an hour after they ended, with nobody in their room), and are read again on demand."""
    h: Harness = await start_server(
        server=NO_TIMERS,
        engine={"hot_question_days": 1.0},
        alerts={"slo_window_days": 1.0},
        questions={"ttl_s": math.inf},  # no expiry: the clock may leap days ahead at any await
    )
    engine = h.running.engine
    async with h.connect("asker", timeout=math.inf) as asker, h.connect("watcher", timeout=math.inf) as watcher:
        asked = {}
        for name in ("closed", "open", "watched"):
            reply = await asker.request("create_question", question_data(title=f"The {name} one"))
            asked[name] = reply["question"]["question_id"]
        for name in ("closed", "watched"):
            await asker.request("close_question", {"question_id": asked[name]})
        await asker.request("leave_question", {"question_id": asked["watched"]})
        await watcher.request("join_question", {"question_id": asked["watched"]})  # someone is still in the room
        for name in ("closed", "open"):
            await asker.request("leave_question", {"question_id": asked[name]})

        await trio.sleep(86_400 + 2 * 3_600)  # a day and two hours: past the hot set and the quiet hour
        await watcher.request("ping")  # memory looks at the first event after its hourly time
        assert asked["closed"] not in engine.questions and asked["closed"] not in engine.answers
        assert asked["open"] in engine.questions  # active: kept, whatever its age
        assert asked["watched"] in engine.questions  # ended, but its room has a member here

        again = await watcher.request("join_question", {"question_id": asked["closed"]})
        assert again["question"]["status"] == "closed" and asked["closed"] in engine.questions  # read back
        await watcher.request("leave_question", {"question_id": asked["closed"]})
        await trio.sleep(2 * 3_600)
        await watcher.request("ping")
        assert asked["closed"] not in engine.questions  # and let go again at a later look
    await h.running.aclose()


async def test_the_answer_time_slo_reads_the_same_after_a_restart(
    start_server: Any, autojump_clock: trio.testing.MockClock
) -> None:
    """A question that expired unanswered counts as missed, also after a restart (the store's hot set has
    it, though memory does not); a deleted one stops counting at once, as a restart would have it."""
    clock = EngineClock()
    sections: dict[str, Any] = {"server": NO_TIMERS, "questions": {"ttl_s": 600.0}}
    h: Harness = await start_server(clock=clock, **sections)
    async with h.connect("asker", timeout=math.inf) as asker, h.connect("boss", admin=True, timeout=math.inf) as boss:
        data = question_data(hashtags=["sunrise"])
        expired = (await asker.request("create_question", data))["question"]["question_id"]
        await asker.next_event("question_closed")  # expired: ten minutes, nobody answered
        deleted = (await asker.request("create_question", question_data(title="A second one")))["question"]
        await asker.request("delete_question", {"question_id": deleted["question_id"]})
        before = (await boss.request("metrics"))["slo"]["overall"]
        trending = (await asker.request("trending", {}))["windows"]["1d"]
    assert expired not in h.running.engine.questions
    assert (before["questions"], before["decided_10m"], before["within_10m"]) == (1, 1, 0.0)
    assert trending == [["sunrise", 1]]  # the deleted one's tags do not count either
    await h.running.aclose()

    h2: Harness = await start_server(clock=clock, **sections)
    async with h2.connect("asker", timeout=math.inf) as asker, h2.connect("boss", admin=True, timeout=math.inf) as boss:
        after = (await boss.request("metrics"))["slo"]["overall"]
        assert (await asker.request("trending", {}))["windows"]["1d"] == trending
    assert expired not in h2.running.engine.questions
    assert after == before
    await h2.running.aclose()


async def test_memory_keeps_an_ended_question_an_hour_past_its_last_change(
    start_server: Any, autojump_clock: trio.testing.MockClock
) -> None:
    """The quiet hour before an ended question leaves memory counts from its last change, not from its end:
    a receipt, a deleted or an unhidden answer may still be on its way to the store, and a read of the store meanwhile
    would bring back the copy from before it."""
    h: Harness = await start_server(
        server=NO_TIMERS,
        engine={"hot_question_days": 1.0},
        alerts={"slo_window_days": 1.0},
        questions={"ttl_s": math.inf},
    )
    engine = h.running.engine
    async with (
        h.connect("asker", timeout=math.inf) as asker,
        h.connect("jun", timeout=math.inf) as jun,
        h.connect("ops", admin=True, timeout=math.inf) as admin,
    ):
        asked = {}
        for name in ("read", "unhidden", "deleted"):
            qid = (await asker.request("create_question", question_data(title=f"The {name} one")))["question"]
            asked[name] = qid["question_id"]
            aid = (await jun.request("create_answer", {"question_id": asked[name], "content": "here"}))["answer"]
            if name == "unhidden":
                await admin.request("hide_answer", {"id": aid["answer_id"], "reason": "checking"})
                hidden_id = aid["answer_id"]
            if name == "deleted":
                deleted_id = aid["answer_id"]
            await asker.request("leave_question", {"question_id": asked[name]})

        await trio.sleep(86_400 + 30 * 60)  # past the hot set; memory looks at the next event
        for name in ("read", "unhidden", "deleted"):
            await asker.request("close_question", {"question_id": asked[name]})
        await trio.sleep(30 * 60)
        await asker.request("mark_read", {"question_id": asked["read"]})
        assert (await admin.request("unhide_answer", {"id": hidden_id}))["changed"] is True
        await jun.request("delete_answer", {"answer_id": deleted_id})
        await trio.sleep(40 * 60)  # 70 minutes after they ended, 40 after their last change
        await jun.request("ping")  # memory looks at the first event after its hourly time
        assert all(qid in engine.questions for qid in asked.values())
        await trio.sleep(3_600)
        await jun.request("ping")  # the next look: all quiet for over an hour now
        assert not any(qid in engine.questions for qid in asked.values())
        # Read back from the store, each is as it was left.
        again = await jun.request("join_question", {"question_id": asked["unhidden"]})
        assert [a["answer_id"] for a in again["answers"]] == [hidden_id]
    await h.running.aclose()


async def test_authors_delete_their_own_questions_and_answers(start_server: Any) -> None:
    h: Harness = await start_server()
    async with h.connect("asker") as asker, h.connect("jun") as jun, h.connect("mina") as mina:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        await jun.request("join_question", {"question_id": qid})
        kept = (await jun.request("create_answer", {"question_id": qid, "content": "Dombedon"}))["answer"]
        gone = (await mina.request("create_answer", {"question_id": qid, "content": "spam-ish"}))["answer"]
        assert await refused(jun, "delete_answer", {"answer_id": gone["answer_id"]}) == "forbidden"
        assert await mina.request("delete_answer", {"answer_id": gone["answer_id"]}) == {
            "question_id": qid,
            "answer_id": gone["answer_id"],
        }
        assert (await jun.next_event("answer_deleted"))["data"]["answer_id"] == gone["answer_id"]
        # A question whose last answer goes is open again, in memory and in the store.
        only = (await mina.request("create_question", question_data(title="A second one")))["question"]
        await jun.request("join_question", {"question_id": only["question_id"]})
        lone = (await jun.request("create_answer", {"question_id": only["question_id"], "content": "x"}))["answer"]
        await jun.request("delete_answer", {"answer_id": lone["answer_id"]})
        reopened = (await mina.request("get_question", {"question_id": only["question_id"]}))["question"]
        assert (reopened["status"], reopened["answer_count"]) == ("open", 0)
        sql = "SELECT status, answer_count FROM questions WHERE question_id = ?"
        assert db_rows(h.db, sql, (only["question_id"],)) == [("open", 0)]
        await jun.request("leave_question", {"question_id": only["question_id"]})
        await mina.request("delete_question", {"question_id": only["question_id"]})
        page = await asker.request("get_question", {"question_id": qid})
        assert [a["answer_id"] for a in page["answers"]] == [kept["answer_id"]]
        assert page["question"]["answer_count"] == 1
        await asker.request("accept_answer", {"question_id": qid, "answer_id": kept["answer_id"]})
        assert await refused(jun, "delete_answer", {"answer_id": kept["answer_id"]}) == "forbidden"
        assert await refused(jun, "delete_question", {"question_id": qid}) == "forbidden"
        assert await asker.request("delete_question", {"question_id": qid}) == {"question_id": qid}
        assert (await jun.next_event("question_deleted"))["data"] == {"question_id": qid}
        assert await refused(asker, "get_question", {"question_id": qid}) == "not_found"
        assert (await asker.request("my_questions", {}))["questions"] == []
        assert (await asker.request("browse_questions", {"status": "all"}))["questions"] == []
        assert (await jun.request("get_user", {"user_id": "jun"}))["user"]["points"] == 10  # kept
        # The answers to it are gone with it: from the author's list and the profile's count.
        assert (await jun.request("my_answers", {}))["answers"] == []
        profile = (await jun.request("get_user", {"user_id": "jun"}))["user"]
        assert (profile["answers_given"], profile["answers_accepted"]) == (0, 0)
        assert await refused(jun, "delete_answer", {"answer_id": "a-none"}) == "not_found"


async def test_an_asker_and_an_answerer_who_are_not_connected_are_pushed(
    start_server: Any, nursery: trio.Nursery
) -> None:
    gateway = FakeGateway(200)
    await nursery.start(gateway.serve)
    h: Harness = await start_server(escalation={"push_url": f"http://127.0.0.1:{gateway.port}/push"})
    async with h.connect("asker") as asker:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
    async with h.connect("local") as local:
        answer = (await local.request("create_answer", {"question_id": qid, "content": "Dombedon"}))["answer"]
    async with h.connect("asker") as asker:
        await asker.request("accept_answer", {"question_id": qid, "answer_id": answer["answer_id"]})
    with trio.fail_after(10):
        await h.running.pushes.wait_sent(2)
    kinds = [(body["kind"], body["user_id"]) for _headers, body in gateway.requests]
    assert all(body["type"] == body["kind"] for _headers, body in gateway.requests)
    assert kinds == [("answer_notification", "asker"), ("answer_accepted_notification", "local")]


async def test_browsing_thirty_questions_a_minute_is_never_closed(
    start_server: Any, autojump_clock: trio.testing.MockClock
) -> None:
    from .conftest import UNLIMITED

    limits = {**UNLIMITED, "reads_per_s": 5.0, "reads_burst": 30.0, "conn_per_s": 20.0, "conn_burst": 40.0}
    h: Harness = await start_server(server=NO_TIMERS, limits=limits)
    async with h.connect("asker", timeout=math.inf) as asker, h.connect("reader", timeout=math.inf) as reader:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        for _ in range(10):  # ten minutes of browsing, 30 a minute
            for _ in range(30):
                await reader.request("get_question", {"question_id": qid})
                await trio.sleep(2.0)
        # A burst beyond the bucket is refused politely, not closed.
        results = []
        for _ in range(40):
            try:
                await reader.request("browse_questions", {})
                results.append("ok")
            except RequestError as exc:
                results.append(exc.code)
        assert "rate_limited" in results and set(results) <= {"ok", "rate_limited"}
        await trio.sleep(10.0)  # the buckets refill
        assert (await reader.request("get_profile"))["user"]["user_id"] == "reader"  # still connected


async def test_a_locals_inbox_lists_alerts_and_other_types_by_type(start_server: Any) -> None:
    """Alerts are the one type outside the per-type index: filtering by it, alone or
    with other types, still lists exactly those events, newest first, in pages."""
    h: Harness = await start_server()
    async with h.connect("asker") as asker, h.connect("jun", local=True) as jun:
        await jun.request("update_location", {"location": JEJU_CITY})
        first = (await asker.request("create_question", question_data()))["question"]["question_id"]
        await jun.next_event("new_question_notification")
        answer = (await jun.request("create_answer", {"question_id": first, "content": "Dombedon"}))["answer"]
        await asker.request("accept_answer", {"question_id": first, "answer_id": answer["answer_id"]})
        await jun.next_event("answer_accepted_notification")
        second = (await asker.request("create_question", question_data()))["question"]["question_id"]
        await jun.next_event("new_question_notification")

        def listed(reply: dict[str, Any]) -> list[tuple[int, str]]:
            return [(n["seq"], n["type"]) for n in reply["notifications"]]

        alerts = await jun.request("list_notifications", {"types": ["new_question_notification"]})
        assert listed(alerts) == [(3, "new_question_notification"), (1, "new_question_notification")]
        assert [n["data"]["question_id"] for n in alerts["notifications"]] == [second, first]
        mixed = await jun.request(
            "list_notifications", {"types": ["answer_accepted_notification", "new_question_notification"], "limit": 2}
        )
        assert listed(mixed) == [(3, "new_question_notification"), (2, "answer_accepted_notification")]
        rest = await jun.request(
            "list_notifications",
            {
                "types": ["new_question_notification", "answer_accepted_notification"],
                "before_seq": mixed["next_before_seq"],
            },
        )
        assert listed(rest) == [(1, "new_question_notification")] and rest["next_before_seq"] is None
        accepted = await jun.request("list_notifications", {"types": ["answer_accepted_notification"]})
        assert listed(accepted) == [(2, "answer_accepted_notification")]


#: One query of each shape every list sends.
PLANNED = [
    QuestionPage("q1", None, 20),
    QuestionPage("q1", (1, "a1"), 20),
    QuestionsOfAsker("u1", None, False, None, 20),
    QuestionsOfAsker("u1", ("open", "answered"), True, (1, "q1"), 20),
    AnswersOfAuthor("u1", (1, "a1"), 20),
    Browse(None, None, True, None, 20),
    Browse("Jeju-si", None, True, (1, "q1"), 20),
    Browse(None, "food", True, None, 20),
    Browse("Jeju-si", "food", False, None, 20),
    Browse(None, "food", False, (1, "q1"), 20),
    Browse(None, None, False, None, 20),
    Browse("Aewol-eup", None, False, None, 20),
    AuthorStats("u1"),
    Notifications("u1", None, None, 30),
    Notifications("u1", 5, ("answer_notification", "slow_response_alert"), 30),
    Notifications("u1", None, ("new_question_notification", "answer_notification"), 30),
    AnswerHome("a1"),
]


def test_every_list_is_served_by_an_index(tmp_path: Path) -> None:
    store = Store(tmp_path / "plans.sqlite3")
    store.open()
    store.close()
    queries = PLANNED
    with sqlite3.connect(tmp_path / "plans.sqlite3") as conn:
        for query in queries:
            for sql, params in plan(query, QUESTION_COLS, ANSWER_COLS):
                steps = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
                # Every table is reached through an index (a SEARCH, or an ordered SCAN of an index).
                tables = [s for s in steps if s.startswith(("SCAN", "SEARCH"))]
                indexed = all("USING" in s and ("INDEX" in s or "PRIMARY KEY" in s) for s in tables)
                assert tables and indexed, (query, steps)


#: Thousands of rows with statistics: PostgreSQL plans by them (on empty tables it may pick any index).
PG_SEED = """
INSERT INTO users (user_id, nick, local, tags, role, points, last_seq, created_at) SELECT 'u'||i, 'n', 0, '[]', 'user', 0, 0, 0 FROM generate_series(1, 200) i;
INSERT INTO questions (question_id, asker_id, asker_nick, title, body, lat, lng, region, hashtags, urgency, status, created_at, answer_count)
  SELECT 'q'||i, 'u'||(i % 200 + 1), 'n', 't', 'b', 33.5, 126.5, 'r'||(i % 50), '[]', 'normal', (ARRAY['open', 'answered', 'resolved', 'closed'])[i % 4 + 1], i, i % 3 FROM generate_series(1, 5000) i;
INSERT INTO question_hashtags SELECT 'q'||i, 't'||(i % 40), i FROM generate_series(1, 5000) i;
INSERT INTO answers (answer_id, question_id, author_id, author_nick, content, created_at, state, accepted)
  SELECT 'a'||i, 'q'||(i % 5000 + 1), 'u'||(i % 200 + 1), 'n', 'c', i, 'sent', 0 FROM generate_series(1, 10000) i;
INSERT INTO events SELECT 'u'||(i % 200 + 1), i, (ARRAY['answer_notification', 'new_question_notification', 'slow_response_alert'])[i % 3 + 1], '\x80', i FROM generate_series(1, 20000) i;
ANALYZE;
"""


@pytest.mark.backends("postgres")
def test_every_list_is_served_by_an_index_on_postgresql(db: str) -> None:
    """PostgreSQL takes no index hints: on a database of some size, with statistics, no list
    reads a table from end to end (a sort, if any, is of the few rows an index found)."""
    import psycopg

    from dongne.store._postgres import _pg

    store = store_for(db)
    store.open()
    store.close()
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(PG_SEED.encode())
        for query in PLANNED:
            for sql, params in plan(query, QUESTION_COLS, ANSWER_COLS, "postgres"):
                steps = "\n".join(str(row[0]) for row in conn.execute("EXPLAIN " + _pg(sql), params))
                assert "Index" in steps and "Seq Scan" not in steps, (query, steps)
