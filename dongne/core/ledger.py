"""The alert ledger: each user's alerts over a sliding hour, for the hourly caps."""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable

import attrs

from .directory import Target
from .stages import _HOUR_MS, MAX_ALERTS_PER_HOUR_LIMIT

# ---------------------------------------------------------------------------
# Alert ledger
# ---------------------------------------------------------------------------


@attrs.frozen
class AlertLedgerStatistics:
    """A snapshot of an :class:`AlertLedger`.

    Attributes:
        users: Users with at least one alert kept.
        alerts: Alert times kept, over all users.
    """

    users: int
    alerts: int


class AlertLedger:
    """When each user was last alerted, over a sliding window.

    :meth:`count_last_hour` counts alerts at times ``t`` with ``now_ms -
    window_ms < t``: an alert at ``t0`` stops counting at exactly ``t0 +
    window_ms``.

    Resource handling: memory is bounded by the alerts of the last window.
    Every :meth:`record` drops that user's expired times and every user whose
    newest alert has expired (users are kept in order of their newest alert,
    so this sweep is amortized O(1)), and keeps at most
    :data:`MAX_ALERTS_PER_HOUR_LIMIT` times per user, enough for exact counts
    against every valid cap. Times are expected not to go backwards (the
    engine's clock); a step back is tolerated and only delays pruning.

    Args:
        window_ms: Length of the sliding window; one hour by default.

    Raises:
        ValueError: If ``window_ms`` is not a positive integer.
    """

    def __init__(self, window_ms: int = _HOUR_MS) -> None:
        if not isinstance(window_ms, int) or isinstance(window_ms, bool) or window_ms <= 0:
            raise ValueError(f"window_ms must be a positive integer, got {window_ms!r}")
        self._window_ms = window_ms
        # user id -> sorted alert times; ordered by each user's newest time.
        self._times: OrderedDict[str, list[int]] = OrderedDict()

    @property
    def window_ms(self) -> int:
        """How far back alerts count against a cap (ms)."""
        return self._window_ms

    def count_last_hour(self, user_id: str, now_ms: int) -> int:
        """Count a user's alerts in the window ending at ``now_ms``.

        Does not modify the ledger.

        Args:
            user_id: The user.
            now_ms: The current time, in milliseconds.

        Returns:
            The number of alerts within the window (capped at
            :data:`MAX_ALERTS_PER_HOUR_LIMIT`).
        """
        times = self._times.get(user_id)
        if not times:
            return 0
        return len(times) - bisect.bisect_right(times, now_ms - self._window_ms)

    def window(self, now_ms: int) -> tuple[Callable[[str], list[int] | None], int]:
        """``(times_of, cutoff)``: a user's kept alert times (sorted; may include expired ones) and the window's start.

        A user has room under ``cap`` when fewer than ``cap`` of their times
        are after ``cutoff`` (:meth:`room_checker`'s rule); the planner
        inlines that check in its per-candidate rule.
        """
        return self._times.get, now_ms - self._window_ms

    def room_again_at(self, user_id: str, cap: int) -> float:
        """When a user has room under ``cap`` again if no more alerts come: ``-inf`` if they have it whenever, ``inf`` never.

        ``has_room`` at ``now_ms`` is then exactly ``now_ms >= room_again_at``:
        the cap-th newest alert leaves the window ``window_ms`` after it was sent.
        """
        if cap <= 0:
            return math.inf
        times = self._times.get(user_id)
        if not times or len(times) < cap:
            return -math.inf
        return float(times[-cap] + self._window_ms)

    def room_checker(self, now_ms: int) -> Callable[[str, int], bool]:
        """``has_room(user_id, cap)``: ``count_last_hour(user_id, now_ms) < cap``, for many users at one moment."""
        times_of = self._times.get
        cutoff = now_ms - self._window_ms
        bisect_right = bisect.bisect_right

        def has_room(user_id: str, cap: int) -> bool:
            if cap <= 0:
                return False
            times = times_of(user_id)
            if not times or len(times) < cap:
                return True  # fewer alerts kept than the cap, expired or not
            return len(times) - bisect_right(times, cutoff) < cap

        return has_room

    def record_alert(self, user_id: str, now_ms: int) -> None:
        """Record one alert sent to a user.

        Args:
            user_id: The user.
            now_ms: When it was sent, in milliseconds.
        """
        self._add(user_id, now_ms)
        self.prune(now_ms)

    def record(self, targets: Iterable[Target], now_ms: int) -> None:
        """Record an alert for every target, as sent at ``now_ms``.

        Args:
            targets: What :func:`plan_stage` returned (and was sent).
            now_ms: When they were sent, in milliseconds.
        """
        self.record_users((target.user_id for target in targets), now_ms)

    def record_users(self, user_ids: Iterable[str], now_ms: int) -> None:
        """Record an alert for every user, as sent at ``now_ms`` (:meth:`record` by user id).

        Args:
            user_ids: The users alerted.
            now_ms: When they were sent, in milliseconds.
        """
        for user_id in user_ids:
            self._add(user_id, now_ms)
        self.prune(now_ms)

    def unrecord(self, user_id: str, at_ms: int) -> None:
        """Take back one alert recorded for a user at ``at_ms`` that was not sent after all (nothing if the
        ledger no longer holds it)."""
        times = self._times.get(user_id)
        if not times:
            return
        i = bisect.bisect_left(times, at_ms)
        if i < len(times) and times[i] == at_ms:
            del times[i]
            if not times:
                del self._times[user_id]

    def _add(self, user_id: str, now_ms: int) -> None:
        times = self._times.get(user_id)
        if times is None:
            times = self._times[user_id] = []
        if not times or now_ms >= times[-1]:
            times.append(now_ms)
            self._times.move_to_end(user_id)
        else:
            bisect.insort(times, now_ms)
        expired = bisect.bisect_right(times, now_ms - self._window_ms)
        if expired:
            del times[:expired]
        if len(times) > MAX_ALERTS_PER_HOUR_LIMIT:
            del times[: len(times) - MAX_ALERTS_PER_HOUR_LIMIT]

    def prune(self, now_ms: int) -> None:
        """Forget users whose newest alert is outside the window.

        Args:
            now_ms: The current time, in milliseconds.
        """
        horizon = now_ms - self._window_ms
        times = self._times
        while times:
            user_id = next(iter(times))
            if times[user_id][-1] > horizon:
                break
            del times[user_id]

    def statistics(self) -> AlertLedgerStatistics:
        """Return a snapshot of the ledger's size.

        Returns:
            An :class:`AlertLedgerStatistics`.
        """
        return AlertLedgerStatistics(users=len(self._times), alerts=sum(len(t) for t in self._times.values()))
