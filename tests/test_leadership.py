"""Only the escalation lease's holder runs escalation stages (store/CLUSTER.md, "Escalation leadership").

"The other node" is the test (tests/test_multinode.py runs real ones):
it holds, steals and gives up the lease with a ``ClusterLink`` and SQL, and
writes what that node would have written. The node under test serves real
sockets on an autojump clock; it heartbeats only when the test says
(``Membership.beat_async``), lease times being wall-clock milliseconds.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from dongne.client import DongneClient, RequestError, open_client
from dongne.cluster import Membership, wall_ms
from dongne.core.effects import CloseOnce, SaveEscalation, SaveQuestion, StopEscalating
from dongne.core.records import Question, stopped_for_good

from .conftest import NO_TIMERS, SECRET, Harness, db_rows, question_data, token
from .served import serve_process
from .test_cluster import wait_until
from .test_cluster_state import other_node_commits
from .test_escalation import HERE, east, local_at, notifications, past_the_last_stage

pytestmark = pytest.mark.backends("postgres")

HOUR_MS = 3_600_000
SETTINGS: dict[str, Any] = {"server": NO_TIMERS, "location": {"min_update_interval_s": 0.0}}


@pytest.fixture
def peer_link(db: str) -> Iterator[Any]:
    """The other node's cluster rows, in a database migrated (and closed) first."""
    from dongne.store import store_for
    from dongne.store._cluster import ClusterLink

    schema = store_for(db)
    schema.open()
    schema.close()
    made = ClusterLink(db)
    yield made
    made.close()


def run_sql(db: str, sql: str, params: tuple[Any, ...] = ()) -> None:
    """One statement as the other node (blocking the event loop: the mock clock stands still meanwhile)."""
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(sql.replace("?", "%s"), params)


