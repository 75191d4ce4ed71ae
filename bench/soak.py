"""Soak bench: a bounded mixed load for a long time; does the server's memory stay flat?

    python bench/soak.py [--duration 600] [--warmup 360] [--clients 200] [--rate 40] [--question-rate 0.5]
                         [--reconnect-rate 0.5] [--sample-interval 5]
                         [--json bench/results/soak.json] [--no-question-cost]
                         [--malloc-stats] [--tracemalloc FRAMES] [--ban-at SECONDS [--ban-window 30]]

What it does:

* **Server.** ``python -m dongne serve`` as a subprocess on 127.0.0.1 (a temp
  database, ``synchronous`` FULL as deployed unless ``--synchronous NORMAL``),
  with the rate limits raised so that the bench measures memory, not refusals,
  ``min_update_interval_s = 0`` and periodic snapshots off. Everything else is
  the defaults: the escalation plan (0 / 3 / 30 / 120 s), alert caps, rooms.
* **Clients.** ``--clients`` users in this process (trio, ``dongne.client``),
  a quarter of them askers and the rest verified locals, each placed within
  1.5 km of one of the 30 bundled Jeju hotspots (inside the service area).
  Each client sends requests as a Poisson process, ``--rate`` requests per
  second over all clients, drawn from a fixed mix: askers join, type, mark
  read, accept, close, look around (``nearby_questions``, ``nearby_locals``,
  ``trending``, ``get_profile``); locals move (``update_location``), answer,
  join, type, leave and look around. Questions come separately, at
  ``--question-rate`` per second round-robin over the askers. Rooms are left
  before the 50-per-connection limit.
* **Reconnects.** Each client's connection lives an exponential time with
  mean ``clients / --reconnect-rate``; then it closes (half of them with a
  close frame, half by dropping the TCP connection) and reconnects with
  ``resume`` from its ``last_seq``. Every durable ``seq`` a user receives is
  checked: exactly one more than the previous one (``seq_gap`` and
  ``seq_duplicate`` count the exceptions).
* **Sampling.** Every ``--sample-interval`` seconds: the server's VmRSS,
  RssAnon, RssFile, threads and CPU time from ``/proc``, the database and WAL
  sizes; every 30 s, the gauges of ``GET /metrics`` on the ops port
  (connections, users and locals online, open questions, escalations
  running). Not more often: each scrape is a new HTTP connection, and
  hypercorn leaves ~9 KB of cyclic garbage per connection for the collector
  (which the server runs rarely), so scraping every 5 s added ~1 MB per 10
  minutes of the bench's own making.
* **Warm-up.** The load runs ``--warmup`` seconds (default 360), then
  ``--duration`` seconds (default 600) that are measured. The warm-up covers
  SQLite's page cache filling: the writer's cache is bounded (2,000 KiB,
  ``dongne/store/_sqlite.py``), but the soak starts on an empty database and
  the cache only fills as the database grows past 2 MB, which at this load
  takes ~330 s (measured with ``--malloc-stats``: ``sqlite_memory_used``
  1.3 -> 2.83 MB, then flat to the end, in three runs). A production
  database is far past that size. With another load, pick a warm-up after
  which ``thread_arena`` is flat: the report warns when it is not.
* **Report.** RSS growth over the measured period: the mean RSS of the
  samples in the 30 s after the warm-up against the mean of the last 30 s, in
  % and MB, plus the least-squares slope over the measured samples (MB per 10
  min).
  Server CPU (% of one core), requests by operation, error replies by code,
  close codes seen, p50 / p99 request latency (send to reply, this process's
  clock), durable events received and replayed. A table on stdout, JSON to
  ``--json``.
* **Per-question memory.** Questions asked within ``hot_question_days``
  (7 days) stay in memory by design. Unless ``--no-question-cost``, after the
  soak the bench builds the sans-I/O ``Engine`` in this process (the same
  settings, regions, hotspots and plan as the server) and measures with
  ``tracemalloc`` what 2,000 questions cost once their escalation is over:
  unanswered, then with one answer each, then resolved. Growth in the soak
  can then be split into "questions kept by design" and the rest.
* **What grows.** Every sample also splits the anonymous RSS by mapping
  (``/proc/PID/smaps``): ``heap`` (glibc's main arena: the event loop's
  malloc), ``thread_arena`` (glibc's arenas of the worker threads, where
  every SQLite call runs: its page caches) and ``other_anon`` (CPython's
  pymalloc arenas, large mmapped blocks, stacks).
* **Allocator accounts (``--malloc-stats``).** The server runs under a small
  wrapper (``bench/_soak_probe.py``; the server code is unchanged) that answers the
  sampler on SIGUSR1 with the allocators' own figures, every sample: glibc's
  ``malloc_info`` (bytes in use and bytes held free, main arena apart from
  the threads' arenas), pymalloc's (arenas held, bytes in blocks), SQLite's
  ``sqlite3_memory_used`` and the count of full gc collections. After the
  warm-up and near the end it also counts live objects by type. After the
  load's last sample it runs a full collection (how much was cyclic garbage
  not collected yet: the server raises gc's thresholds) and ``malloc_trim(0)``
  (how much RSS was free memory malloc kept). Cheap: the RSS figures stay
  valid. Growth of ``*_free`` with flat ``*_in_use`` is fragmentation; of
  ``sqlite_memory_used``, page caches and compiled statements; of
  ``pymalloc_in_use``, Python objects, live or cyclic garbage.
* **Python allocation sites (``--tracemalloc FRAMES``).** Also traces the
  server's Python allocations from the start and prints the sites that grew
  most between the two snapshots, and the cyclic garbage a full collection
  finds at each snapshot (by type and by the dongne line that allocated it;
  then collected). It slows the server, adds its own memory and collects:
  take RSS figures from another run.

* **A ban under load (``--ban-at SECONDS``).** That many seconds into the
  measured period, an admin connection sends ``ban_user`` for one extra user
  who has ``BAN_CONNECTIONS`` (10, the per-user maximum) connections open
  (opened 5 s before, each in a room of a recent question). Reported: how long
  from sending ``ban_user`` until each of them has seen its close (4003
  expected; the slowest is "all closed"), the ``ban_user`` reply's latency,
  whether a new ``hello`` of the banned user is closed with 4003 too, and the
  p50 / p99 of the other clients' requests (by when they were sent) in the
  ``--ban-window`` seconds before the ban, in the first 2 s after it and in
  the ``--ban-window`` seconds after it. The issue's target: all closed
  within 1 s, and no measurable cost to the others.

Everything runs on 127.0.0.1; every loop is bounded by the duration (clients
still busy 60 s after it are counted, not awaited); the server is killed at
exit whatever happens. Exit status 0 when the server survived, no seq was
lost or repeated, every client finished and RSS grew under 5 %.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import random
import resource
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from collections import Counter, deque
from pathlib import Path
from typing import Any

from dongne.core.geo import offset_position

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

#: Beside the harness's lifted abuse limits: every move is accepted.
EXTRA_ENV = {"DONGNE_LOCATION_MIN_UPDATE_INTERVAL_S": "0"}

ASKER_MIX = {
    "join_question": 3.0, "typing_start": 2.0, "mark_read": 2.0, "accept_answer": 0.7, "close_question": 0.3,
    "nearby_questions": 2.0, "nearby_locals": 1.0, "trending": 1.0, "get_profile": 1.0, "leave_question": 1.0,
}  # fmt: skip
LOCAL_MIX = {
    "update_location": 4.0, "create_answer": 0.6, "join_question": 2.0, "typing_start": 2.0, "typing_stop": 1.0,
    "nearby_questions": 2.0, "get_profile": 1.0, "get_settings": 0.5, "leave_question": 1.0,
}  # fmt: skip
ROOM_CAP = 40  # leave the oldest room before the server's 50 per connection
TAGS = ("food", "beach", "hiking", "cafe", "bus", "rain", "market", "museum")
WORDS = (
    "black pork",
    "the ferry",
    "a quiet beach",
    "the night market",
    "a bus to Hallasan",
    "a cafe with a view",
    "the olle trail",
    "a rainy-day museum",
)


# ---- places -------------------------------------------------------------------------


class Places:
    """Random points near the bundled hotspots, inside the service area."""

    def __init__(self, rng: random.Random) -> None:
        from dongne.core.regions import load_default_regions, load_hotspots

        self.rng = rng
        self.hotspots = load_hotspots()
        self.regions = load_default_regions()

    def near(self, index: int | None = None, spread_m: float = 1500.0) -> dict[str, float]:
        spot = self.hotspots[self.rng.randrange(len(self.hotspots)) if index is None else index % len(self.hotspots)]
        for _ in range(100):
            r = spread_m * math.sqrt(self.rng.random())
            a = self.rng.uniform(0, 2 * math.pi)
            lat, lng = offset_position(spot.lat, spot.lng, r * math.cos(a), r * math.sin(a))
            if self.regions.region_of(lat, lng) is not None:
                return {"lat": round(lat, 6), "lng": round(lng, 6)}
        return {"lat": spot.lat, "lng": spot.lng}


# ---- the server --------------------------------------------------------------------------

#: ``--malloc-stats`` / ``--tracemalloc``: the server runs under this wrapper,
#: which answers ``Probe`` on SIGUSR1 (its docstring says with what).
PROBE_WRAPPER = Path(__file__).resolve().parent / "_soak_probe.py"


class Probe:
    """Asks the server under ``PROBE_WRAPPER`` for a report (one at a time)."""

    def __init__(self, server: h.ServerProcess, trace_dir: Path) -> None:
        self.server, self.dir = server, trace_dir
        self.n = 0
        self.lock = threading.Lock()

    def ask(self, action: str, timeout: float = 30.0) -> dict[str, Any] | None:
        """``stats``, ``snapshot`` or ``trim``: the reply (None if the server did not answer in time)."""
        with self.lock:
            self.n += 1
            (self.dir / "request.tmp").write_text(f"{self.n} {action}")
            (self.dir / "request.tmp").rename(self.dir / "request")
            os.kill(self.server.pid, signal.SIGUSR1)
            reply = self.dir / f"reply-{self.n}.json"
            deadline = time.monotonic() + timeout
            while not reply.exists():
                if time.monotonic() > deadline or not self.server.alive():
                    return None
                time.sleep(0.01)
            data: dict[str, Any] = json.loads(reply.read_text())
            data["n"] = self.n
            return data


def start_server(db: Path, secret: str, args: argparse.Namespace, trace_dir: Path | None) -> h.ServerProcess:
    """``dongne serve`` as ``h.start_dongne`` starts it; under ``PROBE_WRAPPER`` when ``trace_dir`` is given."""
    if trace_dir is None:
        return h.start_dongne(db, jwt_secret=secret, synchronous=args.synchronous, extra_env=EXTRA_ENV)
    env = {**EXTRA_ENV, "SOAK_TRACE_FRAMES": str(args.tracemalloc), "SOAK_TRACE_DIR": str(trace_dir)}
    return h.start_dongne(
        db, jwt_secret=secret, synchronous=args.synchronous, extra_env=env, entry=(str(PROBE_WRAPPER),)
    )


def compare_snapshots(trace_dir: Path, snaps: list[dict[str, Any]], frames: int, top: int = 15) -> dict[str, Any]:
    """What grew between the first and the last ``snapshot`` reply: objects by type, Python allocation sites."""
    if len(snaps) < 2:
        return {"error": f"{len(snaps)} snapshot(s) taken"}
    s0, s1 = snaps[0], snaps[-1]
    types = Counter(s1["objects_by_type"])
    types.subtract(s0["objects_by_type"])
    out: dict[str, Any] = {"objects_by_type_growth": dict(types.most_common(top))}
    if not frames:
        return out
    out.update(
        (k, s1[k]) for k in ("garbage_objects", "garbage_freed_bytes", "garbage_by_type", "garbage_bytes_by_site")
    )
    first, last = (tracemalloc.Snapshot.load(str(trace_dir / f"snap-{s['n']}.pickle")) for s in (s0, s1))
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
    ]
    first, last = first.filter_traces(ignore), last.filter_traces(ignore)
    by_line = last.compare_to(first, "lineno")
    by_trace = last.compare_to(first, "traceback") if frames > 1 else []
    out.update({
        "traced_growth_mb": (s1["traced"] - s0["traced"]) / 2**20,
        "tracemalloc_overhead_growth_mb": (s1["overhead"] - s0["overhead"]) / 2**20,
        "top_by_line": [
            {"where": str(d.traceback[0]), "size_diff_kb": round(d.size_diff / 1024, 1), "count_diff": d.count_diff, "size_kb": round(d.size / 1024, 1)}
            for d in by_line[:top]
        ],
        "top_by_traceback": [
            {"traceback": [str(f) for f in d.traceback], "size_diff_kb": round(d.size_diff / 1024, 1), "count_diff": d.count_diff}
            for d in by_trace[:5]
        ],
    })  # fmt: skip
    return out


# ---- sampling -------------------------------------------------------------------------


def _status_fields(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status", "rb") as fh:
        for line in fh:
            key, _, rest = line.partition(b":")
            if key in (b"VmRSS", b"RssAnon", b"RssFile", b"RssShmem", b"VmHWM"):
                out[key.decode()] = int(rest.split()[0]) * 1024
            elif key == b"Threads":
                out["Threads"] = int(rest.split()[0])
    return out


def _smaps(pid: int) -> dict[str, int]:
    """Resident anonymous memory by kind of mapping, from ``/proc/PID/smaps`` (bytes).

    ``heap``: the brk heap, i.e. glibc's main arena (the main thread's
    malloc: Python objects over 512 bytes, msgpack and wsproto buffers);
    ``thread_arena``: glibc's arenas of other threads, 64 MiB-aligned (the
    worker threads that run every SQLite call: page caches, statements);
    ``other_anon``: the other anonymous mappings: CPython's 1 MiB pymalloc
    arenas (the kernel merges neighbouring ones, so they cannot be told
    apart from the rest here; ``--malloc-stats`` counts them), large blocks
    malloc mmaps directly, thread stacks.
    """
    out = dict.fromkeys(("heap", "thread_arena", "other_anon"), 0)
    kind: str | None = None
    with open(f"/proc/{pid}/smaps", "rb") as fh:
        for line in fh:
            head = line.split(None, 6)
            if len(head) >= 5 and b"-" in head[0] and head[0][:1].isalnum() and len(head[1]) == 4:
                start = int(head[0].split(b"-")[0], 16)
                name = head[5].strip() if len(head) > 5 else b""
                if head[4] != b"0" or name.startswith(b"/") or b"w" not in head[1]:
                    kind = None
                elif name == b"[heap]":
                    kind = "heap"
                elif name:
                    kind = None  # [stack], [vvar], ...
                elif start % (64 << 20) == 0:
                    kind = "thread_arena"
                else:
                    kind = "other_anon"
            elif kind is not None and line.startswith(b"Rss:"):
                out[kind] += int(line.split()[1]) * 1024
    return out


def _gauges(ops_port: int) -> dict[str, float]:
    wanted = ("connections", "users_online", "locals_online", "open_questions", "escalations_running")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        for name in wanted:
            if line.startswith(f"dongne_{name} "):
                out[name] = float(line.split()[1])
    return out


#: How often the sampler reads ``/metrics`` (see "Sampling" in the docstring).
GAUGE_INTERVAL_S = 30.0


class Sampler(threading.Thread):
    """Samples the server every ``interval`` seconds until stopped."""

    def __init__(
        self, server: h.ServerProcess, ops_port: int, db: Path, interval: float, t0: float,
        probe: Probe | None = None, snapshot_at: tuple[float, ...] = (),
    ) -> None:  # fmt: skip
        super().__init__(name="sampler", daemon=True)
        self.server, self.ops_port, self.db, self.interval, self.t0 = server, ops_port, db, interval, t0
        self.probe = probe  # --malloc-stats / --tracemalloc: allocator figures with every sample
        self.snapshot_at = sorted(snapshot_at)  # ... and a snapshot at these times
        self.snapshots: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self._next_gauges = 0.0
        self.done = threading.Event()

    def sample(self, force_gauges: bool = False) -> None:
        pid = self.server.pid
        row: dict[str, Any] = {
            "t": round(time.monotonic() - self.t0, 2),
            "cpu_s": h.cpu_seconds(pid),
            **_status_fields(pid),
            **_smaps(pid),
        }
        for suffix, key in (("", "db_bytes"), ("-wal", "wal_bytes")):
            try:
                row[key] = os.path.getsize(f"{self.db}{suffix}")
            except OSError:
                row[key] = 0
        if force_gauges or row["t"] >= self._next_gauges:
            row.update(_gauges(self.ops_port))
            self._next_gauges = row["t"] + GAUGE_INTERVAL_S
        if self.probe is not None:
            snapshot = bool(self.snapshot_at) and row["t"] >= self.snapshot_at[0]
            reply = self.probe.ask("snapshot" if snapshot else "stats")
            if reply is not None:
                if snapshot:
                    self.snapshot_at.pop(0)
                    self.snapshots.append({**reply, "t": row["t"]})
                    row["snapshot"] = True
                row.update((k, v) for k, v in reply.items() if k.startswith(("glibc_", "pymalloc_", "sqlite_", "gc_")))
        self.samples.append(row)

    def run(self) -> None:
        while not self.done.is_set():
            if not self.server.alive():
                return
            self.sample()
            self.done.wait(self.interval)


# ---- the load -------------------------------------------------------------------------


class Load:
    """The clients' shared state and counters."""

    def __init__(self, args: argparse.Namespace, url: str, secret: str) -> None:
        self.args = args
        self.url = url
        self.secret = secret
        self.rng = random.Random(args.seed)
        self.places = Places(self.rng)
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.close_codes: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.latency_ms: dict[str, list[float]] = {}
        self.sent_at: list[tuple[float, float]] = []  # (trio time sent, latency ms) of every request
        self.ban: dict[str, Any] | None = None  # --ban-at: what the ban did (see ban_under_load)
        self.recent: deque[tuple[str, str]] = deque(maxlen=300)  # (question id, asker) of recent questions
        self.reconnects = 0
        self.connect_failures = 0
        self.timeouts = 0
        self.close_timeouts = 0
        self.close_races = 0  # pings answered after our close frame (see User.run)
        self.unfinished_clients = 0
        self.replayed = 0
        self.seq_gap = 0
        self.seq_duplicate = 0
        self.asked = 0
        self.warm_at = math.inf  # time.monotonic() when the warm-up ends
        self.kept_after_warmup: Counter[str] = Counter()  # questions and answers created since

    def token(self, user: str, local: bool, tags: tuple[str, ...]) -> str:
        from dongne.auth import mint_token

        return mint_token(self.secret, user, local=local, tags=tags, now_s=time.time())


