"""Durable events another node appended (store/CLUSTER.md): this node's commits number past them, and
other nodes' events reach this node's connections exactly once, in seq order, over real sockets and a real
PostgreSQL database. "Another node" is a psycopg connection of the test's committing as _writes.py does."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import psycopg
import pytest
import trio

from dongne.client import DongneClient
from dongne.core.effects import AppendEvent
from dongne.core.protocol import durable_event
from dongne.delivery import BatchedReads, Deliveries, durable_frame
from dongne.store import Storage
from dongne.transport import FrameEncoder, WebSocketConnection

from .conftest import Harness, db_rows, question_data

pytestmark = pytest.mark.backends("postgres")

OTHER_NODE = "node-b-4242-abcdef"


def other_node_appends(db: str, user_id: str, seqs: range, *, notify: bool = True) -> None:
    """Commit events for ``user_id`` as another node would: events, the head moved, news, in one transaction."""
    with psycopg.connect(db) as conn, conn.transaction():
        for seq in seqs:
            data = {"question_id": "q-elsewhere", "n": seq}
            conn.execute(
                "INSERT INTO events (user_id, seq, type, data, created_at) VALUES (%s, %s, %s, %s, %s)",
                (user_id, seq, "answer_notification", msgpack.packb(data), 1_000 + seq),
            )
        conn.execute(
            "INSERT INTO inbox_heads (user_id, last_seq) VALUES (%s, %s)"
            " ON CONFLICT (user_id) DO UPDATE SET last_seq = greatest(inbox_heads.last_seq, excluded.last_seq)",
            (user_id, seqs[-1]),
        )
        if notify:
            news = json.dumps({"node": OTHER_NODE, "heads": {user_id: seqs[-1]}})
            conn.execute("SELECT pg_notify('dongne_events', %s)", (news,))


async def durable_seqs(client: DongneClient, up_to: int, *, timeout: float = 10.0) -> list[int]:
    """The seqs of the durable events the client receives until one reaches ``up_to`` (bounded)."""
    seqs: list[int] = []
    with trio.fail_after(timeout):
        while not seqs or seqs[-1] < up_to:
            frame = await client.next_event()
            if "seq" in frame:
                seqs.append(frame["seq"])
    return seqs


async def answered_question(h: Harness, asker: DongneClient) -> str:
    """A question of the asker's, answered once by "local": the asker is at seq 1."""
    qid: str = (await asker.request("create_question", question_data()))["question"]["question_id"]
    async with h.connect("local") as local:
        await local.request("create_answer", {"question_id": qid, "content": "Dombedon, by the port"})
    assert await durable_seqs(asker, 1) == [1]
    return qid


def conn_of(h: Harness, user_id: str) -> int:
    (conn_id,) = h.running.engine.user_conns[user_id]
    return conn_id


async def test_a_seq_another_node_took_unannounced_is_numbered_past_not_refused(start_server: Any) -> None:
    """Another node took seq 2 unannounced: the next event's commit is not refused, it gets seq 3 from the
    head; the asker gets the other node's 2 from the store first, then 3; the engine's next seq follows."""
    h: Harness = await start_server()
    async with h.connect("asker") as asker, h.connect("local") as local:
        qid = await answered_question(h, asker)
        other_node_appends(str(h.db), "asker", range(2, 3), notify=False)

        await local.request("create_answer", {"question_id": qid, "content": "Or Donsadon"})
        assert await durable_seqs(asker, 3) == [2, 3]
        assert h.running.engine.users["asker"].last_seq == 3
        await local.request("create_answer", {"question_id": qid, "content": "Or Hallim"})
        assert await durable_seqs(asker, 4) == [4]
        assert h.running.clients.writable
        assert "dongne_seqs_renumbered_total 1.0" in h.running.clients.metrics.render().decode()
        assert asker.pending_events() == []

    assert db_rows(h.db, "SELECT seq FROM events WHERE user_id = 'asker' ORDER BY seq") == [(1,), (2,), (3,), (4,)]
    assert db_rows(h.db, "SELECT last_seq FROM inbox_heads WHERE user_id = 'asker'") == [(4,)]
    assert db_rows(h.db, "SELECT count(*) FROM answers") == [(3,)]


