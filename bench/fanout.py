"""Fan-out bench: one question room, many listeners, a stream of answers.

    python bench/fanout.py [--clients 1000] [--broadcasts 200] [--client-procs 4]
                           [--idle-clients 5000] [--repeat 3] [--peer socketio]
                           [--window 1] [--json bench/results/fanout.json]

What it measures, per server (dongne, and the Socket.IO peer with ``--peer socketio``):

* **Fan-out.** An asker creates a question (and so sits in its room); N
  listeners, each a distinct user, connect, say hello and join the room; then a
  separate answerer sends M answers. Each answer is broadcast to the room, so
  the listeners receive N*M frames. ``deliveries/s`` = N*M / (time from the
  first send until the last listener received the last broadcast); latency =
  receive time - the ``time.time()`` the answerer wrote into the answer's
  content (same machine, same clock); ``server CPU/delivery`` = the server
  process's utime+stime (all threads, ``/proc/PID/stat``) over the broadcast
  phase / N*M. Pacing is closed-loop: the answerer sends as fast as replies
  come back, with at most ``--window`` requests in flight (default 1).
* **Idle memory.** A fresh server; a warm-up of 100 connections opened and
  closed; then ``--idle-clients`` connections opened and authenticated
  (dongne: ``hello``; Socket.IO: namespace connect) and left idle.
  (RSS with them - RSS before) / count, RSS from ``/proc/PID/status``.
  The Node peer is started with ``--expose-gc`` and garbage-collected before
  both readings (its RSS would otherwise carry uncollected garbage); CPython
  frees by reference counting and is read as is.

The load side: ``--client-procs`` processes, each driving its share of the
connections with one epoll loop over raw non-blocking sockets and a minimal
WebSocket layer (``_harness``): no asyncio or trio per message, so a delivery
costs the client a recv and a decode. The same client code speaks dongne
(binary msgpack) and Socket.IO v5 over Engine.IO v4's websocket transport
(text JSON packets), so both servers face the same load generator.

dongne runs with ``DONGNE_STORE_SYNCHRONOUS=NORMAL`` unless ``--synchronous FULL``
(WAL + NORMAL: commits are not fsynced, the bench measures the fan-out, not
the disk). Each answer still commits its rows (answer, question, the asker's
inbox event) before the broadcast, and the asker also gets a durable
``answer_notification``; the Socket.IO peer keeps nothing.

Everything runs on 127.0.0.1; every wait is bounded; the bench kills its
subprocesses on exit (also on Ctrl-C, SIGTERM and ``--timeout``).
"""

from __future__ import annotations

import argparse
import array
import http.client
import json
import multiprocessing
import multiprocessing.connection
import os
import secrets
import shutil
import socket
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

PEER_DIR = h.BENCH_DIR / "socketio_peer"
SIO_PATH = "/socket.io/?EIO=4&transport=websocket"
WARMUP_CONNS = 100

# ---- the load-generating client processes ---------------------------------------

JOINING = h.AUTH + 1  # between hello's reply and join_question's


# The hot path of the load clients: find the send time in a broadcast without
# decoding the whole frame (a full decode is the fallback).
DONGNE_NEW_ANSWER = b"\x82\xa4type\xaanew_answer"
SIO_NEW_ANSWER = b'42["new_answer"'


def _dongne_sent_at(payload: bytes) -> float:
    i = payload.find(b"\xa7content")
    if i >= 0:
        tag = payload[i + 8]
        if 0xA0 <= tag <= 0xBF:
            start, length = i + 9, tag & 0x1F
        elif tag == 0xD9:
            start, length = i + 10, payload[i + 9]
        else:
            start = length = -1
        if start >= 0:
            return float(payload[start : start + length].partition(b"|")[0])
    content: str = msgpack.unpackb(payload)["data"]["answer"]["content"]
    return float(content.partition("|")[0])


def _sio_sent_at(payload: bytes) -> float:
    i = payload.find(b'"content":"')
    if i >= 0:
        end = payload.find(b'"', i + 11)
        return float(payload[i + 11 : end].partition(b"|")[0])
    content: str = json.loads(payload[2:])[1]["answer"]["content"]
    return float(content.partition("|")[0])


class _Conn(h.LoadConn):
    __slots__ = ("got", "token")

    def __init__(self, sock: socket.socket, user: str, token: str) -> None:
        super().__init__(sock, user)
        self.token = token
        self.got = 0


