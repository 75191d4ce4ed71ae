"""Escalation bench: questions at a steady rate, thousands of moving locals, time to the first alert.

    python bench/escalation.py [--locals 10000] [--rate 50] [--duration 30] [--client-procs 4]
                               [--repeat 3] [--json bench/results/escalation.json]
                               [--move-rate 500] [--movers 0.3] [--askers 10]
                               [--max-alerts-per-hour N] [--py-spy PATH] ...

What it does, per run (a fresh server each run; medians over ``--repeat`` runs):

* **Locals.** ``--locals`` verified locals (token claim ``local: true``), spread
  over ``--client-procs`` processes, each process one epoll loop over raw
  non-blocking sockets. Local *i* belongs to hotspot *i mod 30* of
  ``dongne.core.regions.load_hotspots()`` and stands at a uniformly random point
  within ``--spread-m`` (2 km) of it, drawn inside the service area (checked
  with the bundled regions). Each sends ``hello``, (``update_settings`` when
  ``--max-alerts-per-hour`` is given), then ``update_location``. During the
  question phase a fraction ``--movers`` of them re-send ``update_location``
  to another random point around their hotspot, round-robin, at a total of
  ``--move-rate`` moves per second. Every frame the server sends is read and
  decoded (so no local becomes a slow consumer); ``new_question_notification``
  events are timestamped on receipt with ``time.time()``.
* **Askers.** ``--askers`` non-local connections in the bench's main process
  send ``create_question`` open-loop at ``--rate`` per second for
  ``--duration`` seconds (question *k* is due at ``t0 + k / rate``, whatever
  the replies do), round-robin over the askers. Each question is at a random
  point within ``--question-spread-m`` (1 km) of a random hotspot, inside the
  service area, with one or two hashtags.
* **Per question:** ``reply`` = reply received - ``create_question`` sent (the
  asker's clock); ``first alert`` = the earliest receipt of an IMMEDIATE
  ``new_question_notification`` for it by any local - the asker's send time
  (same machine, same ``time.time()`` clock). Questions without an IMMEDIATE
  alert are split into those with no local within 2 km at the time (from the
  positions the bench placed and the moves the server accepted: legitimate)
  and the others ("missed", e.g. every local nearby already at the hourly
  alert cap).
* **Server cost:** utime+stime of the server process over the question phase
  (``/proc/PID/stat``; 100 % = one core), RSS after set-up and its peak during
  the phase. Client processes' and the whole machine's CPU are reported too:
  on a 2-core machine the load generator competes with the server.
* **The floor:** before the questions, ``--floor`` seconds (default 10) of the
  same load without them (the locals connected and answering pings, the
  movers moving), from 22 s after the server started (its heartbeat's first
  round starts 20 s in): the server's CPU then is a cost per second, not per
  question, and the CPU per question "over the floor" leaves it out.
* **The machine's speed:** before and after each run, the fastest of five
  runs of a fixed workload that runs no dongne code (``machine_reference_ms``
  in ``_harness``), and the CPU per question divided by it: this machine's
  speed drifts by a third within a day, and the ratio compares runs made at
  different times (two trees are best compared at the same time: ``bench/paired.py``).

dongne runs with ``DONGNE_STORE_SYNCHRONOUS=NORMAL`` unless ``--synchronous FULL``
(WAL, commits not fsynced: the bench measures the engine, not the disk) and
``DONGNE_LOCATION_MIN_UPDATE_INTERVAL_S`` = ``--min-update-interval`` (1 s) so
moves are accepted. Everything else is the server's defaults (escalation plan
IMMEDIATE 0 s / 2 km / 10 nearest, QUICK 3 s / 5 km / no limit, ...; each
local's ``max_alerts_per_hour`` 20 unless ``--max-alerts-per-hour``).

Everything runs on 127.0.0.1; counts and waits are bounded; subprocesses are
killed on exit (also on Ctrl-C, SIGTERM and ``--timeout``).
"""

from __future__ import annotations

import argparse
import array
import atexit
import collections
import contextlib
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import secrets
import select
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgpack

from dongne.core.geo import EARTH_RADIUS_M, offset_position

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

IMMEDIATE_RADIUS_M = 2000.0
SERVER_DEFAULT_MAX_ALERTS = 20
HASHTAGS = ["food", "beach", "hiking", "cafe", "blackpork", "bus", "weather", "sunrise", "olle", "market"]

# Request ids used by the locals: 1 hello, 2 update_settings, 3 the first
# update_location, MOVE_ID0 + n the moves.
HELLO_ID, SETTINGS_ID, LOCATE_ID, MOVE_ID0 = 1, 2, 3, 10
# Asker request ids: QUESTION_ID0 + question index.
QUESTION_ID0 = 100

# ---- geometry -------------------------------------------------------------------------


def _offset(lat: float, lng: float, rng: random.Random, radius_m: float) -> tuple[float, float]:
    """A uniformly random point within ``radius_m`` of (lat, lng) (flat-earth offset, fine at 2 km)."""
    r = radius_m * math.sqrt(rng.random())
    theta = rng.random() * 2 * math.pi
    return offset_position(lat, lng, r * math.cos(theta), r * math.sin(theta))


class _Places:
    """Random points around the bundled hotspots, inside the service area."""

    def __init__(self, seed: int) -> None:
        from dongne.core.regions import load_default_regions, load_hotspots

        self.hotspots = load_hotspots()
        self._regions = load_default_regions()
        self.rng = random.Random(seed)

    def around(self, spot: int, radius_m: float) -> tuple[float, float]:
        hs = self.hotspots[spot]
        for _ in range(1000):
            lat, lng = _offset(hs.lat, hs.lng, self.rng, radius_m)
            if self._regions.region_of(lat, lng) is not None:
                return round(lat, 6), round(lng, 6)
        raise RuntimeError(f"no point inside the service area within {radius_m} m of {hs.name}")


def _haversine_many(lat: float, lng: float, lats: Any, lngs: Any) -> Any:
    import numpy as np

    p1, p2 = math.radians(lat), np.radians(lats)
    dphi = p2 - p1
    dl = np.radians(lngs) - math.radians(lng)
    a = np.sin(dphi / 2) ** 2 + math.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.minimum(1.0, a)))


# ---- the locals' client processes ----------------------------------------------------------

SETTINGS, LOCATING = h.AUTH + 1, h.AUTH + 2  # waiting for update_settings', then update_location's reply


class _Local(h.LoadConn):
    __slots__ = ("got", "idx", "lat", "lng", "pending", "seq", "spot", "token")

    def __init__(self, sock: socket.socket, job: tuple[Any, ...]) -> None:
        idx, user, token, lat, lng, spot = job
        super().__init__(sock, user)
        self.idx, self.token, self.lat, self.lng, self.spot = idx, token, lat, lng, spot
        self.pending: tuple[float, float] | None = None  # a move in flight
        self.got = 0  # new_question_notification events received
        self.seq = 0  # the last durable seq seen