async def test_an_alert_renumbered_at_commit_keeps_its_stored_seq_when_its_first_connection_closed(
    start_server: Any,
) -> None:
    """A stage's alert to a user's two connections, numbered 2 by the store where the engine said 1; the
    first connection closed between the commit and the send: the second still gets it as seq 2, after the
    other node's seq 1 from the store."""
    from dongne.core.effects import Outcome, SendEach

    h: Harness = await start_server()
    clients = h.running.clients
    async with h.connect("local", local=True) as second:
        await second.request("ping")
        (second_id,) = h.running.engine.user_conns["local"]
        async with h.connect("local", local=True) as first:
            await first.request("ping")
            (first_id,) = h.running.engine.user_conns["local"] - {second_id}
        other_node_appends(str(h.db), "local", range(1, 2), notify=False)
        with trio.fail_after(10):
            while first_id in clients.conns:  # noqa: ASYNC110 - the server's own teardown
                await trio.sleep(0.01)
        conn_ids = (first_id, second_id)  # the first of the alert's connections is gone
        data = {"question_id": "q1", "stage": "QUICK"}
        alert = msgpack.packb(durable_event("new_question_notification", 1, data))
        clients._perform(
            Outcome(actions=(SendEach("new_question_notification", [(conn_ids, 1, alert)]),)), {"local": {1: 2}}
        )
        assert await durable_seqs(second, 2) == [1, 2]
        assert second.pending_events() == []


async def test_another_nodes_events_arrive_once_in_order_then_seqs_continue(start_server: Any) -> None:
    """News on dongne_events: the connected asker gets the other node's events from the store, in order,
    and this node's next event for the asker follows them."""
    h: Harness = await start_server()
    async with h.connect("asker") as asker, h.connect("local") as local:
        qid = await answered_question(h, asker)
        other_node_appends(str(h.db), "asker", range(2, 6))
        assert await durable_seqs(asker, 5) == [2, 3, 4, 5]
        await local.request("create_answer", {"question_id": qid, "content": "Or Donsadon"})
        assert await durable_seqs(asker, 6) == [6]
        # Its own news is skipped: no replay ran for this node's seq 6.
        assert h.running.clients.deliveries.replays(conn_of(h, "asker")) == 1
        assert asker.pending_events() == []

    # A user with no connection here: the news moves this node's seqs on all the same.
    other_node_appends(str(h.db), "local", range(1, 3))
    engine = h.running.engine
    with trio.fail_after(10):
        while engine.users["local"].last_seq != 2:  # noqa: ASYNC110 - news from another session
            await trio.sleep(0.01)
    async with h.connect("asker") as asker:
        answer_id = (await asker.request("get_question", {"question_id": qid}))["answers"][0]["answer_id"]
        await asker.request("accept_answer", {"question_id": qid, "answer_id": answer_id})
    assert db_rows(h.db, "SELECT seq, type FROM events WHERE user_id = 'local' ORDER BY seq")[-1] == (
        3,
        "answer_accepted_notification",
    )
    assert "dongne_seqs_renumbered_total 0.0" in h.running.clients.metrics.render().decode()


async def test_without_the_notification_the_catch_up_delivers(start_server: Any) -> None:
    h: Harness = await start_server(cluster={"catch_up_interval_s": 0.2})
    async with h.connect("asker") as asker, h.connect("local") as local:
        qid = await answered_question(h, asker)
        other_node_appends(str(h.db), "asker", range(2, 4), notify=False)
        assert await durable_seqs(asker, 3, timeout=5.0) == [2, 3]
        await local.request("create_answer", {"question_id": qid, "content": "Or Donsadon"})
        assert await durable_seqs(asker, 4) == [4]


