"""Limits and content rules over real sockets, and the token bucket's exact arithmetic."""

from __future__ import annotations

import logging
import math
import sqlite3

import httpx
import msgpack
import pytest
import trio
import trio_websocket
from wsproto.events import BytesMessage, CloseConnection

from dongne.client import RequestError
from dongne.core.limits import BucketSpec, IpBlocklist, Limiter, TokenBucket
from dongne.core.settings import LimitSettings

from .addressed import Attempt, attempt
from .conftest import NO_TIMERS, UNLIMITED, question_data, token
from .rawws import RawWebSocket

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
    # IPv4-mapped IPv6 entries are their IPv4 networks: client addresses are compared as IPv4.
    mapped = IpBlocklist(["::ffff:10.1.0.0/112", "::ffff:192.0.2.7"])
    assert mapped.blocks("10.1.200.3") and mapped.blocks("192.0.2.7") and mapped.blocks("::ffff:192.0.2.7")
    assert not mapped.blocks("10.2.0.1") and not mapped.blocks("::ffff:10.2.0.1")
    assert [str(n) for n in mapped.networks] == ["10.1.0.0/16", "192.0.2.7/32"]


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
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{h.running.ops_port}/metrics")).text
    # Each refusal counted: the first, then those that got the connection closed.
    assert f'dongne_rate_limit_hits_total{{scope="request"}} {1 + len(codes):.1f}' in text
    assert f'dongne_errors_total{{code="rate_limited"}} {1 + len(codes):.1f}' in text
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
    for i in range(3):
        async with attempt(h.running.port, token(f"u{i}")) as ok:
            assert ok.ok
    async with attempt(h.running.port, token("u3")) as over:
        assert over.status == 429
        assert 1 <= int(over.headers["retry-after"]) <= 20  # 3 a minute: one back within 20 s
    # Plain HTTP probes are not WebSocket handshakes: load balancers keep probing.
    assert (await _probe(h.running.port)).startswith(b"HTTP/1.1 200")
    assert h.running.clients.statistics().refused_connections == 1
    await h.running.aclose()


async def test_blocked_address_is_refused(start_server) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(limits={**UNLIMITED, "ip_blocklist": ["127.0.0.0/8"]})
    assert await _probe(h.running.port) == b""
    assert h.running.clients.statistics().refused_connections == 1
    await h.running.aclose()


async def test_state_limits(start_server) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(limits={**UNLIMITED, "rooms_per_connection": 2, "connections_per_user": 2})
    async with h.connect("asker") as asker, h.connect("local") as local:
        asked = [await asker.request("create_question", question_data(title=f"q{i}")) for i in range(2)]
        assert [reply["joined"] for reply in asked] == [True, True]
        qids = [reply["question"]["question_id"] for reply in asked]
        theirs = (await local.request("create_question", question_data(title="theirs")))["question"]["question_id"]
        with pytest.raises(RequestError) as too_many:
            await asker.request("join_question", {"question_id": theirs})
        assert too_many.value.code == "limit_exceeded"
        # At its cap, a connection still asks: the question is made, its room not joined.
        third = await asker.request("create_question", question_data(title="third"))
        assert third["joined"] is False and third["question"]["title"] == "third"
        await local.request("join_question", {"question_id": third["question"]["question_id"]})
        await local.request("create_answer", {"question_id": third["question"]["question_id"], "content": "hi"})
        # Not in the room: the answer comes as the asker's notification, not as the room's new_answer.
        await asker.next_event("answer_notification")
        await asker.request("ping")  # its reply comes after any event the answer caused
        assert [frame["type"] for frame in asker.pending_events()] == []
        mine = await asker.request("my_questions", {})
        assert [q["title"] for q in mine["questions"]] == ["third", "q1", "q0"]
        await asker.request("leave_question", {"question_id": qids[0]})
        assert (await asker.request("create_question", question_data(title="fourth")))["joined"] is True
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


# ---- admission by address: many users behind one NAT, few failures ------------------------

#: The per-address settings at their defaults (the other limits stay off).
ADDRESS_DEFAULTS = {
    key: getattr(LimitSettings(), key)
    for key in ("connections_per_ip_per_minute", "failed_handshakes_per_ip_per_minute", "unauthenticated_per_ip")
}


async def _attempts(
    port: int, tokens: list[str | None], *, bind: str = "127.0.0.1", parallel: int = 25
) -> list[Attempt]:
    """One handshake and hello per token, ``parallel`` at a time; each closed once its hello is answered."""
    results: list[Attempt] = []
    limiter = trio.CapacityLimiter(parallel)

    async def one(tok: str | None) -> None:
        async with limiter, attempt(port, tok, bind=bind) as result:
            results.append(result)

    async with trio.open_nursery() as nursery:
        for tok in tokens:
            nursery.start_soon(one, tok)
    return results