def _local_worker(pipe: multiprocessing.connection.Connection, spec: dict[str, Any]) -> None:
    """Drive ``spec["jobs"]`` locals from one process (one ``h.EpollClients`` loop).

    Messages to the parent: ``("ready", ok, failed, errors)`` once every local
    has said hello and shared its position (or failed); ``("report", result)``
    when asked. Commands from the parent: ``("moves", rate)``, ``"stop_moves"``,
    ``"report"``, ``"close"``. The process ends itself after ``spec["life_s"]``.
    """
    loop = h.EpollClients[_Local](pipe, spec, what="locals")
    pools: list[list[tuple[float, float]]] = spec["pools"]
    settings = spec["settings"]
    rng = random.Random(spec["seed"])

    unpackb = msgpack.unpackb
    packb = msgpack.packb
    encode = h.encode_client_frame
    fail = loop.fail
    OP_BINARY, OP_PING, OP_PONG, OP_CLOSE = h.OP_BINARY, h.OP_PING, h.OP_PONG, h.OP_CLOSE

    by_idx: dict[int, _Local] = {}
    movers: collections.deque[int] = collections.deque(j[0] for j in spec["jobs"] if j[0] in spec["movers"])
    # Measurements.
    imm_qids: list[str] = []
    imm_times = array.array("d")
    stage_counts: collections.Counter[str] = collections.Counter()
    seq_gaps = 0
    nearby_events = 0
    other_frames = 0
    moves_accepted = array.array("d")  # flattened (reply time, idx, lat, lng)
    moves_sent = 0
    move_refused: collections.Counter[str] = collections.Counter()
    move_rate = 0.0
    move_t0 = 0.0
    move_slots = 0
    move_skipped = 0
    next_move_id = MOVE_ID0

    def send(c: _Local, op: str, rid: int, data: dict[str, Any]) -> None:
        try:
            c.sock.send(encode(OP_BINARY, packb({"type": op, "id": rid, "data": data})))
        except OSError as exc:  # a full socket buffer included: the bench does not queue
            fail(c, f"send {op}: {exc}", "send_error")

    def locate(c: _Local) -> None:
        c.state = LOCATING
        send(c, "update_location", LOCATE_ID, {"location": {"lat": c.lat, "lng": c.lng}})

    def on_reply(c: _Local, frame: dict[str, Any], now: float) -> None:
        rid = frame.get("id")
        ok = frame.get("ok")
        if c.state == h.READY and isinstance(rid, int) and rid >= MOVE_ID0:
            if ok and c.pending is not None:
                c.lat, c.lng = c.pending
                moves_accepted.extend((now, float(c.idx), c.lat, c.lng))
            elif not ok:
                move_refused[frame.get("error", {}).get("code", "?")] += 1
            c.pending = None
            return
        if not ok:
            fail(c, f"request {rid} refused: {frame.get('error')}", f"refused_{frame.get('error', {}).get('code')}")
            return
        if rid == HELLO_ID and c.state == h.AUTH:
            if settings:
                c.state = SETTINGS
                send(c, "update_settings", SETTINGS_ID, settings)
            else:
                locate(c)
        elif rid == SETTINGS_ID and c.state == SETTINGS:
            locate(c)
        elif rid == LOCATE_ID and c.state == LOCATING:
            loop.ready(c)

    def on_frame(c: _Local, opcode: int, payload: bytes, now: float) -> None:
        nonlocal seq_gaps, nearby_events, other_frames
        if opcode == OP_PING:
            try:
                c.sock.send(encode(OP_PONG, payload))
            except OSError as exc:
                fail(c, f"pong: {exc}", "send_error")
            return
        if opcode == OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            fail(c, f"server closed with {code} {payload[2:60]!r}", f"close_{code}")
            return
        if opcode != OP_BINARY:
            other_frames += 1
            return
        frame = unpackb(payload)
        kind = frame.get("type")
        if kind == "new_question_notification":
            data = frame["data"]
            stage = data.get("stage")
            stage_counts[stage] += 1
            if stage == "IMMEDIATE":
                imm_qids.append(data["question_id"])
                imm_times.append(now)
            c.got += 1
            seq = frame.get("seq", 0)
            if c.seq and seq != c.seq + 1:
                seq_gaps += 1
            c.seq = seq
        elif kind == "reply":
            on_reply(c, frame, now)
        elif kind == "nearby_questions":
            nearby_events += 1
        else:
            other_frames += 1

    def new_conn(sock: socket.socket, job: tuple[Any, ...]) -> _Local:
        c = _Local(sock, job)
        by_idx[c.idx] = c
        return c

    def on_upgraded(c: _Local) -> None:
        send(c, "hello", HELLO_ID, {"token": c.token})

    def do_moves() -> None:
        nonlocal moves_sent, move_slots, move_skipped, next_move_id
        due = int((time.monotonic() - move_t0) * move_rate)
        while move_slots < due:
            move_slots += 1
            c = None
            for _ in range(len(movers)):
                idx = movers[0]
                movers.rotate(-1)
                cand = by_idx.get(idx)
                if cand is not None and cand.state == h.READY and cand.pending is None:
                    c = cand
                    break
            if c is None:
                move_skipped += 1
                continue
            pool = pools[c.spot]
            c.pending = pool[rng.randrange(len(pool))]
            next_move_id += 1
            moves_sent += 1
            send(c, "update_location", next_move_id, {"location": {"lat": c.pending[0], "lng": c.pending[1]}})

    def result() -> dict[str, Any]:
        return {
            "ready": loop.n_ready,
            "failed": loop.n_failed,
            "dead_after_ready": loop.dead_after_ready,
            "closes": dict(loop.closes),
            "errors": loop.errors,
            "imm_qids": imm_qids,
            "imm_times": imm_times.tobytes(),
            "stage_counts": dict(stage_counts),
            "per_local": {c.idx: c.got for c in by_idx.values() if c.got},
            "seq_gaps": seq_gaps,
            "nearby_events": nearby_events,
            "other_frames": other_frames,
            "bytes_in": loop.bytes_in,
            "moves_sent": moves_sent,
            "moves_accepted": moves_accepted.tobytes(),
            "move_refused": dict(move_refused),
            "move_skipped": move_skipped,
        }

    def tick() -> None:
        if move_rate:
            do_moves()

    def on_command(command: Any) -> None:
        nonlocal move_rate, move_t0, move_slots
        if command == "report":
            pipe.send(("report", result()))
        elif command == "stop_moves":
            move_rate = 0.0
        elif isinstance(command, tuple) and command[0] == "moves":
            move_rate, move_t0, move_slots = float(command[1]), time.monotonic(), 0
        loop.poll_s = 0.004 if move_rate else 0.2  # moves are paced by the loop's turns

    loop.run(
        new_conn=new_conn,
        on_upgraded=on_upgraded,
        on_frame=on_frame,
        tick=tick,
        on_command=on_command,
    )


# ---- the askers (in this process) -------------------------------------------------------------