class User:
    """One simulated user: its own Poisson process of requests, reconnecting now and then."""

    def __init__(self, load: Load, index: int, asker: bool) -> None:
        self.load = load
        self.asker = asker
        self.user_id = f"{'asker' if asker else 'local'}{index:04d}"
        self.rng = random.Random(load.rng.random())
        self.home = load.places.near(index)
        self.tags = () if asker else tuple(self.rng.sample(TAGS, 2))
        self.last_seq = 0
        self.expect_seq = 1
        self.connected_once = False
        self.client: Any = None
        self.rooms: deque[str] = deque()
        self.mine: dict[str, list[str]] = {}  # own question -> answer ids (from answer_notification)

    # -- one connection --

    def _record(self, dispatch: Any) -> Any:
        def record(frame: dict[str, Any]) -> bool:
            seq = frame.get("seq")
            if isinstance(seq, int):
                if seq < self.expect_seq:
                    self.load.seq_duplicate += 1
                elif seq > self.expect_seq:
                    self.load.seq_gap += 1
                self.expect_seq = max(self.expect_seq, seq + 1)
            kind = frame.get("type")
            if kind != "reply":
                self.load.events[str(kind)] += 1
            if kind == "answer_notification":
                data = frame.get("data", {})
                answers = self.mine.get(data.get("question_id"))
                if answers is not None:
                    answers.append(data["answer"]["answer_id"])
            return bool(dispatch(frame))

        return record

    async def run(self, end: float) -> None:
        import trio
        import trio_websocket
        import wsproto.utilities

        from dongne.client import open_client

        load = self.load
        mean_session = load.args.clients / load.args.reconnect_rate if load.args.reconnect_rate > 0 else math.inf
        for _attempt in range(100_000):
            if trio.current_time() >= end:
                return
            token = load.token(self.user_id, not self.asker, self.tags)
            resume = self.last_seq if self.connected_once else None
            session_end = min(end, trio.current_time() + self.rng.expovariate(1 / mean_session))
            drop = False
            try:
                async with open_client(load.url, token, resume_from=resume, hello=False, timeout=30) as client:
                    client._dispatch = self._record(client._dispatch)  # type: ignore[method-assign]
                    try:
                        drop = await self._session(client, token, resume, session_end, end)
                    finally:
                        await self._close(client, drop)
                # Offline for a while: durable events queue up and come back with resume.
                await trio.sleep(max(0.0, min(self.rng.uniform(1.0, 10.0), end - trio.current_time())))
            except trio_websocket.ConnectionClosed as exc:
                if not drop:
                    load.close_codes[str(exc.reason.code if exc.reason else None)] += 1
                await trio.sleep(self.rng.uniform(0.5, 2.0))
            except (OSError, trio_websocket.HandshakeError):
                load.connect_failures += 1
                await trio.sleep(self.rng.uniform(0.5, 2.0))
            except trio.TooSlowError:  # no reply within 30 s: counted, then a fresh connection
                load.timeouts += 1
            except wsproto.utilities.LocalProtocolError:
                # A ping that arrives after our close frame: trio-websocket
                # answers it and wsproto refuses a pong in LOCAL_CLOSING, which
                # open_client raises. The connection was closing anyway.
                load.close_races += 1
            finally:
                self.client = None
                if self.connected_once:
                    self.last_seq = max(self.last_seq, self.expect_seq - 1)

    async def _session(self, client: Any, token: str, resume: int | None, session_end: float, end: float) -> bool:
        """Hello (with resume), then requests until ``session_end``; returns whether to drop the TCP connection."""
        import trio

        load = self.load
        data: dict[str, Any] = {"token": token}
        if resume is not None:
            data["resume"] = {"last_seq": resume}
        hello = await self._timed(client, "hello", data)
        if hello is None:
            return False
        if resume is not None:
            load.reconnects += 1
            load.replayed += max(0, hello["last_seq"] - resume)
        self.connected_once = True
        self.client = client
        self.rooms.clear()
        if not self.asker:
            await self._timed(client, "update_location", {"location": self.home, "accuracy_m": 20.0})
        while (now := trio.current_time()) < session_end:
            await trio.sleep(min(session_end - now, self.rng.expovariate(load.args.rate / load.args.clients)))
            if trio.current_time() >= session_end:
                break
            await self._one_request(client)
        return trio.current_time() < end and self.rng.random() < 0.5

    async def _close(self, client: Any, drop: bool) -> None:
        """Close while the client still reads (or drop the TCP connection and wait until it notices).

        Bounded, so that one stuck close is counted (``close_timeouts``)
        instead of stalling the soak: the first 10-minute run found leaving
        ``open_client`` while frames arrived could hang for ever (fixed, with
        a regression test in tests/test_crash_safety.py).
        """
        import trio

        with trio.move_on_after(10) as scope:
            scope.shield = True
            if drop:  # a lost network: no close frame, the server notices the dead socket
                stream = getattr(client.ws, "_stream", None)
                if stream is not None:
                    await stream.aclose()
                await client.wait_closed()
            else:
                await client.ws.aclose()
        if scope.cancelled_caught:
            self.load.close_timeouts += 1

    async def _timed(self, client: Any, op: str, data: dict[str, Any]) -> dict[str, Any] | None:
        import trio

        from dongne.client import RequestError

        load = self.load
        load.requests[op] += 1
        started = trio.current_time()
        try:
            reply: dict[str, Any] | None = await client.request(op, data)
        except RequestError as exc:
            load.errors[exc.code] += 1
            reply = None
        if reply is not None and op in ("create_question", "create_answer") and time.monotonic() >= load.warm_at:
            load.kept_after_warmup[op] += 1
        latency = (trio.current_time() - started) * 1000
        load.latency_ms.setdefault(op, []).append(latency)
        load.sent_at.append((started, latency))
        return reply

    async def ask(self) -> None:
        client = self.client
        if client is None:
            return
        rng = self.rng
        topic = rng.choice(WORDS)
        data = {
            "title": f"Where can I find {topic} near here? ({self.user_id} #{self.load.asked})",
            "body": rng.choice(("", "Arriving tonight.", "With two kids, no car.", "Any tips welcome, thanks!")),
            "location": self.load.places.near(),
            "hashtags": rng.sample(TAGS, rng.randint(0, 2)),
            "urgency": "urgent" if rng.random() < 0.1 else "normal",
        }
        self.load.asked += 1
        reply = await self._timed(client, "create_question", data)
        if reply is not None:
            qid = reply["question"]["question_id"]
            self.mine[qid] = []
            self._joined(qid)
            self.load.recent.append((qid, self.user_id))
            if len(self.mine) > 50:
                self.mine.pop(next(iter(self.mine)))

    def _joined(self, qid: str) -> None:
        if qid in self.rooms:
            return
        self.rooms.append(qid)

    async def _one_request(self, client: Any) -> None:
        rng, load = self.rng, self.load
        mix = ASKER_MIX if self.asker else LOCAL_MIX
        op = rng.choices(list(mix), weights=list(mix.values()))[0]
        recent = [qid for qid, asker in load.recent if asker != self.user_id]
        if len(self.rooms) >= ROOM_CAP:
            op = "leave_question"
        if op == "leave_question":
            if self.rooms:
                qid = self.rooms.popleft()
                await self._timed(client, op, {"question_id": qid})
            return
        if op in ("join_question", "create_answer") and not recent:
            op = "nearby_questions"
        if op in ("typing_start", "typing_stop") and not self.rooms:
            op = "get_profile"
        if op == "join_question":
            qid = rng.choice(recent[-100:])
            if await self._timed(client, op, {"question_id": qid}) is not None:
                self._joined(qid)
        elif op == "create_answer":
            qid = rng.choice(recent[-50:])
            content = f"Try {rng.choice(WORDS)}, about {rng.randint(2, 40)} minutes from there. ({self.user_id})"
            await self._timed(client, op, {"question_id": qid, "content": content})
        elif op in ("typing_start", "typing_stop"):
            await self._timed(client, op, {"question_id": rng.choice(list(self.rooms))})
        elif op in ("mark_read", "accept_answer", "close_question"):
            answered = [q for q, a in self.mine.items() if a]
            pool = answered if op != "close_question" else list(self.mine)
            if not pool:
                await self._timed(client, "get_profile", {})
                return
            qid = rng.choice(pool)
            if op == "mark_read":
                await self._timed(client, op, {"question_id": qid})
            elif op == "accept_answer":
                await self._timed(client, op, {"question_id": qid, "answer_id": rng.choice(self.mine[qid])})
                self.mine.pop(qid, None)
            else:
                await self._timed(client, op, {"question_id": qid})
                self.mine.pop(qid, None)
        elif op == "update_location":
            here = {
                "lat": self.home["lat"] + rng.uniform(-0.004, 0.004),
                "lng": self.home["lng"] + rng.uniform(-0.004, 0.004),
            }
            if load.places.regions.region_of(here["lat"], here["lng"]) is None:
                here = self.home  # a step into the sea: stay home
            await self._timed(client, op, {"location": here, "accuracy_m": 30.0})
        elif op in ("nearby_questions", "nearby_locals"):
            await self._timed(client, op, {"location": self.home})
        elif op == "trending":
            await self._timed(client, op, {"limit": 10})
        else:
            await self._timed(client, op, {})