async def test_after_the_listen_connection_is_terminated_nothing_is_lost(start_server: Any) -> None:
    """pg_terminate_backend of the LISTEN connection: news sent meanwhile is lost, the catch-up made when
    the listener connects again delivers the events (no periodic catch-up in this test)."""
    h: Harness = await start_server()
    listener = h.running.clients.listener
    async with h.connect("asker") as asker:
        await answered_question(h, asker)
        first = listener.backend_pid
        assert db_rows(h.db, "SELECT pg_terminate_backend(?)", (first,)) == [(True,)]
        other_node_appends(str(h.db), "asker", range(2, 5))
        assert await durable_seqs(asker, 4) == [2, 3, 4]
        with trio.fail_after(10):
            while listener.connections < 2 or listener.backend_pid is None:  # noqa: ASYNC110
                await trio.sleep(0.02)  # another process's session: nothing to wait on
        other_node_appends(str(h.db), "asker", range(5, 6))
        assert await durable_seqs(asker, 5) == [5]
        assert listener.backend_pid != first


async def test_replays_on_one_connection_never_overlap(start_server: Any) -> None:
    """Heads asked for one after another while a replay runs raise its target: one replay task, every
    event once and in order, and live frames held meanwhile come after them."""
    h: Harness = await start_server()
    clients = h.running.clients
    async with h.connect("asker") as asker, h.connect("local") as local:
        qid = await answered_question(h, asker)
        conn_id = conn_of(h, "asker")
        other_node_appends(str(h.db), "asker", range(2, 202), notify=False)
        clients.heads_moved({"asker": 60})
        clients.heads_moved({"asker": 130})  # while the first replay runs (no checkpoint in between)
        clients.heads_moved({"asker": 201})
        assert clients.deliveries.replays(conn_id) == 1  # one task; the hello's replay was empty
        await local.request("create_answer", {"question_id": qid, "content": "Or Donsadon"})  # seq 202, live

        assert await durable_seqs(asker, 202) == list(range(2, 203))
        assert clients.deliveries.replays(conn_id) == 1
        assert clients.deliveries.given(conn_id) == 202


def server_frames(data: bytes) -> list[dict[str, Any]]:
    """The binary frames (msgpack) in what a server-side connection wrote: unmasked, short lengths."""
    frames = []
    while data:
        assert data[0] == 0x82, data[:2]
        size, start = data[1], 2
        if size == 126:
            size, start = int.from_bytes(data[2:4], "big"), 4
        frames.append(msgpack.unpackb(data[start : start + size]))
        data = data[start + size :]
    return frames


@pytest.mark.backends("sqlite", "postgres")
async def test_replays_asked_together_are_one_read_of_the_store(store: Storage, nursery: trio.Nursery) -> None:
    """Reads asked together go in one call; each gets its own user's range (a
    user asked for twice, over two ranges, is read once); the frames spliced from stored bytes are what
    packing the event makes."""
    data = {"question_id": "q1", "n": "한라산"}
    store.apply([AppendEvent(u, seq, "answer_notification", data, seq) for u in ("a", "b", "c") for seq in (1, 2, 3)])
    reads = BatchedReads(store.read_event_rows, nursery.start_soon)
    asked = [("a", 0, 3), ("b", 1, 3), ("c", 0, 1), ("a", 2, 3), ("nobody", 0, 5)]
    got: dict[int, list[int]] = {}

    async def read(i: int) -> None:
        got[i] = [seq for seq, _kind, _data in await reads.read(*asked[i])]

    async with trio.open_nursery() as readers:
        for i in range(len(asked)):
            readers.start_soon(read, i)
    assert got == {0: [1, 2, 3], 1: [2, 3], 2: [1], 3: [3], 4: []}
    assert reads.calls == 1  # all asked before the read started: one call

    [(seq, kind, raw)] = await reads.read("b", 2, 3)
    assert durable_frame(kind, seq, raw) == msgpack.packb(durable_event(kind, seq, data))


