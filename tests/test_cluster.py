"""Groundwork for several nodes on one PostgreSQL database (store/CLUSTER.md): membership, the escalation
lease and its guarded commits, LISTEN/NOTIFY across connections, push job ids in blocks."""

from __future__ import annotations

import concurrent.futures
import functools
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
import trio

from dongne.admin import COOKIE_NAME
from dongne.cluster import Listener, Membership, backoff
from dongne.core.effects import AddPoints, AppendEvent, SaveUser
from dongne.core.records import User
from dongne.store import LeaseLost, SeqConflict, Storage, WriteFailed, store_for
from dongne.store._pg_schema import PG_MIGRATIONS

from .conftest import SECRET, Harness, db_rows, token
from .served import serve_process

BLOCK = 1 << 32


@pytest.fixture
def link(store: Storage, db: str) -> Iterator[object]:
    """A ClusterLink to the database the open ``store`` made."""
    from dongne.store._cluster import ClusterLink

    made = ClusterLink(db)
    yield made
    made.close()


@pytest.fixture
def peer_link(db: str) -> Iterator[object]:
    """A ClusterLink to a database a ``dongne serve`` will make (no store of the test's own holds it)."""
    from dongne.store._cluster import ClusterLink

    made = ClusterLink(db)
    yield made
    made.close()


def event(user: str, seq: int) -> AppendEvent:
    return AppendEvent(user, seq, "answer_notification", {"n": seq}, 1000 + seq)


# ---- membership ---------------------------------------------------------------------


@pytest.mark.backends("postgres")
def test_nodes_register_heartbeat_and_expire(link: object, db: str) -> None:
    """A node silent for the ttl is removed by a peer's heartbeat, and comes back with its own next one."""
    clock = {"a": 1_000, "b": 2_000}
    a = Membership(link, ttl_s=10.0, now_ms=lambda: clock["a"], node_id="a")  # type: ignore[arg-type]
    b = Membership(link, ttl_s=10.0, now_ms=lambda: clock["b"], node_id="b")  # type: ignore[arg-type]
    a.beat()
    b.beat()
    a.beat()
    assert [n["node_id"] for n in a.state()["nodes"]] == ["a", "b"]
    assert [n["self"] for n in a.state()["nodes"]] == [True, False]

    clock["a"] = 12_000  # b's heartbeat (2,000) is exactly 10 s old: still listed
    a.beat()
    assert a.gauges()["cluster_nodes"] == 2
    clock["a"] = 12_001
    a.beat()
    assert a.gauges()["cluster_nodes"] == 1
    assert db_rows(db, "SELECT node_id, heartbeat_at FROM cluster_nodes") == [("a", 12_001)]

    clock["b"] = 12_500
    b.beat()
    assert [(n["node_id"], n["heartbeat_at"]) for n in b.state()["nodes"]] == [("a", 12_001), ("b", 12_500)]


def refuse_deletes(db: str, table: str | None) -> None:
    """Make PostgreSQL refuse every DELETE on ``table`` (None: no longer), as a failing statement would."""
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DROP TRIGGER IF EXISTS refuse ON cluster_nodes; DROP TRIGGER IF EXISTS refuse ON positions")
        if table is not None:
            conn.execute(
                "CREATE OR REPLACE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"
            )
            conn.execute(f"CREATE TRIGGER refuse BEFORE DELETE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION refuse()")


