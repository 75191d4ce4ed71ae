"""One heap of the engine's deadlines: typing expiry, slow-response alerts, hello timeouts.

Entries are never removed early (lazy deletion): whoever pops one checks that
it still applies, e.g. that the typing state it ends was not renewed since.
"""

from __future__ import annotations

import heapq
from typing import Literal

__all__ = ["DeadlineKind", "Deadlines"]

#: What falls due: a typing state ends (key: question id, user id; "remote_typing": one another
#: node relayed, kept for join replies), a
#: question is owed its slow-response alert (key: question id, ""), or a
#: connection has not sent hello in time (key: conn id as text, ""), a
#: question reaches its time to live (key: question id, ""), or an IP block
#: ends (key: the CIDR).
DeadlineKind = Literal["typing", "remote_typing", "slow_response", "hello", "expire", "ip_block"]


class Deadlines:
    """A heap of ``(due ms, kind, key, subkey)``, earliest first."""

    __slots__ = ("_heap",)

    def __init__(self) -> None:
        self._heap: list[tuple[int, DeadlineKind, str, str]] = []

    def add(self, due: int, kind: DeadlineKind, key: str, subkey: str = "") -> None:
        heapq.heappush(self._heap, (due, kind, key, subkey))

    def pop_due(self, now: int) -> list[tuple[int, DeadlineKind, str, str]]:
        """Every entry due at ``now`` or earlier, earliest first."""
        due = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap))
        return due

    def next(self) -> int | None:
        """When the earliest entry is due (ms), if any."""
        return self._heap[0][0] if self._heap else None

    def first(self) -> tuple[int, DeadlineKind, str, str] | None:
        """The earliest entry, left in place, if any."""
        return self._heap[0] if self._heap else None

    def drop_first(self) -> None:
        """Remove the earliest entry (one its owner knows no longer applies)."""
        heapq.heappop(self._heap)

    def __len__(self) -> int:
        return len(self._heap)
