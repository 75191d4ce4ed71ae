"""The escalation planner: who gets notified at each stage of a question.

Theory of operation
-------------------

A question escalates through a fixed plan of stages (:data:`DEFAULT_STAGES`,
or one read from configuration by :func:`stages_from_config`). The engine
owns the timers; when a stage is due it calls :func:`plan_stage`, a pure
function of the question, the locals directory, who is online, who was
already notified, the :class:`AlertLedger` and an explicit ``now_ms``. It
returns the :class:`Target` list to notify, in a deterministic order, and
changes nothing: the caller adds the targets to the question's notified set
and calls :meth:`AlertLedger.record` once it commits to sending.

Default stages::

    name       offset  audience        radius  limit  extra
    immediate    0 s   online_nearby    2 km     10   immediate alerts on, priority high
    quick        3 s   nearby           5 km      -   online by live, offline by home position
    extended    30 s   experts          -         -   expertise tags meet the question's hashtags
    final      120 s   everyone         -         -   only while the question has no answer

Eligibility (every stage): the user is a verified local (a key of
``locals``), is not the asker, has not been notified for this question, and
is under their hourly cap. Then, per user setting:

* *Immediate alerts off* skips the user in stages with
  ``requires_immediate_alerts`` (the default ``immediate`` stage only); they
  stay eligible for every later stage.
* *Quiet hours* ``(start, end)`` skip the user while the local hour ``h``
  (in the region's UTC offset, +9 h for Korea) satisfies ``start <= h <
  end``, or, for a window wrapping midnight (``start > end``), ``h >= start
  or h < end``. **Urgent questions break through quiet hours**: a question
  marked urgent is the asker saying it cannot wait until morning (lost child,
  medical, stranded), and the priority ``critical`` tells the client why it
  rang at night. Urgency does *not* override the other two settings: turning
  immediate alerts off and the hourly cap are hard limits the user chose.
* *The hourly cap* ``max_alerts_per_hour`` counts the user's alerts over a
  sliding 60-minute window across all questions (:class:`AlertLedger`). A
  capped user is skipped and the next candidate in order takes the place,
  so a limited stage still fills up to its limit when enough people exist.
  A stage may use only a share of each cap (``cap_share``): in the default
  plan the wider stages stop at 75% of it (15 of the default 20), keeping
  the rest for IMMEDIATE alerts. Without that, a busy hour of QUICK alerts
  about questions 5 km away used up the caps of exactly the locals a
  question asked next to them needs most.

Priorities, sounds and vibrations (exactly):

=========================  ============  ==========  ===========
case                       ``priority``  ``sound``   ``vibration``
=========================  ============  ==========  ===========
urgent question, any stage ``critical``  ``urgent``  ``strong``
normal question, stage     ``high``      ``urgent``  ``strong``
with ``priority="high"``
(the ``immediate`` stage)
normal question, any other ``normal``    ``normal``  ``light``
stage
=========================  ============  ==========  ===========

``low`` (:data:`PRIORITY_LOW`) is reserved for system notices and is never
produced by the planner.

Complexity: ``online_nearby`` stages never scan the directory; they ask
``live.nearest_within`` for ``k`` users and, when some are skipped, ask
again with a larger ``k`` (doubling at least), so the cost is
``O(log n + skipped)`` tree work plus a few queries. ``nearby`` stages use
``live.within`` for online locals and, for offline ones, either an optional
``homes`` index or a scan of the directory (``O(locals)``, fine for Jeju's
tens of thousands). ``experts`` and ``everyone`` scan the directory:
``O(locals)`` plus a sort of the chosen.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from typing import Any, Final, Literal, get_args

import attrs

from .errors import ConfigError
from .geo import haversine_m, valid_lat_lng
from .records import Question
from .spatial import LocalsIndex

__all__ = [
    "AUDIENCES",
    "DEFAULT_STAGES",
    "KST_UTC_OFFSET_MINUTES",
    "MAX_ALERTS_PER_HOUR_LIMIT",
    "PRIORITY_CRITICAL",
    "PRIORITY_HIGH",
    "PRIORITY_LOW",
    "PRIORITY_NORMAL",
    "AlertLedger",
    "AlertLedgerStatistics",
    "Audience",
    "LocalInfo",
    "NotificationSettings",
    "QuestionBrief",
    "StagePlan",
    "Target",
    "in_quiet_hours",
    "plan_stage",
    "stages_from_config",
]

Audience = Literal["online_nearby", "nearby", "experts", "everyone"]
#: Every audience a stage may name.
AUDIENCES: Final[tuple[str, ...]] = get_args(Audience)
StagePriority = Literal["high", "normal"]
_STAGE_PRIORITIES: Final[tuple[str, ...]] = get_args(StagePriority)

PRIORITY_CRITICAL: Final = "critical"
PRIORITY_HIGH: Final = "high"
PRIORITY_NORMAL: Final = "normal"
#: Reserved for system notices; the planner never produces it.
PRIORITY_LOW: Final = "low"

#: Korea Standard Time, UTC+9, the default region offset for quiet hours.
KST_UTC_OFFSET_MINUTES: Final = 540
#: Upper bound of ``max_alerts_per_hour``; also how many alert times the
#: ledger keeps per user, so its counts are exact for every valid cap.
MAX_ALERTS_PER_HOUR_LIMIT: Final = 1000

_HOUR_MS: Final = 3_600_000
_URGENCIES: Final = ("normal", "urgent")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _normalize_tag(tag: str) -> str:
    # Same normalization as the wire (protocol.hashtags) and tokens (auth).
    return tag.strip().lstrip("#").lower()


# ---------------------------------------------------------------------------
# Stage plans
# ---------------------------------------------------------------------------


def _check_stage(stage: StagePlan) -> None:
    """Raise :class:`ConfigError` if one stage is inconsistent on its own."""
    where = f"escalation stage {stage.name!r}"
    if not isinstance(stage.name, str) or not stage.name:
        raise ConfigError(f"escalation stage name must be a non-empty string, got {stage.name!r}")
    if not _is_number(stage.offset_s) or not (math.isfinite(stage.offset_s) and stage.offset_s >= 0):
        raise ConfigError(f"{where}: offset_s must be a finite number >= 0, got {stage.offset_s!r}")
    if stage.audience not in AUDIENCES:
        raise ConfigError(f"{where}: audience must be one of {', '.join(AUDIENCES)}; got {stage.audience!r}")
    if stage.audience in ("online_nearby", "nearby"):
        if stage.radius_m is None:
            raise ConfigError(f"{where}: audience {stage.audience!r} needs radius_m")
        if not _is_number(stage.radius_m) or not (math.isfinite(stage.radius_m) and stage.radius_m > 0):
            raise ConfigError(f"{where}: radius_m must be a finite number > 0, got {stage.radius_m!r}")
    elif stage.radius_m is not None:
        raise ConfigError(f"{where}: audience {stage.audience!r} takes no radius_m (it is not by distance)")
    if stage.limit is not None and (
        not isinstance(stage.limit, int) or isinstance(stage.limit, bool) or stage.limit < 1
    ):
        raise ConfigError(f"{where}: limit must be null or an integer >= 1, got {stage.limit!r}")
    for flag in ("requires_immediate_alerts", "only_if_unanswered"):
        if not isinstance(getattr(stage, flag), bool):
            raise ConfigError(f"{where}: {flag} must be true or false, got {getattr(stage, flag)!r}")
    if stage.priority not in _STAGE_PRIORITIES:
        raise ConfigError(f"{where}: priority must be 'high' or 'normal', got {stage.priority!r}")
    if not _is_number(stage.cap_share) or not (0 < stage.cap_share <= 1):
        raise ConfigError(f"{where}: cap_share must be a number > 0 and <= 1, got {stage.cap_share!r}")


@attrs.frozen
class StagePlan:
    """One stage of the escalation plan.

    Attributes:
        name: Unique stage name, carried by every :class:`Target`.
        offset_s: Seconds after the question was asked when the stage runs.
        radius_m: For ``online_nearby`` and ``nearby``, the inclusive
            great-circle radius around the question; ``None`` (required) for
            ``experts`` and ``everyone``.
        limit: At most this many targets (nearest first); ``None`` for all.
        audience: ``online_nearby``: online locals by live position;
            ``nearby``: online locals by live position plus offline locals
            by home position; ``experts``: locals whose expertise tags meet
            the question's hashtags, anywhere; ``everyone``: all locals.
        requires_immediate_alerts: Skip users who turned immediate alerts off.
        only_if_unanswered: Plan nobody once the question has an answer.
        priority: ``high`` makes the stage loud (priority ``high``, sound
            ``urgent``, vibration ``strong``) for normal questions; urgent
            questions are ``critical`` in every stage regardless.
        cap_share: The share of each user's hourly cap this stage may fill
            (``0 < cap_share <= 1``): a user is eligible while their alerts of
            the last hour are under ``max(1, floor(cap * cap_share))`` (none
            for a cap of 0).

    Raises:
        ConfigError: (a ``ValueError``) if the fields are inconsistent.
    """

    name: str
    offset_s: float
    radius_m: float | None
    limit: int | None
    audience: Audience
    requires_immediate_alerts: bool = False
    only_if_unanswered: bool = False
    priority: StagePriority = "normal"
    cap_share: float = 1.0

    def __attrs_post_init__(self) -> None:
        _check_stage(self)

    def cap_for(self, max_alerts_per_hour: int) -> int:
        """How many alerts of the last hour a user with this cap may have had and still be alerted here."""
        if max_alerts_per_hour <= 0:
            return 0  # the user wants no alerts
        return max(1, math.floor(max_alerts_per_hour * self.cap_share))


#: The product's default plan; see the module docstring.
DEFAULT_STAGES: Final[tuple[StagePlan, ...]] = (
    StagePlan("IMMEDIATE", 0.0, 2_000.0, 10, "online_nearby", requires_immediate_alerts=True, priority="high"),
    StagePlan("QUICK", 3.0, 5_000.0, None, "nearby", cap_share=0.75),
    StagePlan("EXTENDED", 30.0, None, None, "experts", cap_share=0.75),
    StagePlan("FINAL", 120.0, None, None, "everyone", only_if_unanswered=True, cap_share=0.75),
)

_STAGE_KEYS: Final = (
    "name",
    "offset_s",
    "radius_m",
    "limit",
    "audience",
    "requires_immediate_alerts",
    "only_if_unanswered",
    "priority",
    "cap_share",
)


def stages_from_config(config: Sequence[Mapping[str, Any]]) -> tuple[StagePlan, ...]:
    """Build and validate an escalation plan from configuration.

    Each item is a mapping with keys ``name``, ``offset_s``, ``audience``
    (required) and ``radius_m``, ``limit`` (default ``None``),
    ``requires_immediate_alerts``, ``only_if_unanswered`` (default
    ``False``), ``priority`` (default ``"normal"``) and ``cap_share``
    (default 1.0); the meaning of each
    is in :class:`StagePlan`.

    Args:
        config: The stages, in order.

    Returns:
        The stages as a tuple of :class:`StagePlan`.

    Raises:
        ConfigError: (a ``ValueError``) naming the stage and the field if the
            list is empty, an item is not a mapping, a key is unknown or
            missing, a value is invalid, two stages share a name, or offsets
            decrease.
    """
    if isinstance(config, (str, bytes)) or not isinstance(config, Sequence):
        raise ConfigError("escalation stages must be a list of stage objects")
    if not config:
        raise ConfigError("escalation stages must not be empty")
    stages: list[StagePlan] = []
    for i, item in enumerate(config, start=1):
        if not isinstance(item, Mapping):
            raise ConfigError(f"escalation stage {i} must be an object, got {type(item).__name__}")
        unknown = sorted(str(key) for key in item if key not in _STAGE_KEYS)
        if unknown:
            raise ConfigError(f"escalation stage {i}: unknown key(s) {', '.join(unknown)}")
        for key in ("name", "offset_s", "audience"):
            if key not in item:
                raise ConfigError(f"escalation stage {i}: missing required key {key!r}")
        try:
            stage = StagePlan(
                name=item["name"],
                offset_s=item["offset_s"],
                radius_m=item.get("radius_m"),
                limit=item.get("limit"),
                audience=item["audience"],
                requires_immediate_alerts=item.get("requires_immediate_alerts", False),
                only_if_unanswered=item.get("only_if_unanswered", False),
                priority=item.get("priority", "normal"),
                cap_share=item.get("cap_share", 1.0),
            )
        except ConfigError as exc:
            raise ConfigError(f"escalation stage {i}: {exc}") from None
        if any(s.name == stage.name for s in stages):
            raise ConfigError(f"escalation stage {i}: duplicate stage name {stage.name!r}")
        if stages and stage.offset_s < stages[-1].offset_s:
            raise ConfigError(
                f"escalation stage {i} ({stage.name!r}): offset_s {stage.offset_s!r} is before the"
                f" previous stage's {stages[-1].offset_s!r}; offsets must not decrease"
            )
        stages.append(stage)
    return tuple(stages)


# ---------------------------------------------------------------------------
# Per-user settings and directory entries
# ---------------------------------------------------------------------------


def _check_quiet_hours(value: object) -> None:
    if value is None:
        return
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h <= 23 for h in value)
    ):
        raise ValueError(f"'quiet_hours' must be null or [start_hour, end_hour] with hours 0-23, got {value!r}")
    if value[0] == value[1]:
        raise ValueError(f"'quiet_hours' start and end must differ (an empty window is null), got {value!r}")


def _check_max_alerts(value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ALERTS_PER_HOUR_LIMIT:
        raise ValueError(f"'max_alerts_per_hour' must be an integer 0-{MAX_ALERTS_PER_HOUR_LIMIT}, got {value!r}")


@attrs.frozen
class NotificationSettings:
    """A user's notification preferences.

    Attributes:
        immediate_alerts: Receive stages with ``requires_immediate_alerts``.
        quiet_hours: ``(start_hour, end_hour)``, the local-time window
            ``[start, end)`` in which only urgent questions notify the user;
            wraps midnight when ``start > end`` (``(22, 7)``: 22:00-06:59).
            Hours are 0-23 and must differ. ``None``: no quiet hours.
        max_alerts_per_hour: Cap on alerts over any sliding 60 minutes,
            across all questions; 0 mutes escalation alerts entirely.

    Raises:
        ValueError: Naming the field, if a value is invalid.
    """

    immediate_alerts: bool = True
    quiet_hours: tuple[int, int] | None = None
    max_alerts_per_hour: int = 20

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.immediate_alerts, bool):
            raise ValueError(f"'immediate_alerts' must be true or false, got {self.immediate_alerts!r}")
        _check_quiet_hours(self.quiet_hours)
        _check_max_alerts(self.max_alerts_per_hour)

    @classmethod
    def from_wire(cls, data: object, *, base: NotificationSettings | None = None) -> NotificationSettings:
        """Parse settings from a wire map.

        ``quiet_hours`` travels as ``null`` or ``[start_hour, end_hour]``.
        Missing keys keep their value from ``base`` (the defaults when
        ``base`` is ``None``), so a client may send a partial update.

        Args:
            data: The decoded wire value.
            base: Settings the missing keys are taken from.

        Returns:
            The new settings.

        Raises:
            ValueError: Naming the field, if ``data`` is not a map, has an
                unknown key, or holds an invalid value.
        """
        if not isinstance(data, Mapping):
            raise ValueError("notification settings must be an object")
        unknown = sorted(str(key) for key in data if key not in _SETTINGS_KEYS)
        if unknown:
            raise ValueError(f"unknown notification setting(s): {', '.join(unknown)}")
        base = base if base is not None else cls()
        immediate_alerts = data.get("immediate_alerts", base.immediate_alerts)
        if not isinstance(immediate_alerts, bool):
            raise ValueError(f"'immediate_alerts' must be true or false, got {immediate_alerts!r}")
        quiet_raw = data.get("quiet_hours", base.quiet_hours)
        quiet: tuple[int, int] | None = None
        if quiet_raw is not None:
            if not isinstance(quiet_raw, (list, tuple)) or len(quiet_raw) != 2:
                raise ValueError(f"'quiet_hours' must be null or [start_hour, end_hour], got {quiet_raw!r}")
            quiet = (quiet_raw[0], quiet_raw[1])
        return cls(
            immediate_alerts=immediate_alerts,
            quiet_hours=quiet,
            max_alerts_per_hour=data.get("max_alerts_per_hour", base.max_alerts_per_hour),
        )

    def to_wire(self) -> dict[str, Any]:
        """Return the wire map that :meth:`from_wire` reads back.

        Returns:
            ``{"immediate_alerts", "quiet_hours", "max_alerts_per_hour"}``.
        """
        return {
            "immediate_alerts": self.immediate_alerts,
            "quiet_hours": None if self.quiet_hours is None else list(self.quiet_hours),
            "max_alerts_per_hour": self.max_alerts_per_hour,
        }


_SETTINGS_KEYS: Final = ("immediate_alerts", "quiet_hours", "max_alerts_per_hour")


def _to_tags(tags: Iterable[str]) -> frozenset[str]:
    return frozenset(_normalize_tag(t) for t in tags)


def _check_home(instance: object, attribute: object, value: tuple[float, float] | None) -> None:
    if value is not None and (len(value) != 2 or not valid_lat_lng(value[0], value[1])):
        raise ValueError(f"'home' must be None or a valid (lat, lng), got {value!r}")


@attrs.frozen
class LocalInfo:
    """What the planner knows about one verified local.

    Attributes:
        user_id: The user.
        tags: Expertise tags, normalized like hashtags (``#`` stripped,
            lowercased) on construction.
        home: Stored home ``(lat, lng)``, used while the user is offline;
            ``None`` if unknown.
        settings: The user's :class:`NotificationSettings`.
    """

    user_id: str
    tags: frozenset[str] = attrs.field(default=frozenset(), converter=_to_tags)
    home: tuple[float, float] | None = attrs.field(default=None, validator=_check_home)
    settings: NotificationSettings = NotificationSettings()


def _check_position(instance: QuestionBrief, attribute: object, value: float) -> None:
    if not valid_lat_lng(instance.lat, instance.lng):
        raise ValueError(f"invalid question position: ({instance.lat!r}, {instance.lng!r})")


def _check_urgency(instance: object, attribute: object, value: str) -> None:
    if value not in _URGENCIES:
        raise ValueError(f"'urgency' must be 'normal' or 'urgent', got {value!r}")


def _to_hashtags(tags: Iterable[str]) -> tuple[str, ...]:
    return tuple(_normalize_tag(t) for t in tags)


@attrs.frozen
class QuestionBrief:
    """The facts about a question that escalation needs.

    Attributes:
        question_id: The question.
        asker_id: Its asker, never notified.
        lat: Latitude of the question, in degrees.
        lng: Longitude of the question, in degrees.
        hashtags: The question's hashtags (normalized on construction).
        urgency: ``"normal"`` or ``"urgent"``.
        answered: Whether it has at least one answer.
    """

    question_id: str
    asker_id: str
    lat: float
    lng: float = attrs.field(validator=_check_position)
    hashtags: tuple[str, ...] = attrs.field(default=(), converter=_to_hashtags)
    urgency: str = attrs.field(default="normal", validator=_check_urgency)
    answered: bool = False

    @classmethod
    def from_record(cls, question: Question) -> QuestionBrief:
        """Summarize a question record; answered means ``answer_count > 0``.

        Args:
            question: The record.

        Returns:
            Its brief.
        """
        return cls(
            question_id=question.question_id,
            asker_id=question.asker_id,
            lat=question.lat,
            lng=question.lng,
            hashtags=question.hashtags,
            urgency=question.urgency,
            answered=question.answer_count > 0,
        )


@attrs.frozen
class Target:
    """One user to notify at one stage.

    Attributes:
        user_id: The user.
        distance_m: Great-circle metres from the question to the position
            used (live if online, home if offline); ``None`` if the user has
            no such position (possible in ``experts`` / ``everyone``).
        online: Whether the user is online; offline targets need a push job.
        stage: The stage's name.
        priority: ``critical``, ``high`` or ``normal`` (see the module
            docstring for the exact rule).
        sound: ``urgent`` or ``normal``.
        vibration: ``strong`` or ``light``.
    """

    user_id: str
    distance_m: float | None
    online: bool
    stage: str
    priority: str
    sound: str
    vibration: str

    def to_wire(self) -> dict[str, Any]:
        """Return the snake_case wire map of this target.

        Returns:
            A dict with every attribute (built literally: this runs once per
            alert, and ``attrs.asdict`` costs several times more).
        """
        return {
            "user_id": self.user_id,
            "distance_m": self.distance_m,
            "online": self.online,
            "stage": self.stage,
            "priority": self.priority,
            "sound": self.sound,
            "vibration": self.vibration,
        }


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
        self.prune(now_ms)

    def record(self, targets: Iterable[Target], now_ms: int) -> None:
        """Record an alert for every target, as sent at ``now_ms``.

        Args:
            targets: What :func:`plan_stage` returned (and was sent).
            now_ms: When they were sent, in milliseconds.
        """
        for target in targets:
            self.record_alert(target.user_id, now_ms)

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
        if self.urgent:
            self.priority, self.sound, self.vibration = PRIORITY_CRITICAL, "urgent", "strong"
        elif stage.priority == "high":
            self.priority, self.sound, self.vibration = PRIORITY_HIGH, "urgent", "strong"
        else:
            self.priority, self.sound, self.vibration = PRIORITY_NORMAL, "normal", "light"

        self.eligible = self.rule()

    def rule(self, online: Set[str] | None = None) -> Callable[[str], bool]:
        """Every rule that does not depend on the audience (and, given ``online``, being online).

        A closure over what is fixed for the call: a stage checks it for every
        local in reach (a million times in the escalation bench's 30 s), so
        it is one function call with its lookups bound, not four.
        """
        asker = self.question.asker_id
        notified = self.notified
        local_info = self.locals.get
        requires_immediate = self.stage.requires_immediate_alerts
        check_quiet = not self.urgent
        hour = self.local_hour
        cap_for = self.stage.cap_for
        caps: dict[int, int] = {}  # a user's max_alerts_per_hour -> this stage's cap
        has_room = self.ledger.room_checker(self.now_ms)

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
            return has_room(user_id, cap)

        return eligible

    def target(self, user_id: str, distance_m: float | None, online: bool) -> Target:
        return Target(
            user_id=user_id,
            distance_m=distance_m,
            online=online,
            stage=self.stage.name,
            priority=self.priority,
            sound=self.sound,
            vibration=self.vibration,
        )


def _plan_online_nearby(
    p: _Planner, live: LocalsIndex, online: Set[str], radius_m: float, limit: int | None
) -> list[Target]:
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
        chosen: list[Target] = []
        for uid, dist in hits:
            if keep(uid):
                chosen.append(p.target(uid, dist, True))
                if len(chosen) == limit:
                    return chosen
        if len(hits) < k:
            return chosen  # Everyone within the radius has been seen.
        # Many are skipped (alerts off, quiet hours, at their hourly cap): one
        # pass over everyone within the radius, nearest first, costs less than
        # growing k query after query (measured: 7.7 ms a stage with most
        # locals capped).
    hits = live.within(q.lat, q.lng, radius_m, keep=keep)
    return [p.target(uid, dist, True) for uid, dist in hits[:limit]]


def _plan_nearby(
    p: _Planner,
    live: LocalsIndex,
    online: Set[str],
    homes: LocalsIndex | None,
    radius_m: float,
    limit: int | None,
) -> list[Target]:
    q = p.question
    # Eligibility first: it does not depend on the distance, and in a busy
    # area most locals within reach are at their hourly cap.
    eligible = p.eligible
    candidates: list[tuple[float, str, bool]] = [
        (dist, uid, True) for uid, dist in live.within(q.lat, q.lng, radius_m, keep=p.rule(online))
    ]
    if homes is not None:
        candidates.extend(
            (dist, uid, False)
            for uid, dist in homes.within(q.lat, q.lng, radius_m, keep=lambda uid: uid not in online and eligible(uid))
        )
    else:
        for uid, info in p.locals.items():
            if info.home is None or uid in online or not eligible(uid):
                continue
            dist = haversine_m(q.lat, q.lng, info.home[0], info.home[1])
            if dist <= radius_m:
                candidates.append((dist, uid, False))
    candidates.sort()  # By distance, then id (ids are unique).
    if limit is not None:
        del candidates[limit:]
    return [p.target(uid, dist, is_online) for dist, uid, is_online in candidates]


def _plan_directory(
    p: _Planner, live: LocalsIndex, online: Set[str], tags: frozenset[str] | None, limit: int | None
) -> list[Target]:
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
    out = [p.target(uid, dist, is_online) for dist, uid, is_online in located]
    out.extend(p.target(uid, None, is_online) for uid, is_online in unlocated)
    if limit is not None:
        del out[limit:]
    return out


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
    if stage.only_if_unanswered and question.answered:
        return []
    p = _Planner(stage, question, locals, notified, ledger, now_ms, utc_offset_minutes)
    radius_m = math.inf if stage.radius_m is None else stage.radius_m
    if stage.audience == "online_nearby":
        return _plan_online_nearby(p, live, online, radius_m, stage.limit)
    if stage.audience == "nearby":
        return _plan_nearby(p, live, online, homes, radius_m, stage.limit)
    if stage.audience == "experts":
        tags = frozenset(question.hashtags)
        if not tags:
            return []
        return _plan_directory(p, live, online, tags, stage.limit)
    return _plan_directory(p, live, online, None, stage.limit)
