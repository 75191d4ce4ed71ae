"""Tests for dongne.core.hotspots: windows, cells, hotspots and region pressure.

Window convention under test: a question recorded at ``t`` counts while
``t <= now < t + window_ms``.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dongne.core.geo import EARTH_RADIUS_M, haversine_m
from dongne.core.hotspots import CellGrid, HotspotTracker, RegionPressure
from dongne.core.regions import Hotspot, load_hotspots

HOTSPOTS = load_hotspots()
BY_NAME = {h.name: h for h in HOTSPOTS}
SEONGSAN = BY_NAME["Seongsan Ilchulbong (Sunrise Peak)"]
WINDOW = 15 * 60 * 1000
T0 = 1_700_000_000_000
M_PER_DEG_LAT = EARTH_RADIUS_M * math.pi / 180.0


def tracker(**kwargs: object) -> HotspotTracker:
    return HotspotTracker(hotspots=HOTSPOTS, **kwargs)  # type: ignore[arg-type]


def north_of(lat: float, lng: float, metres: float) -> tuple[float, float]:
    return lat + metres / M_PER_DEG_LAT, lng


def test_window_edges() -> None:
    """A question at t counts at t + window - 1 and has expired at t + window."""
    t = tracker()
    t.record_question("q1", "a1", SEONGSAN.lat, SEONGSAN.lng, "Seongsan", T0)

    assert [c.questions for c in t.top_cells(T0 + WINDOW - 1)] == [1]
    assert [h.questions for h in t.top_hotspots(T0 + WINDOW - 1)] == [1]
    assert t.region_pressure(T0 + WINDOW - 1, {})[0].open_questions == 1
    assert t.top_cells(T0 + WINDOW) == []
    assert t.top_hotspots(T0 + WINDOW) == []
    assert t.region_pressure(T0 + WINDOW, {}) == []


def test_time_never_goes_back() -> None:
    """An earlier now after expiry does not bring questions back."""
    t = tracker()
    t.record_question("q1", "a1", SEONGSAN.lat, SEONGSAN.lng, "Seongsan", T0)
    t.top_cells(T0 + WINDOW)

    assert t.top_cells(T0) == []


def test_expiry_frees_memory() -> None:
    """Nothing is kept once every question has left the window."""
    t = tracker(window_ms=1_000)
    for i in range(100):
        t.record_question(f"q{i}", f"a{i % 7}", 33.3 + i * 1e-3, 126.5, "Jeju-si", T0 + i)
    t.question_resolved("q3")
    t.top_cells(T0 + 99 + 1_000)

    assert (len(t._queue), len(t._by_id), len(t._cells), len(t._spots), len(t._regions)) == (0, 0, 0, 0, 0)


def test_grid_cells_are_cell_m_wide() -> None:
    """Cells are about 500 m squares and contain their centre."""
    grid = CellGrid(500.0, 33.38)
    cell = grid.cell_of(SEONGSAN.lat, SEONGSAN.lng)
    b = grid.bounds(cell)
    lat, lng = grid.centre(cell)

    assert cell == grid.cell_of(lat, lng)
    assert b.min_lat < SEONGSAN.lat < b.max_lat and b.min_lng < SEONGSAN.lng < b.max_lng
    assert haversine_m(lat, b.min_lng, lat, b.max_lng) == pytest.approx(500.0, rel=0.01)
    assert haversine_m(b.min_lat, lng, b.max_lat, lng) == pytest.approx(500.0, rel=1e-9)


def test_points_in_the_same_and_in_different_cells() -> None:
    """Points 200 m apart inside one cell group; points 2 m apart across an edge do not."""
    t = tracker()
    cell = t.grid.cell_of(33.45, 126.56)
    b = t.grid.bounds(cell)
    lat, lng = t.grid.centre(cell)
    width = b.max_lng - b.min_lng
    west, east = lng - 0.2 * width, lng + 0.2 * width
    assert haversine_m(lat, west, lat, east) == pytest.approx(200.0, rel=0.01)
    t.record_question("q1", "a1", lat, west, None, T0)
    t.record_question("q2", "a2", lat, east, None, T0)
    edge_in, edge_out = b.max_lng - width * 0.002, b.max_lng + width * 0.002
    assert t.grid.cell_of(lat, edge_out) == (cell[0] + 1, cell[1])
    t.record_question("q3", "a3", lat, edge_in, None, T0)
    t.record_question("q4", "a4", lat, edge_out, None, T0)

    cells = t.top_cells(T0)

    assert [(cell, 3), ((cell[0] + 1, cell[1]), 1)] == [(c.cell, c.questions) for c in cells]
    assert (lat, lng) == (cells[0].centre_lat, cells[0].centre_lng)
    assert b == cells[0].bounds


def test_distinct_askers() -> None:
    """One asker asking three times is one asker; expiry keeps the count right."""
    t = tracker()
    lat, lng = SEONGSAN.lat, SEONGSAN.lng
    t.record_question("q1", "alice", lat, lng, "Seongsan", T0)
    t.record_question("q2", "alice", lat, lng, "Seongsan", T0 + 10)
    t.record_question("q3", "bob", lat, lng, "Seongsan", T0 + 20)
    t.record_question("q4", "alice", lat, lng, "Seongsan", T0 + 30)

    cell = t.top_cells(T0 + 30)[0]
    spot = t.top_hotspots(T0 + 30)[0]
    assert (4, 2) == (cell.questions, cell.askers) == (spot.questions, spot.askers)
    cell = t.top_cells(T0 + WINDOW + 20)[0]  # q1..q3 gone, q4 left
    assert (cell.questions, cell.askers) == (1, 1)


def test_duplicate_record_is_ignored() -> None:
    """Recording an id already in the window does not double count."""
    t = tracker()
    t.record_question("q1", "a1", SEONGSAN.lat, SEONGSAN.lng, "Seongsan", T0)
    t.record_question("q1", "a1", SEONGSAN.lat, SEONGSAN.lng, "Seongsan", T0 + 5)

    assert t.top_cells(T0 + 5)[0].questions == 1
    assert t.top_cells(T0 + WINDOW) == []


def test_resolved_questions_leave_the_open_count() -> None:
    """Resolving lowers open counts everywhere but not questions; repeats are no-ops."""
    t = tracker()
    t.record_question("q1", "a1", SEONGSAN.lat, SEONGSAN.lng, "Seongsan", T0)
    t.record_question("q2", "a2", SEONGSAN.lat, SEONGSAN.lng, "Seongsan", T0)
    t.question_resolved("q1")
    t.question_resolved("q1")
    t.question_resolved("never-recorded")

    cell, spot = t.top_cells(T0)[0], t.top_hotspots(T0)[0]
    assert (2, 1) == (cell.questions, cell.open) == (spot.questions, spot.open)
    assert [RegionPressure("Seongsan", 1, 2, 0.5)] == t.region_pressure(T0, {"Seongsan": 2})
    t.question_resolved("q2")
    assert [RegionPressure("Seongsan", 0, 2, 0.0)] == t.region_pressure(T0, {"Seongsan": 2})
    assert t.region_pressure(T0 + WINDOW, {}) == []  # expiry after resolve stays consistent


def test_hotspot_200_m_from_seongsan_ilchulbong() -> None:
    """A question 200 m north of Sunrise Peak counts for it, in its region."""
    t = tracker()
    lat, lng = north_of(SEONGSAN.lat, SEONGSAN.lng, 200.0)
    assert haversine_m(lat, lng, SEONGSAN.lat, SEONGSAN.lng) == pytest.approx(200.0)
    t.record_question("q1", "a1", lat, lng, "Seongsan", T0)

    [spot] = t.top_hotspots(T0)

    assert (SEONGSAN.name, "Seongsan", "성산일출봉", 1, 1) == (
        spot.name,
        spot.region,
        spot.name_ko,
        spot.questions,
        spot.askers,
    )


@pytest.mark.parametrize(
    ("near", "far"),
    [("Hallim Park", "Hyeopjae Beach"), ("Hyeopjae Beach", "Hallim Park"),
     ("Jungmun Saekdal Beach", "Jungmun Tourist Complex")],
)  # fmt: skip
def test_nearest_of_two_close_hotspots(near: str, far: str) -> None:
    """Between two hotspots within the radius, the nearer one wins."""
    a, b = BY_NAME[near], BY_NAME[far]
    lat, lng = a.lat + (b.lat - a.lat) * 0.3, a.lng + (b.lng - a.lng) * 0.3
    assert haversine_m(lat, lng, b.lat, b.lng) < 1000.0
    t = tracker()
    t.record_question("q1", "a1", lat, lng, a.region, T0)

    assert [near] == [h.name for h in t.top_hotspots(T0)]


def test_hotspot_radius_is_inclusive() -> None:
    """Exactly at the radius counts; a millimetre less radius does not."""
    lat, lng = north_of(SEONGSAN.lat, SEONGSAN.lng, 700.0)
    d = haversine_m(lat, lng, SEONGSAN.lat, SEONGSAN.lng)
    inside = HotspotTracker(hotspots=[SEONGSAN], hotspot_radius_m=d)
    outside = HotspotTracker(hotspots=[SEONGSAN], hotspot_radius_m=d - 1e-3)

    assert inside.nearest_hotspot(lat, lng) == SEONGSAN
    assert None is outside.nearest_hotspot(lat, lng)


def test_equidistant_hotspots_go_to_the_first() -> None:
    """On an exact tie the hotspot listed first wins."""
    east = Hotspot("East", 33.4, 126.501, "Jeju-si")
    west = Hotspot("West", 33.4, 126.499, "Jeju-si")

    assert east == HotspotTracker(hotspots=[east, west]).nearest_hotspot(33.4, 126.5)
    assert west == HotspotTracker(hotspots=[west, east]).nearest_hotspot(33.4, 126.5)


def test_far_from_every_hotspot() -> None:
    """A question in the middle of nowhere counts for a cell but no hotspot."""
    t = tracker()
    lat, lng = 33.36, 126.53  # Hallasan slopes, > 1 km from every trailhead
    assert min(haversine_m(lat, lng, h.lat, h.lng) for h in HOTSPOTS) > 1000.0
    t.record_question("q1", "a1", lat, lng, "Seogwipo", T0)

    assert (t.top_hotspots(T0), len(t.top_cells(T0))) == ([], 1)


def test_region_pressure_with_no_locals() -> None:
    """0 locals and open questions: ratio None, sorted first; nothing open: ratio 0.0."""
    t = tracker()
    for i in range(2):
        t.record_question(f"s{i}", "a", SEONGSAN.lat, SEONGSAN.lng, "Seongsan", T0)
    for i in range(3):
        t.record_question(f"j{i}", "b", 33.51, 126.52, "Jeju-si", T0)
    t.record_question("x", "c", 33.30, 126.50, None, T0)  # no region: not in pressure
    locals_ = {"Jeju-si": 2, "Udo": 5, "Hallim": 0}

    expected = [
        RegionPressure("Seongsan", 2, 0, None),
        RegionPressure("Jeju-si", 3, 2, 1.5),
        RegionPressure("Hallim", 0, 0, 0.0),
        RegionPressure("Udo", 0, 5, 0.0),
    ]
    assert expected == t.region_pressure(T0, locals_)
    with pytest.raises(ValueError):
        t.region_pressure(T0, {"Udo": -1})


def test_snapshot_is_plain_data() -> None:
    """The snapshot survives strict JSON and msgpack round trips."""
    t = tracker()
    t.record_question("q1", "a1", SEONGSAN.lat, SEONGSAN.lng, "Seongsan", T0)
    snap = t.snapshot(T0 + 1, {"Udo": 1}, n=5)

    assert snap == json.loads(json.dumps(snap, allow_nan=False))
    assert snap == msgpack.unpackb(msgpack.packb(snap))
    assert (snap["now_ms"], snap["window_ms"]) == (T0 + 1, WINDOW)
    assert SEONGSAN.name == snap["hotspots"][0]["name"]
    assert {"min_lat", "min_lng", "max_lat", "max_lng"} == set(snap["cells"][0]["bounds"])
    assert [r["ratio"] for r in snap["regions"]] == [None, 0.0]


def test_bad_input() -> None:
    """Invalid positions and configuration raise ValueError."""
    t = tracker()
    with pytest.raises(ValueError):
        t.record_question("q", "a", math.nan, 126.5, None, T0)
    for kwargs in ({"window_ms": 0}, {"cell_m": 0.0}, {"hotspot_radius_m": -1.0}):
        with pytest.raises(ValueError):
            tracker(**kwargs)
    with pytest.raises(ValueError):
        HotspotTracker(hotspots=[SEONGSAN, SEONGSAN])


# (kind, dt_ms, asker, lat, lng, region, index): kind 0 asks, 1 resolves question
# number ``index``, 2 queries the top ``index``, 3 asks ``3 * dt_ms`` in the past, 4
# forgets question number ``index``. The area spans about 3 x 3
# cells and both hotspots' radii, so questions share cells and hotspots.
OPS = st.lists(
    st.tuples(
        st.integers(0, 4),
        st.integers(0, 400),
        st.sampled_from(["a", "b", "c", "d"]),
        st.floats(33.455, 33.462),
        st.floats(126.938, 126.947),
        st.sampled_from([None, "Seongsan", "Udo"]),
        st.integers(0, 12),
    ),
    max_size=60,
)
Op = tuple[int, int, str, float, float, "str | None", int]
Row = tuple[object, int, int, int]


def brute_rows(live: dict[str, tuple[str, object]], resolved: set[str]) -> list[Row]:
    groups: dict[object, list[str]] = {}
    for qid, (_, key) in live.items():
        if key is not None:
            groups.setdefault(key, []).append(qid)
    rows = [
        (key, len(qs), sum(q not in resolved for q in qs), len({live[q][0] for q in qs})) for key, qs in groups.items()
    ]
    return sorted(rows, key=lambda r: (-r[1], -r[3], r[0]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_tracker_matches_brute_force(ops: list[Op]) -> None:
    """Cells, hotspots and open counts match a scan of every question in the window."""
    hot = [SEONGSAN, Hotspot("Near", 33.457, 126.940, "Seongsan")]
    t = HotspotTracker(window_ms=1_000, cell_m=300.0, hotspots=hot, hotspot_radius_m=400.0)
    # question id -> (time, asker, cell, hotspot name, region)
    seen: dict[str, tuple[int, str, tuple[int, int], str | None, str | None]] = {}
    resolved: set[str] = set()
    forgotten: set[str] = set()  # ids are never used again
    now = T0
    for kind, dt, asker, lat, lng, region, index in ops:
        now += dt
        live = {q: v for q, v in seen.items() if now - 1_000 < v[0] <= now}
        if kind == 0:
            near = [h for h in hot if haversine_m(lat, lng, h.lat, h.lng) <= 400.0]
            best = min(near, key=lambda h: haversine_m(lat, lng, h.lat, h.lng), default=None)
            qid = f"q{len(seen) + len(forgotten)}"
            seen[qid] = (now, asker, t.grid.cell_of(lat, lng), None if best is None else best.name, region)
            t.record_question(qid, asker, lat, lng, region, now)
        elif kind == 1:
            t.question_resolved(f"q{index}")
            if f"q{index}" in live:
                resolved.add(f"q{index}")
        elif kind == 3:  # asked earlier (read back, unhidden): counted in its place, if still in the window
            at = now - 3 * dt  # up to 1200 ms: some out of the window already
            near = [h for h in hot if haversine_m(lat, lng, h.lat, h.lng) <= 400.0]
            best = min(near, key=lambda h: haversine_m(lat, lng, h.lat, h.lng), default=None)
            qid = f"q{len(seen) + len(forgotten)}"
            t.record_question(qid, asker, lat, lng, region, at)
            if now - 1_000 < at:
                seen[qid] = (at, asker, t.grid.cell_of(lat, lng), None if best is None else best.name, region)
            else:
                seen[qid] = (-(10**18), asker, (0, 0), None, None)  # never counted
        elif kind == 4:  # deleted or hidden
            t.forget(f"q{index}")
            if seen.pop(f"q{index}", None) is not None:
                forgotten.add(f"q{index}")
        else:
            cells = brute_rows({q: (v[1], v[2]) for q, v in live.items()}, resolved)
            spots = brute_rows({q: (v[1], v[3]) for q, v in live.items()}, resolved)
            opens = Counter(v[4] for q, v in live.items() if v[4] and q not in resolved)

            got_cells = [(c.cell, c.questions, c.open, c.askers) for c in t.top_cells(now, index)]
            got_spots = [(h.name, h.questions, h.open, h.askers) for h in t.top_hotspots(now, index)]
            pressure = t.region_pressure(now, {})
            assert cells[:index] == got_cells
            assert spots[:index] == got_spots
            assert dict(opens) == {p.region: p.open_questions for p in pressure if p.open_questions}
