"""Shortcuts on the hot paths serve no stale answer: exact cases on the sans-I/O engine, explicit ``now``.

The planner skips locals snoozed in the live index (at their QUICK cap)
and region lookups are answered per grid cell; each case here is one a
shortcut could get wrong. The nearby_questions cases pin what any memo of a
mover's nearby list must keep (one per cell and zone generation was
measured and dropped: under the escalation bench's 50 questions a second
every zone changed between a mover's updates, so it never answered).
"""

from __future__ import annotations

import math

import shapely

from dongne.core import AppendEvent, Claims, CoreSettings, Disconnected, Engine, LimitSettings, Outcome, Send
from dongne.core.neighbourhood import Neighbourhood
from dongne.core.regions import load_default_regions
from dongne.core.settings import LocationSettings
from dongne.core.spatial import LocalsIndex

from .test_engine import T0, Sim, fire

HOUR_MS = 3_600_000
HALL = (33.4996, 126.5312)


def east(metres: float) -> dict[str, float]:
    return {"lat": HALL[0], "lng": HALL[1] + metres / 92_800}


def _claims(token: object, now_s: float) -> Claims:
    user = str(token)[3:]
    return Claims(user_id=user, nick=user, local=user.startswith("local"), tags=(), role="user")


def _engine(**location: object) -> Sim:
    settings = CoreSettings(
        location=LocationSettings(min_update_interval_s=0.0, **location),  # type: ignore[arg-type]
        limits=LimitSettings(questions_burst=1000, writes_burst=1000),
    )
    return Sim(Engine(settings, _claims, region_of=load_default_regions().region_of))


def _alerted(outcome: Outcome) -> list[tuple[str, str]]:
    return [
        (w.user_id, w.event_data()["stage"])
        for w in outcome.writes
        if isinstance(w, AppendEvent) and w.type == "new_question_notification"
    ]


def _ask_and_run_quick(sim: Sim, at: int) -> list[tuple[str, str]]:
    """A question at the hall at ``at``; who its IMMEDIATE and QUICK stages (3 s later) alert."""
    created = sim.call(1, "create_question", {"title": "t", "location": east(0)}, at)
    qid = sim.reply(created)["data"]["question"]["question_id"]
    return _alerted(created) + _alerted(fire(sim.engine, qid, at + 3000))


def test_a_local_at_the_quick_cap_is_skipped_until_exactly_their_hour_is_up() -> None:
    sim = _engine()
    sim.connect(1, "asker", T0)
    sim.connect(2, "local_far", T0)
    sim.call(2, "update_settings", {"max_alerts_per_hour": 4}, T0)  # QUICK may fill 3 of them
    sim.call(2, "update_location", {"location": east(3000)}, T0)  # out of IMMEDIATE's 2 km

    for n in range(3):
        assert _ask_and_run_quick(sim, T0 + 1000 * n) == [("local_far", "QUICK")]
    # The first of the three was sent at T0 + 3000: room again an hour after it.
    assert _ask_and_run_quick(sim, T0 + 3000 + HOUR_MS - 3001) == []
    assert _ask_and_run_quick(sim, T0 + 3000 + HOUR_MS - 3000) == [("local_far", "QUICK")]


def test_a_capped_local_who_raises_the_cap_is_alerted_by_the_next_stage() -> None:
    sim = _engine()
    sim.connect(1, "asker", T0)
    sim.connect(2, "local_far", T0)
    sim.call(2, "update_settings", {"max_alerts_per_hour": 1}, T0)  # QUICK may fill 1
    sim.call(2, "update_location", {"location": east(3000)}, T0)
    assert _ask_and_run_quick(sim, T0) == [("local_far", "QUICK")]
    assert _ask_and_run_quick(sim, T0 + 10_000) == []

    sim.call(2, "update_settings", {"max_alerts_per_hour": 20}, T0 + 20_000)

    assert _ask_and_run_quick(sim, T0 + 20_000) == [("local_far", "QUICK")]


