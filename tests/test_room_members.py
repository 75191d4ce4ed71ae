"""Room members through the store; a join reply's ``online`` and ``typing`` cluster-wide (store/CLUSTER.md, "Room
members across nodes").

"The other node" is the test (tests/test_multinode.py runs real ones): it
writes ``room_members`` rows, the notification on ``dongne_members`` and its
relayed typing on ``dongne_rooms`` itself. Real sockets, the real clock,
bounded waits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from dongne.client import DongneClient
from dongne.store._writes import room_news

from .conftest import Harness, db_rows, question_data
from .test_cluster import wait_until
from .test_positions import PEER, as_peer

pytestmark = pytest.mark.backends("postgres")

SETTINGS: dict[str, Any] = {"cluster": {"positions_interval_s": 0.1}, "engine": {"typing_ttl_s": 1.0}}


def member(question_id: str, user_id: str) -> tuple[str, tuple[Any, ...]]:
    return "INSERT INTO room_members (question_id, user_id, node_id) VALUES (%s, %s, %s)", (question_id, user_id, PEER)


def news(*questions: str) -> tuple[str, tuple[Any, ...]]:
    return "SELECT pg_notify('dongne_members', %s)", (
        f'{{"node": "{PEER}", "questions": {list(questions)!r}}}'.replace("'", '"'),
    )


def relays(question_id: str, kind: str, user_id: str) -> tuple[str, tuple[Any, ...]]:
    data = {"question_id": question_id, "user_id": user_id, "nick": user_id.title()}
    return "SELECT pg_notify('dongne_rooms', %s)", (room_news(PEER, question_id, kind, data),)


def room(client: DongneClient, qid: str, expected: dict[str, list[str]]) -> Callable[[], Awaitable[bool]]:
    """Whether a join reply (joining twice is harmless) lists these users online and typing."""

    async def check() -> bool:
        reply = await client.request("join_question", {"question_id": qid})
        online = [u["user_id"] for u in reply["online"]]
        assert reply["online_count"] == len(online)
        return {"online": online, "typing": [u["user_id"] for u in reply["typing"]]} == expected

    return check


async def test_members_and_typers_on_another_node_are_listed_in_a_join_reply_until_they_go(
    start_server: Any, db: str
) -> None:
    """A member connected to the other node (their user row read when first seen) and a typer there appear
    in this node's join reply; a user in the room on both nodes is listed once; the member leaves with their
    row, the typer at their stop or when their typing expires unrenewed."""
    h: Harness = await start_server(**SETTINGS)
    async with h.connect("asker") as asker:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        as_peer(db, users=["far"], sql=[member(qid, "far"), member(qid, "asker"), news(qid)])
        as_peer(db, sql=[relays(qid, "user_typing", "typer")])
        await wait_until(room(asker, qid, {"online": ["asker", "far"], "typing": ["typer"]}))
        assert h.running.engine.users["far"].nick == "far"  # adopted: their row, not the id as a name

        as_peer(db, sql=[relays(qid, "user_stop_typing", "typer")])
        await wait_until(room(asker, qid, {"online": ["asker", "far"], "typing": []}))
        as_peer(db, sql=[relays(qid, "user_typing", "typer")])  # and no stop: it expires
        await wait_until(room(asker, qid, {"online": ["asker", "far"], "typing": ["typer"]}))
        await wait_until(room(asker, qid, {"online": ["asker", "far"], "typing": []}), timeout_s=5.0)

        as_peer(db, sql=[("DELETE FROM room_members WHERE user_id = 'far'", ()), news(qid)])
        await wait_until(room(asker, qid, {"online": ["asker"], "typing": []}))
    await h.running.aclose()


async def test_a_users_room_row_is_written_in_batches_and_goes_with_their_last_connection_in_the_room(
    start_server: Any, db: str
) -> None:
    """The row comes with the first join and stays while one of the user's connections is in the room here;
    the node's stop deletes the rest and tells the other nodes to rebuild."""
    h: Harness = await start_server(**SETTINGS)
    node = h.running.membership.node_id
    rows = "SELECT question_id, user_id, node_id FROM room_members ORDER BY question_id, user_id"

    def in_table(expected: list[tuple[str, ...]]) -> Callable[[], Awaitable[bool]]:
        return lambda: trio.to_thread.run_sync(lambda: db_rows(db, rows) == expected)

    async with h.connect("asker") as asker, h.connect("watcher") as first, h.connect("watcher") as second:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        await wait_until(in_table([(qid, "asker", node)]))
        await first.request("join_question", {"question_id": qid})
        await second.request("join_question", {"question_id": qid})
        await wait_until(in_table([(qid, "asker", node), (qid, "watcher", node)]))
        await first.request("leave_question", {"question_id": qid})
        batches = h.running.clients.members.batches
        await trio.sleep(0.35)  # three intervals: still in the room on ``second``, the row stays
        assert h.running.clients.members.batches == batches
        assert db_rows(db, rows) == [(qid, "asker", node), (qid, "watcher", node)]
        await second.request("leave_question", {"question_id": qid})
        await wait_until(in_table([(qid, "asker", node)]))
    await h.running.aclose()
    assert db_rows(db, rows) == []


async def test_the_members_replica_is_rebuilt_from_the_table_after_the_listen_connection_is_terminated(
    start_server: Any, db: str
) -> None:
    """Rows changed without news are not seen until the LISTEN connection is made again: then the whole
    table is read, and the replica equals it."""
    h: Harness = await start_server(**SETTINGS)
    members = h.running.clients.members
    await wait_until(lambda: trio.to_thread.run_sync(lambda: members.applied >= 1))  # the first rebuild
    async with h.connect("asker") as asker:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        as_peer(db, users=["r1", "r2"], sql=[member(qid, "r1"), news(qid)])
        await wait_until(room(asker, qid, {"online": ["asker", "r1"], "typing": []}))
        as_peer(db, sql=[("DELETE FROM room_members WHERE user_id = 'r1'", ()), member(qid, "r2")])  # no news
        applied = members.applied
        await trio.sleep(0.3)
        assert await room(asker, qid, {"online": ["asker", "r1"], "typing": []})()
        assert members.applied == applied

        listener = h.running.clients.listener
        [(ended,)] = db_rows(db, "SELECT count(pg_terminate_backend(?))", (listener.backend_pid,))
        assert ended == 1
        await wait_until(room(asker, qid, {"online": ["asker", "r2"], "typing": []}))
        assert listener.connections == 2
    await h.running.aclose()
