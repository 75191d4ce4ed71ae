"""Tests for dongne.core.escalation: who each escalation stage notifies.

Everything is pure and clock-free: every call gets an explicit ``now_ms``.
The ``immediate`` stage is also checked against a brute-force reference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Set

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dongne.core.errors import ConfigError
from dongne.core.escalation import (
    DEFAULT_STAGES,
    MAX_ALERTS_PER_HOUR_LIMIT,
    AlertLedger,
    AlertLedgerStatistics,
    LocalInfo,
    NotificationSettings,
    QuestionBrief,
    StagePlan,
    Target,
    in_quiet_hours,
    plan_stage,
    stages_from_config,
)
from dongne.core.geo import haversine_m
from dongne.core.lifecycle import QuestionStatus
from dongne.core.records import Question
from dongne.core.spatial import LocalsIndex

IMMEDIATE, QUICK, EXTENDED, FINAL = DEFAULT_STAGES
HOUR_MS = 3_600_000
MIN_MS = 60_000
# Question position: Jeju City Hall.
Q_LAT, Q_LNG = 33.4996, 126.5312
# 2024-01-01 03:00 UTC is 12:00 noon in Korea (UTC+9).
NOON_KST_MS = 1_704_078_000_000


def north(metres: float) -> tuple[float, float]:
    """A position ``metres`` due north of the question."""
    return Q_LAT + metres / 111_195.0, Q_LNG


def kst_ms(hour: int, minute: int = 0) -> int:
    """Unix ms for 2024-01-01 ``hour:minute`` Korea time."""
    return NOON_KST_MS + (hour - 12) * HOUR_MS + minute * MIN_MS


class World:
    """A fake region: a directory of locals, who is online, and where."""

    def __init__(self) -> None:
        self.live = LocalsIndex()
        self.locals: dict[str, LocalInfo] = {}
        self.online: set[str] = set()
        self.ledger = AlertLedger()

    def add(
        self,
        user_id: str,
        *,
        live: tuple[float, float] | None = None,
        home: tuple[float, float] | None = None,
        tags: Iterable[str] = (),
        online: bool | None = None,
        **settings_kw: object,
    ) -> None:
        """Add a local; online (with a live position) when ``live`` is given."""
        self.locals[user_id] = LocalInfo(
            user_id,
            frozenset(tags),
            home,
            NotificationSettings(**settings_kw),  # type: ignore[arg-type]
        )
        if online is None:
            online = live is not None
        if online:
            self.online.add(user_id)
        if live is not None:
            self.live.upsert(user_id, *live)

    def plan(
        self,
        stage: StagePlan,
        question: QuestionBrief | None = None,
        *,
        notified: Set[str] = frozenset(),
        now_ms: int = NOON_KST_MS,
        **kw: object,
    ) -> list[Target]:
        return plan_stage(
            stage,
            question or brief(),
            live=self.live,
            locals=self.locals,
            online=self.online,
            notified=notified,
            ledger=self.ledger,
            now_ms=now_ms,
            **kw,  # type: ignore[arg-type]
        )


def brief(**kw: object) -> QuestionBrief:
    fields: dict[str, object] = dict(question_id="q1", asker_id="asker", lat=Q_LAT, lng=Q_LNG)
    fields.update(kw)
    return QuestionBrief(**fields)  # type: ignore[arg-type]


def ids(targets: Iterable[Target]) -> list[str]:
    return [t.user_id for t in targets]


# ---------------------------------------------------------------------------
# IMMEDIATE
# ---------------------------------------------------------------------------


def test_immediate_takes_ten_nearest_online_within_2km() -> None:
    """Up to 10, nearest first, inside 2 km, online only."""
    w = World()
    for i in range(15):
        w.add(f"u{i:02d}", live=north(100.0 * (15 - i)))  # u14 nearest
    w.add("far", live=north(2_100.0))
    w.add("offline", home=north(10.0))

    targets = w.plan(IMMEDIATE)

    assert [f"u{i:02d}" for i in range(14, 4, -1)] == ids(targets)
    assert all(t.online and t.stage == "IMMEDIATE" for t in targets)
    assert [round(t.distance_m or 0.0) for t in targets] == [100 * n for n in range(1, 11)]


def test_immediate_ties_by_user_id() -> None:
    """Equal distances are ordered by user id."""
    w = World()
    for uid in ("c", "a", "b"):
        w.add(uid, live=north(500.0))

    assert ids(w.plan(IMMEDIATE)) == ["a", "b", "c"]


def test_immediate_skips_asker_and_already_notified() -> None:
    """Never the asker, never twice for one question."""
    w = World()
    w.add("asker", live=north(10.0))
    w.add("seen", live=north(20.0))
    w.add("fresh", live=north(30.0))

    assert ids(w.plan(IMMEDIATE, notified={"seen"})) == ["fresh"]


def test_immediate_alerts_off_skipped_in_immediate_but_eligible_in_quick() -> None:
    """The immediate-alerts switch governs the immediate stage only."""
    w = World()
    w.add("quiet", live=north(10.0), immediate_alerts=False)
    w.add("loud", live=north(20.0))

    assert ids(w.plan(IMMEDIATE)) == ["loud"]
    assert ids(w.plan(QUICK)) == ["quiet", "loud"]
    assert ids(w.plan(QUICK, notified={"loud"})) == ["quiet"]


def test_immediate_alerts_off_applies_even_to_urgent_questions() -> None:
    """Urgency breaks through quiet hours, not through an explicit opt-out."""
    w = World()
    w.add("quiet", live=north(10.0), immediate_alerts=False)

    assert w.plan(IMMEDIATE, brief(urgency="urgent")) == []


def test_immediate_fills_ten_past_many_skipped_users() -> None:
    """Skipped users are replaced by the next nearest until ten are found."""
    w = World()
    for i in range(40):
        # Every user nearer than the 25th is capped out (max 0 alerts).
        w.add(f"u{i:02d}", live=north(10.0 * (i + 1)), max_alerts_per_hour=0 if i < 25 else 20)

    assert [f"u{i:02d}" for i in range(25, 35)] == ids(w.plan(IMMEDIATE))


def test_immediate_returns_fewer_when_exhausted() -> None:
    """With fewer eligible people than the limit, all of them."""
    w = World()
    w.add("a", live=north(100.0))
    w.add("b", live=north(200.0), max_alerts_per_hour=0)
    w.add("c", live=north(300.0))

    assert ids(w.plan(IMMEDIATE)) == ["a", "c"]


def test_immediate_ignores_live_users_who_are_not_locals_or_not_online() -> None:
    """The directory decides who is a verified local; ``online`` who is online."""
    w = World()
    w.live.upsert("tourist", *north(10.0))
    w.online.add("tourist")
    w.add("stale", live=north(20.0), online=False)
    w.add("local", live=north(30.0))

    assert ids(w.plan(IMMEDIATE)) == ["local"]


# ---------------------------------------------------------------------------
# QUICK: online by live position, offline by home
# ---------------------------------------------------------------------------


def test_quick_uses_live_for_online_and_home_for_offline() -> None:
    """Offline locals count by home position in QUICK but never in IMMEDIATE."""
    w = World()
    w.add("on_near", live=north(1_000.0), home=north(50_000.0))
    w.add("on_far", live=north(6_000.0), home=north(100.0))
    w.add("off_home", home=north(300.0))
    w.add("off_far", home=north(5_500.0))
    w.add("off_nohome")

    quick = w.plan(QUICK)

    assert ids(quick) == ["off_home", "on_near"]
    assert [t.online for t in quick] == [False, True]
    assert quick[0].distance_m == pytest.approx(300.0, rel=1e-3)
    assert quick[1].distance_m == pytest.approx(1_000.0, rel=1e-3)
    assert ids(w.plan(IMMEDIATE)) == ["on_near"]


def test_quick_online_without_live_position_is_not_nearby() -> None:
    """An online user is located by live position only, never by home."""
    w = World()
    w.add("ghost", home=north(100.0), online=True)

    assert w.plan(QUICK) == []


def test_quick_radius_is_inclusive_and_homes_index_gives_same_answer() -> None:
    """The optional homes index is a pure speed-up."""
    w = World()
    homes = LocalsIndex()
    for i in range(30):
        home = north(200.0 * i)
        w.add(f"h{i:02d}", home=home, online=i % 3 == 0, live=north(190.0 * i) if i % 3 == 0 else None)
        homes.upsert(f"h{i:02d}", *home)

    scanned = w.plan(QUICK, notified={"h04"})
    indexed = w.plan(QUICK, notified={"h04"}, homes=homes)

    assert scanned == indexed
    assert "h04" not in ids(scanned)
    dists = [t.distance_m for t in scanned]
    assert dists == sorted(dists)  # type: ignore[type-var]
    assert all(d is not None and d <= 5_000.0 for d in dists)


# ---------------------------------------------------------------------------
# EXTENDED and FINAL
# ---------------------------------------------------------------------------


def test_extended_picks_experts_by_tag_intersection_anywhere() -> None:
    """Any shared tag qualifies, regardless of distance; '#' and case normalize."""
    w = World()
    w.add("diver", tags={"diving", "Hallasan"}, home=north(80_000.0))
    w.add("hiker", tags={"#hallasan"}, live=north(40_000.0))
    w.add("cook", tags={"food"}, live=north(10.0))
    w.add("nowhere", tags={"diving"})

    targets = w.plan(EXTENDED, brief(hashtags=("#Hallasan", "diving")))

    assert ids(targets) == ["hiker", "diver", "nowhere"]
    assert [t.online for t in targets] == [True, False, False]
    assert targets[2].distance_m is None
    assert w.plan(EXTENDED, brief(hashtags=())) == []


def test_final_notifies_everyone_left_only_when_unanswered() -> None:
    """FINAL: all remaining locals, located first by distance, then by id."""
    w = World()
    w.add("b_far", live=north(90_000.0))
    w.add("a_near", home=north(10.0))
    w.add("z_nopos")
    w.add("y_nopos")
    w.add("done", live=north(5.0))

    assert ids(w.plan(FINAL, notified={"done"})) == ["a_near", "b_far", "y_nopos", "z_nopos"]
    assert w.plan(FINAL, brief(answered=True)) == []


def test_only_if_unanswered_does_not_apply_to_other_stages() -> None:
    """An answer stops FINAL only; earlier stages are the caller's business."""
    w = World()
    w.add("a", live=north(10.0))

    assert ids(w.plan(QUICK, brief(answered=True))) == ["a"]


