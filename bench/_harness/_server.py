"""Server subprocesses: start one, wait for its "listening" line, sample it, stop it.

Every started process is killed at interpreter exit, whatever happens, and
dies with the bench even if the bench is SIGKILLed.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ._proc import cpu_seconds, raise_nofile, rss_bytes

__all__ = ["BENCH_LIMITS", "DONGNE_READY", "ServerProcess", "start_dongne"]

_live: set[subprocess.Popen[bytes]] = set()
_live_lock = threading.Lock()


def _kill_all() -> None:
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


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
        "reads_per_s", "reads_burst", "failed_handshakes_per_ip_per_minute", "unauthenticated_per_ip",
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
    entry: Sequence[str] = ("-m", "dongne"),
) -> ServerProcess:
    """Start ``python -m dongne serve`` on 127.0.0.1 with free ports and ``db_path``.

    ``lift_limits`` raises the abuse limits out of the way (``BENCH_LIMITS``);
    ``False`` keeps the shipped ones. ``entry`` is what the interpreter runs
    (a wrapper script taking dongne's arguments, say). Returns a started
    ``ServerProcess``; ``match.group(2)`` is the ops port.
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
            *entry,
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