def _client_worker(pipe: multiprocessing.connection.Connection, spec: dict[str, Any]) -> None:
    """Drive ``spec["jobs"]`` connections from one process (one ``h.EpollClients`` loop).

    Messages to the parent: ``("ready", ok, failed, errors)`` once every
    connection is authenticated (and joined) or failed; ``("done", result)``
    once every ready connection received ``broadcasts`` answers (or when asked
    with ``"report"``). Commands from the parent: ``"report"``, ``"close"``.
    The process ends itself after ``spec["life_s"]`` seconds in any case.
    """
    loop = h.EpollClients[_Conn](pipe, spec)
    proto = spec["proto"]
    room = spec["room"]
    join = spec["join"]
    expected = spec["broadcasts"]

    unpackb = msgpack.unpackb
    packb = msgpack.packb
    encode = h.encode_client_frame
    fail, become_ready = loop.fail, loop.ready
    done_sent = False
    n_done = 0
    latencies = array.array("d")
    t_first = 0.0
    t_last = 0.0
    frame_bytes = 0
    other_frames = 0

    sio_join = f'421["join",{json.dumps(room)}]'.encode()

    def on_upgraded(c: _Conn) -> None:
        if proto == "dongne":
            hello = packb({"type": "hello", "id": 1, "data": {"token": c.token}})
            c.sock.send(encode(h.OP_BINARY, hello))

    def on_frame(c: _Conn, opcode: int, payload: bytes, now: float) -> None:
        nonlocal n_done, t_first, t_last, frame_bytes, other_frames
        if opcode == h.OP_PING:
            c.sock.send(encode(h.OP_PONG, payload))
            return
        if opcode == h.OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            fail(c, f"server closed with {code} {payload[2:60]!r}", f"close_{code}")
            return
        if proto == "dongne":
            if payload.startswith(DONGNE_NEW_ANSWER):
                sent_at = _dongne_sent_at(payload)
            else:
                frame = unpackb(payload)
                kind = frame.get("type")
                if kind == "reply":
                    rid = frame.get("id")
                    if not frame.get("ok"):
                        fail(c, f"request {rid} refused: {frame.get('error')}", "refused")
                    elif rid == 1 and c.state == h.AUTH:
                        if join:
                            c.state = JOINING
                            req = packb({"type": "join_question", "id": 2, "data": {"question_id": room}})
                            c.sock.send(encode(h.OP_BINARY, req))
                        else:
                            become_ready(c)
                    elif rid == 2 and c.state == JOINING:
                        become_ready(c)
                else:
                    other_frames += 1
                return
        else:
            if payload.startswith(SIO_NEW_ANSWER):
                sent_at = _sio_sent_at(payload)
            else:
                if payload == b"2":
                    c.sock.send(encode(h.OP_TEXT, b"3"))
                elif payload.startswith(b"0") and c.state == h.AUTH:
                    c.sock.send(encode(h.OP_TEXT, b"40"))
                elif payload.startswith(b"40") and c.state == h.AUTH:
                    if join:
                        c.state = JOINING
                        c.sock.send(encode(h.OP_TEXT, sio_join))
                    else:
                        become_ready(c)
                elif payload.startswith(b"431") and c.state == JOINING:
                    become_ready(c)
                elif payload.startswith((b"44", b"41")):
                    fail(c, f"socket.io refused: {payload[:80]!r}", "refused")
                else:
                    other_frames += 1
                return
        # A broadcast answer.
        latencies.append((now - sent_at) * 1000.0)
        if not t_first:
            t_first = now
        t_last = now
        frame_bytes = len(payload)
        c.got += 1
        if c.got == expected:
            n_done += 1

    def result(partial: bool) -> dict[str, Any]:
        return {
            "partial": partial,
            "received": len(latencies),
            "conns_done": n_done,
            "ready": loop.n_ready,
            "dead_after_ready": loop.dead_after_ready,
            "t_first": t_first,
            "t_last": t_last,
            "frame_bytes": frame_bytes,
            "other_frames": other_frames,
            "errors": loop.errors,
            "latencies": latencies.tobytes(),
        }

    def tick() -> None:
        nonlocal done_sent
        if (
            loop.ready_sent
            and not done_sent
            and expected
            and loop.n_ready
            and n_done + loop.dead_after_ready >= loop.n_ready
        ):
            pipe.send(("done", result(False)))
            done_sent = True

    def on_command(command: Any) -> None:
        nonlocal done_sent
        if command == "report":
            pipe.send(("done", result(True)))
            done_sent = True

    loop.run(
        new_conn=lambda sock, job: _Conn(sock, *job),
        on_upgraded=on_upgraded,
        on_frame=on_frame,
        tick=tick,
        on_command=on_command,
        path_of=(lambda c: f"{loop.path}&user={c.user}") if proto == "sio" else None,
    )


