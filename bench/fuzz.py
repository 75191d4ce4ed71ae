"""Fuzz bench: hostile frames against a ``dongne serve`` subprocess; nothing may crash or go unanswered.

    python bench/fuzz.py [--frames 100000] [--seed 0] [--connections 4] [--family all]
                         [--limits off|default] [--reply-timeout 10] [--json bench/results/fuzz.json]

What it does:

* Starts ``python -m dongne serve`` on 127.0.0.1 (port 0, a temporary
  database, ``DONGNE_JWT_SECRET`` set; the port is read from the log line
  ``dongne listening: clients ws://HOST:PORT  ops http://HOST:PORT``) and mints
  tokens with ``dongne.auth.mint_token``.
* ``--connections`` worker processes each draw their share of ``--frames``
  frames from the Hypothesis strategies in ``tests/fuzzing.py`` (the same
  frame space as the test suite: random bytes, msgpack values of every type,
  hand-built invalid msgpack, 10,000-level nesting, every operation with wrong
  types and hostile values, mutated frames), seeded from ``--seed`` and the
  worker's index, so a run is reproducible. Each worker then says hello as
  its own user (every other one an admin, so that the admin operations'
  checks are fuzzed as well as their refusal; bans, hides and reports aim at
  the worker's own victim user and the victim's question and answer, IP blocks
  at documentation ranges, never at 127.0.0.1, so no frame ends the run)
  and sends its frames one at a time, waiting for the answer to
  each, and checks it with the suite's oracle (``check_reply``): exactly one
  reply with the right id, ``ok`` only for an operation that exists, otherwise
  a code PROTOCOL.md documents for that operation, never ``internal``; a
  frame over ``max_frame_bytes`` must close with 1009 (the worker reconnects).
* Meanwhile a bystander pair (an asker and an answerer on their own question)
  does normal traffic and checks every reply and event it expects.
* A crash is the server process exiting or the bystander getting no answer
  within ``--reply-timeout``; the server is then restarted (at most
  ``--max-restarts`` times) and the workers reconnect.

Counted: crashes, unanswered frames (no reply within ``--reply-timeout``),
connections dropped without a close frame, ``internal`` errors, undocumented
error or close codes, documented codes that do not belong to the operation,
malformed replies, unexpected events, bystander anomalies. Target: zero
crashes and zero unanswered frames.

``--limits off`` (the default) raises the rate limits out of the way, as the
test suite does, so the frames reach the operations; ``--limits default``
keeps the shipped limits (then ``rate_limited`` replies and 4008 closes are
expected and counted).

Everything runs on 127.0.0.1; every wait is bounded (``--timeout`` for the
whole run); the bench kills its subprocesses at exit.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import multiprocessing
import multiprocessing.connection
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

sys.path.insert(0, str(h.REPO_DIR))

from dongne.auth import mint_token
from tests.fuzzing import (
    A_DEL,
    A_HIDE,
    A_MINE,
    A_THEIRS,
    CLOSE_CODES,
    FAMILIES,
    MODERATION_OPS,
    Q_DEL,
    Q_HIDE,
    Q_MINE,
    Q_THEIRS,
    R_OPEN,
    U_VICTIM,
    bind_ids,
    check_reply,
    draw_frames,
    expectation,
    fuzz_frames,
)

#: The outcome categories, in table order; the first two are the target.
PROBLEMS = (
    "unanswered",
    "dropped",
    "internal",
    "undocumented_code",
    "wrong_code",
    "bad_reply",
    "unexpected_close",
    "unexpected_event",
)

# ---- a blocking client ----------------------------------------------------------------


class Refused(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = error.get("code")


class Anomaly(Exception):
    """A server frame that breaks the protocol (for the bystanders)."""


class SyncClient:
    """A blocking dongne client on ``_harness.BlockingWebSocket``: hello, requests, events.

    Raises ``TimeoutError`` when the server says nothing for ``timeout`` seconds
    and ``h.WebSocketClosed`` when it closes.
    """

    def __init__(self, port: int, user_id: str, secret: str, *, timeout: float, **claims: Any) -> None:
        self.ws = h.BlockingWebSocket("127.0.0.1", port, timeout=timeout)
        self.events: collections.deque[dict[str, Any]] = collections.deque()
        self._ids = itertools.count(1)
        try:
            self.hello = self.request("hello", {"token": mint_token(secret, user_id, now_s=time.time(), **claims)})
        except BaseException:
            self.ws.close()
            raise

    def request(self, op: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        rid = next(self._ids)
        self.ws.send(h.OP_BINARY, msgpack.packb({"type": op, "id": rid, "data": data or {}}))
        while True:
            frame = self.receive()
            if frame.get("type") != "reply":
                self.events.append(frame)
                continue
            if frame.get("id") != rid:
                raise Anomaly(f"reply with id {frame.get('id')!r} to request {rid} ({op})")
            if not frame.get("ok"):
                raise Refused(frame.get("error") or {})
            return dict(frame.get("data") or {})

    def next_event(self) -> dict[str, Any]:
        if self.events:
            return self.events.popleft()
        frame = self.receive()
        if frame.get("type") == "reply":
            raise Anomaly(f"a reply nobody asked for: {frame!r}")
        return frame

    def receive(self) -> dict[str, Any]:
        _opcode, payload = self.ws.recv()
        frame = msgpack.unpackb(payload, raw=False)
        if not isinstance(frame, dict):
            raise Anomaly(f"a server frame that is not a map: {frame!r}")
        return frame

    def close(self) -> None:
        self.ws.close()


# ---- the fuzzing workers -----------------------------------------------------------------


def _targets(port: int, index: int, secret: str, timeout: float) -> dict[str, str]:
    """Create this worker's questions and answers; map the placeholders to them."""
    asker = {"title": "fuzzer's question", "location": {"lat": 33.4996, "lng": 126.5312}}
    fuzzer = SyncClient(port, f"fuzzer{index}", secret, timeout=timeout, admin=index % 2 == 1)
    helper = SyncClient(port, f"fz_helper{index}", secret, timeout=timeout)
    try:
        q_mine = fuzzer.request("create_question", asker)["question"]["question_id"]
        q_theirs = helper.request("create_question", {**asker, "title": "helper's question"})["question"]["question_id"]
        a_mine = helper.request("create_answer", {"question_id": q_mine, "content": "helper's answer"})["answer"][
            "answer_id"
        ]
        a_theirs = fuzzer.request("create_answer", {"question_id": q_theirs, "content": "fuzzer's answer"})["answer"][
            "answer_id"
        ]
        # What the delete operations mostly aim at (see tests/fuzzing.py).
        q_del = fuzzer.request("create_question", {**asker, "title": "fuzzer's deletable question"})["question"][
            "question_id"
        ]
        a_del = fuzzer.request("create_answer", {"question_id": q_theirs, "content": "fuzzer's other answer"})[
            "answer"
        ]["answer_id"]
        # The moderation targets (see tests/fuzzing.py): this worker's victim, a
        # user with no connection once this is done, who asked Q_HIDE and
        # answered Q_THEIRS; the helper's open report of Q_HIDE.
        victim_id = victim_of(index)
        victim = SyncClient(port, victim_id, secret, timeout=timeout, nick="Victim")
        try:
            q_hide = victim.request("create_question", {**asker, "title": "victim's question"})["question"][
                "question_id"
            ]
            a_hide = victim.request("create_answer", {"question_id": q_theirs, "content": "victim's answer"})["answer"][
                "answer_id"
            ]
        finally:
            victim.close()
        r_open = helper.request("report_content", {"question_id": q_hide, "reason": "spam"})["report_id"]
    finally:
        fuzzer.close()
        helper.close()
    return {
        Q_MINE: q_mine, Q_THEIRS: q_theirs, A_MINE: a_mine, A_THEIRS: a_theirs, Q_DEL: q_del, A_DEL: a_del,
        U_VICTIM: victim_id, Q_HIDE: q_hide, A_HIDE: a_hide, R_OPEN: r_open,
    }  # fmt: skip


