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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._proc import cpu_seconds, raise_nofile, rss_bytes

__all__ = ["BENCH_LIMITS", "DONGNE_READY", "ServerGroup", "ServerProcess", "fresh_postgres_database", "start_dongne"]

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

    # A process is a group of one (ServerGroup's interface), so a bench can take either.

    @property
    def ports(self) -> list[int]:
        return [] if self.port is None else [self.port]

    @property
    def pids(self) -> list[int]:
        return [self.pid]

    def tails(self) -> list[str]:
        return list(self.tail)[-15:]

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
    db_path: Path | str,
    *,
    jwt_secret: str,
    workdir: Path | None = None,
    synchronous: str = "FULL",
    nofile: int = 65536,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    lift_limits: bool = True,
    entry: Sequence[str] = ("-m", "dongne"),
) -> ServerProcess:
    """Start ``python -m dongne serve`` on 127.0.0.1 with free ports and ``db_path``.

    ``db_path`` is a SQLite file or a ``postgresql://`` URL; the server runs
    in ``workdir`` (default: the SQLite file's folder). ``lift_limits`` raises the abuse limits out of the way (``BENCH_LIMITS``);
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
        cwd=workdir if workdir is not None else Path(db_path).parent,  # no stray ./config.toml is picked up
        nofile=nofile,
    )
    server.start(timeout)
    return server


class ServerGroup:
    """Nodes of one deployment (one, or several sharing a PostgreSQL database), sampled as one.

    CPU time and RSS are the nodes' sums; ``ports`` and ``ops_ports`` are in
    start order (clients spread over ``ports`` in turn).
    """

    def __init__(self, nodes: Sequence[ServerProcess]) -> None:
        self.nodes = list(nodes)
        #: Closed after the nodes stop (say, the run's PostgreSQL database, dropped).
        self.resources = contextlib.ExitStack()

    def start_dongne_nodes(self, count: int, db: Path | str, **options: Any) -> None:
        """Start ``count`` more ``start_dongne(db, **options)`` nodes, one after the other (the first of a
        new database leads escalation); if one fails, the whole group is stopped and the error raised."""
        try:
            for _ in range(count):
                self.nodes.append(start_dongne(db, **options))
        except BaseException:
            self.stop()
            raise

    @property
    def port(self) -> int | None:
        """The first node's client port."""
        return self.nodes[0].port if self.nodes else None

    @property
    def pid(self) -> int:
        """The first node's pid."""
        return self.nodes[0].pid

    @property
    def ports(self) -> list[int]:
        return [int(n.match.group(1)) for n in self.nodes if n.match is not None]

    @property
    def ops_ports(self) -> list[int]:
        return [int(n.match.group(2)) for n in self.nodes if n.match is not None]

    @property
    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes]

    def cpu_seconds(self) -> float:
        return sum(n.cpu_seconds() for n in self.nodes)

    def rss_bytes(self) -> int:
        return sum(n.rss_bytes() for n in self.nodes)

    def alive(self) -> bool:
        return all(n.alive() for n in self.nodes)

    def tails(self) -> list[str]:
        """Each node's last stderr lines, labelled."""
        return [f"node {i}: {line}" for i, n in enumerate(self.nodes) for line in list(n.tail)[-15:]]

    def stop(self) -> None:
        try:
            for n in self.nodes:
                n.stop()
        finally:
            self.resources.close()


@contextlib.contextmanager
def fresh_postgres_database(url: str, name: str) -> Iterator[str]:
    """A new database ``name`` on the server of ``url`` (the role needs CREATEDB), dropped afterwards; yields its URL.

    Each bench run starts from an empty database, as each SQLite run starts
    from a new file. The URL keeps everything of ``url`` but the database.
    """
    import psycopg
    from psycopg import conninfo, sql

    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    fresh = _with_database(conninfo.conninfo_to_dict(url), name)
    try:
        yield fresh
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _with_database(params: Mapping[str, object], name: str) -> str:
    """A ``postgresql://`` URL with ``params``' user, password, host and port, for the database ``name``."""
    from urllib.parse import quote, urlencode

    user, password = params.get("user"), params.get("password")
    host, port = params.get("host"), params.get("port")
    netloc = ""
    if user:
        netloc = quote(str(user), safe="") + (":" + quote(str(password), safe="") if password else "") + "@"
    query: dict[str, str] = {}
    if host and not str(host).startswith("/"):
        netloc += str(host) + (f":{port}" if port else "")
    else:
        if host:
            query["host"] = str(host)  # a unix socket directory
        if port:
            query["port"] = str(port)
    return f"postgresql://{netloc}/{quote(name, safe='')}" + (f"?{urlencode(query)}" if query else "")