# ---- the servers ---------------------------------------------------------------------


class DongneTarget:
    name = "dongne"
    proto = "dongne"
    path = "/"

    def __init__(self, workdir: Path, synchronous: str, *, nodes: int = 1, db: str | None = None) -> None:
        from dongne.auth import mint_token

        self._mint = mint_token
        self.workdir = workdir
        self.synchronous = synchronous
        self.nodes = nodes
        self.db = db  # a PostgreSQL server: a new database on it per run
        self.secret = secrets.token_urlsafe(32)
        self._runs = 0

    def start(self) -> h.ServerGroup:
        """``nodes`` servers on a new database (a SQLite file, or one on the PostgreSQL server)."""
        self._runs += 1
        group = h.ServerGroup([])
        if self.db:
            name = f"dongne_fanout_{os.getpid()}_{self._runs}"
            db: Path | str = group.resources.enter_context(h.fresh_postgres_database(self.db, name))
        else:
            db = self.workdir / f"dongne-{self._runs}.sqlite3"
        # On a failure the group stops, and drops the database it made.
        group.start_dongne_nodes(
            self.nodes, db, jwt_secret=self.secret, workdir=self.workdir, synchronous=self.synchronous
        )
        return group

    def tokens(self, users: list[str]) -> list[tuple[str, str]]:
        now = time.time()
        return [(u, self._mint(self.secret, u, now_s=now, ttl_s=3600)) for u in users]

    def control(self, port: int, user: str) -> _DongneControl:
        return _DongneControl(h.BlockingWebSocket("127.0.0.1", port, self.path), self.tokens([user])[0][1])

    def open_room(self, asker: _DongneControl) -> str:
        reply = asker.request(
            "create_question",
            {
                "title": "fan-out bench",
                "body": "Which beach is least crowded right now?",
                "location": {"lat": 33.5, "lng": 126.53},
                "hashtags": ["bench"],
            },
        )
        return str(reply["question"]["question_id"])

    def collect_garbage(self, server: h.ServerProcess) -> None:
        """CPython frees by reference counting; there is no hook to force a cycle collection."""


class _DongneControl:
    def __init__(self, ws: h.BlockingWebSocket, token: str) -> None:
        self.ws = ws
        self._next = 0
        self.request("hello", {"token": token})

    def request(self, op: str, data: dict[str, Any]) -> dict[str, Any]:
        self._next += 1
        self.ws.send(h.OP_BINARY, msgpack.packb({"type": op, "id": self._next, "data": data}))
        while True:
            rid, ok, frame = self.read_reply()
            if rid == self._next:
                if not ok:
                    raise RuntimeError(f"{op} refused: {frame.get('error')}")
                return dict(frame.get("data", {}))

    def send_answer(self, rid: int, room: str, content: str) -> None:
        frame = {"type": "create_answer", "id": rid, "data": {"question_id": room, "content": content}}
        self.ws.send(h.OP_BINARY, msgpack.packb(frame))

    def read_reply(self) -> tuple[int, bool, dict[str, Any]]:
        while True:
            _op, payload = self.ws.recv()
            frame = msgpack.unpackb(payload)
            if frame.get("type") == "reply":
                return frame.get("id"), bool(frame.get("ok")), frame

    def close(self) -> None:
        self.ws.close()


