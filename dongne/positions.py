"""Positions through the store, and every node's R-tree as a replica of all nodes' (store/CLUSTER.md).

A PostgreSQL node writes where its connected users are to ``positions``
(one row per user and node; no position for one who shared none: they are
online all the same, so other nodes send them no push) in batches, and keeps the users other nodes
place in its engine's live index (``events.RemotePositions``): so
``nearby_locals`` counts, and escalation stages plan, every online local,
whichever node they are connected to. What a node changed is announced on
``dongne_positions``; the others read those users' rows back. The table is
the truth, the notification only says "look": after each (re)connection of
the LISTEN connection the replica is rebuilt from the whole table.

The blocking SQL is ``store._cluster.ClusterLink``'s, on worker threads; the
rules (who enters the live index, who counts as online) are the engine's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from .clock import EngineClock
from .core import Engine, Event, RemotePositions
from .store import StoreError

if TYPE_CHECKING:  # psycopg is optional (the postgres extra)
    from .store._cluster import ClusterLink

__all__ = ["PositionSync"]

log = logging.getLogger("dongne.positions")

#: How long to wait before reading the table again after a read failed.
RETRY_S = 1.0

#: The row of a connected user who shared no position.
_UNPLACED: tuple[None, None] = (None, None)


class PositionSync:
    """This node's positions out to the store, and other nodes' in to the engine.

    Args:
        link: a connection of its own to the database (heartbeats never wait for a batch).
        node_id: this node's id (the rows it owns; its own news is skipped).
        engine: the engine, read for its users' positions (``Neighbourhood.positions``) and who it knows.
        feed: hands the engine an event (``ClientServer.feed``).
        clock: the engine clock (the rows' ``at``).
        interval_s: how often moved positions are written (inf: never; the replica still follows others).

    Error handling: a batch that cannot be written is tried again, whole, at
    the next interval; a read that fails is tried again after ``RETRY_S``.
    """

    def __init__(
        self,
        link: ClusterLink,
        node_id: str,
        engine: Engine,
        feed: Callable[[Event], None],
        clock: EngineClock,
        *,
        interval_s: float = 0.5,
    ) -> None:
        self._link = link
        self._node_id = node_id
        self._engine = engine
        self._feed = feed
        self._clock = clock
        self._interval_s = interval_s
        self._written: dict[str, tuple[float | None, float | None]] = {}  # what the table holds for this node
        self._wanted: set[str] = set()  # users other nodes announced, to read
        self._rebuild = False
        self._wakeup = trio.Event()
        self.batches = 0  # written so far
        self.applied = 0  # reads applied so far (news or rebuilds)

    # ---- out ----------------------------------------------------------------------

    def write_all_again(self) -> None:
        """The next batch writes every position, moved or not (``Membership.on_registered``: the node's
        peers expired it and deleted its rows; at the first registration there is nothing written yet)."""
        self._written.clear()

    async def publish(self) -> int:
        """Write the positions that moved since the last batch and delete the rows of users gone; how many."""
        where = self._engine.where
        now = self._clock.now_ms()
        written = self._written
        placed, connected = where.positions, self._engine.user_conns
        moved: list[tuple[str, float | None, float | None, int, str | None]] = [
            (user_id, lat, lng, where.last_move.get(user_id, now), region)
            for user_id, (lat, lng, region) in placed.items()
            if written.get(user_id) != (lat, lng)
        ]
        # Connected users who shared no position: a row all the same, so other nodes know them online.
        moved += [
            (user_id, None, None, now, None)
            for user_id in connected
            if user_id not in placed and written.get(user_id) != _UNPLACED
        ]
        gone = [user_id for user_id in written if user_id not in placed and user_id not in connected]
        if not moved and not gone:
            return 0
        try:
            await trio.to_thread.run_sync(self._link.write_positions, self._node_id, moved, gone)
        except StoreError as exc:
            log.warning("positions_write_failed", extra={"error": str(exc), "users": len(moved) + len(gone)})
            return 0
        for user_id, lat, lng, _at, _region in moved:
            written[user_id] = (lat, lng)
        for user_id in gone:
            written.pop(user_id, None)
        self.batches += 1
        return len(moved) + len(gone)

    async def publish_periodically(self) -> None:
        """:meth:`publish` every ``interval_s``; at the end, this node's rows are deleted (by ``Membership``)."""
        if math.isinf(self._interval_s):
            return
        while True:
            await trio.sleep(self._interval_s)
            await self.publish()

    # ---- in -----------------------------------------------------------------------

    def news(self, channel: str, payload: str) -> None:
        """A notification on ``dongne_positions`` (``cluster.Listener``); this node's own are skipped."""
        from .store._cluster import read_positions_news

        try:
            origin, users = read_positions_news(payload)
        except ValueError:
            log.warning("positions_news_unreadable", extra={"channel": channel, "payload": payload[:80]})
            return
        if origin == self._node_id:
            return
        if users is None:
            self._rebuild = True
        else:
            self._wanted.update(users)
        self._wakeup.set()

    def rebuild_soon(self) -> None:
        """Read the whole table (the LISTEN connection was (re)made: news may have been missed)."""
        self._rebuild = True
        self._wakeup.set()

    async def apply_forever(self) -> None:
        """Read what other nodes announced (or everything, for a rebuild) and hand it to the engine."""
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            try:
                await self.apply()
            except StoreError as exc:  # a read the database refused: again, later
                log.warning("positions_read_failed", extra={"error": str(exc)})
                await trio.sleep(RETRY_S)
                self._wakeup.set()

    async def apply(self) -> None:
        """One read of the announced users' rows (all rows after a rebuild was asked for), fed to the engine.

        The users first seen are read too (their settings make them plannable).
        On failure what was asked stays asked.
        """
        rebuild, wanted = self._rebuild, self._wanted
        if not rebuild and not wanted:
            return
        self._rebuild, self._wanted = False, set()
        try:
            rows = await trio.to_thread.run_sync(
                self._link.read_positions, self._node_id, None if rebuild else sorted(wanted)
            )
            unknown = sorted({row[0] for row in rows} - self._engine.users.keys())
            users = await trio.to_thread.run_sync(self._link.read_users, unknown) if unknown else []
        except BaseException:
            self._rebuild = self._rebuild or rebuild
            self._wanted |= wanted
            raise
        found = {row[0] for row in rows}
        gone = () if rebuild else tuple(sorted(wanted - found))
        self._feed(RemotePositions(tuple(rows), gone, tuple(users), everyone=rebuild))
        self.applied += 1