def test_limit_applies_to_directory_stages() -> None:
    """A limit on ``everyone`` keeps the nearest located users first."""
    w = World()
    w.add("far", live=north(9_000.0))
    w.add("near", home=north(100.0))
    w.add("nopos")
    stage = StagePlan("sample", 0.0, None, 2, "everyone")

    assert ids(w.plan(stage)) == ["near", "far"]


# ---------------------------------------------------------------------------
# Quiet hours
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quiet", "hour", "minute", "expected"),
    [
        ((22, 7), 21, 59, False),
        ((22, 7), 22, 0, True),
        ((22, 7), 0, 0, True),
        ((22, 7), 6, 59, True),
        ((22, 7), 7, 0, False),
        ((13, 15), 12, 59, False),
        ((13, 15), 13, 0, True),
        ((13, 15), 14, 59, True),
        ((13, 15), 15, 0, False),
        ((0, 23), 23, 30, False),
        (None, 3, 0, False),
    ],
)
def test_in_quiet_hours_window_and_wrap(quiet: tuple[int, int] | None, hour: int, minute: int, expected: bool) -> None:
    """``[start, end)`` in Korea time, wrapping midnight when start > end."""
    assert expected == in_quiet_hours(quiet, kst_ms(hour, minute))


def test_quiet_hours_use_the_region_offset() -> None:
    """Noon KST is 03:00 UTC: quiet under a UTC offset, not under +9 h."""
    assert not in_quiet_hours((1, 5), NOON_KST_MS)
    assert in_quiet_hours((1, 5), NOON_KST_MS, utc_offset_minutes=0)
    # UTC-4: 23:00 the previous day, inside a window wrapping midnight.
    assert in_quiet_hours((22, 2), NOON_KST_MS, utc_offset_minutes=-240)


