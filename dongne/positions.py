"""Positions through the store, and every node's R-tree as a replica of all nodes' (store/CLUSTER.md).

A PostgreSQL node writes where its connected users are to ``positions``
(one row per user and node; no position for one who shared none: they
are online all the same, so other nodes send them no push) in batches, and
keeps the users other nodes place in its engine's live index (``events.RemotePositions``): so
``nearby_locals`` counts, and escalation stages plan, every online local,
whichever node they are connected to. What a node changed is announced on
``dongne_positions``; the others read those users' rows back. The table is
the truth, the notification only says "look": after each (re)connection of
the LISTEN connection the replica is rebuilt from the whole table.

The blocking SQL is ``store._cluster.ClusterLink``'s, on worker threads; the
rules (who enters the live index, who counts as online) are the engine's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

from .clock import EngineClock
from .core import Engine, Event, RemotePositions
from .replica import TableSync

if TYPE_CHECKING:  # psycopg is optional (the postgres extra)
    from .store._cluster import ClusterLink

__all__ = ["PositionSync"]

#: The row of a connected user who shared no position.
_UNPLACED: tuple[None, None] = (None, None)


class PositionSync(TableSync[str, tuple[float | None, float | None]]):
    """This node's positions out to the store, and other nodes' in to the engine (``replica.TableSync``).

    Args (beside ``TableSync``'s):
        clock: the engine clock (the rows' ``at``).
    """

    name = "positions"

    def __init__(
        self,
        link: ClusterLink,
        node_id: str,
        engine: Engine,
        feed: Callable[[Event], None],
        *,
        clock: EngineClock,
        interval_s: float = 0.5,
    ) -> None:
        super().__init__(link, node_id, engine, feed, interval_s=interval_s)
        self._clock = clock

    def wanted(self) -> dict[str, tuple[float | None, float | None]]:
        """Every placed user's position, and a row without one for each connected user who shared none
        (other nodes then know them online)."""
        rows: dict[str, tuple[float | None, float | None]] = dict.fromkeys(self._engine.user_conns, _UNPLACED)
        rows.update((user_id, (lat, lng)) for user_id, (lat, lng, _region) in self._engine.where.positions.items())
        return rows

    async def write(self, changed: dict[str, tuple[float | None, float | None]], gone: Sequence[str]) -> None:
        where, now = self._engine.where, self._clock.now_ms()
        moved = [
            (user_id, lat, lng, now if lat is None else where.last_move.get(user_id, now),
             None if lat is None else where.positions[user_id][2])
            for user_id, (lat, lng) in changed.items()
        ]  # fmt: skip
        await trio.to_thread.run_sync(self._link.write_positions, self._node_id, moved, list(gone))

    def read_news(self, payload: str) -> tuple[str, list[str] | None]:
        from .store._cluster import POSITIONS_KEY, read_rows_news

        return read_rows_news(payload, POSITIONS_KEY)

    async def read(self, keys: list[str] | None) -> Event:
        """The announced users' rows (all rows for a rebuild); users first seen are read too (their settings
        make them plannable)."""
        rows = await trio.to_thread.run_sync(self._link.read_positions, self._node_id, keys)
        found = {row[0] for row in rows}
        users = await self.users_first_seen(found)
        gone = () if keys is None else tuple(sorted(set(keys) - found))
        return RemotePositions(tuple(rows), gone, tuple(users), everyone=keys is None)
