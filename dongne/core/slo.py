"""Answer-time SLOs: how often the first answer comes within 1, 5 and 10 minutes.

A question counts for a threshold once it is old enough for the outcome to be
known (asked at least that long ago, or already answered); until then it is
left out, so young questions do not flatter or spoil the figures. The tracker
is fed from the database at start-up (the last ``window_days``), so the
figures survive restarts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import attrs

__all__ = ["THRESHOLDS_S", "SloTracker"]

THRESHOLDS_S: tuple[tuple[str, int], ...] = (("1m", 60), ("5m", 300), ("10m", 600))


@attrs.define
class _Entry:
    created_at: int
    region: str | None
    urgent: bool
    first_answer_at: int | None = None


def _summary(entries: Iterable[_Entry], now: int) -> dict[str, Any]:
    entries = list(entries)
    out: dict[str, Any] = {"questions": len(entries)}
    for name, seconds in THRESHOLDS_S:
        limit = seconds * 1000
        decided = [e for e in entries if e.first_answer_at is not None or now - e.created_at >= limit]
        met = sum(1 for e in decided if e.first_answer_at is not None and e.first_answer_at - e.created_at <= limit)
        out[f"within_{name}"] = round(met / len(decided), 4) if decided else None
        out[f"decided_{name}"] = len(decided)
    waits = sorted((e.first_answer_at - e.created_at) / 1000 for e in entries if e.first_answer_at is not None)
    out["answered"] = len(waits)
    out["avg_first_answer_s"] = round(sum(waits) / len(waits), 1) if waits else None
    out["p90_first_answer_s"] = round(waits[max(0, math.ceil(0.9 * len(waits)) - 1)], 1) if waits else None
    return out


class SloTracker:
    """First-answer times of the questions asked in the last ``window_days``."""

    def __init__(self, window_days: float = 7.0) -> None:
        self.window_ms = int(window_days * 86_400_000)
        self._entries: dict[str, _Entry] = {}

    def asked(
        self, question_id: str, created_at: int, region: str | None, urgent: bool, first_answer_at: int | None = None
    ) -> None:
        self._entries[question_id] = _Entry(created_at, region, urgent, first_answer_at)

    def forget(self, question_id: str) -> None:
        """A question deleted or hidden: it no longer counts (as after a restart, which does not read it)."""
        self._entries.pop(question_id, None)

    def answered(self, question_id: str, at: int) -> None:
        entry = self._entries.get(question_id)
        if entry is not None and entry.first_answer_at is None:
            entry.first_answer_at = at

    def _prune(self, now: int) -> None:
        oldest = now - self.window_ms
        for qid in [q for q, e in self._entries.items() if e.created_at < oldest]:
            del self._entries[qid]

    def snapshot(self, now: int) -> dict[str, Any]:
        """Shares within 1/5/10 min, average and p90 time to first answer: overall, per region, urgent."""
        self._prune(now)
        entries = list(self._entries.values())
        regions: dict[str, list[_Entry]] = {}
        for e in entries:
            if e.region is not None:
                regions.setdefault(e.region, []).append(e)
        return {
            "window_days": self.window_ms / 86_400_000,
            "overall": _summary(entries, now),
            "urgent": _summary((e for e in entries if e.urgent), now),
            "regions": {name: _summary(items, now) for name, items in sorted(regions.items())},
        }
