"""Limits and content rules over real sockets, and the token bucket's exact arithmetic."""

from __future__ import annotations

import math

import msgpack
import pytest
import trio
import trio_websocket

from dongne.client import RequestError
from dongne.core.limits import BucketSpec, IpBlocklist, Limiter, TokenBucket

from .conftest import NO_TIMERS, UNLIMITED, question_data, token

ONLY_IMMEDIATE = [{"name": "IMMEDIATE", "offset_s": 0.0, "radius_m": 2000.0, "audience": "online_nearby"}]


def test_token_bucket_refills_exactly() -> None:
    bucket = TokenBucket.full(BucketSpec(rate=2.0, burst=3.0), now=0)
    assert [bucket.take(0) for _ in range(3)] == [0, 0, 0]
    assert bucket.take(0) == 500  # one token needs 500 ms at 2/s
    assert bucket.take(499) > 0
    assert bucket.take(500) == 0
    assert bucket.take(500) > 0


def test_limiter_flags_abuse_within_the_window_only() -> None:
    limiter = Limiter({"x": BucketSpec(1.0, 1.0)}, abuse_limit=3, abuse_window_ms=1000)
    assert not limiter.refused("k", 0)
    assert not limiter.refused("k", 600)
    assert not limiter.refused("k", 1200)  # the first refusal left the window
    assert limiter.refused("k", 1300)


def test_blocklist_matches_networks() -> None:
    blocked = IpBlocklist(["10.1.0.0/16", "192.0.2.7"])
    assert blocked.blocks("10.1.200.3") and blocked.blocks("192.0.2.7")
    assert not blocked.blocks("10.2.0.1") and not blocked.blocks("127.0.0.1")


async def test_rate_limited_then_closed_for_abuse(start_server, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    limits = {**UNLIMITED, "writes_per_minute": 6.0, "writes_burst": 2.0, "abuse_refusals_per_minute": 5}
    # No escalation timers either: on the autojump clock, time then moves only when the test sleeps.
    h = await start_server(
        server=NO_TIMERS, limits=limits, escalation={"stages": ONLY_IMMEDIATE}, alerts={"slow_response_s": 1e12}
    )
    async with h.connect("asker", timeout=math.inf) as asker, h.connect("spammer", timeout=math.inf) as spammer:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        for i in range(2):
            await spammer.request("create_answer", {"question_id": qid, "content": f"answer {i}"})
        with pytest.raises(RequestError) as limited:
            await spammer.request("create_answer", {"question_id": qid, "content": "one more"})
        assert limited.value.code == "rate_limited"
        assert 0 < limited.value.error["retry_after_ms"] <= 10_000
        # Reads are not limited by the write bucket.
        assert (await spammer.request("get_profile"))["user"]["user_id"] == "spammer"
        # Waiting as told works.
        await trio.sleep(limited.value.error["retry_after_ms"] / 1000)
        await spammer.request("create_answer", {"question_id": qid, "content": "after waiting"})
        # Ignoring the refusals gets the connection closed with 4008.
        codes = []
        for _ in range(20):
            try:
                await spammer.request("create_answer", {"question_id": qid, "content": "spam spam"})
            except RequestError as exc:
                codes.append(exc.code)
            except (trio_websocket.ConnectionClosed, trio.TooSlowError):
                break
            if spammer.closed is not None:
                break
        assert codes and set(codes) == {"rate_limited"}
        with trio.fail_after(100):
            await spammer.wait_closed()
        assert spammer.closed is not None
        assert spammer.closed.reason.code == 4008
        # Everyone else carries on.
        assert (await asker.request("get_profile"))["user"]["user_id"] == "asker"
    await h.running.aclose()


async def test_flood_of_bad_frames_is_closed_with_4008(start_server) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(limits={**UNLIMITED, "conn_per_s": 1.0, "conn_burst": 5.0, "abuse_refusals_per_minute": 10})
    async with h.connect("flooder") as flooder, h.connect("bystander") as bystander:
        for _ in range(40):
            try:
                await flooder.send_raw(b"\xc1")
            except trio_websocket.ConnectionClosed:
                break
        with trio.fail_after(10):
            await flooder.wait_closed()
        assert flooder.closed is not None
        assert flooder.closed.reason.code == 4008
        assert (await bystander.request("get_profile"))["user"]["user_id"] == "bystander"
    await h.running.aclose()


async def _probe(port: int) -> bytes:
    """What the server answers to a plain GET /health: b"" when it hangs up at once."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        try:
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            with trio.fail_after(10):
                return await stream.receive_some(4096)
        except trio.BrokenResourceError:
            return b""


async def test_connections_per_ip_are_rate_limited(start_server) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(limits={**UNLIMITED, "connections_per_ip_per_minute": 3.0})
    for _ in range(2):
        async with h.connect("u"):
            pass
    assert (await _probe(h.running.port)).startswith(b"HTTP/1.1 200")
    assert await _probe(h.running.port) == b""
    assert h.running.clients.statistics().refused_connections == 1
    await h.running.aclose()


async def test_blocked_address_is_refused(start_server) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(limits={**UNLIMITED, "ip_blocklist": ["127.0.0.0/8"]})
    assert await _probe(h.running.port) == b""
    assert h.running.clients.statistics().refused_connections == 1
    await h.running.aclose()


async def test_state_limits(start_server) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(limits={**UNLIMITED, "rooms_per_connection": 2, "connections_per_user": 2})
    async with h.connect("asker") as asker:
        qids = [
            (await asker.request("create_question", question_data(title=f"q{i}")))["question"]["question_id"]
            for i in range(2)
        ]
        with pytest.raises(RequestError) as too_many:
            await asker.request("create_question", question_data(title="third"))
        assert too_many.value.code == "limit_exceeded"
        await asker.request("leave_question", {"question_id": qids[0]})
        await asker.request("create_question", question_data(title="third"))
        async with h.connect("asker"), trio_websocket.open_websocket_url(h.url) as ws:
            await ws.send_message(msgpack.packb({"type": "hello", "id": 1, "data": {"token": token("asker")}}))
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 4008
    await h.running.aclose()


async def test_html_is_stripped_and_spam_refused(server) -> None:  # type: ignore[no-untyped-def]
    async with server.connect("asker") as asker, server.connect("local") as local:
        q = (
            await asker.request(
                "create_question",
                question_data(title="<b>Best</b> noodles? <script>alert(1)</script>", body="<i>near</i> &amp; cheap"),
            )
        )["question"]
        assert (q["title"], q["body"]) == ("Best noodles?", "near & cheap")
        with pytest.raises(RequestError) as empty:
            await asker.request("create_question", question_data(title="<img src=x onerror=alert(1)>"))
        assert empty.value.code == "invalid_field"
        for text in ("카지노 최고 수익 보장", "cheap pills at bit.ly/xyz", "!" * 30):
            with pytest.raises(RequestError) as spam:
                await local.request("create_answer", {"question_id": q["question_id"], "content": text})
            assert spam.value.code == "spam"
        answer = await local.request(
            "create_answer", {"question_id": q["question_id"], "content": "Try <u>Jamae</u> guksu"}
        )
        assert answer["answer"]["content"] == "Try Jamae guksu"