class _Asker:
    """One asker connection: blocking set-up, then non-blocking reads in the main loop."""

    def __init__(self, port: int, token: str, timeout: float) -> None:
        self.ws = h.BlockingWebSocket("127.0.0.1", port, timeout=timeout)
        self.ws.send(h.OP_BINARY, msgpack.packb({"type": "hello", "id": 1, "data": {"token": token}}))
        while True:
            _op, payload = self.ws.recv()
            frame = msgpack.unpackb(payload)
            if frame.get("type") == "reply" and frame.get("id") == 1:
                if not frame.get("ok"):
                    raise RuntimeError(f"asker hello refused: {frame.get('error')}")
                break
        self.sock, self.buf = self.ws.detach()
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.closed: int | str | None = "open"

    def send(self, payload: bytes) -> None:
        self.sock.setblocking(True)  # a few hundred bytes: never blocks in practice
        try:
            self.sock.sendall(h.encode_client_frame(h.OP_BINARY, payload))
        finally:
            self.sock.setblocking(False)

    def read(self) -> list[tuple[int, bytes]]:
        try:
            data = self.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return []
        if not data:
            raise h.WebSocketClosed(None)
        frames, self.buf = h.split_frames(self.buf + data)
        return frames

    def close(self) -> None:
        self.ws.close()


def _ask(
    askers: list[_Asker],
    questions: list[dict[str, Any]],
    rate: float,
    server: h.ServerGroup,
    reply_timeout: float,
) -> dict[str, Any]:
    """Send ``questions`` open-loop at ``rate``; collect replies; sample the server meanwhile."""
    n = len(questions)
    sent_at = [math.nan] * n
    reply_at = [math.nan] * n
    qids: list[str | None] = [None] * n
    refused: collections.Counter[str] = collections.Counter()
    ep = select.epoll()
    by_fd = {a.fd: a for a in askers}
    for a in askers:
        ep.register(a.fd, select.EPOLLIN)
    rss_peak = 0
    samples: list[tuple[float, float, int]] = []  # (t, server cpu s, rss)
    next_sample = 0.0
    packb, unpackb = msgpack.packb, msgpack.unpackb
    outstanding = 0
    k = 0
    t0 = time.time() + 0.05
    t_last_sent = t0
    deadline = math.inf
    while k < n or (outstanding and time.time() < deadline):
        now = time.time()
        while k < n and now >= t0 + k / rate:
            a = askers[k % len(askers)]
            payload = packb({"type": "create_question", "id": QUESTION_ID0 + k, "data": questions[k]})
            sent_at[k] = time.time()
            a.send(payload)
            outstanding += 1
            k += 1
            if k == n:
                t_last_sent = sent_at[k - 1]
                deadline = time.time() + reply_timeout
            now = time.time()
        if now >= next_sample:
            cpu, rss = server.cpu_seconds(), server.rss_bytes()
            samples.append((now, cpu, rss))
            rss_peak = max(rss_peak, rss)
            next_sample = now + 1.0
        wait = (t0 + k / rate - time.time()) if k < n else 0.05
        for fd, _mask in ep.poll(max(0.0, min(wait, 0.05))):
            a = by_fd[fd]
            try:
                frames = a.read()
            except (h.WebSocketClosed, OSError) as exc:
                ep.unregister(fd)
                a.closed = str(exc)
                continue
            got = time.time()
            for opcode, payload in frames:
                if opcode == h.OP_PING:
                    a.sock.setblocking(True)
                    try:
                        a.sock.sendall(h.encode_client_frame(h.OP_PONG, payload))
                    finally:
                        a.sock.setblocking(False)
                    continue
                if opcode == h.OP_CLOSE:
                    a.closed = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                    continue
                if opcode != h.OP_BINARY:
                    continue
                frame = unpackb(payload)
                if frame.get("type") != "reply":
                    continue
                i = frame.get("id", 0) - QUESTION_ID0
                if not 0 <= i < n or not math.isnan(reply_at[i]):
                    continue
                reply_at[i] = got
                outstanding -= 1
                if frame.get("ok"):
                    qids[i] = frame["data"]["question"]["question_id"]
                else:
                    refused[frame.get("error", {}).get("code", "?")] += 1
    cpu, rss = server.cpu_seconds(), server.rss_bytes()
    samples.append((time.time(), cpu, rss))
    ep.close()
    return {
        "t0": t0,
        "t_last_sent": t_last_sent,
        "sent_at": sent_at,
        "reply_at": reply_at,
        "qids": qids,
        "refused": dict(refused),
        "no_reply": outstanding,
        "samples": samples,
        "rss_peak": max(rss_peak, rss),
        "asker_closes": [a.closed for a in askers if a.closed != "open"],
    }


# ---- one run ------------------------------------------------------------------------------------