async def real_wait(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``check`` in real time: the stage commits on a worker thread, and on the autojump clock a loop
    of ``trio.sleep`` would run out of mock time before the thread is done."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await trio.to_thread.run_sync(time.sleep, 0.01)


def stages_of(events: list[dict[str, Any]], question_id: str) -> list[str]:
    return [e["data"]["stage"] for e in events if e["data"]["question"]["question_id"] == question_id]


async def alerts(client: DongneClient, question_id: str) -> list[str]:
    """The stages of ``question_id`` that reached ``client`` and were not taken yet (after a round trip)."""
    await client.request("get_profile")
    return stages_of(await notifications(client), question_id)


async def test_a_node_without_the_lease_runs_no_stage_and_the_one_taking_it_over_runs_what_is_left_once(
    start_server, autojump_clock, db: str, peer_link: Any
) -> None:  # type: ignore[no-untyped-def]
    """The other node holds the lease: here the stages after the ask's IMMEDIATE are recorded, not run.
    It runs QUICK (its notified row, its escalation row), alerts a capped local about another question,
    and dies: taking the lease over, this node reads that state and runs EXTENDED at once and FINAL on
    time, alerting nobody the other node alerted and nobody over their hourly cap."""
    assert peer_link.acquire_lease("peer", wall_ms(), HOUR_MS).epoch == 1
    h: Harness = await start_server(**SETTINGS)
    clients = h.running.clients
    assert h.running.membership.lease_epoch is None
    async with AsyncExitStack() as stack:
        near = await local_at(stack, h, "near", 1000)
        mid = await local_at(stack, h, "mid", 4000)
        expert = await local_at(stack, h, "expert", 20000, tags=["food"])
        capped = await local_at(stack, h, "capped", 20000, tags=["food"])
        await capped.request("update_settings", {"max_alerts_per_hour": 1})
        far = await local_at(stack, h, "far", 20000)
        asker = await stack.enter_async_context(h.connect("traveller", timeout=math.inf))
        qa = (await asker.request("create_question", question_data(location=dict(HERE))))["question"]["question_id"]
        # The ask's own IMMEDIATE stage goes out with its reply, on whichever node took it.
        assert (await near.next_event("new_question_notification"))["data"]["stage"] == "IMMEDIATE"
        far_away = question_data(title="B", location={"lat": 33.3, "lng": HERE["lng"]}, hashtags=["beach"])  # Seogwipo
        qb = (await asker.request("create_question", far_away))["question"]["question_id"]
        await asker.request("close_question", {"question_id": qb})

        await trio.sleep(40)  # QUICK (3 s) and EXTENDED (30 s) are due
        assert clients.escalations_waiting == {qa} and clients.escalation_scopes == {}
        for client in (near, mid, expert, capped, far):
            assert await alerts(client, qa) == []
        assert db_rows(db, "SELECT user_id, stage FROM notified") == [("near", "IMMEDIATE")]

        # The other node ran QUICK (mid), alerted capped about B, and stopped renewing the lease.
        now = clients.clock.now_ms()
        run_sql(db, "INSERT INTO notified VALUES (?, 'mid', 'QUICK', 4000, 1, ?), (?, 'capped', 'QUICK', 100, 1, ?)",
                (qa, now - 30_000, qb, now - 5_000))  # fmt: skip
        run_sql(db, "UPDATE escalations SET next_stage = 2 WHERE question_id = ?", (qa,))
        run_sql(db, "UPDATE escalation_lease SET expires_at = 0")
        await h.running.membership.beat_async()
        assert h.running.membership.lease_epoch == 2

        assert (await expert.next_event("new_question_notification"))["data"]["stage"] == "EXTENDED"
        assert clients.escalations_waiting == set()
        await past_the_last_stage(h)
        assert await alerts(far, qa) == ["FINAL"]
        for client in (near, mid, expert, capped):
            assert await alerts(client, qa) == []
    await h.running.aclose()
    rows = db_rows(db, "SELECT user_id, stage FROM notified WHERE question_id = ? ORDER BY user_id", (qa,))
    assert rows == [("expert", "EXTENDED"), ("far", "FINAL"), ("mid", "QUICK"), ("near", "IMMEDIATE")]
    assert db_rows(db, "SELECT count(*) FROM events WHERE user_id IN ('mid', 'capped')") == [(0,)]


async def test_only_the_lease_holder_raises_a_slow_response_alert(
    start_server, autojump_clock, db: str, peer_link: Any
) -> None:  # type: ignore[no-untyped-def]
    """Every node holding an unanswered question owes it the alert, and admins would get it from each: a
    node without the lease raises none, however long it waits; taking the lease over, it raises it at
    once (the reload's overdue deadline is armed), and only once."""
    assert peer_link.acquire_lease("peer", wall_ms(), HOUR_MS).epoch == 1
    h: Harness = await start_server(**SETTINGS, alerts={"slow_response_s": 600.0})
    assert h.running.membership.lease_epoch is None
    async with h.connect("boss", admin=True, timeout=math.inf) as boss, h.connect("asker", timeout=math.inf) as asker:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        await trio.sleep(900)  # the alert fell due 5 minutes ago
        await boss.request("get_profile")
        assert boss.pending_events() == []
        assert db_rows(db, "SELECT count(*) FROM events WHERE type = 'slow_response_alert'") == [(0,)]

        run_sql(db, "UPDATE escalation_lease SET expires_at = 0")  # the other node stopped renewing
        await h.running.membership.beat_async()
        assert h.running.membership.lease_epoch == 2
        alert = await boss.next_event("slow_response_alert")
        assert alert["data"]["question_id"] == qid
        await trio.sleep(600)
        await boss.request("get_profile")
        assert [e for e in boss.pending_events() if e["type"] == "slow_response_alert"] == []
    await h.running.aclose()
    assert db_rows(db, "SELECT count(*) FROM events WHERE type = 'slow_response_alert'") == [(1,)]


async def test_a_stage_committed_after_the_lease_was_taken_is_refused_and_the_node_stops(
    start_server, autojump_clock, db: str
) -> None:  # type: ignore[no-untyped-def]
    """The node leads (epoch 1), then another node takes the lease (epoch 2) without it noticing: its
    QUICK stage's commit carries epoch 1 and is refused, nothing of it written; it stops escalating and
    keeps serving. Once the lease is free and it takes it again (epoch 3), QUICK runs, once."""
    h: Harness = await start_server(**SETTINGS)
    clients = h.running.clients
    assert h.running.membership.lease_epoch == 1
    async with AsyncExitStack() as stack:
        mid = await local_at(stack, h, "mid", 4000)
        asker = await stack.enter_async_context(h.connect("traveller", timeout=math.inf))
        run_sql(db, "UPDATE escalation_lease SET holder = 'peer', epoch = 2, expires_at = ?", (wall_ms() + HOUR_MS,))
        qa = (await asker.request("create_question", question_data(location=dict(HERE))))["question"]["question_id"]

        await real_wait(lambda: qa in clients.escalations_waiting)
        await clients.wait_reloaded()
        assert clients.escalation_scopes == {} and h.running.membership.lease_epoch is None
        assert clients.writable
        assert db_rows(db, "SELECT count(*) FROM notified") == [(0,)]
        assert db_rows(db, "SELECT count(*) FROM events WHERE user_id = 'mid'") == [(0,)]
        assert db_rows(db, "SELECT next_stage FROM escalations") == [(1,)]
        assert await alerts(mid, qa) == []
        await asker.request("join_question", {"question_id": qa})  # the node still serves

        run_sql(db, "UPDATE escalation_lease SET expires_at = 0")
        await h.running.membership.beat_async()
        assert h.running.membership.lease_epoch == 3
        got = await mid.next_event("new_question_notification")
        assert (got["seq"], got["data"]["stage"]) == (1, "QUICK")
        await past_the_last_stage(h)
        assert await alerts(mid, qa) == []
    await h.running.aclose()
    assert db_rows(db, "SELECT user_id, stage FROM notified") == [("mid", "QUICK")]


async def test_a_dongne_serve_stopped_past_its_lease_commits_no_late_stage(
    tmp_path: Path, db: str, peer_link: Any
) -> None:
    """SIGSTOP a ``dongne serve`` that leads, before a question's QUICK stage is due; another node takes
    the lease. After SIGCONT the stage it was due to run is not committed (refused by its epoch, or
    cancelled when its heartbeat finds the lease gone, whichever comes first): nobody is alerted, and
    the node reports the escalation as another node's."""
    env = {
        "DONGNE_CLUSTER_HEARTBEAT_INTERVAL_S": "0.2",
        "DONGNE_CLUSTER_NODE_TTL_S": "1",
        "DONGNE_CLUSTER_LEASE_TTL_S": "1",
        "DONGNE_LOCATION_MIN_UPDATE_INTERVAL_S": "0",
    }
    other = Membership(peer_link, ttl_s=1.0, lease_ttl_s=1.0, node_id="peer")

    async def keep_beating() -> None:
        while True:
            await trio.to_thread.run_sync(other.beat)
            await trio.sleep(0.1)

    async with serve_process(tmp_path, db, secret=SECRET, env=env) as node, httpx.AsyncClient() as http:

        def gauges(*wanted: str) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                text = (await http.get(node.ops("/metrics"))).text
                return all(f"\n{line}\n" in text for line in wanted)

            return check

        await wait_until(gauges("dongne_escalation_lease_held 1.0"))
        async with (
            open_client(node.url, token("mid", local=True)) as mid,
            open_client(node.url, token("traveller")) as asker,
        ):
            await mid.request("update_location", {"location": east(4000)})  # QUICK's, at 3 s
            await asker.request("create_question", question_data(location=dict(HERE)))
            node.proc.send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_beating)
                await wait_until(lambda: trio.to_thread.run_sync(lambda: other.lease_epoch is not None))
                await trio.sleep(max(0.0, 3.5 - (time.monotonic() - stopped)))  # QUICK is overdue
                node.proc.send_signal(signal.SIGCONT)
                await wait_until(gauges("dongne_escalation_lease_held 0.0", "dongne_escalations_waiting 1.0"))
                await wait_until(answers(mid))
                assert await notifications(mid) == []
                assert db_rows(db, "SELECT count(*) FROM notified") == [(0,)]
                assert db_rows(db, "SELECT count(*) FROM events WHERE user_id = 'mid'") == [(0,)]
                nursery.cancel_scope.cancel()
    assert other.lease_epoch == 2