def test_quiet_hours_skip_normal_questions_but_not_urgent_ones() -> None:
    """Urgent questions break through quiet hours, as critical alerts."""
    w = World()
    w.add("sleeper", live=north(10.0), quiet_hours=(22, 7))
    w.add("owl", live=north(20.0))
    night = kst_ms(23, 30)

    assert ids(w.plan(IMMEDIATE, now_ms=night)) == ["owl"]
    assert ids(w.plan(IMMEDIATE, now_ms=kst_ms(7))) == ["sleeper", "owl"]
    urgent = w.plan(IMMEDIATE, brief(urgency="urgent"), now_ms=night)
    assert ids(urgent) == ["sleeper", "owl"]
    assert {"critical"} == {t.priority for t in urgent}


def test_quiet_hours_offset_changes_the_plan() -> None:
    """The caller's region offset is what the window is read in."""
    w = World()
    w.add("sleeper", live=north(10.0), quiet_hours=(1, 5))

    assert ids(w.plan(QUICK)) == ["sleeper"]
    assert w.plan(QUICK, utc_offset_minutes=0) == []


# ---------------------------------------------------------------------------
# Hourly cap and the ledger
# ---------------------------------------------------------------------------


def test_cap_skips_to_next_nearest_and_window_slides() -> None:
    """A user at the cap is replaced; 60 minutes after, eligible again."""
    w = World()
    w.add("capped", live=north(10.0), max_alerts_per_hour=2)
    for i in range(10):
        w.add(f"n{i}", live=north(100.0 + i))
    t0 = NOON_KST_MS
    w.ledger.record_alert("capped", t0 - 10 * MIN_MS)
    w.ledger.record_alert("capped", t0)

    at_t0 = ids(w.plan(IMMEDIATE, now_ms=t0))
    assert [f"n{i}" for i in range(10)] == at_t0
    # At t0 + 50 min the first alert has slid out: 1 < 2.
    assert ids(w.plan(IMMEDIATE, now_ms=t0 + 50 * MIN_MS))[0] == "capped"
    # A user with both alerts at t0 stays capped until exactly t0 + 60 min.
    w.add("burst", live=north(5.0), max_alerts_per_hour=2)
    w.ledger.record_alert("burst", t0)
    w.ledger.record_alert("burst", t0)
    assert "burst" not in ids(w.plan(IMMEDIATE, now_ms=t0 + HOUR_MS - 1))
    assert ids(w.plan(IMMEDIATE, now_ms=t0 + HOUR_MS))[0] == "burst"


