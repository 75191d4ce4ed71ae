"""Tests for dongne.core.geo and dongne.core.spatial.

The spatial index is checked against a brute-force haversine scan: every
answer must be identical, distances included, after arbitrary sequences of
inserts, moves and removals.
"""

from __future__ import annotations

import gc
import math
import random
from collections.abc import Collection

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rtree import index as rtree_index
from rtree.exceptions import RTreeError

from dongne.core.geo import EARTH_RADIUS_M, haversine_m, offset_position, snap_position, valid_lat_lng
from dongne.core.spatial import LocalsIndex, LocalsIndexStatistics, _Tree

PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Jeju and its waters.
LATS = st.floats(33.1, 33.6)
LNGS = st.floats(126.1, 127.0)
# A small pool of ids so that operations collide: moves, re-inserts, removals.
USER_IDS = st.sampled_from([f"u{i:02d}" for i in range(40)])
RADII = st.one_of(
    st.just(0.0),
    st.floats(0.0, 2_000.0),
    st.floats(0.0, 100_000.0),
    st.just(math.inf),
)


def brute_within(
    positions: dict[str, tuple[float, float]],
    lat: float,
    lng: float,
    radius_m: float,
    exclude: Collection[str] = (),
) -> list[tuple[str, float]]:
    """The reference answer: scan everyone, filter, sort by (distance, id)."""
    hits = []
    for uid, (plat, plng) in positions.items():
        if uid in exclude:
            continue
        dist = haversine_m(lat, lng, plat, plng)
        if dist <= radius_m:
            hits.append((uid, dist))
    hits.sort(key=lambda hit: (hit[1], hit[0]))
    return hits


@st.composite
def positions_pool(draw: st.DrawFn) -> list[tuple[float, float]]:
    """A few distinct positions, so that many users share identical ones."""
    return draw(st.lists(st.tuples(LATS, LNGS), min_size=1, max_size=12))


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[str, str, float, float]]:
    """A random sequence of upserts and removes.

    Positions come either from a small shared pool (identical positions),
    from a small jitter around a pool position (near-ties), or anywhere.
    """
    pool = draw(positions_pool())
    ops = []
    for _ in range(draw(st.integers(0, 120))):
        kind = draw(st.sampled_from(["upsert", "upsert", "upsert", "remove"]))
        uid = draw(USER_IDS)
        source = draw(st.sampled_from(["pool", "jitter", "anywhere"]))
        if source == "anywhere":
            lat, lng = draw(LATS), draw(LNGS)
        else:
            lat, lng = draw(st.sampled_from(pool))
            if source == "jitter":
                lat += draw(st.floats(-1e-4, 1e-4))
                lng += draw(st.floats(-1e-4, 1e-4))
        ops.append((kind, uid, lat, lng))
    return ops


def apply(ops: list[tuple[str, str, float, float]]) -> tuple[LocalsIndex, dict[str, tuple[float, float]]]:
    index = LocalsIndex()
    model: dict[str, tuple[float, float]] = {}
    for kind, uid, lat, lng in ops:
        if kind == "upsert":
            index.upsert(uid, lat, lng)
            model[uid] = (lat, lng)
        else:
            index.remove(uid)
            model.pop(uid, None)
    return index, model


@PROPERTY_SETTINGS
@given(
    ops=operations(),
    queries=st.lists(
        st.tuples(LATS, LNGS, RADII, st.integers(0, 15), st.frozensets(USER_IDS, max_size=6)),
        min_size=1,
        max_size=8,
    ),
    query_at_user=st.booleans(),
)
def test_nearest_within_matches_brute_force(
    ops: list[tuple[str, str, float, float]],
    queries: list[tuple[float, float, float, int, frozenset[str]]],
    query_at_user: bool,
) -> None:
    """nearest_within is exactly the first k of a brute-force scan."""
    index, model = apply(ops)
    for lat, lng, radius, k, exclude in queries:
        if query_at_user and model:
            # Query from a user's own position: distance-0 ties.
            lat, lng = model[min(model)]
        expected = brute_within(model, lat, lng, radius, exclude)[:k]

        assert expected == index.nearest_within(lat, lng, radius, k, exclude)


