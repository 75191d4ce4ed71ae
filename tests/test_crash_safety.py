"""Crash safety, proven: SIGKILL at random moments under load loses nothing acknowledged.

Theory of operation: a real ``dongne serve`` process on a real SQLite file,
with the escalation stages shortened to 0, 1, 2 and 4 s so that escalations
are in flight whenever the process dies. Askers create questions and accept
answers; verified locals with live and home positions move, join, type and
answer. The test keeps a model of everything the server acknowledged (a reply
with ``ok``) and of every durable event any client saw (an event is sent only
after its commit, so seeing it is an acknowledgement too). A seeded random
schedule kills the process with SIGKILL while requests are in flight, or
while it is still running overdue escalations at start-up, and restarts it on
the same database (a SQLite file, or a PostgreSQL database: the test runs on
each). After every restart each user connects with
``resume.last_seq = 0`` and the test checks:

* the replay is exactly seqs ``1..last_seq``, no gap, no duplicate, and every
  event seen before the kill is there with the same type and content;
* every acknowledged question, answer, acceptance, setting and point is there
  (``join_question``, ``get_settings``, ``get_profile``), and a local's points
  are exactly ``accept_points`` per accepted answer;
* in the database: ``PRAGMA integrity_check`` is ok (SQLite); each user's events are
  seqs 1..n with no gap (the inbox is the record of ``last_seq``: the user
  row's copy is only refreshed with the rest of the row, so it may lag, never
  lead); the ``notified`` table and
  the ``new_question_notification`` events name the same (question, local)
  pairs, each event once; on PostgreSQL each user's inbox head is its newest seq.

After the last restart every unfinished escalation runs to its end: open
questions reach ``next_stage == 4`` and every local was alerted once for
each question still unanswered (FINAL reaches everyone), never twice. A
second test sends SIGTERM under load: the clients get 1001, the process exits
0, and nothing acknowledged is missing after the restart.

Outcomes are checked, never timings: they hold however the kills land.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    asynccontextmanager,
    closing,
    contextmanager,
    suppress,
)
from pathlib import Path
from typing import Any

import attrs
import msgpack
import pytest
import trio
import trio.lowlevel
import trio_websocket

from dongne.auth import mint_token
from dongne.client import DongneClient, RequestError, open_client
from dongne.core.effects import EnqueuePush
from dongne.core.records import PushJob
from dongne.store import is_postgres_url, store_for

from .served import ServedProcess, serve_process

SECRET = "crash-safety-secret-0123456789-0123456789"
SEED = int(os.environ.get("DONGNE_CRASH_SEED", "20261127"))

KILLS_UNDER_LOAD = 10
KILLS_AT_STARTUP = 2
STAGES = ("IMMEDIATE", "QUICK", "EXTENDED", "FINAL")
FINAL_OFFSET_S = 4.0
ACCEPT_POINTS = 10
ACTIVE = ("open", "answered")  # statuses whose escalation runs to the end

pytestmark = pytest.mark.backends("sqlite", "postgres")

CONFIG = """
[server]
shutdown_timeout_s = 5.0

[location]
min_update_interval_s = 0.0

[limits]
conn_per_s = 1000000.0
conn_burst = 1000000.0
writes_per_minute = 1000000.0
writes_burst = 1000000.0
questions_per_hour = 1000000.0
questions_burst = 1000000.0
typing_per_s = 1000.0
typing_burst = 1000.0
connections_per_ip_per_minute = 1000000.0
rooms_per_connection = 10000

[snapshots]
interval_s = 0.0

[[escalation.stages]]
name = "IMMEDIATE"
offset_s = 0.0
radius_m = 2000.0
limit = 10
audience = "online_nearby"
requires_immediate_alerts = true
priority = "high"

[[escalation.stages]]
name = "QUICK"
offset_s = 1.0
radius_m = 5000.0
audience = "nearby"

[[escalation.stages]]
name = "EXTENDED"
offset_s = 2.0
audience = "experts"