#: ``--ban-at``: connections of the banned user (the per-user maximum), opened this long before the ban.
BAN_CONNECTIONS = 10
BAN_LEAD_S = 5.0
BANNED_USER = "banned0000"
BAN_ADMIN = "soak_admin"


async def ban_under_load(load: Load, at: float) -> None:
    """At trio time ``at``: an admin bans a user with ``BAN_CONNECTIONS`` open; when did each see its close?"""
    import trio
    import trio_websocket

    from dongne.auth import mint_token
    from dongne.client import open_client

    url, secret = load.url, load.secret
    result: dict[str, Any] = {"connections": BAN_CONNECTIONS, "user_id": BANNED_USER}
    load.ban = result
    closed_at: list[float] = []
    codes: Counter[str] = Counter()
    ready = 0
    all_ready, all_closed = trio.Event(), trio.Event()

    def token(user: str, **claims: Any) -> str:
        return mint_token(secret, user, now_s=time.time(), **claims)

    async def victim(i: int) -> None:
        nonlocal ready
        try:
            async with open_client(url, token(BANNED_USER, nick="Banned"), timeout=30) as client:
                recent = [qid for qid, _ in list(load.recent)[-20:]]
                if recent:  # in a room: the ban also tells that room the user left
                    with contextlib.suppress(Exception):
                        await client.request("join_question", {"question_id": recent[i % len(recent)]})
                ready += 1
                if ready == BAN_CONNECTIONS:
                    all_ready.set()
                await client.wait_closed()
                closed_at.append(trio.current_time())
                codes[str(client.closed.reason.code if client.closed and client.closed.reason else None)] += 1
        except (trio_websocket.ConnectionClosed, trio_websocket.HandshakeError, OSError) as exc:
            codes[f"failed: {type(exc).__name__}"] += 1
        finally:
            if len(closed_at) + sum(n for c, n in codes.items() if c.startswith("failed")) >= BAN_CONNECTIONS:
                all_closed.set()

    await trio.sleep_until(at - BAN_LEAD_S)
    with trio.move_on_after(BAN_LEAD_S + 60):
        async with trio.open_nursery() as nursery:
            for i in range(BAN_CONNECTIONS):
                nursery.start_soon(victim, i)
            with trio.move_on_after(BAN_LEAD_S + 10):
                await all_ready.wait()
            result["opened"] = ready
            async with open_client(url, token(BAN_ADMIN, admin=True), timeout=30) as admin:
                await trio.sleep_until(max(at, trio.current_time()))
                sent = trio.current_time()
                result["sent_at"] = sent
                try:
                    reply = await admin.request(
                        "ban_user", {"user_id": BANNED_USER, "reason": "soak: a ban under load"}
                    )
                    result["reply"] = reply
                except Exception as exc:  # a refusal is a result too
                    result["reply_error"] = repr(exc)
                result["reply_ms"] = (trio.current_time() - sent) * 1000
                with trio.move_on_after(30):
                    await all_closed.wait()
                # A new hello of the banned user: closed with 4003 while the ban lasts.
                result["rehello"] = await _rehello(url, token(BANNED_USER))
                nursery.cancel_scope.cancel()  # victims still open after 30 s are counted, not awaited
    sent = result.get("sent_at")
    delays = sorted((t - sent) * 1000 for t in closed_at) if sent is not None else []
    result.update({
        "closed": len(closed_at),
        "close_codes": dict(codes),
        "close_ms": delays,
        "all_closed_ms": delays[-1] if len(delays) == BAN_CONNECTIONS else None,
    })  # fmt: skip


