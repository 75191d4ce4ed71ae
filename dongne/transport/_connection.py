"""One client's WebSocket connection on a raw non-blocking socket.

Theory of operation: outbound frames arrive already encoded (a broadcast is
encoded once for all its recipients). ``send_nowait`` writes them straight to
the socket while the kernel accepts them; what does not fit goes to a bounded
buffer drained by a writer task that exists only while there is a backlog.
A client whose backlog exceeds the bound is a slow consumer: it is closed with
4009 and recovers its durable events with ``resume`` when it reconnects, so
one stalled client never delays anyone else.

Inbound: the common frames (whole masked binary messages, pings, pongs) are
read directly; the first other frame (text, a fragment, a close, anything
malformed) hands the rest of the stream, at that frame's start, to wsproto's
sans-I/O ``Connection``, which judges it with masking, fragmentation and
control-frame rules. Each fragment of a message counts ``FRAGMENT_COST``
against ``max_message_bytes`` besides its bytes.
"""

from __future__ import annotations

import collections
import contextlib
import math
import socket
from collections.abc import AsyncIterator, Callable

import attrs
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from ._frames import FrameEncoder
from ._handshake import recv_some

__all__ = ["BinaryFrame", "TextFrame", "WebSocketConnection"]

CLOSE_GRACE_S = 2.0
#: What each fragment of a message costs against ``max_message_bytes`` besides
#: its bytes (about what keeping it costs): a client cannot hold the server
#: busy and growing with thousands of empty or 1-byte fragments of one message.
FRAGMENT_COST = 64
LINGER_MAX_BYTES = 4 * 1024 * 1024


@attrs.frozen
class BinaryFrame:
    payload: bytes


@attrs.frozen
class TextFrame:
    length: int


