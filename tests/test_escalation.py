"""Escalation over real sockets on an autojump mock clock.

Locals around Jeju City Hall: the right ones are notified in the right stage.
Every I/O wait lets the clock jump to the next stage, so the tests assert
which stage reached whom and lower bounds on (mock) time, never upper ones.
"""

from __future__ import annotations

import math
import sqlite3
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio

from dongne.client import DongneClient
from dongne.clock import EngineClock
from dongne.core.effects import StartEscalation
from dongne.core.escalation import DEFAULT_STAGES
from dongne.store import store_for

from .conftest import NO_TIMERS, Harness, db_rows, question_data
from .test_engine import T0, Sim, fire, make_engine

pytestmark = pytest.mark.backends("sqlite", "postgres")

HALL = (33.4996, 126.5312)
HERE = {"lat": HALL[0], "lng": HALL[1]}
M_PER_DEG_LNG = 111320 * math.cos(math.radians(HALL[0]))


def east(metres: float) -> dict[str, float]:
    return {"lat": HALL[0], "lng": HALL[1] + metres / M_PER_DEG_LNG}


async def local_at(
    stack: AsyncExitStack, h: Harness, user_id: str, metres: float | None, **claims: Any
) -> DongneClient:
    client = await stack.enter_async_context(h.connect(user_id, timeout=math.inf, local=True, **claims))
    if metres is not None:
        await client.request("update_location", {"location": east(metres)})
    return client


async def past_the_last_stage(h: Harness) -> None:
    """Wait (mock time) until every question asked so far is past its last stage, and what it sent is sent.

    An escalation task ends a second after its last stage is due; the stage's
    outcome is committed and acted on through the pipeline.
    """
    await trio.sleep(DEFAULT_STAGES[-1].offset_s + 2.0)
    await h.running.clients.pipeline.wait_idle()


async def notifications(client: DongneClient) -> list[dict[str, Any]]:
    return [e for e in client.pending_events() if e["type"] == "new_question_notification"]