[[escalation.stages]]
name = "FINAL"
offset_s = 4.0
audience = "everyone"
only_if_unanswered = true
"""

HALL = (33.4996, 126.5312)  # Jeju City Hall
M_PER_DEG_LAT = 111_320.0
M_PER_DEG_LNG = M_PER_DEG_LAT * math.cos(math.radians(HALL[0]))


def east(metres: float) -> dict[str, float]:
    return {"lat": HALL[0], "lng": HALL[1] + metres / M_PER_DEG_LNG}


ASKERS = ("asker0", "asker1")
#: local -> (live and home position, expertise tags). ``near`` gets IMMEDIATE,
#: ``mid`` QUICK (by its home while offline), ``expert`` EXTENDED for #food,
#: ``far`` only FINAL.
LOCALS: dict[str, tuple[dict[str, float], tuple[str, ...]]] = {
    "near": (east(1000), ()),
    "mid": (east(4000), ()),
    "expert": (east(20000), ("food",)),
    "far": (east(20000), ()),
}
ANSWERERS = ("near", "mid", "expert")
USERS = ASKERS + tuple(LOCALS)
#: Errors a request of the load may get legitimately: a request whose reply
#: was lost in a kill may have been applied (an accept, then another accept or
#: an answer on the resolved question is refused).
EXPECTED_REFUSALS = {"already_accepted", "question_closed"}
CONNECTION_GONE = (trio_websocket.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError)


# ---- the model of what was acknowledged ---------------------------------------------


@attrs.define
class Model:
    """Everything the server acknowledged, and what went wrong (checked at the end of each phase)."""

    questions: dict[str, dict[str, Any]] = attrs.Factory(dict)  # acked create_question replies
    answers: dict[str, dict[str, Any]] = attrs.Factory(dict)  # acked create_answer replies
    accepted: dict[str, str] = attrs.Factory(dict)  # question id -> answer id, acked accept_answer
    settings: dict[str, dict[str, Any]] = attrs.Factory(dict)  # local -> acked update_settings reply
    seen: dict[str, dict[int, tuple[str, Any]]] = attrs.Factory(dict)  # user -> seq -> (type, data)
    in_flight_at_kill: int = 0  # requests sent on an open connection that never got their reply
    kills_ms: list[int] = attrs.Factory(list)  # wall-clock time of each SIGKILL
    problems: list[str] = attrs.Factory(list)

    def questions_of(self, asker: str) -> list[str]:
        return [qid for qid, q in self.questions.items() if q["asker_id"] == asker]

    def answers_to(self, question_id: str) -> list[str]:
        return [aid for aid, a in self.answers.items() if a["question_id"] == question_id]

    def escalating_at(self, at_ms: int) -> set[str]:
        """Acknowledged questions whose FINAL stage was not yet due at ``at_ms``."""
        final_ms = int(FINAL_OFFSET_S * 1000)
        return {qid for qid, q in self.questions.items() if q["created_at"] <= at_ms < q["created_at"] + final_ms}


@attrs.define
class Conn:
    """One user's connection and every durable frame it received, duplicates included."""

    user: str
    client: DongneClient
    frames: list[tuple[int, str, Any]] = attrs.Factory(list)
    seen_before: frozenset[int] = frozenset()  # seqs seen on earlier connections when this one opened


def token(user: str) -> str:
    if user in LOCALS:
        return mint_token(SECRET, user, local=True, tags=LOCALS[user][1], now_s=time.time())
    return mint_token(SECRET, user, now_s=time.time())