def test_a_capped_local_who_goes_offline_and_comes_back_stays_capped_and_then_has_room() -> None:
    """Snoozes live in the live index: leaving it drops one, coming back sets it from the ledger again."""
    sim = _engine()
    sim.connect(1, "asker", T0)
    sim.connect(2, "local_far", T0)
    sim.call(2, "update_settings", {"max_alerts_per_hour": 1}, T0)
    sim.call(2, "update_location", {"location": east(3000)}, T0)
    assert _ask_and_run_quick(sim, T0) == [("local_far", "QUICK")]

    sim.engine.handle(Disconnected(2), T0 + 5000)
    sim.connect(3, "local_far", T0 + 6000)
    sim.call(3, "update_location", {"location": east(3000)}, T0 + 6000)

    assert _ask_and_run_quick(sim, T0 + 10_000) == []
    assert _ask_and_run_quick(sim, T0 + HOUR_MS) == [("local_far", "QUICK")]


def test_the_ledger_starting_over_wakes_every_snoozed_local() -> None:
    sim = _engine()
    sim.connect(1, "asker", T0)
    sim.connect(2, "local_far", T0)
    sim.call(2, "update_settings", {"max_alerts_per_hour": 1}, T0)
    sim.call(2, "update_location", {"location": east(3000)}, T0)
    _ask_and_run_quick(sim, T0)
    live = sim.engine.where.live
    assert live.within_by_distance(HALL[0], HALL[1], 5000.0, awake_at=T0 + 10_000) == []

    sim.engine.where.forget_durable()

    assert [uid for _, uid in live.within_by_distance(HALL[0], HALL[1], 5000.0, awake_at=T0 + 10_000)] == ["local_far"]


def test_snoozes_filter_exactly_and_follow_moves_not_reused_ids() -> None:
    index = LocalsIndex()
    index.upsert("a", 33.50, 126.53)
    index.upsert("b", 33.50, 126.531)
    index.snooze("a", 100.0)
    index.snooze("nobody", 100.0)  # not indexed: nothing happens
    everyone = index.within_by_distance(33.50, 126.53, 1000.0)

    assert [uid for _, uid in everyone] == ["a", "b"]
    assert [uid for _, uid in index.within_by_distance(33.50, 126.53, 1000.0, awake_at=99.0)] == ["b"]
    assert everyone == index.within_by_distance(33.50, 126.53, 1000.0, awake_at=100.0)  # due exactly then
    index.upsert("a", 33.501, 126.53)  # a move keeps it
    assert [uid for _, uid in index.within_by_distance(33.50, 126.53, 1000.0, awake_at=99.0)] == ["b"]
    index.remove("a")
    index.upsert("c", 33.50, 126.53)  # takes a's freed id, not its snooze
    assert [uid for _, uid in index.within_by_distance(33.50, 126.53, 1000.0, awake_at=99.0)] == ["c", "b"]
    index.snooze("b", math.inf)
    index.wake_all()
    assert len(index.within_by_distance(33.50, 126.53, 1000.0, awake_at=-math.inf)) == 2


def test_a_local_who_moves_into_another_region_is_told_the_new_one() -> None:
    """Westward from Jeju City into Aewol in ~20 m steps, through cells that decide and the one on the border."""
    regions = load_default_regions()
    sim = _engine()
    sim.connect(2, "local_walker", T0)
    told = []
    for k in range(60):
        lat, lng = 33.47, 126.4392 - k * 0.0002
        reply = sim.reply(sim.call(2, "update_location", {"location": {"lat": lat, "lng": lng}}, T0 + 2000 * k))
        expected = next(n for n in regions.names if regions.geometry(n).covers(shapely.Point(lng, lat)))

        assert expected == reply["data"]["region"]
        told.append(expected)

    assert told[0] == "Jeju-si" and told[-1] == "Aewol"
    assert told == sorted(told, key=lambda name: name == "Aewol")  # one crossing, no flicker


def _nearby_events(outcome: Outcome) -> list[list[str]]:
    """The question ids of each nearby_questions event an outcome sends."""
    return [
        [q["question_id"] for q in a.frame["data"]["questions"]]
        for a in outcome.actions
        if isinstance(a, Send) and a.frame["type"] == "nearby_questions"
    ]


def _stay(sim: Sim, conn_id: int, at: int, metres: float = 500.0) -> list[list[str]]:
    """The local shares the same position again (the same 100 m cell)."""
    return _nearby_events(sim.call(conn_id, "update_location", {"location": east(metres)}, at))