def answers(client: DongneClient) -> Callable[[], Awaitable[bool]]:
    """Whether a request of ``client`` is answered: one queued behind a commit refused for its lease's epoch is
    refused too (``unavailable``, "try again") while the node reads its state again."""

    async def check() -> bool:
        try:
            await client.request("get_profile")
        except RequestError as exc:
            if exc.code != "unavailable":
                raise
            return False
        return True

    return check


#: The other node's end of a question reaches this node by no news and no catch-up (its LISTEN connection down
#: for longer than the stages take): only the stage's guard sees it.
UNHEARD: dict[str, Any] = {**SETTINGS, "cluster": {"catch_up_interval_s": math.inf}}


def ended_elsewhere(h: Harness, question_id: str, how: str) -> None:
    """The other node closes or deletes the question, or hides it (its commit storing the escalation stopped
    for good) and then shows it again, its news not sent (or not read here yet)."""
    now = h.running.clients.clock.now_ms()
    if how == "closed":
        other_node_commits(h.db, [CloseOnce(question_id, "closed", now)], notify=False)
    elif how == "deleted":
        question = attrs.evolve(h.running.engine.questions[question_id], deleted_at=now)
        other_node_commits(h.db, [SaveQuestion(question)], notify=False)
    else:
        hidden = attrs.evolve(h.running.engine.questions[question_id], deleted_at=now, hidden=True)
        stop = StopEscalating(now, question_id=question_id, stages_run=1)
        other_node_commits(h.db, [SaveQuestion(hidden), stop], notify=False)
        shown = attrs.evolve(hidden, deleted_at=None, hidden=False)
        other_node_commits(h.db, [SaveQuestion(shown, unhide=True)], notify=False)