def test_cap_counts_alerts_across_questions_and_stages() -> None:
    """Recording one question's targets counts against the next question."""
    w = World()
    w.add("a", live=north(10.0), max_alerts_per_hour=1)
    w.add("b", live=north(20.0), max_alerts_per_hour=1)
    first = w.plan(IMMEDIATE, brief(question_id="q1"))
    w.ledger.record(first, NOON_KST_MS)

    assert w.plan(QUICK, brief(question_id="q2"), now_ms=NOON_KST_MS + 1) == []
    assert w.plan(FINAL, brief(question_id="q2"), now_ms=NOON_KST_MS + 1) == []


def test_wider_stages_keep_a_quarter_of_the_cap_for_immediate() -> None:
    """At 15 of 20 alerts a local is skipped by QUICK, EXTENDED and FINAL but still gets IMMEDIATE."""
    w = World()
    w.add("near", live=north(10.0), tags={"food"})  # default cap 20
    w.add("small", live=north(20.0), tags={"food"}, max_alerts_per_hour=1)
    for minute in range(15):
        w.ledger.record_alert("near", NOON_KST_MS - minute * MIN_MS)
    food = brief(hashtags=("food",))

    assert ids(w.plan(QUICK, food)) == ["small"]
    assert ids(w.plan(EXTENDED, food)) == ["small"]
    assert ids(w.plan(FINAL, food)) == ["small"]
    assert ids(w.plan(IMMEDIATE, food)) == ["near", "small"]
    # One alert fewer and QUICK may use it; a cap of 1 is never rounded down to none.
    w.ledger = AlertLedger()
    for minute in range(14):
        w.ledger.record_alert("near", NOON_KST_MS - minute * MIN_MS)
    assert ids(w.plan(QUICK, food)) == ["near", "small"]
    assert [QUICK.cap_for(c) for c in (0, 1, 2, 4, 20, 100)] == [0, 1, 1, 3, 15, 75]


