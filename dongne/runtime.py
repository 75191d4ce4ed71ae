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

import gc

__all__ = ["GC_THRESHOLDS", "tune_interpreter"]

#: ``gc.set_threshold`` for the server: young generation of 50,000 objects,
#: 20 young collections per middle one, 10 middle ones per full one.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_interpreter() -> None:
    """Apply :data:`GC_THRESHOLDS` (process-wide: call it once, from the CLI)."""
    gc.set_threshold(*GC_THRESHOLDS)
