"""Moderation over real sockets: bans close every connection with 4003 and outlive restarts; the audit log."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
import trio_websocket

from dongne.client import RequestError
from dongne.core.effects import SaveIpBlock
from dongne.core.records import IpBlock, stopped_for_good
from dongne.store import store_for

from .conftest import NO_TIMERS, UNLIMITED, Harness, db_rows, question_data, token


async def refused_hello(h: Harness, user_id: str) -> trio_websocket.CloseReason:
    """How the server closes a hello of ``user_id`` (raw WebSocket: the close is the answer)."""
    async with trio_websocket.open_websocket_url(h.url) as ws:
        await ws.send_message(msgpack.packb({"type": "hello", "id": 1, "data": {"token": token(user_id)}}))
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
        return closed.value.reason


async def closed_code(client: Any) -> int:
    await client.wait_closed()
    assert client.closed is not None
    return int(client.closed.reason.code)


async def test_a_ban_closes_every_connection_with_4003_and_outlives_a_restart(start_server: Any) -> None:
    h: Harness = await start_server()
    async with (
        h.connect("ops", admin=True) as admin,
        h.connect("mallory") as phone,
        h.connect("mallory") as laptop,
        h.connect("bystander") as bystander,
    ):
        question = (await phone.request("create_question", question_data()))["question"]
        assert question["question_id"] in h.running.clients.escalation_scopes
        with pytest.raises(RequestError) as refused:
            await bystander.request("ban_user", {"user_id": "mallory", "reason": "spam"})
        assert refused.value.code == "forbidden"
        banned = await admin.request("ban_user", {"user_id": "mallory", "reason": "selling casino links"})
        assert banned == {"user_id": "mallory", "banned_until": None}  # until unban_user
        with trio.fail_after(1):
            assert [await closed_code(phone), await closed_code(laptop)] == [4003, 4003]
        await h.running.clients.pipeline.wait_idle()
        assert question["question_id"] not in h.running.clients.escalation_scopes  # no more alerts for it
        assert (await bystander.request("get_profile"))["user"]["user_id"] == "bystander"  # others unaffected
    await h.running.aclose()

    h2: Harness = await start_server()
    again = await refused_hello(h2, "mallory")
    assert again.code == 4003 and "casino" in (again.reason or "")
    async with h2.connect("ops", admin=True) as admin:
        await admin.request("unban_user", {"user_id": "mallory", "reason": "appeal accepted"})
        async with h2.connect("mallory") as back:
            assert (await back.request("get_profile"))["user"]["user_id"] == "mallory"
        audit = await admin.request("list_audit", {"limit": 1})
        assert [(e["action"], e["target"], e["admin_id"]) for e in audit["entries"]] == [
            ("unban_user", "mallory", "ops")
        ]
        older = await admin.request("list_audit", {"before": audit["next"]})
        assert [(e["action"], e["reason"]) for e in older["entries"]] == [("ban_user", "selling casino links")]
        assert older["next"] is None
    await h2.running.aclose()


async def test_a_ban_with_an_end_lets_the_user_back_after_it(
    start_server: Any, autojump_clock: trio.testing.MockClock
) -> None:
    h: Harness = await start_server(server=NO_TIMERS)
    async with h.connect("ops", admin=True, timeout=math.inf) as admin:
        async with h.connect("mallory", timeout=math.inf):
            pass
        until = h.running.clients.clock.now_ms() + 3_600_000
        await admin.request("ban_user", {"user_id": "mallory", "reason": "cool down", "until": until})
        assert (await refused_hello(h, "mallory")).code == 4003
        await trio.sleep(3601)
        async with h.connect("mallory", timeout=math.inf) as back:
            assert (await back.request("get_profile"))["user"]["user_id"] == "mallory"
        with pytest.raises(RequestError) as past:
            await admin.request("ban_user", {"user_id": "mallory", "reason": "x", "until": until})
        assert past.value.code == "invalid_field"  # an end in the past
    await h.running.aclose()


async def test_hidden_content_leaves_rooms_and_lists_its_author_is_told_and_it_can_come_back(
    start_server: Any,
) -> None:
    h: Harness = await start_server()
    async with (
        h.connect("ops", admin=True) as admin,
        h.connect("asker") as asker,
        h.connect("jun", local=True) as jun,
        h.connect("viewer") as viewer,
    ):
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        await viewer.request("join_question", {"question_id": qid})
        aid = (await jun.request("create_answer", {"question_id": qid, "content": "buy it at my online store"}))[
            "answer"
        ]["answer_id"]
        with pytest.raises(RequestError) as refused:
            await viewer.request("hide_answer", {"id": aid, "reason": "spam"})
        assert refused.value.code == "forbidden"

        await admin.request("join_question", {"question_id": qid})  # the admin is in the room too
        hidden = await admin.request("hide_answer", {"id": aid, "reason": "link spam"})
        assert hidden == {"id": aid, "hidden": True, "changed": True}
        assert (await viewer.next_event("answer_deleted"))["data"] == {"question_id": qid, "answer_id": aid}
        told = await jun.next_event("content_hidden")
        assert told["data"] == {"question_id": qid, "answer_id": aid, "reason": "link spam"} and told["seq"] > 0
        page = await viewer.request("get_question", {"question_id": qid})
        assert (page["answers"], page["question"]["answer_count"]) == ([], 0)
        assert page["question"]["status"] == "open"  # its only answer hidden: no answer
        assert (await jun.request("my_answers", {}))["answers"] == []

        assert (await admin.request("unhide_answer", {"id": aid}))["changed"] is True
        # The room that heard it go hears it come back, as a new answer (the unhiding admin's connection not).
        back = await viewer.next_event("new_answer")
        page = await viewer.request("get_question", {"question_id": qid})
        assert back["data"] == {"question_id": qid, "answer": page["answers"][0]}
        assert back["data"]["answer"]["content"] == "buy it at my online store"
        assert [e["type"] for e in admin.pending_events() if e["type"] == "new_answer"] == []
        assert [a["answer_id"] for a in page["answers"]] == [aid] and page["question"]["answer_count"] == 1
        assert page["question"]["status"] == "answered"  # and the asker may accept it
        assert db_rows(h.db, "SELECT status, answer_count FROM questions") == [("answered", 1)]

        await admin.request("hide_question", {"id": qid, "reason": "off topic"})
        assert (await viewer.next_event("question_deleted"))["data"] == {"question_id": qid}
        await admin.request("get_profile")  # a round trip: anything the room sent the admin came before its reply
        # The room hears of it, but not the connection whose request hid it (PROTOCOL.md: "the room").
        assert [e["type"] for e in admin.pending_events() if e["type"].endswith("_deleted")] == []
        assert (await asker.next_event("content_hidden"))["data"] == {"question_id": qid, "reason": "off topic"}
        with pytest.raises(RequestError) as gone:
            await viewer.request("get_question", {"question_id": qid})
        assert gone.value.code == "not_found"
        assert (await viewer.request("browse_questions", {"status": "all"}))["questions"] == []
        # Its escalation stopped for good after IMMEDIATE, stored as stopped whatever the plan: a restart after
        # the unhide, with a longer plan too, does not start it again.
        stored = db_rows(h.db, "SELECT next_stage FROM escalations WHERE question_id = ?", (qid,))
        assert stored == [(stopped_for_good(1),)]
        await admin.request("unhide_question", {"id": qid})
        assert (await viewer.request("get_question", {"question_id": qid}))["question"]["question_id"] == qid
        # Back in memory as open once joined (read from the store): nearby again (it left nearby with memory).
        await viewer.request("join_question", {"question_id": qid})
        nearby = await jun.request("nearby_questions", {"location": question_data()["location"]})
        assert [q["question_id"] for q in nearby["questions"]] == [qid]

        actions = [e["action"] for e in (await admin.request("list_audit", {}))["entries"]]
        assert actions == ["unhide_question", "hide_question", "unhide_answer", "hide_answer"]


async def test_reports_hide_at_the_threshold_and_an_admin_resolves_them(start_server: Any) -> None:
    h: Harness = await start_server(moderation={"auto_hide_reports": 3})
    async with (
        h.connect("ops", admin=True) as admin,
        h.connect("asker") as asker,
        h.connect("spammer") as spammer,
        h.connect("r1") as r1,
        h.connect("r2") as r2,
        h.connect("r3") as r3,
    ):
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        aid = (await spammer.request("create_answer", {"question_id": qid, "content": "visit my shop"}))["answer"][
            "answer_id"
        ]
        with pytest.raises(RequestError) as own:
            await spammer.request("report_content", {"answer_id": aid, "reason": "spam"})
        assert own.value.code == "forbidden"
        first = await r1.request("report_content", {"answer_id": aid, "reason": "spam", "note": "a shop link"})
        assert await r1.request("report_content", {"answer_id": aid, "reason": "spam"}) == first  # once per user
        await r2.request("report_content", {"answer_id": aid, "reason": "abuse"})
        assert (await asker.request("get_question", {"question_id": qid}))["question"]["answer_count"] == 1
        await r3.request("report_content", {"answer_id": aid, "reason": "spam"})  # the third: hidden at once
        assert (await asker.next_event("answer_deleted"))["data"]["answer_id"] == aid
        assert (await spammer.next_event("content_hidden"))["data"]["answer_id"] == aid
        # Hidden now, by these very reports: a second report of it still returns the first.
        assert await r1.request("report_content", {"answer_id": aid, "reason": "spam"}) == first

        queue = await admin.request("list_reports", {})
        assert len(queue["reports"]) == 3 and queue["next"] is None
        item = queue["reports"][0]["item"]
        assert (item["kind"], item["id"], item["author_id"], item["hidden"]) == ("answer", aid, "spammer", True)
        assert item["text"] == "visit my shop"
        dismissed = await admin.request(
            "resolve_report", {"report_id": queue["reports"][0]["report_id"], "action": "dismiss"}
        )
        assert dismissed["resolved"] == 3
        # Shown again: the room (the asker's connection is in it) gets it as a new answer.
        back = await asker.next_event("new_answer")
        assert (back["data"]["question_id"], back["data"]["answer"]["answer_id"]) == (qid, aid)
        assert (await asker.request("get_question", {"question_id": qid}))["question"]["answer_count"] == 1
        assert (await admin.request("list_reports", {}))["reports"] == []
        done = await admin.request("list_reports", {"status": "resolved"})
        assert {r["action"] for r in done["reports"]} == {"dismiss"}

        # Reported again, and this time the author is banned.
        again = await r2.request("report_content", {"answer_id": aid, "reason": "spam", "note": "still at it"})
        assert again["report_id"] != first["report_id"]
        await admin.request("resolve_report", {"report_id": again["report_id"], "action": "ban"})
        with trio.fail_after(1):
            assert await closed_code(spammer) == 4003


async def test_an_ip_block_at_run_time_closes_that_address_and_refuses_it_until_lifted(
    start_server: Any,
) -> None:
    from .addressed import attempt

    h: Harness = await start_server()
    async with h.connect("ops", admin=True) as admin:
        async with attempt(h.running.port, token("abuser"), bind="127.0.0.2") as before:
            assert before.ok and before.stream is not None
            with pytest.raises(RequestError) as bad:
                await admin.request("block_ip", {"cidr": "not-an-address", "reason": "x"})
            assert bad.value.code == "invalid_field"
            block = await admin.request("block_ip", {"cidr": "127.0.0.2", "reason": "credential stuffing"})
            assert block["block"]["cidr"] == "127.0.0.2/32"
            with trio.fail_after(1):
                frame = await before.stream.receive_some(1024)
            assert frame[0] == 0x88 and int.from_bytes(frame[2:4], "big") == 4003  # a close frame, 4003
        async with attempt(h.running.port, token("abuser"), bind="127.0.0.2") as refused:
            assert refused.status == 0 and not refused.ok  # dropped at accept, before any handshake
        async with attempt(h.running.port, token("neighbour"), bind="127.0.0.3") as other:
            assert other.ok  # another address is not affected
        listed = await admin.request("list_ip_blocks", {})
        assert [b["cidr"] for b in listed["blocks"]] == ["127.0.0.2/32"] and listed["static"] == []
    await h.running.aclose()

    h2: Harness = await start_server()  # durable: still blocked after a restart
    async with attempt(h2.running.port, token("abuser"), bind="127.0.0.2") as still:
        assert still.status == 0 and not still.ok
    async with h2.connect("ops", admin=True) as admin:
        await admin.request("unblock_ip", {"cidr": "127.0.0.2/32"})
        async with attempt(h2.running.port, token("abuser"), bind="127.0.0.2") as back:
            assert back.ok
        actions = [e["action"] for e in (await admin.request("list_audit", {}))["entries"]]
        assert actions[:2] == ["unblock_ip", "block_ip"]
    await h2.running.aclose()


async def test_a_block_of_an_ipv4_mapped_address_blocks_that_ipv4_client(start_server: Any) -> None:
    """Client addresses are compared as IPv4 (a dual-stack socket's ``::ffff:a.b.c.d`` is normalised): so are
    blocks written the IPv6 way, at run time and in config.toml."""
    from .addressed import attempt

    h: Harness = await start_server(limits={**UNLIMITED, "ip_blocklist": ["::ffff:127.0.0.5"]})
    async with h.connect("ops", admin=True) as admin:
        block = await admin.request("block_ip", {"cidr": "::ffff:127.0.0.2", "reason": "credential stuffing"})
        assert block["block"]["cidr"] == "127.0.0.2/32"
        async with attempt(h.running.port, token("abuser"), bind="127.0.0.2") as refused:
            assert refused.status == 0 and not refused.ok
        async with attempt(h.running.port, token("abuser"), bind="127.0.0.5") as static:
            assert static.status == 0 and not static.ok
        await admin.request("unblock_ip", {"cidr": "::ffff:127.0.0.2/128"})
        async with attempt(h.running.port, token("abuser"), bind="127.0.0.2") as back:
            assert back.ok
    await h.running.aclose()


async def test_review_findings_hide_out_of_memory_reporters_told_repeat_reports_and_a_failed_unblock(
    start_server: Any, db_path: Any
) -> None:
    import sqlite3
    import time

    from dongne.clock import EngineClock

    h: Harness = await start_server(moderation={"auto_hide_reports": 2}, questions={"ttl_s": 3600.0})
    async with (
        h.connect("ops", admin=True) as admin,
        h.connect("asker") as asker,
        h.connect("spammer") as spammer,
        h.connect("r1") as r1,
        h.connect("r2") as r2,
    ):
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        aid = (await spammer.request("create_answer", {"question_id": qid, "content": "visit my shop"}))["answer"][
            "answer_id"
        ]
        # The last reporter is in the room: the auto-hide is news to them too.
        await r2.request("join_question", {"question_id": qid})
        await r1.request("report_content", {"answer_id": aid, "reason": "spam"})
        await r2.request("report_content", {"answer_id": aid, "reason": "spam"})
        assert (await r2.next_event("answer_deleted"))["data"]["answer_id"] == aid
        # Dismissed, then reported again by the same user: a new report, stored and listed.
        first = (await admin.request("list_reports", {}))["reports"][0]["report_id"]
        await admin.request("resolve_report", {"report_id": first, "action": "dismiss"})
        again = await r1.request("report_content", {"answer_id": aid, "reason": "abuse"})
        listed = [r["report_id"] for r in (await admin.request("list_reports", {}))["reports"]]
        assert listed == [again["report_id"]]

        old = (await asker.request("create_question", question_data(title="old one")))["question"]["question_id"]
        await asker.request("close_question", {"question_id": old})

        # A refused unblock leaves the block in force.
        await admin.request("block_ip", {"cidr": "198.51.100.7", "reason": "scraper"})
        with pytest.raises(RequestError) as long_reason:
            await admin.request("unblock_ip", {"cidr": "198.51.100.7", "reason": "x" * 600})
        assert long_reason.value.code == "too_long"
        assert [b["cidr"] for b in (await admin.request("list_ip_blocks", {}))["blocks"]] == ["198.51.100.7/32"]
    await h.running.aclose()
    with sqlite3.connect(db_path) as conn:
        reports = conn.execute("SELECT reporter_id, status FROM reports ORDER BY created_at, report_id").fetchall()
    assert sorted(reports) == [("r1", "open"), ("r1", "resolved"), ("r2", "resolved")]

    # Eight days on, the closed question is no longer in memory; it can still be hidden (in the store).
    later = EngineClock(int(time.time() * 1000) + 8 * 86_400_000)
    h2: Harness = await start_server(clock=later)
    assert old not in h2.running.engine.questions  # closed, and older than the hot window
    async with h2.connect("ops", admin=True) as admin, h2.connect("asker") as asker:
        assert (await admin.request("hide_question", {"id": old, "reason": "off topic"}))["changed"] is True
        with pytest.raises(RequestError) as gone:
            await asker.request("get_question", {"question_id": old})
        assert gone.value.code == "not_found"
        assert (await asker.next_event("content_hidden"))["data"]["question_id"] == old
    await h2.running.aclose()


async def test_an_open_question_shown_again_is_open_here_again(
    start_server: Any, autojump_clock: trio.testing.MockClock
) -> None:
    """Unhiding an open question puts it back where a restart would: nearby, and expiring on time."""
    autojump_clock.autojump_threshold = math.inf  # time moves only when the test moves it
    h: Harness = await start_server(server=NO_TIMERS, questions={"ttl_s": 600.0})
    async with (
        h.connect("ops", admin=True, timeout=math.inf) as admin,
        h.connect("asker", timeout=math.inf) as asker,
        h.connect("viewer", timeout=math.inf) as viewer,
    ):
        data = question_data()
        qid = (await asker.request("create_question", data))["question"]["question_id"]

        async def nearby() -> list[str]:
            near = await viewer.request("nearby_questions", {"location": data["location"]})
            return [q["question_id"] for q in near["questions"]]

        assert await nearby() == [qid]
        await admin.request("hide_question", {"id": qid, "reason": "checking"})
        assert await nearby() == []
        await admin.request("unhide_question", {"id": qid})
        assert await nearby() == [qid]
        await asker.request("join_question", {"question_id": qid})
        autojump_clock.jump(601.0)  # past its time to live, from when it was asked
        closed = await asker.next_event("question_closed")
        assert closed["data"] == {"question_id": qid, "reason": "expired"}
    assert db_rows(h.db, "SELECT status FROM questions WHERE question_id = ?", (qid,)) == [("expired",)]
    await h.running.aclose()


async def test_a_block_stored_in_its_ipv4_mapped_form_is_listed_and_unblocked_as_its_ipv4_one(
    start_server: Any, db: Any
) -> None:
    """A row stored before mapped addresses were normalised (::ffff:7f00:2/128, which blocked nothing then), beside
    the plain one an admin added since: listed once, as 127.0.0.2/32, and one unblock deletes both rows."""
    h: Harness = await start_server()
    async with h.connect("ops", admin=True) as admin:
        await admin.request("block_ip", {"cidr": "127.0.0.2", "reason": "abuse"})
    await h.running.aclose()
    store = store_for(db)
    store.open()
    store.apply([SaveIpBlock(IpBlock("::ffff:7f00:2/128", None, "old", "ops", 1))])  # as an older version stored it
    store.close()
    h = await start_server()
    async with h.connect("ops", admin=True) as admin:
        listed = (await admin.request("list_ip_blocks", {}))["blocks"]
        assert [b["cidr"] for b in listed] == ["127.0.0.2/32"]
        assert await admin.request("unblock_ip", {"cidr": "127.0.0.2"}) == {"cidr": "127.0.0.2/32"}
    await h.running.aclose()
    again: Harness = await start_server()
    async with again.connect("ops", admin=True) as admin:
        assert (await admin.request("list_ip_blocks", {}))["blocks"] == []