@asynccontextmanager
async def connect(port: int, user: str, model: Model) -> AsyncIterator[Conn]:
    """Connect with ``resume.last_seq = 0``, recording every durable frame as it arrives.

    The hello is sent by hand so that the recorder is in place before the replay.
    """
    async with open_client(f"ws://127.0.0.1:{port}", token(user), resume_from=0, hello=False, timeout=15) as client:
        seen = model.seen.setdefault(user, {})
        conn = Conn(user, client, seen_before=frozenset(seen))
        dispatch = client._dispatch

        def record(frame: dict[str, Any]) -> bool:
            seq = frame.get("seq")
            if isinstance(seq, int):
                conn.frames.append((seq, frame["type"], frame.get("data")))
                entry = (frame["type"], frame.get("data"))
                if seq in seen and seen[seq] != entry:
                    model.problems.append(f"{user} seq {seq} changed: was {seen[seq]!r}, now {entry!r}")
                seen.setdefault(seq, entry)
            return dispatch(frame)

        # A test hook: every frame the client receives is recorded before its own dispatch.
        client._dispatch = record  # type: ignore[method-assign]
        try:
            client.hello = await client.request("hello", {"token": token(user), "resume": {"last_seq": 0}})
            yield conn
        finally:
            # Close the WebSocket while the client still reads.
            with trio.move_on_after(10) as scope:
                scope.shield = True
                await client.ws.aclose()


# ---- the server process -------------------------------------------------------------


def serve(tmp_path: Path, run: int, db: Path | str) -> AbstractAsyncContextManager[ServedProcess]:
    """``dongne serve`` on the test's database with its config.toml, logging to ``server-<run>.log``."""
    return serve_process(tmp_path, db, secret=SECRET, config=tmp_path / "config.toml", log_name=f"server-{run:02d}.log")