@contextlib.contextmanager
def stream_to_a_socket(
    store: Storage, nursery: trio.Nursery
) -> Iterator[tuple[FrameEncoder, WebSocketConnection, Deliveries, trio.socket.SocketType]]:
    """A connection over a socket pair, with the durable streams read from ``store``: ``(encoder,
    connection, deliveries, the peer's end)``; both ends closed after."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    encoder = FrameEncoder()
    conn = WebSocketConnection(ours, nursery, encoder, max_message_bytes=1 << 20, max_buffer_bytes=1 << 20)
    deliveries = Deliveries(store.read_event_rows, encoder, nursery.start_soon)
    try:
        yield encoder, conn, deliveries, trio.socket.from_stdlib_socket(peer)
    finally:
        conn.abort()
        peer.close()


@pytest.mark.backends("sqlite")
async def test_a_stream_drops_duplicates_and_fills_gaps_from_the_store(store: Storage, nursery: trio.Nursery) -> None:
    """One connection's durable stream, deterministically: a duplicate is dropped, a gap is read from the
    store before the frame that showed it, frames held meanwhile keep their order, a wish raises the target."""
    store.apply([AppendEvent("u", seq, "answer_notification", {"n": seq}, seq) for seq in range(1, 11)])
    with stream_to_a_socket(store, nursery) as (encoder, conn, deliveries, peer_sock):

        def live(seq: int) -> None:
            frame = encoder.binary(msgpack.packb(durable_event("answer_notification", seq, {"n": seq})))
            deliveries.live(conn, 7, seq, frame)

        deliveries.start(conn, 7, "u", 0, 0)  # a hello with nothing to replay: the stream starts after 0
        live(1)
        live(1)  # a duplicate
        live(4)  # a gap: 2 and 3 come from the store first
        live(3)  # arrives while the replay runs: held, then dropped (replayed)
        conn.send_nowait(encoder.binary(msgpack.packb({"type": "reply", "id": 1})))  # held: after what is replayed
        deliveries.want(conn, 7, "u", 6)
        deliveries.want(conn, 7, "u", 8)  # raises the target of the replay started: it reads 2-8 at once
        assert deliveries.replays(7) == 1
        received = bytearray()
        with trio.fail_after(10):
            while deliveries.given(7) != 8 or deliveries.replays(7) != 1 or conn.holding:
                received += await peer_sock.recv(65536)
            live(10)  # a gap again, once live: a second replay task
            while len(server_frames(bytes(received))) < 11:
                received += await peer_sock.recv(65536)

        frames = server_frames(bytes(received))
        assert [f.get("seq", f["type"]) for f in frames] == [1, 2, 3, 4, 5, 6, 7, 8, "reply", 9, 10]
        assert (deliveries.given(7), deliveries.replays(7)) == (10, 2)


@pytest.mark.backends("sqlite")
async def test_a_gap_after_a_replay_that_found_events_missing_is_read_again(
    store: Storage, nursery: trio.Nursery
) -> None:
    """A hello counted seqs 4-5 that were not in the store when its replay read (in flight, then refused);
    another writer then appended 4-5: the next live event's gap is read again, not taken as given up on."""
    store.apply([AppendEvent("u", seq, "answer_notification", {"n": seq}, seq) for seq in range(1, 4)])
    with stream_to_a_socket(store, nursery) as (encoder, conn, deliveries, peer_sock):
        received = bytearray()
        deliveries.start(conn, 7, "u", 0, 5)
        with trio.fail_after(10):
            while deliveries.given(7) != 3 or conn.holding:
                received += await peer_sock.recv(65536)
            store.apply([AppendEvent("u", seq, "answer_notification", {"n": seq}, seq) for seq in (4, 5)])
            frame = encoder.binary(msgpack.packb(durable_event("answer_notification", 6, {"n": 6})))
            deliveries.live(conn, 7, 6, frame)
            while len(server_frames(bytes(received))) < 6:
                received += await peer_sock.recv(65536)

        assert [f["seq"] for f in server_frames(bytes(received))] == [1, 2, 3, 4, 5, 6]


