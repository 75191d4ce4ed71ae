"""Tests for dongne.core.trending.

Window convention under test: an event at ``t`` is in bucket
``k = t // bucket_ms`` and counts while ``t <= now < k * bucket_ms + window``;
for ``t`` on a bucket boundary that is exactly ``t <= now < t + window``.
"""

from __future__ import annotations

import json
from collections import Counter

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dongne.core.trending import DEFAULT_WINDOWS_MS, TrendingHashtags

MINUTE = 60_000
T0 = 28_333_333 * MINUTE  # on a minute boundary (late 2023)


@pytest.mark.parametrize("window", ["15m", "1h", "1d"])
def test_window_edges_on_a_bucket_boundary(window: str) -> None:
    """An event at t counts at t + window - 1 and not at t + window."""
    tr = TrendingHashtags()
    w = DEFAULT_WINDOWS_MS[window]
    tr.record("Udo", ["peanut"], T0)

    assert tr.top("Udo", window, T0 + w - 1) == [("peanut", 1)]
    assert tr.top(None, window, T0 + w - 1) == [("peanut", 1)]
    assert tr.top("Udo", window, T0 + w) == []
    assert tr.top(None, window, T0 + w) == []


@pytest.mark.parametrize("window", ["15m", "1h", "1d"])
def test_window_edges_inside_a_bucket(window: str) -> None:
    """An event mid-bucket leaves with its bucket, at bucket start + window."""
    tr = TrendingHashtags()
    w = DEFAULT_WINDOWS_MS[window]
    tr.record("Udo", ["peanut"], T0 + 59_999)

    assert tr.top("Udo", window, T0 + w - 1) == [("peanut", 1)]
    assert tr.top("Udo", window, T0 + w) == []


def test_windows_expire_one_after_another() -> None:
    """At each window's edge only that window drops the event."""
    tr = TrendingHashtags()
    tr.record(None, ["x"], T0)

    def counts(now: int) -> dict[str, int]:
        return {k: len(v) for k, v in tr.snapshot(None, now)["windows"].items()}

    assert counts(T0 + 900_000 - 1) == {"15m": 1, "1h": 1, "1d": 1}
    assert counts(T0 + 900_000) == {"15m": 0, "1h": 1, "1d": 1}
    assert counts(T0 + 3_600_000 - 1) == {"15m": 0, "1h": 1, "1d": 1}
    assert counts(T0 + 3_600_000) == {"15m": 0, "1h": 0, "1d": 1}
    assert counts(T0 + 86_400_000 - 1) == {"15m": 0, "1h": 0, "1d": 1}
    assert counts(T0 + 86_400_000) == {"15m": 0, "1h": 0, "1d": 0}


def test_exact_windows_with_1_ms_buckets() -> None:
    """bucket_ms=1 makes every window exact, whatever t."""
    tr = TrendingHashtags({"w": 1_000}, bucket_ms=1)
    tr.record("Udo", ["a"], 1_234_567)

    assert tr.top("Udo", "w", 1_234_567 + 999) == [("a", 1)]
    assert tr.top("Udo", "w", 1_234_567 + 1_000) == []


def test_per_region_and_overall() -> None:
    """A region sees its own tags; None sees every region and region-less events."""
    tr = TrendingHashtags()
    tr.record("Udo", ["peanut", "ferry"], T0)
    tr.record("Udo", ["ferry"], T0 + 1)
    tr.record("Jeju-si", ["airport", "ferry"], T0 + 2)
    tr.record(None, ["rain"], T0 + 3)

    assert tr.top("Udo", "1h", T0 + 3) == [("ferry", 2), ("peanut", 1)]
    assert tr.top("Jeju-si", "1h", T0 + 3) == [("airport", 1), ("ferry", 1)]
    assert tr.top("Hallim", "1h", T0 + 3) == []
    expected = [("ferry", 3), ("airport", 1), ("peanut", 1), ("rain", 1)]
    assert expected == tr.top(None, "1h", T0 + 3)


def test_order_limit_and_repeats() -> None:
    """Count desc then tag asc; n caps the list; a repeat within one record counts once."""
    tr = TrendingHashtags()
    tr.record("Udo", ["b", "b", "a"], T0)
    tr.record("Udo", ["c", "b"], T0)

    assert tr.top("Udo", "15m", T0, n=2) == [("b", 2), ("a", 1)]
    assert tr.top("Udo", "15m", T0, n=0) == []
    tr.record("Udo", [], T0)
    assert tr.top("Udo", "15m", T0) == [("b", 2), ("a", 1), ("c", 1)]


