"""Trending hashtags per region over several sliding windows.

Theory of operation
-------------------

:class:`TrendingHashtags` is a sans-I/O counter fed ``record`` calls with an
explicit ``now_ms``. Time only moves forward: a ``now_ms`` below the latest
one seen is treated as the latest one seen.

Counts are kept in *buckets* of ``bucket_ms`` (a minute by default), never per
event, so a day's window costs at most 1,440 buckets whatever the traffic.

*Window convention:* an event at ``t`` lies in bucket ``k = t // bucket_ms``.
At ``now``, a window of ``w`` ms covers the ``w // bucket_ms`` buckets ending
with the current one, i.e. the event counts iff ``t <= now`` and
``now < k * bucket_ms + w``. For an event on a bucket boundary that is exactly
``t <= now < t + w``; otherwise the event leaves the window up to
``bucket_ms - 1`` ms early (the usual price of bucketing). Pass
``bucket_ms=1`` for exact windows.

Every window keeps its own deque of (shared) buckets and running totals per
region and overall. A new bucket is appended to every window's deque; when a
bucket falls out of a window it is popped from that window's deque and
subtracted from its totals. Work is thus O(expired buckets) amortised, and
memory is bounded by the largest window's buckets and the tags in them.

Tags are counted as given (normalise them upstream); a tag repeated within
one ``record`` counts once. Events with ``region=None`` count only overall.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

__all__ = ["DEFAULT_WINDOWS_MS", "TrendingHashtags"]

#: The default windows: name to length in ms.
DEFAULT_WINDOWS_MS: Mapping[str, int] = {"15m": 900_000, "1h": 3_600_000, "1d": 86_400_000}

# Key of the all-regions totals; distinct from every region name.
_ALL = object()


@attrs.define
class _Bucket:
    index: int
    counts: dict[str | None, Counter[str]] = attrs.Factory(dict)


@attrs.define
class _Window:
    span: int  # in buckets
    buckets: deque[_Bucket] = attrs.Factory(deque)
    totals: dict[object, Counter[str]] = attrs.Factory(dict)

    def add(self, region: str | None, tags: Sequence[str]) -> None:
        for key in (_ALL,) if region is None else (_ALL, region):
            self.totals.setdefault(key, Counter()).update(tags)

    def expire(self, current: int) -> None:
        while self.buckets and self.buckets[0].index <= current - self.span:
            for region, counts in self.buckets.popleft().counts.items():
                for key in (_ALL,) if region is None else (_ALL, region):
                    total = self.totals[key]
                    for tag, count in counts.items():
                        total[tag] -= count
                        if total[tag] == 0:
                            del total[tag]
                    if not total:
                        del self.totals[key]


class TrendingHashtags:
    """Hashtag counts per region over named sliding windows.

    Args:
        windows_ms: Window name to length in ms; each a positive multiple of
            ``bucket_ms``. Copied.
        bucket_ms: Bucket length in ms; positive. Sets the time resolution.

    Raises:
        ValueError: No windows, or a bad window or bucket length.
    """

    def __init__(self, windows_ms: Mapping[str, int] = DEFAULT_WINDOWS_MS, bucket_ms: int = 60_000) -> None:
        if bucket_ms <= 0:
            raise ValueError(f"bucket_ms must be positive, got {bucket_ms!r}")
        if not windows_ms:
            raise ValueError("at least one window is needed")
        for name, w in windows_ms.items():
            if w <= 0 or w % bucket_ms:
                raise ValueError(f"window {name!r}: {w!r} is not a positive multiple of {bucket_ms}")
        self.bucket_ms = bucket_ms
        self.windows_ms: Mapping[str, int] = dict(windows_ms)
        self._windows = {name: _Window(w // bucket_ms) for name, w in windows_ms.items()}
        self._now: int | None = None
        self._newest: _Bucket | None = None

    def _advance(self, now_ms: int) -> int:
        if self._now is None or now_ms > self._now:
            self._now = now_ms
        current = self._now // self.bucket_ms
        for window in self._windows.values():
            window.expire(current)
        return current

    def record(self, region: str | None, hashtags: Sequence[str], now_ms: int) -> None:
        """Count one use of each distinct tag in ``hashtags`` at ``now_ms``.

        Args:
            region: Where it happened; ``None`` counts only towards all regions.
            hashtags: The tags; repeats within the call count once.
            now_ms: The time, in ms since the epoch.
        """
        current = self._advance(now_ms)
        tags = list(dict.fromkeys(hashtags))
        if not tags:
            return
        bucket = self._newest
        if bucket is None or bucket.index != current:
            # One bucket object, shared by every window's deque.
            bucket = self._newest = _Bucket(current)
            for window in self._windows.values():
                window.buckets.append(bucket)
        bucket.counts.setdefault(region, Counter()).update(tags)
        for window in self._windows.values():
            window.add(region, tags)

    def top(self, region: str | None, window: str, now_ms: int, n: int = 10) -> list[tuple[str, int]]:
        """Return the ``n`` most used tags: count descending, then tag ascending.

        Args:
            region: A region name, or ``None`` for all regions together.
            window: A window name from :attr:`windows_ms`.
            now_ms: The time, in ms since the epoch.
            n: How many tags at most.

        Returns:
            ``(tag, count)`` pairs, every count positive.

        Raises:
            KeyError: Unknown window name.
        """
        win = self._windows[window]
        self._advance(now_ms)
        totals = win.totals.get(_ALL if region is None else region, Counter())
        return heapq.nsmallest(n, totals.items(), key=lambda kv: (-kv[1], kv[0]))

    def snapshot(self, region: str | None, now_ms: int, n: int = 10) -> dict[str, Any]:
        """Return every window's top tags as plain data (JSON and msgpack ready).

        Returns:
            ``{"region": region, "now_ms": ..., "windows": {name: [[tag, count], ...]}}``.
        """
        windows = {name: [[*kv] for kv in self.top(region, name, now_ms, n)] for name in self._windows}
        return {"region": region, "now_ms": self._now, "windows": windows}
