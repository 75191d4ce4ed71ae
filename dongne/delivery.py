"""Each connection's durable stream: every event exactly once, in seq order, whoever appended it.

Theory of operation: durable events reach a connection three ways: live,
after this node's commit (``Send`` of a frame with a ``seq``); replayed from
the store after a ``resume`` (``Replay``); and replayed from the store because
another node appended them (its news on ``dongne_events``, or the periodic
catch-up; ``store/CLUSTER.md``). They interleave, so each connection keeps
``given``, the newest seq handed to it in order, and:

- a live frame at ``given + 1`` is written; one at or below ``given`` is a
  duplicate (a replay sent it already) and is dropped; one above
  ``given + 1`` is a gap (another node's events): it is held, and the events
  in between are read from the store first;
- a wanted head above ``given`` (a resume, news, the catch-up) starts a
  replay: live frames are held meanwhile (``WebSocketConnection.hold``).

One replay task per connection at most, and it runs until nothing is
missing: a later wish only raises its target. Two replays overlapping on a
connection would each release the held frames when done, the first one too
early; here they cannot overlap.

Replays read the store together: while one read runs, the reads the other
connections ask for queue, and the next read takes them all in one
statement (``Storage.read_event_rows``). When another node's commit alerts a
hundred locals connected here, that is a read or two, not a hundred. The
rows' ``data`` is spliced into the frame as stored, not decoded and packed again.

Events the store no longer has (pruned) or has not yet (a hello's
``last_seq`` counts an event whose commit is still in flight) are not waited
for: the replay sends what the store holds up to its target, and while it
runs a frame past the range it read is written without another read; once it
is done, a gap is read again.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
import msgpack
import trio

from .store import StoreError
from .transport import FrameEncoder, WebSocketConnection

__all__ = ["Deliveries"]

log = logging.getLogger("dongne.delivery")

#: Rows of events, by user: what ``Storage.read_event_rows`` returns.
EventRows = dict[str, list[tuple[int, str, bytes]]]

_packb: Callable[[Any], bytes] = msgpack.packb
_HEAD: Final = b"\x83" + _packb("type")
_SEQ: Final = _packb("seq")
_DATA: Final = _packb("data")


def durable_frame(kind: str, seq: int, data: bytes) -> bytes:
    """The msgpack of ``protocol.durable_event(kind, seq, data)``, given ``data`` packed (as the store keeps it)."""
    return _HEAD + _packb(kind) + _SEQ + _packb(seq) + _DATA + data


class BatchedReads:
    """Reads of users' events, each awaited by one replay, made together.

    A read asked while none runs starts at once; those asked meanwhile wait
    for it to end and then go in one call (so one statement and one worker
    thread) whatever their number. A user asked for twice is read once, over
    both ranges.

    Args:
        read_event_rows: the store's ``read_event_rows`` (blocking: run on a worker thread).
        spawn: starts a task in the connections' nursery.
    """

    def __init__(
        self, read_event_rows: Callable[[Sequence[tuple[str, int, int]]], EventRows], spawn: Callable[..., None]
    ) -> None:
        self._read_event_rows = read_event_rows
        self._spawn = spawn
        self._queued: list[tuple[str, int, int, list[Any], trio.Event]] = []
        self._reading = False
        self.calls = 0  # store calls so far, for tests and benches

    async def read(self, user_id: str, after_seq: int, up_to_seq: int) -> list[tuple[int, str, bytes]]:
        """The user's events with ``after_seq < seq <= up_to_seq``, in order.

        Raises:
            StoreError: the store could not be read.
        """
        result: list[Any] = []
        done = trio.Event()
        self._queued.append((user_id, after_seq, up_to_seq, result, done))
        if not self._reading:
            self._reading = True
            self._spawn(self._read_queued)
        await done.wait()
        if isinstance(result[0], StoreError):
            raise result[0]
        rows: list[tuple[int, str, bytes]] = result[0]
        return rows

    async def _read_queued(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                ranges: dict[str, tuple[int, int]] = {}
                for user_id, after, up_to, _result, _done in batch:
                    low, high = ranges.get(user_id, (after, up_to))
                    ranges[user_id] = (min(low, after), max(high, up_to))
                wanted = [(user_id, low, high) for user_id, (low, high) in ranges.items()]
                self.calls += 1
                try:
                    found: EventRows | StoreError = await trio.to_thread.run_sync(self._read_event_rows, wanted)
                except StoreError as exc:
                    found = exc
                for user_id, after, up_to, result, done in batch:
                    if isinstance(found, StoreError):
                        result.append(found)
                    else:
                        result.append([row for row in found.get(user_id, ()) if after < row[0] <= up_to])
                    done.set()
        finally:
            self._reading = False


@attrs.define
class _Stream:
    user_id: str
    given: int = -1  # the newest seq handed over in order; -1: not started (no hello acted on yet)
    target: int = 0  # the newest seq the connection should have
    read: int = 0  # the store was read up to here
    replaying: bool = False
    replays: int = 0  # replay tasks run so far, for tests and logs


class Deliveries:
    """The durable streams of this node's connections.

    Args:
        read_event_rows: the store's ``read_event_rows`` (blocking: run on a worker thread).
        encoder: the shared frame encoder.
        spawn: starts a task in the connections' nursery.
    """

    def __init__(
        self,
        read_event_rows: Callable[[Sequence[tuple[str, int, int]]], EventRows],
        encoder: FrameEncoder,
        spawn: Callable[..., None],
    ) -> None:
        self.reads = BatchedReads(read_event_rows, spawn)
        self._encoder = encoder
        self._spawn = spawn
        self._streams: dict[int, _Stream] = {}

    def given(self, conn_id: int) -> int | None:
        """The newest seq handed to the connection in order (None: no stream)."""
        stream = self._streams.get(conn_id)
        return None if stream is None or stream.given < 0 else stream.given

    def user_of(self, conn_id: int) -> str | None:
        """Whose stream the connection carries (None: no stream yet)."""
        stream = self._streams.get(conn_id)
        return None if stream is None else stream.user_id

    def replays(self, conn_id: int) -> int:
        stream = self._streams.get(conn_id)
        return 0 if stream is None else stream.replays

    def start(self, conn: WebSocketConnection, conn_id: int, user_id: str, after_seq: int, up_to_seq: int) -> None:
        """A hello's ``Replay``: the stream starts after ``after_seq``; events up to ``up_to_seq`` follow."""
        stream = self._streams.setdefault(conn_id, _Stream(user_id))
        stream.given = stream.read = after_seq
        self._want(conn, conn_id, stream, up_to_seq)

    def want(self, conn: WebSocketConnection, conn_id: int, user_id: str, head: int) -> None:
        """The connection's user has events up to ``head`` in the store: see that it gets them."""
        stream = self._streams.setdefault(conn_id, _Stream(user_id))
        self._want(conn, conn_id, stream, head)

    def live(self, conn: WebSocketConnection, conn_id: int, seq: int, frame: bytes) -> None:
        """A durable event committed by this node, for one connection."""
        stream = self._streams.get(conn_id)
        if stream is None or stream.given < 0:  # not a stream (yet): as any frame
            conn.send_nowait(frame, seq)
            return
        if stream.replaying:
            conn.send_nowait(frame, seq)  # held: the replay task sorts it in
        elif seq <= stream.given:
            return  # a replay sent it already
        elif seq == stream.given + 1 or seq - 1 <= stream.read:
            stream.given = seq
            conn.send_nowait(frame, seq)
        else:  # events in between came from another node: those first
            conn.hold()
            conn.send_nowait(frame, seq)
            self._want(conn, conn_id, stream, seq - 1)

    def forget(self, conn_id: int) -> None:
        self._streams.pop(conn_id, None)

    def _want(self, conn: WebSocketConnection, conn_id: int, stream: _Stream, head: int) -> None:
        stream.target = max(stream.target, head)
        if stream.given < 0 or stream.replaying or stream.target <= stream.given:
            return
        stream.replaying = True
        stream.replays += 1
        conn.hold()
        self._spawn(self._replay, conn, conn_id, stream)

    async def _replay(self, conn: WebSocketConnection, conn_id: int, stream: _Stream) -> None:
        """Send what the store has up to the target, then the frames held meanwhile, until nothing is missing."""
        backlog: deque[tuple[bytes, int]] = deque()
        try:
            while not conn.closing:
                if stream.target > stream.read:
                    up_to = stream.target
                    try:
                        rows = await self.reads.read(stream.user_id, stream.given, up_to)
                    except StoreError as exc:  # the database out of reach: the client resumes later
                        log.warning("replay_failed", extra={"user": stream.user_id, "error": str(exc)})
                        conn.close(1013, "the server cannot read your missed events now; reconnect later")
                        return
                    stream.read = max(stream.read, up_to)
                    for seq, kind, data in rows:
                        if seq > stream.given:
                            stream.given = seq
                            await conn.send_paced(self._encoder.binary(durable_frame(kind, seq, data)))
                backlog.extend(conn.take_held())
                while backlog:
                    frame, seq = backlog[0]
                    if seq:
                        if seq <= stream.given:
                            backlog.popleft()  # replayed already
                            continue
                        if seq - 1 > max(stream.given, stream.read):
                            stream.target = max(stream.target, seq - 1)  # a gap the store can fill
                            break
                        stream.given = seq
                    backlog.popleft()
                    await conn.send_paced(frame)
                if backlog or stream.target > stream.read:
                    continue
                more = conn.take_held()  # frames held while the last ones were written
                if not more:
                    # Nothing missing, nothing held: live again (no checkpoint since the check). What the
                    # store lacked up to the target (pruned, or counted by a hello but never committed)
                    # is given up on: a later gap is read again, it may be another node's events.
                    stream.read = stream.target = stream.given
                    return
                backlog.extend(more)
        finally:
            stream.replaying = False
            rest = [*backlog, *conn.take_held()]  # left over only when cancelled or closing
            conn.release()
            for frame, seq in rest:
                conn.send_nowait(frame, seq)
