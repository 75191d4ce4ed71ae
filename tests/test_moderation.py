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

from .conftest import NO_TIMERS, Harness, question_data, token


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
        assert banned == {"user_id": "mallory", "banned_until": 2**62}
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