def victim_of(index: int) -> str:
    """Worker ``index``'s victim: as long as the U_VICTIM placeholder, which ``bind_ids`` needs."""
    victim = f"fz_victim{index:0{len(U_VICTIM) - 9}d}"
    assert len(victim) == len(U_VICTIM)
    return victim


def _classify(problem: str) -> str:
    if problem.startswith("internal error"):
        return "internal"
    if problem.startswith("undocumented error code"):
        return "undocumented_code"
    if problem.startswith("code "):
        return "wrong_code"
    return "bad_reply"


def _frame_sample(frame: bytes | str) -> dict[str, Any]:
    if isinstance(frame, str):
        return {"text_frame": True, "length": len(frame), "repr": repr(frame[:200])}
    return {"text_frame": False, "length": len(frame), "hex": frame[:400].hex()}


class _Tally:
    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.codes: collections.Counter[str] = collections.Counter()
        self.closes: collections.Counter[str] = collections.Counter()
        self.rtt_ms: list[float] = []
        self.samples: list[dict[str, Any]] = []
        self.moderation: collections.Counter[str] = collections.Counter()  # "op ok" / "op code" / "op closed"

    def problem(self, kind: str, frame: bytes | str, detail: str) -> None:
        self.counts[kind] += 1
        if len(self.samples) < 25:
            self.samples.append({"kind": kind, "detail": detail[:500], **_frame_sample(frame)})


