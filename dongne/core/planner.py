"""The planner: a stage's targets, nearest first, under every user's rules."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Set

from .directory import LocalInfo, QuestionBrief, Target
from .geo import haversine_m
from .ledger import AlertLedger
from .spatial import LocalsIndex
from .stages import _HOUR_MS, KST_UTC_OFFSET_MINUTES, PRIORITY_CRITICAL, PRIORITY_HIGH, PRIORITY_NORMAL, StagePlan

#: One user a stage alerts: ``(user_id, distance_m, online)``, as in :class:`Target`.
Hit = tuple[str, float | None, bool]

# ---------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------


def in_quiet_hours(
    quiet_hours: tuple[int, int] | None, now_ms: int, utc_offset_minutes: int = KST_UTC_OFFSET_MINUTES
) -> bool:
    """Tell whether ``now_ms`` falls in a quiet-hours window.

    Args:
        quiet_hours: ``(start_hour, end_hour)`` local time, ``[start, end)``,
            wrapping midnight when ``start > end``; ``None`` for none.
        now_ms: Unix time in milliseconds.
        utc_offset_minutes: The region's offset from UTC (540 for Korea).

    Returns:
        ``True`` inside the window.
    """
    if quiet_hours is None:
        return False
    return _hour_in_window(quiet_hours, _local_hour(now_ms, utc_offset_minutes))


def _local_hour(now_ms: int, utc_offset_minutes: int) -> int:
    # Floor division keeps this right before 1970 and for negative offsets.
    return ((now_ms + utc_offset_minutes * 60_000) // _HOUR_MS) % 24


def _hour_in_window(quiet_hours: tuple[int, int], hour: int) -> bool:
    start, end = quiet_hours
    if start < end:
        return start <= hour < end
    return hour >= start or hour < end


class _Planner:
    """The per-call state of :func:`plan_stage`: the shared eligibility rule."""

    def __init__(
        self,
        stage: StagePlan,
        question: QuestionBrief,
        locals_: Mapping[str, LocalInfo],
        notified: Set[str],
        ledger: AlertLedger,
        now_ms: int,
        utc_offset_minutes: int,
    ) -> None:
        self.stage = stage
        self.question = question
        self.locals = locals_
        self.notified = notified
        self.ledger = ledger
        self.now_ms = now_ms
        self.utc_offset_minutes = utc_offset_minutes
        self.urgent = question.urgency == "urgent"
        # Computed once: the directory stages call eligible() per local.
        self.local_hour = _local_hour(now_ms, utc_offset_minutes)

        self.eligible = self.rule()

    def rule(self, online: Set[str] | None = None) -> Callable[[str], bool]:
        """Every rule that does not depend on the audience (and, given ``online``, being online).

        A closure over what is fixed for the call: a stage checks it for every
        local in reach (a million times in the escalation bench's 30 s), so
        it is one function call with its lookups bound, the ledger's check
        (``AlertLedger.room_checker``) included, not five.
        """
        asker = self.question.asker_id
        notified = self.notified
        local_info = self.locals.get
        requires_immediate = self.stage.requires_immediate_alerts
        check_quiet = not self.urgent
        hour = self.local_hour
        cap_for = self.stage.cap_for
        caps: dict[int, int] = {}  # a user's max_alerts_per_hour -> this stage's cap
        times_of, cutoff = self.ledger.window(self.now_ms)
        bisect_right = bisect.bisect_right

        def eligible(user_id: str) -> bool:
            if (online is not None and user_id not in online) or user_id == asker or user_id in notified:
                return False
            info = local_info(user_id)
            if info is None:
                return False
            settings = info.settings
            if requires_immediate and not settings.immediate_alerts:
                return False
            quiet = settings.quiet_hours
            if quiet is not None and check_quiet and _hour_in_window(quiet, hour):
                return False
            limit = settings.max_alerts_per_hour
            cap = caps.get(limit)
            if cap is None:
                cap = caps[limit] = cap_for(limit)
            if cap <= 0:
                return False
            # AlertLedger.room_checker's rule: fewer alerts in the window than the cap.
            times = times_of(user_id)
            if not times or len(times) < cap:
                return True
            return len(times) - bisect_right(times, cutoff) < cap

        return eligible


def _plan_online_nearby(
    p: _Planner, live: LocalsIndex, online: Set[str], radius_m: float, limit: int | None
) -> list[Hit]:
    q = p.question
    # The rule already refuses the asker and those notified; the index is
    # told too, so that they do not take places among the k nearest.
    keep = p.rule(online)
    if limit is not None:
        # The common case: the nearest few are eligible. Ask for twice the limit.
        k = 2 * limit
        exclude = set(p.notified)
        exclude.add(q.asker_id)
        hits = live.nearest_within(q.lat, q.lng, radius_m, k, exclude)
        chosen: list[Hit] = []
        for uid, dist in hits:
            if keep(uid):
                chosen.append((uid, dist, True))
                if len(chosen) == limit:
                    return chosen
        if len(hits) < k:
            return chosen  # Everyone within the radius has been seen.
        # Many are skipped (alerts off, quiet hours, at their hourly cap): one
        # pass over everyone within the radius, nearest first, costs less than
        # growing k query after query (measured: 7.7 ms a stage with most
        # locals capped).
    found = live.within_by_distance(q.lat, q.lng, radius_m, keep=keep)
    return [(uid, dist, True) for dist, uid in found[:limit]]


def _plan_nearby(
    p: _Planner,
    live: LocalsIndex,
    online: Set[str],
    homes: LocalsIndex | None,
    radius_m: float,
    limit: int | None,
    awake_at: int | None,
) -> list[Hit]:
    q = p.question
    # Eligibility first: it does not depend on the distance, and in a busy
    # area most locals within reach are at their hourly cap.
    eligible = p.eligible
    live_hits = live.within_by_distance(q.lat, q.lng, radius_m, keep=p.rule(online), awake_at=awake_at)
    offline: list[tuple[float, str]]
    if homes is not None:
        offline = homes.within_by_distance(q.lat, q.lng, radius_m, keep=lambda uid: uid not in online and eligible(uid))
    else:
        offline = []
        for uid, info in p.locals.items():
            if info.home is None or uid in online or not eligible(uid):
                continue
            dist = haversine_m(q.lat, q.lng, info.home[0], info.home[1])
            if dist <= radius_m:
                offline.append((dist, uid))
        offline.sort()
    if not offline:  # Everyone in reach is online (the escalation bench): already in order.
        chosen = live_hits if limit is None else live_hits[:limit]
        return [(uid, dist, True) for dist, uid in chosen]
    candidates = [(dist, uid, True) for dist, uid in live_hits]
    candidates.extend((dist, uid, False) for dist, uid in offline)
    candidates.sort()  # By distance, then id (ids are unique).
    if limit is not None:
        del candidates[limit:]
    return [(uid, dist, is_online) for dist, uid, is_online in candidates]


def _plan_directory(
    p: _Planner, live: LocalsIndex, online: Set[str], tags: frozenset[str] | None, limit: int | None
) -> list[Hit]:
    q = p.question
    located: list[tuple[float, str, bool]] = []
    unlocated: list[tuple[str, bool]] = []
    for uid, info in p.locals.items():
        if tags is not None and info.tags.isdisjoint(tags):
            continue
        if not p.eligible(uid):
            continue
        is_online = uid in online
        pos = live.position(uid) if is_online else info.home
        if pos is None:
            unlocated.append((uid, is_online))
        else:
            located.append((haversine_m(q.lat, q.lng, pos[0], pos[1]), uid, is_online))
    located.sort()
    unlocated.sort()
    out: list[Hit] = [(uid, dist, is_online) for dist, uid, is_online in located]
    out.extend((uid, None, is_online) for uid, is_online in unlocated)
    if limit is not None:
        del out[limit:]
    return out


def alert_style(stage: StagePlan, question: QuestionBrief) -> tuple[str, str, str]:
    """``(priority, sound, vibration)`` of every alert of a stage about a question (the table in ``escalation``)."""
    if question.urgency == "urgent":
        return PRIORITY_CRITICAL, "urgent", "strong"
    if stage.priority == "high":
        return PRIORITY_HIGH, "urgent", "strong"
    return PRIORITY_NORMAL, "normal", "light"


def plan_stage(
    stage: StagePlan,
    question: QuestionBrief,
    *,
    live: LocalsIndex,
    locals: Mapping[str, LocalInfo],
    online: Set[str],
    notified: Set[str],
    ledger: AlertLedger,
    now_ms: int,
    utc_offset_minutes: int = KST_UTC_OFFSET_MINUTES,
    homes: LocalsIndex | None = None,
) -> list[Target]:
    """Decide whom one escalation stage notifies.

    Pure: reads its arguments, mutates none of them. The caller sends the
    notifications, adds the targets to ``notified`` and calls
    ``ledger.record(targets, now_ms)``.

    Args:
        stage: The stage to plan.
        question: The question being escalated.
        live: Live positions of online locals.
        locals: Every verified local, by user id; users absent from it are
            never notified.
        online: Ids of users currently online. Online users are located by
            ``live`` only (an online user missing from ``live`` has no
            position); offline users by their ``home``.
        notified: Users already notified for this question.
        ledger: Recent alerts, for the hourly caps.
        now_ms: Unix time in milliseconds.
        utc_offset_minutes: The region's UTC offset, for quiet hours.
        homes: Optional index of locals' home positions (by user id). When
            given, ``nearby`` stages query it instead of scanning ``locals``;
            answers are identical.

    Returns:
        The targets, in order: ``online_nearby`` and ``nearby`` nearest first
        (ties by user id); ``experts`` and ``everyone`` those with a position
        nearest first, then those without one by user id. At most
        ``stage.limit`` of them; empty if ``stage.only_if_unanswered`` and
        the question is answered.
    """
    priority, sound, vibration = alert_style(stage, question)
    return [
        Target(
            user_id=uid,
            distance_m=dist,
            online=is_online,
            stage=stage.name,
            priority=priority,
            sound=sound,
            vibration=vibration,
        )
        for uid, dist, is_online in plan_hits(
            stage,
            question,
            live=live,
            locals=locals,
            online=online,
            notified=notified,
            ledger=ledger,
            now_ms=now_ms,
            utc_offset_minutes=utc_offset_minutes,
            homes=homes,
        )
    ]


def plan_hits(
    stage: StagePlan,
    question: QuestionBrief,
    *,
    live: LocalsIndex,
    locals: Mapping[str, LocalInfo],
    online: Set[str],
    notified: Set[str],
    ledger: AlertLedger,
    now_ms: int,
    utc_offset_minutes: int = KST_UTC_OFFSET_MINUTES,
    homes: LocalsIndex | None = None,
    awake_at: int | None = None,
) -> list[Hit]:
    """:func:`plan_stage` without a :class:`Target` per user: ``(user_id, distance_m, online)``, same order.

    What the engine runs: a stage's targets share their stage, priority,
    sound and vibration (:func:`alert_style`), and a QUICK stage in a busy
    area has hundreds of them. ``awake_at`` (a ``nearby`` stage): the
    locals ``live`` has snoozed past it are known to be refused by this
    stage's rule (``LocalsIndex.snooze``) and are not looked at.
    """
    if stage.only_if_unanswered and question.answered:
        return []
    p = _Planner(stage, question, locals, notified, ledger, now_ms, utc_offset_minutes)
    radius_m = math.inf if stage.radius_m is None else stage.radius_m
    if stage.audience == "online_nearby":
        return _plan_online_nearby(p, live, online, radius_m, stage.limit)
    if stage.audience == "nearby":
        return _plan_nearby(p, live, online, homes, radius_m, stage.limit, awake_at)
    if stage.audience == "experts":
        tags = frozenset(question.hashtags)
        if not tags:
            return []
        return _plan_directory(p, live, online, tags, stage.limit)
    return _plan_directory(p, live, online, None, stage.limit)