class SocketIOTarget:
    name = "socketio"
    proto = "sio"
    path = SIO_PATH

    def __init__(self) -> None:
        node = shutil.which("node")
        if node is None:
            raise SystemExit("--peer socketio needs node on PATH")
        self.node = node
        self.version = "?"
        if not (PEER_DIR / "node_modules" / "socket.io").is_dir():
            npm = shutil.which("npm")
            if npm is None:
                raise SystemExit("--peer socketio needs npm on PATH to install socket.io")
            print(f"installing the Socket.IO peer: npm install in {PEER_DIR}", file=sys.stderr)
            subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--no-package-lock"],
                cwd=PEER_DIR,
                check=True,
                timeout=600,
                stdin=subprocess.DEVNULL,
            )
        try:
            pkg = json.loads((PEER_DIR / "node_modules" / "socket.io" / "package.json").read_text())
            self.version = pkg.get("version", "?")
        except OSError:
            pass

    def start(self) -> h.ServerProcess:
        server = h.ServerProcess(
            "socketio",
            [self.node, "--expose-gc", str(PEER_DIR / "server.js"), "--host", "127.0.0.1", "--port", "0"],
            ready_pattern=r"socketio listening: ws://[^\s]+:(\d+)",
            cwd=PEER_DIR,
        )
        server.start()
        return server

    def tokens(self, users: list[str]) -> list[tuple[str, str]]:
        return [(u, "") for u in users]

    def control(self, port: int, user: str) -> _SioControl:
        return _SioControl(h.BlockingWebSocket("127.0.0.1", port, f"{self.path}&user={user}"))

    def open_room(self, asker: _SioControl) -> str:
        room = "q-fanout-bench"
        asker.join(room)
        return room

    def collect_garbage(self, server: h.ServerProcess) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request("GET", "/gc")
            conn.getresponse().read()
        finally:
            conn.close()


class _SioControl:
    def __init__(self, ws: h.BlockingWebSocket) -> None:
        self.ws = ws
        self._expect(b"0")
        ws.send(h.OP_TEXT, b"40")
        self._expect(b"40")

    def _expect(self, prefix: bytes) -> bytes:
        while True:
            _op, payload = self.ws.recv()
            if payload == b"2":
                self.ws.send(h.OP_TEXT, b"3")
            elif payload.startswith(prefix):
                return payload
            elif payload.startswith(b"44"):
                raise RuntimeError(f"socket.io refused: {payload!r}")

    def join(self, room: str) -> None:
        self.ws.send(h.OP_TEXT, f'4290["join",{json.dumps(room)}]'.encode())
        self._expect(b"4390")

    def send_answer(self, rid: int, room: str, content: str) -> None:
        body = json.dumps(["answer", {"question_id": room, "content": content}], separators=(",", ":"))
        self.ws.send(h.OP_TEXT, f"42{rid}{body}".encode())

    def read_reply(self) -> tuple[int, bool, dict[str, Any]]:
        while True:
            _op, payload = self.ws.recv()
            if payload == b"2":
                self.ws.send(h.OP_TEXT, b"3")
            elif payload.startswith(b"43"):
                bracket = payload.index(b"[")
                args = json.loads(payload[bracket:])
                ok = bool(args) and isinstance(args[0], dict) and "error" not in args[0]
                return int(payload[2:bracket]), ok, {"data": args[0] if args else None}

    def close(self) -> None:
        self.ws.close()


# ---- phases -------------------------------------------------------------------------


def _drain(ws: h.BlockingWebSocket, counter: list[int]) -> None:
    """Read and drop everything a control connection receives (the asker's events)."""
    try:
        while True:
            ws.recv()
            counter[0] += 1
    except (h.WebSocketClosed, OSError, ValueError):
        pass


def _wait_quiet(
    pids: list[int], *, step: float = 0.25, threshold: float = 0.03, settle: int = 2, timeout: float = 60.0
) -> None:
    """Wait until the given processes together use under ``threshold`` CPU seconds per ``step``."""
    deadline = time.monotonic() + timeout
    calm = 0
    before = sum(h.cpu_seconds(p) for p in pids)
    while time.monotonic() < deadline:
        time.sleep(step)
        now = sum(h.cpu_seconds(p) for p in pids)
        calm = calm + 1 if now - before < threshold else 0
        before = now
        if calm >= settle:
            return


def _spec(
    target: Any, ports: list[int], room: str, *, join: bool, broadcasts: int, args: argparse.Namespace
) -> dict[str, Any]:
    return {
        "proto": target.proto,
        "host": "127.0.0.1",
        "port": ports[0],
        "ports": ports,  # several nodes: connections go to them in turn
        "path": target.path,
        "room": room,
        "join": join,
        "broadcasts": broadcasts,
        "setup_s": args.phase_timeout,
        "life_s": args.timeout,
        "max_connecting": 64,
    }


