"""The engine's clock: epoch milliseconds that follow trio's clock.

Deadlines are computed in epoch milliseconds so they survive restarts, and
the passage of time is read from ``trio.current_time()`` so that tests on a
``MockClock`` see time jump consistently.
"""

from __future__ import annotations

import time

import trio

__all__ = ["EngineClock"]


class EngineClock:
    """Anchors trio's clock to the wall clock once, when created (inside ``trio.run``)."""

    def __init__(self, wall_ms: int | None = None) -> None:
        # An integer anchor: now_ms() and trio_time_at() are exact inverses.
        self._wall0 = int(time.time() * 1000) if wall_ms is None else wall_ms
        self._trio0 = trio.current_time()

    def now_ms(self) -> int:
        return int(self._wall0 + (trio.current_time() - self._trio0) * 1000)

    def trio_time_at(self, epoch_ms: int) -> float:
        """The ``trio.current_time()`` value at which ``epoch_ms`` is reached."""
        # A microsecond late rather than early: at that moment now_ms() has
        # surely reached epoch_ms despite float rounding.
        return self._trio0 + (epoch_ms - self._wall0) / 1000 + 1e-6
