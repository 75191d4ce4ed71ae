"""Fuzzing and abuse: every hostile frame gets one documented answer; nobody else notices.

Theory of operation: Hypothesis strategies describe the frame space (random
bytes; msgpack values of every type; hand-built msgpack bytes a packer would
never write: huge ints, invalid ext and timestamp types, lone surrogates,
10,000-level nesting; every operation of PROTOCOL.md with wrong types and
hostile values). ``draw_frames`` draws a fixed, seeded list of frames up front
(Hypothesis in generate-only mode), and one async test sends them over a real
connection to a real server, checking each reply with ``check_reply``: exactly
one reply, the right ``id``, ``ok`` only for an operation that exists, and
otherwise a code PROTOCOL.md documents for that operation, never ``internal``.
Meanwhile a second pair of clients does normal traffic and checks that every
reply and event it expects arrives, and nothing else. A sans-I/O test runs the
same strategies through ``decode_request`` and ``Engine.receive`` with full
Hypothesis shrinking. First frames (hostile hellos and tokens) and WebSocket
framing are fuzzed on fresh connections; explicit extremes and the bugs the
fuzzing found are pinned by their own tests.

The strategies, ``draw_frames`` and the oracle live in ``tests/fuzzing.py``,
which ``bench/fuzz.py`` imports too, so the bench and the suite fuzz the same
frame space.

``DONGNE_FUZZ_EXAMPLES`` (default 2000) sets how many frames the end-to-end
tests send in total, ``DONGNE_FUZZ_SEED`` (default 0) which ones, and
``DONGNE_FUZZ_CORE_EXAMPLES`` (default 300) the sans-I/O test's examples.
Everything is seeded: a run is reproducible.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import jwt
import msgpack
import pytest
import trio
import trio.lowlevel
import trio_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request

from .fuzzing import (
    A_DEL,
    A_HIDE,
    A_MINE,
    A_THEIRS,
    ERROR_CODES,
    EVENT_TYPES,
    FAMILIES,
    MAX_FRAME_BYTES,
    MAX_INT,
    MIN_INT,
    MODERATION_OPS,
    OP_CODES,
    OPS,
    PLACEHOLDERS,
    Q_DEL,
    Q_HIDE,
    Q_MINE,
    Q_THEIRS,
    R_OPEN,
    U_VICTIM,
    Expect,
    any_value,
    bind_ids,
    check_reply,
    deep_array,
    deep_map,
    draw_frames,
    expectation,
    frame_bytes,
    fuzz_frames,
    mp_map,
    packb,
    random_bytes,
    short,
    spares_loopback,
    unknown_ops,
)

# ---- a client for fuzzing ---------------------------------------------------------------------

REPLY_TIMEOUT_S = 10.0
FUZZER = "fuzzer"
HELPER = "fz_helper"
#: Events a lone fuzzer causes itself: nearby questions after update_location,
#: its own badge after mark_notifications_read.
OWN_EVENTS = frozenset({"nearby_questions", "unread_count"})
#: What an admin fuzzer may get besides (its own ops never hide its own content).
ADMIN_EVENTS = OWN_EVENTS | {"slow_response_alert"}
#: The read bucket lifted too (conftest's UNLIMITED predates it): the fuzzer
#: sends reads far faster than 5 a second, and 30 refusals close with 4008.
READS_UNLIMITED = {"reads_per_s": 1e6, "reads_burst": 1e6}
#: The report bucket too (20 an hour, bursts of 5): the fuzzer reports far more often.
REPORTS_UNLIMITED = {"reports_per_hour": 1e6, "reports_burst": 1e6}


@pytest.fixture
async def server(start_server: Callable[..., Any]) -> AsyncIterator[Any]:
    """The conftest server, with the read operations' rate limit out of the way."""
    harness = await start_server(limits=READS_UNLIMITED, moderation=REPORTS_UNLIMITED)
    yield harness
    harness.running.stop()


@attrs.frozen
class Answered:
    """What the server did with one frame."""

    reply: Any = None  # the decoded reply, or
    close_code: int | None = None  # the close code, or
    timed_out: bool = False  # neither in time
    events: list[Any] = attrs.Factory(list)  # events that came first


async def exchange(ws: trio_websocket.WebSocketConnection, frame: bytes | str) -> Answered:
    """Send one frame; wait for a reply (events before it are collected) or the close."""
    events: list[Any] = []
    try:
        await ws.send_message(frame)
        with trio.move_on_after(REPLY_TIMEOUT_S):
            while True:
                message = await ws.get_message()
                try:
                    decoded = msgpack.unpackb(message, raw=False)
                except Exception:
                    return Answered(reply=("undecodable server frame", message[:100]), events=events)
                if isinstance(decoded, dict) and decoded.get("type") in EVENT_TYPES:
                    events.append(decoded)
                    continue
                return Answered(reply=decoded, events=events)
        return Answered(timed_out=True, events=events)
    except trio_websocket.ConnectionClosed as exc:
        return Answered(close_code=exc.reason.code if exc.reason else None, events=events)