def run_fanout(target: Any, args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    """One fan-out run against a fresh server."""
    server = target.start()
    workers: h.ClientPool | None = None
    controls: list[Any] = []
    try:
        asker = target.control(server.port, "asker")
        controls.append(asker)
        room = target.open_room(asker)
        asker_frames = [0]
        threading.Thread(target=_drain, args=(asker.ws, asker_frames), daemon=True).start()

        t_setup = time.monotonic()
        jobs = target.tokens([f"c{i}" for i in range(args.clients)])
        workers = h.ClientPool(
            ctx,
            _client_worker,
            args.client_procs,
            jobs,
            _spec(target, server.ports, room, join=True, broadcasts=args.broadcasts, args=args),
        )
        workers.wait_ready(args.clients, "fan-out listeners", args.phase_timeout)
        setup_s = time.monotonic() - t_setup

        answerer = target.control(server.ports[-1], "ans")  # on another node than the asker, given several
        controls.append(answerer)
        _wait_quiet([*server.pids, *workers.pids])
        background = h.background_cores([*server.pids, *workers.pids])
        if background > 0.2:
            print(
                f"    warning: {background:.2f} CPU cores busy with other work; throughput and latency suffer",
                file=sys.stderr,
            )
        rss_joined = server.rss_bytes()

        m, window = args.broadcasts, max(1, args.window)
        cpu0 = server.cpu_seconds()
        client_cpu0 = workers.cpu_seconds()
        busy0 = h.machine_busy_seconds()
        t0 = time.time()
        sent = acked = refused = 0
        while sent < min(window, m):
            sent += 1
            answerer.send_answer(sent, room, f"{time.time():.6f}")
        while acked < m:
            _rid, ok, _frame = answerer.read_reply()
            acked += 1
            refused += not ok
            if sent < m:
                sent += 1
                answerer.send_answer(sent, room, f"{time.time():.6f}")
        t_acked = time.time()
        results = workers.wait_all("done", args.phase_timeout)
        if any(r is None for r in results):
            workers.broadcast("report")
            results = workers.wait_all("done", 30)
        cpu1 = server.cpu_seconds()
        client_cpu = workers.cpu_seconds() - client_cpu0
        busy = h.machine_busy_seconds() - busy0

        parts = [r[1] for r in results if r is not None]
        lat = array.array("d")
        for p in parts:
            lat.frombytes(p["latencies"])
        ordered = sorted(lat)
        received = len(ordered)
        t_last = max((p["t_last"] for p in parts), default=0.0)
        elapsed = t_last - t0 if received else float("nan")
        cpu = cpu1 - cpu0
        return {
            "clients": args.clients,
            "broadcasts": m,
            "expected": args.clients * m,
            "received": received,
            "refused": refused,
            "dead_listeners": sum(p["dead_after_ready"] for p in parts),
            "elapsed_s": elapsed,
            "send_phase_s": t_acked - t0,
            "deliveries_per_s": received / elapsed if received else 0.0,
            "p50_ms": h.percentile(ordered, 50),
            "p99_ms": h.percentile(ordered, 99),
            "max_ms": ordered[-1] if ordered else float("nan"),
            "server_cpu_s": cpu,
            "cpu_us_per_delivery": cpu / received * 1e6 if received else float("nan"),
            "server_cpu_util": cpu / elapsed if received else float("nan"),
            "client_cpu_util": client_cpu / elapsed if received else float("nan"),
            "machine_cpu_util": busy / elapsed if received else float("nan"),
            "background_cores_before": background,
            "frame_payload_bytes": max((p["frame_bytes"] for p in parts), default=0),
            "server_rss_joined_mb": rss_joined / 2**20,
            "setup_s": setup_s,
            "errors": [e for p in parts for e in p["errors"]][:5],
        }
    finally:
        if workers is not None:
            workers.close()
        for c in controls:
            c.close()
        server.stop()


def run_idle(target: Any, args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    """Memory per idle connection against a fresh server."""
    server = target.start()
    workers: h.ClientPool | None = None
    try:
        warm = h.ClientPool(
            ctx,
            _client_worker,
            min(args.client_procs, 2),
            target.tokens([f"w{i}" for i in range(WARMUP_CONNS)]),
            _spec(target, server.ports, "", join=False, broadcasts=0, args=args),
        )
        try:
            warm.wait_ready(WARMUP_CONNS, "warm-up connections", args.phase_timeout)
        finally:
            warm.close()
        _wait_quiet(server.pids)
        time.sleep(0.5)
        target.collect_garbage(server)
        rss0 = server.rss_bytes()

        jobs = target.tokens([f"i{i}" for i in range(args.idle_clients)])
        t_setup = time.monotonic()
        workers = h.ClientPool(
            ctx,
            _client_worker,
            args.client_procs,
            jobs,
            _spec(target, server.ports, "", join=False, broadcasts=0, args=args),
        )
        ready = workers.wait_ready(args.idle_clients, "idle connections", args.phase_timeout)
        setup_s = time.monotonic() - t_setup
        _wait_quiet([*server.pids, *workers.pids])
        time.sleep(0.5)
        target.collect_garbage(server)
        samples = []
        for _ in range(3):
            samples.append(server.rss_bytes())
            time.sleep(0.2)
        rss1 = int(h.median(samples))
        return {
            "idle_clients": ready,
            "rss_before_mb": rss0 / 2**20,
            "rss_after_mb": rss1 / 2**20,
            "kb_per_conn": (rss1 - rss0) / ready / 1024,
            "setup_s": setup_s,
        }
    finally:
        if workers is not None:
            workers.close()
        server.stop()


# ---- main ----------------------------------------------------------------------------

_SUMMARY_KEYS = [
    ("deliveries_per_s", "fanout"),
    ("p50_ms", "fanout"),
    ("p99_ms", "fanout"),
    ("cpu_us_per_delivery", "fanout"),
    ("server_cpu_util", "fanout"),
    ("client_cpu_util", "fanout"),
    ("machine_cpu_util", "fanout"),
    ("frame_payload_bytes", "fanout"),
    ("kb_per_conn", "idle"),
]


def _summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, phase in _SUMMARY_KEYS:
        values = [r[phase][key] for r in runs if r.get(phase) and key in r[phase]]
        out[key] = h.median(values)
    return out


def _parser() -> argparse.ArgumentParser:
    p = h.bench_parser(__doc__)
    p.add_argument("--clients", type=int, default=1000, help="listeners in the room (default 1000)")
    p.add_argument("--broadcasts", type=int, default=200, help="answers broadcast to the room (default 200)")
    p.add_argument("--client-procs", type=int, default=4, help="client processes (default 4)")
    p.add_argument(
        "--idle-clients", type=int, default=5000, help="idle connections for the memory figure (default 5000; 0 skips)"
    )
    p.add_argument("--repeat", type=int, default=3, help="runs per server; medians are reported (default 3)")
    p.add_argument("--peer", choices=["socketio"], help="also run the workload against a peer server")
    p.add_argument(
        "--window",
        type=int,
        default=1,
        help="answers in flight: the answerer sends the next one when a reply comes back (default 1)",
    )
    p.add_argument(
        "--synchronous",
        choices=["NORMAL", "FULL"],
        default="NORMAL",
        help="dongne's SQLite synchronous setting (default NORMAL)",
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="dongne serve processes on one database; listeners spread over them in turn, the answerer on the last"
        " (default 1; more than one needs --db)",
    )
    p.add_argument(
        "--db",
        metavar="URL",
        help="a PostgreSQL server (postgresql://..., a role that may create databases): each run gets a new"
        " database on it (default: a new SQLite file per run)",
    )
    h.add_json_option(p, "fanout")
    p.add_argument("--phase-timeout", type=float, default=180.0, help="bound on each setup or broadcast phase, seconds")
    p.add_argument("--timeout", type=float, default=3600.0, help="bound on the whole bench, seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.clients < 1 or args.broadcasts < 1 or args.repeat < 1 or args.client_procs < 1:
        raise SystemExit("--clients, --broadcasts, --repeat and --client-procs must be positive")
    if args.nodes < 1 or (args.nodes > 1 and not args.db):
        raise SystemExit("--nodes is at least 1, and more than one share a PostgreSQL database (--db)")
    nofile = h.raise_nofile(args.clients + args.idle_clients + 4096)
    ctx = multiprocessing.get_context("spawn")

    notes = [
        f"dongne runs with DONGNE_STORE_SYNCHRONOUS={args.synchronous}"
        + (" (WAL, commits not fsynced; allowed for this bench)" if args.synchronous == "NORMAL" else ""),
        f"pacing: closed loop, the answerer sends the next answer when a reply comes back, {args.window} in flight",
        f"load: {args.client_procs} client processes, one epoll loop each over raw sockets (no asyncio/trio per message)",
        "deliveries = listener receipts (N*M); dongne also sends the asker new_answer + a durable answer_notification per answer",
        f"dongne store: {'PostgreSQL, a new database per run' if args.db else 'SQLite, a new file per run'}; {args.nodes}"
        " node(s), listeners spread over them in turn; server CPU and RSS are the nodes' sums",
    ]
    targets: list[Any] = []
    report: dict[str, Any] = {**h.report_head("fanout", args), "notes": notes, "servers": {}}
    with h.time_limit(args.timeout), tempfile.TemporaryDirectory(prefix="dongne-fanout-") as tmp:
        targets.append(DongneTarget(Path(tmp), args.synchronous, nodes=args.nodes, db=args.db))
        if args.peer == "socketio":
            sio = SocketIOTarget()
            targets.append(sio)
            notes.append(
                f"peer: Socket.IO {sio.version} on Node {subprocess.run([sio.node, '--version'], capture_output=True, text=True).stdout.strip()}, websocket transport only, no compression; /gc before RSS readings"
            )
        for line in notes:
            print(f"# {line}", file=sys.stderr)
        print(f"# RLIMIT_NOFILE {nofile}", file=sys.stderr)
        for target in targets:
            runs = []
            for rep in range(args.repeat):
                run: dict[str, Any] = {}
                print(
                    f"[{target.name} {rep + 1}/{args.repeat}] fan-out {args.clients} x {args.broadcasts} ...",
                    file=sys.stderr,
                    flush=True,
                )
                run["fanout"] = run_fanout(target, args, ctx)
                f = run["fanout"]
                print(
                    f"    {f['received']}/{f['expected']} in {f['elapsed_s']:.2f}s: {f['deliveries_per_s']:,.0f}/s "
                    f"p50 {f['p50_ms']:.1f} ms p99 {f['p99_ms']:.1f} ms, {f['cpu_us_per_delivery']:.2f} us CPU/delivery",
                    file=sys.stderr,
                    flush=True,
                )
                if args.idle_clients > 0:
                    print(
                        f"[{target.name} {rep + 1}/{args.repeat}] idle {args.idle_clients} ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    run["idle"] = run_idle(target, args, ctx)
                    print(f"    {run['idle']['kb_per_conn']:.2f} KB per idle connection", file=sys.stderr, flush=True)
                runs.append(run)
            report["servers"][target.name] = {"runs": runs, "median": _summarise(runs)}

    headers = [
        "server",
        "deliveries/s",
        "p50 ms",
        "p99 ms",
        "CPU us/delivery",
        "server CPU",
        "clients CPU",
        "machine CPU",
        "frame B",
        "KB/idle conn",
    ]
    rows = []
    for name, data in report["servers"].items():
        s = data["median"]
        rows.append(
            [
                name,
                s["deliveries_per_s"],
                s["p50_ms"],
                s["p99_ms"],
                s["cpu_us_per_delivery"],
                s["server_cpu_util"],
                s["client_cpu_util"],
                s["machine_cpu_util"],
                int(s["frame_payload_bytes"]),
                s["kb_per_conn"],
            ]
        )
    print(
        f"\nfan-out: {args.clients} listeners x {args.broadcasts} broadcasts, {args.client_procs} client procs, window {args.window}; medians of {args.repeat}"
    )
    for line in notes:
        print(f"  {line}")
    print()
    print(h.format_table(headers, rows))
    if "socketio" in report["servers"]:
        d, s = report["servers"]["dongne"]["median"], report["servers"]["socketio"]["median"]
        ratios = {
            "deliveries_per_s": d["deliveries_per_s"] / s["deliveries_per_s"],
            "cpu_per_delivery": d["cpu_us_per_delivery"] / s["cpu_us_per_delivery"],
            "memory_per_idle_conn": d["kb_per_conn"] / s["kb_per_conn"] if args.idle_clients else float("nan"),
        }
        report["ratios_dongne_over_socketio"] = ratios
        print()
        print(h.format_table(["dongne / socketio", "ratio"], [[k, v] for k, v in ratios.items()]))
    targets_met = {
        "cpu_per_delivery_le_socketio": (
            report["servers"]["dongne"]["median"]["cpu_us_per_delivery"]
            <= report["servers"]["socketio"]["median"]["cpu_us_per_delivery"]
            if "socketio" in report["servers"]
            else None
        ),
        "kb_per_idle_conn_le_12": report["servers"]["dongne"]["median"]["kb_per_conn"] <= 12.0
        if args.idle_clients
        else None,
    }
    report["targets_met"] = targets_met
    print(f"\ntargets: {targets_met}")
    h.write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
