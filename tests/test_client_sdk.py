"""The reconnecting session (``dongne.client.open_session``) against a real server."""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing

from dongne.client import (
    AuthenticationFailed,
    Backoff,
    ConnectFailed,
    ConnectionLost,
    Session,
    SessionClosed,
    SessionState,
    open_session,
)
from dongne.transport import WebSocketConnection

from .conftest import JEJU_CITY, NO_TIMERS, Harness, question_data, token

CONNECTED, RECONNECTING, CLOSED = SessionState.CONNECTED, SessionState.RECONNECTING, SessionState.CLOSED


def fast(**overrides: Any) -> dict[str, Any]:
    """Session options for tests: millisecond backoff, a seeded jitter."""
    options: dict[str, Any] = {"backoff_base": 0.002, "jitter": random.Random(7).random, "timeout": 5.0}
    options.update(overrides)
    return options


class States:
    """An ``on_state`` callback that records each state and lets a test wait for a condition."""

    def __init__(self) -> None:
        self.seen: list[SessionState] = []
        self._send, self._recv = trio.open_memory_channel[SessionState](math.inf)

    def __call__(self, state: SessionState) -> None:
        self.seen.append(state)
        self._send.send_nowait(state)

    async def until(self, check: Callable[[], bool], timeout: float = 5) -> None:
        """Wait until ``check()`` holds, looking again after each state change."""
        with trio.fail_after(timeout):
            while not check():
                await self._recv.receive()


def server_side(h: Harness, user_id: str) -> WebSocketConnection:
    """The server's end of the user's newest connection."""
    clients = h.running.clients
    return clients.conns[max(conn_id for conn_id in clients.conns if clients.engine.user_of(conn_id) == user_id)]


@contextlib.asynccontextmanager
async def session_beside_a_question(h: Harness, user_id: str, states: States) -> AsyncIterator[tuple[Session, str]]:
    """A session of ``user_id`` (its states to ``states``) and the id of a question another user asked."""
    async with (
        h.connect("asker") as asker,
        open_session(h.url, token(user_id), on_state=states, **fast()) as session,
    ):
        yield session, (await asker.request("create_question", question_data()))["question"]["question_id"]


def rooms_on_the_server(h: Harness, user_id: str) -> list[set[str]]:
    """The rooms of each of the user's connections, as the server's engine holds them."""
    engine = h.running.clients.engine
    return [engine.conns[conn_id].rooms for conn_id in h.running.clients.conns if engine.user_of(conn_id) == user_id]


def drop_client_side(session: Session) -> None:
    """Kill the session's TCP connection from its own side, as a network failure would (RST, no close frame)."""
    assert session.client is not None
    sock = session.client.ws._stream.socket  # trio-websocket keeps its stream private
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# ---- backoff (pure) ----------------------------------------------------------------


def test_backoff_defaults_double_from_one_second_five_times_with_full_jitter() -> None:
    """1, 2, 4, 8, 16 s ceilings; each wait is the ceiling times a draw from the injected source."""
    backoff = Backoff()
    draws = random.Random(42)
    expected = [ceiling * draws.random() for ceiling in (1.0, 2.0, 4.0, 8.0, 16.0)]

    assert list(backoff.delays(jitter=None)) == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert list(backoff.delays(random.Random(42).random)) == expected
    assert list(backoff.delays(lambda: 0.5)) == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert list(backoff.delays(lambda: 0.0)) == [0.0] * 5
    assert [backoff.gives_up_after(n) for n in range(7)] == [False] * 5 + [True] * 2


def test_backoff_is_configurable_capped_and_may_be_unlimited() -> None:
    backoff = Backoff(base=0.5, factor=3.0, cap=10.0, max_attempts=None)

    assert [backoff.ceiling(n) for n in range(1, 6)] == [0.5, 1.5, 4.5, 10.0, 10.0]
    assert backoff.ceiling(10**6) == 10.0  # factor ** n overflows: still the cap
    assert list(itertools.islice(backoff.delays(None), 1000))[-1] == 10.0
    assert not backoff.gives_up_after(10**9)
    assert Backoff(max_attempts=0).gives_up_after(0)
    for bad in ({"factor": 0.5}, {"base": -1.0}, {"max_attempts": -1}):
        with pytest.raises(ValueError):
            Backoff(**bad)
    with pytest.raises(ValueError):
        backoff.ceiling(0)