def write_config(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(CONFIG)


def assert_no_errors(server: ServedProcess) -> None:
    """The server logged no error (an exception in a task, a failed commit)."""
    errors = [line for line in server.log.read_text(errors="replace").splitlines() if '"level": "ERROR"' in line]
    assert not errors, errors


# ---- load -----------------------------------------------------------------------------


async def call(conn: Conn, model: Model, op: str, data: dict[str, Any]) -> dict[str, Any] | None:
    """One request of the load: the reply's data, or None if refused as expected.

    Raises:
        trio_websocket.ConnectionClosed: the server went away (counted if the request was in flight).
    """
    was_open = conn.client.ws.closed is None
    try:
        return await conn.client.request(op, data)
    except RequestError as exc:
        if exc.code not in EXPECTED_REFUSALS:
            model.problems.append(f"{conn.user} {op} {data!r}: unexpected {exc.code}: {exc.message}")
        return None
    except CONNECTION_GONE:
        if was_open:
            model.in_flight_at_kill += 1
        raise trio_websocket.ConnectionClosed(None) from None


def near_hall(rng: random.Random) -> dict[str, float]:
    """A spot up to ~1.3 km south, east or west of the hall: on land, in Jeju-si."""
    return {
        "lat": HALL[0] - rng.uniform(0, 1300) / M_PER_DEG_LAT,
        "lng": HALL[1] + rng.uniform(-1300, 1300) / M_PER_DEG_LNG,
    }


async def asker_load(
    conn: Conn, model: Model, rng: random.Random, tag: str, first_ack: trio.Event, max_questions: int
) -> None:
    asked = 0
    for step in range(100_000):  # ends when the server goes away
        mine = [q for q in model.questions_of(conn.user) if q not in model.accepted and model.answers_to(q)]
        if asked < max_questions and (not mine or rng.random() < 0.6):
            food = rng.random() < 0.5
            data = {
                "title": f"{tag} question {step} from {conn.user}",
                "body": f"Asked in {tag}, step {step}." if rng.random() < 0.7 else "",
                "location": near_hall(rng),
                "hashtags": ["food"] if food else ["beach"],
            }
            asked += 1
            reply = await call(conn, model, "create_question", data)
            if reply is not None:
                model.questions[reply["question"]["question_id"]] = reply["question"]
                first_ack.set()
        elif mine and rng.random() < 0.15:  # rarely: most escalations should run their course
            qid = rng.choice(mine)
            aid = rng.choice(model.answers_to(qid))
            reply = await call(conn, model, "accept_answer", {"question_id": qid, "answer_id": aid})
            if reply is not None:
                model.accepted[qid] = aid
        else:
            await call(conn, model, "get_profile", {})
        await trio.sleep(rng.uniform(0, 0.03))


async def local_load(conn: Conn, model: Model, rng: random.Random, tag: str) -> None:
    home, _tags = LOCALS[conn.user]
    for step in range(100_000):  # ends when the server goes away
        open_ = [qid for qid in model.questions if qid not in model.accepted]
        roll = rng.random()
        if conn.user in ANSWERERS and open_ and roll < 0.12:
            qid = rng.choice(open_)
            content = f"{conn.user} says: try the place on street {rng.randrange(1, 99)} ({tag}, {step})"
            reply = await call(conn, model, "create_answer", {"question_id": qid, "content": content})
            if reply is not None:
                model.answers[reply["answer"]["answer_id"]] = reply["answer"]
        elif roll < 0.6:
            jitter = {
                "lat": home["lat"] + rng.uniform(-300, 300) / M_PER_DEG_LAT,
                "lng": home["lng"] + rng.uniform(-300, 300) / M_PER_DEG_LNG,
            }
            await call(conn, model, "update_location", {"location": jitter, "accuracy_m": 20.0})
        elif open_ and roll < 0.8:
            qid = rng.choice(open_)
            await call(conn, model, "join_question", {"question_id": qid})
            await call(conn, model, "typing_start", {"question_id": qid})
        else:
            await call(conn, model, "nearby_questions", {"location": home})
        await trio.sleep(rng.uniform(0, 0.03))


async def run_load_until(conns: dict[str, Conn], model: Model, rng: random.Random, tag: str, stop: Any) -> None:
    """Drive every connection until the server goes away; ``stop(first_ack)`` ends it (kill or SIGTERM)."""
    first_ack = trio.Event()

    async def guarded(fn: Any, *args: Any) -> None:
        # ConnectionClosed: the server went away, and this connection's load is over.
        with suppress(trio_websocket.ConnectionClosed):
            await fn(*args)

    # Every task ends once its connection does; the deadline only bounds a hang.
    with trio.fail_after(45):
        async with trio.open_nursery() as nursery:
            for user, conn in conns.items():
                task_rng = random.Random(rng.random())
                if user in ASKERS:
                    nursery.start_soon(guarded, asker_load, conn, model, task_rng, tag, first_ack, 4)
                else:
                    nursery.start_soon(guarded, local_load, conn, model, task_rng, tag)
            await stop(first_ack)


async def set_up_locals(conns: dict[str, Conn], model: Model) -> None:
    """Homes and a high alert cap (acknowledged, so checked after every restart)."""
    for user, (home, _tags) in LOCALS.items():
        reply = await conns[user].client.request("update_settings", {"home": home, "max_alerts_per_hour": 1000})
        model.settings[user] = reply["settings"]


async def go_live(conns: dict[str, Conn]) -> None:
    for user, conn in conns.items():
        if user in LOCALS:
            await conn.client.request("update_location", {"location": LOCALS[user][0], "accuracy_m": 20.0})


# ---- checks -----------------------------------------------------------------------------


async def check_replay(conn: Conn, model: Model) -> list[tuple[int, str, Any]]:
    """The replay from 0 is exactly 1..last_seq and holds every event seen before; returns it."""
    await conn.client.request("get_profile")  # replies are held until the replay is sent
    last = conn.client.hello["last_seq"]
    replay = conn.frames[:last]
    assert [seq for seq, _k, _d in replay] == list(range(1, last + 1)), f"{conn.user}: replay is not 1..{last}"
    lost = sorted(s for s in conn.seen_before if s > last)
    assert not lost, f"{conn.user}: durable events {lost} were seen before the crash and are gone (last_seq {last})"
    assert not model.problems, model.problems
    return replay


def check_contiguous(conns: dict[str, Conn]) -> None:
    for conn in conns.values():
        seqs = [seq for seq, _k, _d in conn.frames]
        assert seqs == list(range(1, len(seqs) + 1)), f"{conn.user}: seqs received {seqs} are not 1..n"


async def check_state(conns: dict[str, Conn], model: Model, db: Path | str) -> None:
    """Every acknowledged write is there, through the protocol and in the database."""
    replays = {user: await check_replay(conn, model) for user, conn in conns.items()}
    for user, replay in replays.items():
        per_question: dict[str, int] = {}
        for _seq, kind, data in replay:
            if kind == "new_question_notification":
                per_question[data["question_id"]] = per_question.get(data["question_id"], 0) + 1
        twice = {qid: n for qid, n in per_question.items() if n > 1}
        assert not twice, f"{user} was notified more than once: {twice}"
    accepted_by: dict[str, int] = dict.fromkeys(LOCALS, 0)
    for qid, q in model.questions.items():
        state = await conns[q["asker_id"]].client.request("join_question", {"question_id": qid})
        got = state["question"]
        assert (got["asker_id"], got["title"], got["body"], got["hashtags"]) == (
            q["asker_id"],
            q["title"],
            q["body"],
            q["hashtags"],
        )
        answers = {a["answer_id"]: a for a in state["answers"]}
        for aid in model.answers_to(qid):
            acked = model.answers[aid]
            assert aid in answers, f"acknowledged answer {aid} to {qid} is gone"
            assert (answers[aid]["author_id"], answers[aid]["content"]) == (acked["author_id"], acked["content"])
        if qid in model.accepted:
            assert (got["status"], got["accepted_answer_id"]) == ("resolved", model.accepted[qid])
        flagged = [a for a in answers.values() if a["accepted"]]
        assert len(flagged) <= 1 and [a["answer_id"] for a in flagged] == (
            [got["accepted_answer_id"]] if got["accepted_answer_id"] else []
        )
        assert got["answer_count"] == len(answers)
        for a in flagged:
            accepted_by[a["author_id"]] += 1
    for user in LOCALS:
        client = conns[user].client
        profile = await client.request("get_profile")
        acked_accepts = sum(1 for aid in model.accepted.values() if model.answers[aid]["author_id"] == user)
        assert profile["user"]["points"] == ACCEPT_POINTS * accepted_by[user] >= ACCEPT_POINTS * acked_accepts, user
        assert (await client.request("get_settings"))["settings"] == model.settings[user]
    await trio.to_thread.run_sync(check_database, db, model)


Rows = Callable[..., list[tuple[Any, ...]]]


@contextmanager
def read_snapshot(db: Path | str) -> Iterator[Rows]:
    """``rows(sql, params)`` (``?`` parameters) in one read snapshot of the database; SQLite's integrity checked."""
    if is_postgres_url(str(db)):
        import psycopg

        with psycopg.connect(str(db)) as pg:
            pg.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield lambda sql, params=(): [tuple(r) for r in pg.execute(sql.replace("?", "%s"), params).fetchall()]
            pg.rollback()
        return
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None, timeout=30)) as conn:
        conn.execute("BEGIN")
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        yield lambda sql, params=(): conn.execute(sql, params).fetchall()
        conn.execute("COMMIT")