async def _rehello(url: str, token: str) -> int | str | None:
    """Say hello on a new connection: the close code it gets, or ``"accepted"``."""
    import msgpack
    import trio
    import trio_websocket

    try:
        with trio.fail_after(10):
            async with trio_websocket.open_websocket_url(url) as ws:
                await ws.send_message(msgpack.packb({"type": "hello", "id": 1, "data": {"token": token}}))
                reply = msgpack.unpackb(await ws.get_message(), raw=False)
                return "accepted" if reply.get("ok") else f"refused: {reply.get('error')}"
    except trio_websocket.ConnectionClosed as exc:
        return exc.reason.code if exc.reason else None
    except (trio.TooSlowError, OSError, trio_websocket.HandshakeError) as exc:
        return repr(exc)


async def drive(load: Load, duration: float) -> None:
    """Every user's task plus the question clock, all ending by ``duration``."""
    import trio
    import trio_websocket

    args = load.args
    n_askers = max(1, args.clients // 4)
    users = [User(load, i, asker=i < n_askers) for i in range(args.clients)]
    askers = users[:n_askers]
    end = trio.current_time() + duration

    async def questions() -> None:
        for k in itertools.count():
            due = start + k / args.question_rate
            if due >= end:
                return
            await trio.sleep_until(due)
            asker = askers[k % len(askers)]
            if asker.client is not None:
                # A failure is counted by the asker's own task when it notices.
                with contextlib.suppress(trio_websocket.ConnectionClosed, trio.TooSlowError):
                    await asker.ask()

    finished: set[str] = set()

    async def guarded(user: User) -> None:
        await user.run(end)
        finished.add(user.user_id)

    start = trio.current_time() + 5.0  # let everyone connect first
    # A client still busy 60 s after the end is counted, not waited for.
    with trio.move_on_at(end + 60):
        async with trio.open_nursery() as nursery:
            for user in users:
                nursery.start_soon(guarded, user)
                await trio.sleep(0.01)  # no connection storm at start
            if args.question_rate > 0:
                nursery.start_soon(questions)
            if args.ban_at is not None:
                nursery.start_soon(ban_under_load, load, end - duration + max(0.0, args.warmup) + args.ban_at)
    load.unfinished_clients = len(users) - len(finished)


# ---- per-question memory, in process ----------------------------------------------------


def question_cost(n: int = 2000) -> dict[str, Any]:
    """Bytes per question (and answer) kept in the engine, measured with tracemalloc."""
    import msgpack

    from dongne.auth import Claims
    from dongne.config import load_settings
    from dongne.core import Connected, Engine, EscalationDue, FrameReceived, Outcome, Send, Tick
    from dongne.core.regions import load_default_regions, load_hotspots

    settings = load_settings(
        None,
        environ={},
        overrides={
            "limits": {
                k: 1e9
                for k in (
                    "conn_per_s",
                    "conn_burst",
                    "writes_per_minute",
                    "writes_burst",
                    "questions_per_hour",
                    "questions_burst",
                )
            }
        },
    )
    regions = load_default_regions()

    def claims(token: object, now_s: float) -> Claims:
        user = str(token)
        return Claims(
            user_id=user,
            nick=user,
            local=user.startswith("local"),
            tags=("food",) if user.startswith("local") else (),
            role="user",
        )

    engine = Engine(settings.core(), claims, region_of=regions.region_of, hotspots=load_hotspots())

    def request(conn_id: int, op: str, data: dict[str, Any], at: int) -> Outcome:
        return engine.handle(FrameReceived(conn_id, msgpack.packb({"type": op, "id": next(ids), "data": data})), at)

    rng = random.Random(7)
    places = Places(rng)
    ids = itertools.count(1)
    now = int(time.time() * 1000)
    for conn_id, user in ((1, "asker"), (2, "local1")):
        engine.handle(Connected(conn_id), now)
        request(conn_id, "hello", {"token": user}, now)

    def reply_data(out: Outcome) -> dict[str, Any]:
        return next(a.frame["data"] for a in out.actions if isinstance(a, Send) and a.frame["type"] == "reply")

    def measure() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    base = measure()
    qids = []
    for i in range(n):
        data = {
            "title": f"Where can I find {WORDS[i % len(WORDS)]} near here? (asker #{i})", "body": "Arriving tonight.",
            "location": places.near(i), "hashtags": [TAGS[i % len(TAGS)]], "urgency": "normal",
        }  # fmt: skip
        out = request(1, "create_question", data, now + i)
        qids.append(reply_data(out)["question"]["question_id"])
        request(1, "leave_question", {"question_id": qids[-1]}, now + i)
    for qid in qids:
        engine.handle(EscalationDue(qid), now + 3_600_000)  # every stage has run
    engine.handle(Tick(), now + 3_600_000)  # and the slow-response alerts are raised
    open_bytes = measure() - base
    answer_ids = []
    for i, qid in enumerate(qids):
        content = f"Try {WORDS[i % len(WORDS)]}, about {i % 40 + 2} minutes from there."
        out = request(2, "create_answer", {"question_id": qid, "content": content}, now + 3_600_000 + i)
        answer_ids.append(reply_data(out)["answer"]["answer_id"])
    answered_bytes = measure() - base
    for qid, aid in zip(qids, answer_ids, strict=True):
        request(1, "accept_answer", {"question_id": qid, "answer_id": aid}, now + 3_700_000)
    resolved_bytes = measure() - base
    tracemalloc.stop()
    return {
        "questions": n,
        "bytes_per_open_question": round(open_bytes / n),
        "bytes_per_question_with_one_answer": round(answered_bytes / n),
        "bytes_per_answer": round((answered_bytes - open_bytes) / n),
        "bytes_per_resolved_question_with_answer": round(resolved_bytes / n),
        "note": "tracemalloc, in-process Engine with the server's settings; escalation finished; title ~60 chars, answer ~60 chars",
    }


# ---- analysis -------------------------------------------------------------------------


def _window_mean(samples: list[dict[str, Any]], lo: float, hi: float, key: str = "VmRSS") -> float:
    values = [s[key] for s in samples if lo <= s["t"] <= hi and key in s]
    return statistics.fmean(values) if values else float("nan")


def _slope(samples: list[dict[str, Any]], key: str) -> float:
    pts = [(s["t"], s[key]) for s in samples if key in s]
    if len(pts) < 3:
        return float("nan")
    mt = statistics.fmean(t for t, _ in pts)
    mv = statistics.fmean(v for _, v in pts)
    den = sum((t - mt) ** 2 for t, _ in pts)
    return sum((t - mt) * (v - mv) for t, v in pts) / den if den else float("nan")


#: Memory figures sampled, by source: ``/proc/PID/status``, ``/proc/PID/smaps``
#: and (``--malloc-stats``) the allocators' own accounts.
MEMORY_KEYS = (
    "VmRSS", "RssAnon", "RssFile", "heap", "thread_arena", "other_anon",
    "glibc_main_in_use", "glibc_main_free", "glibc_main_top", "glibc_threads_in_use", "glibc_threads_free", "glibc_mmapped",
    "pymalloc_arenas_bytes", "pymalloc_in_use", "sqlite_memory_used",
)  # fmt: skip


def analyse(
    args: argparse.Namespace, load: Load, samples: list[dict[str, Any]], warmup: float, wall: float
) -> dict[str, Any]:
    MB = 1024 * 1024
    after = [s for s in samples if s["t"] >= warmup]
    last_t = samples[-1]["t"] if samples else 0.0
    growth: dict[str, Any] = {}
    for key in MEMORY_KEYS:
        if not any(key in s for s in samples):
            continue
        base = _window_mean(samples, warmup, warmup + 30, key)
        final = _window_mean(samples, last_t - 30, last_t, key)
        growth[key] = {
            "after_warmup_mb": base / MB,
            "final_mb": final / MB,
            "growth_mb": (final - base) / MB,
            "growth_pct": (final - base) / base * 100 if base == base and base else float("nan"),
            "slope_mb_per_10min": _slope(after, key) * 600 / MB,
        }
    cpu = (
        (samples[-1]["cpu_s"] - samples[0]["cpu_s"]) / (samples[-1]["t"] - samples[0]["t"]) * 100
        if len(samples) > 1
        else float("nan")
    )
    all_lat = sorted(v for vs in load.latency_ms.values() for v in vs)
    per_op = {
        op: {"n": len(vs), "p50_ms": h.percentile(sorted(vs), 50), "p99_ms": h.percentile(sorted(vs), 99)}
        for op, vs in sorted(load.latency_ms.items())
    }
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "warmup_s": warmup,
        "rss": growth,
        "peak_rss_mb": max(s.get("VmRSS", 0) for s in samples) / MB if samples else float("nan"),
        "server_cpu_pct_of_one_core": cpu,
        "bench_cpu_pct_of_one_core": (usage.ru_utime + usage.ru_stime) / wall * 100,
        "requests": dict(load.requests),
        "requests_total": sum(load.requests.values()),
        "requests_per_s": sum(load.requests.values()) / wall,
        "questions_asked": load.requests.get("create_question", 0),
        "answers_sent": load.requests.get("create_answer", 0),
        "errors_by_code": dict(load.errors),
        "close_codes_seen": dict(load.close_codes),
        "events_received": dict(load.events),
        "reconnects": load.reconnects,
        "replayed_events": load.replayed,
        "connect_failures": load.connect_failures,
        "request_timeouts": load.timeouts,
        "close_timeouts": load.close_timeouts,
        "close_races": load.close_races,
        "unfinished_clients": load.unfinished_clients,
        "seq_gap": load.seq_gap,
        "seq_duplicate": load.seq_duplicate,
        "latency_ms": {
            "p50": h.percentile(all_lat, 50),
            "p99": h.percentile(all_lat, 99),
            "max": all_lat[-1] if all_lat else float("nan"),
        },
        "latency_by_op": per_op,
        "final_gauges": {
            k: samples[-1].get(k)
            for k in (
                "connections",
                "users_online",
                "locals_online",
                "open_questions",
                "escalations_running",
                "Threads",
            )
        }
        if samples
        else {},
        "db_bytes": samples[-1].get("db_bytes") if samples else None,
        "wal_bytes": samples[-1].get("wal_bytes") if samples else None,
    }