async def test_five_hundred_users_behind_one_address_all_get_in(start_server) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(limits={**UNLIMITED, **ADDRESS_DEFAULTS})

    with trio.fail_after(60):  # "within a minute", by the wall clock
        results = await _attempts(h.running.port, [token(f"traveller{i}") for i in range(500)])

    assert [r.ok for r in results] == [True] * 500
    assert h.running.clients.statistics().refused_connections == 0
    await h.running.aclose()


async def test_bad_tokens_get_their_address_throttled(start_server) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(limits={**UNLIMITED, **ADDRESS_DEFAULTS})
    failures = ADDRESS_DEFAULTS["failed_handshakes_per_ip_per_minute"]

    with trio.fail_after(60):
        results = await _attempts(h.running.port, ["not-a-token"] * 500)

    refused = [r for r in results if r.status == 429]
    closed = [r for r in results if r.close_code == 4001]
    assert len(refused) + len(closed) == 500
    # The bucket's burst, its refill while the test ran (1 a second), and
    # what was in flight before the failures came back: far fewer than 500.
    assert failures <= len(closed) < failures + 60
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    # The address is throttled: a valid token from it now waits too ...
    async with attempt(h.running.port, token("honest")) as same:
        assert same.status == 429
    # ... and its neighbour is not.
    async with attempt(h.running.port, token("neighbour"), bind="127.0.0.2") as other:
        assert other.ok
    await h.running.aclose()


async def test_unauthenticated_handshakes_per_address_are_capped(start_server) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(limits={**UNLIMITED, "unauthenticated_per_ip": 3}, server={"hello_timeout_s": 60.0})
    async with (
        attempt(h.running.port, None) as a,
        attempt(h.running.port, None) as b,
        attempt(h.running.port, None) as c,
    ):
        assert (a.status, b.status, c.status) == (101, 101, 101)  # none said hello yet
        async with attempt(h.running.port, token("late")) as d:
            assert d.status == 429
        async with attempt(h.running.port, token("elsewhere"), bind="127.0.0.2") as e:
            assert e.ok
    await h.running.aclose()


async def test_a_foreign_origin_gets_403(start_server) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(server={"allowed_origins": ["https://dongne.example"]})
    port = h.running.port
    async with attempt(port, token("a"), headers=[(b"Origin", b"https://evil.example")]) as evil:
        assert evil.status == 403
    async with attempt(port, token("b"), headers=[(b"Origin", b"https://dongne.example")]) as ours:
        assert ours.ok
    async with attempt(port, token("c")) as app:  # a native app sends no Origin
        assert app.ok
    # The web app this server served connects from its own host (the Host it asks for).
    async with attempt(port, token("d"), headers=[(b"Origin", b"http://127.0.0.1")]) as page:
        assert page.ok
    async with attempt(port, token("e"), headers=[(b"Origin", b"http://127.0.0.1:1")]) as other_port:
        assert other_port.status == 403
    await h.running.aclose()


async def test_a_direct_client_forging_forwarded_for_is_not_believed(start_server) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(
        server={"trusted_proxies": ["127.0.0.1"]},
        limits={**UNLIMITED, "connections_per_ip_per_minute": 2.0},
    )
    clients = h.running.clients
    port = h.running.port
    for i in range(2):
        forged = [(b"X-Forwarded-For", f"198.51.100.{i}".encode())]
        async with attempt(port, token(f"f{i}"), bind="127.0.0.2", headers=forged) as ok:
            assert ok.ok
            assert {clients.address_of(c) for c in clients.conns} == {"127.0.0.2"}
    forged = [(b"X-Forwarded-For", b"198.51.100.9")]
    async with attempt(port, token("f9"), bind="127.0.0.2", headers=forged) as over:
        assert over.status == 429  # counted against 127.0.0.2 whatever it claims
    # From the trusted peer the header is believed.
    async with attempt(port, token("p"), headers=forged) as proxied:
        assert proxied.ok
        assert {clients.address_of(c) for c in clients.conns} == {"198.51.100.9"}
    await h.running.aclose()


