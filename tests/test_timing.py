"""Time over real sockets, on an autojump mock clock.

Every I/O wait lets the clock jump to the nearest deadline, so these tests
keep all other timers infinite and assert only what holds however the clock
jumps: the order of events and lower bounds on elapsed time. Exact timings are
pinned in test_engine.py.
"""

from __future__ import annotations

import math
from typing import Any

import trio
import trio.testing

from .conftest import NO_TIMERS, question_data, token
from .rawws import RawWebSocket


async def test_typing_expires_by_itself(start_server: Any, autojump_clock: trio.testing.MockClock) -> None:
    h = await start_server(server=NO_TIMERS, engine={"typing_ttl_s": 3.0})
    async with h.connect("asker", timeout=math.inf) as asker, h.connect("local", timeout=math.inf) as local:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        await local.request("join_question", {"question_id": qid})
        await asker.next_event("user_online")
        started = trio.current_time()
        await local.request("typing_start", {"question_id": qid})
        assert (await asker.next_event())["type"] == "user_typing"
        stop = await asker.next_event()
        assert stop["type"] == "user_stop_typing"
        assert stop["data"]["user_id"] == "local"
        # Protocol time is whole milliseconds, so the deadline may round down by < 1 ms.
        assert trio.current_time() - started >= 3.0 - 0.001
        state = await asker.request("join_question", {"question_id": qid})
        assert state["typing"] == []
    await h.running.aclose()


async def test_silent_peer_is_dropped_by_heartbeat(start_server: Any, autojump_clock: trio.testing.MockClock) -> None:
    h = await start_server(server={"hello_timeout_s": math.inf, "ping_interval_s": 5.0})
    silent = await RawWebSocket.connect(h.running.port)
    await silent.send({"type": "hello", "id": 1, "data": {"token": token("silent")}})
    started = trio.current_time()
    # Its client answers every ping. No client timeouts: on the autojump clock
    # they would be the next deadline while the handshake's bytes are in flight.
    async with h.connect("lively", timeout=math.inf) as lively:
        # The silent peer never answers a ping (reading sends nothing): closed
        # one interval after its unanswered ping (pings are spread over each
        # interval). read_until_closed returns at the close frame or EOF.
        with trio.fail_after(1e6):
            await silent.read_until_closed()
        # Not before a whole interval after its ping. (No upper bound: the
        # autojump clock also jumps while commits run on a worker thread.)
        assert trio.current_time() - started >= 5.0
        await trio.sleep(4 * 5.0)
        assert (await lively.request("get_profile"))["user"]["user_id"] == "lively"
    silent.close()
    await h.running.aclose()


async def test_no_hello_in_time_closes_with_4001(start_server: Any, autojump_clock: trio.testing.MockClock) -> None:
    import pytest
    import trio_websocket

    h = await start_server(server={"hello_timeout_s": 10.0, "ping_interval_s": math.inf})
    async with trio_websocket.open_websocket_url(h.url) as ws:
        started = trio.current_time()
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == 4001
        assert "hello" in closed.value.reason.reason
        assert trio.current_time() - started >= 10.0
    await h.running.aclose()


async def test_heartbeat_rounds_with_nobody_connected(
    start_server: Any, autojump_clock: trio.testing.MockClock
) -> None:
    h = await start_server(server={"hello_timeout_s": math.inf, "ping_interval_s": 5.0})
    await trio.sleep(3 * 5.0)  # three rounds with no connection at all
    async with h.connect("late", timeout=math.inf) as late:
        assert (await late.request("get_profile"))["user"]["user_id"] == "late"
    await h.running.aclose()