def _runqueue_wait_s(pid: int) -> float:
    """Seconds the process's threads have spent runnable but waiting for a CPU (``/proc/PID/task/*/schedstat``)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return math.nan
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as fh:
                total += int(fh.read().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def _scrape(ops_port: int) -> dict[str, Any]:
    """From the server's /metrics: ``dongne_gc_pause_seconds`` per generation (count, sum, pauses
    up to 50 ms) and the ``dongne_request_seconds`` buckets of create_question."""
    with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/metrics", timeout=30) as response:
        text = response.read().decode()
    gc_pauses: dict[str, dict[str, float]] = {}
    for m in re.finditer(
        r'^dongne_gc_pause_seconds_(count|sum|bucket)\{(?:le="([^"]+)",)?generation="(\d)"(?:,le="([^"]+)")?\} (\S+)$',
        text,
        re.M,
    ):
        kind, le1, gen, le2, value = m.groups()
        g = gc_pauses.setdefault(gen, {"count": 0.0, "sum_s": 0.0, "le_50ms": 0.0})
        if kind == "count":
            g["count"] = float(value)
        elif kind == "sum":
            g["sum_s"] = float(value)
        elif (le1 or le2) == "0.05":
            g["le_50ms"] = float(value)
    asks = {
        float(m.group(1)): float(m.group(2))
        for m in re.finditer(r'^dongne_request_seconds_bucket\{le="([^"]+)",op="create_question"\} (\S+)$', text, re.M)
    }
    asks.update(
        {
            float(m.group(1)): float(m.group(2))
            for m in re.finditer(
                r'^dongne_request_seconds_bucket\{op="create_question",le="([^"]+)"\} (\S+)$', text, re.M
            )
        }
    )
    quick: dict[float, float] = {}
    for m in re.finditer(
        r'^dongne_escalation_stage_latency_seconds_bucket\{(?:le="([^"]+)",)?stage="QUICK"(?:,le="([^"]+)")?\} (\S+)$',
        text,
        re.M,
    ):
        quick[float(m.group(1) or m.group(2))] = float(m.group(3))
    return {"gc": gc_pauses, "asks": asks, "quick": quick}


class _DatabaseCpu:
    """CPU time of the PostgreSQL sessions serving the run's database, from the start (0 on SQLite).

    A server on this machine only (its backends' /proc entries): the nodes'
    sessions live for the whole run, so the difference over the load phase
    is what the database did for it (its shared writer processes excluded).
    """

    def __init__(self, db: Path | str) -> None:
        self._pids: list[int] = []
        if isinstance(db, str):
            import psycopg

            with psycopg.connect(db, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchall()
            self._pids = [int(r[0]) for r in rows if os.path.exists(f"/proc/{r[0]}")]
        self._start = self._now()

    def _now(self) -> float:
        total = 0.0
        for pid in self._pids:
            with contextlib.suppress(OSError):
                total += h.cpu_seconds(pid)
        return total

    def seconds(self) -> float:
        return self._now() - self._start


def _scrape_all(ops_ports: list[int]) -> dict[str, Any]:
    """:func:`_scrape` of every node, summed (counts, sums and buckets add up across nodes)."""
    total: dict[str, Any] = {"gc": {}, "asks": {}, "quick": {}}
    for port in ops_ports:
        one = _scrape(port)
        for gen, g in one["gc"].items():
            t = total["gc"].setdefault(gen, {"count": 0.0, "sum_s": 0.0, "le_50ms": 0.0})
            for k, v in g.items():
                t[k] += v
        for histogram in ("asks", "quick"):
            for le, n in one[histogram].items():
                total[histogram][le] = total[histogram].get(le, 0.0) + n
    return total


def _server_side(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Collector pauses and create_question latency (as the server measured it) over the load phase."""
    d: dict[str, float] = {}
    for gen, a in after["gc"].items():
        b = before["gc"].get(gen, {"count": 0.0, "sum_s": 0.0, "le_50ms": 0.0})
        count = a["count"] - b["count"]
        d[f"gc{gen}_collections"] = count
        d[f"gc{gen}_pause_ms"] = 1000 * (a["sum_s"] - b["sum_s"])
        d[f"gc{gen}_over_50ms"] = count - (a["le_50ms"] - b["le_50ms"])
    buckets = {le: n - before["asks"].get(le, 0.0) for le, n in after["asks"].items()}
    total = buckets.get(math.inf, 0.0)
    for ms in (25, 50, 100):
        d[f"server_asks_over_{ms}ms"] = total - buckets.get(ms / 1000, total)
    d["server_asks"] = total
    # QUICK is due 3 s after the question; under load it runs late, by design.
    quick = {le: n - before["quick"].get(le, 0.0) for le, n in after["quick"].items()}
    d["quick_stages"] = quick.get(math.inf, 0.0)
    for s in (5, 10, 30):
        d[f"quick_within_{s}s"] = quick.get(float(s), 0.0)
    return d


def _pcts(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {
        "p50": h.percentile(s, 50),
        "p95": h.percentile(s, 95),
        "p99": h.percentile(s, 99),
        "max": s[-1] if s else math.nan,
        "n": len(s),
    }


class _Scenario:
    """Everything drawn at random for a run, the same for every repeat (``--seed``)."""

    def __init__(self, args: argparse.Namespace, secret: str) -> None:
        from dongne.auth import mint_token

        places = _Places(args.seed)
        self.hotspots = places.hotspots
        spots = len(self.hotspots)
        now = time.time()
        ttl = int(args.timeout) + 3600
        self.jobs: list[tuple[Any, ...]] = []
        for i in range(args.locals):
            spot = i % spots
            lat, lng = places.around(spot, args.spread_m)
            token = mint_token(secret, f"L{i}", local=True, now_s=now, ttl_s=ttl)
            self.jobs.append((i, f"L{i}", token, lat, lng, spot))
        pool_n = max(50, min(2000, args.locals // spots))
        self.pools = [[places.around(s, args.spread_m) for _ in range(pool_n)] for s in range(spots)]
        n_movers = round(args.locals * args.movers)
        self.movers = set(places.rng.sample(range(args.locals), n_movers)) if args.move_rate > 0 else set()
        self.asker_tokens = [
            mint_token(secret, f"A{i}", nick=f"asker{i}", now_s=now, ttl_s=ttl) for i in range(args.askers)
        ]
        n_q = round(args.rate * args.duration)
        self.questions: list[dict[str, Any]] = []
        for k in range(n_q):
            spot = places.rng.randrange(spots)
            lat, lng = places.around(spot, args.question_spread_m)
            tags = places.rng.sample(HASHTAGS, places.rng.randint(1, 2))
            self.questions.append(
                {
                    "title": f"bench q{k}: anyone near {self.hotspots[spot].name} right now?",
                    "body": "Asked by bench/escalation.py.",
                    "location": {"lat": lat, "lng": lng},
                    "hashtags": tags,
                }
            )


def _nearest_local_m(
    scn: _Scenario, sent_at: list[float], moves: list[tuple[float, int, float, float]], dead: set[int]
) -> list[float]:
    """For each question, the distance to the nearest local at its send time (positions the bench set)."""
    import numpy as np

    lats = np.array([j[3] for j in scn.jobs], dtype=float)
    lngs = np.array([j[4] for j in scn.jobs], dtype=float)
    alive = np.ones(len(scn.jobs), dtype=bool)
    for idx in dead:
        alive[idx] = False
    order = sorted(range(len(sent_at)), key=lambda i: sent_at[i])
    out = [math.inf] * len(sent_at)
    m = 0
    for i in order:
        t = sent_at[i]
        if math.isnan(t):
            continue
        while m < len(moves) and moves[m][0] <= t:
            _t, idx, lat, lng = moves[m]
            lats[idx], lngs[idx] = lat, lng
            m += 1
        q = scn.questions[i]["location"]
        d = _haversine_many(q["lat"], q["lng"], lats, lngs)
        d = d[alive]
        out[i] = float(d.min()) if d.size else math.inf
    return out


def _limit_defaults() -> dict[str, Any]:
    """The server's ``[limits]`` defaults, if this version has that section (empty otherwise)."""
    import attrs

    from dongne import config

    cls = getattr(config, "LimitSettings", None)
    return attrs.asdict(cls()) if cls is not None else {}


def _load_env(args: argparse.Namespace) -> dict[str, str]:
    """Settings the bench changes: moves accepted, and all connections come from one address."""
    env = {"DONGNE_LOCATION_MIN_UPDATE_INTERVAL_S": str(args.min_update_interval)}
    if "connections_per_ip_per_minute" in _limit_defaults():
        # Every simulated user connects from 127.0.0.1; in production they come from many addresses.
        env["DONGNE_LIMITS_CONNECTIONS_PER_IP_PER_MINUTE"] = str(
            float(max(1_000_000, 10 * (args.locals + args.askers)))
        )
    return env


def _auto_askers(n_questions: int) -> int:
    """Enough askers that none exceeds the per-user question burst or the rooms per connection (no limit raised)."""
    limits = _limit_defaults()
    budget = 50
    if "questions_burst" in limits:
        budget = min(budget, int(limits["questions_burst"]))
    if "rooms_per_connection" in limits:
        budget = min(budget, int(limits["rooms_per_connection"]))
    return max(10, -(-n_questions // max(1, budget)))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def _write_stage_config(workdir: Path, stage_limits: dict[str, int]) -> Path | None:
    """A ``config.toml`` in the server's working directory: the default plan with ``stage_limits`` applied."""
    if not stage_limits:
        return None
    import attrs

    from dongne.config import Settings

    stages = [attrs.asdict(st) for st in Settings().escalation.stages]
    names = {st["name"] for st in stages}
    unknown = set(stage_limits) - names
    if unknown:
        raise SystemExit(f"--stage-limit: no stage {sorted(unknown)} in the default plan {sorted(names)}")
    lines = ["# written by bench/escalation.py: the default escalation plan with --stage-limit applied"]
    for st in stages:
        if st["name"] in stage_limits:
            st["limit"] = stage_limits[st["name"]]
        lines.append("[[escalation.stages]]")
        lines.extend(
            f"{k} = {_toml_value(v)}" for k, v in st.items() if v is not None
        )  # TOML has no null: omitted = none
    path = workdir / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _wait_for_quiet(limit_s: float, threshold: float = 0.3) -> float:
    """Wait (up to ``limit_s``) until other work on the machine uses under ``threshold`` cores; return the last reading."""
    deadline = time.monotonic() + limit_s
    while True:
        busy = h.background_cores([], 1.0)
        if busy < threshold or time.monotonic() >= deadline:
            return busy


def run_once(
    args: argparse.Namespace, scn: _Scenario, secret: str, workdir: Path, rep: int, ctx: Any
) -> dict[str, Any]:
    if args.quiet_wait > 0:
        busy = _wait_for_quiet(args.quiet_wait)
        if busy >= 0.3:
            print(
                f"    still {busy:.2f} cores busy with other work after waiting {args.quiet_wait:g} s; running anyway",
                file=sys.stderr,
            )
    reference_before = h.machine_reference_ms()
    with contextlib.ExitStack() as stack:
        if args.db:
            db: Path | str = stack.enter_context(
                h.fresh_postgres_database(args.db, f"dongne_escalation_{os.getpid()}_{rep}")
            )
        else:
            db = workdir / f"escalation-{rep}.sqlite3"
        result = _run_on(args, scn, secret, workdir, rep, ctx, db)
    # The machine's speed drifts: the reference before and after the run, for reading its figures beside.
    reference = (reference_before + h.machine_reference_ms()) / 2
    result["machine_reference_ms"] = reference
    result["server_cpu_per_question_per_reference"] = result["server_cpu_ms_per_question"] / reference
    return result


#: The floor is measured from this long after the server started (its default ping interval is 20 s).
FLOOR_NOT_BEFORE_S = 22.0


def _start_nodes(args: argparse.Namespace, secret: str, workdir: Path, db: Path | str) -> h.ServerGroup:
    """``--nodes`` servers on ``db``, one after the other (the first leads escalation)."""
    group = h.ServerGroup([])
    group.start_dongne_nodes(
        args.nodes,
        db,
        jwt_secret=secret,
        workdir=workdir,
        synchronous=args.synchronous,
        nofile=args.locals + args.askers + 4096,
        extra_env=_load_env(args),
    )
    return group


def _run_on(
    args: argparse.Namespace, scn: _Scenario, secret: str, workdir: Path, rep: int, ctx: Any, db: Path | str
) -> dict[str, Any]:
    server = _start_nodes(args, secret, workdir, db)
    server_started = time.monotonic()
    workers: h.ClientPool | None = None
    askers: list[_Asker] = []
    spy: subprocess.Popen[bytes] | None = None
    try:
        settings = {"max_alerts_per_hour": args.max_alerts_per_hour} if args.max_alerts_per_hour is not None else {}
        spec = {
            "host": "127.0.0.1",
            "port": server.ports[0],
            "ports": server.ports,
            "pools": scn.pools,
            "movers": scn.movers,
            "settings": settings,
            "setup_s": args.phase_timeout,
            "life_s": args.timeout,
            "max_connecting": 64,
            "seed": args.seed + rep,
        }
        t_setup = time.monotonic()
        workers = h.ClientPool(
            ctx,
            _local_worker,
            args.client_procs,
            scn.jobs,
            spec,
            name="locals",
            per_process=lambda i: {"seed": spec["seed"] * 1000 + i},
        )
        workers.wait_ready(args.locals, "locals", args.phase_timeout + 30)
        ports = server.ports
        askers = [_Asker(ports[i % len(ports)], tok, 30.0) for i, tok in enumerate(scn.asker_tokens)]
        setup_s = time.monotonic() - t_setup
        time.sleep(1.0)
        background = h.background_cores([*server.pids, *workers.pids])
        if background > 0.2:
            print(f"    warning: {background:.2f} CPU cores busy with other work; latency suffers", file=sys.stderr)
        rss_ready = server.rss_bytes()
        floor_cores = math.nan
        if args.floor > 0:
            # The load without questions: connections kept alive, the movers moving. The server's
            # heartbeat starts its first round a ping interval after it starts: from then on.
            if args.move_rate > 0 and scn.movers:
                workers.broadcast(("moves", args.move_rate / len(workers.pipes)))
            time.sleep(max(1.0, server_started + FLOOR_NOT_BEFORE_S - time.monotonic()))
            f_cpu0, f_t0 = server.cpu_seconds(), time.monotonic()
            time.sleep(args.floor)
            floor_cores = (server.cpu_seconds() - f_cpu0) / (time.monotonic() - f_t0)

        if args.py_spy and rep == 0:
            path = Path(args.py_spy)
            fmt = {"svg": "flamegraph", "txt": "raw", "json": "speedscope"}.get(path.suffix.lstrip("."), "flamegraph")
            spy = subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "--pid",
                    str(server.pids[0]),
                    "--duration",
                    str(int(args.duration)),
                    "--rate",
                    "100",
                    "--nonblocking",
                    "--format",
                    fmt,
                    "-o",
                    str(path),
                    *(["--idle"] if fmt == "speedscope" else []),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            _spies.add(spy)

        scrape0 = _scrape_all(server.ops_ports)
        database = _DatabaseCpu(db)
        cpu0 = server.cpu_seconds()
        nodes = getattr(server, "nodes", [server])
        node_cpu0 = [node.cpu_seconds() for node in nodes]
        runq0 = sum(_runqueue_wait_s(pid) for pid in server.pids)
        client_cpu0 = workers.cpu_seconds()
        me0 = sum(os.times()[:2])
        busy0 = h.machine_busy_seconds()
        w0 = time.time()
        if args.move_rate > 0 and scn.movers:
            workers.broadcast(("moves", args.move_rate / len(workers.pipes)))
        asked = _ask(askers, scn.questions, args.rate, server, reply_timeout=args.phase_timeout)
        # IMMEDIATE alerts leave with the reply; the drain catches stragglers.
        time.sleep(args.drain)
        workers.broadcast("stop_moves")
        w1 = time.time()
        cpu1 = server.cpu_seconds()
        node_cpu = [node.cpu_seconds() - c0 for node, c0 in zip(nodes, node_cpu0, strict=True)]
        db_cpu = database.seconds()
        runq = sum(_runqueue_wait_s(pid) for pid in server.pids) - runq0
        client_cpu = workers.cpu_seconds() - client_cpu0
        me = sum(os.times()[:2]) - me0
        busy = h.machine_busy_seconds() - busy0
        rss_end = server.rss_bytes()
        server_side = _server_side(scrape0, _scrape_all(server.ops_ports))
        workers.broadcast("report")
        reports = workers.wait_all("report", 60)
        if spy is not None:
            try:
                _, err = spy.communicate(timeout=60)
                if spy.returncode:
                    print(f"    py-spy failed: {err.decode(errors='replace')[-500:]}", file=sys.stderr)
            except subprocess.TimeoutExpired:
                spy.kill()
            _spies.discard(spy)
        parts = [r[1] for r in reports if r is not None]
        return _analyse(
            args,
            scn,
            asked,
            parts,
            server_cpu=cpu1 - cpu0,
            node_cpu=node_cpu,
            db_cpu=db_cpu,
            runq=runq,
            wall=w1 - w0,
            client_cpu=client_cpu,
            bench_cpu=me,
            machine_busy=busy,
            background=background,
            rss_ready=rss_ready,
            rss_end=rss_end,
            setup_s=setup_s,
            floor_cores=floor_cores,
            asking_started=w0,
            missing_reports=sum(r is None for r in reports),
            server_side=server_side,
        )
    except BaseException:
        alive = "running" if server.alive() else "not all running"
        print(f"    server ({alive}) stderr tail:\n      " + "\n      ".join(server.tails()), file=sys.stderr)
        raise
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        for a in askers:
            a.close()
        if workers is not None:
            workers.close()
        server.stop()


def _analyse(
    args: argparse.Namespace, scn: _Scenario, asked: dict[str, Any], parts: list[dict[str, Any]], **m: Any
) -> dict[str, Any]:
    n = len(scn.questions)
    sent_at, reply_at, qids = asked["sent_at"], asked["reply_at"], asked["qids"]
    index = {qid: i for i, qid in enumerate(qids) if qid is not None}
    first = [math.inf] * n
    imm_count = [0] * n
    stage_counts: collections.Counter[str] = collections.Counter()
    closes: collections.Counter[str] = collections.Counter()
    per_local: dict[int, int] = {}
    moves: list[tuple[float, int, float, float]] = []
    for p in parts:
        times = array.array("d")
        times.frombytes(p["imm_times"])
        for qid, t in zip(p["imm_qids"], times, strict=True):
            i = index.get(qid)
            if i is None:
                continue
            imm_count[i] += 1
            if t < first[i]:
                first[i] = t
        stage_counts.update(p["stage_counts"])
        closes.update(p["closes"])
        per_local.update(p["per_local"])
        flat = array.array("d")
        flat.frombytes(p["moves_accepted"])
        moves.extend((flat[j], int(flat[j + 1]), flat[j + 2], flat[j + 3]) for j in range(0, len(flat), 4))
    moves.sort()
    ok = [i for i in range(n) if qids[i] is not None]
    reply_ms = [(reply_at[i] - sent_at[i]) * 1000 for i in ok]
    alerted = [i for i in ok if first[i] != math.inf]
    alert_ms = [(first[i] - sent_at[i]) * 1000 for i in alerted]
    silent = [i for i in ok if first[i] == math.inf]
    nearest = _nearest_local_m(scn, sent_at, moves, set()) if silent else []
    no_local = [i for i in silent if nearest[i] > IMMEDIATE_RADIUS_M]
    missed = [i for i in silent if nearest[i] <= IMMEDIATE_RADIUS_M]
    cap = args.max_alerts_per_hour if args.max_alerts_per_hour is not None else SERVER_DEFAULT_MAX_ALERTS
    at_cap = sum(1 for v in per_local.values() if v >= cap)
    phase = asked["t_last_sent"] - asked["t0"]
    samples = asked["samples"]
    wall = m["wall"]
    total_alerts = sum(stage_counts.values())
    moves_sent = sum(p["moves_sent"] for p in parts)
    move_refused: collections.Counter[str] = collections.Counter()
    for p in parts:
        move_refused.update(p["move_refused"])
    rp, ap = _pcts(reply_ms), _pcts(alert_ms)
    # Reply latency per second of the asking phase: shows stalls (and when) versus a steady backlog.
    by_second: dict[int, float] = {}
    for i, ms in zip(ok, reply_ms, strict=True):
        sec = int(sent_at[i] - asked["t0"])
        by_second[sec] = max(by_second.get(sec, 0.0), ms)
    timeline = [round(by_second.get(sec, math.nan), 1) for sec in range(max(by_second, default=-1) + 1)]
    # Over the asking phase only (samples are ~1 s apart), for the CPU figure.
    phase_cpu = (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0]) if len(samples) > 1 else math.nan
    return {
        "questions": n,
        "questions_ok": len(ok),
        "questions_refused": asked["refused"],
        "questions_no_reply": asked["no_reply"],
        "asking_s": phase,
        "reply_ms": rp,
        "first_alert_ms": ap,
        "reply_p50_ms": rp["p50"],
        "reply_p95_ms": rp["p95"],
        "reply_p99_ms": rp["p99"],
        "reply_max_ms": rp["max"],
        "alert_p50_ms": ap["p50"],
        "alert_p95_ms": ap["p95"],
        "alert_p99_ms": ap["p99"],
        "alert_max_ms": ap["max"],
        "reply_max_ms_by_second": timeline,
        "questions_alerted": len(alerted),
        "no_immediate": len(silent),
        "no_immediate_no_local_within_2km": len(no_local),
        "no_immediate_missed": len(missed),
        "missed_examples": [
            {"q": i, "nearest_local_m": round(nearest[i], 1), "at_s": round(sent_at[i] - asked["t0"], 2)}
            for i in missed[:5]
        ],
        "immediate_per_question": sum(imm_count) / len(ok) if ok else math.nan,
        "immediate_per_alerted_question": sum(imm_count) / len(alerted) if alerted else math.nan,
        "alerts_per_question": total_alerts / len(ok) if ok else math.nan,
        "alerts_by_stage": dict(stage_counts),
        "locals_alerted": len(per_local),
        "locals_at_hourly_cap": at_cap,
        "hourly_cap": cap,
        "moves_sent": moves_sent,
        "moves_accepted": len(moves),
        "moves_per_s": sum(1 for t, *_ in moves if t >= m["asking_started"]) / wall if wall else math.nan,
        "moves_refused": dict(move_refused),
        "nearby_questions_events": sum(p["nearby_events"] for p in parts),
        "seq_gaps": sum(p["seq_gaps"] for p in parts),
        "local_closes": dict(closes),
        "locals_dead_after_ready": sum(p["dead_after_ready"] for p in parts),
        "asker_closes": asked["asker_closes"],
        "missing_reports": m["missing_reports"],
        "server_cpu_pct": 100 * phase_cpu,
        "server_cpu_pct_incl_drain": 100 * m["server_cpu"] / wall,
        "server_runqueue_wait_pct": 100 * m["runq"] / wall,
        "server_cpu_s": m["server_cpu"],
        "server_cpu_s_by_node": m["node_cpu"],
        "server_cpu_ms_per_question": 1000 * m["server_cpu"] / len(ok) if ok else math.nan,
        "server_floor_cpu_pct": 100 * m["floor_cores"],
        "server_cpu_ms_per_question_over_floor": (
            1000 * (m["server_cpu"] - m["floor_cores"] * wall) / len(ok) if ok else math.nan
        ),
        "server_cpu_us_per_alert": 1e6 * m["server_cpu"] / total_alerts if total_alerts else math.nan,
        "database_cpu_ms_per_question": 1000 * m["db_cpu"] / len(ok) if ok else math.nan,
        "load_s": wall,
        "clients_cpu_pct": 100 * m["client_cpu"] / wall,
        "bench_main_cpu_pct": 100 * m["bench_cpu"] / wall,
        "machine_cpu_pct": 100 * m["machine_busy"] / wall,
        "background_cores_before": m["background"],
        "server_rss_ready_mb": m["rss_ready"] / 2**20,
        "server_rss_peak_mb": max(asked["rss_peak"], m["rss_end"]) / 2**20,
        "setup_s": m["setup_s"],
        "client_bytes_in_mb": sum(p["bytes_in"] for p in parts) / 2**20,
        **m["server_side"],
    }


# ---- main ---------------------------------------------------------------------------------------

_spies: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_spies() -> None:
    for p in list(_spies):
        if p.poll() is None:
            p.kill()


_SUMMARY = [
    "reply_p50_ms",
    "reply_p95_ms",
    "reply_p99_ms",
    "reply_max_ms",
    "alert_p50_ms",
    "alert_p95_ms",
    "alert_p99_ms",
    "alert_max_ms",
    "questions_ok",
    "no_immediate",
    "no_immediate_no_local_within_2km",
    "no_immediate_missed",
    "immediate_per_question",
    "alerts_per_question",
    "locals_at_hourly_cap",
    "moves_per_s",
    "server_cpu_pct",
    "server_cpu_s",
    "server_cpu_ms_per_question",
    "server_floor_cpu_pct",
    "server_cpu_ms_per_question_over_floor",
    "machine_reference_ms",
    "server_cpu_per_question_per_reference",
    "database_cpu_ms_per_question",
    "server_runqueue_wait_pct",
    "background_cores_before",
    "clients_cpu_pct",
    "machine_cpu_pct",
    "server_rss_ready_mb",
    "server_rss_peak_mb",
    "setup_s",
    "gc0_collections",
    "gc0_pause_ms",
    "gc1_collections",
    "gc1_pause_ms",
    "gc1_over_50ms",
    "gc2_collections",
    "gc2_pause_ms",
    "gc2_over_50ms",
    "server_asks",
    "server_asks_over_25ms",
    "server_asks_over_50ms",
    "server_asks_over_100ms",
    "quick_stages",
    "quick_within_5s",
    "quick_within_10s",
    "quick_within_30s",
]


def _parser() -> argparse.ArgumentParser:
    p = h.bench_parser(__doc__)
    p.add_argument("--locals", type=int, default=10000, help="connected verified locals (default 10000)")
    p.add_argument("--rate", type=float, default=50.0, help="questions per second (default 50)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of asking (default 30)")
    p.add_argument("--client-procs", type=int, default=4, help="processes driving the locals (default 4)")
    p.add_argument(
        "--repeat", type=int, default=3, help="runs, each on a fresh server; medians are reported (default 3)"
    )
    h.add_json_option(p, "escalation")
    p.add_argument(
        "--askers",
        type=int,
        default=0,
        help="asker connections (distinct users), round-robin (default 0: enough that each stays within the per-user question burst)",
    )
    p.add_argument(
        "--move-rate",
        type=float,
        default=500.0,
        help="total update_location moves per second during asking (default 500; 0: none)",
    )
    p.add_argument("--movers", type=float, default=0.3, help="fraction of locals that move (default 0.3)")
    p.add_argument(
        "--spread-m", type=float, default=2000.0, help="locals stand within this of their hotspot (default 2000)"
    )
    p.add_argument(
        "--question-spread-m",
        type=float,
        default=1000.0,
        help="questions are asked within this of a hotspot (default 1000)",
    )
    p.add_argument(
        "--max-alerts-per-hour",
        type=int,
        default=None,
        help="locals set this with update_settings (default: leave the server's 20)",
    )
    p.add_argument(
        "--stage-limit",
        action="append",
        default=[],
        metavar="STAGE=N",
        help="an experiment: cap a stage of the default plan at N locals (e.g. QUICK=20), via a config.toml beside the db",
    )
    p.add_argument(
        "--min-update-interval", type=float, default=1.0, help="DONGNE_LOCATION_MIN_UPDATE_INTERVAL_S (default 1.0)"
    )
    p.add_argument(
        "--synchronous", choices=["NORMAL", "FULL"], default="NORMAL", help="SQLite synchronous (default NORMAL)"
    )
    p.add_argument("--drain", type=float, default=2.0, help="seconds to keep reading after the last reply (default 2)")
    p.add_argument(
        "--floor",
        type=float,
        default=10.0,
        help="seconds of the load without questions before them, for the server's CPU floor (default 10; 0: none)",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed for positions and questions (default 1)")
    p.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="dongne serve processes on one database, clients and askers spread over them in turn (default 1;"
        " more than one needs --db)",
    )
    p.add_argument(
        "--db",
        metavar="URL",
        help="a PostgreSQL server (postgresql://..., a role that may create databases): each run gets a new"
        " database on it (default: a new SQLite file per run)",
    )
    p.add_argument(
        "--py-spy",
        metavar="PATH",
        help="record the server with py-spy during run 1's asking (.svg flamegraph, .txt collapsed stacks, .json speedscope with idle samples: time-ordered)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="before each run, wait up to this long for other work on the machine to settle (default 120)",
    )
    p.add_argument(
        "--phase-timeout", type=float, default=300.0, help="bound on set-up and on waiting for replies, seconds"
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="bound on the whole bench, seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (
        args.locals < 1
        or args.rate <= 0
        or args.duration <= 0
        or args.repeat < 1
        or args.client_procs < 1
        or args.askers < 0
    ):
        raise SystemExit("--locals, --rate, --duration, --repeat and --client-procs must be positive")
    if args.askers == 0:
        args.askers = _auto_askers(round(args.rate * args.duration))
    if not 0 <= args.movers <= 1:
        raise SystemExit("--movers is a fraction, 0..1")
    if args.nodes < 1 or (args.nodes > 1 and not args.db):
        raise SystemExit("--nodes is at least 1, and more than one share a PostgreSQL database (--db)")
    nofile = h.raise_nofile(args.locals + args.askers + 4096)
    ctx = multiprocessing.get_context("spawn")
    secret = secrets.token_urlsafe(32)

    stage_limits: dict[str, int] = {}
    for item in args.stage_limit:
        name, _, value = item.partition("=")
        if not value.isdigit():
            raise SystemExit(f"--stage-limit wants STAGE=N, got {item!r}")
        stage_limits[name.upper()] = int(value)

    t = time.monotonic()
    scn = _Scenario(args, secret)
    n_movers = len(scn.movers)
    notes = [
        f"dongne runs with DONGNE_STORE_SYNCHRONOUS={args.synchronous}"
        + (" (WAL, commits not fsynced; allowed for this bench)" if args.synchronous == "NORMAL" else "")
        + "; also "
        + ", ".join(f"{k}={v}" for k, v in _load_env(args).items())
        + "; other settings default",
        f"locals: {args.locals} over {len(scn.hotspots)} hotspots (within {args.spread_m:g} m), {args.client_procs} client procs (epoll, raw sockets); "
        f"{n_movers} movers, {args.move_rate:g} moves/s in total"
        + (f" (each every {n_movers / args.move_rate:.1f} s)" if args.move_rate and n_movers else ""),
        f"askers: {args.askers} connections, open loop, {args.rate:g} questions/s for {args.duration:g} s, within {args.question_spread_m:g} m of a random hotspot",
        "hourly alert cap per local: "
        + (
            f"{args.max_alerts_per_hour} (set by update_settings)"
            if args.max_alerts_per_hour is not None
            else f"server default {SERVER_DEFAULT_MAX_ALERTS}"
        ),
        "escalation plan: server default"
        + (f" except limits {stage_limits} (config.toml beside the db)" if stage_limits else ""),
        "first alert = first IMMEDIATE new_question_notification received by any local - create_question sent (time.time(), same machine)",
        "server CPU: % of one core over the asking phase (/proc/PID/stat), summed over the nodes",
        f"store: {'PostgreSQL, a new database per run' if args.db else 'SQLite, a new file per run'};"
        f" {args.nodes} node(s), clients and askers spread over them in turn",
    ]
    report: dict[str, Any] = {**h.report_head("escalation", args), "notes": notes, "runs": []}
    for line in notes:
        print(f"# {line}", file=sys.stderr)
    print(f"# RLIMIT_NOFILE {nofile}; scenario drawn in {time.monotonic() - t:.1f} s", file=sys.stderr)
    runs: list[dict[str, Any]] = report["runs"]
    with h.time_limit(args.timeout), tempfile.TemporaryDirectory(prefix="dongne-escalation-") as tmp:
        _write_stage_config(Path(tmp), stage_limits)
        for rep in range(args.repeat):
            print(
                f"[{rep + 1}/{args.repeat}] {args.locals} locals, {len(scn.questions)} questions ...",
                file=sys.stderr,
                flush=True,
            )
            r = run_once(args, scn, secret, Path(tmp), rep, ctx)
            runs.append(r)
            print(
                f"    set-up {r['setup_s']:.1f} s; reply p50 {r['reply_p50_ms']:.1f} p99 {r['reply_p99_ms']:.1f} ms; "
                f"first alert p50 {r['alert_p50_ms']:.1f} p99 {r['alert_p99_ms']:.1f} max {r['alert_max_ms']:.1f} ms; "
                f"no IMMEDIATE {r['no_immediate']} ({r['no_immediate_no_local_within_2km']} nobody within 2 km); "
                f"server CPU {r['server_cpu_pct']:.0f}%; gc pauses ms (gen 0/1/2) {r['gc0_pause_ms']:.0f}/{r['gc1_pause_ms']:.0f}/{r['gc2_pause_ms']:.0f}; closes {r['local_closes']}",
                file=sys.stderr,
                flush=True,
            )

    summary = {key: h.median(r[key] for r in runs) for key in _SUMMARY}
    summary["server_cpu_s_by_node"] = [
        h.median(r["server_cpu_s_by_node"][i] for r in runs) for i in range(len(runs[0]["server_cpu_s_by_node"]))
    ]
    report["median"] = summary
    report["target"] = {
        "first_alert_p99_under_100ms": summary["alert_p99_ms"] < 100.0,
        "reply_p99_under_100ms": summary["reply_p99_ms"] < 100.0,
    }

    print(f"\nescalation: {args.locals} locals, {args.rate:g} q/s for {args.duration:g} s; medians of {len(runs)}")
    for line in notes:
        print(f"  {line}")
    print()
    rows = [
        [
            "create_question -> reply",
            summary["reply_p50_ms"],
            summary["reply_p95_ms"],
            summary["reply_p99_ms"],
            summary["reply_max_ms"],
        ],
        [
            "create_question -> first IMMEDIATE alert",
            summary["alert_p50_ms"],
            summary["alert_p95_ms"],
            summary["alert_p99_ms"],
            summary["alert_max_ms"],
        ],
    ]
    print(h.format_table(["latency (ms)", "p50", "p95", "p99", "max"], rows))
    print()
    rows2 = [
        [f"questions answered by the server (of {len(scn.questions)})", summary["questions_ok"]],
        ["questions without an IMMEDIATE alert", summary["no_immediate"]],
        ["  of which nobody within 2 km", summary["no_immediate_no_local_within_2km"]],
        ["  of which locals within 2 km (missed)", summary["no_immediate_missed"]],
        ["IMMEDIATE alerts per question", summary["immediate_per_question"]],
        ["alerts per question, all stages seen", summary["alerts_per_question"]],
        ["locals at the hourly alert cap", summary["locals_at_hourly_cap"]],
        ["moves accepted per second", summary["moves_per_s"]],
        ["server CPU % (1 core = 100)", summary["server_cpu_pct"]],
        ["server CPU s, whole load phase (asking + replies + drain)", summary["server_cpu_s"]],
        [
            "  by node (the first holds the escalation lease)",
            " / ".join(f"{s:.1f}" for s in summary["server_cpu_s_by_node"]),
        ],
        ["server CPU ms per question (incl. its alerts, moves)", summary["server_cpu_ms_per_question"]],
        ["  the floor: server CPU % before the questions (connections, moves)", summary["server_floor_cpu_pct"]],
        ["  server CPU ms per question over the floor", summary["server_cpu_ms_per_question_over_floor"]],
        ["machine reference, ms (a fixed workload, no dongne code; lower: faster)", summary["machine_reference_ms"]],
        ["  server CPU per question / machine reference", summary["server_cpu_per_question_per_reference"]],
        [
            "PostgreSQL CPU ms per question (its sessions for the nodes; SQLite: none)",
            summary["database_cpu_ms_per_question"],
        ],
        ["server threads waiting for a CPU, % of wall", summary["server_runqueue_wait_pct"]],
        ["other work on the machine before the run, cores", summary["background_cores_before"]],
        ["locals' client procs CPU %", summary["clients_cpu_pct"]],
        ["machine CPU % (2 cores = 200)", summary["machine_cpu_pct"]],
        ["server RSS after set-up, MB", summary["server_rss_ready_mb"]],
        ["server RSS peak, MB", summary["server_rss_peak_mb"]],
        ["set-up s (connect, hello, location)", summary["setup_s"]],
        [
            "young / middle / full collections while loaded",
            f"{summary['gc0_collections']:g} / {summary['gc1_collections']:g} / {summary['gc2_collections']:g}",
        ],
        [
            "  their pauses, ms in total",
            f"{summary['gc0_pause_ms']:.0f} / {summary['gc1_pause_ms']:.0f} / {summary['gc2_pause_ms']:.0f}",
        ],
        ["  middle / full collections over 50 ms", f"{summary['gc1_over_50ms']:g} / {summary['gc2_over_50ms']:g}"],
        [
            "create_question answered in the server over 25 / 50 / 100 ms (dongne_request_seconds)",
            f"{summary['server_asks_over_25ms']:g} / {summary['server_asks_over_50ms']:g} / {summary['server_asks_over_100ms']:g} of {summary['server_asks']:g}",
        ],
        [
            "QUICK stages (due at 3 s) running by 5 / 10 / 30 s after their question",
            f"{summary['quick_within_5s']:g} / {summary['quick_within_10s']:g} / {summary['quick_within_30s']:g} of {summary['quick_stages']:g}",
        ],
    ]
    print(h.format_table(["figure", "median"], rows2))
    closes = [r["local_closes"] for r in runs]
    print(
        f"\nlocal connection closes per run: {closes}; seq gaps: {[r['seq_gaps'] for r in runs]}; "
        f"alerts by stage: {[r['alerts_by_stage'] for r in runs]}"
    )
    print(f"targets (p99 < 100 ms): {report['target']}")
    h.write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