def check_database(db: Path | str, model: Model) -> dict[str, Any]:
    """Integrity, seqs and notifications in one read snapshot; returns the escalation rows."""
    with read_snapshot(db) as rows_of:
        for user, last_seq in rows_of("SELECT user_id, last_seq FROM users"):
            [(count, top)] = rows_of("SELECT count(*), coalesce(max(seq), 0) FROM events WHERE user_id = ?", (user,))
            assert count == top >= last_seq, f"{user}: row last_seq {last_seq}, {count} events, max seq {top}"
        if is_postgres_url(str(db)):
            heads = sorted(rows_of("SELECT user_id, last_seq FROM inbox_heads"))
            assert heads == sorted(rows_of("SELECT user_id, max(seq) FROM events GROUP BY user_id")), heads
        notified = sorted(rows_of("SELECT question_id, user_id FROM notified"))
        alerted = sorted(
            (msgpack.unpackb(data)["question_id"], user)
            for user, data in rows_of("SELECT user_id, data FROM events WHERE type = 'new_question_notification'")
        )
        assert alerted == notified, "notified rows and new_question_notification events differ"
        present = {row[0] for row in rows_of("SELECT question_id FROM questions")}
        assert set(model.questions) <= present
        rows = rows_of(
            "SELECT q.question_id, q.status, q.answer_count, e.next_stage FROM questions q LEFT JOIN escalations e USING (question_id)"
        )
    return {qid: (status, answers, stage) for qid, status, answers, stage in rows}


