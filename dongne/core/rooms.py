"""Question rooms: who is in a room (by connection) and who is typing."""

from __future__ import annotations

import heapq

import attrs

__all__ = ["Room", "TypingClock"]


@attrs.define
class Room:
    """The live audience of one question.

    ``members`` maps a user id to the ids of that user's connections in the
    room; a user is *present* while that set is non-empty.
    """

    members: dict[str, set[int]] = attrs.Factory(dict)
    typing: dict[str, int] = attrs.Factory(dict)  # user id -> expires_at (ms)

    def conn_ids(self, *, except_conn: int | None = None, except_user: str | None = None) -> list[int]:
        out: list[int] = []
        for user_id, conns in self.members.items():
            if user_id == except_user:
                continue
            out.extend(c for c in conns if c != except_conn)
        return out

    def add(self, user_id: str, conn_id: int) -> bool:
        """Add a connection; True when this makes the user newly present."""
        conns = self.members.setdefault(user_id, set())
        newly = not conns
        conns.add(conn_id)
        return newly

    def remove(self, user_id: str, conn_id: int) -> bool:
        """Remove a connection; True when the user is no longer present."""
        conns = self.members.get(user_id)
        if not conns or conn_id not in conns:
            return False
        conns.discard(conn_id)
        if conns:
            return False
        del self.members[user_id]
        return True

    def has_conn(self, user_id: str, conn_id: int) -> bool:
        return conn_id in self.members.get(user_id, ())

    @property
    def empty(self) -> bool:
        return not self.members


@attrs.define
class TypingClock:
    """Deadlines of typing states, earliest first (a heap with lazy deletion)."""

    _heap: list[tuple[int, str, str]] = attrs.Factory(list)

    def push(self, expires_at: int, question_id: str, user_id: str) -> None:
        heapq.heappush(self._heap, (expires_at, question_id, user_id))

    def pop_due(self, now: int) -> list[tuple[int, str, str]]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap))
        return due

    def next_deadline(self) -> int | None:
        return self._heap[0][0] if self._heap else None
