"""Push jobs for offline targets reach a (fake) push gateway over real HTTP."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio

from dongne.core.effects import CancelPushes, CountAnswer, SaveAnswer, SaveQuestion, SaveUser
from dongne.core.moderation import FOREVER
from dongne.store import restore_snapshot, take_snapshot

from .conftest import Harness, db_rows, question_data
from .test_cluster_state import other_node_commits

HALL = {"lat": 33.4996, "lng": 126.5312}
ONE_STAGE = [{"name": "QUICK", "offset_s": 0.0, "radius_m": 5000.0, "audience": "nearby"}]


class FakeGateway:
    """A push gateway on 127.0.0.1 that records each POST and answers with ``status``."""

    def __init__(self, status: int, delay_s: float = 0.0) -> None:
        self.status = status
        self.delay_s = delay_s  # how long it takes to answer each POST
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/push"

    async def received(self, count: int) -> None:
        """Return once ``count`` POSTs have come (another server's: no event to wait on), within 10 s."""
        with trio.fail_after(10):
            while len(self.requests) < count:  # noqa: ASYNC110
                await trio.sleep(0.01)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                    body = b""
                    while not isinstance(ev := conn.next_event(), h11.EndOfMessage):
                        if ev is h11.NEED_DATA:
                            conn.receive_data(await stream.receive_some(65536))
                        elif isinstance(ev, h11.Data):
                            body += ev.data
                    self.requests.append((headers, json.loads(body)))
                    if self.delay_s:
                        await trio.sleep(self.delay_s)
                    reply = conn.send(h11.Response(status_code=self.status, headers=[("content-length", "2")]))
                    await stream.send_all(reply + conn.send(h11.Data(data=b"{}")) + conn.send(h11.EndOfMessage()))
                    conn.start_next_cycle()
                else:
                    return


async def _offline_local_with_home(h: Harness) -> None:
    async with h.connect("sleeper", local=True) as sleeper:
        await sleeper.request("update_settings", {"home": HALL})


async def _pushing_to(gateway: FakeGateway, start_server: Any, nursery: trio.Nursery, **escalation: Any) -> Harness:
    """``gateway`` started, and a server with one stage pushing to it, where a local is offline at home by HALL."""
    await nursery.start(gateway.serve)
    h: Harness = await start_server(escalation={"stages": ONE_STAGE, "push_url": gateway.url, **escalation})
    await _offline_local_with_home(h)
    return h


async def test_offline_target_is_pushed_with_the_urgent_flag(start_server, nursery, db_path) -> None:  # type: ignore[no-untyped-def]
    gateway = FakeGateway(200)
    h = await _pushing_to(gateway, start_server, nursery)
    async with h.connect("traveller") as asker:
        qid = (await asker.request("create_question", question_data(location=HALL, urgency="urgent")))["question"][
            "question_id"
        ]
    with trio.fail_after(10):
        await h.running.pushes.wait_sent(1)
    headers, body = gateway.requests[0]
    assert body["user_id"] == "sleeper"
    assert body["urgent"] is True
    assert body["type"] == "new_question_notification"
    assert body["data"]["question_id"] == qid
    assert body["data"]["priority"] == "critical"
    await h.running.aclose()
    with sqlite3.connect(db_path) as conn:
        [(incarnation,)] = conn.execute("SELECT incarnation FROM store_incarnation").fetchall()
        assert headers["idempotency-key"] == f"dongne-push-{incarnation}-{body['job_id']}"
        assert conn.execute("SELECT status, attempts FROM push_outbox").fetchall() == [("sent", 1)]
    # The durable notification is in the inbox too, for when the app opens.
    h2 = await start_server(escalation={"stages": ONE_STAGE})
    async with h2.connect("sleeper", resume_from=0, local=True) as sleeper:
        note = await sleeper.next_event("new_question_notification")
        assert note["data"]["question_id"] == qid
    await h2.running.aclose()


async def test_failing_gateway_gets_three_attempts_then_failed(start_server, nursery, db_path) -> None:  # type: ignore[no-untyped-def]
    gateway = FakeGateway(503)
    h = await _pushing_to(gateway, start_server, nursery, push_backoff_s=0.001)
    async with h.connect("traveller") as asker:
        await asker.request("create_question", question_data(location=HALL))
    with trio.fail_after(10):
        await h.running.pushes.wait_failed(1)
    assert len(gateway.requests) == 3
    assert {r[1]["urgent"] for r in gateway.requests} == {False}
    await h.running.aclose()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT status, attempts, last_error FROM push_outbox").fetchall() == [
            ("failed", 3, "HTTP 503")
        ]