# ---- sessions over real sockets --------------------------------------------------------


async def test_every_durable_event_arrives_once_in_order_across_20_cuts(server: Harness) -> None:
    """Server closes (1001), server aborts and client-side resets, while answers keep coming."""
    h = server
    states = States()
    cuts: list[Callable[[Session], None]] = [
        lambda s: server_side(h, "asker").close(1001, "restarting"),
        lambda s: server_side(h, "asker").abort(),
        drop_client_side,
    ]
    produced: list[tuple[str, str]] = []  # (answer_id, content), in creation order
    received: list[dict[str, Any]] = []
    cutting_done = trio.Event()
    with trio.fail_after(60):
        async with (
            open_session(h.url, lambda: token("asker"), on_state=states, **fast()) as session,
            h.connect("local") as local,
        ):
            qid = (await session.request("create_question", question_data()))["question"]["question_id"]

            async def produce() -> None:
                # Until the cutting is over (at least 100 answers; bounded).
                while (len(produced) < 100 or not cutting_done.is_set()) and len(produced) < 3000:
                    n = len(produced)
                    answer = (await local.request("create_answer", {"question_id": qid, "content": f"answer {n}"}))[
                        "answer"
                    ]
                    produced.append((answer["answer_id"], answer["content"]))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                for i in range(20):
                    # Take a few events on this connection, then cut it while more are in flight.
                    for _ in range(3):
                        received.append(await session.next_event("answer_notification"))
                    cuts[i % 3](session)
                    await states.until(lambda n=i + 1: session.reconnects == n and session.state is CONNECTED)
                cutting_done.set()
            while len(received) < len(produced):
                received.append(await session.next_event("answer_notification"))
            leftovers = [e for e in session.pending_events() if e["type"] == "answer_notification"]

            assert session.reconnects == 20
            assert states.seen == [CONNECTED] + [RECONNECTING, CONNECTED] * 20
    assert [e["seq"] for e in received] == list(range(1, len(produced) + 1))
    assert [(e["data"]["answer"]["answer_id"], e["data"]["answer"]["content"]) for e in received] == produced
    assert leftovers == []


async def test_one_connection_takes_the_servers_last_seq_where_its_own_cannot_stand(server: Harness) -> None:
    """``open_client`` without resume starts at the server's last_seq (a later resume from it replays only
    what was missed); resuming from beyond it (seqs of a restored backup), it follows the server and does
    not drop the next events as already seen."""
    async with server.connect("asker") as asker, server.connect("local", local=True) as local:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        for n in range(2):
            await local.request("create_answer", {"question_id": qid, "content": f"answer {n}"})
            await asker.next_event("answer_notification")
        async with server.connect("asker") as fresh:
            assert fresh.last_seq == 2
        async with server.connect("asker", resume_from=9) as ahead:
            assert ahead.last_seq == 2
            await local.request("create_answer", {"question_id": qid, "content": "answer 2"})
            assert (await ahead.next_event("answer_notification", timeout=5))["seq"] == 3