def _ask_at(sim: Sim, metres: float, at: int) -> str:
    created = sim.call(1, "create_question", {"title": "t", "location": east(metres)}, at)
    return str(sim.reply(created)["data"]["question"]["question_id"])


def test_a_move_inside_the_same_cell_with_nothing_new_sends_nothing() -> None:
    sim = _engine()
    sim.connect(1, "asker", T0)
    sim.connect(2, "walker", T0)
    qid = _ask_at(sim, 0, T0)
    assert _stay(sim, 2, T0 + 1000) == [[qid]]

    assert _stay(sim, 2, T0 + 2000) == []
    assert _nearby_events(sim.call(2, "update_location", {"location": east(520)}, T0 + 3000)) == []  # same cell


def test_a_question_opened_next_to_a_local_who_has_not_moved_is_named_at_their_next_update() -> None:
    sim = _engine()
    sim.connect(1, "asker", T0)
    sim.connect(2, "walker", T0)
    first = _ask_at(sim, 0, T0)
    assert _stay(sim, 2, T0 + 1000) == [[first]]
    second = _ask_at(sim, 450, T0 + 1500)  # 50 m from the walker

    assert _stay(sim, 2, T0 + 2000) == [[second, first]]
    nearby = sim.reply(sim.call(2, "nearby_questions", {}, T0 + 2500))["data"]["questions"]
    assert [q["question_id"] for q in nearby] == [second, first]


def test_a_question_opened_far_away_changes_nothing_for_a_local_who_stays() -> None:
    sim = _engine()
    sim.connect(1, "asker", T0)
    sim.connect(2, "walker", T0)
    first = _ask_at(sim, 0, T0)
    assert _stay(sim, 2, T0 + 1000) == [[first]]
    _ask_at(sim, 20_000, T0 + 1500)  # 19.5 km away, beyond nearby_radius_m (3 km)

    assert _stay(sim, 2, T0 + 2000) == []


def test_a_question_closed_next_to_a_local_who_has_not_moved_leaves_their_list() -> None:
    sim = _engine()
    sim.connect(1, "asker", T0)
    sim.connect(2, "walker", T0)
    first = _ask_at(sim, 0, T0)
    second = _ask_at(sim, 450, T0 + 500)
    assert _stay(sim, 2, T0 + 1000) == [[second, first]]
    sim.call(1, "close_question", {"question_id": second}, T0 + 1500)

    assert _stay(sim, 2, T0 + 2000) == [[first]]


def test_a_question_leaves_the_list_of_a_local_who_stays_exactly_when_it_ages_out() -> None:
    sim = _engine(nearby_max_age_s=60.0)
    sim.connect(1, "asker", T0)
    sim.connect(2, "walker", T0)
    old = _ask_at(sim, 0, T0)
    young = _ask_at(sim, 100, T0 + 30_000)
    assert _stay(sim, 2, T0 + 31_000) == [[young, old]]

    assert _stay(sim, 2, T0 + 60_000) == []  # asked 60 s ago: still in
    assert _stay(sim, 2, T0 + 60_001) == [[young]]
    assert _stay(sim, 2, T0 + 90_001) == [[]]


def test_a_nearby_list_entry_is_the_question_brief_then_distance_status_and_answer_count() -> None:
    """Places builds each entry as one literal: same keys, same order (msgpack keeps it) as the brief."""
    sim = _engine()
    sim.connect(1, "asker", T0)
    sim.connect(2, "walker", T0)
    created = sim.call(1, "create_question", {"title": "t", "location": east(0), "hashtags": ["food", "bus"]}, T0)
    question = sim.engine.questions[sim.reply(created)["data"]["question"]["question_id"]]
    [[entry]] = [
        a.frame["data"]["questions"]
        for a in sim.call(2, "update_location", {"location": east(500)}, T0 + 1000).actions
        if isinstance(a, Send) and a.frame["type"] == "nearby_questions"
    ]

    expected = {**Neighbourhood.brief(question), "distance_m": entry["distance_m"], "status": "open", "answer_count": 0}
    assert list(expected.items()) == list(entry.items())