@PROPERTY_SETTINGS
@given(ops=operations(), lat=LATS, lng=LNGS, radius=RADII)
def test_within_and_count_match_brute_force(
    ops: list[tuple[str, str, float, float]], lat: float, lng: float, radius: float
) -> None:
    """within and count_within agree with a brute-force scan; state matches."""
    index, model = apply(ops)
    expected = brute_within(model, lat, lng, radius)

    assert expected == index.within(lat, lng, radius)
    assert len(expected) == index.count_within(lat, lng, radius)
    assert len(model) == len(index)
    for uid in [f"u{i:02d}" for i in range(40)]:
        assert (uid in model) == (uid in index)
        assert model.get(uid) == index.position(uid)


@PROPERTY_SETTINGS
@given(ops=operations(), lat=LATS, lng=LNGS, k=st.integers(1, 15))
def test_radius_exactly_at_a_user(ops: list[tuple[str, str, float, float]], lat: float, lng: float, k: int) -> None:
    """A user exactly at the radius, in any direction, is inside it."""
    index, model = apply(ops)
    for plat, plng in model.values():
        radius = haversine_m(lat, lng, plat, plng)
        expected = brute_within(model, lat, lng, radius)

        assert expected == index.within(lat, lng, radius)
        assert expected[:k] == index.nearest_within(lat, lng, radius, k)


@PROPERTY_SETTINGS
@given(
    points=st.lists(st.tuples(st.floats(-90, 90), st.floats(-180, 180)), min_size=0, max_size=40),
    lat=st.floats(-90, 90),
    lng=st.floats(-180, 180),
    radius=st.one_of(st.floats(0, 3e7), st.floats(0, 5e5), st.just(math.inf)),
    k=st.integers(0, 10),
)
def test_whole_earth_matches_brute_force(
    points: list[tuple[float, float]], lat: float, lng: float, radius: float, k: int
) -> None:
    """Exact far from lat0 too: poles, antimeridian, huge radii."""
    index = LocalsIndex()
    model = {}
    for i, (plat, plng) in enumerate(points):
        index.upsert(f"p{i}", plat, plng)
        model[f"p{i}"] = (plat, plng)
    expected = brute_within(model, lat, lng, radius)

    assert expected == index.within(lat, lng, radius)
    assert expected[:k] == index.nearest_within(lat, lng, radius, k)


def test_antimeridian() -> None:
    """A query box crossing 180 degrees finds users on the other side."""
    index = LocalsIndex(lat0=0.0)
    index.upsert("east", 0.0, 179.9999)
    index.upsert("west", 0.0, -179.9998)
    index.upsert("far", 0.0, 170.0)

    assert [uid for uid, _ in index.within(0.0, 180.0, 100.0)] == ["east", "west"]
    assert [uid for uid, _ in index.nearest_within(0.0, -179.9998, 50.0, 5)] == ["west", "east"]


def test_empty_index_and_k_zero() -> None:
    """An empty index and k=0 return nothing."""
    index = LocalsIndex()

    assert index.nearest_within(33.5, 126.5, 5_000.0, 10) == []
    assert index.within(33.5, 126.5, 5_000.0) == []
    assert index.count_within(33.5, 126.5, 5_000.0) == 0

    index.upsert("a", 33.5, 126.5)

    assert index.nearest_within(33.5, 126.5, 5_000.0, 0) == []


def test_radius_zero_and_ties() -> None:
    """Radius 0 finds exactly the users at the query position, by id."""
    index = LocalsIndex()
    for uid in ["c", "a", "b"]:
        index.upsert(uid, 33.5, 126.5)
    index.upsert("d", 33.5, 126.50001)

    assert index.within(33.5, 126.5, 0.0) == [("a", 0.0), ("b", 0.0), ("c", 0.0)]
    assert index.nearest_within(33.5, 126.5, 0.0, 2) == [("a", 0.0), ("b", 0.0)]
    assert index.nearest_within(33.5, 126.5, 0.0, 5, exclude={"a"}) == [("b", 0.0), ("c", 0.0)]