class WebSocketConnection:
    """The server side of one WebSocket, after the handshake.

    Args:
        sock: the accepted socket, non-blocking; this object closes it.
        nursery: where the writer task is started when a backlog appears.
        encoder: the shared frame encoder.
        max_message_bytes: a larger inbound message closes with 1009.
        max_buffer_bytes: a larger outbound backlog closes with 4009.
        trailing: bytes received after the handshake.
        on_receive: called each time the reader wakes with bytes from the
            client (the server's ``YoungCollections.woke``).

    Resource handling: ``aclose`` (or ``abort``) must be called once the
    reader is done; it closes the socket.
    """

    def __init__(
        self,
        sock: socket.socket,
        nursery: trio.Nursery,
        encoder: FrameEncoder,
        *,
        max_message_bytes: int,
        max_buffer_bytes: int,
        trailing: bytes = b"",
        on_receive: Callable[[], None] | None = None,
    ) -> None:
        self._sock = sock
        self._on_receive = on_receive
        self._nursery = nursery
        self._encoder = encoder
        self._ws = Connection(ConnectionType.SERVER)
        self._inbound = bytearray(trailing)  # received, not yet parsed (see messages)
        self._max_message = max_message_bytes
        self._max_buffer = max_buffer_bytes
        self._buffer: collections.deque[memoryview] = collections.deque()
        self.buffered_bytes = 0
        self._held: list[tuple[bytes, int]] | None = None  # (frame, durable seq or 0)
        self._writer_running = False
        self._writer_done = trio.Event()
        self._writer_done.set()
        self.closing = False
        self.close_code: int | None = None
        self.peer_close_code: int | None = None  # the code to answer the peer's close frame with, once it came
        self.socket_closed = False
        self.alive = True  # cleared by each heartbeat ping, set by any inbound bytes
        self.last_message_at = -math.inf  # trio time of the last whole message (a pong is not one)
        self.ping_sent_at: float | None = None  # trio time of the heartbeat's ping still unanswered, if any
        self.read_scope = trio.CancelScope()
        self.frames_out = 0
        self.overflowed = False

    # ---- sending ---------------------------------------------------------------

    def send_nowait(self, frame: bytes, seq: int = 0) -> None:
        """Queue one encoded frame; never blocks. Closes with 4009 on overflow.

        ``seq``: the durable event's, kept with the frame while held (see ``take_held``).
        """
        if self.closing:
            return
        if self._held is not None:
            self._held.append((frame, seq))
            self.buffered_bytes += len(frame)
            if self.buffered_bytes > self._max_buffer:
                self._overflow()
            return
        self._write(frame)
        if self.buffered_bytes > self._max_buffer:
            self._overflow()

    def _write(self, frame: bytes) -> None:
        """Write one frame: to the socket while the kernel takes it, the rest to the backlog.

        The only path by which bytes reach the socket outside the writer task,
        so ``buffered_bytes`` counts exactly what the backlog holds (plus held
        frames): every byte added here is subtracted once by the writer.
        """
        if self.socket_closed:
            return
        self.frames_out += 1
        if self._buffer:
            # Behind a backlog: the frame must wait its turn to keep the stream in order.
            self._enqueue(memoryview(frame))
            return
        try:
            sent = self._sock.send(frame)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # The peer is gone; the reader sees EOF and tears the connection down.
            self.abort()
            return
        if sent < len(frame):
            self._enqueue(memoryview(frame)[sent:])

    def _enqueue(self, rest: memoryview) -> None:
        self._buffer.append(rest)
        self.buffered_bytes += len(rest)
        self._start_writer()

    def _start_writer(self) -> None:
        if not self._writer_running:
            self._writer_running = True
            self._writer_done = trio.Event()
            self._nursery.start_soon(self._writer)

    async def _writer(self) -> None:
        try:
            while self._buffer and not self.socket_closed:
                try:
                    await trio.lowlevel.wait_writable(self._sock)
                except (trio.ClosedResourceError, OSError):
                    return
                while self._buffer:
                    head = self._buffer[0]
                    try:
                        sent = self._sock.send(head)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        self.abort()
                        return
                    self.buffered_bytes -= sent
                    # The kernel took bytes from a backlog it had no room for: the peer read what went
                    # before. It counts as being alive, as inbound bytes do: a healthy client on a slow
                    # link reads a long replay for longer than the heartbeat's ping waits behind it.
                    self.alive = True
                    if sent == len(head):
                        self._buffer.popleft()
                    else:
                        self._buffer[0] = head[sent:]
                        break
        finally:
            self._writer_running = False
            self._writer_done.set()

    def hold(self) -> None:
        """Keep live frames back (counted against the buffer) until ``release``."""
        if self._held is None:
            self._held = []

    @property
    def holding(self) -> bool:
        return self._held is not None

    def take_held(self) -> list[tuple[bytes, int]]:
        """The frames held so far, with their seqs, taken out (no longer counted); holding goes on."""
        if not self._held:
            return []
        held = self._drop_held()
        self._held = []
        return held

    def release(self) -> None:
        held = self._drop_held()
        if self.closing:
            return
        for frame, _seq in held:
            self._write(frame)
        if self.buffered_bytes > self._max_buffer:
            self._overflow()

    def _drop_held(self) -> list[tuple[bytes, int]]:
        """Stop holding; return the held frames, no longer counted in ``buffered_bytes``."""
        held, self._held = self._held or [], None
        self.buffered_bytes -= sum(len(f) for f, _seq in held)
        return held

    async def send_paced(self, frame: bytes) -> None:
        """Write past a hold (the replay itself), waiting while the backlog is over half the bound.

        A replay is a burst the server chose to send, not a client falling
        behind: it is paced by the socket instead of counted against the
        slow-consumer bound (live frames held meanwhile still are).
        """
        if self.closing:
            return
        self._write(frame)
        while self._buffer and self.buffered_bytes > self._max_buffer // 2 and not self.closing:
            await self._writer_done.wait()

    def _overflow(self) -> None:
        """Drop the backlog and close with 4009 ("slow consumer").

        The head of the backlog may be a frame the kernel took only part of; it
        is kept so the stream stays well-formed, and the close frame follows
        it. If the peer never reads again, the close grace period ends it.
        """
        self.overflowed = True
        self._drop_held()
        if self._buffer:
            head = self._buffer[0]
            self._buffer.clear()
            self._buffer.append(head)
            self.buffered_bytes = len(head)
        self.close(4009, "slow consumer")

    def ping(self) -> None:
        if not self.closing:
            self._write(self._encoder.ping(b"hb"))

    # ---- closing ---------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake: flush what is queued, then send the close frame.

        The reader gets ``CLOSE_GRACE_S`` to see the peer's reply before the
        socket is closed.
        """
        if self.closing:
            return
        self._drop_held()  # live frames held for a replay that will not finish
        self.closing = True
        self.close_code = code
        if self.socket_closed:
            return
        self._write(self._encoder.close(code, reason))
        self.read_scope.deadline = min(self.read_scope.deadline, trio.current_time() + CLOSE_GRACE_S)

    def abort(self) -> None:
        """Close the socket now; wakes any task waiting on it."""
        if self.socket_closed:
            return
        self.socket_closed = True
        self._buffer.clear()
        self.buffered_bytes = 0
        self.read_scope.cancel()
        # Wakes the reader and the writer. It raises only outside a trio run,
        # where nothing can be waiting on the socket.
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.notify_closing(self._sock)
        self._sock.close()
        # wsproto's frame parser is a generator kept on the object it parses
        # for: a reference cycle, so without this a closed connection's
        # protocol state waits for the cyclic collector (which the server
        # runs rarely, dongne/runtime.py). Nothing is parsed after this.
        parser = getattr(getattr(self._ws, "_proto", None), "_parse_more", None)
        if parser is not None:
            parser.close()

    # The timeout is a grace period, not a deadline for the caller: when it
    # ends the socket is closed anyway, so aclose never fails for lack of time.
    async def aclose(self, timeout: float = CLOSE_GRACE_S) -> None:
        """Flush, then close gracefully, for at most ``timeout`` seconds; then close the socket.

        A lingering close: after our last bytes we send FIN and read (and
        discard) what the peer still sends until it closes too. Closing a
        socket with unread input makes the kernel send RST, and the peer's
        kernel may then drop our close frame (e.g. the 1009 for an oversize
        message that is still arriving).

        Resource handling: the socket is closed on return, and also if the
        caller is cancelled meanwhile.
        """
        try:
            with trio.move_on_after(timeout):
                if not self.socket_closed and self._writer_running:
                    await self._writer_done.wait()
                if not self.socket_closed:
                    with contextlib.suppress(OSError):
                        self._sock.shutdown(socket.SHUT_WR)
                    drained = 0
                    while drained < LINGER_MAX_BYTES:
                        try:
                            data = await recv_some(self._sock)
                        except (OSError, trio.ClosedResourceError):
                            break
                        if not data:
                            break
                        drained += len(data)
        finally:
            self.abort()

    # ---- receiving -------------------------------------------------------------

    async def messages(self) -> AsyncIterator[BinaryFrame | TextFrame]:
        """Yield each complete inbound message until the peer closes or goes away.

        After the peer's close frame, ``peer_close_code`` says what to answer
        it with; the owner sends that close (after what it still owes the
        peer), as it does for the end of the stream.

        Control frames are answered here. An inbound message larger than the
        limit closes the connection with 1009.

        Frames are delimited here, and the ones a client sends all the time
        are read here too: a whole binary message, a ping, a pong (each
        masked, as a client's must be, minimally encoded, no extension bits).
        wsproto's general parser cost ~20 us per frame, and a server with
        10,000 clients reads a pong from each every heartbeat on top of their
        requests. At the first other frame (text, close, a fragment, anything
        to be judged) the rest of the stream goes to wsproto from that frame's
        first byte: it starts at a frame boundary with no message in
        progress, as its own state would be had it read everything.
        """
        buf = self._inbound
        max_message = self._max_message
        while True:
            pos, n, simple = 0, len(buf), True
            while n - pos >= 2:
                b0, b1 = buf[pos], buf[pos + 1]
                opcode, length = b0 & 0x0F, b1 & 0x7F
                if b0 & 0xF0 != 0x80 or not b1 & 0x80 or opcode not in _SIMPLE_OPCODES:
                    simple = False  # a fragment, extension bits, unmasked, or not binary/ping/pong
                    break
                head = 6
                if length == 126:
                    if n - pos < 8:
                        break
                    length, head = (buf[pos + 2] << 8) | buf[pos + 3], 8
                    simple = length >= 126 and opcode == _BINARY
                elif length == 127:
                    if n - pos < 14:
                        break
                    length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 14
                    simple = 65536 <= length < 1 << 63 and opcode == _BINARY
                if not simple:
                    break  # not minimally encoded, or a control frame over 125 bytes
                if length > max_message:
                    self.close(1009, f"message larger than {max_message} bytes")
                    return
                end = pos + head + length
                if end > n:
                    break  # the rest of this frame is still to come
                payload = _unmask(buf[pos + head - 4 : pos + head], buf[pos + head : end])
                pos = end
                if opcode == _BINARY:
                    del buf[:pos]
                    pos, n = 0, len(buf)
                    self.last_message_at = trio.current_time()
                    yield BinaryFrame(payload)
                    if self.closing:
                        return
                elif opcode == _PING:
                    # Pongs count against the backlog like any frame: a client
                    # that pings without reading is a slow consumer too.
                    self.send_nowait(self._encoder.pong(payload))
                else:
                    self.alive = True
            del buf[:pos]
            if not simple:
                break
            data = await self._receive()
            if not data:
                return
            buf += data
        self._ws.receive_data(bytes(buf))
        buf.clear()
        async for message in self._wsproto_messages():
            yield message

    async def _wsproto_messages(self) -> AsyncIterator[BinaryFrame | TextFrame]:
        """:meth:`messages` through wsproto, for the rest of the stream."""
        body = bytearray()
        size = 0  # the message's bytes
        cost = 0  # its bytes plus FRAGMENT_COST for each of its frames on the wire
        text = False
        while True:
            for ev in self._ws.events():
                if isinstance(ev, (BytesMessage, TextMessage)):
                    # bytes() is free on the bytes wsproto yields; its type says it may be a bytearray.
                    chunk = bytes(ev.data) if isinstance(ev, BytesMessage) else ev.data.encode()
                    size += len(chunk)
                    cost += len(chunk) + (FRAGMENT_COST if ev.frame_finished else 0)
                    if size > self._max_message or cost > self._max_message + FRAGMENT_COST:
                        self.close(1009, f"message larger than {self._max_message} bytes (each fragment counts extra)")
                        return
                    text = isinstance(ev, TextMessage)
                    if not text and chunk:
                        # One buffer: a message trickling in a byte per read arrives as that many events.
                        body += chunk
                    if ev.message_finished:
                        self.last_message_at = trio.current_time()
                        yield TextFrame(size) if text else BinaryFrame(bytes(body))
                        body, size, cost, text = bytearray(), 0, 0, False
                        if self.closing:
                            return
                elif isinstance(ev, Ping):
                    self.send_nowait(self._encoder.pong(bytes(ev.payload)))
                elif isinstance(ev, Pong):
                    self.alive = True
                elif isinstance(ev, CloseConnection):
                    if not self.closing:
                        code = ev.code if ev.code not in (1005, 1006, 1015) else 1000
                        if self._ws.state is ConnectionState.REMOTE_CLOSING:
                            # The peer's close frame: answered by the owner (``close(peer_close_code, "")``)
                            # once what it owes the peer is out (replies to requests that came before it).
                            self.peer_close_code = code
                        else:  # wsproto's word for a protocol error it found: closed at once
                            self.close(code, "")
                    return
            data = await self._receive()
            if not data:
                return
            self._ws.receive_data(data)

    async def _receive(self) -> bytes:
        """The next bytes from the client (they show it is alive); b"" once the socket is closed or broken."""
        if self.socket_closed:
            return b""
        try:
            data = await recv_some(self._sock)
        except (OSError, trio.ClosedResourceError):
            return b""
        if data:
            self.alive = True
            if self._on_receive is not None:
                self._on_receive()
        return data


_BINARY, _PING, _PONG = 0x2, 0x9, 0xA
_SIMPLE_OPCODES = frozenset((_BINARY, _PING, _PONG))


def _unmask(mask: bytes | bytearray, data: bytes | bytearray) -> bytes:
    """A client frame's payload, unmasked (RFC 6455, section 5.3): XOR with the 4-byte key repeated."""
    n = len(data)
    if not n:
        return b""
    key = (bytes(mask) * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")
