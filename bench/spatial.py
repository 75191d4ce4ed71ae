"""Benchmark LocalsIndex against a brute-force haversine scan.

For each size, seeded random users are spread uniformly over Jeju (lat
33.1-33.6, lng 126.1-127.0). Per repeat it measures:

* per-query time of ``nearest_within(k=10, radius 5 km)`` from random points;
* per-query time of a pure-Python brute-force haversine scan (fewer queries
  at large sizes), and whether every index answer equals the brute-force one
  (checked for every query, timed or not);
* moves per second: ``upsert`` of existing users to a position up to ~200 m
  away.

Query times are the median per-query time of a repeat (means are in the
JSON too); the table shows the median over the repeats of each figure, and
the worst exactness seen. Exit status 1 if any answer was not exact.

Usage::

    python bench/spatial.py [--sizes 1000,10000,100000] [--queries N]
                            [--repeat R] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from dongne.core.geo import haversine_m
from dongne.core.spatial import LocalsIndex

LAT_RANGE = (33.1, 33.6)
LNG_RANGE = (126.1, 127.0)
K = 10
RADIUS_M = 5_000.0
MOVE_DEG = 0.002  # ~200 m north-south, ~190 m east-west at Jeju
BRUTE_BUDGET = 2_000_000  # point-distance evaluations per repeat, at most
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "spatial.json"


def brute_nearest(
    points: dict[str, tuple[float, float]], lat: float, lng: float, radius_m: float, k: int
) -> list[tuple[str, float]]:
    """The reference: haversine to every user, filter, sort, cut."""
    hits = []
    for uid, (plat, plng) in points.items():
        dist = haversine_m(lat, lng, plat, plng)
        if dist <= radius_m:
            hits.append((uid, dist))
    hits.sort(key=lambda hit: (hit[1], hit[0]))
    return hits[:k]


def random_point(rnd: random.Random) -> tuple[float, float]:
    return rnd.uniform(*LAT_RANGE), rnd.uniform(*LNG_RANGE)


def run_once(size: int, queries: int, seed: int) -> dict[str, float]:
    """One repeat at one size; returns per-query times, exactness, move rate."""
    rnd = random.Random(seed)
    points = {f"user-{i}": random_point(rnd) for i in range(size)}
    index = LocalsIndex()
    for uid, (lat, lng) in points.items():
        index.upsert(uid, lat, lng)
    query_points = [random_point(rnd) for _ in range(queries)]

    answers = []
    index_times = []
    for lat, lng in query_points:
        start = time.perf_counter()
        answers.append(index.nearest_within(lat, lng, RADIUS_M, K))
        index_times.append(time.perf_counter() - start)

    brute_n = max(3, min(queries, BRUTE_BUDGET // size))
    expected = []
    brute_times = []
    for lat, lng in query_points[:brute_n]:
        start = time.perf_counter()
        expected.append(brute_nearest(points, lat, lng, RADIUS_M, K))
        brute_times.append(time.perf_counter() - start)
    # Exactness is checked on every query, timed or not.
    for lat, lng in query_points[brute_n:]:
        expected.append(brute_nearest(points, lat, lng, RADIUS_M, K))
    exact = sum(a == e for a, e in zip(answers, expected, strict=True))

    uids = list(points)
    moves = []
    for _ in range(max(10_000, min(size, 50_000))):
        uid = rnd.choice(uids)
        lat, lng = points[uid]
        lat = min(max(lat + rnd.uniform(-MOVE_DEG, MOVE_DEG), -90.0), 90.0)
        lng = lng + rnd.uniform(-MOVE_DEG, MOVE_DEG)
        points[uid] = (lat, lng)
        moves.append((uid, lat, lng))
    start = time.perf_counter()
    for uid, lat, lng in moves:
        index.upsert(uid, lat, lng)
    moves_per_s = len(moves) / (time.perf_counter() - start)

    # After the moves, the index must still agree with the scan.
    lat, lng = query_points[0]
    moved_exact = index.nearest_within(lat, lng, RADIUS_M, K) == brute_nearest(points, lat, lng, RADIUS_M, K)
    # Per-query medians: robust to the odd preemption on a busy machine.
    index_s = statistics.median(index_times)
    brute_s = statistics.median(brute_times)
    return {
        "index_us": index_s * 1e6,
        "index_mean_us": statistics.fmean(index_times) * 1e6,
        "brute_us": brute_s * 1e6,
        "brute_mean_us": statistics.fmean(brute_times) * 1e6,
        "brute_queries": brute_n,
        "exact_pct": 100.0 * exact / queries if moved_exact else 0.0,
        "speedup": brute_s / index_s,
        "speedup_of_means": statistics.fmean(brute_times) / statistics.fmean(index_times),
        "moves_per_s": moves_per_s,
        "mean_hits": statistics.fmean(len(a) for a in answers),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--seed", type=int, default=20240601)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]

    results: list[dict[str, Any]] = []
    header = (
        f"{'users':>8} {'index us/q':>11} {'brute us/q':>11} {'brute n':>8} "
        f"{'speed-up':>9} {'(means)':>8} {'exact %':>8} {'moves/s':>9} {'hits':>5}"
    )
    print(f"nearest_within(k={K}, radius={RADIUS_M:.0f} m), median of {args.repeat}")
    print(header)
    print("-" * len(header))
    for size in sizes:
        runs = [run_once(size, args.queries, args.seed + 1000 * r + size) for r in range(args.repeat)]
        row: dict[str, Any] = {"size": size, "queries": args.queries, "repeat": args.repeat}
        for key in runs[0]:
            row[key] = statistics.median(run[key] for run in runs)
        row["exact_pct_min"] = min(run["exact_pct"] for run in runs)
        results.append(row)
        print(
            f"{size:>8} {row['index_us']:>11.1f} {row['brute_us']:>11.0f} "
            f"{row['brute_queries']:>8.0f} {row['speedup']:>8.0f}x "
            f"{row['speedup_of_means']:>7.0f}x "
            f"{row['exact_pct_min']:>8.1f} {row['moves_per_s']:>9.0f} {row['mean_hits']:>5.1f}"
        )

    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "spatial",
        "k": K,
        "radius_m": RADIUS_M,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "results": results,
    }
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")
    ok = all(row["exact_pct_min"] == 100.0 for row in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
