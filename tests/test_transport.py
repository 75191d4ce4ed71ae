"""The transport's outbound bound: live frames to a slow reader overflow it, a replay is paced instead."""

from __future__ import annotations

import socket

import trio

from dongne.transport import FrameEncoder, WebSocketConnection

from .wsframes import client_frame, read_all

FRAME_PAYLOAD = bytes(2000)
FRAMES = 300  # ~600 KB: far more than the socket buffers and the bound below hold
BOUND = 16384


def _slow_pair(nursery: trio.Nursery) -> tuple[WebSocketConnection, socket.socket]:
    server_side, client_side = socket.socketpair()
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client_side.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server_side.setblocking(False)
    client_side.setblocking(False)
    conn = WebSocketConnection(server_side, nursery, FrameEncoder(), max_message_bytes=1 << 20, max_buffer_bytes=BOUND)
    return conn, client_side


async def _read_slowly(sock: socket.socket, want: int, got: list[int]) -> None:
    """Read ``want`` bytes in 4 KB steps with a pause between steps."""
    trio_sock = trio.socket.from_stdlib_socket(sock)
    while got[0] < want:
        data = await trio_sock.recv(4096)
        if not data:
            return
        got[0] += len(data)
        await trio.sleep(0.0005)


async def test_a_paced_burst_waits_for_the_reader_and_arrives_whole(nursery: trio.Nursery) -> None:
    conn, client_side = _slow_pair(nursery)
    frame = FrameEncoder().binary(FRAME_PAYLOAD)
    got = [0]
    most = 0
    with trio.fail_after(10):
        async with trio.open_nursery() as reader:  # exits once the reader has read everything
            reader.start_soon(_read_slowly, client_side, FRAMES * len(frame), got)
            for _ in range(FRAMES):
                await conn.send_paced(frame)
                most = max(most, conn.buffered_bytes)
    assert not conn.overflowed and not conn.closing
    assert got[0] == FRAMES * len(frame)
    assert most <= BOUND // 2 + len(frame)  # the backlog stayed near half the bound
    conn.abort()
    client_side.close()


async def test_the_same_burst_sent_live_overflows_the_bound(nursery: trio.Nursery) -> None:
    conn, client_side = _slow_pair(nursery)
    frame = FrameEncoder().binary(FRAME_PAYLOAD)
    for _ in range(FRAMES):
        conn.send_nowait(frame)  # a slow consumer: no waiting for it
        if conn.overflowed:
            break
    assert conn.overflowed and conn.close_code == 4009
    conn.abort()
    client_side.close()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on 127.0.0.1: (server side, non-blocking with a small send buffer; peer)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server_side.setblocking(False)
    peer.setblocking(False)
    return server_side, peer


def _fill_kernel_buffer(sock: socket.socket) -> int:
    """Send until the kernel refuses more; returns how many bytes it took.

    Leaves the state a connection is in when its writer has just emptied the
    backlog into a kernel buffer that is full again.
    """
    filled = 0
    while True:
        try:
            filled += sock.send(bytes(1024))
        except BlockingIOError:
            return filled


async def test_a_close_frame_the_kernel_refuses_counts_as_pending_until_sent(nursery: trio.Nursery) -> None:
    """close() on a full socket: buffered_bytes is what is pending, never negative, 0 once the peer has it all."""
    server_side, peer_side = _tcp_pair()
    conn = WebSocketConnection(server_side, nursery, FrameEncoder(), max_message_bytes=1 << 20, max_buffer_bytes=BOUND)
    filled = _fill_kernel_buffer(server_side)  # a peer that does not read
    close_frame = FrameEncoder().close(1000, "bye")
    conn.close(1000, "bye")
    assert conn.buffered_bytes == len(close_frame)

    peer = trio.socket.from_stdlib_socket(peer_side)
    received = bytearray()
    lowest = conn.buffered_bytes
    with trio.fail_after(10):
        while len(received) < filled + len(close_frame):
            data = await peer.recv(65536)
            assert data, "EOF before the close frame arrived"
            received += data
            lowest = min(lowest, conn.buffered_bytes)
    pending = conn.buffered_bytes
    conn.abort()
    peer.close()

    assert (len(received), bytes(received[filled:])) == (filled + len(close_frame), close_frame)
    assert (lowest, pending) == (0, 0)


async def test_closing_drops_held_frames_from_the_count(nursery: trio.Nursery) -> None:
    """Frames held for a replay that close() cuts short are not pending any more."""
    server_side, peer_side = _tcp_pair()
    conn = WebSocketConnection(server_side, nursery, FrameEncoder(), max_message_bytes=1 << 20, max_buffer_bytes=BOUND)
    conn.hold()
    for _ in range(3):
        conn.send_nowait(FrameEncoder().binary(b"live"))
    conn.close(1000, "bye")  # the kernel has room: the close frame goes straight out

    assert conn.buffered_bytes == 0
    conn.abort()
    peer_side.close()


