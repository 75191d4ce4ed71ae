"""The heartbeat over real sockets, on an autojump clock: whom a round pings, and when a silent peer is dropped.

No engine and no commits here (the heartbeat sees only connections), so no
worker thread lets the clock jump while a message is on its way: every time
below is exact.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable

import pytest
import trio
import trio.testing

from dongne.heartbeat import HEARTBEAT_SLICE_S, keep_alive
from dongne.transport import FrameEncoder, WebSocketConnection

from .wsframes import client_frame

INTERVAL = 5.0
_BINARY, _PING, _PONG = 0x2, 0x9, 0xA


class Peer:
    """The client end of one connection: sends binary messages when told to, notes the pings that come, and
    answers them ``answer_after`` s later (None: never)."""

    def __init__(self, sock: socket.socket, started: float, answer_after: float | None) -> None:
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.started = started
        self.answer_after = answer_after
        self.read_every = 0.0  # s between two reads of at most 4 KB (0: as fast as they come)
        self.pinged_at: list[float] = []
        self.messages = 0
        self.closed_at: float | None = None

    def now(self) -> float:
        return trio.current_time() - self.started

    async def read(self, nursery: trio.Nursery) -> None:
        buf = b""
        while data := await self.sock.recv(4096):
            buf += data
            while len(buf) >= 2 and len(buf) >= 2 + (buf[1] & 0x7F):  # the server's frames here are short
                op, payload, buf = buf[0] & 0x0F, buf[2 : 2 + (buf[1] & 0x7F)], buf[2 + (buf[1] & 0x7F) :]
                self.messages += op == _BINARY
                if op == _PING:
                    self.pinged_at.append(self.now())
                    if self.answer_after is not None:
                        nursery.start_soon(self._pong, payload)
            if self.read_every:
                await trio.sleep(self.read_every)
        self.closed_at = self.now()

    async def _pong(self, payload: bytes) -> None:
        assert self.answer_after is not None
        await trio.sleep(self.answer_after)
        await self.sock.send(client_frame(_PONG, payload))

    async def say_at(self, *times: float) -> None:
        """Send a message at each of ``times`` (s from the start)."""
        for at in times:
            await trio.sleep_until(self.started + at)
            await self.sock.send(client_frame(_BINARY, b"\x80"))  # an empty msgpack map


@pytest.fixture
async def heartbeat(
    nursery: trio.Nursery,
) -> AsyncIterator[Callable[[float | None], tuple[int, Peer]]]:
    """Connections under one heartbeat (``INTERVAL``), started when the test starts; ``add(answer_after)``
    opens one and returns its id in the heartbeat's map (in order: a round reaches them in that order) and
    its peer."""
    conns: dict[int, WebSocketConnection] = {}
    started = trio.current_time()

    async def serve(conn: WebSocketConnection) -> None:
        async for _ in conn.messages():
            pass
        conn.abort()

    def add(answer_after: float | None) -> tuple[int, Peer]:
        server_side, client_side = socket.socketpair()
        server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client_side.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server_side.setblocking(False)
        conn = WebSocketConnection(
            server_side, nursery, FrameEncoder(), max_message_bytes=1 << 16, max_buffer_bytes=1 << 20
        )
        conn_id = len(conns) + 1
        conns[conn_id] = conn
        add.opened[conn_id] = conn  # type: ignore[attr-defined]
        peer = Peer(client_side, started, answer_after)
        nursery.start_soon(serve, conn)
        nursery.start_soon(peer.read, nursery)
        return conn_id, peer

    add.conns = conns  # type: ignore[attr-defined]
    add.opened = {}  # type: ignore[attr-defined]  # every connection, also those the test took out of conns
    nursery.start_soon(keep_alive, conns, INTERVAL)
    yield add


async def test_a_round_pings_only_connections_quiet_for_half_an_interval(
    heartbeat: Callable[[float | None], tuple[int, Peer]], autojump_clock: trio.testing.MockClock
) -> None:
    # Rounds start at 5, 10, ... s; a round reaches connection i (from 0) i slices in.
    (_, chatty), (_, quiet), (_, hushed), (_, late) = (heartbeat(a) for a in (None, 0.0, None, None))
    async with trio.open_nursery() as talk:
        talk.start_soon(chatty.say_at, *(0.5 + 2 * k for k in range(21)))  # every 2 s (under half the interval)
        talk.start_soon(hushed.say_at, 0.5, 2.5, 4.5, 6.5, 8.5)  # then nothing at all
        talk.start_soon(late.say_at, 5 + 3 * HEARTBEAT_SLICE_S + 0.05)  # just after its turn in the first round
    await trio.sleep_until(chatty.started + 42.0)

    # The chatty peer never answers a ping, and was never sent one.
    assert chatty.pinged_at == []
    assert chatty.closed_at is None
    # The quiet peer is pinged at its turn in every round, and stays as it answers.
    assert quiet.pinged_at == pytest.approx([5 * k + HEARTBEAT_SLICE_S for k in range(1, 9)])
    assert quiet.closed_at is None
    # The hushed one: its message at 8.5 s spares it the round at 10 s; by the round at 15 s it has been quiet
    # for half an interval, is pinged, and is dropped at the next, a whole interval after that ping.
    assert hushed.pinged_at == pytest.approx([15 + 2 * HEARTBEAT_SLICE_S])
    assert hushed.closed_at == pytest.approx(20 + 2 * HEARTBEAT_SLICE_S)
    # The late one (pinged in the first round, which its message answered) spoke 4.95 s before its turn in the
    # round at 10 s: pinged then, dropped at 15 s, two rounds after its last message, not three.
    assert late.pinged_at == pytest.approx([5 + 3 * HEARTBEAT_SLICE_S, 10 + 3 * HEARTBEAT_SLICE_S])
    assert late.closed_at == pytest.approx(15 + 3 * HEARTBEAT_SLICE_S)


async def test_a_ping_has_a_whole_interval_when_others_leave_and_its_turn_comes_earlier(
    heartbeat: Callable[[float | None], tuple[int, Peer]], autojump_clock: trio.testing.MockClock
) -> None:
    # 100 connections: two a slice, so the last two have their turn 4.9 s into each round. Before the second
    # round the first 98 leave, and those two come first in it (at 10.0 and 10.1 s), right after their pings.
    others = [heartbeat(0.0) for _ in range(98)]
    _, slow = heartbeat(0.5)  # answers each ping half a second later
    _, mute = heartbeat(None)  # never answers
    await trio.sleep_until(slow.started + 5 + 4.9 + 0.01)
    assert slow.pinged_at == pytest.approx([9.9]) and mute.pinged_at == pytest.approx([9.9])
    conns: dict[int, WebSocketConnection] = heartbeat.conns  # type: ignore[attr-defined]
    for conn_id, _ in others:
        conns.pop(conn_id).abort()
    await trio.sleep_until(slow.started + 21.0)
    # The slow one's pong came at 10.4 s: not dropped at its turn at 10.0 s, pinged again at 15.0 and 20.0 s.
    assert slow.closed_at is None
    assert slow.pinged_at == pytest.approx([9.9, 15.0, 20.0])
    # The mute one is not dropped at its turn at 10.1 s, 0.2 s after its ping, but once its ping is an interval
    # old: at the heartbeat's first wake-up from 14.9 s, the round at 15.0 s.
    assert mute.pinged_at == pytest.approx([9.9])
    assert mute.closed_at == pytest.approx(15.0)


async def test_a_slow_reader_working_through_a_backlog_is_alive(
    heartbeat: Callable[[float | None], tuple[int, Peer]], autojump_clock: trio.testing.MockClock
) -> None:
    """The ping waits behind the frames queued before it; while the peer reads them, it is there."""
    conn_id, slow = heartbeat(0.0)  # answers a ping as soon as it reads it
    slow.read_every = 0.1  # 4 KB every 0.1 s: about 40 KB/s
    conn: WebSocketConnection = heartbeat.opened[conn_id]  # type: ignore[attr-defined]
    frame = FrameEncoder().binary(bytes(100))
    for _ in range(2000):  # about 18 s of reading here: three rounds and more
        conn.send_nowait(frame)
    await trio.sleep_until(slow.started + 40.0)
    assert slow.messages == 2000
    assert slow.closed_at is None
    # Pinged at each round, its pings read only once the backlog was (at about 18 s): it was not dropped.
    assert len(slow.pinged_at) >= 3
    assert min(slow.pinged_at) > 3 * INTERVAL


async def test_a_silent_peer_goes_in_about_two_and_a_half_intervals_while_others_come_and_go(
    heartbeat: Callable[[float | None], tuple[int, Peer]], autojump_clock: trio.testing.MockClock
) -> None:
    """Before each round one connection ahead of the silent peer leaves and one joins behind it: its turn comes
    a slice earlier every round. Its ping is still judged an interval after it was sent, not a round later."""
    ahead = [heartbeat(0.0) for _ in range(10)]
    _, mute = heartbeat(None)
    for _ in range(10):
        heartbeat(0.0)
    conns: dict[int, WebSocketConnection] = heartbeat.conns  # type: ignore[attr-defined]
    await mute.say_at(3.6)  # its last message, 2.4 s before its turn in the first round (6.0 s)
    for k in range(1, 6):
        await trio.sleep_until(mute.started + 5 * k + 4.95)  # just before each round
        conn_id, _ = ahead.pop(0)
        conns.pop(conn_id).abort()
        heartbeat(0.0)
    await trio.sleep_until(mute.started + 30.0)
    assert len(mute.pinged_at) == 1
    assert mute.closed_at is not None
    assert mute.closed_at - mute.pinged_at[0] == pytest.approx(INTERVAL, abs=HEARTBEAT_SLICE_S)
    assert mute.closed_at - 3.6 <= 2.5 * INTERVAL
