"""Live question heat: per grid cell, per named hotspot and per region.

Theory of operation
-------------------

:class:`HotspotTracker` is a sans-I/O sliding-window counter. Every call takes
``now_ms`` (milliseconds since the epoch); time only moves forward, so a
query's ``now_ms`` below the latest one seen is treated as the latest one
seen. A question is recorded at the time it was asked: one asked before the
latest time seen (read back at start-up, unhidden) takes its place in the
window, or is not counted if it has left it already. ``forget`` takes a
question out of every count (deleted, hidden).

*Window convention:* a question recorded at ``t`` is in the window at ``now``
iff ``t <= now < t + window_ms``: it counts at ``t + window_ms - 1`` and has
expired at ``t + window_ms``.

Questions sit in a deque in time order, so expiry pops from the left and
costs O(expired) amortised; each popped question is subtracted from the
tallies of its cell, hotspot and region, and tallies that reach zero are
dropped. Memory is thus bounded by the questions in one window.

*Cells* come from :class:`CellGrid`: an equirectangular metric plane
``x = lng * m_per_deg * cos(lat0)``, ``y = lat * m_per_deg`` cut into squares
of ``cell_m`` metres. Near ``lat0`` (all of Jeju is within 0.3 degrees) a
cell is ``cell_m`` metres on a side to within 1 %.

*Hotspots:* a question counts for the nearest named hotspot within
``hotspot_radius_m`` (great-circle, ties to the earlier hotspot), or none.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .geo import EARTH_RADIUS_M, haversine_m, valid_lat_lng
from .regions import Bounds, Hotspot
from .spatial import JEJU_LAT0

__all__ = ["CellGrid", "CellStats", "HotspotStats", "HotspotTracker", "RegionPressure"]

_M_PER_DEG = EARTH_RADIUS_M * math.pi / 180.0

Cell = tuple[int, int]


@attrs.frozen
class CellGrid:
    """A square metric grid around latitude ``lat0``; cells are ``(ix, iy)``."""

    cell_m: float = 500.0
    lat0: float = JEJU_LAT0

    def _m_per_deg_lng(self) -> float:
        return _M_PER_DEG * math.cos(math.radians(self.lat0))

    def cell_of(self, lat: float, lng: float) -> Cell:
        """Return the cell ``(ix, iy)`` holding a position (west/south edges inclusive)."""
        x = lng * self._m_per_deg_lng()
        y = lat * _M_PER_DEG
        return math.floor(x / self.cell_m), math.floor(y / self.cell_m)

    def bounds(self, cell: Cell) -> Bounds:
        """Return a cell's box in degrees."""
        ix, iy = cell
        lng_step = self.cell_m / self._m_per_deg_lng()
        lat_step = self.cell_m / _M_PER_DEG
        return Bounds(iy * lat_step, ix * lng_step, (iy + 1) * lat_step, (ix + 1) * lng_step)

    def centre(self, cell: Cell) -> tuple[float, float]:
        """Return a cell's centre as ``(lat, lng)``."""
        b = self.bounds(cell)
        return (b.min_lat + b.max_lat) / 2.0, (b.min_lng + b.max_lng) / 2.0


@attrs.frozen
class CellStats:
    """Activity in one grid cell over the window."""

    cell: Cell
    centre_lat: float
    centre_lng: float
    bounds: Bounds
    questions: int
    open: int
    askers: int


@attrs.frozen
class HotspotStats:
    """Activity around one named hotspot over the window."""

    name: str
    name_ko: str | None
    region: str
    questions: int
    open: int
    askers: int


@attrs.frozen
class RegionPressure:
    """Open questions against online locals in one region.

    ``ratio`` is ``open_questions / online_locals``; ``0.0`` when there are no
    open questions (whatever the locals); ``None`` when there are open
    questions but no locals, meaning "unbounded" (kept JSON-safe, no ``inf``).
    """

    region: str
    open_questions: int
    online_locals: int
    ratio: float | None


@attrs.define
class _Tally:
    questions: int = 0
    open: int = 0
    askers: Counter[str] = attrs.Factory(Counter)