def _fuzz_worker(pipe: multiprocessing.connection.Connection, spec: dict[str, Any]) -> None:
    """Draw this worker's frames, then send them once the parent says ``("go", port)``.

    Messages to the parent: ``("generated", n, seconds)``, then ``("done", result)``.
    From the parent: ``("go", port)``, ``("port", port)`` after a restart, ``("stop",)``.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    index, secret, timeout = spec["index"], spec["secret"], spec["reply_timeout"]
    strategy = fuzz_frames() if spec["family"] == "all" else FAMILIES[spec["family"]]
    started = time.perf_counter()
    frames = draw_frames(strategy, spec["frames"], seed_value=spec["seed"] * 1000 + index)
    pipe.send(("generated", len(frames), time.perf_counter() - started))
    message = pipe.recv()
    if message[0] != "go":
        return
    port = message[1]
    tally = _Tally()
    deadline = time.monotonic() + spec["send_budget_s"]
    allowed_closes = {4008} if spec["limits"] == "default" else set()
    # Events a lone fuzzer can cause itself (nearby questions after a move, its
    # badge after mark_notifications_read); an admin also gets slow-response alerts.
    own_events = {"nearby_questions", "unread_count"} | ({"slow_response_alert"} if index % 2 == 1 else set())

    def new_port(wait_s: float) -> bool:
        """Take a port the parent announced (after a restart), waiting up to ``wait_s``."""
        nonlocal port
        changed = False
        while pipe.poll(wait_s if not changed else 0):
            message = pipe.recv()
            if message[0] == "port":
                port, changed = message[1], True
            elif message[0] == "stop":
                raise SystemExit(0)
        return changed

    def connect() -> SyncClient | None:
        give_up = time.monotonic() + spec["reconnect_s"]
        while time.monotonic() < min(give_up, deadline):
            new_port(0)
            try:
                client = SyncClient(port, f"fuzzer{index}", secret, timeout=timeout, admin=index % 2 == 1)
                tally.counts["connections"] += 1
                return client
            except (OSError, h.WebSocketClosed, ConnectionError, Refused, Anomaly):
                tally.counts["connect_retries"] += 1
                new_port(0.5)
        return None

    try:
        ids = _targets(port, index, secret, timeout)
    except Exception:
        new_port(spec["reconnect_s"])
        ids = _targets(port, index, secret, timeout)
    sent_started = time.perf_counter()
    client: SyncClient | None = None
    position = 0
    while position < len(frames) and time.monotonic() < deadline:
        if client is None:
            client = connect()
            if client is None:
                break
        frame = bind_ids(frames[position], ids)
        position += 1
        expect = expectation(frame)
        tally.counts["sent"] += 1
        t0 = time.perf_counter()
        try:
            try:
                if isinstance(frame, str):
                    client.ws.send(h.OP_TEXT, frame.encode())
                else:
                    client.ws.send(h.OP_BINARY, frame)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server closed mid-frame (an oversize one): its close frame is still to be read
            while True:
                reply = client.receive()
                if reply.get("type") == "reply":
                    break
                tally.counts["events"] += 1
                if reply.get("type") not in own_events:
                    tally.problem("unexpected_event", frame, repr(reply)[:300])
        except TimeoutError:
            tally.problem("unanswered", frame, f"no reply within {timeout} s")
            client.close()
            client = None
            continue
        except h.WebSocketClosed as closed:
            client.close()
            client = None
            code = closed.code
            if code is None:
                tally.problem("dropped", frame, "the connection ended without a close frame")
                continue
            tally.closes[str(code)] += 1
            if code == expect.close or code in allowed_closes:
                tally.counts["closed_as_documented"] += 1
            else:
                detail = f"closed with {code}, expected {expect.close or 'a reply'}"
                tally.problem(
                    "unexpected_close", frame, detail + ("" if code in CLOSE_CODES else " (undocumented close code)")
                )
            continue
        except (OSError, Anomaly, ValueError) as exc:  # reset, or a server frame that is not msgpack
            tally.problem("dropped" if isinstance(exc, OSError) else "bad_reply", frame, repr(exc))
            client.close()
            client = None
            continue
        tally.rtt_ms.append((time.perf_counter() - t0) * 1000)
        tally.counts["replies"] += 1
        if expect.close is not None:
            tally.problem("bad_reply", frame, f"a reply where close {expect.close} was expected: {reply!r}"[:300])
            continue
        if reply.get("ok") is True:
            tally.counts["ok"] += 1
        elif isinstance(reply.get("error"), dict):
            tally.codes[str(reply["error"].get("code"))] += 1
        if expect.op in MODERATION_OPS and reply.get("id") == expect.id:
            error = reply.get("error")
            outcome = "ok" if reply.get("ok") is True else str(error.get("code")) if isinstance(error, dict) else "?"
            tally.moderation[f"{expect.op} {outcome}"] += 1
        problems = check_reply(frame, reply, expect)
        for problem in problems:
            tally.problem(_classify(problem), frame, problem)
        if not problems:
            tally.counts["answered_as_documented"] += 1
    if client is not None:
        try:  # still usable, and nothing stray queued ahead of this reply
            client.request("get_profile")
            tally.counts["final_check_ok"] += 1
        except Exception as exc:
            tally.problem("bad_reply", b"", f"get_profile after the last frame: {exc!r}")
        client.close()
    tally.counts["not_sent"] = len(frames) - position
    pipe.send(
        (
            "done",
            {
                "index": index,
                "counts": dict(tally.counts),
                "codes": dict(tally.codes),
                "closes": dict(tally.closes),
                "rtt_ms": tally.rtt_ms,
                "samples": tally.samples,
                "moderation": dict(tally.moderation),
                "send_s": time.perf_counter() - sent_started,
            },
        )
    )


# ---- the bystanders -------------------------------------------------------------------------


class Bystanders(threading.Thread):
    """An asker and an answerer doing normal traffic; every reply and event is checked."""

    def __init__(self, secret: str, timeout: float, interval: float) -> None:
        super().__init__(name="bystanders", daemon=True)
        self.secret = secret
        self.timeout = timeout
        self.interval = interval
        self.port = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.rounds = 0
        self.anomalies: list[str] = []
        self.slowest_s = 0.0
        self.last_ok = time.monotonic()
        self.generation = 0  # bumped by the parent after a restart

    def run(self) -> None:
        while not self.stop.is_set():
            generation = self.generation
            try:
                self._session(generation)
            except Exception as exc:
                if not self.stop.is_set() and generation == self.generation:
                    with self.lock:
                        self.anomalies.append(f"{time.strftime('%H:%M:%S')} {exc!r}"[:300])
                self.stop.wait(0.5)

    def _session(self, generation: int) -> None:
        asker = SyncClient(self.port, "by_asker", self.secret, timeout=self.timeout, nick="Asker")
        local = SyncClient(self.port, "by_local", self.secret, timeout=self.timeout, nick="Local")
        try:
            seq = asker.hello["last_seq"]
            qid = asker.request(
                "create_question", {"title": "Bystander question", "location": {"lat": 33.4996, "lng": 126.5312}}
            )["question"]["question_id"]
            local.request("join_question", {"question_id": qid})
            self._expect(asker, "user_online")
            n = 0
            while not self.stop.is_set() and generation == self.generation:
                started = time.monotonic()
                local.request("typing_start", {"question_id": qid})
                self._expect(asker, "user_typing")
                answer = local.request("create_answer", {"question_id": qid, "content": f"answer {n}"})["answer"]
                got = [asker.next_event() for _ in range(3)]
                if [e.get("type") for e in got] != ["new_answer", "answer_notification", "user_stop_typing"]:
                    raise Anomaly(f"asker got {[e.get('type') for e in got]}")
                seq += 1
                if got[1].get("seq") != seq:
                    raise Anomaly(f"answer_notification seq {got[1].get('seq')}, expected {seq}")
                read = asker.request("mark_read", {"question_id": qid, "answer_ids": [answer["answer_id"]]})
                if read["answer_ids"] != [answer["answer_id"]]:
                    raise Anomaly(f"mark_read changed {read['answer_ids']}")
                receipt = local.next_event()
                if (receipt.get("type"), receipt.get("data", {}).get("state")) != ("receipt", "read"):
                    raise Anomaly(f"local got {receipt!r}")
                if asker.request("get_profile")["last_seq"] != seq:
                    raise Anomaly("asker's last_seq does not match its notifications")
                if asker.events or local.events:
                    raise Anomaly(f"stray events: {list(asker.events) + list(local.events)}"[:300])
                n += 1
                with self.lock:
                    self.rounds += 1
                    self.slowest_s = max(self.slowest_s, time.monotonic() - started)
                    self.last_ok = time.monotonic()
                self.stop.wait(self.interval)
        finally:
            asker.close()
            local.close()

    @staticmethod
    def _expect(client: SyncClient, kind: str) -> None:
        event = client.next_event()
        if event.get("type") != kind:
            raise Anomaly(f"expected {kind}, got {event!r}"[:300])


# ---- the run ------------------------------------------------------------------------------------


def _alive_and_serving(port: int, secret: str, timeout: float) -> bool:
    try:
        client = SyncClient(port, "late_comer", secret, timeout=timeout)
    except Exception:
        return False
    try:
        return bool(client.request("get_profile")["user"]["user_id"] == "late_comer")
    except Exception:
        return False
    finally:
        client.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    secret = secrets.token_urlsafe(32)
    ctx = multiprocessing.get_context("spawn")
    shares = [
        args.frames // args.connections + (1 if i < args.frames % args.connections else 0)
        for i in range(args.connections)
    ]
    pipes: list[multiprocessing.connection.Connection] = []
    procs: list[Any] = []
    for index, share in enumerate(shares):
        parent_end, child_end = ctx.Pipe()
        spec = {
            "index": index, "frames": share, "seed": args.seed, "family": args.family, "secret": secret,
            "reply_timeout": args.reply_timeout, "reconnect_s": args.reply_timeout * 3 + 30, "limits": args.limits,
            "send_budget_s": args.timeout,
        }  # fmt: skip
        proc = ctx.Process(target=_fuzz_worker, args=(child_end, spec), name=f"fuzz-{index}", daemon=True)
        proc.start()
        pipes.append(parent_end)
        procs.append(proc)
    report: dict[str, Any] = {"restarts": [], "crashes": 0}
    with tempfile.TemporaryDirectory(prefix="dongne-fuzz-") as tmp:
        db = Path(tmp) / "fuzz.sqlite3"
        env = dict(h.BENCH_LIMITS) if args.limits == "off" else {}  # tests/conftest.py's UNLIMITED
        if args.limits == "off":  # the read and report buckets too, as tests/test_fuzz.py does
            env.update({"DONGNE_LIMITS_READS_PER_S": "1000000", "DONGNE_LIMITS_READS_BURST": "1000000"})
            env.update({"DONGNE_MODERATION_REPORTS_PER_HOUR": "1000000", "DONGNE_MODERATION_REPORTS_BURST": "1000000"})

        def start() -> h.ServerProcess:
            return h.start_dongne(
                db, jwt_secret=secret, synchronous=args.synchronous, extra_env=env, lift_limits=args.limits == "off"
            )

        server = start()
        bystanders: Bystanders | None = None
        try:
            t0 = time.perf_counter()
            generated = [0] * len(procs)
            gen_seconds = [0.0] * len(procs)
            for i, pipe in enumerate(pipes):
                if not pipe.poll(args.timeout):
                    raise TimeoutError(f"worker {i} did not finish drawing frames")
                _, generated[i], gen_seconds[i] = pipe.recv()
            report["generation"] = {
                "wall_s": time.perf_counter() - t0,
                "worker_s": gen_seconds,
                "frames": sum(generated),
            }
            print(
                f"# drew {sum(generated):,} frames in {report['generation']['wall_s']:.1f} s ({args.connections} processes)",
                file=sys.stderr,
                flush=True,
            )
            rss_before = server.rss_bytes()
            cpu_before = server.cpu_seconds()
            bystanders = Bystanders(secret, args.reply_timeout, args.bystander_interval)
            bystanders.port = server.port or 0
            bystanders.start()
            send_started = time.perf_counter()
            for pipe in pipes:
                pipe.send(("go", server.port))
            results: dict[int, dict[str, Any]] = {}
            last_progress = time.monotonic()
            while len(results) < len(pipes):
                for i, pipe in enumerate(pipes):
                    if i not in results and pipe.poll(0):
                        message = pipe.recv()
                        if message[0] == "done":
                            results[i] = message[1]
                            last_progress = time.monotonic()
                for i, proc in enumerate(procs):
                    if i not in results and not proc.is_alive():
                        results[i] = {
                            "index": i,
                            "counts": {"worker_died": 1},
                            "codes": {},
                            "closes": {},
                            "rtt_ms": [],
                            "samples": [],
                            "send_s": 0.0,
                        }
                with bystanders.lock:
                    stale = time.monotonic() - bystanders.last_ok
                hung = stale > args.reply_timeout * 2 and not _alive_and_serving(
                    server.port or 0, secret, args.reply_timeout
                )
                if not server.alive() or hung:
                    report["crashes"] += 1
                    what = "exited" if not server.alive() else "stopped answering"
                    report["restarts"].append(
                        {
                            "at_s": round(time.perf_counter() - send_started, 1),
                            "what": what,
                            "stderr_tail": list(server.tail)[-40:],
                        }
                    )
                    print(f"# CRASH: the server {what}; restarting", file=sys.stderr, flush=True)
                    server.stop(timeout=2)
                    if report["crashes"] > args.max_restarts:
                        for pipe in pipes:
                            pipe.send(("stop",))
                        break
                    server = start()
                    bystanders.port = server.port or 0
                    bystanders.generation += 1
                    with bystanders.lock:
                        bystanders.last_ok = time.monotonic()
                    for i, pipe in enumerate(pipes):
                        if i not in results:
                            pipe.send(("port", server.port))
                if time.monotonic() - last_progress > args.timeout:
                    raise TimeoutError("no worker finished within --timeout")
                time.sleep(0.2)
            send_s = time.perf_counter() - send_started
            bystanders.stop.set()
            bystanders.join(args.reply_timeout + 5)
            serving = server.alive() and _alive_and_serving(server.port or 0, secret, args.reply_timeout)
            if not serving and server.alive():  # a crash at the very end that the loop did not see
                report["crashes"] += 1
            report["server"] = {
                "rss_before_mb": rss_before / 2**20,
                "rss_after_mb": server.rss_bytes() / 2**20 if server.alive() else None,
                "cpu_s": server.cpu_seconds() - cpu_before if server.alive() and not report["restarts"] else None,
                "serving_at_end": serving,
                "errors_in_log_tail": [
                    line
                    for line in server.tail
                    if '"level": "ERROR"' in line or " ERROR " in line or "Traceback" in line
                ][:20],
            }
        finally:
            if bystanders is not None:
                bystanders.stop.set()
            server.stop(timeout=5)
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join(5)
    report["send_s"] = send_s
    report["workers"] = [results[i] for i in sorted(results)]
    report["bystanders"] = {
        "rounds": bystanders.rounds,
        "anomalies": bystanders.anomalies[:20],
        "anomaly_count": len(bystanders.anomalies),
        "slowest_round_s": bystanders.slowest_s,
    }
    return report


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    counts: collections.Counter[str] = collections.Counter()
    codes: collections.Counter[str] = collections.Counter()
    closes: collections.Counter[str] = collections.Counter()
    rtts: list[float] = []
    samples: list[dict[str, Any]] = []
    moderation: collections.Counter[str] = collections.Counter()
    for worker in report["workers"]:
        counts.update(worker["counts"])
        moderation.update(worker.get("moderation", {}))
        codes.update(worker["codes"])
        closes.update(worker["closes"])
        rtts.extend(worker["rtt_ms"])
        samples.extend(worker["samples"])
    rtts.sort()
    total = {
        "frames_sent": counts["sent"],
        "frames_not_sent": counts["not_sent"],
        "replies": counts["replies"],
        "ok_replies": counts["ok"],
        "answered_as_documented": counts["answered_as_documented"],
        "closed_as_documented": counts["closed_as_documented"],
        "crashes": report["crashes"],
        **{kind: counts[kind] for kind in PROBLEMS},
        "workers_died": counts["worker_died"],
        "connections": counts["connections"],
        "events_seen": counts["events"],
    }
    return {
        "total": total,
        "error_codes": dict(codes.most_common()),
        "close_codes": dict(closes.most_common()),
        "rtt_ms": {
            "p50": h.percentile(rtts, 50),
            "p99": h.percentile(rtts, 99),
            "p999": h.percentile(rtts, 99.9),
            "max": rtts[-1] if rtts else float("nan"),
        },
        "frames_per_s": counts["sent"] / report["send_s"] if report["send_s"] else float("nan"),
        "moderation_outcomes": dict(sorted(moderation.items())),
        "samples": samples[:50],
    }


def _parser() -> argparse.ArgumentParser:
    p = h.bench_parser(__doc__)
    p.add_argument("--frames", type=int, default=100_000, help="fuzz frames in all (default 100000)")
    p.add_argument(
        "--seed", type=int, default=0, help="the Hypothesis seed; worker i draws with seed*1000+i (default 0)"
    )
    p.add_argument("--connections", type=int, default=4, help="fuzzing connections, one process each (default 4)")
    p.add_argument(
        "--family", choices=["all", *FAMILIES], default="all", help="which frame family to draw (default all)"
    )
    p.add_argument(
        "--limits",
        choices=["off", "default"],
        default="off",
        help="rate limits raised out of the way, or the shipped ones (default off)",
    )
    p.add_argument(
        "--reply-timeout",
        type=float,
        default=10.0,
        help="a frame without an answer within this is unanswered, seconds (default 10)",
    )
    p.add_argument(
        "--bystander-interval", type=float, default=0.05, help="pause between bystander rounds, seconds (default 0.05)"
    )
    p.add_argument("--max-restarts", type=int, default=3, help="crashes after which the run stops (default 3)")
    p.add_argument(
        "--synchronous",
        choices=["NORMAL", "FULL"],
        default="NORMAL",
        help="dongne's SQLite synchronous setting (default NORMAL)",
    )
    h.add_json_option(p, "fuzz")
    p.add_argument("--timeout", type=float, default=1800.0, help="bound on the whole bench, seconds (default 1800)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.frames < 1 or args.connections < 1 or args.reply_timeout <= 0:
        raise SystemExit("--frames and --connections must be positive, --reply-timeout too")
    started = time.perf_counter()
    with h.time_limit(args.timeout + 60):
        report = run(args)
    summary = summarise(report)
    t = summary["total"]
    met = t["crashes"] == 0 and t["unanswered"] == 0
    clean = (
        met
        and all(t[k] == 0 for k in PROBLEMS)
        and t["workers_died"] == 0
        and report["bystanders"]["anomaly_count"] == 0
    )
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=h.REPO_DIR, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    result = {
        **h.report_head("fuzz", args, dongne_commit=commit),
        "elapsed_s": time.perf_counter() - started,
        "generation": report["generation"],
        "send_s": report["send_s"],
        **summary,
        "bystanders": report["bystanders"],
        "server": report.get("server", {}),
        "restarts": report["restarts"],
        "target_met": met,
        "all_clean": clean,
    }
    rows = [
        ["frames sent", t["frames_sent"]],
        ["  answered as documented", t["answered_as_documented"]],
        ["    of which ok: true", t["ok_replies"]],
        [
            "  closed as documented (1009 oversize" + (", 4008" if args.limits == "default" else "") + ")",
            t["closed_as_documented"],
        ],
        ["crashes (server died or hung)", t["crashes"]],
        [f"unanswered (no reply in {args.reply_timeout:g} s)", t["unanswered"]],
        ["dropped without a close frame", t["dropped"]],
        ["internal errors", t["internal"]],
        ["undocumented error codes", t["undocumented_code"]],
        ["documented code, wrong for the op", t["wrong_code"]],
        ["malformed replies (id, shape, extra)", t["bad_reply"]],
        ["unexpected close codes", t["unexpected_close"]],
        ["unexpected events", t["unexpected_event"]],
        ["frames not sent", t["frames_not_sent"]],
        ["bystander rounds / anomalies", f"{report['bystanders']['rounds']} / {report['bystanders']['anomaly_count']}"],
    ]
    family = "all families" if args.family == "all" else f"family {args.family}"
    print(
        f"\nfuzz: {t['frames_sent']:,} frames ({family}), {args.connections} connections, seed {args.seed}, limits {args.limits}"
    )
    print(
        f"  drew frames in {report['generation']['wall_s']:.1f} s; sent in {report['send_s']:.1f} s ({summary['frames_per_s']:,.0f} frames/s)"
    )
    rtt = summary["rtt_ms"]
    print(
        f"  round trip per frame: p50 {rtt['p50']:.2f} ms, p99 {rtt['p99']:.2f} ms, p99.9 {rtt['p999']:.1f} ms, max {rtt['max']:.1f} ms"
    )
    server = report.get("server", {})
    if server.get("cpu_s") is not None:
        print(
            f"  server RSS {server['rss_before_mb']:.0f} -> {server['rss_after_mb']:.0f} MB, CPU {server['cpu_s']:.1f} s; bystander slowest round {report['bystanders']['slowest_round_s'] * 1000:.0f} ms"
        )
    print()
    print(h.format_table(["outcome", "count"], rows))
    print()
    print(h.format_table(["error code", "replies"], list(summary["error_codes"].items()) or [["-", 0]]))
    if summary["close_codes"]:
        print()
        print(h.format_table(["close code", "connections"], list(summary["close_codes"].items())))
    by_op: dict[str, dict[str, int]] = {}
    for key, n in summary["moderation_outcomes"].items():
        op, outcome = key.split(" ", 1)
        by_op.setdefault(op, {})[outcome] = n
    if by_op:
        print()
        print(
            h.format_table(
                ["moderation op", "ok", "errors by code"],
                [
                    [
                        op,
                        by_op[op].get("ok", 0),
                        ", ".join(f"{c} {n}" for c, n in sorted(by_op[op].items()) if c != "ok"),
                    ]
                    for op in MODERATION_OPS
                    if op in by_op
                ],
            )
        )
    for sample in summary["samples"][:10]:
        print(
            f"  {sample['kind']}: {sample['detail'][:160]}  frame[{sample['length']}]={sample.get('hex', sample.get('repr', ''))[:120]}"
        )
    print(f"\ntarget (zero crashes, zero unanswered): {'met' if met else 'NOT MET'}; every check clean: {clean}")
    h.write_report(args.json, result)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
