"""Positions through the store; every node's R-tree a replica of all nodes' (store/CLUSTER.md, "Nearest locals
across nodes").

"The other node" is the test (tests/test_multinode.py runs real ones): it
writes user rows (as the store writes them), ``positions`` rows and the
notification on ``dongne_positions`` itself. Real sockets, the real clock,
bounded waits.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import psycopg
import pytest
import trio

from dongne.client import DongneClient
from dongne.cluster import wall_ms
from dongne.core.effects import SaveUser
from dongne.core.escalation import DEFAULT_STAGES
from dongne.core.neighbourhood import Neighbourhood
from dongne.core.records import User
from dongne.core.settings import LocationSettings
from dongne.store._writes import prepare_writes

from .conftest import Harness, db_rows, question_data
from .test_cluster import wait_until
from .test_escalation import HERE, east

pytestmark = pytest.mark.backends("postgres")

SETTINGS: dict[str, Any] = {"location": {"min_update_interval_s": 0.0}, "cluster": {"positions_interval_s": 0.1}}
PEER = "peer"


def as_peer(db: str, *, users: Sequence[str] = (), sql: Sequence[tuple[str, tuple[Any, ...]]] = ()) -> None:
    """One transaction of the other node: local users' rows as its store writes them, then ``sql``."""
    batch = prepare_writes([SaveUser(User(u, u, local=True, created_at=1)) for u in users], 30000, "postgres")
    with psycopg.connect(db) as conn:
        conn.execute(
            "INSERT INTO cluster_nodes (node_id, host, pid, started_at, heartbeat_at) VALUES (%s, 'h', 1, %s, %s)"
            " ON CONFLICT (node_id) DO NOTHING",
            (PEER, wall_ms(), wall_ms()),
        )
        for statement, params, many in batch.statements:
            if many:
                conn.cursor().executemany(statement, params)
            else:
                conn.execute(statement, params)
        for statement, params in sql:
            conn.execute(statement, params)


def place(user_id: str, metres_east: float, region: str | None = None) -> tuple[str, tuple[Any, ...]]:
    at = east(metres_east)
    return (
        "INSERT INTO positions (user_id, lat, lng, at, region, node_id) VALUES (%s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (user_id, node_id) DO UPDATE SET lat = excluded.lat, lng = excluded.lng, at = excluded.at,"
        " region = excluded.region",
        (user_id, at["lat"], at["lng"], wall_ms(), region, PEER),
    )


def news(*users: str) -> tuple[str, tuple[Any, ...]]:
    return "SELECT pg_notify('dongne_positions', %s)", (
        f'{{"node": "{PEER}", "users": {list(users)!r}}}'.replace("'", '"'),
    )


