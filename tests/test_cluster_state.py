"""Questions and users another node changes (store/CLUSTER.md), over real sockets and real databases.

"Another node" is SQL from the test, on a connection of its own: it changes rows as another ``dongne serve``
would, with or without its notifications.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from dongne.client import DongneClient, RequestError
from dongne.core.lifecycle import QuestionStatus
from dongne.store import is_postgres_url

from .conftest import Harness, db_rows, question_data


def other_node_runs(db: Path | str, sql: str, params: tuple[Any, ...] = ()) -> None:
    """Commit one statement (``?`` parameters) as another node would, on either backend."""
    if is_postgres_url(str(db)):
        import psycopg

        with psycopg.connect(str(db), autocommit=True) as conn:
            conn.execute(sql.replace("?", "%s"), params)
        return
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        conn.execute(sql, params)
        conn.commit()


async def answered_twice(h: Harness, asker: DongneClient) -> tuple[str, str, str]:
    """A question of the asker's with answers by "local" and "other": ``(question, local's, other's)``."""
    qid: str = (await asker.request("create_question", question_data()))["question"]["question_id"]
    ids = []
    for author in ("local", "other"):
        async with h.connect(author) as client:
            reply = await client.request("create_answer", {"question_id": qid, "content": f"ask {author}"})
            ids.append(reply["answer"]["answer_id"])
    return qid, ids[0], ids[1]


@pytest.mark.backends("sqlite", "postgres")
async def test_an_accept_another_node_made_first_refuses_this_one_with_conflict(start_server: Any) -> None:
    """The asker accepted local's answer on another node; accepting other's here is refused with
    ``conflict``, and by then memory holds the store's question (the winner), nothing of the refused
    accept is stored, and writes go on."""
    h: Harness = await start_server()
    async with h.connect("asker") as asker:
        qid, local_answer, other_answer = await answered_twice(h, asker)
        other_node_runs(
            h.db,
            "UPDATE questions SET status = 'resolved', accepted_answer_id = ?, closed_at = ? WHERE question_id = ?",
            (local_answer, 1_000, qid),
        )

        with pytest.raises(RequestError) as refused:
            await asker.request("accept_answer", {"question_id": qid, "answer_id": other_answer})

        assert refused.value.code == "conflict" and refused.value.error["question_id"] == qid
        question = h.running.engine.questions[qid]
        assert (question.status, question.accepted_answer_id) == (QuestionStatus.RESOLVED, local_answer)
        seen = await asker.request("get_question", {"question_id": qid})
        assert seen["question"]["accepted_answer_id"] == local_answer
        assert h.running.engine.users["other"].points == 0
        assert h.running.clients.writable
        await asker.request("create_question", question_data(title="And a second question, after the race"))
        with pytest.raises(RequestError) as again:  # now known here: the engine's own answer
            await asker.request("accept_answer", {"question_id": qid, "answer_id": other_answer})
        assert again.value.code == "already_accepted"

    assert db_rows(h.db, "SELECT accepted_answer_id FROM questions WHERE question_id = ?", (qid,)) == [(local_answer,)]
    assert db_rows(h.db, "SELECT points FROM users WHERE user_id = 'other'") == [(0,)]
    assert db_rows(h.db, "SELECT count(*) FROM questions") == [(2,)]
    assert "dongne_question_conflicts_total 1.0" in h.running.clients.metrics.render().decode()


@pytest.mark.backends("sqlite", "postgres")
async def test_an_answer_to_a_question_another_node_closed_is_refused_with_conflict(start_server: Any) -> None:
    h: Harness = await start_server()
    async with h.connect("asker") as asker, h.connect("local") as local:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        other_node_runs(h.db, "UPDATE questions SET status = 'closed', closed_at = 1000 WHERE question_id = ?", (qid,))

        with pytest.raises(RequestError) as refused:
            await local.request("create_answer", {"question_id": qid, "content": "Too late, it seems"})

        assert refused.value.code == "conflict"
        assert h.running.engine.questions[qid].status == QuestionStatus.CLOSED
        with pytest.raises(RequestError) as again:
            await local.request("create_answer", {"question_id": qid, "content": "Too late, it seems"})
        assert again.value.code == "question_closed"
    assert db_rows(h.db, "SELECT count(*), 0 FROM answers") == [(0, 0)]
    assert db_rows(h.db, "SELECT answer_count FROM questions") == [(0,)]
