"""Room members through the store, and every node's rooms a replica of all nodes' (store/CLUSTER.md, "Room
members across nodes").

A PostgreSQL node writes who is in which question's room here to
``room_members`` (one row per question, user and node) in batches, and keeps
the rooms' members on other nodes in its engine (``events.RemoteMembers``):
so a ``join_question`` reply's ``online`` and ``online_count`` count the
room's members on every node. What a node changed is announced on
``dongne_members`` (the questions); the others read those rooms' rows back.
After each (re)connection of the LISTEN connection the replica is rebuilt
from the whole table (``replica.TableSync``).
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from .core import Event, RemoteMembers
from .replica import TableSync

__all__ = ["MemberSync"]


class MemberSync(TableSync[tuple[str, str], None]):
    """This node's room members out to the store, and other nodes' in to the engine (its rooms:
    ``Presence.rooms``); constructed as ``TableSync`` is."""

    name = "members"

    def wanted(self) -> dict[tuple[str, str], None]:
        """A row per room and user with a connection in it here."""
        return {(qid, user_id): None for qid, room in self._engine.presence.rooms.items() for user_id in room.members}

    async def write(self, changed: dict[tuple[str, str], None], gone: Sequence[tuple[str, str]]) -> None:
        await trio.to_thread.run_sync(self._link.write_members, self._node_id, sorted(changed), sorted(gone))

    def read_news(self, payload: str) -> tuple[str, list[str] | None]:
        from .store._cluster import MEMBERS_KEY, read_rows_news

        return read_rows_news(payload, MEMBERS_KEY)

    async def read(self, keys: list[str] | None) -> Event:
        """The announced rooms' members on other nodes (every room's for a rebuild); users first seen are
        read too (their names)."""
        rows = await trio.to_thread.run_sync(self._link.read_members, self._node_id, keys)
        users = await self.users_first_seen(user_id for _qid, user_id in rows)
        rooms: dict[str, list[str]] = {qid: [] for qid in keys or ()}
        for qid, user_id in rows:
            rooms.setdefault(qid, []).append(user_id)
        listed = tuple((qid, tuple(users_in)) for qid, users_in in sorted(rooms.items()))
        return RemoteMembers(listed, tuple(users), everyone=keys is None)