def nearby(client: DongneClient, expected: dict[str, int]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await client.request("nearby_locals", {"location": dict(HERE)}) == expected

    return check


async def test_other_nodes_locals_count_nearby_and_are_planned_as_online(start_server: Any, db: str) -> None:
    """Locals placed by another node (first seen: their rows are read) are counted by nearby_locals and
    reached by stages as online users: a durable alert each, no push; one the other node drops is gone."""
    h: Harness = await start_server(**SETTINGS)
    as_peer(db, users=["r1", "r2"], sql=[place("r1", 1000, "Jeju-si"), place("r2", 4000, "Jeju-si"), news("r1", "r2")])
    async with h.connect("viewer", timeout=math.inf) as viewer:
        await wait_until(nearby(viewer, {"within_2km": 1, "within_5km": 2}))
        assert {"r1", "r2"} <= h.running.engine.users.keys()
        assert h.running.engine.where.online_locals_by_region() == {"Jeju-si": 2}  # the admin's counts too
        question = (await viewer.request("create_question", question_data(location=dict(HERE))))["question"]
        qid = question["question_id"]
        sql = "SELECT user_id, stage, online FROM notified WHERE question_id = ? ORDER BY user_id"
        assert db_rows(db, sql, (qid,)) == [("r1", "IMMEDIATE", 1)]  # with the ask's reply
        wanted = [("r1", "IMMEDIATE", 1), ("r2", "QUICK", 1)]
        await wait_until(lambda: trio.to_thread.run_sync(lambda: db_rows(db, sql, (qid,)) == wanted))
        await h.running.clients.pipeline.wait_idle()
        assert db_rows(db, "SELECT user_id, seq FROM events ORDER BY user_id") == [("r1", 1), ("r2", 1)]
        assert db_rows(db, "SELECT count(*) FROM push_outbox") == [(0,)]  # online elsewhere: no push

        as_peer(db, sql=[("DELETE FROM positions WHERE user_id = 'r1'", ()), news("r1")])
        await wait_until(nearby(viewer, {"within_2km": 0, "within_5km": 1}))
    await h.running.aclose()


async def test_a_users_row_is_written_in_batches_and_goes_with_their_last_connection(
    start_server: Any, db: str
) -> None:
    h: Harness = await start_server(**SETTINGS)
    node = h.running.membership.node_id
    rows = "SELECT user_id, node_id FROM positions"
    unplaced, placed = f"{rows} WHERE lat IS NULL", f"{rows} WHERE lat IS NOT NULL"
    async with h.connect("l1", local=True) as first:
        async with h.connect("l1", local=True) as second:
            await wait_until(lambda: trio.to_thread.run_sync(lambda: db_rows(db, unplaced) == [("l1", node)]))
            await second.request("update_location", {"location": east(500)})
            await wait_until(lambda: trio.to_thread.run_sync(lambda: db_rows(db, placed) == [("l1", node)]))
            [(lng,)] = db_rows(db, "SELECT lng FROM positions")
            await first.request("update_location", {"location": east(900)})
            await wait_until(
                lambda: trio.to_thread.run_sync(lambda: db_rows(db, "SELECT lng FROM positions") != [(lng,)])
            )
        batches = h.running.clients.positions.batches
        await trio.sleep(0.35)  # three intervals: still connected on ``first``, the row stays
        assert h.running.clients.positions.batches == batches
        assert db_rows(db, rows) == [("l1", node)]
    await wait_until(lambda: trio.to_thread.run_sync(lambda: db_rows(db, rows) == []))
    await h.running.aclose()


async def test_a_user_connected_to_another_node_gets_no_push_here(start_server: Any, db: str) -> None:
    """The asker left this node but the other node has a connection of theirs (a row without a position):
    an answer here is theirs live there, not a push; once that row is gone, the next answer is pushed."""
    h: Harness = await start_server(**SETTINGS)
    async with h.connect("asker") as asker:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
    unplaced = "INSERT INTO positions (user_id, lat, lng, at, node_id) VALUES ('asker', NULL, NULL, %s, %s)"
    as_peer(db, sql=[(unplaced, (wall_ms(), PEER)), news("asker")])
    engine = h.running.engine
    await wait_until(lambda: trio.to_thread.run_sync(lambda: engine.where.connected_elsewhere("asker")))
    assert "asker" in engine.where.online(set())  # online for the planner too, though placed nowhere
    pushes = "SELECT kind FROM push_outbox WHERE user_id = 'asker'"
    async with h.connect("local", local=True) as local:
        await local.request("create_answer", {"question_id": qid, "content": "Dombedon, by the port"})
        assert db_rows(db, pushes) == []

        as_peer(db, sql=[("DELETE FROM positions WHERE node_id = %s", (PEER,)), news("asker")])
        await wait_until(lambda: trio.to_thread.run_sync(lambda: not engine.where.connected_elsewhere("asker")))
        await local.request("create_answer", {"question_id": qid, "content": "Or Donsadon"})
        assert db_rows(db, pushes) == [("answer_notification",)]


async def test_a_node_its_peers_expired_writes_all_its_positions_again(start_server: Any, db: str) -> None:
    """A peer expired the node (a long pause) and deleted its rows; its next heartbeat makes its row again,
    and the next batch writes every position, moved or not."""
    h: Harness = await start_server(**SETTINGS)
    node = h.running.membership.node_id
    rows = "SELECT user_id, node_id FROM positions"
    async with h.connect("l1", local=True) as l1:
        await l1.request("update_location", {"location": east(500)})
        await wait_until(lambda: trio.to_thread.run_sync(lambda: db_rows(db, rows) == [("l1", node)]))
        as_peer(db, sql=[("DELETE FROM cluster_nodes WHERE node_id = %s", (node,))])
        peer = h.running.membership.link
        await trio.to_thread.run_sync(peer.drop_node_rows, [node])
        assert db_rows(db, rows) == []
        await h.running.membership.beat_async()
        await wait_until(lambda: trio.to_thread.run_sync(lambda: db_rows(db, rows) == [("l1", node)]))
    await h.running.aclose()


async def test_the_replica_is_rebuilt_from_the_table_after_the_listen_connection_is_terminated(
    start_server: Any, db: str
) -> None:
    """Rows changed without news are not seen until the LISTEN connection is made again: then the
    whole table is read, and the replica equals it."""
    h: Harness = await start_server(**SETTINGS)
    positions = h.running.clients.positions
    # The first rebuild (the LISTEN connection made) is read first: were it read after the news, it could
    # read r1 and the news's own read come after the silent change below.
    await wait_until(lambda: trio.to_thread.run_sync(lambda: positions.applied >= 1))
    as_peer(db, users=["r1", "r2"], sql=[place("r1", 1000), news("r1")])
    async with h.connect("viewer") as viewer:
        await wait_until(nearby(viewer, {"within_2km": 1, "within_5km": 1}))
        as_peer(db, sql=[("DELETE FROM positions WHERE user_id = 'r1'", ()), place("r2", 4000)])  # no news
        applied = positions.applied
        await trio.sleep(0.3)
        assert await nearby(viewer, {"within_2km": 1, "within_5km": 1})()
        assert positions.applied == applied

        listener = h.running.clients.listener
        [(ended,)] = db_rows(db, "SELECT count(pg_terminate_backend(?))", (listener.backend_pid,))
        assert ended == 1
        await wait_until(nearby(viewer, {"within_2km": 0, "within_5km": 1}))
        assert listener.connections == 2
    await h.running.aclose()


def test_the_core_keeps_other_nodes_locals_beside_its_own() -> None:
    """Sans I/O: remote locals enter the live index and count as online; a user connected here is placed
    by this node while connected and by the other node after; a rebuild drops whoever it does not list."""
    where = Neighbourhood(LocationSettings(), DEFAULT_STAGES)
    r1, r2, both = (User(u, u, local=True) for u in ("r1", "r2", "both"))
    for user in (r1, r2, both):
        where.refresh_local(user, 0)
    where.remote_moved(
        [("r1", 33.50, 126.53, "Jeju-si"), ("tourist", 33.50, 126.53, "Jeju-si"), ("both", 33.40, 126.50, None)], ()
    )  # tourist: no local
    assert ("r1" in where.live, "tourist" in where.live, where.live.position("both")) == (True, False, (33.40, 126.50))
    assert "r1" in where.online(set()) and "here" in where.online({"here"})

    slat, slng = where.move(both, 33.45, 126.52, None, 1_000)
    assert where.online_locals_by_region() == {"Jeju-si": 1}  # r1: the tourist is no local
    where.remote_moved([("both", 33.30, 126.40, None)], ())
    assert where.live.position("both") == (slat, slng)  # connected here: our position
    where.went_offline("both")
    assert where.live.position("both") == (33.30, 126.40)  # the other node's, still online there

    where.remote_moved([], ["r1"])
    assert "r1" not in where.live and "r1" not in where.online(set())
    where.remote_moved([("r2", 33.51, 126.54, "Jeju-si"), ("away", None, None, None)], [])
    assert ("r2" in where.live, where.connected_elsewhere("away"), "away" in where.live) == (True, True, False)
    assert where.online_locals_by_region() == {"Jeju-si": 1}  # r2 now; r1 is gone
    where.remote_moved([("r2", None, None, None)], [])  # connected there still, no longer placed
    assert "r2" not in where.live and where.connected_elsewhere("r2")
    assert where.online_locals_by_region() == {}
    where.remote_moved([("r2", 33.51, 126.54, "Jeju-si")], [], everyone=True)
    assert sorted(where.remote) == ["r2"] and "both" not in where.live and "r2" in where.live