def test_cap_applies_to_urgent_questions() -> None:
    """The cap is a hard limit, urgency notwithstanding."""
    w = World()
    w.add("a", live=north(10.0), max_alerts_per_hour=1)
    w.ledger.record_alert("a", NOON_KST_MS)

    assert w.plan(IMMEDIATE, brief(urgency="urgent"), now_ms=NOON_KST_MS + 1) == []


def test_plan_does_not_mutate_its_inputs() -> None:
    """Planning is pure: the ledger, notified set and index are untouched."""
    w = World()
    w.add("a", live=north(10.0))
    notified: set[str] = set()

    w.plan(IMMEDIATE, notified=notified)

    assert set() == notified
    assert AlertLedgerStatistics(users=0, alerts=0) == w.ledger.statistics()


def test_ledger_prunes_and_stays_bounded() -> None:
    """Expired users are forgotten; per-user history is capped."""
    ledger = AlertLedger()
    for i in range(100):
        ledger.record_alert(f"u{i}", i * MIN_MS)
    assert ledger.statistics().users == 60  # u40..u99 within the last hour
    ledger.record_alert("late", 100 * MIN_MS + 2 * HOUR_MS)
    assert AlertLedgerStatistics(users=1, alerts=1) == ledger.statistics()

    for _ in range(MAX_ALERTS_PER_HOUR_LIMIT + 50):
        ledger.record_alert("spam", 10 * HOUR_MS)
    assert ledger.count_last_hour("spam", 10 * HOUR_MS) == MAX_ALERTS_PER_HOUR_LIMIT
    assert ledger.count_last_hour("spam", 11 * HOUR_MS) == 0
    assert ledger.count_last_hour("nobody", 0) == 0


def test_ledger_tolerates_out_of_order_times() -> None:
    """A step back in time still counts correctly."""
    ledger = AlertLedger()
    ledger.record_alert("a", 10 * MIN_MS)
    ledger.record_alert("a", 5 * MIN_MS)

    assert ledger.count_last_hour("a", 10 * MIN_MS) == 2
    assert ledger.count_last_hour("a", 5 * MIN_MS + HOUR_MS) == 1


def test_ledger_rejects_bad_window() -> None:
    with pytest.raises(ValueError, match="window_ms"):
        AlertLedger(window_ms=0)


# ---------------------------------------------------------------------------
# Priorities, sound, vibration
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "urgency", "expected"),
    [
        (IMMEDIATE, "normal", ("high", "urgent", "strong")),
        (QUICK, "normal", ("normal", "normal", "light")),
        (EXTENDED, "normal", ("normal", "normal", "light")),
        (FINAL, "normal", ("normal", "normal", "light")),
        (IMMEDIATE, "urgent", ("critical", "urgent", "strong")),
        (QUICK, "urgent", ("critical", "urgent", "strong")),
        (EXTENDED, "urgent", ("critical", "urgent", "strong")),
        (FINAL, "urgent", ("critical", "urgent", "strong")),
    ],
)
def test_priority_sound_vibration(stage: StagePlan, urgency: str, expected: tuple[str, str, str]) -> None:
    """Exactly the table in the module docstring; ``low`` never appears."""
    w = World()
    w.add("a", live=north(10.0), tags={"tag"})

    (target,) = w.plan(stage, brief(urgency=urgency, hashtags=("tag",)))

    assert expected == (target.priority, target.sound, target.vibration)
    assert stage.name == target.stage
    assert {
        "user_id": "a",
        "distance_m": target.distance_m,
        "online": True,
        "stage": stage.name,
        "priority": expected[0],
        "sound": expected[1],
        "vibration": expected[2],
    } == target.to_wire()


# ---------------------------------------------------------------------------
# Values and configuration
# ---------------------------------------------------------------------------


