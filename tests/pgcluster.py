"""A throwaway PostgreSQL cluster for the tests: ``initdb`` into a temp folder, a unix socket, no TCP port.

``initdb`` refuses to run as root: as root (CI, containers) the cluster is
made and run by the ``postgres`` user (Debian's ``postgresql`` package creates
it) through ``runuser``. Durability settings are off (``fsync``): the tests
kill dongne, never the machine, and a killed dongne's commits are in
PostgreSQL's hands either way.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["Cluster", "find_bindir"]


def find_bindir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: ``$DONGNE_PG_BINDIR``, ``pg_config --bindir``, or the newest
    ``/usr/lib/postgresql/*/bin`` (Debian keeps them off ``PATH``)."""
    candidates: list[Path] = []
    if os.environ.get("DONGNE_PG_BINDIR"):
        candidates.append(Path(os.environ["DONGNE_PG_BINDIR"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if found.returncode == 0:
            candidates.append(Path(found.stdout.strip()))

    def version(path: Path) -> int:
        match = re.search(r"/(\d+)/bin$", str(path))
        return int(match.group(1)) if match else 0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for path in candidates:
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
            return path
    return None


class Cluster:
    """A PostgreSQL cluster of its own in a temp folder; :meth:`create_database` hands out fresh databases."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="dongne-pg-"))
        self.data = self.root / "data"
        self._as: list[str] = []
        self._names = itertools.count(1)
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def url(self, database: str) -> str:
        """A libpq URL for ``database`` over the cluster's socket."""
        return f"postgresql:///{database}?host={self.root}&user=postgres"

    def _run(self, *argv: str) -> None:
        done = subprocess.run([*self._as, *argv], capture_output=True, text=True, check=False, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr or done.stdout}")

    def start(self) -> None:
        """Make the cluster and start it."""
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        self.start_server()

    def start_server(self) -> None:
        """Start PostgreSQL (again) on the cluster."""
        options = (
            f"-c listen_addresses='' -c unix_socket_directories={self.root}"
            " -c fsync=off -c full_page_writes=off -c max_connections=200"
        )
        log = str(self.root / "log")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", log, "-w", "-o", options, "start")

    def stop_server(self) -> None:
        """Stop PostgreSQL abruptly (``-m immediate``: every session cut, crash recovery at the next start)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def create_database(self) -> str:
        """A new, empty database; returns its URL."""
        import psycopg

        name = f"test_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop_server()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