def test_exclude_everyone() -> None:
    """Excluding every user leaves nothing, whatever k is."""
    index = LocalsIndex()
    index.upsert("a", 33.5, 126.5)
    index.upsert("b", 33.51, 126.5)

    assert index.nearest_within(33.5, 126.5, math.inf, 3, exclude={"a", "b"}) == []
    assert [("b", haversine_m(33.5, 126.5, 33.51, 126.5))] == index.nearest_within(
        33.5, 126.5, math.inf, 3, exclude=["a", "nobody"]
    )


def test_upsert_moves_and_remove() -> None:
    """Upsert moves a user; remove drops them and tolerates absent users."""
    index = LocalsIndex()
    index.upsert("a", 33.5, 126.5)
    index.upsert("a", 33.2, 126.9)

    assert len(index) == 1
    assert index.position("a") == (33.2, 126.9)
    assert index.within(33.5, 126.5, 1_000.0) == []
    assert [uid for uid, _ in index.within(33.2, 126.9, 1.0)] == ["a"]

    index.remove("a")
    index.remove("a")
    index.remove("never-there")

    assert len(index) == 0
    assert "a" not in index
    assert index.position("a") is None
    assert index.within(33.2, 126.9, 1_000.0) == []


def test_upsert_same_position_is_noop() -> None:
    """Re-upserting the same position keeps the user once."""
    index = LocalsIndex()
    index.upsert("a", 33.5, 126.5)
    index.upsert("a", 33.5, 126.5)

    assert index.within(33.5, 126.5, 10.0) == [("a", 0.0)]


def test_id_reuse() -> None:
    """Freed integer ids are reused, so churn does not grow the id space."""
    index = LocalsIndex()
    for i in range(10):
        index.upsert(f"u{i}", 33.3 + i * 1e-3, 126.5)
    for round_ in range(50):
        for i in range(5):
            index.remove(f"u{i}" if round_ == 0 else f"r{round_ - 1}-{i}")
        for i in range(5):
            index.upsert(f"r{round_}-{i}", 33.4, 126.6 + i * 1e-3)

    assert LocalsIndexStatistics(users=10, allocated_ids=10, free_ids=0) == index.statistics()
    assert index.count_within(33.4, 126.6, 1_000.0) == 5

    index.remove("u9")

    assert LocalsIndexStatistics(users=9, allocated_ids=10, free_ids=1) == index.statistics()


