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
* ``format_table``, ``write_json``, ``median``.
"""

from __future__ import annotations

import atexit
import base64
import collections
import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BENCH_DIR",
    "REPO_DIR",
    "ServerProcess",
    "start_dongne",
    "raise_nofile",
    "cpu_seconds",
    "rss_bytes",
    "machine_busy_seconds",
    "handshake_request",
    "encode_client_frame",
    "split_frames",
    "BlockingWebSocket",
    "WebSocketClosed",
    "format_table",
    "write_json",
    "median",
    "percentile",
    "OP_TEXT",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
]

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

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
) -> ServerProcess:
    """Start ``python -m dongne serve`` on 127.0.0.1 with free ports and ``db_path``.

    Returns a started ``ServerProcess``; ``match.group(2)`` is the ops port.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("DONGNE_")}
    env["DONGNE_JWT_SECRET"] = jwt_secret
    env["DONGNE_STORE_SYNCHRONOUS"] = synchronous
    # Benches load the server from one address with few users: the abuse
    # limits would measure themselves. Each bench may set its own below.
    env.update(BENCH_LIMITS)
    env["DONGNE_SNAPSHOTS_INTERVAL_S"] = "0"
    env.update(extra_env or {})
    server = ServerProcess(
        "dongne",
        [sys.executable, "-m", "dongne", "serve", "--host", "127.0.0.1", "--port", "0", "--ops-port", "0", "--db", str(db_path)],
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
        pending = b"".join(
            bytes((0x80 | op,)) + _length_prefix(len(payload)) + payload for op, payload in self._frames
        )
        self._frames.clear()
        rest, self._buf = pending + self._buf, b""
        return self.sock, rest

    def close(self) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


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