async def test_recv_some_returns_what_arrived_as_its_own_bytes() -> None:
    """recv_some reads into a buffer it reuses: each result is a copy, of exactly what came."""
    from dongne.transport import recv_some

    ours, peer = socket.socketpair()
    ours.setblocking(False)
    try:
        peer.send(b"first")
        first = await recv_some(ours)
        peer.send(b"second!")
        second = await recv_some(ours, 4)
        peer.close()
        assert (first, second) == (b"first", b"seco")
        assert await recv_some(ours) == b"nd!"
        assert await recv_some(ours) == b""  # EOF
    finally:
        ours.close()


async def test_a_closed_connection_is_freed_without_the_cyclic_collector(nursery: trio.Nursery) -> None:
    """Once aborted, a connection's protocol state goes by reference counting: the server collects rarely."""
    import gc
    import weakref

    def open_read_abort() -> tuple[list[str], weakref.ref[object]]:
        server_side, client_side = socket.socketpair()
        server_side.setblocking(False)
        conn = WebSocketConnection(
            server_side, nursery, FrameEncoder(), max_message_bytes=1 << 20, max_buffer_bytes=BOUND
        )
        conn._ws.receive_data(b"\x82\x80abcd")  # an empty masked binary frame: the parser has run
        kinds = [type(e).__name__ for e in conn._ws.events()]
        conn.abort()
        client_side.close()
        return kinds, weakref.ref(conn._ws._proto)

    enabled = gc.isenabled()
    gc.disable()
    try:
        kinds, protocol = open_read_abort()
        assert kinds == ["BytesMessage"]
        assert protocol() is None
    finally:
        if enabled:
            gc.enable()


def test_binary_frames_are_the_bytes_wsproto_makes_at_every_length_boundary() -> None:
    """The encoder's own header (7-bit, 16-bit and 64-bit lengths) matches wsproto's, byte for byte."""
    from wsproto.frame_protocol import FrameProtocol

    reference = FrameProtocol(client=False, extensions=[])
    encoder = FrameEncoder()
    for n in (0, 1, 125, 126, 127, 65535, 65536, 70000):
        payload = bytes(i % 251 for i in range(n))

        assert bytes(reference.send_data(payload, fin=True)) == encoder.binary(payload)


async def test_inbound_frames_read_directly_and_through_wsproto_give_the_same_messages() -> None:
    """Binary messages at every length encoding, pings, pongs; then a text frame hands the rest to wsproto."""
    from dongne.transport import BinaryFrame, TextFrame

    payloads = [b"", b"x", bytes(range(125)), bytes(126), bytes(i % 7 for i in range(65535)), bytes(65536)]
    direct = b"".join(client_frame(0x2, p) for p in payloads)
    control = client_frame(0x9, b"hb") + client_frame(0xA, b"hb")
    later = client_frame(0x1, b"text") + client_frame(0x2, b"after", fin=False) + client_frame(0x0, b"!")
    later += client_frame(0x9, b"p2") + client_frame(0x2, b"last") + client_frame(0x8, (1000).to_bytes(2, "big"))
    expected = [BinaryFrame(p) for p in payloads] + [TextFrame(4), BinaryFrame(b"after!"), BinaryFrame(b"last")]
    for chunk in (1, 7, 1 << 20):  # frames split anywhere, and all at once
        got, back, code = await read_all(direct + control + later, chunk)

        assert expected == got
        assert FrameEncoder().pong(b"hb") + FrameEncoder().pong(b"p2") == back[: 2 * len(FrameEncoder().pong(b"hb"))]
        assert code == 1000


async def test_inbound_frames_wsproto_must_judge_still_close_the_connection() -> None:
    """Oversize (1009), unmasked or non-minimal lengths (1002): as wsproto decided before."""
    oversize = client_frame(0x2, b"ok") + client_frame(0x2, bytes(70_001))
    unmasked = client_frame(0x2, b"ok") + b"\x82\x02hi"
    non_minimal = client_frame(0x2, b"ok") + b"\x82\xfe\x00\x05" + b"\x00" * 4 + b"hello"
    for stream, code in ((oversize, 1009), (unmasked, 1002), (non_minimal, 1002)):
        got, _, closed = await read_all(stream, 1 << 20)

        assert len(got) == 1 and closed == code


async def test_a_protocol_error_is_closed_at_once_and_a_peers_close_left_to_the_owner(nursery: trio.Nursery) -> None:
    """wsproto reports a protocol error as a close event: that one the connection closes itself, with its code,
    at once; the peer's own close frame it leaves for its owner to answer (after what the owner still owes)."""
    for stream, (close_code, peer_close_code) in (
        (client_frame(2, b"hi", mask=None), (1002, None)),  # unmasked: a protocol error
        (client_frame(8, (4000).to_bytes(2, "big")), (None, 4000)),  # the peer closes
    ):
        server_side, client_side = socket.socketpair()
        server_side.setblocking(False)
        conn = WebSocketConnection(
            server_side, nursery, FrameEncoder(), max_message_bytes=1 << 16, max_buffer_bytes=1 << 20
        )
        client_side.sendall(stream)
        with trio.fail_after(5):
            async for _ in conn.messages():
                pass
        assert (conn.close_code, conn.peer_close_code) == (close_code, peer_close_code)
        conn.abort()
        client_side.close()
