"""Interpreter settings for the long-running ``dongne serve`` process.

Garbage-collection pauses stop every task and socket, so the server chooses
when the big ones happen. With CPython's default thresholds a full collection
follows every ten middle ones once the survivors grow by a quarter, which
under load is every few seconds, and each walks every object the connections
keep alive. Larger young generations make full collections rare but make the
young ones walk whatever a burst of connections left behind. So the server
keeps the small default young generation and runs only young collections
automatically; the others it runs itself.

Middle collections are off too. What survives a young collection is mostly
what a suspended task holds while it waits (each wait of a connection's
reader leaves a dozen objects: its coroutines, the wait's closure), alive
until the task wakes again; a middle collection walked everything that had
survived since the one before, and under load those were the longest pauses
a request met. Reference cycles are rare in what survives (README's
benchmark section has both figures), so they can wait for the full
collection.

Reference cycles that survive a young collection are reclaimed by the full
collection :func:`collect_fully_every` runs on a fixed interval
(``[server] full_gc_interval_s``): a known pause, at a known rate. Most live
objects (connections, users, questions) outlive many intervals, so after each
collection the survivors are frozen (``gc.freeze``) and the next one walks
only what is newer; every :data:`FULL_SWEEP_EVERY` rounds the frozen objects
are thawed and walked too, for the cycles they formed meanwhile (kept until
then: at most an hour with the defaults). The pauses each choice measured are
in README's benchmark section and the commits that made them
(``dongne_gc_pause_seconds`` shows them live).
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import trio

__all__ = [
    "FULL_SWEEP_EVERY",
    "GC_THRESHOLDS",
    "YOUNG_COLLECTION_EVERY_WAKES",
    "YoungCollections",
    "collect_fully_every",
    "tune_interpreter",
    "watch_gc_pauses",
]

#: ``gc.set_threshold`` for the server: CPython's young collections (every 700
#: objects); the second and third thresholds at their maximum turn automatic
#: middle and full collections off (see above).
GC_THRESHOLDS = (700, 2**31 - 1, 2**31 - 1)


def tune_interpreter() -> None:
    """Apply :data:`GC_THRESHOLDS` (process-wide: call it once, from the CLI)."""
    gc.set_threshold(*GC_THRESHOLDS)


#: A young collection at least every this many wake-ups of connection readers (see :class:`YoungCollections`).
YOUNG_COLLECTION_EVERY_WAKES = 500


class YoungCollections:
    """Runs a young collection every ``every`` wake-ups of the tasks that read connections.

    CPython starts a young collection when allocations minus frees of
    tracked objects pass the first threshold, and a free counts whichever
    generation the object was in. A connection's reader that wakes frees
    its last wait's objects and makes as many new ones: the count stays
    flat while the young generation fills with the new waits of every
    reader woken since the last collection. With little else allocated
    (thousands of idle connections answering the heartbeat), the next
    collection walked them all at once, the longest pause left after
    middle collections went (README's benchmark section). Counting
    wake-ups bounds what one young collection can find. No timer: an idle
    server does nothing, and tests on trio's autojump clock see no deadline.

    Args:
        every: wake-ups between two collections this runs.
    """

    def __init__(self, every: int = YOUNG_COLLECTION_EVERY_WAKES) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every!r}")
        self._every = every
        self._left = every

    def woke(self) -> None:
        """A reader woke with data: collect the young generation if ``every`` did since the last time."""
        self._left -= 1
        if self._left <= 0:
            self._left = self._every
            if gc.isenabled():
                gc.collect(0)


#: Every this many rounds of :func:`collect_fully_every`, frozen objects are walked too.
FULL_SWEEP_EVERY = 6


async def collect_fully_every(interval_s: float) -> None:
    """Every ``interval_s`` seconds, collect what is new since the last round (never if infinite).

    Each round is a full collection over the objects not frozen, after which
    the survivors are frozen; every :data:`FULL_SWEEP_EVERY` rounds all are
    thawed first. Everything is thawed when the task ends (a server stopping
    in a process that goes on, like the tests).
    """
    if math.isinf(interval_s):
        return
    rounds = 0
    try:
        while True:
            await trio.sleep(interval_s)
            rounds += 1
            if rounds % FULL_SWEEP_EVERY == 0:
                gc.unfreeze()
            gc.collect()
            gc.freeze()
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def watch_gc_pauses(observe: Callable[[int, float], None]) -> Iterator[None]:
    """Report every garbage collection's pause while the block runs.

    ``observe(generation, seconds)`` is called after each collection (the
    server feeds ``dongne_gc_pause_seconds``): a collection stops every task
    and every socket, so its length is a latency an operator needs to see.
    ``gc.callbacks`` is the interpreter's own list; the callback is removed
    on exit, so servers started one after another in a process (tests) do
    not pile up callbacks.
    """
    started = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            observe(info["generation"], time.perf_counter() - started[0])

    gc.callbacks.append(on_gc)
    try:
        yield
    finally:
        gc.callbacks.remove(on_gc)