@pytest.mark.parametrize("how", ["closed", "deleted", "hidden and shown again"])
async def test_no_stage_is_sent_for_a_question_another_node_ended_before_its_news_came(
    start_server, autojump_clock, db: str, how: str
) -> None:  # type: ignore[no-untyped-def]
    """Another node closes (or deletes) the question, and its news has not come: the holder's QUICK
    stage is committed only while the question is open in the store, so it is refused. Nobody is alerted,
    nothing of it is stored, its alert no longer counts against the local's hourly cap, and the
    question's escalation ends here (no later stage, no retry). Hidden and shown again (read together,
    the two news would say only "open"), the question is open but its escalation stopped: refused too."""
    h: Harness = await start_server(**UNHEARD)
    clients, engine = h.running.clients, h.running.engine
    assert h.running.membership.lease_epoch is not None
    autojump_clock.autojump_threshold = math.inf  # time moves only when the test moves it (QUICK is due)
    async with AsyncExitStack() as stack:
        mid = await local_at(stack, h, "mid", 4000)
        asker = await stack.enter_async_context(h.connect("traveller", timeout=math.inf))
        qid = (await asker.request("create_question", question_data(location=dict(HERE))))["question"]["question_id"]
        ended_elsewhere(h, qid, how)

        autojump_clock.jump(4)  # QUICK (3 s) is due
        await real_wait(lambda: engine.where.stage_reached(qid) != "IMMEDIATE")  # QUICK ran
        await clients.pipeline.wait_idle()
        assert await alerts(mid, qid) == []
        assert qid not in engine.where.escalations and clients.escalation_scopes == {}
        assert engine.where.ledger.count_last_hour("mid", clients.clock.now_ms()) == 0
        assert engine.users["mid"].last_seq == 0
        autojump_clock.autojump_threshold = 0
        await past_the_last_stage(h)
        assert await alerts(mid, qid) == []
    await h.running.aclose()
    assert db_rows(db, "SELECT count(*) FROM notified WHERE question_id = ?", (qid,)) == [(0,)]
    assert db_rows(db, "SELECT count(*) FROM events WHERE user_id = 'mid'") == [(0,)]
    stored = stopped_for_good(1) if how == "hidden and shown again" else 1
    assert db_rows(db, "SELECT next_stage FROM escalations WHERE question_id = ?", (qid,)) == [(stored,)]


async def test_a_refused_stage_leaves_what_was_committed_beside_it_alone(start_server, autojump_clock, db: str) -> None:  # type: ignore[no-untyped-def]
    """A refused stage is taken out of its commit, and the rest is committed: a question asked beside it
    (the committer held until both are queued) is stored and acknowledged, and its IMMEDIATE alert
    reaches the local the refused stage had numbered an alert for first, with the seq the store gave, which
    is the head the engine tells a new connection of theirs."""
    h: Harness = await start_server(**UNHEARD)
    clients, engine = h.running.clients, h.running.engine
    autojump_clock.autojump_threshold = math.inf  # time moves only when the test moves it (QUICK is due)
    async with AsyncExitStack() as stack:
        mid = await local_at(stack, h, "mid", 4000)
        asker = await stack.enter_async_context(h.connect("traveller", timeout=math.inf))
        qa = (await asker.request("create_question", question_data(location=dict(HERE))))["question"]["question_id"]
        ended_elsewhere(h, qa, "closed")

        held, gate = threading.Event(), threading.Event()
        replies: list[dict[str, Any]] = []

        def hold() -> None:
            held.set()
            gate.wait()

        async def ask_next_to_mid() -> None:
            replies.append(await asker.request("create_question", question_data(title="C", location=east(4000))))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(clients.pipeline.run_between_commits, hold)
            try:
                await real_wait(held.is_set)  # the committer waits for the gate
                autojump_clock.jump(4)  # QUICK (3 s) is due: planned for mid, queued
                await real_wait(lambda: "mid" in engine.where.escalations[qa].notified)
                nursery.start_soon(ask_next_to_mid)
                await real_wait(lambda: len(engine.questions) == 2)  # handled, queued behind the stage
            finally:
                gate.set()
        qc = replies[0]["question"]["question_id"]
        got = await mid.next_event("new_question_notification")
        assert (got["seq"], got["data"]["question"]["question_id"], got["data"]["stage"]) == (1, qc, "IMMEDIATE")
        await clients.pipeline.wait_idle()
        assert await alerts(mid, qa) == []
        assert qa not in engine.where.escalations
        assert engine.where.ledger.count_last_hour("mid", clients.clock.now_ms()) == 1
        # The head the engine tells is the store's: it said 2 (the refused alert's 1, then the renumbered 2).
        again = await stack.enter_async_context(h.connect("mid", timeout=math.inf))
        assert (again.hello["last_seq"], again.hello["unread"]) == (1, 1)
    await h.running.aclose()
    assert db_rows(db, "SELECT user_id, stage FROM notified WHERE question_id = ?", (qa,)) == []
    assert db_rows(db, "SELECT user_id, stage FROM notified WHERE question_id = ?", (qc,)) == [("mid", "IMMEDIATE")]
    assert db_rows(db, "SELECT seq FROM events WHERE user_id = 'mid'") == [(1,)]