@asynccontextmanager
async def hello_connection(
    url: str, user_id: str, *, admin: bool = False
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A raw trio-websocket connection that has said hello as ``user_id`` (an admin if ``admin``)."""
    from .conftest import token

    claims = {"admin": True} if admin else {}
    async with trio_websocket.open_websocket_url(url, message_queue_size=4) as ws:
        await ws.send_message(packb({"type": "hello", "id": 0, "data": {"token": token(user_id, **claims)}}))
        with trio.fail_after(REPLY_TIMEOUT_S):
            reply = msgpack.unpackb(await ws.get_message(), raw=False)
        assert reply.get("ok") is True, reply
        yield ws


@attrs.define
class FuzzRun:
    frames: int = 0
    replies: int = 0
    ok: int = 0
    closes: dict[int, int] = attrs.Factory(dict)
    codes: dict[str, int] = attrs.Factory(dict)
    problems: list[str] = attrs.Factory(list)

    def problem(self, frame: bytes | str, what: str) -> None:
        self.problems.append(
            f"{what}\n    frame ({len(frame)} {'chars' if isinstance(frame, str) else 'bytes'}): {short(frame)}"
        )


async def fuzz_over(url: str, frames: list[bytes | str], ids: Mapping[str, str], *, admin: bool = False) -> FuzzRun:
    """Send ``frames`` one at a time as the fuzzer (an admin if ``admin``), reconnecting after each close."""
    run = FuzzRun()
    pending = list(frames)
    own_events = ADMIN_EVENTS if admin else OWN_EVENTS
    while pending:
        async with hello_connection(url, FUZZER, admin=admin) as ws:
            while pending:
                frame = bind_ids(pending.pop(0), ids)
                expect = expectation(frame)
                answered = await exchange(ws, frame)
                run.frames += 1
                if answered.timed_out:
                    run.problem(frame, f"no reply within {REPLY_TIMEOUT_S} s")
                    break
                if answered.close_code is not None:
                    run.closes[answered.close_code] = run.closes.get(answered.close_code, 0) + 1
                    if answered.close_code != expect.close:
                        run.problem(frame, f"closed with {answered.close_code}, expected {expect.close or 'a reply'}")
                    break
                run.replies += 1
                for ev in answered.events:  # the only events a lone fuzzer can cause itself
                    if ev.get("type") not in own_events:
                        run.problem(frame, f"unexpected event before the reply: {short(ev)}")
                if expect.close is not None:
                    run.problem(frame, f"expected close {expect.close}, got a reply {short(answered.reply)}")
                    continue
                reply = answered.reply
                if isinstance(reply, dict):
                    if reply.get("ok") is True:
                        run.ok += 1
                    elif isinstance(reply.get("error"), dict):
                        code = str(reply["error"].get("code"))
                        run.codes[code] = run.codes.get(code, 0) + 1
                for problem in check_reply(frame, reply, expect):
                    run.problem(frame, problem)
            else:
                # The connection is still usable, and no stray frame is queued
                # ahead of this reply (which would mean one frame got two).
                answered = await exchange(ws, packb({"type": "get_profile", "id": 77, "data": {}}))
                reply = answered.reply
                if not (isinstance(reply, dict) and reply.get("id") == 77 and reply.get("ok") is True):
                    run.problems.append(f"get_profile after the batch got {answered!r}")
    return run


# ---- normal traffic beside the fuzzer ---------------------------------------------------------


@attrs.define
class Bystanders:
    rounds: int = 0
    slowest_s: float = 0.0


async def bystander_traffic(server: Any, stop: trio.Event, report: Bystanders, *, min_rounds: int = 3) -> None:
    """An asker and a local do normal traffic on their own question until ``stop``.

    Each round: typing, an answer, a read receipt, a profile read. Every reply
    must come within the client timeout and every event must be exactly the
    documented ones, in order, with durable seqs gapless.
    """
    from .conftest import question_data

    # Not a verified local: escalation never picks it, so it gets no alerts for the fuzzer's questions.
    async with server.connect("by_asker", nick="Asker") as asker, server.connect("by_local", nick="Local") as local:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        await local.request("join_question", {"question_id": qid})
        assert (await asker.next_event())["type"] == "user_online"
        while not stop.is_set() or report.rounds < min_rounds:
            started = time.monotonic()
            await local.request("typing_start", {"question_id": qid})
            assert (await asker.next_event())["type"] == "user_typing"
            answer = (await local.request("create_answer", {"question_id": qid, "content": f"answer {report.rounds}"}))[
                "answer"
            ]
            got = [await asker.next_event() for _ in range(3)]
            assert [e["type"] for e in got] == ["new_answer", "answer_notification", "user_stop_typing"], got
            assert got[1]["seq"] == report.rounds + 1, got[1]
            assert got[0]["data"]["answer"]["answer_id"] == answer["answer_id"]
            read = await asker.request("mark_read", {"question_id": qid, "answer_ids": [answer["answer_id"]]})
            assert read["answer_ids"] == [answer["answer_id"]]
            receipt = await local.next_event()
            assert (receipt["type"], receipt["data"]["answer_id"], receipt["data"]["state"]) == (
                "receipt",
                answer["answer_id"],
                "read",
            )
            profile = await asker.request("get_profile")
            assert profile["last_seq"] == report.rounds + 1
            assert asker.pending_events() == [] and local.pending_events() == []
            report.rounds += 1
            report.slowest_s = max(report.slowest_s, time.monotonic() - started)
        assert asker.closed is None and local.closed is None


async def make_fuzz_targets(server: Any) -> dict[str, str]:
    """Create the questions and answers the placeholders stand for; return the mapping."""
    from .conftest import question_data

    async with server.connect(HELPER, nick="Helper") as helper, server.connect(FUZZER) as fuzzer:
        q_mine = (await fuzzer.request("create_question", question_data(title="fuzzer's question")))["question"][
            "question_id"
        ]
        q_theirs = (await helper.request("create_question", question_data(title="helper's question")))["question"][
            "question_id"
        ]
        a_mine = (await helper.request("create_answer", {"question_id": q_mine, "content": "helper's answer"}))[
            "answer"
        ]["answer_id"]
        a_theirs = (await fuzzer.request("create_answer", {"question_id": q_theirs, "content": "fuzzer's answer"}))[
            "answer"
        ]["answer_id"]
        q_del = (await fuzzer.request("create_question", question_data(title="fuzzer's deletable question")))[
            "question"
        ]["question_id"]
        a_del = (await fuzzer.request("create_answer", {"question_id": q_theirs, "content": "fuzzer's other answer"}))[
            "answer"
        ]["answer_id"]
        # The moderation targets: a victim (with no connection once this is done)
        # who asked Q_HIDE and answered Q_THEIRS, and the helper's report of Q_HIDE.
        async with server.connect(U_VICTIM, nick="Victim") as victim:
            q_hide = (await victim.request("create_question", question_data(title="victim's question")))["question"][
                "question_id"
            ]
            a_hide = (await victim.request("create_answer", {"question_id": q_theirs, "content": "victim's answer"}))[
                "answer"
            ]["answer_id"]
        r_open = (await helper.request("report_content", {"question_id": q_hide, "reason": "spam"}))["report_id"]
    return {
        Q_MINE: q_mine, Q_THEIRS: q_theirs, A_MINE: a_mine, A_THEIRS: a_theirs, Q_DEL: q_del, A_DEL: a_del,
        U_VICTIM: U_VICTIM, Q_HIDE: q_hide, A_HIDE: a_hide, R_OPEN: r_open,
    }  # fmt: skip


def server_errors(records: Iterable[logging.LogRecord]) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}" for r in records if r.levelno >= logging.ERROR and r.name.startswith("dongne")
    ]


# ---- the end-to-end fuzz ------------------------------------------------------------------------

EXAMPLES = int(os.environ.get("DONGNE_FUZZ_EXAMPLES", "2000"))
SEED = int(os.environ.get("DONGNE_FUZZ_SEED", "0"))  # another seed explores other frames, as reproducibly


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_fuzz_frames_get_one_documented_reply(server: Any, family: str, caplog: pytest.LogCaptureFixture) -> None:
    """Each fuzz frame gets exactly one documented answer; a bystander pair sees nothing odd.

    The fuzzer is an admin for the operations family (the admin operations' own
    checks get fuzzed end to end) and a plain user for the others (their
    ``forbidden`` path does).
    """
    caplog.set_level(logging.INFO)
    frames = draw_frames(
        FAMILIES[family], EXAMPLES // len(FAMILIES), seed_value=SEED * 100 + sorted(FAMILIES).index(family)
    )
    ids = await make_fuzz_targets(server)
    stop = trio.Event()
    bystanders = Bystanders()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bystander_traffic, server, stop, bystanders)
        try:
            run = await fuzz_over(server.url, frames, ids, admin=family == "operations")
        finally:
            stop.set()
    # The server is still serving new connections.
    async with server.connect("late_comer") as late:
        assert (await late.request("get_profile"))["user"]["user_id"] == "late_comer"

    assert run.frames == len(frames)
    assert not run.problems, f"{len(run.problems)} problems in {run.frames} frames:\n" + "\n".join(run.problems[:15])
    assert bystanders.rounds >= 3
    assert server_errors(caplog.records) == []


def test_frame_families_cover_the_protocol() -> None:
    """The drawn frames reach every op, every error code an op can give, and both big and deep frames."""
    frames = [f for family in FAMILIES.values() for f in draw_frames(family, 500, seed_value=1)]
    expects = [expectation(bind_ids(f, {})) for f in frames]
    assert {e.op for e in expects} >= set(OP_CODES)
    assert any(e.close == 1009 for e in expects)
    assert any(isinstance(f, str) for f in frames)
    assert any(isinstance(f, bytes) and b"\x91" * 1000 in f for f in frames)
    assert any(isinstance(f, bytes) and b"\xed\xa0" in f for f in frames)  # a lone surrogate
    assert any(e.op in MODERATION_OPS and e.may_succeed for e in expects)


def test_moderation_frames_never_end_the_run() -> None:
    """No drawn frame bans a fuzzing or bystander user, or blocks the fuzzer's own 127.0.0.1."""
    frames = draw_frames(FAMILIES["operations"], 3000, seed_value=2)
    seen: dict[str, int] = {}
    for frame in frames:
        try:
            obj = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        except Exception:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("data"), dict) or obj.get("type") not in MODERATION_OPS:
            continue
        op, data = obj["type"], obj["data"]
        seen[op] = seen.get(op, 0) + 1
        if op in ("block_ip", "unblock_ip"):
            assert spares_loopback(data.get("cidr")), frame
        if op == "ban_user":
            user = data.get("user_id")
            assert not (isinstance(user, str) and user.startswith(("fuzzer0", "fuzzer1", "fz_helper1", "by_"))), frame
    assert set(seen) == set(MODERATION_OPS), seen
    assert not spares_loopback("127.0.0.1") and not spares_loopback("0.0.0.0/0") and not spares_loopback(" ::1 ")
    assert spares_loopback("203.0.113.0/24") and spares_loopback("198.51.100.7") and spares_loopback("::/128")


