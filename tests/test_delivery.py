"""Durable events another node appended (store/CLUSTER.md): a SeqConflict moves this node's seqs on, and
other nodes' events reach this node's connections exactly once, in seq order, over real sockets and a real
PostgreSQL database. "Another node" is a psycopg connection of the test's committing as _writes.py does."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import psycopg
import pytest
import trio

from dongne.client import DongneClient, RequestError

from .conftest import Harness, db_rows, question_data

pytestmark = pytest.mark.backends("postgres")

OTHER_NODE = "node-b-4242-abcdef"


def other_node_appends(db: str, user_id: str, seqs: range, *, notify: bool = True) -> None:
    """Commit events for ``user_id`` as another node would: events, the head moved, news, in one transaction."""
    with psycopg.connect(db) as conn, conn.transaction():
        for seq in seqs:
            data = {"question_id": "q-elsewhere", "n": seq}
            conn.execute(
                "INSERT INTO events (user_id, seq, type, data, created_at) VALUES (%s, %s, %s, %s, %s)",
                (user_id, seq, "answer_notification", msgpack.packb(data), 1_000 + seq),
            )
        conn.execute(
            "INSERT INTO inbox_heads (user_id, last_seq) VALUES (%s, %s)"
            " ON CONFLICT (user_id) DO UPDATE SET last_seq = greatest(inbox_heads.last_seq, excluded.last_seq)",
            (user_id, seqs[-1]),
        )
        if notify:
            news = json.dumps({"node": OTHER_NODE, "heads": {user_id: seqs[-1]}})
            conn.execute("SELECT pg_notify('dongne_events', %s)", (news,))


async def durable_seqs(client: DongneClient, up_to: int, *, timeout: float = 10.0) -> list[int]:
    """The seqs of the durable events the client receives until one reaches ``up_to`` (bounded)."""
    seqs: list[int] = []
    with trio.fail_after(timeout):
        while not seqs or seqs[-1] < up_to:
            frame = await client.next_event()
            if "seq" in frame:
                seqs.append(frame["seq"])
    return seqs


async def answered_question(h: Harness, asker: DongneClient) -> str:
    """A question of the asker's, answered once by "local": the asker is at seq 1."""
    qid: str = (await asker.request("create_question", question_data()))["question"]["question_id"]
    async with h.connect("local") as local:
        await local.request("create_answer", {"question_id": qid, "content": "Dombedon, by the port"})
    assert await durable_seqs(asker, 1) == [1]
    return qid


def conn_of(h: Harness, user_id: str) -> int:
    (conn_id,) = h.running.engine.user_conns[user_id]
    return conn_id


async def test_a_seq_conflict_refuses_the_request_then_seqs_continue_from_the_head(start_server: Any) -> None:
    """Another node took seq 2 unannounced: the next event's commit is refused (``unavailable``), the asker
    gets seq 2 from the store, and the retried request commits seq 3: no gap, no duplicate."""
    h: Harness = await start_server()
    async with h.connect("asker") as asker, h.connect("local") as local:
        qid = await answered_question(h, asker)
        other_node_appends(str(h.db), "asker", range(2, 3), notify=False)

        with pytest.raises(RequestError) as refused:
            await local.request("create_answer", {"question_id": qid, "content": "Or Donsadon"})
        assert refused.value.code == "unavailable" and refused.value.error["retry_after_ms"] > 0
        with trio.fail_after(10):
            await h.running.clients.wait_reloaded()
        assert h.running.clients.writable
        await local.request("create_answer", {"question_id": qid, "content": "Or Donsadon"})

        assert await durable_seqs(asker, 3) == [2, 3]
        assert h.running.engine.users["asker"].last_seq == 3
        assert "dongne_seq_conflicts_total 1.0" in h.running.clients.metrics.render().decode()

    assert db_rows(h.db, "SELECT seq FROM events WHERE user_id = 'asker' ORDER BY seq") == [(1,), (2,), (3,)]
    assert db_rows(h.db, "SELECT last_seq FROM inbox_heads WHERE user_id = 'asker'") == [(3,)]
    assert db_rows(h.db, "SELECT count(*) FROM answers") == [(2,)]  # the refused answer is not there