async def test_proxy_protocol_names_the_client_from_a_trusted_balancer(start_server, caplog) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(server={"trusted_proxies": ["127.0.0.1"], "proxy_protocol": True})
    clients = h.running.clients
    port = h.running.port
    header = f"PROXY TCP4 203.0.113.9 127.0.0.1 51000 {port}\r\n".encode()
    agent = [(b"User-Agent", b"dongne-test/1.0")]
    with caplog.at_level(logging.INFO, logger="dongne.server"):
        async with attempt(port, token("a"), prefix=header, headers=agent) as balanced:
            assert balanced.ok
            assert {clients.address_of(c) for c in clients.conns} == {"203.0.113.9"}
    opened = [r for r in caplog.records if r.getMessage() == "connection_opened"]
    assert [(r.address, r.user_agent) for r in opened] == [("203.0.113.9", "dongne-test/1.0")]  # type: ignore[attr-defined]
    # From a peer that is not trusted the header is read but not believed.
    async with attempt(port, token("b"), prefix=header, bind="127.0.0.2") as untrusted:
        assert untrusted.ok
        assert {clients.address_of(c) for c in clients.conns} == {"127.0.0.2"}
    # Without a header the connection is closed unanswered.
    async with attempt(port, token("c")) as bare:
        assert bare.status == 0
    await h.running.aclose()


async def test_hellos_the_server_refuses_for_its_own_reasons_do_not_throttle_the_address(start_server) -> None:  # type: ignore[no-untyped-def]
    """A user's extra tabs over the per-user cap (4008) are not the address's failed handshakes: behind a
    carrier NAT, counting them would lock out everyone else there."""
    h = await start_server(limits={**UNLIMITED, "connections_per_user": 1, "failed_handshakes_per_ip_per_minute": 3})
    async with attempt(h.running.port, token("alice")) as first:
        assert first.ok
        for _ in range(5):  # more than the address's failures allow
            async with attempt(h.running.port, token("alice")) as extra:
                assert extra.close_code == 4008
        async with attempt(h.running.port, token("bob")) as neighbour:  # same address
            assert neighbour.ok
        assert h.running.clients.door.addresses.unauthenticated("127.0.0.1") == 0  # each extra settled
    async with attempt(h.running.port, "not-a-token") as bad:  # a bad token still counts
        assert bad.close_code == 4001
    await h.running.aclose()


async def test_a_clients_own_close_frame_counts_whatever_its_code(start_server) -> None:  # type: ignore[no-untyped-def]
    """A client closing before its hello with a code the server uses for its own refusals (1013) is charged
    as any handshake without a hello: the exemption is for the server's decisions only."""
    h = await start_server(limits={**UNLIMITED, "failed_handshakes_per_ip_per_minute": 3})
    for _ in range(3):
        peer = await RawWebSocket.connect(h.running.port)
        await peer.sock.send(peer.ws.send(CloseConnection(code=1013)))
        await peer.read_until_closed()
        assert peer.close_code == 1013  # answered with its own code
        peer.close()
    async with attempt(h.running.port, token("next")) as after:
        assert after.status == 429
    await h.running.aclose()


@pytest.mark.backends("sqlite")
async def test_a_refusal_decided_before_the_clients_close_frame_is_still_the_servers(start_server, db) -> None:  # type: ignore[no-untyped-def]
    """A second tab over the per-user cap sends its hello and a close frame together while a commit is in
    flight: the refusal (4008) is decided first and acted on after the close frame was read. It is the
    server's close, and not charged."""
    h = await start_server(limits={**UNLIMITED, "connections_per_user": 1, "failed_handshakes_per_ip_per_minute": 1})
    first = await h.raw_hello("alice")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the question's commit waits for it; the refusal is queued behind it
    await first.send({"type": "create_question", "id": 2, "data": question_data()})
    with trio.fail_after(10):
        while h.running.engine.counts()["open_questions"] < 1:  # noqa: ASYNC110 - the server's decision
            await trio.sleep(0.01)
    extra = await RawWebSocket.connect(h.running.port)
    hello = {"type": "hello", "id": 1, "data": {"token": token("alice")}}
    await extra.sock.send(
        extra.ws.send(BytesMessage(data=msgpack.packb(hello))) + extra.ws.send(CloseConnection(code=1000))
    )
    with trio.fail_after(10):  # the server has read the close frame (the refusal waits behind the commit)
        while not any(c.peer_close_code for c in h.running.clients.conns.values()):  # noqa: ASYNC110
            await trio.sleep(0.01)
    holder.execute("ROLLBACK")
    holder.close()
    with trio.fail_after(10):
        await extra.read_until_closed()
    assert extra.close_code == 4008
    extra.close()
    async with attempt(h.running.port, token("bob")) as after:  # the address was not charged
        assert after.ok
    first.close()
    await h.running.aclose()