def test_default_stages() -> None:
    """The product's plan: 0 s / 3 s / 30 s / 120 s."""
    assert [(s.name, s.offset_s) for s in DEFAULT_STAGES] == [
        ("IMMEDIATE", 0.0),
        ("QUICK", 3.0),
        ("EXTENDED", 30.0),
        ("FINAL", 120.0),
    ]
    assert (IMMEDIATE.radius_m, IMMEDIATE.limit, IMMEDIATE.requires_immediate_alerts) == (2_000.0, 10, True)
    assert (QUICK.radius_m, QUICK.limit, QUICK.audience) == (5_000.0, None, "nearby")
    assert FINAL.only_if_unanswered and not QUICK.only_if_unanswered


def test_stages_from_config_round_trip() -> None:
    """Defaults fill in omitted keys."""
    config = [
        {
            "name": "IMMEDIATE",
            "offset_s": 0,
            "radius_m": 2000,
            "limit": 10,
            "audience": "online_nearby",
            "requires_immediate_alerts": True,
            "priority": "high",
        },
        {"name": "QUICK", "offset_s": 3, "radius_m": 5000, "audience": "nearby", "cap_share": 0.75},
        {"name": "EXTENDED", "offset_s": 30, "audience": "experts", "cap_share": 0.75},
        {"name": "FINAL", "offset_s": 120, "audience": "everyone", "only_if_unanswered": True, "cap_share": 0.75},
    ]

    assert stages_from_config(config) == DEFAULT_STAGES
    assert stages_from_config([{"name": "A", "offset_s": 0, "audience": "everyone"}])[0].cap_share == 1.0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([], "must not be empty"),
        ("stages", "must be a list"),
        ([1], "stage 1 must be an object"),
        ([{"name": "a", "offset_s": 0, "audience": "everyone", "colour": "red"}], "unknown key.*colour"),
        ([{"name": "a", "audience": "everyone"}], "missing required key 'offset_s'"),
        ([{"name": "", "offset_s": 0, "audience": "everyone"}], "name must be a non-empty string"),
        ([{"name": "a", "offset_s": -1, "audience": "everyone"}], "offset_s must be a finite number"),
        ([{"name": "a", "offset_s": math.nan, "audience": "everyone"}], "offset_s must be a finite number"),
        ([{"name": "a", "offset_s": 0, "audience": "martians"}], "audience must be one of"),
        ([{"name": "a", "offset_s": 0, "audience": "everyone", "cap_share": 0}], "cap_share must be a number > 0"),
        ([{"name": "a", "offset_s": 0, "audience": "everyone", "cap_share": 1.5}], "cap_share must be a number > 0"),
        ([{"name": "a", "offset_s": 0, "audience": "everyone", "cap_share": "most"}], "cap_share must be a number > 0"),
        ([{"name": "a", "offset_s": 0, "audience": "nearby"}], "'nearby' needs radius_m"),
        ([{"name": "a", "offset_s": 0, "audience": "nearby", "radius_m": 0}], "radius_m must be"),
        ([{"name": "a", "offset_s": 0, "audience": "experts", "radius_m": 5}], "takes no radius_m"),
        ([{"name": "a", "offset_s": 0, "audience": "everyone", "limit": 0}], "limit must be"),
        ([{"name": "a", "offset_s": 0, "audience": "everyone", "limit": True}], "limit must be"),
        (
            [{"name": "a", "offset_s": 0, "audience": "everyone", "only_if_unanswered": "yes"}],
            "only_if_unanswered must be true or false",
        ),
        ([{"name": "a", "offset_s": 0, "audience": "everyone", "priority": "critical"}], "priority must be"),
        (
            [
                {"name": "a", "offset_s": 0, "audience": "everyone"},
                {"name": "a", "offset_s": 1, "audience": "everyone"},
            ],
            "stage 2: duplicate stage name 'a'",
        ),
        (
            [
                {"name": "a", "offset_s": 5, "audience": "everyone"},
                {"name": "b", "offset_s": 4, "audience": "everyone"},
            ],
            "stage 2 .*offsets must not decrease",
        ),
    ],
)
def test_stages_from_config_rejects(config: object, message: str) -> None:
    """Every invalid plan is a ConfigError (a ValueError) saying why."""
    with pytest.raises(ConfigError, match=message) as info:
        stages_from_config(config)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_equal_offsets_are_allowed() -> None:
    stages = stages_from_config(
        [
            {"name": "a", "offset_s": 0, "audience": "everyone"},
            {"name": "b", "offset_s": 0, "audience": "everyone"},
        ]
    )
    assert tuple(s.name for s in stages) == ("a", "b")