async def test_an_escalation_stage_after_another_nodes_event_is_numbered_past_it(start_server: Any) -> None:
    """Another node took a local's seq 1 unannounced before the QUICK stage (3 s): the stage commits, its
    alert numbered 2 by the store; the local gets the other node's event and one alert, in seq order.
    Real time: about 3 s."""
    from contextlib import AsyncExitStack

    from .test_escalation import HERE, local_at

    h: Harness = await start_server(location={"min_update_interval_s": 0.0})
    async with AsyncExitStack() as stack:
        near = await local_at(stack, h, "near_1km", 1000)
        mid = await local_at(stack, h, "mid_4km", 4000)
        asker = await stack.enter_async_context(h.connect("traveller"))
        await asker.request("create_question", question_data(location=dict(HERE)))
        assert (await near.next_event("new_question_notification"))["data"]["stage"] == "IMMEDIATE"
        other_node_appends(str(h.db), "mid_4km", range(1, 2), notify=False)  # before QUICK is due

        with trio.fail_after(10):
            replayed = await mid.next_event()
            while "seq" not in replayed:  # live events (not durable) may come first
                replayed = await mid.next_event()
            quick = await mid.next_event("new_question_notification")
        await h.running.clients.pipeline.wait_idle()

        assert (replayed["seq"], replayed["type"]) == (1, "answer_notification")
        assert (quick["seq"], quick["data"]["stage"]) == (2, "QUICK")
        assert [e for e in mid.pending_events() if "seq" in e] == []
    assert "dongne_seqs_renumbered_total 1.0" in h.running.clients.metrics.render().decode()
    assert db_rows(h.db, "SELECT user_id, stage FROM notified WHERE user_id = 'mid_4km'") == [("mid_4km", "QUICK")]


async def test_a_dongne_serve_process_delivers_another_nodes_events(tmp_path: Path, db: str) -> None:
    """``dongne serve`` as started in production (a subprocess, the default catch-up made short through its
    environment): another node's events with news, without, and after its LISTEN session is terminated,
    each once and in order; the node's own next event for the user follows them."""
    from dongne.client import open_client

    from .conftest import SECRET, token
    from .served import serve_process

    env = {"DONGNE_CLUSTER_CATCH_UP_INTERVAL_S": "0.3"}
    async with (
        serve_process(tmp_path, db, secret=SECRET, env=env) as node,
        open_client(node.url, token("asker")) as asker,
    ):
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        other_node_appends(db, "asker", range(1, 3))
        assert await durable_seqs(asker, 2) == [1, 2]
        other_node_appends(db, "asker", range(3, 4), notify=False)
        assert await durable_seqs(asker, 3, timeout=5.0) == [3]
        listeners = db_rows(
            db,
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'dongne listener' AND datname = current_database()",
        )
        assert len(listeners) == 1
        assert db_rows(db, "SELECT pg_terminate_backend(?)", listeners[0]) == [(True,)]
        other_node_appends(db, "asker", range(4, 6))
        assert await durable_seqs(asker, 5, timeout=5.0) == [4, 5]
        async with open_client(node.url, token("local")) as local:
            await local.request("create_answer", {"question_id": qid, "content": "Dombedon, by the port"})
        assert await durable_seqs(asker, 6) == [6]
        assert asker.pending_events() == []
    assert db_rows(db, "SELECT seq FROM events WHERE user_id = 'asker' ORDER BY seq") == [(s,) for s in range(1, 7)]
