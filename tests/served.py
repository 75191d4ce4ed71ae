"""``dongne serve`` as a subprocess, for tests that kill, stop or starve the process itself."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

__all__ = ["LISTENING", "ServedProcess", "serve_process"]

LISTENING = re.compile(rb"clients ws://[^:\s]+:(\d+)\s+ops http://[^:\s]+:(\d+)")


@attrs.define
class ServedProcess:
    proc: trio.Process
    port: int
    ops_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def ops(self, path: str) -> str:
        return f"http://127.0.0.1:{self.ops_port}{path}"


@asynccontextmanager
async def serve_process(
    tmp_path: Path,
    db: Path | str,
    *,
    secret: str,
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    log_name: str = "server.log",
) -> AsyncIterator[ServedProcess]:
    """``dongne serve`` on ``db`` on free ports, once it listens; killed (SIGKILL) on the way out if still running.

    The caller's ``DONGNE_*`` variables are left out (the server reads them as
    settings); ``env`` adds its own. Its log goes to a file in ``tmp_path``: a
    pipe nobody reads would fill up and stall it. A stopped (SIGSTOP) process
    is continued before it is killed.
    """
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DONGNE_")}
    environ.update(env or {}, DONGNE_JWT_SECRET=secret)
    log = tmp_path / log_name
    argv = [sys.executable, "-m", "dongne", "serve", *(["--config", str(config)] if config is not None else [])]
    argv += ["--db", str(db), "--host", "127.0.0.1", "--port", "0", "--ops-port", "0"]
    async with await trio.open_file(log, "wb") as sink:
        proc = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=sink.wrapped, cwd=tmp_path, env=environ
        )
    try:
        with trio.fail_after(30):
            while not (match := LISTENING.search(await trio.Path(log).read_bytes())):
                if proc.poll() is not None:
                    raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
                await trio.sleep(0.02)  # a subprocess's log line: there is no event to wait on
        yield ServedProcess(proc, int(match.group(1)), int(match.group(2)), log)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await proc.wait()