def ban_summary(load: Load, window: float) -> dict[str, Any] | None:
    """``--ban-at``: the ban's figures, and the other clients' latency before, just after and after it."""
    ban = load.ban
    if ban is None:
        return None
    out = {k: v for k, v in ban.items() if k != "sent_at"}
    sent = ban.get("sent_at")
    if sent is None:
        return out
    windows = {"before": (sent - window, sent), "first_2s_after": (sent, sent + 2.0), "after": (sent, sent + window)}
    for name, (lo, hi) in windows.items():
        lat = sorted(ms for t, ms in load.sent_at if lo <= t < hi)
        out[f"others_{name}"] = {
            "window_s": hi - lo, "n": len(lat), "p50_ms": h.percentile(lat, 50), "p99_ms": h.percentile(lat, 99),
            "max_ms": lat[-1] if lat else float("nan"),
        }  # fmt: skip
    out["target_met"] = (
        out.get("all_closed_ms") is not None
        and out["all_closed_ms"] <= 1000.0
        and out.get("close_codes") == {"4003": BAN_CONNECTIONS}
        and out.get("rehello") == 4003
    )
    return out


def by_design(summary: dict[str, Any], load: Load, cost: dict[str, Any]) -> dict[str, Any]:
    """What the questions and answers created after the warm-up cost, kept by design (an estimate)."""
    questions, answers = load.kept_after_warmup["create_question"], load.kept_after_warmup["create_answer"]
    mb = (questions * cost["bytes_per_open_question"] + answers * cost["bytes_per_answer"]) / 2**20
    rss = summary["rss"]["VmRSS"]
    rest = rss["growth_mb"] - mb
    return {
        "questions": questions, "answers": answers, "mb": mb,
        "rest_of_growth_mb": rest, "rest_of_growth_pct": rest / rss["after_warmup_mb"] * 100,
    }  # fmt: skip