@pytest.mark.backends("postgres")
async def test_a_heartbeat_failing_part_way_loses_neither_a_registration_nor_a_drop(link: object, db: str) -> None:
    """A beat's statements commit one by one. The expiry of a and d commits and the drop of their rows fails:
    the next beat drops them (no later beat would see a or d expire again). a's next beat makes its row again
    and its expiry fails: ``on_registered`` runs all the same (the next beat's row was there already, and
    the re-made row's news was lost: a never wrote back the rows its peers deleted)."""
    from dongne.store import StoreError

    clock = {"a": 1_000, "b": 1_000, "d": 1_000}
    registered: list[str] = []
    a, b, d = (
        Membership(
            link, ttl_s=10.0, now_ms=lambda n=n: clock[n], node_id=n, on_registered=lambda n=n: registered.append(n)
        )  # type: ignore[arg-type, misc]
        for n in "abd"
    )
    for node in (a, b, d):
        await node.beat_async()
    rows = [(f"u-{n}", 33.5, 126.5, 1_000, n) for n in "abd"]
    with psycopg.connect(db, autocommit=True) as conn:
        conn.cursor().executemany(
            "INSERT INTO positions (user_id, lat, lng, at, node_id) VALUES (%s, %s, %s, %s, %s)", rows
        )
    positions = "SELECT node_id FROM positions ORDER BY 1"

    clock["b"] = 12_000
    refuse_deletes(db, "positions")
    with pytest.raises(StoreError):
        await b.beat_async()
    refuse_deletes(db, None)
    assert db_rows(db, "SELECT node_id FROM cluster_nodes") == [("b",)]
    clock["b"] = 12_100
    await b.beat_async()
    assert db_rows(db, positions) == [("b",)]

    clock["a"] = 12_200
    refuse_deletes(db, "cluster_nodes")
    with pytest.raises(StoreError):
        await a.beat_async()
    refuse_deletes(db, None)
    clock["a"] = 12_300
    await a.beat_async()

    assert registered == ["a", "b", "d", "a"]
    assert db_rows(db, "SELECT node_id FROM cluster_nodes ORDER BY 1") == [("a",), ("b",)]


@pytest.mark.backends("postgres")
def test_a_peer_takes_the_escalation_lease_once_the_leader_stops_heartbeating(link: object, db: str) -> None:
    """The first node to heartbeat leads; a peer's heartbeat takes over a ttl after the leader's last one."""
    clock = {"a": 1_000, "b": 2_000}
    a = Membership(link, ttl_s=10.0, now_ms=lambda: clock["a"], node_id="a")  # type: ignore[arg-type]
    b = Membership(link, ttl_s=10.0, now_ms=lambda: clock["b"], node_id="b")  # type: ignore[arg-type]
    a.beat()
    b.beat()
    assert (a.lease_epoch, b.lease_epoch) == (1, None)
    assert (a.gauges()["escalation_lease_held"], b.gauges()["escalation_lease_held"]) == (1, 0)

    clock["b"] = 10_999  # a's lease (renewed at 1,000) runs until 11,000
    b.beat()
    assert b.lease_epoch is None
    clock["b"] = 11_000
    b.beat()
    assert b.lease_epoch == 2 and b.state()["lease"] == {"holder": "b", "epoch": 2, "expires_at": 21_000}

    clock["a"] = 11_500  # a wakes up: it learns it lost the lease
    a.beat()
    assert a.lease_epoch is None and a.gauges()["escalation_lease_held"] == 0
    b._leave()  # a graceful stop hands the lease on at once
    clock["a"] = 11_600
    a.beat()
    assert a.lease_epoch == 3
    assert db_rows(db, "SELECT node_id FROM cluster_nodes") == [("a",)]


def test_sqlite_is_a_cluster_of_one() -> None:
    """Without a shared database the node lists itself, and nothing else."""
    alone = Membership(None, now_ms=lambda: 5, node_id="solo")
    alone.beat()

    assert alone.state() == {
        "node_id": "solo",
        "shared": False,
        "nodes": [
            {"node_id": "solo", "host": alone.host, "pid": alone.pid, "started_at": 5, "heartbeat_at": 5, "self": True}
        ],
        "lease": None,
    }
    assert alone.gauges() == {"cluster_nodes": 1, "escalation_lease_held": 1}