async def test_rooms_and_location_are_restored_after_a_reconnect(
    start_server: Callable[..., Any], mock_clock: trio.testing.MockClock
) -> None:
    """Rooms are re-joined before requests go through; a rate-limited location is re-sent when allowed.

    The clock stands still (``mock_clock``) until the test moves it: the
    reconnect happens within the server's location rate limit for sure.
    """
    h = await start_server(location={"min_update_interval_s": 2.0})
    states = States()
    location = {"location": dict(JEJU_CITY), "accuracy_m": 12.5}
    async with (
        h.connect("asker") as asker,
        h.connect("local") as local,
        open_session(h.url, token("reader"), on_state=states, **fast(jitter=lambda: 0.0)) as session,
    ):
        q1, q2, q3 = [
            (await asker.request("create_question", question_data(title=f"Question {i}")))["question"]["question_id"]
            for i in (1, 2, 3)
        ]
        for qid in (q1, q2, q3):
            await session.request("join_question", {"question_id": qid})
        await session.request("leave_question", {"question_id": q2})
        mine = (await session.request("create_question", question_data(title="Mine")))["question"]["question_id"]
        snapped = (await session.request("update_location", location))["location"]
        await session.next_event("nearby_questions")
        assert session.rooms == (q1, q3, mine)
        session.pending_events()

        server_side(h, "reader").close(1001, "restarting")
        await states.until(lambda: session.reconnects == 1)
        for qid in (q1, q2, q3, mine):
            await local.request("create_answer", {"question_id": qid, "content": f"live in {qid}"})
        # 3 rejoined, 3 new_answer, and a nearby_questions: the location went
        # with the last connection and the session re-sent it at once (a user
        # who reconnects is not held to the move rate limit).
        received = [await session.next_event() for _ in range(7)]
        events = [e for e in received if e["type"] != "nearby_questions"]
        assert [e["type"] for e in received].count("nearby_questions") == 1
        assert "rate_limited" not in h.running.clients.statistics().errors

        # The server knows the re-sent position: asking without a location answers as asking at it.
        here = await session.request("nearby_questions")
        assert here == await session.request("nearby_questions", {"location": snapped})
        assert sorted(q["question_id"] for q in here["questions"]) == sorted([q1, q2, q3])
        assert session.location == location
        assert session.rooms == (q1, q3, mine)
        assert states.seen == [CONNECTED, RECONNECTING, CONNECTED]
    await h.running.aclose()
    # A snapshot per room re-joined, then only the rooms of the new connection got the answers (q2 is not one).
    assert [e["type"] for e in events] == ["rejoined"] * 3 + ["new_answer"] * 3
    assert [e["data"]["question"]["question_id"] for e in events[:3]] == [q1, q3, mine]
    assert [e["data"]["question_id"] for e in events[3:]] == [q1, q3, mine]


async def test_a_question_asked_at_the_cap_of_rooms_is_not_taken_for_a_room(start_server: Callable[..., Any]) -> None:
    """Asked by a connection in as many rooms as it may be, a question is made but its room not joined."""
    h = await start_server(limits={"rooms_per_connection": 1})
    async with open_session(h.url, token("asker"), **fast()) as session:
        first = await session.request("create_question", question_data(title="first"))
        second = await session.request("create_question", question_data(title="second"))
        assert (first["joined"], second["joined"]) == (True, False)
        assert session.rooms == (first["question"]["question_id"],)
    await h.running.aclose()


async def test_rooms_refused_for_now_at_a_reconnect_are_joined_again_not_forgotten(
    start_server: Callable[..., Any], autojump_clock: trio.testing.MockClock
) -> None:
    """Twelve rooms and a connection allowance of 6 frames at once: the re-joins past it are refused with
    rate_limited, and joined after retry_after_ms, one at a time, without reaching 4008 (20 refusals here).

    On the autojump clock every other deadline is infinite (a commit on its
    thread would let the clock leap to it)."""
    h = await start_server(
        server=NO_TIMERS,
        limits={"conn_per_s": 20.0, "conn_burst": 6.0, "abuse_refusals_per_minute": 20,
                "questions_per_hour": 1000.0, "questions_burst": 100.0},
    )  # fmt: skip
    states = States()
    async with (
        h.connect("asker", timeout=math.inf) as asker,
        open_session(h.url, token("reader"), on_state=states, **fast(jitter=lambda: 0.0, timeout=math.inf)) as session,
    ):
        rooms = []
        for n in range(12):
            await trio.sleep(0.06)  # within each connection's allowance
            question = await asker.request("create_question", question_data(title=f"Question {n}"))
            rooms.append(question["question"]["question_id"])
            await session.request("join_question", {"question_id": rooms[-1]})
        await trio.sleep(1.0)  # the allowance full again
        session.pending_events()

        server_side(h, "reader").close(1001, "restarting")
        await states.until(lambda: session.reconnects == 1, timeout=math.inf)  # after the re-joins
        await trio.sleep(1.0)  # the allowance full again: the connection still serves
        assert (await session.request("get_profile"))["user"]["user_id"] == "reader"
        events = session.pending_events()
        rejoined = [e["data"]["question"]["question_id"] for e in events if e["type"] == "rejoined"]
        assert sorted(rejoined) == sorted(rooms) and sorted(session.rooms) == sorted(rooms)
        assert states.seen == [CONNECTED, RECONNECTING, CONNECTED]
        assert h.running.clients.statistics().errors.get("rate_limited", 0) >= 1  # the allowance did refuse


