"""Trending hashtags per region over several sliding windows.

Theory of operation
-------------------

:class:`TrendingHashtags` is a sans-I/O counter fed ``record`` calls with the
event's own time. Time only moves forward: a query's ``now_ms`` below the
latest one seen is treated as the latest one seen, and an event earlier than
it counts in its own bucket while a window holds that bucket (a question read
back at start-up, or unhidden, counts when it was asked).

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
region and overall. A new bucket is appended to every window's deque (one for
an earlier event is inserted in its place, in the windows that hold it); when
a bucket falls out of a window it is popped from that window's deque and
subtracted from its totals. Work is thus O(expired buckets) amortised, and
memory is bounded by the largest window's buckets and the tags in them.

An event recorded with a *key* (a question id) counts once, and ``forget``
takes it back from its bucket and every window holding it (a deleted or
hidden question); the key is remembered until its bucket leaves the longest
window.

Tags are counted as given (normalise them upstream); a tag repeated within
one ``record`` counts once. Events with ``region=None`` count only overall.
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter, deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
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
    keyed: dict[Hashable, tuple[str | None, list[str]]] = attrs.Factory(dict)  # what each key counted here


@attrs.define
class _Window:
    span: int  # in buckets
    buckets: deque[_Bucket] = attrs.Factory(deque)
    totals: dict[object, Counter[str]] = attrs.Factory(dict)

    def holds(self, index: int, current: int) -> bool:
        return index > current - self.span

    def insert(self, bucket: _Bucket) -> None:
        """Take a bucket in index order (a new one goes last; one for an earlier event, in its place)."""
        buckets = self.buckets
        if not buckets or buckets[-1].index < bucket.index:
            buckets.append(bucket)
        else:
            buckets.insert(bisect.bisect_left(buckets, bucket.index, key=lambda b: b.index), bucket)

    def add(self, region: str | None, tags: Iterable[str]) -> None:
        for key in (_ALL,) if region is None else (_ALL, region):
            self.totals.setdefault(key, Counter()).update(tags)

    def subtract(self, region: str | None, counts: Mapping[str, int]) -> None:
        for key in (_ALL,) if region is None else (_ALL, region):
            total = self.totals[key]
            for tag, count in counts.items():
                total[tag] -= count
                if total[tag] <= 0:
                    del total[tag]
            if not total:
                del self.totals[key]

    def expire(self, current: int) -> list[_Bucket]:
        gone = []
        while self.buckets and not self.holds(self.buckets[0].index, current):
            bucket = self.buckets.popleft()
            for region, counts in bucket.counts.items():
                self.subtract(region, counts)
            gone.append(bucket)
        return gone


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
        self._longest = max(self._windows.values(), key=lambda w: w.span)
        self._now: int | None = None
        # Every bucket the longest window holds, by index; and the bucket of every key recorded in one.
        self._buckets: dict[int, _Bucket] = {}
        self._keys: dict[Hashable, int] = {}

    def _advance(self, now_ms: int) -> int:
        if self._now is None or now_ms > self._now:
            self._now = now_ms
        current = self._now // self.bucket_ms
        for window in self._windows.values():
            gone = window.expire(current)
            if window is self._longest:
                for bucket in gone:
                    del self._buckets[bucket.index]
                    for key in bucket.keyed:
                        del self._keys[key]
        return current

    def record(self, region: str | None, hashtags: Sequence[str], at_ms: int, key: Hashable | None = None) -> None:
        """Count one use of each distinct tag in ``hashtags`` at ``at_ms``.

        An event earlier than the latest time seen counts in its own bucket,
        in the windows that still hold it (none: it is not counted).

        Args:
            region: Where it happened; ``None`` counts only towards all regions.
            hashtags: The tags; repeats within the call count once.
            at_ms: When it happened, in ms since the epoch.
            key: What the event is (a question id), so that it counts once
                and :meth:`forget` can take it back; while its bucket is held,
                a second record with the same key is ignored.
        """
        current = self._advance(at_ms)
        if key is not None and key in self._keys:
            return
        index = at_ms // self.bucket_ms
        if not self._longest.holds(index, current):
            return
        tags = list(dict.fromkeys(hashtags))
        bucket = self._buckets.get(index)
        if bucket is None:
            # One bucket object, shared by every window's deque that holds it.
            bucket = self._buckets[index] = _Bucket(index)
            for window in self._windows.values():
                if window.holds(index, current):
                    window.insert(bucket)
        if key is not None:
            bucket.keyed[key] = (region, tags)
            self._keys[key] = index
        if not tags:
            return
        bucket.counts.setdefault(region, Counter()).update(tags)
        for window in self._windows.values():
            if window.holds(index, current):
                window.add(region, tags)

    def forget(self, key: Hashable) -> None:
        """Take back what :meth:`record` counted for ``key``; nothing if it was not counted or has left every window."""
        index = self._keys.pop(key, None)
        if index is None:
            return
        bucket = self._buckets[index]
        region, tags = bucket.keyed.pop(key)
        if not tags:
            return
        counts = bucket.counts[region]
        counts.subtract(tags)
        for tag in tags:
            if counts[tag] <= 0:
                del counts[tag]
        if not counts:
            del bucket.counts[region]
        current = (self._now or 0) // self.bucket_ms
        for window in self._windows.values():
            if window.holds(index, current):
                window.subtract(region, dict.fromkeys(tags, 1))

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
