"""Shared helpers for dongne's benches.

Nothing here imports trio: the benches drive servers as subprocesses and talk
to them over plain sockets, so the load side stays as cheap as it can be.

* ``ServerProcess``: start a server subprocess (stderr watched for its
  "listening" line), sample its CPU time and RSS from ``/proc``, stop it.
  Every started process is killed at interpreter exit, whatever happens.
* ``start_dongne``: ``python -m dongne serve`` on 127.0.0.1, free ports, a temp db.
* A minimal WebSocket client layer: ``handshake_request``, ``encode_client_frame``,
  ``split_frames`` (sans-I/O) and ``BlockingWebSocket`` (for the few control
  connections a bench needs).
* Load-client processes: ``EpollClients`` (many connections, one epoll loop,
  in a client process) and ``ClientPool`` (those processes, seen from the bench).
* A bench's scaffolding: ``bench_parser``, ``add_json_option``, ``time_limit``,
  ``report_head``, ``background_cores``.
* ``format_table``, ``write_json``, ``write_report``, ``median``.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import collections
import contextlib
import errno
import json
import multiprocessing.connection
import os
import platform
import re
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

__all__ = [
    "AUTH",
    "BENCH_DIR",
    "CONNECTING",
    "DEAD",
    "HANDSHAKE",
    "LINGER_RST",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "READY",
    "REPO_DIR",
    "BlockingWebSocket",
    "ClientPool",
    "EpollClients",
    "LoadConn",
    "ServerProcess",
    "WebSocketClosed",
    "add_json_option",
    "background_cores",
    "bench_parser",
    "cpu_seconds",
    "encode_client_frame",
    "format_table",
    "handshake_request",
    "machine_busy_seconds",
    "median",
    "percentile",
    "raise_nofile",
    "report_head",
    "rss_bytes",
    "split_frames",
    "start_dongne",
    "time_limit",
    "write_json",
    "write_report",
]

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
LINGER_RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {1, 0}: close with RST, no TIME_WAIT

# ---- resource limits and /proc -------------------------------------------------


def raise_nofile(wanted: int = 1 << 20) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit toward ``wanted``; return the new soft limit.

    The hard limit is raised too when the process may (root); otherwise the soft
    limit stops at the hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    # The command name (field 2) may hold spaces; the fields after ')' do not.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def machine_busy_seconds() -> float:
    """CPU seconds spent not idle, summed over all CPUs, from ``/proc/stat``."""
    with open("/proc/stat", "rb") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """VmRSS of a process from ``/proc/PID/status``."""
    with open(f"/proc/{pid}/status", "rb") as fh:
        for line in fh:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ---- server subprocesses -----------------------------------------------------------

_live: set[subprocess.Popen[bytes]] = set()
_live_lock = threading.Lock()


def _kill_all() -> None:
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass


atexit.register(_kill_all)


def _preexec_nofile(nofile: int) -> Callable[[], None]:
    def preexec() -> None:
        raise_nofile(nofile)
        # Die with the bench even if it is SIGKILLed (Linux prctl PR_SET_PDEATHSIG).
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)
        except Exception:
            pass

    return preexec


class ServerProcess:
    """A server subprocess that logs ``ready_pattern`` on stderr once listening.

    Args:
        name: a label for messages.
        argv: the command.
        ready_pattern: a regex whose first group is the client port.
        env: the environment (default: inherited).
        cwd: the working directory.
        nofile: RLIMIT_NOFILE for the child.

    Resource handling: ``stop`` (or interpreter exit) ends the process; use as
    a context manager.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ready_pattern: str,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        nofile: int = 65536,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.nofile = nofile
        self._pattern = re.compile(ready_pattern)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.match: re.Match[str] | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=200)
        self._ready = threading.Event()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> int:
        """Start the process and wait for its listening line; return the port.

        Raises:
            RuntimeError: the process exited or did not log in time (stderr tail attached).
        """
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.cwd,
            preexec_fn=_preexec_nofile(self.nofile),
        )
        with _live_lock:
            _live.add(self.proc)
        threading.Thread(target=self._pump, name=f"{self.name}-stderr", daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start; stderr tail:\n" + "\n".join(self.tail))
        assert self.match is not None
        self.port = int(self.match.group(1))
        return self.port

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self.tail.append(line)
            if not self._ready.is_set():
                m = self._pattern.search(line)
                if m:
                    self.match = m
                    self._ready.set()

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (graceful), then SIGKILL after ``timeout``."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        with _live_lock:
            _live.discard(proc)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


DONGNE_READY = r"dongne listening: clients ws://[^\s:]+:(\d+)\s+ops http://[^\s:]+:(\d+)"


BENCH_LIMITS: dict[str, str] = {
    f"DONGNE_LIMITS_{key.upper()}": "1000000"
    for key in (
        "conn_per_s", "conn_burst", "writes_per_minute", "writes_burst", "questions_per_hour", "questions_burst",
        "typing_per_s", "typing_burst", "connections_per_ip_per_minute",
    )
}  # fmt: skip


def start_dongne(
    db_path: Path,
    *,
    jwt_secret: str,
    synchronous: str = "FULL",
    nofile: int = 65536,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    lift_limits: bool = True,
) -> ServerProcess:
    """Start ``python -m dongne serve`` on 127.0.0.1 with free ports and ``db_path``.

    ``lift_limits`` raises the abuse limits out of the way (``BENCH_LIMITS``);
    ``False`` keeps the shipped ones. Returns a started ``ServerProcess``;
    ``match.group(2)`` is the ops port.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("DONGNE_")}
    env["DONGNE_JWT_SECRET"] = jwt_secret
    env["DONGNE_STORE_SYNCHRONOUS"] = synchronous
    # Benches load the server from one address with few users: the abuse
    # limits would measure themselves. Each bench may set its own below.
    if lift_limits:
        env.update(BENCH_LIMITS)
    env["DONGNE_SNAPSHOTS_INTERVAL_S"] = "0"
    env.update(extra_env or {})
    server = ServerProcess(
        "dongne",
        [
            sys.executable,
            "-m",
            "dongne",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--ops-port",
            "0",
            "--db",
            str(db_path),
        ],
        ready_pattern=DONGNE_READY,
        env=env,
        cwd=db_path.parent,  # no stray ./config.toml is picked up
        nofile=nofile,
    )
    server.start(timeout)
    return server


# ---- a minimal WebSocket client (RFC 6455), sans-I/O parts ----------------------------


def handshake_request(host: str, port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def encode_client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    if n:
        stream = (key * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return head + key + payload


def _length_prefix(n: int) -> bytes:
    """The (unmasked) payload length field of a frame header."""
    if n < 126:
        return bytes((n,))
    if n < 65536:
        return bytes((126,)) + n.to_bytes(2, "big")
    return bytes((127,)) + n.to_bytes(8, "big")


def split_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Split server frames (unmasked) off the front of ``data``.

    Returns ``([(opcode, payload), ...], rest)``; ``rest`` is an incomplete frame.
    Fragmented messages are not expected from the servers benched here and raise.
    """
    frames: list[tuple[int, bytes]] = []
    pos = 0
    end_all = len(data)
    while end_all - pos >= 2:
        b0 = data[pos]
        length = data[pos + 1] & 0x7F
        head = 2
        if length == 126:
            if end_all - pos < 4:
                break
            length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            head = 4
        elif length == 127:
            if end_all - pos < 10:
                break
            length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            head = 10
        end = pos + head + length
        if end > end_all:
            break
        if not b0 & 0x80:
            raise ValueError("fragmented server message")
        frames.append((b0 & 0x0F, data[pos + head : end]))
        pos = end
    return frames, data[pos:]


class WebSocketClosed(Exception):
    """The server closed the connection (``code`` from its close frame, if any)."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed with code {code}")
        self.code = code


class BlockingWebSocket:
    """A blocking WebSocket client for a bench's control connections (asker, answerer).

    Pings are answered inside ``recv``. Not thread-safe, except that one thread
    may ``recv`` while ``close`` is called from another.
    """

    def __init__(self, host: str, port: int, path: str = "/", *, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(handshake_request(host, port, path))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the WebSocket handshake")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"handshake refused: {head.splitlines()[0]!r}")
        self._buf = rest
        self._frames: collections.deque[tuple[int, bytes]] = collections.deque()
        self._send_lock = threading.Lock()

    def send(self, opcode: int, payload: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(encode_client_frame(opcode, payload))

    def recv(self) -> tuple[int, bytes]:
        """The next data frame ``(opcode, payload)``.

        Raises:
            WebSocketClosed: a close frame or EOF.
        """
        while True:
            while self._frames:
                opcode, payload = self._frames.popleft()
                if opcode == OP_PING:
                    self.send(OP_PONG, payload)
                elif opcode == OP_CLOSE:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                    raise WebSocketClosed(code)
                elif opcode != OP_PONG:
                    return opcode, payload
            chunk = self.sock.recv(262144)
            if not chunk:
                raise WebSocketClosed(None)
            frames, self._buf = split_frames(self._buf + chunk)
            self._frames.extend(frames)

    def detach(self) -> tuple[socket.socket, bytes]:
        """Hand over the socket and the bytes read past the last returned frame (for an event loop).

        Frames already split off but not yet returned by ``recv`` are re-encoded into those bytes.
        """
        pending = b"".join(bytes((0x80 | op,)) + _length_prefix(len(payload)) + payload for op, payload in self._frames)
        self._frames.clear()
        rest, self._buf = pending + self._buf, b""
        return self.sock, rest

    def close(self) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# ---- load-client processes ------------------------------------------------------------

#: The states every load connection goes through; a bench's own set-up steps
#: (hello, join, settings, ...) take the numbers between AUTH and READY.
CONNECTING, HANDSHAKE, AUTH, READY, DEAD = 0, 1, 2, 8, 9


class LoadConn:
    """One connection of an ``EpollClients`` loop; a bench subclasses it, with ``__slots__``, for its own fields."""

    __slots__ = ("buf", "fd", "sock", "state", "user")

    def __init__(self, sock: socket.socket, user: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.user = user
        self.state = CONNECTING
        self.buf = b""


C = TypeVar("C", bound=LoadConn)


class EpollClients(Generic[C]):
    """The connections of one load-client process, set up and read from one epoll loop.

    No asyncio or trio per message: raw non-blocking sockets and the sans-I/O
    WebSocket parts above, so a received frame costs the client a recv and a
    split. The bench says what a connection does through the hooks it gives
    ``run``; the loop keeps at most ``max_connecting`` connects in flight,
    does the WebSocket handshake, reads and splits frames, and talks with the
    parent process:

    * to the parent, ``("ready", ok, failed, errors)`` once every connection
      is set up (the bench calls ``ready``) or failed, or at ``setup_s``;
    * from the parent, ``"close"``: every connection is reset, ``("closed",)``
      is sent and ``run`` returns; any other message goes to ``on_command``.

    Args:
        pipe: the connection to the parent.
        spec: ``jobs`` (one per connection), ``host``, ``port``, ``setup_s``,
            ``life_s``, ``max_connecting``, and ``path`` (default ``/``).
        what: what the connections are, for the set-up timeout message.

    Resource handling: ``run`` returns after ``life_s`` seconds, on
    ``"close"``, or when the parent is gone; every connection is then closed
    with a reset (no TIME_WAIT).
    """

    def __init__(
        self, pipe: multiprocessing.connection.Connection, spec: Mapping[str, Any], *, what: str = "connections"
    ) -> None:
        raise_nofile(len(spec["jobs"]) + 1024)
        self.pipe = pipe
        self.host: str = spec["host"]
        self.port: int = spec["port"]
        self.path: str = spec.get("path", "/")
        self.what = what
        self.life_end = time.monotonic() + spec["life_s"]
        self.setup_end = time.monotonic() + spec["setup_s"]
        self.max_connecting: int = spec["max_connecting"]
        self.jobs = list(reversed(spec["jobs"]))
        self.total = len(self.jobs)
        self.ep = select.epoll()
        self.conns: dict[int, C] = {}
        self.connecting = 0
        self.n_ready = 0
        self.n_failed = 0
        self.dead_after_ready = 0
        self.ready_sent = False
        self.bytes_in = 0
        self.errors: list[str] = []
        self.closes: collections.Counter[str] = collections.Counter()
        #: How long one turn of the loop waits for events; a bench that paces its own sends lowers it.
        self.poll_s = 0.2

    def ready(self, c: C) -> None:
        """``c`` is set up (authenticated, joined, ...)."""
        c.state = READY
        self.n_ready += 1

    def fail(self, c: C, why: str, code: str) -> None:
        """Close ``c`` and count it: failed during set-up, or dead after it was ready; ``code`` counts in ``closes``."""
        if c.state == DEAD:
            return
        if c.state == READY:
            self.dead_after_ready += 1
        else:
            self.n_failed += 1
            if c.state <= HANDSHAKE:
                self.connecting -= 1
        self.closes[code] += 1
        if len(self.errors) < 5:
            self.errors.append(f"{c.user}: {why}")
        c.state = DEAD
        try:
            self.ep.unregister(c.fd)
        except OSError:
            pass
        c.sock.close()
        self.conns.pop(c.fd, None)

    def close_all(self) -> None:
        for c in list(self.conns.values()):
            try:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            except OSError:
                pass
            c.sock.close()
        self.conns.clear()

    def run(
        self,
        *,
        new_conn: Callable[[socket.socket, Any], C],
        on_upgraded: Callable[[C], None],
        on_frame: Callable[[C, int, bytes, float], None],
        tick: Callable[[], None] | None = None,
        on_command: Callable[[Any], None] | None = None,
        path_of: Callable[[C], str] | None = None,
    ) -> None:
        """Connect every job and serve the connections until told to close.

        Args:
            new_conn: ``(sock, job)``: the connection for a job (not yet connected).
            on_upgraded: the WebSocket is open (state ``AUTH``): send the first request.
            on_frame: ``(c, opcode, payload, now)`` for every frame, ``now`` being
                ``time.time()`` when its bytes were received.
            tick: called once every turn of the loop (every ``poll_s`` at most).
            on_command: a message from the parent other than ``"close"``.
            path_of: the request path for a connection (default ``spec["path"]``).
        """
        pipe, ep, conns = self.pipe, self.ep, self.conns
        host, port = self.host, self.port
        fail = self.fail
        split = split_frames
        now_fn = time.time

        def start_connect(job: Any) -> None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = new_conn(sock, job)
            self.connecting += 1
            conns[c.fd] = c
            err = sock.connect_ex((host, port))
            if err not in (0, errno.EINPROGRESS):
                ep.register(c.fd, 0)
                fail(c, f"connect: {os.strerror(err)}", "connect")
                return
            ep.register(c.fd, select.EPOLLOUT)

        def on_connected(c: C) -> None:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                fail(c, f"connect: {os.strerror(err)}", "connect")
                return
            c.sock.send(handshake_request(host, port, path_of(c) if path_of is not None else self.path))
            c.state = HANDSHAKE
            ep.modify(c.fd, select.EPOLLIN)

        def on_readable(c: C) -> None:
            try:
                data = c.sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                fail(c, f"recv: {exc}", "recv_error")
                return
            now = now_fn()
            if not data:
                fail(c, "EOF", "eof")
                return
            self.bytes_in += len(data)
            if c.state == HANDSHAKE:
                data = c.buf + data
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    c.buf = data
                    return
                if not data.startswith(b"HTTP/1.1 101"):
                    fail(c, f"handshake: {data[:60]!r}", "handshake")
                    return
                c.buf = b""
                data = data[end + 4 :]
                self.connecting -= 1
                c.state = AUTH
                on_upgraded(c)
                if not data:
                    return
            elif c.buf:
                data = c.buf + data
            frames, c.buf = split(data)
            for opcode, payload in frames:
                if c.state == DEAD:
                    return
                on_frame(c, opcode, payload, now)

        pipe_fd = pipe.fileno()
        ep.register(pipe_fd, select.EPOLLIN)
        try:
            while time.monotonic() < self.life_end:
                while self.jobs and self.connecting < self.max_connecting and time.monotonic() < self.setup_end:
                    start_connect(self.jobs.pop())
                if not self.ready_sent:
                    if self.n_ready + self.n_failed == self.total:
                        pipe.send(("ready", self.n_ready, self.n_failed, self.errors))
                        self.ready_sent = True
                    elif time.monotonic() > self.setup_end:
                        self.errors.append(
                            f"setup timed out: {self.total - self.n_ready - self.n_failed} {self.what} not ready"
                        )
                        pipe.send(("ready", self.n_ready, self.total - self.n_ready, self.errors))
                        self.ready_sent = True
                if tick is not None:
                    tick()
                for fd, mask in ep.poll(self.poll_s):
                    if fd == pipe_fd:
                        command = pipe.recv()
                        if command == "close":
                            self.close_all()
                            pipe.send(("closed",))
                            return
                        if on_command is not None:
                            on_command(command)
                        continue
                    c = conns.get(fd)
                    if c is None:
                        continue
                    if c.state == CONNECTING:
                        on_connected(c)
                    elif mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        on_readable(c)
        except (BrokenPipeError, EOFError, KeyboardInterrupt):
            pass
        finally:
            self.close_all()


class ClientPool:
    """Load-client processes, each running ``worker(pipe, spec)`` over its share of the jobs.

    Args:
        ctx: a multiprocessing context (the benches use spawn).
        worker: a module-level function ``(pipe, spec)``, typically running ``EpollClients``.
        procs: how many processes (at most one per job).
        jobs: dealt round-robin: process *i* gets ``jobs[i::procs]`` as ``spec["jobs"]``.
        spec: the rest of every process's spec.
        name: the processes are named ``f"{name}-{i}"``.
        per_process: extra spec entries for process *i*.

    Resource handling: ``close`` asks every process to close, kills those
    still running 10 s later, and closes the pipes.
    """

    def __init__(
        self,
        ctx: Any,
        worker: Callable[[multiprocessing.connection.Connection, dict[str, Any]], None],
        procs: int,
        jobs: Sequence[Any],
        spec: Mapping[str, Any],
        *,
        name: str = "client",
        per_process: Callable[[int], Mapping[str, Any]] | None = None,
    ) -> None:
        self.procs: list[Any] = []
        self.pipes: list[multiprocessing.connection.Connection] = []
        procs = max(1, min(procs, len(jobs)))
        for i in range(procs):
            parent, child = ctx.Pipe()
            own = {**spec, "jobs": jobs[i::procs], **(per_process(i) if per_process is not None else {})}
            p = ctx.Process(target=worker, args=(child, own), daemon=True, name=f"{name}-{i}")
            p.start()
            child.close()
            self.procs.append(p)
            self.pipes.append(parent)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def cpu_seconds(self) -> float:
        """utime + stime of all the processes."""
        return sum(cpu_seconds(pid) for pid in self.pids)

    def broadcast(self, command: Any) -> None:
        for pipe in self.pipes:
            pipe.send(command)

    def wait_all(self, kind: str, timeout: float) -> list[tuple[Any, ...] | None]:
        """The next message of ``kind`` from every process (``None`` for those that timed out).

        Raises:
            RuntimeError: a process died.
        """
        deadline = time.monotonic() + timeout
        out: list[tuple[Any, ...] | None] = [None] * len(self.pipes)
        while any(m is None for m in out):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            waiting = [pp for pp, m in zip(self.pipes, out) if m is None]
            for ready in multiprocessing.connection.wait(waiting, timeout=min(remaining, 1.0)):
                i = self.pipes.index(ready)  # type: ignore[arg-type]
                try:
                    msg: tuple[Any, ...] = self.pipes[i].recv()
                except EOFError:
                    raise RuntimeError(f"client process {i} died") from None
                if msg[0] == kind:
                    out[i] = msg
            for i, p in enumerate(self.procs):
                if out[i] is None and not p.is_alive() and not self.pipes[i].poll():
                    raise RuntimeError(f"client process {i} exited with {p.exitcode}")
        return out

    def wait_ready(self, wanted: int, what: str, timeout: float) -> int:
        """Wait for every process's ``("ready", ok, failed, errors)``; return how many connections are ready.

        Raises:
            RuntimeError: fewer than ``wanted`` are ready, or a process did not report within ``timeout``.
        """
        msgs = self.wait_all("ready", timeout)
        ok: int = sum(m[1] for m in msgs if m is not None)
        errors = [e for m in msgs if m is not None for e in m[3]]
        if ok < wanted or any(m is None for m in msgs):
            raise RuntimeError(f"only {ok} of {wanted} {what} ready; errors: {errors[:5]}")
        return ok

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send("close")
            except OSError:
                pass
        deadline = time.monotonic() + 10
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
        for pipe in self.pipes:
            pipe.close()


# ---- a bench's scaffolding -------------------------------------------------------------


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of a bench's docstring."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_json_option(parser: argparse.ArgumentParser, bench: str) -> None:
    """``--json PATH``, by default ``bench/results/<bench>.json``."""
    parser.add_argument(
        "--json",
        default=str(BENCH_DIR / "results" / f"{bench}.json"),
        metavar="PATH",
        help="where to write the results",
    )


def _on_alarm(signum: int, frame: Any) -> None:
    raise TimeoutError("the bench exceeded --timeout")


def _on_term(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Bound the block by ``seconds``: SIGALRM then raises ``TimeoutError`` in the main thread.

    SIGTERM raises ``SystemExit(128 + 15)`` from here on, so that a killed bench
    still unwinds its ``finally`` blocks and stops its subprocesses.
    """
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGTERM, _on_term)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)


def report_head(bench: str, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The first keys of a bench's JSON report: name, time, machine, ``extra``, and the options (``--json`` aside)."""
    return {
        "bench": bench,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        **extra,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
    }


def background_cores(pids: Iterable[int], seconds: float = 1.0) -> float:
    """CPU cores busy with other work (not ``pids``, not this process) over ``seconds``."""
    ours = [*pids, os.getpid()]
    busy0, own0 = machine_busy_seconds(), sum(cpu_seconds(p) for p in ours)
    time.sleep(seconds)
    busy1, own1 = machine_busy_seconds(), sum(cpu_seconds(p) for p in ours)
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / seconds


# ---- results -------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (``q`` in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table, right-aligned numbers."""
    text_rows = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for row in text_rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(out)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON, creating the parent directory."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return target


def write_report(path: str | os.PathLike[str], report: Any) -> Path:
    """``write_json``, then ``wrote PATH`` on stdout: a bench's last word."""
    target = write_json(path, report)
    print(f"wrote {target}")
    return target