async def wait_escalations_done(db: Path | str, model: Model, timeout_s: float = 10.0) -> dict[str, Any]:
    """The escalation rows once every active question's plan has run (or the timeout passed)."""
    deadline = trio.current_time() + timeout_s
    while True:
        rows = await trio.to_thread.run_sync(check_database, db, model)
        pending = [qid for qid, (status, _n, stage) in rows.items() if status in ACTIVE and stage != len(STAGES)]
        if not pending or trio.current_time() > deadline:
            return rows
        await trio.sleep(0.2)


# ---- the tests ---------------------------------------------------------------------------


async def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path, db: Path | str) -> None:
    rng = random.Random(SEED)
    write_config(tmp_path)
    model = Model()
    kinds = ["load"] * (KILLS_UNDER_LOAD - 2) + ["startup"] * KILLS_AT_STARTUP
    rng.shuffle(kinds)
    # The first run sets the users up; the last one leaves escalations in flight for the final restart.
    kinds = ["load", *kinds, "load"]
    for run, kind in enumerate(kinds):
        async with serve(tmp_path, run, db) as server:
            if kind == "startup":
                # Overdue stages run at start-up: die in the middle of them.
                await trio.sleep(rng.uniform(0, 0.3))
                model.kills_ms.append(int(time.time() * 1000))
                server.proc.kill()
                continue
            async with AsyncExitStack() as stack:
                conns = {u: await stack.enter_async_context(connect(server.port, u, model)) for u in USERS}
                if run == 0:
                    await set_up_locals(conns, model)
                await check_state(conns, model, db)
                if run % 2:  # mid offline: QUICK finds it by its home position
                    await conns.pop("mid").client.ws.aclose()
                await go_live(conns)

                async def kill_soon(first_ack: trio.Event) -> None:
                    with trio.fail_after(15):
                        await first_ack.wait()
                    await trio.sleep(rng.uniform(0.05, 1.0))
                    model.kills_ms.append(int(time.time() * 1000))
                    server.proc.kill()

                await run_load_until(conns, model, rng, f"run {run}", kill_soon)
                check_contiguous(conns)
        assert server.proc.returncode == -signal.SIGKILL
        assert_no_errors(server)
    assert not model.problems, model.problems
    assert model.in_flight_at_kill > 0, "no kill caught a request in flight"
    assert model.escalating_at(model.kills_ms[-1]), "no escalation was in flight at the last kill"

    # The last restart: every unfinished escalation completes, nobody twice.
    async with serve(tmp_path, len(kinds), db) as server:
        async with AsyncExitStack() as stack:
            conns = {u: await stack.enter_async_context(connect(server.port, u, model)) for u in USERS}
            await check_state(conns, model, db)
        newest = max(q["created_at"] for q in model.questions.values()) / 1000
        await trio.sleep(max(0.0, newest + FINAL_OFFSET_S + 1.0 - time.time()))
        after = await wait_escalations_done(db, model)
        async with AsyncExitStack() as stack:
            conns = {u: await stack.enter_async_context(connect(server.port, u, model)) for u in USERS}
            await check_state(conns, model, db)
            replays = {u: conns[u].frames[: conns[u].client.hello["last_seq"]] for u in LOCALS}
        for qid, (status, answer_count, stage) in after.items():
            assert stage is not None, f"{qid} has no escalation row"
            if status in ACTIVE:
                assert stage == len(STAGES), f"{qid} ({status}) stopped at stage {stage}"
            if answer_count == 0 and status == "open":
                for user, replay in replays.items():
                    alerts = [d for _s, k, d in replay if k == "new_question_notification" and d["question_id"] == qid]
                    assert len(alerts) == 1, f"{user} got {len(alerts)} alerts for unanswered {qid}"
        server.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await server.proc.wait() == 0
        assert_no_errors(server)
    check_database(db, model)