@pytest.mark.backends("sqlite", "postgres")
async def test_a_running_node_shows_itself_on_admin_and_metrics(server: Harness, backend: str) -> None:
    """/metrics says how many nodes there are; /admin's state names this node; on PostgreSQL its row goes at stop."""
    async with httpx.AsyncClient() as http:
        ops = f"http://127.0.0.1:{server.running.ops_port}"
        metrics = (await http.get(f"{ops}/metrics")).text
        state = (
            await http.get(f"{ops}/admin/api/state", headers={"cookie": f"{COOKIE_NAME}={token('boss', admin=True)}"})
        ).json()

    assert "dongne_cluster_nodes 1.0" in metrics and "dongne_escalation_lease_held 1.0" in metrics
    cluster = state["cluster"]
    [me] = cluster["nodes"]
    assert me["self"] and me["node_id"] == cluster["node_id"] and cluster["shared"] == (backend == "postgres")
    if backend == "postgres":
        assert db_rows(server.db, "SELECT node_id FROM cluster_nodes") == [(cluster["node_id"],)]
        assert cluster["lease"]["holder"] == cluster["node_id"]
        await server.running.aclose()
        assert db_rows(server.db, "SELECT node_id FROM cluster_nodes") == []
        assert db_rows(server.db, "SELECT holder FROM escalation_lease") == [(None,)]


# ---- the escalation lease ---------------------------------------------------------------


@pytest.mark.backends("postgres")
def test_the_lease_is_taken_renewed_stolen_after_expiry_and_released(link: object) -> None:
    from dongne.store._cluster import ClusterLink, Lease

    assert isinstance(link, ClusterLink)
    assert link.lease() == Lease("escalation", None, 0, 0)
    assert link.acquire_lease("a", 1_000, 500) == Lease("escalation", "a", 1, 1_500)
    assert link.acquire_lease("b", 1_499, 500) is None  # not yet expired
    assert link.acquire_lease("a", 1_400, 500) == Lease("escalation", "a", 1, 1_900)  # renewed: same epoch
    assert link.acquire_lease("b", 1_900, 500) == Lease("escalation", "b", 2, 2_400)  # expired: stolen
    assert link.acquire_lease("a", 2_000, 500) is None
    assert not link.release_lease("a", 1)  # no longer a's
    assert link.release_lease("b", 2)
    assert link.acquire_lease("a", 2_001, 500) == Lease("escalation", "a", 3, 2_501)  # free: a new epoch
    assert link.lease().held_by("a", 2_500) and not link.lease().held_by("a", 2_501)


@pytest.mark.backends("postgres")
def test_a_paused_holders_late_commit_is_refused_and_writes_nothing(store: Storage, link: object, db: str) -> None:
    """The holder commits under its epoch; once another node took the expired lease, its next commit fails whole."""
    from dongne.store._cluster import ClusterLink

    assert isinstance(link, ClusterLink)
    held = link.acquire_lease("leader", 1_000, 5_000)
    assert held is not None
    user = User("u1", "u1", local=True, created_at=1)
    on_time = store.prepare([SaveUser(user), event("u1", 1)])
    on_time.guard_lease(held.epoch)
    store.commit(on_time)

    # The leader pauses past its lease; another node takes it.
    assert link.acquire_lease("other", 6_000, 5_000) is not None
    late = store.prepare([event("u1", 2), event("u2", 1)])
    late.guard_lease(held.epoch)
    with pytest.raises(LeaseLost, match="lease escalation lost"):
        store.commit(late)

    assert isinstance(LeaseLost("x"), WriteFailed)
    assert db_rows(db, "SELECT user_id, seq FROM events ORDER BY user_id, seq") == [("u1", 1)]
    assert db_rows(db, "SELECT user_id, last_seq FROM inbox_heads") == [("u1", 1)]
    store.apply([event("u1", 2)])  # the writer is fine: only the guarded commit was refused
    assert db_rows(db, "SELECT max(seq) FROM events") == [(2,)]