async def test_a_reconnect_refused_with_429_waits_its_retry_after(
    start_server: Callable[..., Any], autojump_clock: trio.testing.MockClock
) -> None:
    """Two handshakes a minute from this address: the third reconnect gets HTTP 429 with Retry-After
    (about 30 s). The session waits that long, not its millisecond backoff (five quick attempts, each
    refused, would end it), and is back on the next attempt."""
    h = await start_server(server=NO_TIMERS, limits={"connections_per_ip_per_minute": 2.0})
    states = States()
    async with open_session(
        h.url, token("reader"), on_state=states, **fast(jitter=lambda: 0.0, timeout=math.inf)
    ) as session:
        for reconnects in (1, 2):
            server_side(h, "reader").close(1001, "restarting")
            await states.until(
                lambda n=reconnects: session.reconnects == n or session.closed is not None,
                timeout=math.inf,
            )
            assert session.closed is None
        assert session.failed_attempts == 1  # the 429, once
        assert (await session.request("get_profile"))["user"]["user_id"] == "reader"
    assert h.running.clients.statistics().refused_connections == 1


class RefusingFront:
    """A TCP front on 127.0.0.1 before the server's client port, as a proxy stands: it forwards each
    connection, or, once ``refusing``, answers the upgrade itself with HTTP 403 (its blocklist)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refusing = False

    async def start(self, nursery: trio.Nursery) -> str:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, self._handle, listeners)
        return f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}"

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self.refusing:
                await stream.receive_some(65536)  # the upgrade request
                await stream.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            async with upstream, trio.open_nursery() as nursery:
                for source, sink in ((stream, upstream), (upstream, stream)):
                    nursery.start_soon(self._pipe, source, sink, nursery.cancel_scope)

    @staticmethod
    async def _pipe(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        done.cancel()


async def test_a_reconnect_refused_with_403_ends_the_session_without_retrying(
    start_server: Callable[..., Any], autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """PROTOCOL.md: 403 (a blocked address, an origin not admitted) is not to be retried."""
    h = await start_server(server=NO_TIMERS)
    front = RefusingFront(h.running.port)
    url = await front.start(nursery)
    states = States()
    async with open_session(
        url, token("reader"), on_state=states, **fast(jitter=lambda: 0.0, timeout=math.inf)
    ) as session:
        assert (await session.request("get_profile"))["user"]["user_id"] == "reader"
        front.refusing = True
        server_side(h, "reader").close(1001, "restarting")
        await states.until(lambda: session.closed is not None, timeout=math.inf)
    assert session.failed_attempts == 1
    assert isinstance(session.closed, SessionClosed) and "403" in str(session.closed)


async def test_a_request_in_flight_fails_with_connection_lost_and_is_not_resent(server: Harness) -> None:
    """The next request waits for the reconnection instead of failing."""
    h = server
    states = States()
    with trio.fail_after(20):
        async with session_beside_a_question(h, "local", states) as (session, qid):
            await session.request("join_question", {"question_id": qid})

            server_side(h, "local").abort()
            with pytest.raises(ConnectionLost):
                await session.request("create_answer", {"question_id": qid, "content": "sent once, lost"})
            state = await session.request("join_question", {"question_id": qid})

            assert session.reconnects == 1
            assert states.seen == [CONNECTED, RECONNECTING, CONNECTED]
    assert state["answers"] == []


async def test_an_expired_token_on_reconnect_ends_the_session_without_retrying(server: Harness) -> None:
    h = server
    states = States()
    calls = 0

    def fresh_token() -> str:
        nonlocal calls
        calls += 1
        return token("asker") if calls == 1 else token("asker", now_s=time.time() - 31 * 86400)

    with trio.fail_after(20):
        async with open_session(h.url, fresh_token, on_state=states, **fast()) as session:
            server_side(h, "asker").close(1001, "restarting")
            await states.until(lambda: session.state is CLOSED)
            with pytest.raises(AuthenticationFailed) as refused:
                await session.request("get_profile")
            with pytest.raises(AuthenticationFailed):
                await session.next_event()

            assert isinstance(session.closed, AuthenticationFailed)
            assert calls == 2
            assert session.reconnects == 0
            assert states.seen == [CONNECTED, RECONNECTING, CLOSED]
    assert refused.value.code == 4001
    assert "expired" in (refused.value.reason or "")
    assert "get a new token" in str(refused.value)


async def test_a_refused_first_hello_raises_from_open_session(server: Harness) -> None:
    with trio.fail_after(10):
        with pytest.raises(AuthenticationFailed) as refused:
            async with open_session(server.url, token("asker", now_s=0), **fast()):
                pytest.fail("should not connect")  # pragma: no cover
    assert refused.value.code == 4001


async def test_a_failing_token_source_is_retried_without_limit(server: Harness) -> None:
    """A token callable that fails (say, the app's backend is down) costs attempts; None means no limit."""
    h = server
    states = States()
    calls = 0

    async def flaky_token() -> str:
        nonlocal calls
        calls += 1
        if 2 <= calls <= 9:
            raise OSError("token service unavailable")
        return token("asker")

    with trio.fail_after(20):
        async with open_session(h.url, flaky_token, max_attempts=None, on_state=states, **fast()) as session:
            server_side(h, "asker").abort()
            await states.until(lambda: session.reconnects == 1)
            assert (await session.request("get_profile"))["user"]["user_id"] == "asker"

            assert session.statistics().failed_attempts == 8
            assert session.reconnects == 1
            assert states.seen == [CONNECTED, RECONNECTING, CONNECTED]


async def test_giving_up_after_max_attempts(start_server: Callable[..., Any]) -> None:
    h = await start_server()
    states = States()
    with trio.fail_after(20):
        async with open_session(h.url, token("asker"), max_attempts=3, on_state=states, **fast()) as session:
            await h.running.aclose()  # closes the session's connection with 1001, then refuses connections
            await states.until(lambda: session.state is CLOSED)
            with pytest.raises(ConnectFailed) as gave_up:
                await session.request("get_profile")
    assert gave_up.value.attempts == 3
    assert gave_up.value.last_error is not None
    assert session.statistics().failed_attempts == 3
    assert states.seen == [CONNECTED, RECONNECTING, CLOSED]


async def test_closing_the_session_stops_it_for_good(server: Harness) -> None:
    """Events queued before the close are still handed out; then everything raises SessionClosed."""
    states = States()
    with trio.fail_after(10):
        async with (
            server.connect("local") as local,
            open_session(server.url, token("asker"), on_state=states, **fast()) as session,
        ):
            qid = (await session.request("create_question", question_data()))["question"]["question_id"]
            await local.request("create_answer", {"question_id": qid, "content": "before the close"})
            await session.request("get_profile")  # its reply comes after the notification
            await session.aclose()
            queued = await session.next_event("answer_notification")
            with pytest.raises(SessionClosed) as closed:
                await session.request("get_profile")
            with pytest.raises(SessionClosed):
                await session.next_event()
            with pytest.raises(SessionClosed):
                await session.wait_connected()
            await session.aclose()  # idempotent
    assert queued["data"]["answer"]["content"] == "before the close"
    assert type(closed.value) is SessionClosed
    assert session.reconnects == 0
    assert states.seen == [CONNECTED, CLOSED]


async def test_a_fresh_session_starts_from_now_and_resume_from_replays(server: Harness) -> None:
    """Without resume_from no old event is replayed, even after a reconnect; with it, exactly the missed ones."""
    h = server
    async with h.connect("asker") as asker, h.connect("local") as local:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        for n in range(3):
            await local.request("create_answer", {"question_id": qid, "content": f"old {n}"})
    states = States()
    with trio.fail_after(20):
        async with (
            h.connect("local") as local,
            open_session(h.url, token("asker"), on_state=states, **fast()) as session,
        ):
            assert session.last_seq == 3
            drop_client_side(session)
            await states.until(lambda: session.reconnects == 1)
            await local.request("create_answer", {"question_id": qid, "content": "new"})
            fresh = await session.next_event("answer_notification")
            assert [e for e in session.pending_events() if e["type"] == "answer_notification"] == []
        async with open_session(h.url, token("asker"), resume_from=1, **fast()) as session:
            replayed = [await session.next_event("answer_notification") for _ in range(3)]
    assert (fresh["seq"], fresh["data"]["answer"]["content"]) == (4, "new")
    assert [(e["seq"], e["data"]["answer"]["content"]) for e in replayed] == [(2, "old 1"), (3, "old 2"), (4, "new")]


# ---- rooms that end, resumes that cannot be whole ------------------------------------------


async def test_a_deleted_or_expired_question_is_not_rejoined(start_server: Callable[..., Any]) -> None:
    """question_deleted and question_closed {reason: expired} drop the room; the reconnect skips it."""
    h = await start_server(questions={"ttl_s": 1.0})
    states = States()
    async with (
        h.connect("asker") as asker,
        open_session(h.url, token("reader"), on_state=states, **fast()) as session,
    ):
        deleted, expiring = [
            (await asker.request("create_question", question_data(title=t)))["question"]["question_id"]
            for t in ("to delete", "to expire")
        ]
        mine = (await session.request("create_question", question_data(title="mine, deleted")))["question"]
        for qid in (deleted, expiring):
            await session.request("join_question", {"question_id": qid})
        assert session.rooms == (mine["question_id"], deleted, expiring)

        await session.request("delete_question", {"question_id": mine["question_id"]})  # no event for its own
        await asker.request("delete_question", {"question_id": deleted})
        gone = await session.next_event("question_deleted")
        assert session.rooms == (expiring,)
        closed = await session.next_event("question_closed")  # about a second later
        assert session.rooms == ()

        server_side(h, "reader").close(1001, "restarting")
        await states.until(lambda: session.reconnects == 1)
        assert await session.request("get_profile")
        leftover = session.pending_events()
    h.running.stop()

    assert gone["data"] == {"question_id": deleted}
    assert closed["data"] == {"question_id": expiring, "reason": "expired"}
    assert [e["type"] for e in leftover if e["type"] == "rejoined"] == []


async def test_a_resume_past_pruned_events_takes_the_gap_and_says_so(start_server: Callable[..., Any]) -> None:
    """hello says resumed: false, oldest_seq; the session continues from there instead of resuming forever."""
    h = await start_server(inbox={"retention_days": 1e-9})
    async with h.connect("asker") as asker, h.connect("local", local=True) as local:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        for i in range(3):
            await local.request("create_answer", {"question_id": qid, "content": f"answer {i}"})
        await asker.next_event("answer_notification")
    await trio.sleep(0.01)
    assert await h.running.clients.prune_inbox() >= 1  # the asker keeps only seq 3, its newest
    states = States()
    async with open_session(h.url, token("asker"), resume_from=1, on_state=states, **fast()) as session:
        replayed = await session.next_event("answer_notification")
        stats = session.statistics()
        await session.request("get_profile")
        assert session.pending_events() == []
    async with open_session(h.url, token("asker"), resume_from=3, **fast()) as whole:
        whole_stats = whole.statistics()
    async with open_session(h.url, token("asker"), **fast()) as fresh:
        fresh_stats = fresh.statistics()
    h.running.stop()

    assert replayed["seq"] == 3
    assert (stats.resumed, stats.oldest_seq, stats.incomplete_resumes) == (False, 3, 1)
    assert (session.resumed, session.oldest_seq) == (False, 3)
    assert stats.last_seq == 3 and stats.reconnects == 0 and states.seen == [CONNECTED, CLOSED]
    assert (whole_stats.resumed, whole_stats.oldest_seq, whole_stats.incomplete_resumes) == (True, None, 0)
    assert (fresh_stats.resumed, fresh_stats.oldest_seq) == (None, None)


async def test_a_ban_ends_the_session_instead_of_reconnecting(server: Harness) -> None:
    """4003 is final: a banned user's session stops at once, it does not spin through its attempts."""
    states = States()
    with trio.fail_after(10):
        async with (
            server.connect("boss", admin=True) as admin,
            open_session(server.url, token("mallory"), max_attempts=None, on_state=states, **fast()) as session,
        ):
            await session.request("get_profile")
            await admin.request("ban_user", {"user_id": "mallory", "reason": "spam"})
            await states.until(lambda: session.state is CLOSED)
            with pytest.raises(SessionClosed) as closed:
                await session.request("get_profile")
    assert closed.value.code == 4003
    assert session.reconnects == 0 and session.statistics().failed_attempts == 0
    assert states.seen == [CONNECTED, CLOSED]


async def test_a_leave_whose_reply_is_lost_is_not_rejoined(server: Harness) -> None:
    """Leaving is the app's intent: a leave_question lost with its connection is not undone by the re-join."""
    h = server
    states = States()
    with trio.fail_after(20):
        async with session_beside_a_question(h, "viewer", states) as (session, qid):
            await session.request("join_question", {"question_id": qid})
            server_side(h, "viewer").abort()
            with pytest.raises(ConnectionLost):
                await session.request("leave_question", {"question_id": qid})
            await states.until(lambda: session.reconnects == 1 and session.state is CONNECTED)
            assert session.rooms == ()
            rooms = rooms_on_the_server(h, "viewer")
            assert rooms and all(qid not in joined for joined in rooms)


async def test_the_per_user_cap_at_hello_is_retried_until_a_connection_frees(
    start_server: Callable[..., Any],
) -> None:
    """4008 before the hello completed is the per-user connection cap, which frees by itself: back off, retry."""
    h = await start_server(limits={"connections_per_user": 2})
    states = States()
    with trio.fail_after(20):
        async with (
            h.connect("mina") as laptop,
            open_session(h.url, token("mina"), on_state=states, **fast(backoff_base=0.5, jitter=lambda: 1.0)) as phone,
        ):
            server_side(h, "mina").abort()  # the phone's connection drops; it waits 0.5 s to reconnect
            async with h.connect("mina"):  # meanwhile another tab takes the slot
                # Refused, and refused again after its backoff (no event to wait on: attempts are counted only).
                while phone.statistics().failed_attempts < 2:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                assert phone.state is RECONNECTING
            await states.until(lambda: phone.state is CONNECTED)
            assert (await phone.request("get_profile"))["user"]["user_id"] == "mina"
            assert phone.reconnects == 1
            await laptop.request("ping")


async def test_a_join_then_a_leave_at_once_leave_the_room_left(server: Harness) -> None:
    """A join and a leave sent back to back, the join answered after the leave was asked: the room stays left
    (not re-joined at the next reconnect)."""
    h = server
    states = States()
    with trio.fail_after(20):
        async with session_beside_a_question(h, "viewer", states) as (session, qid):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.request, "join_question", {"question_id": qid})
                await trio.lowlevel.checkpoint()  # the join is on its way, its reply not in yet
                nursery.start_soon(session.request, "leave_question", {"question_id": qid})
            assert session.rooms == ()
            server_side(h, "viewer").abort()
            await states.until(lambda: session.reconnects == 1 and session.state is CONNECTED)
            assert session.rooms == ()
            rooms = rooms_on_the_server(h, "viewer")
            assert rooms and all(qid not in joined for joined in rooms)