def test_notification_settings_wire_round_trip() -> None:
    s = NotificationSettings(immediate_alerts=False, quiet_hours=(22, 7), max_alerts_per_hour=5)

    assert s.to_wire() == {"immediate_alerts": False, "quiet_hours": [22, 7], "max_alerts_per_hour": 5}
    assert s == NotificationSettings.from_wire(s.to_wire())
    assert NotificationSettings() == NotificationSettings.from_wire({})


def test_notification_settings_partial_update_keeps_base() -> None:
    base = NotificationSettings(quiet_hours=(22, 7), max_alerts_per_hour=5)

    updated = NotificationSettings.from_wire({"quiet_hours": None}, base=base)

    assert NotificationSettings(max_alerts_per_hour=5) == updated


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ([], "notification settings must be an object"),
        ({"volume": 3}, "unknown notification setting.*volume"),
        ({"immediate_alerts": 1}, "'immediate_alerts'"),
        ({"quiet_hours": [22]}, "'quiet_hours'"),
        ({"quiet_hours": "22-7"}, "'quiet_hours'"),
        ({"quiet_hours": [22, 24]}, "'quiet_hours'"),
        ({"quiet_hours": [22.0, 7]}, "'quiet_hours'"),
        ({"quiet_hours": [True, 7]}, "'quiet_hours'"),
        ({"quiet_hours": [7, 7]}, "'quiet_hours' start and end must differ"),
        ({"max_alerts_per_hour": -1}, "'max_alerts_per_hour'"),
        ({"max_alerts_per_hour": MAX_ALERTS_PER_HOUR_LIMIT + 1}, "'max_alerts_per_hour'"),
        ({"max_alerts_per_hour": "5"}, "'max_alerts_per_hour'"),
    ],
)
def test_notification_settings_from_wire_rejects(data: object, field: str) -> None:
    """Each error names the offending field."""
    with pytest.raises(ValueError, match=field):
        NotificationSettings.from_wire(data)


def test_question_brief_validation_and_from_record() -> None:
    with pytest.raises(ValueError, match="urgency"):
        brief(urgency="panic")
    with pytest.raises(ValueError, match="invalid question position"):
        brief(lat=91.0)
    record = Question(
        question_id="q9",
        asker_id="me",
        asker_nick="me",
        title="t",
        body="b",
        lat=Q_LAT,
        lng=Q_LNG,
        region=None,
        hashtags=("food",),
        urgency="urgent",
        created_at=0,
        status=QuestionStatus.ANSWERED,
        answer_count=1,
    )

    assert QuestionBrief("q9", "me", Q_LAT, Q_LNG, ("food",), "urgent", True) == QuestionBrief.from_record(record)


def test_local_info_rejects_invalid_home() -> None:
    with pytest.raises(ValueError, match="'home'"):
        LocalInfo("a", frozenset(), (100.0, 0.0), NotificationSettings())


# ---------------------------------------------------------------------------
# Property: IMMEDIATE equals a brute-force reference
# ---------------------------------------------------------------------------

PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
USER_POOL = [f"u{i:02d}" for i in range(30)]