def report(summary: dict[str, Any], cost: dict[str, Any] | None, top_rows: int = 15) -> None:
    g = summary["rss"]
    rows = [
        (key, v["after_warmup_mb"], v["final_mb"], v["growth_mb"], v["growth_pct"], v["slope_mb_per_10min"])
        for key, v in g.items()
    ]
    print(h.format_table(["memory (MB)", "after warm-up", "final", "growth MB", "growth %", "slope MB/10min"], rows))
    if g["thread_arena"]["growth_mb"] > 0.25:
        print(f"WARNING: the worker threads' arenas (SQLite) grew {g['thread_arena']['growth_mb']:.2f} MB while measured: "
              "a page cache still filling? A longer --warmup would tell.")  # fmt: skip
    print("(anonymous memory by mapping: heap = glibc's main arena (main-thread malloc), thread_arena = worker")
    print(" threads' arenas (SQLite), other_anon = pymalloc arenas, large mmaps, stacks")
    if "glibc_main_in_use" in g:
        print(" glibc_* (malloc_info): in use / held free in the main arena and the threads' arenas, mmapped blocks;")
        print(" pymalloc_* (sys._debugmallocstats): arenas held and bytes in allocated blocks;")
        print(" sqlite_memory_used: what SQLite has malloc'd, page caches included)")
    else:
        print(" --malloc-stats splits them further)")
    print()
    lat = summary["latency_ms"]
    print(h.format_table(
        ["load", "value"],
        [
            ("requests", summary["requests_total"]), ("requests/s", summary["requests_per_s"]),
            ("questions", summary["questions_asked"]), ("answers", summary["answers_sent"]),
            ("reconnects (resume)", summary["reconnects"]), ("events replayed", summary["replayed_events"]),
            ("server CPU % of a core", summary["server_cpu_pct_of_one_core"]), ("bench CPU % of a core", summary["bench_cpu_pct_of_one_core"]),
            ("latency p50 ms", lat["p50"]), ("latency p99 ms", lat["p99"]), ("latency max ms", lat["max"]),
            ("seq gaps / duplicates", f"{summary['seq_gap']} / {summary['seq_duplicate']}"),
            ("connect failures / request timeouts", f"{summary['connect_failures']} / {summary['request_timeouts']}"),
            ("close timeouts / clients unfinished", f"{summary['close_timeouts']} / {summary['unfinished_clients']}"),
            ("pings answered after our close (trio-websocket)", summary["close_races"]),
            ("peak RSS MB", summary["peak_rss_mb"]),
        ],
    ))  # fmt: skip
    print(f"errors by code:   {json.dumps(summary['errors_by_code'], sort_keys=True)}")
    print(
        f"close codes seen: {json.dumps(summary['close_codes_seen'], sort_keys=True)} (besides the bench's own closes)"
    )
    print(f"final gauges:     {json.dumps(summary['final_gauges'], sort_keys=True)}")
    print()
    print(
        h.format_table(
            ["op", "n", "p50 ms", "p99 ms"],
            [(op, v["n"], v["p50_ms"], v["p99_ms"]) for op, v in summary["latency_by_op"].items()],
        )
    )
    if cost:
        print()
        print(
            h.format_table(
                ["kept in memory (by design, 7 days)", "bytes"],
                [(k, v) for k, v in cost.items() if k.startswith("bytes")],
            )
        )
        kept = summary["kept_by_design"]
        print(
            f"created after the warm-up: {kept['questions']} questions, {kept['answers']} answers, about {kept['mb']:.2f} MB kept by design;"
        )
        print(
            f"the rest of the VmRSS growth: {kept['rest_of_growth_mb']:+.2f} MB ({kept['rest_of_growth_pct']:+.2f} %)"
        )
    ban = summary.get("ban")
    if ban:
        print()
        closes = ban.get("close_ms") or []
        print(
            f"ban under load: {ban.get('opened', 0)}/{ban['connections']} connections of {ban['user_id']} open; "
            f"ban_user reply {ban.get('reply_ms', float('nan')):.1f} ms {ban.get('reply_error', '')}"
        )
        print(
            f"  closed {ban.get('closed', 0)}/{ban['connections']} (codes {json.dumps(ban.get('close_codes', {}))}); "
            f"first {closes[0] if closes else float('nan'):.1f} ms, all {ban.get('all_closed_ms') or float('nan'):.1f} ms "
            f"after sending ban_user; a new hello: {ban.get('rehello')}"
        )
        rows = [
            (name, w["window_s"], w["n"], w["p50_ms"], w["p99_ms"], w["max_ms"])
            for name, w in ((k[len("others_") :], v) for k, v in ban.items() if k.startswith("others_"))
        ]
        if rows:
            print(h.format_table(["other clients' requests", "window s", "n", "p50 ms", "p99 ms", "max ms"], rows))
        print(
            f"  target (all 10 closed with 4003 within 1 s, re-hello refused): {'met' if ban.get('target_met') else 'NOT MET'}"
        )
    garbage = summary.get("garbage_at_end")
    if garbage and "garbage_objects" in garbage:
        print()
        print(f"cyclic garbage not yet collected after the load: {garbage['garbage_objects']} objects, "
              f"{garbage['garbage_freed_bytes'] / 2**20:.2f} MB freed by a full collection; by type: "
              + ", ".join(f"{k} {v}" for k, v in list(garbage["garbage_by_type"].items())[:8]))  # fmt: skip
    trim = summary.get("malloc_trim_at_end")
    if trim:
        print(
            f"malloc_trim(0) after the load (clients gone): RssAnon {trim['rss_anon_before_mb']:.1f} -> {trim['rss_anon_after_mb']:.1f} MB"
        )
    trace = summary.get("snapshots")
    if trace and "objects_by_type_growth" in trace:
        print()
        print(
            h.format_table(
                ["live objects (gc) between the snapshots", "growth"], list(trace["objects_by_type_growth"].items())
            )
        )
    if trace and "garbage_by_type" in trace:
        print()
        print(
            f"a full collection near the end freed {trace['garbage_objects']} objects, {trace['garbage_freed_bytes'] / 2**20:.2f} MB"
        )
        print(h.format_table(["garbage by type", "objects"], list(trace["garbage_by_type"].items())[:top_rows]))
        print(
            h.format_table(
                ["garbage allocated at (innermost dongne frame)", "bytes (sys.getsizeof)"],
                list(trace["garbage_bytes_by_site"].items())[:top_rows],
            )
        )
    if trace and "top_by_line" in trace:
        print()
        print(f"Python heap (tracemalloc) between the snapshots: {trace['traced_growth_mb']:+.2f} MB "
              f"(tracemalloc's own memory {trace['tracemalloc_overhead_growth_mb']:+.2f} MB)")  # fmt: skip
        print(
            h.format_table(
                ["allocated at", "growth KB", "blocks", "now KB"],
                [(d["where"], d["size_diff_kb"], d["count_diff"], d["size_kb"]) for d in trace["top_by_line"]],
            )
        )


