"""Interpreter settings for the long-running ``dongne serve`` process.

Measured with ``bench/escalation.py`` (10,000 connected locals, 50 questions/s):
with CPython's default collector thresholds (700, 10, 10), full collections
ran every 2-3 s under load and each walked ~650,000 live objects (the
connections' state) for 400-570 ms, stalling every socket; they alone put the
p99 reply time over a second. Short-lived objects die by reference counting
long before any collection, so a larger young generation costs little: the
collector runs less often, promotes less, and full collections become rare
(minutes apart under that load). Cyclic garbage is still collected.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["GC_THRESHOLDS", "tune_interpreter", "watch_gc_pauses"]

#: ``gc.set_threshold`` for the server: young generation of 50,000 objects,
#: 20 young collections per middle one, 10 middle ones per full one.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_interpreter() -> None:
    """Apply :data:`GC_THRESHOLDS` (process-wide: call it once, from the CLI)."""
    gc.set_threshold(*GC_THRESHOLDS)


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