@pytest.mark.backends("postgres")
def test_a_commit_numbers_each_users_events_on_from_the_inbox_head(store: Storage, db: str) -> None:
    """Another writer appended to u1 first: the commit is not refused; u1's events are numbered on from the
    head, in the engine's order, and the commit says which seqs it gave; users whose head was where the
    engine thought keep the engine's seqs and are not listed."""
    assert store.apply([event("u1", 1), event("u1", 2), event("u2", 1)]) == {}
    # Another node's commit: u1's events 3 and 4.
    db_rows(db, "INSERT INTO events VALUES ('u1', 3, 'x', '\\x80', 1), ('u1', 4, 'x', '\\x80', 1) RETURNING 1")
    db_rows(db, "UPDATE inbox_heads SET last_seq = 4 WHERE user_id = 'u1' RETURNING 1")

    given = store.apply([event("u2", 2), event("u1", 3), event("u1", 7), event("u9", 1)])

    assert given == {"u1": {3: 5, 7: 6}}  # not contiguous in memory (a head moved there): gap-free here
    assert db_rows(db, "SELECT user_id, seq, data FROM events ORDER BY user_id, seq") == [
        ("u1", 1, b"\x81\xa1n\x01"),
        ("u1", 2, b"\x81\xa1n\x02"),
        ("u1", 3, b"\x80"),
        ("u1", 4, b"\x80"),
        ("u1", 5, b"\x81\xa1n\x03"),
        ("u1", 6, b"\x81\xa1n\x07"),
        ("u2", 1, b"\x81\xa1n\x01"),
        ("u2", 2, b"\x81\xa1n\x02"),
        ("u9", 1, b"\x81\xa1n\x01"),
    ]
    assert db_rows(db, "SELECT user_id, last_seq FROM inbox_heads ORDER BY user_id") == [
        ("u1", 6),
        ("u2", 2),
        ("u9", 1),
    ]


@pytest.mark.backends("postgres")
def test_writers_racing_on_the_same_inboxes_never_refuse_deadlock_or_leave_a_gap(store: Storage, db: str) -> None:
    """Two stores (two nodes' writers) commit to overlapping users at once, each numbering from its own stale
    memory: every commit succeeds and each user's seqs are 1..n."""
    other = store_for(db)
    other.open()
    users = [f"u{i}" for i in range(8)]
    commits = 40

    def write(writer: Storage, offset: int) -> int:
        renumbered = 0
        for n in range(commits):
            chosen = [users[(n * 3 + offset + k) % len(users)] for k in range(4)]
            given = writer.apply([event(u, n + 1) for u in (chosen if offset else reversed(chosen))])
            renumbered += len(given)
        return renumbered

    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(write, (store, other), (0, 1)))
    finally:
        other.close()
    rows = db_rows(db, "SELECT user_id, array_agg(seq ORDER BY seq) FROM events GROUP BY user_id")
    assert sum(len(seqs) for _, seqs in rows) == 2 * commits * 4
    assert all(seqs == list(range(1, len(seqs) + 1)) for _, seqs in rows)
    assert dict(db_rows(db, "SELECT user_id, last_seq FROM inbox_heads")) == {u: len(s) for u, s in rows}
    assert sum(results) > 0  # both wrote to the same inboxes: the engines' seqs were not the stored ones


@pytest.mark.backends("postgres")
def test_writers_saving_and_pointing_the_same_users_crosswise_do_not_deadlock(store: Storage, db: str) -> None:
    """One node saves alice and adds points to bob while another saves bob and adds to alice, over and
    over: users' rows are locked in one order per commit, so neither is refused and every point counts."""
    other = store_for(db)
    other.open()
    store.apply([SaveUser(User("alice", "Alice")), SaveUser(User("bob", "Bob"))])
    rounds = 150

    def write(writer: Storage, saved: str, pointed: str) -> None:
        for _ in range(rounds):
            writer.apply([SaveUser(User(saved, saved.title())), AddPoints(pointed, 1)])

    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            done = [pool.submit(write, store, "alice", "bob"), pool.submit(write, other, "bob", "alice")]
            for future in done:
                future.result()  # a deadlock would be a WriteFailed here
    finally:
        other.close()
    assert db_rows(db, "SELECT user_id, points FROM users ORDER BY user_id") == [("alice", rounds), ("bob", rounds)]


@pytest.mark.backends("postgres")
def test_a_seq_stored_by_a_writer_that_did_not_move_the_head_is_a_seq_conflict(store: Storage, db: str) -> None:
    """Only a writer that bypasses the heads (a bug, or a hand-made row) can make a commit reuse a seq: it
    is refused whole, as a ``SeqConflict``."""
    store.apply([event("u1", 1)])
    db_rows(db, "INSERT INTO events VALUES ('u1', 2, 'x', '\\x80', 1) RETURNING 1")

    with pytest.raises(SeqConflict):
        store.apply([event("u2", 1), event("u1", 2)])
    assert db_rows(db, "SELECT user_id, last_seq FROM inbox_heads ORDER BY user_id") == [("u1", 1)]