def eligible_reference(
    uid: str,
    info: LocalInfo,
    question: QuestionBrief,
    notified: Set[str],
    alerts: Mapping[str, list[int]],
    now_ms: int,
    *,
    immediate: bool,
    cap_share: float = 1.0,
) -> bool:
    """The rules, written out longhand with no shared code."""
    if uid == question.asker_id or uid in notified:
        return False
    s = info.settings
    if immediate and not s.immediate_alerts:
        return False
    if question.urgency != "urgent" and s.quiet_hours is not None:
        hour = int(((now_ms / 1000 + 9 * 3600) % 86400) // 3600)
        start, end = s.quiet_hours
        quiet = (start <= hour < end) if start < end else (hour >= start or hour < end)
        if quiet:
            return False
    recent = [t for t in alerts.get(uid, []) if now_ms - HOUR_MS < t <= now_ms]
    allowed = 0 if s.max_alerts_per_hour == 0 else max(1, int(s.max_alerts_per_hour * cap_share))
    return len(recent) < allowed


@st.composite
def worlds(draw: st.DrawFn) -> tuple[World, QuestionBrief, set[str], dict[str, list[int]], int]:
    now = NOON_KST_MS + draw(st.integers(0, 24)) * HOUR_MS + draw(st.integers(0, HOUR_MS - 1))
    w = World()
    alerts: dict[str, list[int]] = {}
    # Few distinct offsets, so many users tie on distance.
    offsets = draw(st.lists(st.floats(0.0, 3_000.0), min_size=1, max_size=6))
    for uid in draw(st.lists(st.sampled_from(USER_POOL), unique=True, max_size=len(USER_POOL))):
        dlat = draw(st.sampled_from(offsets))
        dlng = draw(st.sampled_from(offsets))
        pos = (Q_LAT + dlat / 111_195.0, Q_LNG - dlng / 93_000.0)
        quiet = draw(st.one_of(st.none(), st.tuples(st.integers(0, 23), st.integers(0, 23))))
        if quiet is not None and quiet[0] == quiet[1]:
            quiet = None
        is_online = draw(st.booleans())
        w.add(
            uid,
            live=pos if is_online or draw(st.booleans()) else None,
            online=is_online,
            home=pos if draw(st.booleans()) else None,
            immediate_alerts=draw(st.booleans()),
            quiet_hours=quiet,
            max_alerts_per_hour=draw(st.integers(0, 5)),
        )
        times = sorted(now - draw(st.integers(0, 2 * HOUR_MS)) for _ in range(draw(st.integers(0, 4))))
        for t in times:
            w.ledger.record_alert(uid, t)
        alerts[uid] = times
    # Online non-locals in the live index must never be chosen.
    for uid in draw(st.lists(st.sampled_from(["x1", "x2"]), unique=True)):
        w.live.upsert(uid, Q_LAT, Q_LNG)
        w.online.add(uid)
    asker = draw(st.sampled_from([*USER_POOL, "x1", "outsider"]))
    notified = set(draw(st.lists(st.sampled_from(USER_POOL), max_size=8)))
    question = brief(asker_id=asker, urgency=draw(st.sampled_from(["normal", "urgent"])))
    return w, question, notified, alerts, now


@PROPERTY_SETTINGS
@given(worlds())
def test_immediate_matches_brute_force(
    case: tuple[World, QuestionBrief, set[str], dict[str, list[int]], int],
) -> None:
    """Filter eligible online locals, sort by (haversine, id), take 10."""
    w, question, notified, alerts, now = case
    expected: list[tuple[float, str]] = []
    for uid, info in w.locals.items():
        pos = w.live.position(uid)
        if uid not in w.online or pos is None:
            continue
        if not eligible_reference(uid, info, question, notified, alerts, now, immediate=True):
            continue
        dist = haversine_m(question.lat, question.lng, *pos)
        if dist <= 2_000.0:
            expected.append((dist, uid))
    expected.sort()

    actual = w.plan(IMMEDIATE, question, notified=notified, now_ms=now)

    assert expected[:10] == [(t.distance_m, t.user_id) for t in actual]


@PROPERTY_SETTINGS
@given(worlds())
def test_quick_matches_brute_force(
    case: tuple[World, QuestionBrief, set[str], dict[str, list[int]], int],
) -> None:
    """QUICK: online by live, offline by home, within 5 km, nearest first."""
    w, question, notified, alerts, now = case
    expected: list[tuple[float, str, bool]] = []
    for uid, info in w.locals.items():
        is_online = uid in w.online
        pos = w.live.position(uid) if is_online else info.home
        if pos is None:
            continue
        if not eligible_reference(
            uid, info, question, notified, alerts, now, immediate=False, cap_share=QUICK.cap_share
        ):
            continue
        dist = haversine_m(question.lat, question.lng, *pos)
        if dist <= 5_000.0:
            expected.append((dist, uid, is_online))
    expected.sort()

    actual = w.plan(QUICK, question, notified=notified, now_ms=now)

    assert expected == [(t.distance_m, t.user_id, t.online) for t in actual]