def test_buckets_expire_at_minute_edges() -> None:
    """Events in consecutive minutes leave the 15m window one minute at a time."""
    tr = TrendingHashtags()
    for i in range(3):
        tr.record("Udo", ["x", f"m{i}"], T0 + i * MINUTE + 30_000)

    edge = T0 + 15 * MINUTE
    assert tr.top("Udo", "15m", edge - 1, n=1) == [("x", 3)]
    assert tr.top("Udo", "15m", edge, n=1) == [("x", 2)]
    assert tr.top("Udo", "15m", edge + MINUTE) == [("m2", 1), ("x", 1)]
    assert tr.top("Udo", "15m", edge + 2 * MINUTE) == []
    assert tr.top("Udo", "1h", edge + 2 * MINUTE, n=1) == [("x", 3)]


def test_time_never_goes_back() -> None:
    """An earlier now is treated as the latest one seen; an earlier event counts in its own bucket."""
    tr = TrendingHashtags()
    tr.record("Udo", ["a"], T0)
    tr.top("Udo", "15m", T0 + 900_000)
    tr.record("Udo", ["b"], T0)  # asked at T0: out of the 15 minutes already, in the hour
    tr.record("Udo", ["c"], T0 + 899_999)
    tr.record("Udo", ["d"], T0 - 86_400_000)  # out of every window: not counted

    assert tr.top("Udo", "15m", T0) == [("c", 1)]
    assert tr.top("Udo", "1h", T0) == [("a", 1), ("b", 1), ("c", 1)]
    assert tr.top("Udo", "1d", T0) == [("a", 1), ("b", 1), ("c", 1)]
    assert tr.top("Udo", "1h", T0 + 3_600_000) == [("c", 1)]


def test_a_keyed_event_counts_once_and_can_be_forgotten() -> None:
    """A question counts once however often it is recorded; forgetting it takes it out of every window."""
    tr = TrendingHashtags()
    tr.record("Udo", ["peanut", "ferry"], T0, key="q1")
    tr.record("Udo", ["peanut", "ferry"], T0, key="q1")  # read back again: no second count
    tr.record("Udo", ["peanut"], T0 + MINUTE, key="q2")
    assert tr.top("Udo", "15m", T0 + MINUTE) == [("peanut", 2), ("ferry", 1)]

    tr.forget("q1")
    tr.forget("q1")  # twice: nothing more
    tr.forget("never-recorded")
    assert tr.top("Udo", "15m", T0 + MINUTE) == [("peanut", 1)]
    assert tr.top(None, "1d", T0 + MINUTE) == [("peanut", 1)]

    tr.record("Udo", ["peanut", "ferry"], T0, key="q1")  # unhidden: counts again, when it was asked
    assert tr.top("Udo", "15m", T0 + MINUTE) == [("peanut", 2), ("ferry", 1)]
    assert tr.top("Udo", "15m", T0 + 15 * MINUTE) == [("peanut", 1)]  # q1's minute has left the window


def test_keys_are_released_with_their_buckets() -> None:
    """A key is remembered while its bucket is in the longest window, not longer."""
    tr = TrendingHashtags()
    for i in range(200):
        tr.record("Udo", ["x"], T0 + i * MINUTE, key=f"q{i}")
    tr.top(None, "15m", T0 + 200 * MINUTE + 86_400_000)

    assert not tr._keys and not tr._buckets
    tr.forget("q3")  # long gone: nothing to take back
    assert tr.top(None, "1d", T0 + 200 * MINUTE + 86_400_000) == []


def test_memory_is_released() -> None:
    """Once a day has passed nothing is kept but the newest bucket reference."""
    tr = TrendingHashtags()
    for i in range(500):
        tr.record(f"r{i % 5}", [f"t{i % 37}"], T0 + i * 7_919)
    tr.top(None, "15m", T0 + 500 * 7_919 + 86_400_000)

    assert all(not w.buckets and not w.totals for w in tr._windows.values())


def test_snapshot_is_plain_data() -> None:
    """The snapshot maps every window to its top list and survives JSON and msgpack."""
    tr = TrendingHashtags()
    tr.record("Udo", ["peanut"], T0)
    snap = tr.snapshot("Udo", T0 + 1_000_000, n=3)

    assert snap == {"region": "Udo", "now_ms": T0 + 1_000_000,
            "windows": {"15m": [], "1h": [["peanut", 1]], "1d": [["peanut", 1]]}}  # fmt: skip
    assert snap == json.loads(json.dumps(snap)) == msgpack.unpackb(msgpack.packb(snap))