# ---- the same frames through the sans-I/O core, with shrinking -----------------------------------


def _request(op: str, rid: int, data: dict[str, Any]) -> bytes:
    return msgpack.packb({"type": op, "id": rid, "data": data})


def _engine_with_targets() -> tuple[Any, int]:
    """An engine holding the placeholder questions and answers; returns (engine, fuzzer's conn id)."""
    from dongne.auth import TokenVerifier
    from dongne.core import Connected, CoreSettings, Engine, FrameReceived, LimitSettings
    from dongne.core.settings import ModerationSettings

    from .conftest import JEJU_CITY, SECRET, UNLIMITED, token

    made = iter((*PLACEHOLDERS, Q_HIDE, A_HIDE, R_OPEN))
    serial = itertools.count()

    def new_id(prefix: str, now: int) -> str:  # the placeholders first, then fresh ids
        return next(made, None) or f"{prefix}{next(serial):020d}"

    verifier = TokenVerifier(SECRET)
    engine = Engine(
        CoreSettings(
            limits=LimitSettings(**UNLIMITED),  # type: ignore[arg-type]
            moderation=ModerationSettings(**REPORTS_UNLIMITED),  # type: ignore[arg-type]
        ),
        lambda tok, now_s: verifier.verify(tok, now_s=now_s),
        region_of=_region_of(),
        new_id=new_id,
    )
    now = int(time.time() * 1000)
    # The fuzzer is an admin here (the admin operations' own checks get fuzzed) and
    # a plain user in the end-to-end tests (their "forbidden" path does).
    for conn_id, user, admin in ((1, FUZZER, True), (2, HELPER, False), (3, U_VICTIM, False)):
        engine.handle(Connected(conn_id), now)
        engine.handle(FrameReceived(conn_id, _request("hello", 0, {"token": token(user, admin=admin)})), now)
    question = {"title": "t", "location": dict(JEJU_CITY)}
    engine.handle(FrameReceived(1, _request("create_question", 1, question)), now)  # Q_MINE
    engine.handle(FrameReceived(2, _request("create_question", 1, question)), now)  # Q_THEIRS
    engine.handle(
        FrameReceived(2, _request("create_answer", 2, {"question_id": Q_MINE, "content": "c"})), now
    )  # A_MINE
    engine.handle(
        FrameReceived(1, _request("create_answer", 2, {"question_id": Q_THEIRS, "content": "c"})), now
    )  # A_THEIRS
    engine.handle(FrameReceived(1, _request("create_question", 3, question)), now)  # Q_DEL
    engine.handle(
        FrameReceived(1, _request("create_answer", 4, {"question_id": Q_THEIRS, "content": "c2"})), now
    )  # A_DEL
    engine.handle(FrameReceived(3, _request("create_question", 1, question)), now)  # Q_HIDE
    engine.handle(
        FrameReceived(3, _request("create_answer", 2, {"question_id": Q_THEIRS, "content": "c3"})), now
    )  # A_HIDE
    engine.handle(
        FrameReceived(2, _request("report_content", 3, {"question_id": Q_HIDE, "reason": "spam"})), now
    )  # R_OPEN
    assert set(engine.questions) == {Q_MINE, Q_THEIRS, Q_DEL, Q_HIDE}
    assert engine.moderation.open_reports.keys() == {R_OPEN}
    return engine, 1


