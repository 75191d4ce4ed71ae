"""Shared fixtures: a real server on 127.0.0.1 (port 0) with a real SQLite file or PostgreSQL database.

Backends: a test that takes ``db`` (or ``start_server``, ``server``) runs on
SQLite; a module or test marked ``@pytest.mark.backends("sqlite", "postgres")``
runs once on each, PostgreSQL in a throwaway cluster of the session
(``tests/pgcluster.py``) with a fresh database per test.
"""

from __future__ import annotations

import functools
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, closing
from pathlib import Path
from typing import Any

import pytest
import trio

from dongne.app import Running, run_server
from dongne.auth import mint_token
from dongne.client import DongneClient, open_client
from dongne.clock import EngineClock
from dongne.config import Settings, load_settings
from dongne.store import Storage, is_postgres_url, store_for

from .pgcluster import Cluster, find_bindir
from .rawws import RawWebSocket

SECRET = "test-secret-0123456789-0123456789-0123456789"


UNLIMITED = {
    "conn_per_s": 1e6, "conn_burst": 1e6, "writes_per_minute": 1e6, "writes_burst": 1e6,
    "questions_per_hour": 1e6, "questions_burst": 1e6, "typing_per_s": 1e6, "typing_burst": 1e6,
    "reads_per_s": 1e6, "reads_burst": 1e6, "connections_per_ip_per_minute": 1e6,
    "failed_handshakes_per_ip_per_minute": 1e6, "unauthenticated_per_ip": 1_000_000,
}  # fmt: skip


def make_settings(db: Path | str, **sections: dict[str, Any]) -> Settings:
    overrides: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": 0, "ops_host": "127.0.0.1", "ops_port": 0},
        "store": {"url": str(db)} if is_postgres_url(str(db)) else {"path": str(db)},
        "auth": {"jwt_secret": SECRET},
        # Tests drive many requests from one user and one address; the limits
        # are exercised by tests that set them (test_limits.py).
        "limits": dict(UNLIMITED),
        # Periodic snapshots are tested in test_snapshots.py; elsewhere their
        # timer would only make the autojump clock leap an hour.
        "snapshots": {"interval_s": 0.0},
        # The inbox pruner likewise (tests/test_read_paths.py runs it by hand).
        "inbox": {"prune_interval_s": float("inf")},
        # The cluster heartbeat and catch-up likewise (a PostgreSQL node registers once and catches up
        # when its LISTEN connection is made; test_cluster.py and test_delivery.py run them).
        # Positions likewise (test_positions.py writes them).
        "cluster": {
            "heartbeat_interval_s": float("inf"),
            "catch_up_interval_s": float("inf"),
            "positions_interval_s": float("inf"),
        },
        # Questions expire after a day; on the autojump clock that deadline
        # would be the next one while any commit runs (test_read_paths.py sets it).
        "questions": {"ttl_s": float("inf")},
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_settings(None, environ={}, overrides=overrides)


def token(user_id: str, **claims: Any) -> str:
    """A valid token; ``now_s`` defaults to the wall clock."""
    now_s = claims.pop("now_s", time.time())
    return mint_token(SECRET, user_id, now_s=now_s, **claims)


class Harness:
    """A running server plus helpers to connect to it."""

    def __init__(self, running: Running, db: Path | str) -> None:
        self.running = running
        self.db = db  # a SQLite file, or a PostgreSQL URL

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.running.port}"

    def connect(
        self, user_id: str, resume_from: int | None = None, *, timeout: float = 10.0, **claims: Any
    ) -> AbstractAsyncContextManager[DongneClient]:
        return open_client(self.url, token(user_id, **claims), resume_from=resume_from, timeout=timeout)

    async def raw_hello(self, user_id: str) -> RawWebSocket:
        """A bare connection (``rawws``) that said hello as ``user_id``, once the engine holds it as theirs."""
        peer = await RawWebSocket.connect(self.running.port)
        await peer.send({"type": "hello", "id": 1, "data": {"token": token(user_id)}})
        with trio.fail_after(10):
            while not self.running.engine.user_conns.get(user_id):  # noqa: ASYNC110 - the server's hello
                await trio.sleep(0.01)
        return peer


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "dongne.sqlite3"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends(*names): run the test on each store backend named (sqlite, postgres)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A ``backends`` mark runs the test once per backend named, with its name in the test's id."""
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None and "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", marker.args)


@pytest.fixture
def backend() -> str:
    """The store backend of a test with no ``backends`` mark."""
    return "sqlite"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One PostgreSQL cluster for the session, started on first use and removed at the end."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's initdb is not installed (Debian: apt-get install postgresql)")
    cluster = Cluster(bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def db(backend: str, db_path: Path, request: pytest.FixtureRequest) -> Path | str:
    """The test's database: the SQLite file ``db_path``, or a fresh PostgreSQL database's URL."""
    if backend == "postgres":
        cluster: Cluster = request.getfixturevalue("pg_cluster")
        return cluster.create_database()
    return db_path


@pytest.fixture
def store(db: Path | str) -> Iterator[Storage]:
    """The test's database opened as a store (either backend); closed afterwards."""
    opened = store_for(db)
    opened.open()
    yield opened
    opened.close()


def db_rows(db: Path | str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows of one statement (``?`` parameters) run on either backend's database, from the test."""
    if is_postgres_url(str(db)):
        import psycopg

        with psycopg.connect(str(db), autocommit=True) as conn:
            return [tuple(row) for row in conn.execute(sql.replace("?", "%s"), tuple(params)).fetchall()]
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, tuple(params)).fetchall()


@pytest.fixture
def start_server(nursery: trio.Nursery, db: Path | str) -> Callable[..., Any]:
    """``await start_server(**sections)`` starts a server; stop it with ``h.running.stop()``."""

    async def start(clock: EngineClock | None = None, **sections: dict[str, Any]) -> Harness:
        settings = make_settings(db, **sections)
        running: Running = await nursery.start(functools.partial(run_server, settings, clock=clock))
        return Harness(running, db)

    return start


@pytest.fixture
async def server(start_server: Callable[..., Any]) -> AsyncIterator[Harness]:
    harness: Harness = await start_server()
    yield harness
    harness.running.stop()


#: Server settings for tests on an autojump MockClock: over real sockets the
#: clock jumps to the nearest deadline whenever every task waits for I/O, so
#: only the deadlines under test may be finite.
NO_TIMERS = {"hello_timeout_s": math.inf, "ping_interval_s": math.inf, "full_gc_interval_s": math.inf}

JEJU_CITY = {"lat": 33.4996, "lng": 126.5312}


def question_data(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "title": "Where is the best black pork near the port?",
        "body": "Arriving tonight, looking for somewhere open late.",
        "location": dict(JEJU_CITY),
        "hashtags": ["food", "#BlackPork"],
        "urgency": "normal",
    }
    data.update(overrides)
    return data