def asked_elsewhere(h: Harness, asker_id: str, question_id: str) -> None:
    """The other node asked a question (its IMMEDIATE stage run), its news not sent: this node has not read it
    (nor followed its escalation); its asker's news came before, so the asker is known here."""
    now = h.running.clients.clock.now_ms()
    asked = Question(
        question_id, asker_id, "Other", "Open late?", "", HERE["lat"], HERE["lng"], None, (), "normal", now
    )
    other_node_commits(h.db, [SaveQuestion(asked), SaveEscalation(question_id, 1, now)], notify=False)


@pytest.mark.parametrize("how", ["hide", "ban"])
async def test_a_hide_or_ban_here_stops_for_good_an_escalation_another_node_runs(
    start_server, autojump_clock, db: str, peer_link: Any, how: str
) -> None:  # type: ignore[no-untyped-def]
    """Another node holds the lease and asked the question, whose news has not come here: an admin here hides
    it (read from the store), or bans its asker. The commit stores its escalation as stopped for good, though
    this node's memory does not follow it (it stored nothing: the holder only ends it in memory when the news
    comes). Shown again (or the ban lifted), the question is not escalated by the node taking the lease over,
    which reads its escalation from the store: the local QUICK was due to alert is not alerted."""
    assert peer_link.acquire_lease("peer", wall_ms(), HOUR_MS).epoch == 1
    h: Harness = await start_server(**UNHEARD)
    clients, engine = h.running.clients, h.running.engine
    async with AsyncExitStack() as stack:
        mid = await local_at(stack, h, "mid", 4000)
        admin = await stack.enter_async_context(h.connect("boss", admin=True, timeout=math.inf))
        async with h.connect("other", timeout=math.inf):  # the asker is known here
            pass
        asked_elsewhere(h, "other", "q-there")
        assert not engine.follows_escalation("q-there")
        if how == "hide":
            assert (await admin.request("hide_question", {"id": "q-there", "reason": "spam"}))["changed"] is True
        else:
            await admin.request("ban_user", {"user_id": "other", "reason": "spam"})
        await clients.pipeline.wait_idle()
        assert db_rows(db, "SELECT next_stage FROM escalations WHERE question_id = 'q-there'") == [
            (stopped_for_good(1),)
        ]
        if how == "hide":
            await admin.request("unhide_question", {"id": "q-there"})
        else:
            await admin.request("unban_user", {"user_id": "other"})

        run_sql(db, "UPDATE escalation_lease SET expires_at = 0")  # the other node stopped renewing
        await h.running.membership.beat_async()
        assert h.running.membership.lease_epoch == 2
        await clients.wait_reloaded()
        await past_the_last_stage(h)
        assert await alerts(mid, "q-there") == []
        assert engine.questions["q-there"].deleted_at is None and "q-there" not in engine.where.escalations
    await h.running.aclose()
    assert db_rows(db, "SELECT count(*) FROM notified WHERE question_id = 'q-there'") == [(0,)]
    assert db_rows(db, "SELECT next_stage FROM escalations WHERE question_id = 'q-there'") == [(stopped_for_good(1),)]


def test_sqlite_nodes_always_hold_the_lease() -> None:
    """Nothing changes on SQLite: the node is the holder, its commits carry no epoch."""
    from dongne.cluster import Membership

    alone = Membership(None)
    told: list[int | None] = []
    alone.on_lease = told.append
    alone.beat()
    assert alone.lease_epoch == 0 and told == []