async def test_without_a_url_jobs_are_only_recorded(start_server, db_path) -> None:  # type: ignore[no-untyped-def]
    """Recorded settled ('unsent'), not pending: no later start reads them again."""
    h = await start_server(escalation={"stages": ONE_STAGE})
    await _offline_local_with_home(h)
    async with h.connect("traveller") as asker:
        await asker.request("create_question", question_data(location=HALL))
    with trio.fail_after(10):
        while h.running.pushes.statistics().unsent < 1:  # noqa: ASYNC110 - the dispatcher's record
            await trio.sleep(0.01)
    await h.running.aclose()
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("SELECT user_id, status, attempts, last_error FROM push_outbox").fetchall()
    assert rows == [("sleeper", "unsent", 0, "no URL configured")]
    assert h.running.pushes.sent == 0


@pytest.mark.parametrize("takedown", ["hide_question", "delete_question", "hide_answer", "ban_target"])
async def test_a_push_taken_down_before_it_leaves_is_cancelled(start_server, nursery, db_path, takedown) -> None:  # type: ignore[no-untyped-def]
    """The gateway fails the first attempt; before the retry, the question (or the answer) is hidden or
    deleted, or the target banned: no retry, the job is 'cancelled', and no restart sends it."""
    gateway = FakeGateway(503)
    h = await _pushing_to(gateway, start_server, nursery, push_backoff_s=60.0)
    async with h.connect("spammer") as asker:
        qid = (await asker.request("create_question", question_data(location=HALL)))["question"]["question_id"]
    # The asker's app is in the background: an answer is pushed.
    async with h.connect("answerer") as answerer, h.connect("ops", admin=True) as admin:
        if takedown == "hide_answer":
            reply = await answerer.request("create_answer", {"question_id": qid, "content": "the jerk's car"})
        await gateway.received(2 if takedown == "hide_answer" else 1)  # 503 first
        gateway.status = 200
        if takedown == "hide_question":
            await admin.request("hide_question", {"id": qid, "reason": "spam"})
        elif takedown == "hide_answer":
            await admin.request("hide_answer", {"id": reply["answer"]["answer_id"], "reason": "abuse"})
        elif takedown == "ban_target":
            await admin.request("ban_user", {"user_id": "sleeper", "reason": "spam"})
        else:
            async with h.connect("spammer") as asker:
                await asker.request("delete_question", {"question_id": qid})
        with trio.fail_after(10):
            while h.running.pushes.statistics().dropped < 1:  # noqa: ASYNC110 - the retry, 60 s away, dropped now
                await trio.sleep(0.01)
    requests = len(gateway.requests)
    await h.running.aclose()
    with sqlite3.connect(db_path) as conn:
        rows = dict(conn.execute("SELECT kind, status FROM push_outbox").fetchall())
    if takedown == "hide_answer":  # the answer's push is cancelled, the question's alert is not
        assert rows == {"new_question_notification": "pending", "answer_notification": "cancelled"}
    else:
        assert rows == {"new_question_notification": "cancelled"}
    h2 = await start_server(escalation={"stages": ONE_STAGE, "push_url": gateway.url})
    with trio.fail_after(10):
        await h2.running.pushes.wait_sent(1 if takedown == "hide_answer" else 0)  # the alert only
    await h2.running.aclose()
    assert len(gateway.requests) == requests + (1 if takedown == "hide_answer" else 0)


