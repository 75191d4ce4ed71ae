"""Several ``dongne serve`` processes on one PostgreSQL database (issue 15; store/CLUSTER.md): real nodes, real
WebSockets, the real clock, bounded waits.

Each test starts two nodes as production does (``tests/served.py``), with the cluster's intervals made short
through the environment (heartbeat 0.2 s, lease 1 s, node 1.5 s). The first node started leads escalation: it
beats before it loads, and the second starts only once the first listens. Every durable seq a client receives
is recorded before the client drops duplicates (``raw_seqs``), so "exactly once" is checked on the wire.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from dongne.client import DongneClient, RequestError, open_client

from .conftest import SECRET, db_rows, question_data, token
from .served import ServedProcess, serve_process
from .test_cluster import wait_until
from .test_escalation import HERE, east
from .test_storage_faults import an_answer_is_refused_while_postgresql_is_down

pytestmark = pytest.mark.backends("postgres")

FAST = {
    "DONGNE_CLUSTER_HEARTBEAT_INTERVAL_S": "0.2",
    "DONGNE_CLUSTER_NODE_TTL_S": "1.5",
    "DONGNE_CLUSTER_LEASE_TTL_S": "1",
    "DONGNE_CLUSTER_CATCH_UP_INTERVAL_S": "0.5",
    "DONGNE_CLUSTER_POSITIONS_INTERVAL_S": "0.1",
    "DONGNE_LOCATION_MIN_UPDATE_INTERVAL_S": "0",
    "DONGNE_LIMITS_CONN_PER_S": "1000",
    "DONGNE_LIMITS_CONN_BURST": "1000",
}
STAGE = "SELECT user_id, stage FROM notified ORDER BY user_id"


@pytest.fixture(autouse=True)
def raw_seqs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every client records each durable seq it receives in ``raw_seqs``, duplicates included."""
    dispatch = DongneClient._dispatch

    def recording(self: DongneClient, frame: dict[str, Any]) -> bool:
        if isinstance(frame.get("seq"), int):
            self.__dict__.setdefault("raw_seqs", []).append(frame["seq"])
        return dispatch(self, frame)

    monkeypatch.setattr(DongneClient, "_dispatch", recording)


def seqs(client: DongneClient) -> list[int]:
    return list(client.__dict__.get("raw_seqs", []))


@asynccontextmanager
async def nodes(tmp_path: Path, db: str, names: str = "ab", **env: str) -> AsyncIterator[list[ServedProcess]]:
    """A node per letter of ``names`` on ``db``, started one after the other (the first leads); their logs'
    tails are printed if the test fails (pytest shows them)."""
    started: list[ServedProcess] = []
    try:
        async with AsyncExitStack() as stack:
            for name in names:
                node = serve_process(tmp_path, db, secret=SECRET, env={**FAST, **env}, log_name=f"node-{name}.log")
                started.append(await stack.enter_async_context(node))
            yield started
    except BaseException:
        for node in started:
            print(f"---- {node.log.name} ----\n{node.log.read_text(errors='replace')[-6000:]}")
        raise


def metrics(node: ServedProcess, *wanted: str) -> Callable[[], Awaitable[bool]]:
    """Whether the node's /metrics shows every line of ``wanted``."""

    async def check() -> bool:
        async with httpx.AsyncClient() as http:
            text = (await http.get(node.ops("/metrics"))).text
        return all(f"\n{line}\n" in text for line in wanted)

    return check


