"""Storage faults over real sockets: a full disk and a lock held by another program (SQLite); the
writer's PostgreSQL session terminated under the server.

Writes that cannot be committed get ``unavailable`` and are never
acknowledged; reads and live operations go on; /ready turns 503 and back;
the server recovers by itself once a write succeeds; after a SIGKILL every
acknowledged write is in the database and nothing refused is.
"""

from __future__ import annotations

import functools
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import trio
import trio_websocket

from dongne.app import Running, run_server
from dongne.auth import mint_token
from dongne.client import DongneClient, RequestError, open_client
from dongne.pipeline import WAL_CHECKPOINT_COMMITS
from dongne.store import Store

from .conftest import Harness, db_rows, make_settings, question_data, token
from .served import ServedProcess, serve_process
from .test_push import FakeGateway

SECRET = "storage-faults-secret-0123456789-0123456789"
HALL = {"lat": 33.4996, "lng": 126.5312}
FILLER = " ".join(f"word{j}" for j in range(250))  # ~1.7 KB of answer text


@contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` for the test (root only: skipped, with the reason, elsewhere)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def serve(tmp_path: Path, db: Path) -> AbstractAsyncContextManager[ServedProcess]:
    """``dongne serve`` on ``db`` (snapshots off, write limits out of the way); SIGKILLed on the way out if still running."""
    (tmp_path / "config.toml").write_text(
        "[snapshots]\ninterval_s = 0\n"
        "[limits]\nwrites_per_minute = 1e9\nwrites_burst = 1e9\nconn_per_s = 1e9\nconn_burst = 1e9\n"
    )
    return serve_process(tmp_path, db, secret=SECRET, config=tmp_path / "config.toml")


async def when_writes_work(
    client: DongneClient, op: str, data: dict[str, Any], timeout_s: float = 20
) -> dict[str, Any]:
    """``op``'s reply once writes work again: ``unavailable`` meanwhile, retried after its ``retry_after_ms``."""
    with trio.fail_after(timeout_s):
        while True:
            try:
                return await client.request(op, data)
            except RequestError as exc:
                assert exc.code == "unavailable"
                await trio.sleep(exc.error["retry_after_ms"] / 1000)


def signed(user: str, **claims: Any) -> str:
    return mint_token(SECRET, user, now_s=time.time(), **claims)


def fill(disk: Path, leave: int) -> Path:
    """Fill the disk but for about ``leave`` bytes; returns the ballast file."""
    ballast = disk / "ballast"
    free = shutil.disk_usage(disk).free
    with ballast.open("wb") as out:
        out.write(b"\0" * max(0, free - leave))
    return ballast


async def test_a_full_disk_refuses_writes_keeps_serving_and_recovers(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "8m") as disk:
        db = disk / "dongne.sqlite3"
        acked: list[str] = []  # answers the server acknowledged
        refused: list[str] = []  # answers it refused with "unavailable"
        async with (
            serve(tmp_path, db) as server,
            httpx.AsyncClient() as http,
            open_client(server.url, signed("asker")) as asker,
            open_client(server.url, signed("local", local=True)) as local,
            open_client(server.url, signed("bystander")) as bystander,
        ):
            question = (await asker.request("create_question", question_data(location=HALL)))["question"]
            qid = question["question_id"]
            ballast = fill(disk, leave=256 * 1024)
            for i in range(5000):
                marker = f"answer-{i:05d}"
                try:
                    await local.request("create_answer", {"question_id": qid, "content": f"{marker} {FILLER}"})
                except RequestError as exc:
                    assert exc.code == "unavailable", exc
                    assert exc.error["retry_after_ms"] > 0
                    refused.append(marker)
                    break
                acked.append(marker)
            assert refused, "the disk never filled up"
            assert acked, "not one answer fitted"

            # The server is up; reads and live operations work; writes are refused, never acknowledged.
            assert (await http.get(server.ops("/health"))).status_code == 200
            ready = await http.get(server.ops("/ready"))
            assert (ready.status_code, ready.json()) == (503, {"ready": False})
            assert "dongne_store_writes_failing 1.0" in (await http.get(server.ops("/metrics"))).text
            joined = await bystander.request("join_question", {"question_id": qid})
            assert joined["question"]["question_id"] == qid
            assert await bystander.request("typing_start", {"question_id": qid})
            nearby = await bystander.request("nearby_questions", {"location": HALL})
            assert qid in [q["question_id"] for q in nearby["questions"]]
            with pytest.raises(RequestError) as during:
                await bystander.request("create_question", question_data(location=HALL, title="during the outage"))
            assert during.value.code == "unavailable"

            # Space comes back: the next write goes through, with no restart.
            await trio.Path(ballast).unlink()
            await when_writes_work(local, "create_answer", {"question_id": qid, "content": "after-recovery"})
            assert (await http.get(server.ops("/ready"))).status_code == 200
            assert "dongne_store_writes_failing 0.0" in (await http.get(server.ops("/metrics"))).text
            server.proc.kill()  # SIGKILL: no graceful shutdown
            await server.proc.wait()
        log = server.log.read_text(errors="replace")
        assert log.count('"storage_failing"') == 1 and log.count('"storage_recovered"') == 1, log[-3000:]
        assert "Traceback" not in log

        with sqlite3.connect(db) as conn:
            stored = [row[0].split(" ", 1)[0] for row in conn.execute("SELECT content FROM answers")]
            titles = [row[0] for row in conn.execute("SELECT title FROM questions")]
    assert sorted(stored) == sorted([*acked, "after-recovery"])  # every acknowledged one; no refused one
    assert "during the outage" not in titles


async def test_a_lock_held_by_another_program_refuses_writes_until_it_is_released(
    start_server: Any, db_path: Path, nursery: trio.Nursery
) -> None:
    webhook = FakeGateway(200)
    await nursery.start(webhook.serve)
    h: Harness = await start_server(
        store={"busy_timeout_s": 0.2}, alerts={"webhook_url": f"http://127.0.0.1:{webhook.port}/alerts"}
    )
    async with h.connect("asker") as asker, h.connect("reader") as reader, h.connect("ops", admin=True) as admin:
        question = (await asker.request("create_question", question_data()))["question"]
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another program takes the write lock and keeps it
        try:
            with pytest.raises(RequestError) as refused:
                await asker.request("close_question", {"question_id": question["question_id"]})
            assert refused.value.code == "unavailable"
            assert not h.running.clients.writable
            failing = await admin.next_event("storage_alert")
            assert failing["data"]["state"] == "failing" and "locked" in failing["data"]["error"]
            # The engine refuses writes at once now, without waiting on the lock.
            with pytest.raises(RequestError) as again:
                await asker.request("create_question", question_data(title="while locked"))
            assert again.value.code == "unavailable"
            await h.running.clients.wait_reloaded()
            got = await reader.request("join_question", {"question_id": question["question_id"]})
            assert got["question"]["status"] == "open"  # memory was rebuilt from what the database holds
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        closed = await when_writes_work(asker, "close_question", {"question_id": question["question_id"]})
        assert closed["question"]["status"] == "closed"
        assert h.running.clients.writable
        assert (await admin.next_event("storage_alert"))["data"]["state"] == "recovered"
        with trio.fail_after(10):
            await h.running.pushes.wait_sent(2)
    await h.running.aclose()
    posted = [(body["type"], body["data"]["state"]) for _headers, body in webhook.requests]
    assert posted == [("storage_alert", "failing"), ("storage_alert", "recovered")]
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("SELECT title, status FROM questions ORDER BY created_at").fetchall()
    assert rows == [(question["title"], "closed")]


@pytest.mark.backends("sqlite")
async def test_questions_refused_through_an_outage_leave_the_askers_burst_whole(
    start_server: Any, db_path: Path
) -> None:
    """Six questions asked while another program holds the write lock (the first decided, its commit failed;
    the others refused at once) are all unavailable; once writes work, the asker's burst of five is whole."""
    from .conftest import UNLIMITED

    h: Harness = await start_server(store={"busy_timeout_s": 0.2}, limits={**UNLIMITED, "questions_burst": 5.0})
    async with h.connect("asker") as asker:
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            for i in range(6):
                with pytest.raises(RequestError) as refused:
                    await asker.request("create_question", question_data(title=f"while locked {i}"))
                assert refused.value.code == "unavailable"
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        await when_writes_work(asker, "create_question", question_data(title="asked 0"))
        for i in range(1, 5):
            await asker.request("create_question", question_data(title=f"asked {i}"))
    await h.running.aclose()
    assert len(db_rows(db_path, "SELECT title FROM questions")) == 5


@pytest.mark.backends("sqlite")
async def test_another_programs_read_transaction_does_not_hold_the_shutdown(start_server: Any, db_path: Path) -> None:
    """The last checkpoint at close does not wait for a reader (the sqlite3 shell, a backup): it would hold the
    shutdown for the whole busy timeout, past shutdown_timeout_s (and systemd's stop timeout)."""
    h: Harness = await start_server(store={"busy_timeout_s": 30.0})
    async with h.connect("asker") as asker:
        title = (await asker.request("create_question", question_data()))["question"]["title"]
    reader = sqlite3.connect(db_path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM questions").fetchone()  # a read transaction stays open
    try:
        with trio.fail_after(h.running.clients.settings.shutdown_timeout_s + 2):
            await h.running.aclose()
    finally:
        reader.close()
    again: Harness = await start_server()
    async with again.connect("asker") as asker:
        mine = await asker.request("my_questions", {})
    assert [q["title"] for q in mine["questions"]] == [title]  # what the WAL kept was replayed


async def test_a_wal_checkpoint_on_a_full_disk_is_logged_and_tried_again_later(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk fills up while commits still fit into the WAL's old frames: the checkpoint, which must grow
    the database file, fails. The server goes on, and checkpoints again once there is room."""
    with small_disk(tmp_path / "disk", "256m") as disk:
        db = disk / "dongne.sqlite3"
        running: Running = await nursery.start(functools.partial(run_server, make_settings(db)))
        h = Harness(running, db)
        store = running.store
        assert isinstance(store, Store)
        async with h.connect("asker") as asker, h.connect("local", local=True) as local:
            qid = (await asker.request("create_question", question_data(location=HALL)))["question"]["question_id"]
            while store.checkpoints < 2:  # one round of checkpoints: the WAL starts over at the next commit
                await local.request("create_answer", {"question_id": qid, "content": f"before {FILLER}"})
            ballast = fill(disk, leave=0)

            def checkpoint_failed() -> bool:
                return any(r.getMessage() == "wal_checkpoint_failed" for r in caplog.records)

            for i in range(2 * WAL_CHECKPOINT_COMMITS):
                try:  # short answers: they fit into the frames the WAL has, until it must grow past them
                    await local.request("create_answer", {"question_id": qid, "content": f"full {i}"})
                except RequestError as exc:
                    assert exc.code == "unavailable"
                if checkpoint_failed():
                    break
            assert checkpoint_failed()
            assert store.checkpoints == 2
            assert "dongne_store_write_failures_total 0.0" not in running.clients.metrics.render().decode()
            # The server is still up: reads work, and so do writes once there is room again.
            assert (await asker.request("get_question", {"question_id": qid}))["question"]["question_id"] == qid
            await trio.Path(ballast).unlink()
            await when_writes_work(local, "create_answer", {"question_id": qid, "content": "after"})
            with trio.fail_after(60):
                while store.checkpoints < 4:  # the next round, once as many commits again were made
                    await local.request("create_answer", {"question_id": qid, "content": "after"})
    running.stop()


async def test_a_read_and_a_hello_queued_behind_a_failed_commit_do_not_show_what_it_held(
    start_server: Any, db_path: Path
) -> None:
    """Decided while the commit waited on a lock, on memory holding its answer: the read gets ``unavailable``,
    not the answer; the hello is closed with 1013, not told a ``last_seq`` counting the answer's event (a seq
    the next real event takes: its stream would drop that). (Either is decided again after the rebuild if
    the commit failed first, on a slow machine: then it must show the store.)"""
    h: Harness = await start_server(store={"busy_timeout_s": 1.0})
    engine = h.running.engine
    async with h.connect("asker") as asker, h.connect("local", local=True) as local, h.connect("reader") as reader:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        head = engine.users["asker"].last_seq
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another program takes the write lock: the next commit fails
        try:
            async with trio.open_nursery() as nursery:

                async def refused_answer() -> None:
                    with pytest.raises(RequestError) as refused:
                        await local.request("create_answer", {"question_id": qid, "content": "refused"})
                    assert refused.value.code == "unavailable"

                nursery.start_soon(refused_answer)
                with trio.fail_after(10):
                    while engine.questions[qid].answer_count == 0:  # noqa: ASYNC110 - decided; its commit waits
                        await trio.sleep(0.01)
                async with trio_websocket.open_websocket_url(h.url) as second:  # the asker's phone, meanwhile
                    hello = {"type": "hello", "id": 1, "data": {"token": token("asker")}}
                    await second.send_message(msgpack.packb(hello))
                    try:
                        page = await reader.request("get_question", {"question_id": qid})
                    except RequestError as exc:
                        assert exc.code == "unavailable"
                    else:
                        assert (page["question"]["answer_count"], page["answers"]) == (0, [])
                    try:
                        with trio.fail_after(10):
                            said = (None, msgpack.unpackb(await second.get_message())["data"]["last_seq"])
                    except trio_websocket.ConnectionClosed as closed:
                        said = (closed.reason.code, None)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert said in ((1013, None), (None, head))
        await h.running.clients.wait_reloaded()
        page = await reader.request("get_question", {"question_id": qid})
        assert (page["question"]["answer_count"], page["answers"]) == (0, [])
        async with h.connect("asker") as again:
            assert again.hello["last_seq"] == head
            await when_writes_work(local, "create_answer", {"question_id": qid, "content": "stored"})
            for conn in (asker, again):  # the next event takes head + 1, and each connection gets it
                assert (await conn.next_event("answer_notification", timeout=10))["seq"] == head + 1


@pytest.mark.backends("postgres")
async def test_while_memory_cannot_be_rebuilt_requests_are_refused_not_shown_refused_writes(
    start_server: Any, db: str, pg_cluster: Any
) -> None:
    """PostgreSQL stopped: a question's commit fails, and memory, which holds it, cannot be read again from
    the database. Requests get ``unavailable`` meanwhile, not a list with the refused question; once the
    database is back, memory is rebuilt and they are answered from what it holds."""
    h: Harness = await start_server()
    async with h.connect("asker") as asker, h.connect("reader") as reader:
        await asker.request("create_question", question_data(title="A stored question about buses"))
        await trio.to_thread.run_sync(pg_cluster.stop_server)
        try:
            with pytest.raises(RequestError) as refused:
                await asker.request("create_question", question_data(title="A refused question about ferries"))
            assert refused.value.code == "unavailable"
            with pytest.raises(RequestError) as meanwhile:
                await reader.request("nearby_questions", {"location": question_data()["location"]})
            assert meanwhile.value.code == "unavailable"
        finally:
            await trio.to_thread.run_sync(pg_cluster.start_server)
        near = await when_writes_work(reader, "nearby_questions", {"location": question_data()["location"]}, 30)
        assert [q["title"] for q in near["questions"]] == ["A stored question about buses"]


def test_starting_on_a_full_disk_is_one_clear_line_and_exit_code_2(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "1m") as disk:
        fill(disk, leave=0)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DONGNE_")}
        env["DONGNE_JWT_SECRET"] = SECRET
        started = subprocess.run(
            [sys.executable, "-m", "dongne", "serve", "--db", str(disk / "dongne.sqlite3"), "--port", "0"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
        )
    assert started.returncode == 2, started.stderr
    assert "Traceback" not in started.stderr
    lines = [line for line in started.stderr.splitlines() if line.startswith("dongne:")]
    assert len(lines) == 1 and ("full" in lines[0] or "No space left" in lines[0]), started.stderr


@pytest.mark.backends("postgres")
async def test_a_terminated_postgresql_session_refuses_one_batch_then_the_probe_reconnects(
    start_server: Any, db: str
) -> None:
    h: Harness = await start_server()
    async with h.connect("asker") as asker, h.connect("reader") as reader, h.connect("ops", admin=True) as admin:
        question = (await asker.request("create_question", question_data()))["question"]
        # An operator (or a failover) ends the writer's session: the next commit finds it gone.
        [(ended,)] = db_rows(
            db,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'dongne writer'",
        )
        assert ended == 1
        with pytest.raises(RequestError) as refused:
            await asker.request("close_question", {"question_id": question["question_id"]})
        assert refused.value.code == "unavailable"
        failing = await admin.next_event("storage_alert")
        assert failing["data"]["state"] == "failing"
        await h.running.clients.wait_reloaded()
        got = await reader.request("join_question", {"question_id": question["question_id"]})
        assert got["question"]["status"] == "open"  # reads go on, on their own sessions
        closed = await when_writes_work(asker, "close_question", {"question_id": question["question_id"]})
        assert closed["question"]["status"] == "closed"
        assert h.running.clients.writable
        assert (await admin.next_event("storage_alert"))["data"]["state"] == "recovered"
    # The new writer session took the (shared) node lock again; closing releases it.
    node_locks = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    assert db_rows(db, node_locks) == [(1,)]
    await h.running.aclose()
    assert db_rows(db, node_locks) == [(0,)]
    assert db_rows(db, "SELECT title, status FROM questions") == [(question["title"], "closed")]


async def an_answer_is_refused_while_postgresql_is_down(pg_cluster: Any, client: DongneClient, qid: str) -> None:
    """Stop PostgreSQL abruptly, see an answer refused with ``unavailable``, start it again."""
    await trio.to_thread.run_sync(pg_cluster.stop_server)
    try:
        with pytest.raises(RequestError) as refused:
            await client.request("create_answer", {"question_id": qid, "content": "while down"})
        assert refused.value.code == "unavailable"
    finally:
        await trio.to_thread.run_sync(pg_cluster.start_server)


@pytest.mark.backends("postgres")
async def test_postgresql_stopped_abruptly_and_restarted_under_the_server(
    start_server: Any, db: str, pg_cluster: Any
) -> None:
    """Writes are refused while it is down, none acknowledged is lost, and the server recovers by itself."""
    h: Harness = await start_server()
    async with h.connect("asker") as asker, h.connect("local", local=True) as local:
        question = (await asker.request("create_question", question_data()))["question"]
        qid = question["question_id"]
        acked = [(await local.request("create_answer", {"question_id": qid, "content": "before"}))["answer"]]
        await an_answer_is_refused_while_postgresql_is_down(pg_cluster, local, qid)
        after = await when_writes_work(local, "create_answer", {"question_id": qid, "content": "after"}, timeout_s=30)
        acked.append(after["answer"])
        assert h.running.clients.writable
        page = await asker.request("get_question", {"question_id": qid})
        assert [a["content"] for a in page["answers"]] == ["before", "after"]
    await h.running.aclose()
    assert sorted(db_rows(db, "SELECT content FROM answers")) == [("after",), ("before",)]