def test_bad_configuration() -> None:
    """Unknown windows raise KeyError; bad lengths raise ValueError."""
    with pytest.raises(KeyError):
        TrendingHashtags().top(None, "2h", T0)
    for windows, bucket in (({}, 60_000), ({"w": 90_000}, 60_000), ({"w": 0}, 1), ({"w": 5}, 0)):
        with pytest.raises(ValueError):
            TrendingHashtags(windows, bucket_ms=bucket)


def brute_top(
    events: list[tuple[int, str | None, list[str]]],
    region: str | None, window_ms: int, bucket_ms: int, now: int, n: int,
) -> list[tuple[str, int]]:  # fmt: skip
    counts: Counter[str] = Counter()
    for t, r, tags in events:
        in_window = t <= now < (t // bucket_ms) * bucket_ms + window_ms
        if in_window and (region is None or r == region):
            counts.update(set(tags))
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


REGIONS = st.sampled_from([None, "Udo", "Jeju-si", "Hallim"])
TAGS = st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f"]), max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([1, 5, 10]),
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 40), REGIONS, TAGS, st.integers(0, 7)),
        max_size=80,
    ),
)
def test_top_matches_brute_force_small(bucket_ms: int, ops: list[tuple[bool, int, str | None, list[str], int]]) -> None:
    """On small windows, top() equals a brute-force count of every event."""
    windows = {"a": 10, "b": 30, "c": 100}
    tr = TrendingHashtags(windows, bucket_ms=bucket_ms)
    events: list[tuple[int, str | None, list[str]]] = []
    now = 1_000_003
    for is_record, dt, region, tags, n in ops:
        now += dt
        if is_record:
            tr.record(region, tags, now)
            events.append((now, region, tags))
        else:
            for name, w in windows.items():
                assert brute_top(events, region, w, bucket_ms, now, n) == tr.top(region, name, now, n)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 3 * 3_600_000), REGIONS, TAGS),
        max_size=60,
    )
)
def test_top_matches_brute_force_default_windows(ops: list[tuple[bool, int, str | None, list[str]]]) -> None:
    """With the default minute buckets and windows, top() equals brute force."""
    tr = TrendingHashtags()
    events: list[tuple[int, str | None, list[str]]] = []
    now = T0 + 12_345
    for is_record, dt, region, tags in ops:
        now += dt
        if is_record:
            tr.record(region, tags, now)
            events.append((now, region, tags))
        else:
            for name, w in DEFAULT_WINDOWS_MS.items():
                assert brute_top(events, region, w, MINUTE, now, 10) == tr.top(region, name, now)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([1, 5, 10]),
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 40), st.integers(0, 120), REGIONS, TAGS, st.integers(0, 9)),
        max_size=80,
    ),
)
def test_late_and_forgotten_events_match_brute_force(
    bucket_ms: int, ops: list[tuple[int, int, int, str | None, list[str], int]]
) -> None:
    """Events recorded late (in their own bucket) and forgotten by key: top() equals brute force.

    Op kinds: 0 records now, 1 records ``back`` ms before now, both under key ``k``; 2 forgets key ``k``;
    3 compares every window (top ``k``).
    """
    windows = {"a": 10, "b": 30, "c": 100}
    longest = max(windows.values())
    tr = TrendingHashtags(windows, bucket_ms=bucket_ms)
    keyed: dict[int, tuple[int, str | None, list[str]]] = {}  # what each key counts for
    now = 1_000_003
    latest = 0  # the latest time the tracker was given
    for kind, dt, back, region, tags, k in ops:
        now += dt
        if kind in (0, 1):
            t = now - back if kind == 1 else now
            latest = max(latest, t)
            tr.record(region, tags, t, key=k)
            held = keyed.get(k)
            if held is None or latest >= (held[0] // bucket_ms) * bucket_ms + longest:  # else counted already
                keyed[k] = (t, region, tags)
        elif kind == 2:
            latest = now
            tr.record(None, [], now)  # time moves on with the forget's caller
            tr.forget(k)
            keyed.pop(k, None)
        else:
            latest = now
            for name, w in windows.items():
                assert brute_top(list(keyed.values()), region, w, bucket_ms, now, k) == tr.top(region, name, now, k)