# ---- main -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = h.bench_parser(__doc__)
    p.add_argument(
        "--duration", type=float, default=600.0, help="seconds of load measured after the warm-up (default 600)"
    )
    p.add_argument("--clients", type=int, default=200, help="users, one connection each; a quarter ask (default 200)")
    p.add_argument(
        "--rate", type=float, default=40.0, help="requests per second over all clients, questions aside (default 40)"
    )
    p.add_argument("--question-rate", type=float, default=0.5, help="questions per second (default 0.5)")
    p.add_argument(
        "--reconnect-rate",
        type=float,
        default=0.5,
        help="reconnects (with resume) per second over all clients (default 0.5)",
    )
    p.add_argument("--sample-interval", type=float, default=5.0, help="seconds between server samples (default 5)")
    p.add_argument(
        "--warmup",
        type=float,
        default=360.0,
        help="seconds of load before the measured --duration (default 360: SQLite's page caches fill; see the docstring)",
    )
    p.add_argument(
        "--synchronous",
        choices=["NORMAL", "FULL"],
        default="FULL",
        help="SQLite synchronous (default FULL, as deployed)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--no-question-cost", action="store_true", help="skip the in-process per-question memory measurement"
    )
    p.add_argument(
        "--tracemalloc",
        type=int,
        default=0,
        metavar="FRAMES",
        help="debug: trace the server's Python allocations (FRAMES deep) and compare snapshots taken after the warm-up and near the end; RSS figures then include tracemalloc's own cost",
    )
    p.add_argument(
        "--malloc-stats",
        action="store_true",
        help="with every sample, glibc's, pymalloc's and SQLite's own accounts (in use, held free); live objects by type after the warm-up and near the end; malloc_trim at the end (implied by --tracemalloc); cheap, RSS figures stay valid",
    )
    p.add_argument(
        "--ban-at",
        type=float,
        default=None,
        metavar="SECONDS",
        help="this far into the measured period, an admin bans a user with 10 connections open; reports how fast they close and the others' latency around it",
    )
    p.add_argument(
        "--ban-window",
        type=float,
        default=30.0,
        help="--ban-at: seconds of the others' requests compared before and after the ban (default 30)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="bound on the whole bench, seconds (default: warm-up + duration + 300)",
    )
    h.add_json_option(p, "soak")
    return p