def test_sqlite_commits_carry_no_lease_and_no_notification(tmp_path: Path) -> None:
    store = store_for(tmp_path / "x.sqlite3")
    batch = store.prepare([event("u1", 1)])

    with pytest.raises(TypeError):
        batch.guard_lease(1)
    with pytest.raises(TypeError):
        batch.notify("dongne_events", "u1:1")


# ---- LISTEN / NOTIFY --------------------------------------------------------------------


class Heard:
    """What a Listener handed on, with a way to wait for it."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self.connected = 0
        self._changed = trio.Event()

    def notify(self, channel: str, payload: str) -> None:
        self.items.append((channel, payload))
        self._changed.set()

    def on_connected(self) -> None:
        self.connected += 1
        self._changed.set()

    async def wait_for(self, condition: object) -> None:
        with trio.fail_after(10):
            while not condition():  # type: ignore[operator]
                self._changed = trio.Event()
                await self._changed.wait()


def listener_for(db: str, heard: Heard) -> Listener:
    from dongne.store._cluster import connect_listener

    return Listener(
        functools.partial(connect_listener, db, ("dongne_events",)), heard.notify, heard.on_connected, rand=lambda: 0.0
    )


@pytest.mark.backends("postgres")
async def test_a_commits_notification_reaches_a_listener_only_if_it_commits(store: Storage, db: str) -> None:
    heard = Heard()
    listener = listener_for(db, heard)
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.run)
        first = store.prepare([event("u1", 1)])
        first.notify("dongne_events", "u1:1")
        await trio.to_thread.run_sync(store.commit, first)
        refused = store.prepare([event("u1", 2)])
        refused.guard_lease(999)  # an escalation lease never held: the commit fails
        refused.notify("dongne_events", "u1:2 refused")
        with pytest.raises(WriteFailed):
            await trio.to_thread.run_sync(store.commit, refused)
        second = store.prepare([event("u1", 2)])
        second.notify("dongne_events", "u1:2")
        await trio.to_thread.run_sync(store.commit, second)
        await heard.wait_for(lambda: len(heard.items) >= 2)
        nursery.cancel_scope.cancel()

    assert heard.items == [("dongne_events", "u1:1"), ("dongne_events", "u1:2")]
    with pytest.raises(ValueError):
        store.prepare([]).notify("dongne_events", "x" * 8000)


@pytest.mark.backends("postgres")
async def test_a_terminated_listen_connection_comes_back(store: Storage, db: str) -> None:
    """pg_terminate_backend cuts the LISTEN session; the listener connects again and says so."""
    heard = Heard()
    listener = listener_for(db, heard)
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.run)
        first_pid = listener.backend_pid
        assert db_rows(db, "SELECT pg_terminate_backend(?)", (first_pid,)) == [(True,)]
        await heard.wait_for(lambda: heard.connected == 2 and listener.backend_pid is not None)
        batch = store.prepare([event("u1", 1)])
        batch.notify("dongne_events", "after")
        await trio.to_thread.run_sync(store.commit, batch)
        await heard.wait_for(lambda: heard.items)
        nursery.cancel_scope.cancel()

    assert listener.connections == 2 and listener.backend_pid != first_pid
    assert heard.items == [("dongne_events", "after")]


@pytest.mark.backends("postgres")
async def test_a_commit_announces_its_users_new_inbox_heads(store: Storage, db: str) -> None:
    """With ``news_from`` set, a commit that appends events says whose inbox grew, and to which seq."""
    from dongne.store._writes import EVENTS_CHANNEL, read_inbox_news

    heard = Heard()
    listener = listener_for(db, heard)
    store.news_from = "node-a"  # type: ignore[attr-defined]  # PostgreSQL only
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.run)
        await trio.to_thread.run_sync(store.apply, [event("u1", 1), event("u2", 1), event("u1", 2)])
        await trio.to_thread.run_sync(store.apply, [SaveUser(User("u3", "u3"))])  # no events: no news
        await trio.to_thread.run_sync(store.apply, [event("u3", 1)])
        await heard.wait_for(lambda: len(heard.items) >= 2)
        nursery.cancel_scope.cancel()

    assert [channel for channel, _ in heard.items] == [EVENTS_CHANNEL] * 2
    assert [read_inbox_news(payload) for _, payload in heard.items] == [
        ("node-a", {"u1": 2, "u2": 1}),
        ("node-a", {"u3": 1}),
    ]


@pytest.mark.backends("postgres")
async def test_a_commits_announcement_of_many_heads_is_split_under_the_payload_limit(store: Storage, db: str) -> None:
    """A commit appending to 1,000 users with long ids (non-ASCII, or escaped in JSON) announces their heads in several
    notifications, each under PostgreSQL's payload limit and well filled; together they name every head."""
    from dongne.store._writes import NOTIFY_PAYLOAD_LIMIT, read_inbox_news

    # Ids as long as a token may make them, some with what JSON escapes (a quote, a control character).
    heads = {f"user-{i:04d}-{'한' * 20 if i % 2 else chr(34) + chr(1) * 25}": 1 + i % 3 for i in range(1000)}
    heard = Heard()
    listener = listener_for(db, heard)
    store.news_from = "node-a"  # type: ignore[attr-defined]  # PostgreSQL only
    writes = [event(user, seq) for user, head in heads.items() for seq in range(1, head + 1)]
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.run)
        await trio.to_thread.run_sync(store.apply, writes)
        merged: dict[str, int] = {}

        def merge() -> bool:
            merged.clear()
            for _, payload in heard.items:
                merged.update(read_inbox_news(payload)[1])
            return len(merged) == len(heads)

        await heard.wait_for(merge)
        nursery.cancel_scope.cancel()

    payloads = [payload.encode() for _, payload in heard.items]
    assert merged == heads
    assert len(payloads) > 1 and all(len(p) < NOTIFY_PAYLOAD_LIMIT for p in payloads)
    assert max(len(p) for p in payloads) > NOTIFY_PAYLOAD_LIMIT // 2  # packed, not one per user
    with pytest.raises(ValueError):
        read_inbox_news("u1:2")