async def test_sigterm_under_load_loses_nothing(tmp_path: Path, db: Path | str) -> None:
    rng = random.Random(SEED + 1)
    write_config(tmp_path)
    model = Model()
    async with serve(tmp_path, 0, db) as server:
        async with AsyncExitStack() as stack:
            conns = {u: await stack.enter_async_context(connect(server.port, u, model)) for u in USERS}
            await set_up_locals(conns, model)
            await go_live(conns)

            async def terminate_soon(first_ack: trio.Event) -> None:
                with trio.fail_after(15):
                    await first_ack.wait()
                await trio.sleep(rng.uniform(0.3, 0.8))
                server.proc.send_signal(signal.SIGTERM)

            await run_load_until(conns, model, rng, "sigterm", terminate_soon)
            codes = {
                u: c.client.closed.reason.code if c.client.closed and c.client.closed.reason else None
                for u, c in conns.items()
            }
            assert set(codes.values()) == {1001}, codes
            check_contiguous(conns)
        with trio.fail_after(10):
            assert await server.proc.wait() == 0
        assert_no_errors(server)
    assert not model.problems, model.problems
    assert model.questions and model.answers
    async with serve(tmp_path, 1, db) as server:
        async with AsyncExitStack() as stack:
            conns = {u: await stack.enter_async_context(connect(server.port, u, model)) for u in USERS}
            await check_state(conns, model, db)
        server.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await server.proc.wait() == 0
        assert_no_errors(server)


async def _stream_typing_forever(request: trio_websocket.WebSocketRequest) -> None:
    ws = await request.accept()
    try:
        while True:
            await ws.send_message(
                msgpack.packb({"type": "user_typing", "data": {"question_id": "q1", "user_id": "u", "nick": "U"}})
            )
            await trio.lowlevel.checkpoint()
    except trio_websocket.ConnectionClosed:
        pass


async def test_leaving_open_client_while_frames_arrive_does_not_hang() -> None:
    """A peer that keeps sending (room traffic, alerts) must not stop the client from closing."""
    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, _stream_typing_forever, "127.0.0.1", 0, None)
        with trio.move_on_after(3) as scope:
            async with open_client(f"ws://127.0.0.1:{server.port}", "token", hello=False) as client:
                await client.next_event("user_typing")
                await trio.sleep(0.01)  # frames keep arriving
        nursery.cancel_scope.cancel()

    assert not scope.cancelled_caught


async def test_a_restart_keeps_no_unsendable_push_jobs_in_memory(start_server: Any, db: Path | str) -> None:
    """Jobs older than push_max_age_s can never be sent: a restart should not hold them."""
    day_ago = int(time.time() * 1000) - 86_400_000
    store = store_for(db)
    store.open()
    payload = {"title": "Where is the best black pork near the port?", "region": "Jeju-si", "data": {"stage": "QUICK"}}
    store.apply(
        [
            EnqueuePush(PushJob(i, f"local{i}", "new_question_notification", False, payload, day_ago))
            for i in range(1, 201)
        ]
    )
    store.close()
    h = await start_server()
    held = h.running.pushes.statistics().queued
    await h.running.aclose()

    assert held == 0