@pytest.mark.backends("postgres")
@pytest.mark.parametrize("takedown", ["hide_question", "delete_answer", "ban_target"])
async def test_a_push_another_node_takes_down_before_it_leaves_is_dropped_here(start_server, nursery, takedown) -> None:  # type: ignore[no-untyped-def]
    """As above, the take-down committed by another node (its CancelPushes, its news): the job this node's
    dispatcher holds between attempts is dropped here too (it was retried, and sent)."""
    gateway = FakeGateway(503)
    h = await _pushing_to(gateway, start_server, nursery, push_backoff_s=60.0)
    engine = h.running.engine
    async with h.connect("spammer") as asker:
        qid = (await asker.request("create_question", question_data(location=HALL)))["question"]["question_id"]
    async with h.connect("answerer") as answerer:
        if takedown == "delete_answer":
            reply = await answerer.request("create_answer", {"question_id": qid, "content": "the jerk's car"})
        await gateway.received(2 if takedown == "delete_answer" else 1)  # 503 first
    now = int(time.time() * 1000)
    if takedown == "hide_question":
        hidden = attrs.evolve(engine.questions[qid], deleted_at=now, hidden=True)
        writes: list[Any] = [SaveQuestion(hidden), CancelPushes(now, question_id=qid)]
    elif takedown == "delete_answer":
        answer_id = reply["answer"]["answer_id"]
        deleted = attrs.evolve(engine.answers[qid][answer_id], deleted_at=now)
        writes = [
            SaveAnswer(deleted),
            CountAnswer(qid, -1, answer_id=answer_id),
            CancelPushes(now, question_id=qid, answer_id=answer_id),
        ]
    else:
        banned = attrs.evolve(engine.users["sleeper"], banned_until=FOREVER, ban_reason="spam")
        writes = [SaveUser(banned, changed={"ban"}), CancelPushes(now, user_id="sleeper")]
    other_node_commits(h.db, writes)

    with trio.fail_after(10):
        while h.running.pushes.statistics().dropped < 1:  # noqa: ASYNC110 - the retry, 60 s away, dropped now
            await trio.sleep(0.01)
    kind = "answer_notification" if takedown == "delete_answer" else "new_question_notification"
    assert db_rows(h.db, "SELECT status FROM push_outbox WHERE kind = ?", (kind,)) == [("cancelled",)]


@pytest.mark.backends("sqlite")
async def test_a_graceful_stop_lets_a_push_under_way_finish_and_records_it(start_server, nursery, db_path) -> None:  # type: ignore[no-untyped-def]
    """A push the gateway is answering when the server is told to stop is waited for (within the shutdown's
    bound) and recorded as sent: not sent again at the next start (PROTOCOL.md: a job is resent only after a
    crash)."""
    gateway = FakeGateway(200, delay_s=0.5)
    h = await _pushing_to(gateway, start_server, nursery)
    async with h.connect("traveller") as asker:
        await asker.request("create_question", question_data(location=HALL))
    await gateway.received(1)
    await h.running.aclose()  # the gateway's 200 is half a second away
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT status FROM push_outbox").fetchall() == [("sent",)]
    assert len(gateway.requests) == 1


@pytest.mark.backends("sqlite")
async def test_a_graceful_stop_cuts_a_retrys_backoff_short_and_posts_nothing_more(
    start_server, nursery, db_path
) -> None:  # type: ignore[no-untyped-def]
    """A job refused once waits out its backoff before the next attempt: a stop then starts no attempt (and does
    not wait for the backoff); the job stays pending, for the next start."""
    gateway = FakeGateway(503)
    h = await _pushing_to(gateway, start_server, nursery, push_backoff_s=60.0)
    async with h.connect("traveller") as asker:
        await asker.request("create_question", question_data(location=HALL))
    await gateway.received(1)
    gateway.status = 200
    with trio.fail_after(h.running.clients.settings.shutdown_timeout_s):  # not the 60 s backoff
        await h.running.aclose()
    assert len(gateway.requests) == 1
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT status FROM push_outbox").fetchall() == [("pending",)]


async def test_a_restore_gives_push_keys_the_gateway_has_not_seen(start_server, nursery, db_path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Job ids continue from the highest in the database: after a restore, from the snapshot's, so jobs made
    after the snapshot (and received by the gateway) have their ids given again. The restored database's new
    incarnation keeps their Idempotency-Keys new: a gateway that drops repeats would drop real alerts."""
    gateway = FakeGateway(200)
    h = await _pushing_to(gateway, start_server, nursery)
    titles = iter(["Before the snapshot", "After the snapshot", "After the restore"])

    async def ask_and_stop(h: Harness) -> None:
        async with h.connect("traveller") as asker:
            await asker.request("create_question", question_data(location=HALL, title=next(titles)))
        with trio.fail_after(10):
            await h.running.pushes.wait_sent(1)
        await h.running.aclose()

    await ask_and_stop(h)
    snapshot = take_snapshot(db_path, Path(tmp_path) / "snaps")
    await ask_and_stop(await start_server(escalation={"stages": ONE_STAGE, "push_url": gateway.url}))
    restore_snapshot(snapshot, db_path)
    await ask_and_stop(await start_server(escalation={"stages": ONE_STAGE, "push_url": gateway.url}))

    keys = [headers["idempotency-key"] for headers, _ in gateway.requests]
    assert [body["job_id"] for _, body in gateway.requests] == [1, 2, 2]  # the id is given again ...
    assert len(set(keys)) == 3  # ... but not the key