async def test_stages_reach_the_right_locals_in_order(start_server, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(server=NO_TIMERS, location={"min_update_interval_s": 0.0})
    async with AsyncExitStack() as stack:
        near = await local_at(stack, h, "near_1km", 1000)
        mid = await local_at(stack, h, "mid_4km", 4000)
        far = await local_at(stack, h, "far_20km", 20000)
        expert = await local_at(stack, h, "expert", 20000, tags=["food"])
        asker = await stack.enter_async_context(h.connect("traveller", timeout=math.inf))
        started = trio.current_time()
        question = (await asker.request("create_question", question_data(location=dict(HERE))))["question"]

        first = await near.next_event("new_question_notification")
        assert first["seq"] == 1
        assert first["data"]["stage"] == "IMMEDIATE"
        assert first["data"]["priority"] == "high"
        assert (first["data"]["sound"], first["data"]["vibration"]) == ("urgent", "strong")
        assert 900 < first["data"]["distance_m"] < 1100
        assert first["data"]["question"]["question_id"] == question["question_id"]
        assert first["data"]["question"]["region"] == "Jeju-si"

        quick = await mid.next_event("new_question_notification")
        assert quick["data"]["stage"] == "QUICK"
        assert (quick["data"]["priority"], quick["data"]["sound"], quick["data"]["vibration"]) == (
            "normal",
            "normal",
            "light",
        )
        assert trio.current_time() - started >= 3.0

        extended = await expert.next_event("new_question_notification")
        assert extended["data"]["stage"] == "EXTENDED"
        assert trio.current_time() - started >= 30.0

        final = await far.next_event("new_question_notification")
        assert final["data"]["stage"] == "FINAL"
        assert trio.current_time() - started >= 120.0

        # Nobody twice, never the asker.
        await asker.request("get_profile")
        for client in (near, mid, far, expert):
            assert await notifications(client) == []
        assert [e for e in asker.pending_events() if e["type"] == "new_question_notification"] == []
        assert h.running.clients.escalation_scopes == {}
    await h.running.aclose()


async def test_immediate_takes_the_ten_nearest_with_alerts_on(start_server, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(server=NO_TIMERS, location={"min_update_interval_s": 0.0})
    async with AsyncExitStack() as stack:
        locals_ = [await local_at(stack, h, f"l{i:02d}", 150 + 150 * i) for i in range(12)]  # 150 m .. 1.8 km
        await locals_[0].request("update_settings", {"immediate_alerts": False})
        asker = await stack.enter_async_context(h.connect("traveller", timeout=math.inf))
        await asker.request("create_question", question_data(location=dict(HERE)))
        stages = {}
        for i, client in enumerate(locals_):
            stages[i] = (await client.next_event("new_question_notification"))["data"]["stage"]
        # l00 turned immediate alerts off; the next nearest ten (l01..l10) get IMMEDIATE, l11 waits for QUICK.
        assert stages == {0: "QUICK", **{i: "IMMEDIATE" for i in range(1, 11)}, 11: "QUICK"}
    await h.running.aclose()


async def test_accept_cancels_and_an_answer_skips_final(start_server, autojump_clock, db) -> None:  # type: ignore[no-untyped-def]
    """However the clock jumped meanwhile: nothing is notified after the accept,
    and FINAL never reaches anyone once the question has an answer."""
    h = await start_server(server=NO_TIMERS, location={"min_update_interval_s": 0.0})
    async with AsyncExitStack() as stack:
        near = await local_at(stack, h, "near", 800)
        await local_at(stack, h, "expert", 20000, tags=["food"])
        await local_at(stack, h, "far", 20000)
        await local_at(stack, h, "mid", 4000)
        asker = await stack.enter_async_context(h.connect("traveller", timeout=math.inf))
        here = dict(HERE)

        qa = (await asker.request("create_question", question_data(location=here)))["question"]["question_id"]
        assert (await near.next_event("new_question_notification"))["data"]["stage"] == "IMMEDIATE"
        answer = (await near.request("create_answer", {"question_id": qa, "content": "here"}))["answer"]
        accepted = await asker.request("accept_answer", {"question_id": qa, "answer_id": answer["answer_id"]})
        closed_at = accepted["question"]["closed_at"]
        assert qa not in h.running.clients.escalation_scopes

        qb = (await asker.request("create_question", question_data(title="B", location=here)))["question"][
            "question_id"
        ]
        await near.request("create_answer", {"question_id": qb, "content": "there"})
        await past_the_last_stage(h)
        assert qb not in h.running.clients.escalation_scopes
        state_b = (await asker.request("join_question", {"question_id": qb}))["question"]
    await h.running.aclose()
    rows_a = db_rows(db, "SELECT stage, at FROM notified WHERE question_id = ?", (qa,))
    rows_b = db_rows(db, "SELECT user_id, stage, at FROM notified WHERE question_id = ?", (qb,))
    assert rows_a and all(at <= closed_at for _stage, at in rows_a)
    # B was never accepted, so EXTENDED ran; FINAL only while B had no answer.
    assert ("expert", "EXTENDED") in {(u, s) for u, s, _ in rows_b}
    assert all(at <= state_b["first_answer_at"] for _u, stage, at in rows_b if stage == "FINAL")


async def test_escalation_resumes_after_restart(start_server, autojump_clock, db) -> None:  # type: ignore[no-untyped-def]
    clock = EngineClock()  # one clock across both runs, as wall time would be
    h = await start_server(clock=clock, server=NO_TIMERS, location={"min_update_interval_s": 0.0})
    async with AsyncExitStack() as stack:
        near = await local_at(stack, h, "near", 1000)
        mid = await local_at(stack, h, "mid", 4000)
        # Offline after the restart, mid is found by its home position.
        await mid.request("update_settings", {"home": east(4000)})
        await local_at(stack, h, "expert", 20000, tags=["food"])
        asker = await stack.enter_async_context(h.connect("traveller", timeout=math.inf))
        question = (await asker.request("create_question", question_data(location=dict(HERE))))["question"]
        assert (await near.next_event("new_question_notification"))["data"]["stage"] == "IMMEDIATE"
        await h.running.aclose()
    # Down for a minute: QUICK (3 s) and EXTENDED (30 s) come due while it is
    # down, unless the clock already jumped past them before the shutdown.
    await trio.sleep(60)
    h2 = await start_server(clock=clock, server=NO_TIMERS, location={"min_update_interval_s": 0.0})
    async with AsyncExitStack() as stack:
        mid = await stack.enter_async_context(h2.connect("mid", resume_from=0, timeout=math.inf, local=True))
        expert = await stack.enter_async_context(
            h2.connect("expert", resume_from=0, timeout=math.inf, local=True, tags=["food"])
        )
        near = await stack.enter_async_context(h2.connect("near", resume_from=0, timeout=math.inf, local=True))
        got_mid = await mid.next_event("new_question_notification")
        got_expert = await expert.next_event("new_question_notification")
        assert (got_mid["seq"], got_mid["data"]["stage"]) == (1, "QUICK")
        assert (got_expert["seq"], got_expert["data"]["stage"]) == (1, "EXTENDED")
        # FINAL comes at its original deadline and finds nobody new: everyone was notified once.
        await past_the_last_stage(h2)
        assert question["question_id"] not in h2.running.clients.escalation_scopes
        assert (await near.next_event("new_question_notification"))["seq"] == 1  # the replayed IMMEDIATE
        for client in (mid, expert, near):
            await client.request("get_profile")  # anything sent before the reply has arrived
            assert await notifications(client) == []
    await h2.running.aclose()
    rows = db_rows(db, "SELECT user_id, stage FROM notified ORDER BY user_id")
    assert rows == [("expert", "EXTENDED"), ("mid", "QUICK"), ("near", "IMMEDIATE")]
    assert db_rows(db, "SELECT next_stage FROM escalations") == [(4,)]


async def test_alert_records_go_after_the_retention_but_an_active_questions_stay(start_server, db) -> None:  # type: ignore[no-untyped-def]
    """``notified`` keeps a row per alert; past ``[inbox] retention_days`` the pruner drops those of ended
    questions, not those of a question still open (they keep its escalation from alerting anyone twice)."""
    forty_days_ago = int(time.time() * 1000) - 40 * 86_400_000
    keep_open = {"ttl_s": 1e9}  # the old open question must not expire at the restart
    old = await start_server(clock=EngineClock(forty_days_ago), server=NO_TIMERS, questions=keep_open)
    async with AsyncExitStack() as stack:
        near = await local_at(stack, old, "near", 1000)
        asker = await stack.enter_async_context(old.connect("traveller"))
        ended, still_open = [
            (await asker.request("create_question", question_data(location=dict(HERE))))["question"]["question_id"]
            for _ in range(2)
        ]
        for _ in range(2):
            await near.next_event("new_question_notification")  # IMMEDIATE, for each
        await asker.request("close_question", {"question_id": ended})
    await old.running.aclose()
    h = await start_server(server=NO_TIMERS, questions=keep_open)
    async with AsyncExitStack() as stack:
        near = await local_at(stack, h, "near", 1000)
        asker = await stack.enter_async_context(h.connect("traveller"))
        recent = (await asker.request("create_question", question_data(location=dict(HERE))))["question"]
        await near.next_event("new_question_notification")
        await h.running.clients.pipeline.wait_idle()
        assert await h.running.clients.prune_alerts() == 1
        assert await h.running.clients.prune_alerts() == 0
    await h.running.aclose()
    rows = db_rows(db, "SELECT question_id FROM notified WHERE user_id = 'near'")
    assert sorted(r[0] for r in rows) == sorted([still_open, recent["question_id"]])


async def test_a_deleted_questions_alert_records_go_after_the_retention_and_start_up_reads_none_of_a_hidden_ones(
    start_server, db
) -> None:  # type: ignore[no-untyped-def]
    """A deleted question has ended, though its status stays as it was (a deletion sets ``deleted_at``): past
    the retention its alert records go. A hidden one may be shown again, its escalation taken up at the next
    start: its records stay. Start-up loads neither question, and reads neither's escalation nor old alerts."""
    forty_days_ago = int(time.time() * 1000) - 40 * 86_400_000
    keep_open = {"ttl_s": 1e9}  # the old questions must not expire at the restart
    old = await start_server(clock=EngineClock(forty_days_ago), server=NO_TIMERS, questions=keep_open)
    async with AsyncExitStack() as stack:
        near = await local_at(stack, old, "near", 1000)
        asker = await stack.enter_async_context(old.connect("traveller"))
        admin = await stack.enter_async_context(old.connect("ops", admin=True))
        deleted, hidden, still_open = [
            (await asker.request("create_question", question_data(location=dict(HERE))))["question"]["question_id"]
            for _ in range(3)
        ]
        for _ in range(3):
            await near.next_event("new_question_notification")  # IMMEDIATE, for each
        await asker.request("delete_question", {"question_id": deleted})
        await admin.request("hide_question", {"id": hidden, "reason": "off topic"})
    await old.running.aclose()
    assert db_rows(db, "SELECT count(*) FROM questions WHERE status = 'open'") == [(3,)]

    store = store_for(db)
    store.open()
    try:
        loaded = store.load(hot_since=int(time.time() * 1000) - 86_400_000)
    finally:
        store.close()
    assert (list(loaded.escalations), {qid for qid, _, _ in loaded.notified}) == ([still_open], {still_open})
    h = await start_server(server=NO_TIMERS, questions=keep_open)
    assert await h.running.clients.prune_alerts() == 1
    await h.running.aclose()
    rows = db_rows(db, "SELECT question_id FROM notified WHERE user_id = 'near'")
    assert sorted(r[0] for r in rows) == sorted([hidden, still_open])


async def test_alert_records_of_the_last_hour_stay_whatever_the_retention(start_server, db) -> None:  # type: ignore[no-untyped-def]
    """The records of the caps' window (an hour) count against each local's cap at a restart: a retention
    shorter than that does not prune them."""
    twenty_minutes_ago = int(time.time() * 1000) - 20 * 60_000
    old = await start_server(clock=EngineClock(twenty_minutes_ago), server=NO_TIMERS)
    async with AsyncExitStack() as stack:
        near = await local_at(stack, old, "near", 1000)
        asker = await stack.enter_async_context(old.connect("traveller"))
        qid = (await asker.request("create_question", question_data(location=dict(HERE))))["question"]["question_id"]
        await near.next_event("new_question_notification")
        await asker.request("close_question", {"question_id": qid})
    await old.running.aclose()
    h = await start_server(server=NO_TIMERS, inbox={"retention_days": 1e-9})
    assert await h.running.clients.prune_alerts() == 0
    await h.running.aclose()
    assert db_rows(db, "SELECT question_id FROM notified WHERE user_id = 'near'") == [(qid,)]


async def test_a_due_stage_is_delivered_however_long_its_commits_take(start_server, db, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    """A stage's batches wait for commits held up by another program's lock: the clock runs past the last stage's
    due time meanwhile, and the stage is still delivered whole (the task's deadline bounds its sleeping only)."""
    plan = [{"name": "ALL", "offset_s": 2, "audience": "everyone"}]
    # 150 locals in batches of 10: the first batches fill the pipeline's room for fan-out (200 rows), so the
    # next wait for their commit, which waits for the lock.
    autojump_clock.autojump_threshold = math.inf  # the clock stands still until the lock is taken
    h = await start_server(server=NO_TIMERS, escalation={"alerts_per_batch": 10, "stages": plan})
    for i in range(150):
        async with h.connect(f"l{i:03d}", local=True, timeout=math.inf) as local:
            await local.request("get_profile")
    await h.running.clients.pipeline.wait_idle()
    async with h.connect("asker", timeout=math.inf) as asker:
        qid = (await asker.request("create_question", question_data(location=dict(HERE))))["question"]["question_id"]
        if str(db).startswith("postgres"):
            import psycopg

            holder = psycopg.connect(str(db))
            holder.execute("LOCK TABLE notified IN EXCLUSIVE MODE")  # another session's, until the rollback
        else:
            holder = sqlite3.connect(db, isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")  # another program's write lock, until the rollback
        autojump_clock.autojump_threshold = 0  # from now on it jumps whenever the server waits
        await trio.sleep(10.0)  # the stage is due at 2 s; its first batch's commit waits, the clock jumps on
        holder.rollback() if str(db).startswith("postgres") else holder.execute("ROLLBACK")
        holder.close()
        while qid in h.running.clients.escalation_scopes:  # noqa: ASYNC110 - the server's own task ending
            await trio.sleep(1.0)
        await h.running.clients.pipeline.wait_idle()
    assert db_rows(db, "SELECT count(*) FROM notified WHERE question_id = ?", (qid,)) == [(150,)]
    assert db_rows(db, "SELECT next_stage FROM escalations WHERE question_id = ?", (qid,)) == [(1,)]
    await h.running.aclose()


async def test_a_restart_keeps_the_last_hours_alerts_against_the_cap_whatever_the_hot_set(start_server, db) -> None:  # type: ignore[no-untyped-def]
    """The caps count the last hour's alerts; a hot set shorter than that (it only decides which questions
    are kept in memory) must not forget them at a restart."""
    tiny = {"engine": {"hot_question_days": 1e-9}, "alerts": {"slo_window_days": 1e-9}}
    h = await start_server(**tiny)
    async with AsyncExitStack() as stack:
        local = await local_at(stack, h, "local", 300)
        await local.request("update_settings", {"max_alerts_per_hour": 1})
        asker = await stack.enter_async_context(h.connect("traveller"))
        first = (await asker.request("create_question", question_data(location=dict(HERE))))["question"]
        await local.next_event("new_question_notification")
        await asker.request("close_question", {"question_id": first["question_id"]})
    await h.running.aclose()
    h2 = await start_server(**tiny)  # the closed question is out of the hot set already
    async with AsyncExitStack() as stack:
        await local_at(stack, h2, "local", 300)
        asker = await stack.enter_async_context(h2.connect("traveller"))
        second = (await asker.request("create_question", question_data(location=dict(HERE))))["question"]
        await h2.running.clients.pipeline.wait_idle()
    await h2.running.aclose()
    rows = db_rows(db, "SELECT question_id FROM notified WHERE user_id = 'local'")
    assert rows == [(first["question_id"],)], second["question_id"]  # at their cap: not alerted again


NEAR_PLAN = [{"name": "NEAR", "offset_s": 0, "audience": "nearby", "radius_m": 5000, "limit": 10}]


@pytest.mark.backends("sqlite")
async def test_a_stage_cut_short_by_a_restart_keeps_its_limit(start_server, db) -> None:  # type: ignore[no-untyped-def]
    """A stage goes out in batches and its progress is saved with the last one: planned again after a restart
    in the middle, it alerts what its limit leaves, not its whole limit again."""
    config = {"escalation": {"alerts_per_batch": 1, "stages": NEAR_PLAN}, "location": {"min_update_interval_s": 0.0}}
    h = await start_server(store={"busy_timeout_s": 0.2}, **config)
    async with AsyncExitStack() as stack:
        for i in range(1, 25):  # offline locals, found by their homes
            async with h.connect(f"l{i:02d}", local=True) as local:
                await local.request("update_settings", {"home": east(200 + 50 * i)})
        nearest = await local_at(stack, h, "l00", 100)  # online: in the first batch, with the reply
        asker = await stack.enter_async_context(h.connect("traveller"))
        qid = (await asker.request("create_question", question_data(location=dict(HERE))))["question"]["question_id"]
        await nearest.next_event("new_question_notification")
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the next batch's commit fails: the server stops before the stage ends
        with trio.fail_after(20):
            while h.running.clients.writable:  # noqa: ASYNC110 - the server's own failed commit
                await trio.sleep(0.01)
    with trio.move_on_after(5):
        await h.running.aclose()
    holder.execute("ROLLBACK")
    holder.close()
    before = db_rows(db, "SELECT count(*) FROM notified WHERE question_id = ?", (qid,))[0][0]
    assert 1 <= before < 10
    h2 = await start_server(**config)
    await h2.running.clients.pipeline.wait_idle()
    with trio.fail_after(20):
        while qid in h2.running.clients.escalation_scopes:  # noqa: ASYNC110 - the server's own task ending
            await trio.sleep(0.01)
    await h2.running.clients.pipeline.wait_idle()
    await h2.running.aclose()
    rows = db_rows(db, "SELECT user_id FROM notified WHERE question_id = ? ORDER BY user_id", (qid,))
    assert len(rows) == 10, rows  # the stage's limit, over both runs


async def test_an_escalation_started_once_the_server_has_shut_down_is_left_for_the_next_start(start_server) -> None:  # type: ignore[no-untyped-def]
    """A rebuild acted on during the shutdown may start escalations after their nursery closed: they are left to
    the next start (which resumes them from the store), not an error that ends the server's shutdown."""
    h: Harness = await start_server()
    clients = h.running.clients
    await h.running.aclose()
    clients._start_escalation(StartEscalation("q-late", 2**40))
    assert "q-late" not in clients.escalation_scopes


TWO_STAGES = [
    {"name": "IMMEDIATE", "offset_s": 0.0, "radius_m": 2000.0, "limit": 10, "audience": "online_nearby",
     "requires_immediate_alerts": True, "priority": "high"},
    {"name": "QUICK", "offset_s": 3.0, "radius_m": 5000.0, "audience": "nearby", "cap_share": 0.75},
]  # fmt: skip


async def test_a_plan_shortened_between_runs_leaves_its_open_questions_at_its_last_stage(
    start_server, autojump_clock, db
) -> None:  # type: ignore[no-untyped-def]
    """The store counts the stages run: four, then config.toml keeps two and the server starts again. The open
    question's slow-response alert names the new plan's last stage; it raised IndexError out of the timers'
    task, which ended the server (and again at every start, until the question ended)."""
    engine = make_engine()  # the first run, as its commits left the store: every stage of the default plan run
    sim = Sim(engine)
    writes = [*sim.connect(1, "traveller").writes]
    created = sim.call(1, "create_question", {"title": "t", "location": HERE})
    qid = sim.reply(created)["data"]["question"]["question_id"]
    writes += created.writes
    for at in (3_000, 30_000, 120_000):
        writes += fire(engine, qid, T0 + at).writes
    store = store_for(db)
    store.open()
    store.apply(writes)
    store.close()
    assert db_rows(db, "SELECT next_stage FROM escalations") == [(4,)]

    clock = EngineClock(wall_ms=T0 + 200_000)
    h = await start_server(clock=clock, server=NO_TIMERS, escalation={"stages": TWO_STAGES})
    await trio.sleep(500)  # past 600 s: the alert falls due, on the timers' task
    [alert] = h.running.engine.oversight.recent_alerts
    assert (alert["question_id"], alert["stage"]) == (qid, "QUICK")
    assert [q["stage"] for q in h.running.engine.overview(clock.now_ms())["open"]] == ["QUICK"]
    async with h.connect("traveller", timeout=math.inf, now_s=clock.now_ms() / 1000) as asker:
        assert (await asker.request("get_question", {"question_id": qid}))["question"]["status"] == "open"
    await h.running.aclose()
