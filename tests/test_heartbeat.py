"""The heartbeat over real sockets, on an autojump clock: whom a round pings, and when a silent peer is dropped.

No engine and no commits here (the heartbeat sees only connections), so no
worker thread lets the clock jump while a message is on its way: every time
below is exact.
"""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from dongne.heartbeat import HEARTBEAT_SLICE_S, keep_alive
from dongne.transport import FrameEncoder, WebSocketConnection

from .wsframes import client_frame

INTERVAL = 5.0
_BINARY, _PING, _PONG = 0x2, 0x9, 0xA


class Peer:
    """The client end of one connection: sends binary messages when told to, notes the pings that come."""

    def __init__(self, sock: socket.socket, *, answer_pings: bool) -> None:
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.answer_pings = answer_pings
        self.pinged_at: list[float] = []
        self.closed_at: float | None = None

    async def read(self, started: float) -> None:
        buf = b""
        while data := await self.sock.recv(4096):
            buf += data
            while len(buf) >= 2 and len(buf) >= 2 + (buf[1] & 0x7F):  # the server's frames here are short
                op, payload, buf = buf[0] & 0x0F, buf[2 : 2 + (buf[1] & 0x7F)], buf[2 + (buf[1] & 0x7F) :]
                if op == _PING:
                    self.pinged_at.append(trio.current_time() - started)
                    if self.answer_pings:
                        await self.sock.send(client_frame(_PONG, payload))
        self.closed_at = trio.current_time() - started

    async def talk(self, every: float, until: float, started: float) -> None:
        """Send a message at 0.5 s, then every ``every`` s while before ``until`` (times from ``started``)."""
        at = 0.5
        while at < until:
            await trio.sleep_until(started + at)
            await self.sock.send(client_frame(_BINARY, b"\x80"))  # an empty msgpack map
            at += every


async def test_a_round_pings_only_connections_quiet_since_the_last(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        conns: dict[int, WebSocketConnection] = {}
        peers: list[Peer] = []
        for conn_id, answer in enumerate((False, True, False), start=1):
            server_side, client_side = socket.socketpair()
            server_side.setblocking(False)
            conns[conn_id] = WebSocketConnection(
                server_side, nursery, FrameEncoder(), max_message_bytes=1 << 16, max_buffer_bytes=1 << 20
            )
            peers.append(Peer(client_side, answer_pings=answer))
        chatty, quiet, hushed = peers

        async def serve(conn: WebSocketConnection) -> None:
            async for _ in conn.messages():
                pass
            conn.abort()

        started = trio.current_time()
        for conn in conns.values():
            nursery.start_soon(serve, conn)
        for peer in peers:
            nursery.start_soon(peer.read, started)
        nursery.start_soon(keep_alive, conns, INTERVAL)
        # Rounds start at 5, 10, ... s; a round reaches connection i (from 0) i slices in.
        nursery.start_soon(chatty.talk, 2.0, 42.0, started)  # a message every 2 s, under the interval
        nursery.start_soon(hushed.talk, 2.0, 10.0, started)  # the same until 8.5 s, then nothing at all
        await trio.sleep_until(started + 42.0)

        # The chatty peer never answers a ping, and was never sent one.
        assert chatty.pinged_at == []
        assert chatty.closed_at is None
        # The quiet peer is pinged in every round, and stays as it answers.
        assert quiet.pinged_at == pytest.approx([5 * k + HEARTBEAT_SLICE_S for k in range(1, 9)])
        assert quiet.closed_at is None
        # The hushed one: its messages at 6.5 and 8.5 s spare it the round at 10 s; it has been quiet by the
        # round at 15 s, which pings it, and is dropped at the next, a whole interval later.
        assert hushed.pinged_at == pytest.approx([15 + 2 * HEARTBEAT_SLICE_S])
        assert hushed.closed_at == pytest.approx(20 + 2 * HEARTBEAT_SLICE_S)
        assert set(conns) == {1, 2, 3}  # (the heartbeat drops by aborting; the owner forgets the connection)
        nursery.cancel_scope.cancel()