def rows(db: str, sql: str, expected: list[tuple[Any, ...]]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await trio.to_thread.run_sync(db_rows, db, sql) == expected

    return check


def nearby(client: DongneClient, expected: dict[str, int]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await client.request("nearby_locals", {"location": dict(HERE)}) == expected

    return check


def room_online(client: DongneClient, question_id: str, expected: list[str]) -> Callable[[], Awaitable[bool]]:
    """Whether a join reply (joining twice is harmless) lists these users online, on whichever node."""

    async def check() -> bool:
        reply = await client.request("join_question", {"question_id": question_id})
        return [u["user_id"] for u in reply["online"]] == expected and reply["online_count"] == len(expected)

    return check


def answers_on(client: DongneClient, question_id: str, expected: list[str]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        page = await client.request("get_question", {"question_id": question_id})
        return [a["answer_id"] for a in page["answers"]] == expected

    return check


async def stored(client: DongneClient, op: str, data: dict[str, Any], timeout_s: float = 20) -> dict[str, Any]:
    """``op``'s reply, retried after ``unavailable`` (a seq conflict with another node, a takeover's reload,
    the database away): the client's side of the protocol's retry hint."""
    with trio.fail_after(timeout_s):
        while True:
            try:
                return await client.request(op, data)
            except RequestError as exc:
                assert exc.code == "unavailable", exc
                await trio.sleep(exc.error["retry_after_ms"] / 1000)


async def collect(
    client: DongneClient, done: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 15.0
) -> list[dict[str, Any]]:
    """The client's events until ``done`` says enough (bounded)."""
    got: list[dict[str, Any]] = []
    with trio.fail_after(timeout_s):
        while not done(got):
            got.append(await client.next_event())
    return got


def up_to(seq: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: any(e.get("seq", 0) >= seq for e in events)


async def alerts_after_a_round_trip(client: DongneClient) -> list[str]:
    """The stages of the alerts the client received and nobody took yet, after a request answered."""
    await client.request("get_profile")
    return [e["data"]["stage"] for e in client.pending_events() if e["type"] == "new_question_notification"]


async def locals_and_asker(
    stack: AsyncExitStack, locals_node: ServedProcess, asker_node: ServedProcess, mid_node: ServedProcess | None = None
) -> tuple[DongneClient, DongneClient, DongneClient]:
    """``near`` (1 km: IMMEDIATE) and ``mid`` (4 km: QUICK, at 3 s) on one node (``mid`` on ``mid_node`` if
    given), the asker on another, once the asker's node counts both (positions through the store)."""
    near = await stack.enter_async_context(open_client(locals_node.url, token("near", local=True)))
    mid = await stack.enter_async_context(open_client((mid_node or locals_node).url, token("mid", local=True)))
    await near.request("update_location", {"location": east(1000)})
    await mid.request("update_location", {"location": east(4000)})
    asker = await stack.enter_async_context(open_client(asker_node.url, token("traveller")))
    await wait_until(nearby(asker, {"within_2km": 1, "within_5km": 2}))
    return near, mid, asker


async def no_second_alert(near: DongneClient, mid: DongneClient) -> None:
    """Each local received one alert (seq 1) and nothing more after a round trip."""
    assert await alerts_after_a_round_trip(near) == [] and await alerts_after_a_round_trip(mid) == []
    assert (seqs(near), seqs(mid)) == ([1], [1])


def stored_once_each(db: str) -> None:
    """The store has near's IMMEDIATE and mid's QUICK, each notified and appended once."""
    assert db_rows(db, STAGE) == [("mid", "QUICK"), ("near", "IMMEDIATE")]
    assert db_rows(db, "SELECT user_id, count(*) FROM events GROUP BY user_id ORDER BY user_id") == [
        ("mid", 1), ("near", 1)
    ]  # fmt: skip


async def ask(asker: DongneClient) -> str:
    question = await stored(asker, "create_question", question_data(location=dict(HERE)))
    return str(question["question"]["question_id"])


async def test_an_asker_on_one_node_is_alerted_for_and_answered_by_locals_on_another(tmp_path: Path, db: str) -> None:
    """Locals on node B (which leads), the asker on node A. IMMEDIATE goes out with the ask, from A; QUICK
    from B, which learns of the question from A's news. The local's answer on B reaches the asker on A as
    the durable answer_notification and as new_answer in the question's room, each once."""
    async with nodes(tmp_path, db, "ba") as (b, a), AsyncExitStack() as stack:
        near, mid, asker = await locals_and_asker(stack, b, a)
        qid = await ask(asker)
        immediate = await near.next_event("new_question_notification")
        quick = await mid.next_event("new_question_notification", timeout=15)
        assert (immediate["seq"], immediate["data"]["stage"]) == (1, "IMMEDIATE")
        assert (quick["seq"], quick["data"]["stage"]) == (1, "QUICK")

        answer = (await stored(near, "create_answer", {"question_id": qid, "content": "Dombedon, by the port"}))[
            "answer"
        ]
        kinds = {"answer_notification", "new_answer"}
        got = await collect(asker, lambda events: kinds <= {e["type"] for e in events})
        [notice] = [e for e in got if e["type"] == "answer_notification"]
        [live] = [e for e in got if e["type"] == "new_answer"]
        assert (notice["seq"], notice["data"]["answer"]["answer_id"]) == (1, answer["answer_id"])
        assert live["data"]["answer"]["answer_id"] == answer["answer_id"]
        await wait_until(answers_on(asker, qid, [answer["answer_id"]]))  # A read the question back
        assert await alerts_after_a_round_trip(near) == [] and await alerts_after_a_round_trip(mid) == []
        await asker.request("get_profile")
        assert [e for e in asker.pending_events() if e["type"] in kinds] == []
        assert (seqs(near), seqs(mid), seqs(asker)) == ([1], [1], [1])

        # The local joins the room on B: a join on A lists them (room members through the store).
        await stored(near, "join_question", {"question_id": qid})
        await wait_until(room_online(asker, qid, ["near", "traveller"]))

        # An answer deleted on B reaches the room on A; the asker's accept on A reaches the room on B.
        second = (await stored(mid, "create_answer", {"question_id": qid, "content": "No idea, sorry"}))["answer"]
        await stored(mid, "delete_answer", {"answer_id": second["answer_id"]})
        deleted = await asker.next_event("answer_deleted")
        assert deleted["data"] == {"question_id": qid, "answer_id": second["answer_id"]}
        await stored(asker, "accept_answer", {"question_id": qid, "answer_id": answer["answer_id"]})
        accepted = await near.next_event("answer_accepted")
        assert (accepted["data"]["answer_id"], accepted["data"]["author_id"]) == (answer["answer_id"], "near")
    assert db_rows(db, STAGE) == [("mid", "QUICK"), ("near", "IMMEDIATE")]
    # B knew the asker online on A (a positions row without a position): no push for the answer.
    assert db_rows(db, "SELECT kind FROM push_outbox WHERE user_id = 'traveller'") == []


async def test_a_cap_of_one_an_hour_holds_across_the_leaders_quick_and_another_nodes_immediate(
    tmp_path: Path, db: str
) -> None:
    """Node B leads; a local with max_alerts_per_hour = 1 and the asker are on node A. B's QUICK for a first
    question (4 km from the local) reaches the local through A; A's IMMEDIATE for a second one (1 km away)
    leaves the local out: A counted B's alert from the stage commit's news on dongne_alerts, which comes
    before the inbox news that has A deliver it."""
    async with nodes(tmp_path, db, "ba") as (b, a), AsyncExitStack() as stack:
        await wait_until(metrics(b, "dongne_escalation_lease_held 1.0"))
        local = await stack.enter_async_context(open_client(a.url, token("capped", local=True)))
        await local.request("update_settings", {"max_alerts_per_hour": 1})
        await local.request("update_location", {"location": east(1000)})
        watcher = await stack.enter_async_context(open_client(b.url, token("watcher")))
        await wait_until(nearby(watcher, {"within_2km": 1, "within_5km": 1}))  # the leader places the local
        asker = await stack.enter_async_context(open_client(a.url, token("traveller")))
        await stored(asker, "create_question", question_data(title="Far", location=east(5000)))
        first = await local.next_event("new_question_notification", timeout=15)
        assert first["data"]["stage"] == "QUICK"

        await stored(asker, "create_question", question_data(title="Near", location=dict(HERE)))

        assert await alerts_after_a_round_trip(local) == []
    alerts = "SELECT q.title, n.stage FROM notified n JOIN questions q USING (question_id) WHERE n.user_id = 'capped'"
    assert db_rows(db, alerts) == [("Far", "QUICK")]


async def test_resume_on_another_node_is_exactly_once_in_seq_order(tmp_path: Path, db: str) -> None:
    """The asker leaves node A at seq 1; answers come from locals on both nodes meanwhile; resuming on node B
    replays 2 and 3 once, in order, and B delivers what A commits next."""
    async with (
        nodes(tmp_path, db) as (a, b),
        open_client(a.url, token("l1", local=True)) as l1,
        open_client(b.url, token("l2", local=True)) as l2,
    ):
        async with open_client(a.url, token("traveller")) as asker:
            qid = await ask(asker)
            await stored(l1, "create_answer", {"question_id": qid, "content": "one"})
            await collect(asker, up_to(1))
            assert seqs(asker) == [1]
        await stored(l1, "create_answer", {"question_id": qid, "content": "two"})
        await wait_until(rows(db, "SELECT max(seq) FROM events WHERE user_id = 'traveller'", [(2,)]))
        await stored(l2, "create_answer", {"question_id": qid, "content": "three"})
        async with open_client(b.url, token("traveller"), resume_from=1) as again:
            got = await collect(again, up_to(3))
            await stored(l1, "create_answer", {"question_id": qid, "content": "four"})
            got += await collect(again, up_to(4))
            await again.request("get_profile")
            got += again.pending_events()
            notices = [e for e in got if e["type"] == "answer_notification"]
            assert [(e["seq"], e["data"]["answer"]["content"]) for e in notices] == [
                (2, "two"), (3, "three"), (4, "four")
            ]  # fmt: skip
            assert seqs(again) == [2, 3, 4]
    sql = "SELECT seq FROM events WHERE user_id = 'traveller' ORDER BY seq"
    assert db_rows(db, sql) == [(1,), (2,), (3,), (4,)]


async def test_a_resume_on_another_node_says_which_events_were_pruned_there(tmp_path: Path, db: str) -> None:
    """Events 1-2 of the asker's pruned (as node A's pruner would: B's memory never hears of it): resuming
    from 1 on node B says resumed false, oldest_seq 3, and replays 3 alone."""
    async with (
        nodes(tmp_path, db) as (a, b),
        open_client(a.url, token("l1", local=True)) as l1,
    ):
        async with open_client(b.url, token("traveller")) as asker:  # B holds the user
            qid = await ask(asker)
        for content in ("one", "two", "three"):
            await stored(l1, "create_answer", {"question_id": qid, "content": content})
        await wait_until(rows(db, "SELECT max(seq) FROM events WHERE user_id = 'traveller'", [(3,)]))
        pruned = db_rows(db, "DELETE FROM events WHERE user_id = 'traveller' AND seq < 3 RETURNING seq")
        assert sorted(pruned) == [(1,), (2,)]
        async with open_client(b.url, token("traveller"), resume_from=1) as again:
            assert {k: again.hello.get(k) for k in ("resumed", "oldest_seq", "last_seq")} == {
                "resumed": False, "oldest_seq": 3, "last_seq": 3
            }  # fmt: skip
            got = await collect(again, up_to(3))
            assert [(e["seq"], e["data"]["answer"]["content"]) for e in got if e["type"] == "answer_notification"] == [
                (3, "three")
            ]


async def test_the_pending_stage_runs_from_another_node_when_the_leader_is_killed(tmp_path: Path, db: str) -> None:
    """SIGKILL the leader (node A, the asker's) after IMMEDIATE, before QUICK (3 s): node B takes the lease
    over within its ttl and runs QUICK; each local is alerted once."""
    async with nodes(tmp_path, db) as (a, b), AsyncExitStack() as stack:
        await wait_until(metrics(a, "dongne_escalation_lease_held 1.0"))
        near, mid, asker = await locals_and_asker(stack, b, a)
        await ask(asker)
        immediate = await near.next_event("new_question_notification")
        assert immediate["data"]["stage"] == "IMMEDIATE"
        a.proc.kill()
        quick = await mid.next_event("new_question_notification", timeout=15)
        assert (quick["seq"], quick["data"]["stage"]) == (1, "QUICK")
        await wait_until(metrics(b, "dongne_escalation_lease_held 1.0"))
        await no_second_alert(near, mid)
    stored_once_each(db)


async def test_three_nodes_one_takes_over_from_the_killed_leader_and_each_local_is_alerted_once(
    tmp_path: Path, db: str
) -> None:
    """Three nodes: the asker on A (which leads), near on B, mid on C. A commits IMMEDIATE and is killed
    before QUICK: exactly one of B and C takes the lease over and runs QUICK; near gets its alert from B
    (A's commit, across nodes), mid its QUICK; each once."""
    async with nodes(tmp_path, db, "abc") as (a, b, c), AsyncExitStack() as stack:
        await wait_until(metrics(a, "dongne_escalation_lease_held 1.0"))
        near, mid, asker = await locals_and_asker(stack, b, a, mid_node=c)
        await ask(asker)
        immediate = await near.next_event("new_question_notification")
        assert (immediate["seq"], immediate["data"]["stage"]) == (1, "IMMEDIATE")
        a.proc.kill()
        quick = await mid.next_event("new_question_notification", timeout=15)
        assert (quick["seq"], quick["data"]["stage"]) == (1, "QUICK")
        held = [await metrics(node, "dongne_escalation_lease_held 1.0")() for node in (b, c)]
        assert sorted(held) == [False, True]
        await no_second_alert(near, mid)
    stored_once_each(db)


async def test_a_leader_stopped_past_its_lease_commits_nothing_late(tmp_path: Path, db: str) -> None:
    """Node A leads and takes up the escalation of a question asked on node B (B's news). SIGSTOP A: B takes
    the lease over and runs QUICK. After SIGCONT, A's own QUICK, due while it was stopped, is not committed
    (refused by its epoch, or cancelled when its heartbeat finds the lease gone): nobody is alerted twice."""
    async with nodes(tmp_path, db) as (a, b), AsyncExitStack() as stack:
        await wait_until(metrics(a, "dongne_escalation_lease_held 1.0"))
        near, mid, asker = await locals_and_asker(stack, b, b)
        await ask(asker)
        asked = time.monotonic()
        assert (await near.next_event("new_question_notification"))["data"]["stage"] == "IMMEDIATE"  # from B
        await wait_until(metrics(a, "dongne_escalations_running 1.0"))  # A runs it: it learnt of it from B
        assert time.monotonic() - asked < 2.5, "too slow to test a stage due while stopped"
        a.proc.send_signal(signal.SIGSTOP)
        try:
            quick = await mid.next_event("new_question_notification", timeout=15)
            assert (quick["seq"], quick["data"]["stage"]) == (1, "QUICK")
            await wait_until(metrics(b, "dongne_escalation_lease_held 1.0"))
            await trio.sleep(max(0.0, 3.5 - (time.monotonic() - asked)))  # A's QUICK is overdue
        finally:
            a.proc.send_signal(signal.SIGCONT)
        await wait_until(metrics(a, "dongne_escalation_lease_held 0.0", "dongne_escalations_waiting 1.0"))
        await wait_until(metrics(a, "dongne_store_writes_failing 0.0"))
        await no_second_alert(near, mid)
    stored_once_each(db)


LISTENERS = (
    "SELECT pid FROM pg_stat_activity WHERE application_name = 'dongne listener'"
    " AND datname = current_database() ORDER BY pid"
)


async def test_no_event_is_lost_when_a_nodes_listen_connection_is_terminated(tmp_path: Path, db: str) -> None:
    """Terminate node B's LISTEN session (the asker's node) and answer at once on node A: what B missed meanwhile
    comes with its reconnection's catch-up (the periodic one is made too slow to help), once and in order,
    and B follows A's news again afterwards."""
    async with nodes(tmp_path, db, "b", DONGNE_CLUSTER_CATCH_UP_INTERVAL_S="600") as (b,):
        [(b_listener,)] = db_rows(db, LISTENERS)
        async with (
            nodes(tmp_path, db, "a", DONGNE_CLUSTER_CATCH_UP_INTERVAL_S="600") as (a,),
            AsyncExitStack() as stack,
        ):
            asker = await stack.enter_async_context(open_client(b.url, token("traveller")))
            qid = await ask(asker)
            answerers = [
                await stack.enter_async_context(open_client(a.url, token(f"l{i}", local=True))) for i in range(3)
            ]
            assert db_rows(db, "SELECT pg_terminate_backend(?)", (b_listener,)) == [(True,)]
            async with trio.open_nursery() as nursery:
                for i, local in enumerate(answerers):
                    nursery.start_soon(stored, local, "create_answer", {"question_id": qid, "content": f"answer {i}"})
            await collect(asker, up_to(3))
            listening = [pid for (pid,) in db_rows(db, LISTENERS)]
            assert len(listening) == 2 and b_listener not in listening
            await stored(answerers[0], "create_answer", {"question_id": qid, "content": "after"})
            await collect(asker, up_to(4))
            assert seqs(asker) == [1, 2, 3, 4]
    sql = "SELECT seq FROM events WHERE user_id = 'traveller' ORDER BY seq"
    assert db_rows(db, sql) == [(1,), (2,), (3,), (4,)]


async def test_nothing_acknowledged_is_lost_when_postgresql_stops_abruptly_under_the_nodes(
    tmp_path: Path, db: str, pg_cluster: Any
) -> None:
    """PostgreSQL stopped (``-m immediate``) and restarted while two nodes serve: a write meanwhile is refused
    (``unavailable``); every write acknowledged before or after is stored and delivered across the nodes,
    once, in order, and both nodes serve again without a restart."""
    async with (
        nodes(tmp_path, db) as (a, b),
        open_client(a.url, token("traveller")) as asker,
        open_client(b.url, token("local", local=True)) as local,
    ):
        qid = await ask(asker)
        acked = [(await stored(local, "create_answer", {"question_id": qid, "content": "before"}))["answer"]]
        got = await collect(asker, up_to(1))
        await an_answer_is_refused_while_postgresql_is_down(pg_cluster, local, qid)
        answer = {"question_id": qid, "content": "after"}
        acked.append((await stored(local, "create_answer", answer, timeout_s=40))["answer"])
        got += await collect(asker, up_to(2), timeout_s=30)
        await wait_until(answers_on(asker, qid, [x["answer_id"] for x in acked]), timeout_s=15)
        more = (await stored(asker, "create_question", question_data(title="And a second question?")))["question"]
        await wait_until(metrics(a, "dongne_store_writes_failing 0.0"))
        await wait_until(metrics(b, "dongne_store_writes_failing 0.0"))
        got += asker.pending_events()
        notices = [e["data"]["answer"]["answer_id"] for e in got if e["type"] == "answer_notification"]
        assert notices == [x["answer_id"] for x in acked]
        assert seqs(asker) == [1, 2]
    contents = sorted(content for (content,) in db_rows(db, "SELECT content FROM answers"))
    assert contents == ["after", "before"]
    assert db_rows(db, "SELECT count(*) FROM questions WHERE question_id = ?", (more["question_id"],)) == [(1,)]
    assert db_rows(db, "SELECT seq FROM events WHERE user_id = 'traveller' ORDER BY seq") == [(1,), (2,)]
