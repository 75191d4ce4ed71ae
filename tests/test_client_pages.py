"""``dongne.client.pages``: walking the read operations' lists against a real server."""

from __future__ import annotations

from typing import Any

import pytest

from dongne.client import PAGING, RequestError, open_session, pages

from .conftest import Harness, question_data, token

READS = {"reads_per_s": 1e6, "reads_burst": 1e6}


async def _all(client: Any, op: str, data: dict[str, Any] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    return [page async for page in pages(client, op, data, **kwargs)]


async def test_my_questions_page_by_page_newest_first(start_server: Any) -> None:
    h: Harness = await start_server(limits=READS)
    async with h.connect("asker") as asker:
        asked = [
            (await asker.request("create_question", question_data(title=f"Question {i}")))["question"]["question_id"]
            for i in range(5)
        ]
        got = await _all(asker, "my_questions", {"limit": 2})

    assert [len(page["questions"]) for page in got] == [2, 2, 1]
    assert [q["question_id"] for page in got for q in page["questions"]] == asked[::-1]
    assert got[-1]["next"] is None
    assert all(isinstance(page["next"], str) for page in got[:-1])


async def test_notifications_page_by_seq_and_answers_after_a_cursor(start_server: Any) -> None:
    """list_notifications pages by ``before_seq``/``next_before_seq``; get_question by ``answers_after``."""
    h: Harness = await start_server(limits=READS)
    async with h.connect("asker") as asker, h.connect("local", local=True) as local:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        answers = [
            (await local.request("create_answer", {"question_id": qid, "content": f"answer {i}"}))["answer"][
                "answer_id"
            ]
            for i in range(5)
        ]
        notes = await _all(asker, "list_notifications", {"limit": 2, "types": ["answer_notification"]})
        question = await _all(asker, "get_question", {"question_id": qid, "limit": 2})
        first_only = await _all(asker, "my_questions", {"limit": 1}, max_pages=1)

    assert [[n["seq"] for n in page["notifications"]] for page in notes] == [[5, 4], [3, 2], [1]]
    assert [page["next_before_seq"] for page in notes] == [4, 2, None]
    assert [a["answer_id"] for page in question for a in page["answers"]] == answers  # oldest first
    assert all(page["question"]["question_id"] == qid for page in question)
    assert len(first_only) == 1 and first_only[0]["next"] is None
    assert PAGING["list_notifications"] == ("before_seq", "next_before_seq")


async def test_pages_work_through_a_session_and_refuse_a_foreign_cursor(start_server: Any) -> None:
    h: Harness = await start_server(limits=READS)
    async with h.connect("asker") as asker, open_session(h.url, token("other"), timeout=5.0) as session:
        for i in range(3):
            await asker.request("create_question", question_data(title=f"Q{i}", hashtags=["food"]))
        browsed = await _all(session, "browse_questions", {"hashtag": "food", "limit": 2})
        mine = await asker.request("my_questions", {"limit": 1})
        with pytest.raises(RequestError) as refused:  # asker's cursor, another user and list
            await _all(session, "browse_questions", {"before": mine["next"]})

    assert [len(page["questions"]) for page in browsed] == [2, 1]
    assert refused.value.code == "invalid_field"