def test_queries_leave_no_cyclic_garbage() -> None:
    """Queries create no reference cycles (rtree's own wrappers leave one per query).

    The server raises the collector's thresholds, so any per-query garbage
    would pile up between collections (the soak bench saw ~4 MB).
    """
    index = LocalsIndex()
    for i in range(200):
        index.upsert(f"u{i}", 33.3 + (i % 20) * 1e-3, 126.5 + (i // 20) * 1e-3)
    index.within(33.3, 126.5, 500.0)  # one-time ctypes types
    index.nearest_within(33.3, 126.5, 500.0, 5)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(50):
            index.within(33.305, 126.505, 800.0)
            index.nearest_within(33.305, 126.505, 800.0, 5)
            index.count_within(33.305, 126.505, 0.0)
        gc.collect()
        garbage = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()

    assert garbage == []


def test_tree_answers_as_rtree_and_raises_what_the_library_reports() -> None:
    """The tree's direct calls give rtree's own answers, and a failed call raises rtree's error.

    They skip rtree's per-call result check and check the library's
    result code themselves: a failure must not pass as an empty answer.
    """
    props = rtree_index.Property()
    props.dimension = 2
    tree, reference = _Tree(props), rtree_index.Index(properties=props)
    rng = random.Random(7)
    points: dict[int, tuple[float, float]] = {}

    def place(rid: int) -> None:
        x, y = points[rid] = (rng.random(), rng.random())
        tree.insert(rid, x, y)
        reference.insert(rid, (x, y, x, y))

    for rid in range(300):
        place(rid)
    for rid in range(0, 300, 3):  # moves: delete, then insert elsewhere
        x, y = points[rid]
        tree.delete(rid, x, y)
        reference.delete(rid, (x, y, x, y))
        place(rid)
    for _ in range(50):
        x, y = rng.random(), rng.random()
        box = (x - 0.1, y - 0.1, x + 0.1, y + 0.1)
        assert tree.intersection(box) == list(reference.intersection(box))
        assert tree.nearest((x, y, x, y), 5) == list(reference.nearest((x, y, x, y), 5))

    props3 = rtree_index.Property()
    props3.dimension = 3  # the tree's calls are 2-d: the library refuses each of them
    wrong = _Tree(props3)
    for call in (
        lambda: wrong.insert(1, 0.5, 0.5),
        lambda: wrong.delete(1, 0.5, 0.5),
        lambda: wrong.intersection((0.0, 0.0, 1.0, 1.0)),
        lambda: wrong.nearest((0.0, 0.0, 0.0, 0.0), 1),
    ):
        with pytest.raises(RTreeError, match="wrong number of dimensions"):
            call()


def test_invalid_input_rejected() -> None:
    """Invalid positions, radii, k and lat0 raise ValueError; state unchanged."""
    index = LocalsIndex()
    index.upsert("a", 33.5, 126.5)
    for lat, lng in [(math.nan, 126.5), (33.5, math.inf), (91.0, 0.0), (0.0, -180.5)]:
        with pytest.raises(ValueError):
            index.upsert("a", lat, lng)
        with pytest.raises(ValueError):
            index.within(lat, lng, 10.0)
    for radius in [-1.0, math.nan]:
        with pytest.raises(ValueError):
            index.nearest_within(33.5, 126.5, radius, 1)
        with pytest.raises(ValueError):
            index.count_within(33.5, 126.5, radius)
    with pytest.raises(ValueError):
        index.nearest_within(33.5, 126.5, 10.0, -1)
    for lat0 in [90.0, -90.0, math.nan]:
        with pytest.raises(ValueError):
            LocalsIndex(lat0=lat0)

    assert index.position("a") == (33.5, 126.5)


# geo


def test_haversine_known_values() -> None:
    """One degree of meridian, a quarter meridian, and symmetry."""
    one_degree = EARTH_RADIUS_M * math.pi / 180

    assert haversine_m(33.5, 126.5, 33.5, 126.5) == 0.0
    assert one_degree == pytest.approx(haversine_m(33.0, 126.5, 34.0, 126.5), rel=1e-12)
    assert 90 * one_degree == pytest.approx(haversine_m(0.0, 10.0, 90.0, -70.0), rel=1e-12)
    assert 180 * one_degree == pytest.approx(haversine_m(0.0, 0.0, 0.0, 180.0), rel=1e-12)
    assert haversine_m(33.2, 126.3, 33.5, 126.9) == haversine_m(33.5, 126.9, 33.2, 126.3)


@pytest.mark.parametrize(("north_m", "east_m"), [(1500.0, 0.0), (0.0, -1500.0), (-2000.0, 1500.0), (0.0, 0.0)])
def test_offset_position_moves_that_far(north_m: float, east_m: float) -> None:
    """A step of a few km lands its length away (to centimetres), on the side asked."""
    lat, lng = offset_position(33.5, 126.5, north_m, east_m)

    assert haversine_m(33.5, 126.5, lat, lng) == pytest.approx(math.hypot(north_m, east_m), abs=0.1)
    assert (math.copysign(1, lat - 33.5), math.copysign(1, lng - 126.5)) == (
        math.copysign(1, north_m),
        math.copysign(1, east_m),
    )
    assert haversine_m(33.5, 126.5, lat, 126.5) == pytest.approx(abs(north_m), rel=1e-12)


@pytest.mark.parametrize(
    ("lat", "lng", "expected"),
    [
        (33.5, 126.5, True),
        (90, -180, True),
        (-90.0, 180.0, True),
        (0, 0, True),
        (math.nan, 0.0, False),
        (0.0, math.nan, False),
        (math.inf, 0.0, False),
        (0.0, -math.inf, False),
        (90.0001, 0.0, False),
        (-90.0001, 0.0, False),
        (0.0, 180.0001, False),
        (0.0, -180.0001, False),
        (True, 0.0, False),
    ],
)
def test_valid_lat_lng(lat: float, lng: float, expected: bool) -> None:
    """Finite, in range, and a real number."""
    assert expected == valid_lat_lng(lat, lng)


@settings(max_examples=500, deadline=None)
@given(lat=LATS, lng=LNGS)
def test_snap_position_precision_jeju(lat: float, lng: float) -> None:
    """A 100 m grid moves a point by at most half a cell diagonal (~70.7 m)."""
    snapped = snap_position(lat, lng)

    assert haversine_m(lat, lng, *snapped) <= 71.0
    assert snapped == snap_position(*snapped)


@settings(max_examples=300, deadline=None)
@given(
    lat=st.floats(-80, 80),
    lng=st.floats(-180, 180),
    precision=st.sampled_from([10.0, 100.0, 1_000.0]),
)
def test_snap_position_precision_anywhere(lat: float, lng: float, precision: float) -> None:
    """Away from the poles the bound holds for any cell size."""
    snapped = snap_position(lat, lng, precision)

    assert valid_lat_lng(*snapped)
    assert haversine_m(lat, lng, *snapped) <= precision / math.sqrt(2) * 1.001


def test_snap_position_is_a_grid() -> None:
    """Nearby points share a cell; cell rows are 100 m apart."""
    a = snap_position(33.50001, 126.50001)
    b = snap_position(33.50002, 126.50002)
    north = snap_position(33.50001 + 0.0009, 126.50001)

    assert a == b
    assert pytest.approx(haversine_m(a[0], 0.0, north[0], 0.0), rel=1e-9) == 100.0


def test_snap_position_edges() -> None:
    """Poles and the antimeridian still give valid positions."""
    assert snap_position(90.0, 123.0) == (90.0, 0.0)
    assert valid_lat_lng(*snap_position(0.0, 180.0))
    assert valid_lat_lng(*snap_position(0.0, -180.0))
    assert haversine_m(0.0, 179.9999, *snap_position(0.0, 179.9999)) <= 71.0
    with pytest.raises(ValueError):
        snap_position(math.nan, 0.0)
    with pytest.raises(ValueError):
        snap_position(0.0, 0.0, 0.0)


def test_nearest_within_stays_exact_when_density_changes_between_queries() -> None:
    """Queries alternate between a crowd and a sparse scatter, with and without excludes: always the brute force's answer."""
    rng = random.Random(7)
    model: dict[str, tuple[float, float]] = {}
    for i in range(300):  # a dense crowd (~1 km across) and a sparse scatter (~40 km)
        model[f"d{i:03d}"] = (33.50 + rng.uniform(-0.005, 0.005), 126.53 + rng.uniform(-0.006, 0.006))
        model[f"s{i:03d}"] = (33.35 + rng.uniform(-0.2, 0.2), 126.50 + rng.uniform(-0.25, 0.25))
    index = LocalsIndex()
    for uid, (lat, lng) in model.items():
        index.upsert(uid, lat, lng)
    places = [(33.50, 126.53), (33.35, 126.50), (33.501, 126.531), (33.2, 126.3), (33.50, 126.53)]
    for round_ in range(3):
        for lat, lng in places:
            for k, radius, exclude in ((12, 3000.0, frozenset()), (5, math.inf, frozenset({"d000", "s001"}))):
                expected = brute_within(model, lat, lng, radius, exclude)[:k]

                assert expected == index.nearest_within(lat, lng, radius, k, exclude), (round_, lat, lng, k)
