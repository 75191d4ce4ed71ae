"""A WebSocket client's frames, and what the server side makes of a byte stream of them."""

from __future__ import annotations

import contextlib
import socket

import trio

from dongne.transport import FrameEncoder, WebSocketConnection

__all__ = ["MASK", "client_frame", "read_all"]

MASK = b"\x01\x02\x03\x04"


def client_frame(
    op: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, form: int = 0, mask: bytes | None = MASK
) -> bytes:
    """A client frame; ``form`` forces the length encoding (7, 16 or 64 bits), ``mask=None`` sends it unmasked."""
    n = len(payload)
    head = bytes(((0x80 if fin else 0) | rsv | op,))
    bit = 0x80 if mask is not None else 0
    form = form or (7 if n < 126 else 16 if n < 65536 else 64)
    if form == 7:
        head += bytes((bit | n,))
    elif form == 16:
        head += bytes((bit | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((bit | 127,)) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_all(
    stream: bytes, chunk: int, max_message_bytes: int = 70_000
) -> tuple[list[object], bytes, int | None]:
    """Write ``stream`` in ``chunk``-byte pieces to a server-side connection; what it yielded, sent back, closed with."""
    server_sock, client_sock = socket.socketpair()
    server_sock.setblocking(False)
    client = trio.socket.from_stdlib_socket(client_sock)
    got: list[object] = []
    back = bytearray()
    answered = trio.Event()

    async def write() -> None:
        with contextlib.suppress(OSError):
            for i in range(0, len(stream), chunk):
                view = memoryview(stream)[i : i + chunk]
                while view:
                    view = view[await client.send(view) :]
            client.shutdown(socket.SHUT_WR)

    async def read_back() -> None:
        with contextlib.suppress(OSError):
            while data := await client.recv(65536):
                back.extend(data)
        answered.set()

    async with trio.open_nursery() as nursery:
        conn = WebSocketConnection(
            server_sock, nursery, FrameEncoder(), max_message_bytes=max_message_bytes, max_buffer_bytes=1 << 22
        )
        nursery.start_soon(write)
        nursery.start_soon(read_back)
        with trio.fail_after(10):
            async for message in conn.messages():
                got.append(message)
        if conn.peer_close_code is not None:
            conn.close(conn.peer_close_code, "")  # the owner answers the peer's close
        conn.abort()
        with trio.move_on_after(2):
            await answered.wait()
        nursery.cancel_scope.cancel()
    client.close()
    return got, bytes(back), conn.close_code
