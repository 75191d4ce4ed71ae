"""Load-client processes: many connections on one epoll loop per process, and those processes seen from the bench.

No asyncio or trio per message: raw non-blocking sockets and the sans-I/O
WebSocket parts of ``_websocket``, so the load side stays as cheap as it can be.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import multiprocessing.connection
import os
import select
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from ._proc import cpu_seconds, raise_nofile
from ._websocket import LINGER_RST, handshake_request, split_frames

__all__ = ["AUTH", "CONNECTING", "DEAD", "HANDSHAKE", "READY", "ClientPool", "EpollClients", "LoadConn"]

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
        spec: ``jobs`` (one per connection), ``host``, ``port`` (or ``ports``:
            several nodes, connected to in turn), ``setup_s``,
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
        # Several nodes (``ports``): connections go to them in turn.
        self.ports: list[int] = list(spec.get("ports") or [spec["port"]])
        self.port: int = self.ports[0]
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
        with contextlib.suppress(OSError):
            self.ep.unregister(c.fd)
        c.sock.close()
        self.conns.pop(c.fd, None)

    def close_all(self) -> None:
        for c in list(self.conns.values()):
            with contextlib.suppress(OSError):
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
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
        host, ports = self.host, self.ports
        turn = itertools.cycle(ports)
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
            err = sock.connect_ex((host, next(turn)))
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
            c.sock.send(
                handshake_request(host, c.sock.getpeername()[1], path_of(c) if path_of is not None else self.path)
            )
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
            waiting = [pp for pp, m in zip(self.pipes, out, strict=True) if m is None]
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
            with contextlib.suppress(OSError):
                pipe.send("close")
        deadline = time.monotonic() + 10
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
        for pipe in self.pipes:
            pipe.close()