def main(argv: list[str] | None = None) -> int:
    import trio

    args = _parser().parse_args(argv)
    if args.clients < 2 or args.duration <= 0 or args.rate <= 0:
        raise SystemExit("--clients >= 2, --duration > 0 and --rate > 0 please")
    if args.ban_at is not None and not (0 <= args.ban_at < args.duration and args.ban_window > 0):
        raise SystemExit("--ban-at must fall within --duration, --ban-window > 0")
    if args.ban_at is not None and args.ban_at + args.ban_window > args.duration:
        print("soak: --ban-at + --ban-window runs past --duration: the 'after' window is cut short", file=sys.stderr)
    if args.ban_at is not None and max(0.0, args.warmup) + args.ban_at < args.ban_window + BAN_LEAD_S:
        print(
            "soak: fewer than --ban-window seconds of load before the ban: the 'before' window is cut short",
            file=sys.stderr,
        )
    warmup = max(0.0, args.warmup)
    total = warmup + args.duration
    h.raise_nofile(65536)
    secret = secrets.token_hex(32)
    timeout = args.timeout if args.timeout is not None else total + 300
    with h.time_limit(timeout), tempfile.TemporaryDirectory(prefix="dongne-soak-") as tmp:
        db = Path(tmp) / "soak.sqlite3"
        trace_dir = Path(tmp) / "trace" if args.tracemalloc or args.malloc_stats else None
        if trace_dir is not None:
            trace_dir.mkdir()
        server = start_server(db, secret, args, trace_dir)
        try:
            assert server.match is not None
            ops_port = int(server.match.group(2))
            load = Load(args, f"ws://127.0.0.1:{server.port}", secret)
            t0 = time.monotonic()
            load.warm_at = t0 + warmup
            probe = Probe(server, trace_dir) if trace_dir is not None else None
            snapshot_at = (warmup, total - 2 * args.sample_interval)
            sampler = Sampler(server, ops_port, db, args.sample_interval, t0, probe, snapshot_at)
            sampler.start()
            print(f"soak: {args.clients} clients, {args.rate}/s requests, {args.question_rate}/s questions, "
                  f"{warmup:.0f} s warm-up + {args.duration:.0f} s measured, server pid {server.pid}", file=sys.stderr)  # fmt: skip
            try:
                trio.run(drive, load, total)
            finally:
                wall = time.monotonic() - t0
                sampler.done.set()
                sampler.join(timeout=30)
                alive = server.alive()
                if alive:
                    sampler.sample(force_gauges=True)
            trimmed = garbage = None
            if alive and probe is not None:
                # The samples are taken; now, how much was cyclic garbage the
                # collector had not reached, and how much free memory malloc kept?
                try:
                    garbage = probe.ask("garbage")
                    before = _status_fields(server.pid)["RssAnon"]
                    if probe.ask("trim") is not None:
                        trimmed = {
                            "rss_anon_before_mb": before / 2**20,
                            "rss_anon_after_mb": _status_fields(server.pid)["RssAnon"] / 2**20,
                        }
                except OSError:  # it died meanwhile
                    alive = False
        finally:
            server.stop()
        if not alive:
            print("soak: the server died:\n" + "\n".join(server.tail), file=sys.stderr)
        summary = analyse(args, load, sampler.samples, warmup, wall)
        summary["server_alive_at_end"] = alive
        summary["ban"] = ban_summary(load, args.ban_window)
        if trace_dir is not None:
            summary["snapshots"] = compare_snapshots(trace_dir, sampler.snapshots, args.tracemalloc)
            summary["malloc_trim_at_end"] = trimmed
            summary["garbage_at_end"] = garbage
        cost = None if args.no_question_cost else question_cost()
        if cost:
            summary["kept_by_design"] = by_design(summary, load, cost)
    report(summary, cost)
    h.write_report(
        args.json,
        {**h.report_head("soak", args), "summary": summary, "question_cost": cost, "samples": sampler.samples},
    )
    growth = summary["rss"]["VmRSS"]["growth_pct"]
    ok = alive and summary["seq_gap"] == summary["seq_duplicate"] == summary["unfinished_clients"] == 0
    ok = ok and (summary["ban"] is None or bool(summary["ban"].get("target_met")))
    return 0 if ok and growth < 5.0 else 1


if __name__ == "__main__":
    sys.exit(main())