_Slot = tuple[dict[Any, _Tally], Any]


@attrs.define
class _Question:
    asker_id: str
    at_ms: int
    slots: tuple[_Slot, ...]  # the tallies this question counts in
    open: bool = True


def _add(q: _Question) -> None:
    for tallies, key in q.slots:
        tally = tallies.setdefault(key, _Tally())
        tally.questions += 1
        tally.open += 1
        tally.askers[q.asker_id] += 1


def _remove(q: _Question) -> None:
    for tallies, key in q.slots:
        tally = tallies[key]
        tally.questions -= 1
        tally.open -= q.open
        tally.askers[q.asker_id] -= 1
        if tally.askers[q.asker_id] == 0:
            del tally.askers[q.asker_id]
        if tally.questions == 0:
            del tallies[key]


def _counts(t: _Tally) -> tuple[int, int, int]:
    return t.questions, t.open, len(t.askers)


def _rank(t: _Tally) -> tuple[int, int]:
    return -t.questions, -len(t.askers)


class HotspotTracker:
    """Sliding-window question counts per cell, hotspot and region.

    Args:
        window_ms: Window length in ms; positive.
        cell_m: Grid cell size in metres; finite and positive.
        hotspots: Named places; names must be unique.
        hotspot_radius_m: How far from a hotspot a question still counts for it.
        lat0: Latitude the metric grid is scaled for.

    Raises:
        ValueError: A bad window, cell size or radius, or duplicate hotspot names.
    """

    def __init__(
        self,
        window_ms: int = 15 * 60 * 1000,
        cell_m: float = 500.0,
        hotspots: Sequence[Hotspot] = (),
        hotspot_radius_m: float = 1000.0,
        lat0: float = JEJU_LAT0,
    ) -> None:
        if window_ms <= 0:
            raise ValueError(f"window_ms must be positive, got {window_ms!r}")
        if not (math.isfinite(cell_m) and cell_m > 0):
            raise ValueError(f"cell_m must be finite and positive, got {cell_m!r}")
        if not hotspot_radius_m >= 0:
            raise ValueError(f"hotspot_radius_m must be >= 0, got {hotspot_radius_m!r}")
        self._hotspots = {h.name: h for h in hotspots}
        if len(self._hotspots) != len(hotspots):
            raise ValueError("hotspot names must be unique")
        self.window_ms = window_ms
        self.grid = CellGrid(cell_m=cell_m, lat0=lat0)
        self.hotspot_radius_m = hotspot_radius_m
        self._now: float = -math.inf
        self._queue: deque[tuple[str, _Question]] = deque()
        self._by_id: dict[str, _Question] = {}
        self._cells: dict[Cell, _Tally] = {}
        self._spots: dict[str, _Tally] = {}
        self._regions: dict[str, _Tally] = {}

    def _advance(self, now_ms: int) -> None:
        self._now = max(self._now, now_ms)
        horizon = self._now - self.window_ms
        while self._queue and self._queue[0][1].at_ms <= horizon:
            question_id, q = self._queue.popleft()
            del self._by_id[question_id]
            _remove(q)

    def nearest_hotspot(self, lat: float, lng: float) -> Hotspot | None:
        """Return the nearest hotspot within the radius, earliest on ties, or None."""
        best: Hotspot | None = None
        best_d = self.hotspot_radius_m
        for h in self._hotspots.values():
            d = haversine_m(lat, lng, h.lat, h.lng)
            if d < best_d or (best is None and d == best_d):
                best, best_d = h, d
        return best

    def record_question(
        self, question_id: str, asker_id: str, lat: float, lng: float, region: str | None, now_ms: int
    ) -> None:
        """Count an open question asked at ``now_ms`` (its own time, which may be before the latest seen).

        Recording an id already in the window is a no-op (replays do not
        double count). ``region=None`` questions count for cells and hotspots
        but not for region pressure.

        Raises:
            ValueError: The position is invalid.
        """
        if not valid_lat_lng(lat, lng):
            raise ValueError(f"invalid position: ({lat!r}, {lng!r})")
        self._advance(now_ms)
        if question_id in self._by_id or now_ms <= self._now - self.window_ms:
            return
        slots: list[_Slot] = [(self._cells, self.grid.cell_of(lat, lng))]
        spot = self.nearest_hotspot(lat, lng)
        if spot is not None:
            slots.append((self._spots, spot.name))
        if region is not None:
            slots.append((self._regions, region))
        q = _Question(asker_id, int(now_ms), tuple(slots))
        queue = self._queue
        if not queue or queue[-1][1].at_ms <= q.at_ms:
            queue.append((question_id, q))
        else:  # asked earlier than the latest time seen (read back at start-up, unhidden): in its place
            queue.insert(bisect.bisect_right(queue, q.at_ms, key=lambda item: item[1].at_ms), (question_id, q))
        self._by_id[question_id] = q
        _add(q)

    def forget(self, question_id: str) -> None:
        """Take a question out of every count (deleted or hidden); unknown or expired ids are ignored."""
        q = self._by_id.pop(question_id, None)
        if q is None:
            return
        for i, (held_id, _) in enumerate(self._queue):
            if held_id == question_id:
                del self._queue[i]
                break
        _remove(q)

    def question_resolved(self, question_id: str) -> None:
        """Mark a question no longer open; unknown, expired or repeated ids are ignored.

        It still counts in ``questions`` and ``askers`` until it leaves the window.
        """
        q = self._by_id.get(question_id)
        if q is None or not q.open:
            return
        q.open = False
        for tallies, key in q.slots:
            tallies[key].open -= 1

    def top_cells(self, now_ms: int, n: int = 10) -> list[CellStats]:
        """Return the ``n`` busiest cells: most questions, then askers, then cell."""
        self._advance(now_ms)
        ranked = heapq.nsmallest(n, self._cells.items(), key=lambda kv: (_rank(kv[1]), kv[0]))
        grid = self.grid
        return [CellStats(c, *grid.centre(c), grid.bounds(c), *_counts(t)) for c, t in ranked]

    def top_hotspots(self, now_ms: int, n: int = 10) -> list[HotspotStats]:
        """Return the ``n`` busiest hotspots: most questions, then askers, then name."""
        self._advance(now_ms)
        ranked = heapq.nsmallest(n, self._spots.items(), key=lambda kv: (_rank(kv[1]), kv[0]))
        spots = self._hotspots
        return [HotspotStats(name, spots[name].name_ko, spots[name].region, *_counts(t)) for name, t in ranked]

    def region_pressure(self, now_ms: int, online_locals_by_region: Mapping[str, int]) -> list[RegionPressure]:
        """Return open questions per online local for every region that has either.

        Sorted by pressure: unbounded (``ratio is None``) first, then ratio
        descending, then open questions descending, then region name.

        Raises:
            ValueError: A negative count of online locals.
        """
        self._advance(now_ms)
        if any(v < 0 for v in online_locals_by_region.values()):
            raise ValueError("online locals must be >= 0")
        out = []
        for region in set(online_locals_by_region) | set(self._regions):
            tally = self._regions.get(region)
            open_q = tally.open if tally is not None else 0
            locals_ = online_locals_by_region.get(region, 0)
            ratio = 0.0 if open_q == 0 else None if locals_ == 0 else open_q / locals_
            out.append(RegionPressure(region, open_q, locals_, ratio))
        # None (unbounded) sorts first: False < True.
        out.sort(key=lambda p: (p.ratio is not None, -(p.ratio or 0), -p.open_questions, p.region))
        return out

    def snapshot(self, now_ms: int, online_locals_by_region: Mapping[str, int], n: int = 10) -> dict[str, Any]:
        """Return plain lists/dicts/numbers (JSON and msgpack ready) for an admin op."""
        pressure = self.region_pressure(now_ms, online_locals_by_region)
        return {
            "now_ms": int(self._now),
            "window_ms": self.window_ms,
            "cells": [{**attrs.asdict(c), "cell": [*c.cell]} for c in self.top_cells(now_ms, n)],
            "hotspots": [attrs.asdict(h) for h in self.top_hotspots(now_ms, n)],
            "regions": [attrs.asdict(p) for p in pressure],
        }