_regions: list[Any] = []


def _region_of() -> Callable[[float, float], str | None]:
    if not _regions:
        from dongne.core.regions import load_default_regions

        _regions.append(load_default_regions())
    return _regions[0].region_of  # type: ignore[no-any-return]


def _empty_rows(read: Any) -> Any:
    """What the store reads for ``read`` when it holds nothing (as ``core.reads`` documents each query)."""
    from dongne.core import reads

    if isinstance(read, reads.QuestionPage):
        return (None, [])
    if isinstance(read, reads.AuthorStats):
        return (0, 0)
    if isinstance(read, reads.AnswerHome | reads.ModerationItem):
        return None
    return []


@settings(
    max_examples=int(os.environ.get("DONGNE_FUZZ_CORE_EXAMPLES", "300")),
    derandomize=True,  # deterministic in CI; raise DONGNE_FUZZ_CORE_EXAMPLES to explore further
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(frames=st.lists(fuzz_frames(), min_size=1, max_size=5))
def test_core_answers_every_frame_with_one_documented_reply(frames: list[bytes | str]) -> None:
    """Engine.handle: one packable, documented reply per frame, whatever the bytes."""
    from dongne.core import FrameReceived, QuestionLoaded, ReadDone, Send

    engine, conn = _engine_with_targets()
    now = int(time.time() * 1000)
    for frame in frames:
        expect = expectation(frame)
        if expect.close is not None or isinstance(frame, str):
            continue  # the transport's job (1009, text frames)
        outcome = engine.handle(FrameReceived(conn, frame), now)  # must not raise: the driver would answer "internal"
        if outcome.load_question is not None:
            outcome = engine.handle(QuestionLoaded(conn, None), now)  # the store has no such question either
        if outcome.read is not None:  # a list or page: the store has nothing beyond memory
            outcome = engine.handle(ReadDone(conn, _empty_rows(outcome.read)), now)
        sends = [a for a in outcome.actions if isinstance(a, Send)]
        for send in sends:
            msgpack.packb(send.frame)  # the driver packs every frame; a failure would stop the commit pipeline
        replies = [s.frame for s in sends if s.frame.get("type") == "reply"]
        assert [(conn,)] == [s.conn_ids for s in sends if s.frame.get("type") == "reply"]
        assert check_reply(frame, replies[0], expect) == []


# ---- hello and the first frame -------------------------------------------------------------------


def _signed(claims: dict[str, Any], *, secret: str | None = None, headers: dict[str, Any] | None = None) -> str:
    from .conftest import SECRET

    return jwt.encode(claims, secret or SECRET, algorithm="HS256", headers=headers)


def _b64(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@st.composite
def hello_frames(draw: st.DrawFn) -> tuple[bytes | str, int | None]:
    """A first frame and its documented outcome: None for an ok reply, else the close code."""
    from .conftest import token

    if draw(st.integers(0, 3)) == 2:  # not a request at all (text, garbage, other ops): 4001
        frame = draw(st.one_of(FAMILIES["bytes_and_values"], FAMILIES["crafted"], FAMILIES["mutated"]))
        return frame, 1009 if expectation(frame).close == 1009 else 4001

    now = int(time.time())
    good = token("fz_pre")
    tokens = st.one_of(
        st.just((good, True)),
        st.sampled_from(
            [
                (None, False),
                ("", False),
                ("not.a.jwt", False),
                (good[:-4] + "AAAA", False),
                (good + ".x", False),
                (good.encode(), False),
                (good * 50, False),
                ("\x00" * 100, False),
                (_b64(b'{"alg":"none","typ":"JWT"}') + "." + _b64(b'{"sub":"x","exp":9999999999}') + ".", False),
                (_b64(b"[" * 20_000) + "." + _b64(b"{}") + "." + _b64(b"x"), False),
                (_b64(b'{"alg":"HS256","crit":["' + "é".encode() * 300 + b'"]}') + ".e30.x", False),
                (_b64(b'{"alg":"HS256","kid":{"a":1}}') + ".e30.x", False),
                (_signed({"sub": "fz", "exp": now + 60}, secret="another-secret-0123456789-0123456789"), False),
                (_signed({"sub": "fz", "exp": now - 1}), False),
                (_signed({"sub": "fz"}), False),
                (_signed({"exp": now + 60}), False),
                (_signed({"sub": "", "exp": now + 60}), False),
                (_signed({"sub": "x" * 65, "exp": now + 60}), False),
                (_signed({"sub": 42, "exp": now + 60}), False),
                (_signed({"sub": "fz", "exp": "tomorrow"}), False),
                (_signed({"sub": "fz", "exp": now + 60, "nick": ""}), False),
                (_signed({"sub": "fz", "exp": now + 60, "local": "yes"}), False),
                (_signed({"sub": "fz", "exp": now + 60, "tags": ["t"] * 21}), False),
                (_signed({"sub": "fz", "exp": now + 60, "tags": "food"}), False),
                (_signed({"sub": "fz", "exp": now + 60, "role": "root"}), False),
                (
                    _signed({"sub": "fz\u202e\x00👍", "exp": now + 60, "nick": "é" * 64, "tags": ["#Food", "제주"]}),
                    True,
                ),
                (_signed({"sub": "y" * 64, "exp": now + 60, "role": "admin", "extra": {"deep": [[[[1]]]]}}), True),
            ]
        ),
        st.tuples(any_value, st.just(False)).filter(lambda t: not isinstance(t[0], str)),
        st.tuples(st.text(max_size=60), st.just(False)),
    )
    tok, token_ok = draw(tokens)
    resumes = st.one_of(
        st.just(("absent", True)),
        st.sampled_from([(None, True), ({"last_seq": 0}, True), ({"last_seq": MAX_INT}, True), ({}, False),
                         ({"last_seq": -1}, False), ({"last_seq": 1.0}, False), ({"last_seq": True}, False),
                         ({"last_seq": "3"}, False), ({"last_seq": None}, False), ([1], False), ("0", False)]),
        st.tuples(st.integers(0, MAX_INT).map(lambda n: {"last_seq": n}), st.just(True)),
    )  # fmt: skip
    resume, resume_ok = draw(resumes)
    data: dict[str, Any] = {} if tok is None else {"token": tok}
    if resume != "absent":
        data["resume"] = resume
    op = draw(st.one_of(st.just("hello"), st.just("hello"), st.sampled_from(OPS), unknown_ops))
    frame = packb({"type": op, "id": draw(st.integers(MIN_INT, MAX_INT)), "data": data})
    if op != "hello" or not token_ok:
        return frame, 4001
    return frame, None if resume_ok else 4002


async def test_fuzz_first_frames(server: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A hostile hello, another op or garbage first: an ok reply or a close with 4001/4002 (1009 if oversize), never a wait."""
    caplog.set_level(logging.INFO)
    cases = draw_frames(hello_frames(), max(50, EXAMPLES // 10), seed_value=SEED * 100 + 5)
    problems = []
    async with server.connect("by_asker") as bystander:
        for frame, close in cases:
            async with trio_websocket.open_websocket_url(server.url) as ws:
                answered = await exchange(ws, frame)
                if close is None:
                    reply = answered.reply
                    if not (isinstance(reply, dict) and reply.get("ok") is True):
                        problems.append(f"expected ok, got {answered!r} for {short(frame)}")
                elif answered.close_code != close:
                    problems.append(f"expected close {close}, got {short(answered)} for {short(frame)}")
        assert (await bystander.request("get_profile"))["user"]["user_id"] == "by_asker"
    assert not problems, f"{len(problems)} of {len(cases)}:\n" + "\n".join(problems[:15])
    assert server_errors(caplog.records) == []


@pytest.mark.parametrize(
    "frame", [b"\xc1", packb([1]), packb({"type": "hello"}), "hello"], ids=["not-msgpack", "not-a-map", "no-id", "text"]
)
async def test_unreadable_first_frame_closes_with_4001(server: Any, frame: bytes | str) -> None:
    """Found by fuzzing: it got a bad_frame reply and the socket waited for hello_timeout_s."""
    async with trio_websocket.open_websocket_url(server.url) as ws:
        answered = await exchange(ws, frame)

        assert answered.close_code == 4001, answered


@pytest.mark.parametrize("exp", [math.nan, math.inf])
async def test_token_with_non_finite_exp_is_refused(server: Any, exp: float) -> None:
    """Found by fuzzing: ``exp <= now`` is false for NaN, so such a token never expired."""
    async with trio_websocket.open_websocket_url(server.url) as ws:
        answered = await exchange(
            ws, packb({"type": "hello", "id": 1, "data": {"token": _signed({"sub": "fz", "exp": exp})}})
        )

        assert answered.close_code == 4001, answered


async def test_create_question_at_the_cap_of_rooms_asks_without_joining(start_server: Callable[..., Any]) -> None:
    """Found by fuzzing: the question was put in memory before the room limit refused the request. Now
    the cap refuses nothing: the question is made, in memory and stored, and its room is not joined."""
    from .conftest import question_data

    h = await start_server(limits={"rooms_per_connection": 2})
    async with h.connect("roomy") as client:
        for _ in range(2):
            await client.request("create_question", question_data())
        before = set(h.running.engine.questions)
        reply = await client.request("create_question", question_data(title="one room too many"))
        assert reply["joined"] is False
        qid = reply["question"]["question_id"]
        after = set(h.running.engine.questions)
        (conn,) = (c for c in h.running.engine.conns.values() if c.user_id == "roomy")
        assert qid not in conn.rooms and len(conn.rooms) == 2
        assert h.running.engine.presence.room_of(qid) is None
        assert (await client.request("get_question", {"question_id": qid}))["question"]["title"] == "one room too many"
    h.running.stop()

    assert after == before | {qid}


# ---- explicit extremes ---------------------------------------------------------------------------

EXTREMES = {
    "array-10k-whole": deep_array(10_000),
    "map-10k-whole": deep_map(10_000),
    "array-10k-data": frame_bytes(type_=b"\xafcreate_question", data=deep_array(10_000)),
    "map-10k-data": frame_bytes(type_=b"\xafcreate_question", data=deep_map(10_000)),
    "map-10k-field": frame_bytes(type_=b"\xafcreate_question", data=mp_map([(b"\xa5title", deep_map(10_000))])),
    "map-10k-id": frame_bytes(id_=deep_map(10_000)),
    "map-10k-other-key": mp_map(
        [(b"\xa4type", b"\xabget_profile"), (b"\xa2id", b"\x01"), (b"\xa5extra", deep_map(10_000))]
    ),
    "map-33-data": frame_bytes(data=deep_map(33)),
    "map-31-data": frame_bytes(data=deep_map(31)),
    "array-60k-data": frame_bytes(data=deep_array(60_000)),
    "uint64-max-id": frame_bytes(id_=b"\xcf" + b"\xff" * 8),
    "timestamp-id": frame_bytes(id_=b"\xd6\xff\x00\x00\x00\x01"),
    "bad-timestamp-data": frame_bytes(data=mp_map([(b"\xa1t", b"\xd7\xff" + b"\xff" * 8)])),
    "surrogate-title": frame_bytes(type_=b"\xafcreate_question", data=mp_map([(b"\xa5title", b"\xa3\xed\xa0\x80")])),
    "id-10k-chars": packb({"type": "join_question", "id": 3, "data": {"question_id": "q" * 10_000}}),
    "hashtags-10k": packb(
        {
            "type": "create_question",
            "id": 4,
            "data": {"title": "t", "location": {"lat": 33.5, "lng": 126.5}, "hashtags": ["a"] * 10_000},
        }
    ),
    "answer-ids-10k": packb(
        {"type": "mark_read", "id": 5, "data": {"question_id": Q_MINE, "answer_ids": [A_MINE] * 10_000}}
    ),
    "title-64k": packb(
        {"type": "create_question", "id": 6, "data": {"title": "x" * 65_000, "location": {"lat": 33.5, "lng": 126.5}}}
    ),
    "emoji-title-ok": packb(
        {
            "type": "create_question",
            "id": 7,
            "data": {"title": "👨‍👩‍👧‍👦\u202e\x00", "location": {"lat": 33.4996, "lng": 126.5312}},
        }
    ),
    "nan-location": packb(
        {"type": "create_question", "id": 8, "data": {"title": "t", "location": {"lat": math.nan, "lng": math.inf}}}
    ),
}


@pytest.mark.parametrize("name", list(EXTREMES))
async def test_extreme_frames(server: Any, name: str, caplog: pytest.LogCaptureFixture) -> None:
    """Deep nesting, huge ints, bad timestamps, 10k-item lists: one documented answer each."""
    caplog.set_level(logging.INFO)
    ids = await make_fuzz_targets(server)
    run = await fuzz_over(server.url, [EXTREMES[name]], ids)

    assert run.problems == []
    assert server_errors(caplog.records) == []


async def test_frame_size_limit_is_exact(server: Any) -> None:
    """A message of exactly max_frame_bytes is read; one byte more closes with 1009 (also when fragmented)."""

    def padded(total: int) -> bytes:
        base = packb({"type": "get_profile", "id": 1, "data": {"pad": ""}})
        frame = packb({"type": "get_profile", "id": 1, "data": {"pad": "x" * (total - len(base) - 2)}})
        return (
            frame
            if len(frame) == total
            else packb({"type": "get_profile", "id": 1, "data": {"pad": "x" * (total - len(base))}})
        )

    exact, over = padded(MAX_FRAME_BYTES), padded(MAX_FRAME_BYTES + 1)
    assert (len(exact), len(over)) == (MAX_FRAME_BYTES, MAX_FRAME_BYTES + 1)
    async with hello_connection(server.url, "big") as ws:
        assert (await exchange(ws, exact)).reply["ok"] is True
        assert (await exchange(ws, over)).close_code == 1009
    raw = await RawClient.connect(server.running.port, "big")
    fragments = b"".join(
        ws_frame(0x0 if start else 0x2, over[start : start + 1000], fin=start + 1000 >= len(over))
        for start in range(0, len(over), 1000)
    )  # 66 fragments
    with contextlib.suppress(OSError):
        await raw.send_bytes(fragments)
    assert (await raw.read_until_reply_or_close()).close_code == 1009
    raw.close()


# ---- below msgpack: WebSocket frames ---------------------------------------------------------------


def ws_frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True, length_bytes: int | None = None
) -> bytes:
    """One client WebSocket frame, as hostile as asked (reserved bits, no mask, long length forms)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)])
    mask_bit = 0x80 if masked else 0
    form = length_bytes if length_bytes is not None else (0 if n < 126 else 2 if n < 65536 else 8)
    if form == 0:
        head += bytes([mask_bit | n])
    elif form == 2:
        head += bytes([mask_bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack(">Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


SENTINEL_ID = 424242
SENTINEL = packb({"type": "get_profile", "id": SENTINEL_ID, "data": {}})


class RawClient:
    """A WebSocket client on a bare socket that can write any bytes after the handshake."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)

    @classmethod
    async def connect(cls, port: int, user_id: str) -> RawClient:
        from .conftest import token

        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        await sock.connect(("127.0.0.1", port))
        self = cls(sock)
        await self.send_bytes(self.ws.send(Request(host="127.0.0.1", target="/")))
        with trio.fail_after(REPLY_TIMEOUT_S):
            while not any(isinstance(ev, AcceptConnection) for ev in await self._events()):
                pass
        await self.send_bytes(
            self.ws.send(BytesMessage(data=packb({"type": "hello", "id": 0, "data": {"token": token(user_id)}})))
        )
        hello = await self.read_until_reply_or_close()
        assert hello.reply is not None and hello.reply[0]["ok"] is True, hello
        return self

    async def send_bytes(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    async def _events(self) -> list[Any]:
        data = await self.sock.recv(65536)
        self.ws.receive_data(data or None)
        return list(self.ws.events())

    async def read_until_reply_or_close(self, want_id: int | None = None) -> Answered:
        """Read until a reply (with ``want_id`` if given) or a close; ``reply`` is the list of replies."""
        replies: list[Any] = []
        parts: list[bytes] = []
        with trio.move_on_after(REPLY_TIMEOUT_S):
            while True:
                try:
                    events = await self._events()
                except OSError:
                    return Answered(reply=replies or None, close_code=-1)
                for ev in events:
                    if isinstance(ev, BytesMessage):
                        parts.append(bytes(ev.data))
                        if ev.message_finished:
                            replies.append(msgpack.unpackb(b"".join(parts), raw=False))
                            parts = []
                            if want_id is None or replies[-1].get("id") == want_id:
                                return Answered(reply=replies)
                    elif isinstance(ev, CloseConnection):
                        return Answered(reply=replies or None, close_code=ev.code)
                if not events and self.ws.state.name == "CLOSED":
                    return Answered(reply=replies or None, close_code=-1)
        return Answered(reply=replies or None, timed_out=True)

    def close(self) -> None:
        self.sock.close()


#: Close codes a client may not send (RFC 6455 7.4): the server must answer 1002.
BAD_CLOSE_CODES = (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)


@st.composite
def ws_garbage(draw: st.DrawFn) -> tuple[bytes, int | None]:
    """Complete but hostile WebSocket frames; returns (bytes, the client's own close code if any)."""
    out = b""
    client_close: int | None = None
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.integers(0, 11))
        payload = draw(st.binary(max_size=200))
        if kind == 0:  # any opcode, any bits (random text is rarely UTF-8: 1007)
            out += ws_frame(draw(st.integers(0, 15)), payload, fin=draw(st.booleans()), rsv=draw(st.integers(0, 7)))
        elif kind == 1:  # unmasked
            out += ws_frame(draw(st.sampled_from((0x1, 0x2, 0x9))), payload, masked=False)
        elif kind == 2:  # control frame too long, or fragmented
            out += ws_frame(draw(st.sampled_from((0x8, 0x9, 0xA))), payload.ljust(126, b"p"))
        elif kind == 3:
            out += ws_frame(0x9, payload[:125], fin=False)
        elif kind == 4:  # a continuation with nothing to continue
            out += ws_frame(0x0, payload, fin=draw(st.booleans()))
        elif kind == 5:  # a fragmented message, possibly interrupted by another data frame
            out += ws_frame(0x2, SENTINEL[:3], fin=False) + ws_frame(
                draw(st.sampled_from((0x0, 0x1, 0x2))), SENTINEL[3:]
            )
        elif kind == 6:  # a bad close code or a 1-byte close payload
            code = draw(st.sampled_from(BAD_CLOSE_CODES))
            out += ws_frame(0x8, struct.pack(">H", code) if draw(st.booleans()) else b"\x03")
        elif kind == 7:  # a valid close: the server echoes it
            client_close = draw(st.sampled_from((1000, 1001, 3000, 4000, 4999)))
            out += ws_frame(0x8, struct.pack(">H", client_close) + draw(st.text(max_size=20)).encode()[:100])
        elif kind == 8:  # non-minimal length forms
            out += ws_frame(0x2, SENTINEL, length_bytes=draw(st.sampled_from((2, 8))))
        elif kind == 9:  # pings and pongs with payloads
            out += ws_frame(draw(st.sampled_from((0x9, 0xA))), payload[:125])
        elif kind == 10:  # a text frame, UTF-8 or not
            out += ws_frame(0x1, draw(st.one_of(st.text(max_size=50).map(str.encode), st.binary(max_size=50))))
        else:  # a valid binary frame with fuzz bytes
            out += ws_frame(0x2, draw(random_bytes))
        if client_close is not None:
            break
    return out, client_close


async def test_fuzz_websocket_frames(server: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Hostile WebSocket framing: a documented close (1002, 1007, 1009, the client's own) or replies, then the sentinel's."""
    caplog.set_level(logging.INFO)
    cases = draw_frames(ws_garbage(), max(50, EXAMPLES // 10), seed_value=SEED * 100 + 7)
    problems = []
    async with server.connect("by_asker") as bystander:
        for garbage, client_close in cases:
            raw = await RawClient.connect(server.running.port, "fz_ws")
            with contextlib.suppress(OSError):  # the server may already have closed
                await raw.send_bytes(garbage + ws_frame(0x2, SENTINEL))
            answered = await raw.read_until_reply_or_close(want_id=SENTINEL_ID)
            raw.close()
            allowed = {1002, 1007, 1009} | ({client_close} if client_close else set())
            if answered.timed_out:
                problems.append(f"no close and no sentinel reply for {short(garbage)}")
            elif answered.close_code is not None and answered.close_code not in allowed:
                problems.append(f"close {answered.close_code} (allowed {sorted(allowed)}) for {short(garbage)}")
            for reply in answered.reply or []:
                # Replies to fuzz binary frames inside the garbage, then the sentinel's.
                expect = Expect(reply.get("id"), ERROR_CODES - {"internal"}, True)
                problems += [f"{p} for {short(garbage)}" for p in check_reply(b"", reply, expect)]
        assert (await bystander.request("get_profile"))["user"]["user_id"] == "by_asker"
    assert not problems, f"{len(problems)} of {len(cases)}:\n" + "\n".join(problems[:15])
    assert server_errors(caplog.records) == []


@pytest.mark.parametrize(
    "frame", [ws_frame(0x1, b"\xff\xfe"), ws_frame(0x8, b"\x03\xe8\xff")], ids=["text", "close-reason"]
)
async def test_invalid_utf8_closes_with_1007(server: Any, frame: bytes) -> None:
    """Found by fuzzing: 1007 was not in PROTOCOL.md's close codes (it is now)."""
    raw = await RawClient.connect(server.running.port, "fz_ws")
    await raw.send_bytes(frame)
    answered = await raw.read_until_reply_or_close()
    raw.close()

    assert answered.close_code == 1007, answered


async def test_ping_flood_without_reading_is_a_slow_consumer(start_server: Callable[..., Any]) -> None:
    """Found by fuzzing: pongs bypassed the outbound limit (21 MB buffered for a 1 MiB limit)."""
    limit = 262_144
    h = await start_server(server={"outbound_buffer_bytes": limit})
    raw = await RawClient.connect(h.running.port, "pinger")
    conn = next(iter(h.running.clients.conns.values()))
    burst = ws_frame(0x9, b"p" * 125) * 1000  # 131 KB of pings, 127 KB of pongs
    peak = 0
    with trio.move_on_after(10):
        for _ in range(400):  # at most 52 MB
            await raw.send_bytes(burst)
            await trio.lowlevel.checkpoint()
            peak = max(peak, conn.buffered_bytes)
            if conn.closing or peak > 4 * limit:
                break
    raw.close()
    async with h.connect("other") as other:
        assert (await other.request("get_profile"))["user"]["user_id"] == "other"
    h.running.stop()

    assert conn.close_code == 4009 and peak <= limit + 65536, (conn.close_code, peak)