def test_reconnects_back_off_with_full_jitter_and_a_cap() -> None:
    assert [backoff(n, lambda: 1.0) for n in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert backoff(100, lambda: 0.5) == 2.5
    assert backoff(3, lambda: 0.0) == 0.0


# ---- push job ids -----------------------------------------------------------------------


@pytest.mark.backends("postgres")
def test_each_load_takes_a_fresh_block_of_push_job_ids(store: Storage) -> None:
    first = store.load(hot_since=0).last_push_job_id
    second = store.load(hot_since=0).last_push_job_id

    assert first % BLOCK == 0 and second % BLOCK == 0
    assert second >= first + BLOCK


@pytest.mark.backends("postgres")
def test_push_job_blocks_start_above_the_ids_given_before_the_migration(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE dongne_schema (version integer NOT NULL)")
        conn.execute("INSERT INTO dongne_schema VALUES (1)")
        conn.execute(PG_MIGRATIONS[0].encode())
        conn.execute(
            "INSERT INTO push_outbox VALUES (%s, 'u', 'k', 0, '\\x80', 'pending', 0, NULL, 1, 1)", (3 * BLOCK + 5,)
        )
    store = store_for(db)
    store.open()  # migration 2
    try:
        loaded = store.load(hot_since=0)
    finally:
        store.close()

    assert loaded.last_push_job_id == 4 * BLOCK
    assert [job.job_id for job in loaded.pending_pushes] == [3 * BLOCK + 5]


def _node_store(db: str, link: object, node_id: str) -> Storage:
    """A store opened as node ``node_id`` (its commits name it), registered in ``cluster_nodes``."""
    from dongne.store._cluster import NodeInfo

    opened = store_for(db)
    opened.news_from = node_id  # type: ignore[attr-defined]
    opened.open()
    link.heartbeat(NodeInfo(node_id, "h", 1, 0, int(time.time() * 1000)), int(time.time() * 1000))  # type: ignore[attr-defined]
    return opened


@pytest.mark.backends("postgres")
async def test_each_node_sends_its_own_push_jobs_and_one_adopts_those_of_a_node_gone(link: object, db: str) -> None:
    """Node A started first (the lower id block), B later: A's overflow read-back neither takes B's jobs
    (B sends them) nor lets B's ids move its cursor (A's later jobs were dropped); once B has left, its
    pending jobs are adopted by one node, once."""
    from dongne.clock import EngineClock
    from dongne.config import EscalationSettings
    from dongne.core import EnqueuePush, PushJob
    from dongne.push import PushDispatcher

    from .test_push import FakeGateway

    clock = EngineClock()
    a, b = _node_store(db, link, "node-a"), _node_store(db, link, "node-b")
    try:
        a_base = a.load(hot_since=0).last_push_job_id
        b_base = b.load(hot_since=0).last_push_job_id
        assert a_base < b_base

        def job(i: int) -> PushJob:
            return PushJob(
                i, f"local{i}", "new_question_notification", False, {"title": "t", "data": {}}, clock.now_ms()
            )

        a_jobs, b_jobs = [job(a_base + i) for i in range(1, 5)], [job(b_base + i) for i in range(1, 3)]
        a.apply([EnqueuePush(j) for j in a_jobs])
        b.apply([EnqueuePush(j) for j in b_jobs])
        # A node starting reads only its own pending jobs.
        assert [j.job_id for j in a.load(hot_since=0).pending_pushes] == [j.job_id for j in a_jobs]
        assert [j.job_id for j in b.pending_push_jobs(0, 10)] == [j.job_id for j in b_jobs]
        assert a.adopt_push_jobs(10, 0) == []  # B is alive: it sends its own

        gateway = FakeGateway(200)
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve)
            settings = EscalationSettings(push_url=f"http://127.0.0.1:{gateway.port}/push")
            pushes = PushDispatcher(
                settings,
                lambda outcome: a.apply(outcome.writes),  # type: ignore[arg-type]
                clock,
                read_pending=a.pending_push_jobs,
                adopt=lambda limit, since: trio.to_thread.run_sync(a.adopt_push_jobs, limit, since),
                max_queued=3,
            )
            for j in a_jobs:
                pushes.offer(j)  # the 4th overflows: read back from the outbox
            await nursery.start(pushes.run)
            with trio.fail_after(10):
                await pushes.wait_sent(4)
            later = job(a_base + 5)
            a.apply([EnqueuePush(later)])
            pushes.offer(later)
            with trio.fail_after(10):
                await pushes.wait_sent(5)
            sent = sorted(int(h["idempotency-key"].rsplit("-", 1)[1]) for h, _ in gateway.requests)
            assert sent == [j.job_id for j in [*a_jobs, later]]

            link.leave("node-b")  # type: ignore[attr-defined]
            assert await pushes.adopt_pending() == 2
            assert a.adopt_push_jobs(10, 0) == []  # once
            with trio.fail_after(10):
                await pushes.wait_sent(7)
            pushes.close()
            nursery.cancel_scope.cancel()
        keys = [int(h["idempotency-key"].rsplit("-", 1)[1]) for h, _ in gateway.requests]
        assert sorted(keys) == sorted(j.job_id for j in [*a_jobs, later, *b_jobs])  # each once
        assert db_rows(db, "SELECT count(*) FROM push_outbox WHERE status = 'pending'") == [(0,)]
    finally:
        a.close()
        b.close()


def test_sqlite_push_job_ids_go_on_from_the_highest(tmp_path: Path) -> None:
    from dongne.core.effects import EnqueuePush
    from dongne.core.records import PushJob

    store = store_for(tmp_path / "x.sqlite3")
    store.open()
    try:
        store.apply([EnqueuePush(PushJob(7, "u", "k", False, {}, 1))])
        assert store.load(hot_since=0).last_push_job_id == 7
        assert store.load(hot_since=0).last_push_job_id == 7
    finally:
        store.close()


# ---- real processes ---------------------------------------------------------------------


@asynccontextmanager
async def dongne_node(tmp_path: Path, db: str) -> AsyncIterator[tuple[trio.Process, int]]:
    """``dongne serve`` on ``db`` heartbeating every 0.2 s with a 1 s ttl (node and lease): ``(process, ops port)``; killed after."""
    heartbeats = {
        "DONGNE_CLUSTER_HEARTBEAT_INTERVAL_S": "0.2",
        "DONGNE_CLUSTER_NODE_TTL_S": "1",
        "DONGNE_CLUSTER_LEASE_TTL_S": "1",
    }
    async with serve_process(tmp_path, db, secret=SECRET, env=heartbeats, log_name="node.log") as node:
        yield node.proc, node.ops_port


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Poll ``check``: over other processes and the database there is no event to wait on."""
    with trio.fail_after(timeout_s):
        while True:
            if await check():
                return
            await trio.sleep(0.05)


def in_db(db: str, sql: str, expected: list[tuple[object, ...]]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await trio.to_thread.run_sync(db_rows, db, sql) == expected

    return check


def peer(link: object) -> Membership:
    """A second node's membership, in the test, on the wall clock (1 s ttl, as the node's)."""
    return Membership(link, ttl_s=1.0, node_id="peer")  # type: ignore[arg-type]


@pytest.mark.backends("postgres")
async def test_a_killed_leaders_lease_and_row_are_taken_over_within_the_ttl(
    tmp_path: Path, db: str, peer_link: object
) -> None:
    """SIGKILL the node holding the lease: a peer heartbeating every 0.1 s leads within about a ttl (1 s)."""
    async with dongne_node(tmp_path, db) as (proc, _ops):
        await wait_until(in_db(db, "SELECT holder IS NOT NULL FROM escalation_lease", [(True,)]))
        [(leader,)] = db_rows(db, "SELECT node_id FROM cluster_nodes")
        other = peer(peer_link)
        await trio.to_thread.run_sync(other.beat)
        assert other.lease_epoch is None and other.state()["lease"]["holder"] == leader

        proc.kill()
        killed = time.monotonic()
        with trio.fail_after(5):
            while other.lease_epoch is None:
                await trio.sleep(0.1)
                await trio.to_thread.run_sync(other.beat)
        took = time.monotonic() - killed
        with trio.fail_after(5):  # the dead node's row goes a ttl after its last heartbeat
            while len(other.state()["nodes"]) > 1:
                await trio.sleep(0.1)
                await trio.to_thread.run_sync(other.beat)

    assert other.lease_epoch == 2 and took < 3.0
    assert [n["node_id"] for n in other.state()["nodes"]] == ["peer"]


@pytest.mark.backends("postgres")
async def test_a_leader_stopped_past_its_lease_learns_it_lost_it(tmp_path: Path, db: str, peer_link: object) -> None:
    """SIGSTOP the leader past its lease: a peer takes it (a new epoch); after SIGCONT the old leader's next
    heartbeat finds the lease taken and its gauge drops to 0, and it is listed again."""
    other = peer(peer_link)

    async def keep_beating() -> None:
        while True:
            await trio.to_thread.run_sync(other.beat)
            await trio.sleep(0.1)

    async with dongne_node(tmp_path, db) as (proc, ops), httpx.AsyncClient() as http:

        def lease_held_gauge(value: str) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                text = (await http.get(f"http://127.0.0.1:{ops}/metrics")).text
                return f"\ndongne_escalation_lease_held {value}\n" in text

            return check

        await wait_until(lease_held_gauge("1.0"))
        [(leader,)] = db_rows(db, "SELECT node_id FROM cluster_nodes")
        proc.send_signal(signal.SIGSTOP)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_beating)
            await wait_until(lambda: trio.to_thread.run_sync(lambda: other.lease_epoch is not None))
            assert other.lease_epoch == 2
            # The stopped node's row goes too (a ttl after its last heartbeat, which may be after its last renewal).
            await wait_until(in_db(db, "SELECT node_id FROM cluster_nodes", [("peer",)]))
            proc.send_signal(signal.SIGCONT)
            await wait_until(lease_held_gauge("0.0"))
            await wait_until(in_db(db, "SELECT count(*) FROM cluster_nodes", [(2,)]))
            nursery.cancel_scope.cancel()

    assert db_rows(db, "SELECT holder, epoch FROM escalation_lease") == [("peer", 2)]
    assert leader != "peer"
