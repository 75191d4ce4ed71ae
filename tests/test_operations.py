"""Operations: /metrics, answer-time SLOs, slow-response alerts."""

from __future__ import annotations

import contextlib
import gc
import math
import re
import weakref
from collections.abc import Iterator

import httpx
import pytest
import trio

from dongne.client import RequestError
from dongne.clock import EngineClock
from dongne.core.slo import SloTracker
from dongne.runtime import FULL_SWEEP_EVERY, GC_THRESHOLDS, YOUNG_COLLECTION_EVERY_WAKES, YoungCollections

from .conftest import NO_TIMERS, Harness, question_data
from .test_push import FakeGateway

#: ``gc.set_threshold`` with no automatic collection at all: only what a test runs (or has run) counts.
NO_AUTOMATIC_COLLECTIONS = (10**9, 2**31 - 1, 2**31 - 1)


@contextlib.contextmanager
def gc_thresholds(thresholds: tuple[int, int, int]) -> Iterator[None]:
    """Collect with ``thresholds`` inside the block; the process's own are back afterwards."""
    saved = gc.get_threshold()
    gc.set_threshold(*thresholds)
    try:
        yield
    finally:
        gc.set_threshold(*saved)


ONLY_IMMEDIATE = [{"name": "IMMEDIATE", "offset_s": 0.0, "radius_m": 2000.0, "audience": "online_nearby"}]


def test_slo_counts_only_decided_questions() -> None:
    slo = SloTracker(window_days=1)
    t0 = 1_800_000_000_000
    slo.asked("a", t0, "Jeju-si", urgent=False)
    slo.asked("b", t0, "Jeju-si", urgent=True)
    slo.asked("c", t0, "Udo", urgent=False)
    slo.answered("a", t0 + 30_000)  # 30 s
    slo.answered("b", t0 + 400_000)  # 6 min 40 s
    snap = slo.snapshot(t0 + 120_000)  # 2 minutes in: c is undecided for 5 and 10 minutes
    assert snap["overall"]["within_1m"] == round(1 / 3, 4)
    assert snap["overall"]["decided_5m"] == 2 and snap["overall"]["within_5m"] == 0.5
    later = slo.snapshot(t0 + 700_000)
    assert later["overall"]["within_10m"] == round(2 / 3, 4)
    assert later["regions"]["Udo"]["within_10m"] == 0.0
    assert later["urgent"]["within_5m"] == 0.0 and later["urgent"]["within_10m"] == 1.0
    assert later["regions"]["Jeju-si"]["avg_first_answer_s"] == 215.0
    assert later["regions"]["Jeju-si"]["p90_first_answer_s"] == 400.0
    assert slo.snapshot(t0 + 2 * 86_400_000)["overall"]["questions"] == 0  # out of the window


async def test_metrics_endpoint_counts_real_traffic(server: Harness) -> None:
    async with server.connect("asker") as asker, server.connect("local") as local:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        await local.request("create_answer", {"question_id": qid, "content": "here"})
        for _ in range(2):  # counted twice: the second time by the label's cached child
            with pytest.raises(RequestError):
                await local.request("join_question", {"question_id": "nope"})
        async with httpx.AsyncClient() as http:
            response = await http.get(f"http://127.0.0.1:{server.running.ops_port}/metrics")
    assert response.status_code == 200
    text = response.text
    assert 'dongne_frames_in_total{type="create_question"} 1.0' in text
    assert 'dongne_errors_total{code="not_found"} 2.0' in text
    assert 'dongne_frames_in_total{type="join_question"} 2.0' in text
    assert "dongne_connections 2.0" in text
    assert "dongne_users_online 2.0" in text
    assert 'dongne_time_to_first_answer_seconds_count{region="Jeju-si"} 1.0' in text
    assert "dongne_store_commit_seconds_count" in text
    assert 'dongne_frames_out_total{type="answer_notification"} 1.0' in text
    # Every answered request is timed, by operation (hello, two writes, two refused joins).
    for op, count in (("hello", 2), ("create_question", 1), ("create_answer", 1), ("join_question", 2)):
        assert f'dongne_request_seconds_count{{op="{op}"}} {count:.1f}' in text
    timed = re.search(r'^dongne_request_seconds_sum\{op="create_question"\} (\S+)$', text, re.M)
    assert timed is not None and 0 < float(timed.group(1)) < 10


async def test_metrics_report_garbage_collection_pauses(start_server) -> None:  # type: ignore[no-untyped-def]
    callbacks = list(gc.callbacks)
    server: Harness = await start_server()
    gc.collect()  # the server shares this process: its full collection is the server's pause

    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{server.running.ops_port}/metrics")).text
    full = re.search(r'^dongne_gc_pause_seconds_count\{generation="2"\} (\S+)$', text, re.M)
    assert full is not None and float(full.group(1)) >= 1
    total = re.search(r'^dongne_gc_pause_seconds_sum\{generation="2"\} (\S+)$', text, re.M)
    assert total is not None and float(total.group(1)) > 0
    await server.running.aclose()
    assert gc.callbacks == callbacks  # the watcher left with its server


async def test_full_collections_run_on_the_configured_interval(start_server, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    with gc_thresholds(GC_THRESHOLDS):  # as `dongne serve` runs: no automatic full collections
        server: Harness = await start_server(server={**NO_TIMERS, "full_gc_interval_s": 600.0})
        full = gc.get_stats()[2]["collections"]
        await trio.sleep(599)
        assert gc.get_stats()[2]["collections"] == full  # not before the interval
        await trio.sleep(2)
        assert gc.get_stats()[2]["collections"] == full + 1
        await trio.sleep(600)
        assert gc.get_stats()[2]["collections"] == full + 2
        await server.running.aclose()


def test_the_server_thresholds_run_only_young_collections() -> None:
    """With ``dongne serve``'s thresholds, what survives a young collection is not walked again automatically.

    Allocating keeps triggering young collections; neither middle nor full ones run, however many pile up
    (they come from collect_fully_every, on its interval).
    """
    with gc_thresholds(GC_THRESHOLDS):
        before = [generation["collections"] for generation in gc.get_stats()]
        kept = [[i] for i in range(50 * GC_THRESHOLDS[0])]  # survivors, as a waiting task's objects are
        after = [generation["collections"] for generation in gc.get_stats()]

    assert len(kept) == 50 * GC_THRESHOLDS[0]
    assert after[0] - before[0] >= 40  # CPython's defaults would have run 4 middle collections by then
    assert after[1:] == before[1:]


def test_young_collections_run_every_so_many_wake_ups() -> None:
    with gc_thresholds(NO_AUTOMATIC_COLLECTIONS):  # only the collections counted here
        young = YoungCollections(every=5)
        before = gc.get_stats()[0]["collections"]
        for _ in range(4):
            young.woke()
        after_four = gc.get_stats()[0]["collections"]
        for _ in range(6):
            young.woke()
        after_ten = gc.get_stats()[0]["collections"]
        gc.disable()
        try:
            for _ in range(5):
                young.woke()
        finally:
            gc.enable()
        while_disabled = gc.get_stats()[0]["collections"]

    assert (after_four - before, after_ten - before, while_disabled - before) == (0, 2, 2)


async def test_a_servers_readers_waking_run_young_collections(start_server) -> None:  # type: ignore[no-untyped-def]
    """Requests wake a connection's reader; every YOUNG_COLLECTION_EVERY_WAKES of them run a young collection,
    even when the allocation count would start none (held off entirely here)."""
    server: Harness = await start_server(limits={"conn_per_s": 1e6, "conn_burst": 1e6})
    requests = 2 * YOUNG_COLLECTION_EVERY_WAKES + 10
    async with server.connect("local") as local:
        with gc_thresholds(NO_AUTOMATIC_COLLECTIONS):
            before = gc.get_stats()[0]["collections"]
            for _ in range(requests):
                await local.request("ping", {})
            collections = gc.get_stats()[0]["collections"] - before

    assert 2 <= collections <= 3  # one wake-up per request: every 500th collects


class _Node:
    other: object = None


async def test_a_cycle_that_outlived_a_round_is_reclaimed_at_the_next_full_sweep(start_server, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    with gc_thresholds(GC_THRESHOLDS):
        try:
            server: Harness = await start_server(server={**NO_TIMERS, "full_gc_interval_s": 600.0})
            old = _Node()
            old.other = old  # a reference cycle, alive at the first round
            old_ref = weakref.ref(old)
            await trio.sleep(601)  # round 1: it survives and is frozen
            assert gc.get_freeze_count() > 0
            del old
            young = _Node()
            young.other = young  # garbage made after the round: not frozen
            young_ref = weakref.ref(young)
            del young
            await trio.sleep(600)  # round 2 walks only what is not frozen
            assert young_ref() is None
            assert old_ref() is not None
            await trio.sleep(600 * (FULL_SWEEP_EVERY - 3))  # rounds 3 .. FULL_SWEEP_EVERY - 1
            assert old_ref() is not None
            await trio.sleep(600)  # round FULL_SWEEP_EVERY walks the frozen objects too
            assert old_ref() is None
            await server.running.aclose()
            assert gc.get_freeze_count() == 0  # thawed when the server stopped
        finally:
            gc.unfreeze()


async def test_admin_metrics_op_reports_slos(server: Harness) -> None:
    async with (
        server.connect("asker") as asker,
        server.connect("local") as local,
        server.connect("boss", admin=True) as boss,
    ):
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        await local.request("create_answer", {"question_id": qid, "content": "here"})
        with pytest.raises(RequestError) as forbidden:
            await asker.request("metrics")
        assert forbidden.value.code == "forbidden"
        report = await boss.request("metrics")
        assert report["slo"]["overall"]["within_1m"] == 1.0
        assert report["slo"]["regions"]["Jeju-si"]["answered"] == 1
        assert report["open_questions"] == 1


async def test_slow_response_alert_fires_at_the_deadline(start_server, autojump_clock, nursery) -> None:  # type: ignore[no-untyped-def]
    gateway = FakeGateway(200)
    await nursery.start(gateway.serve)
    h = await start_server(
        server=NO_TIMERS,
        escalation={"stages": ONLY_IMMEDIATE},
        alerts={"slow_response_s": 600.0, "webhook_url": f"http://127.0.0.1:{gateway.port}/alerts"},
    )
    async with h.connect("boss", admin=True, timeout=math.inf) as boss, h.connect("asker", timeout=math.inf) as asker:
        started = trio.current_time()
        q = (await asker.request("create_question", question_data(urgency="urgent")))["question"]
        alert = await boss.next_event("slow_response_alert")
        assert trio.current_time() - started >= 600.0 - 0.001
        assert alert["data"]["question_id"] == q["question_id"]
        assert alert["data"]["age_s"] >= 600.0
        assert alert["data"]["stage"] == "IMMEDIATE"
        with trio.fail_after(1e6):
            await h.running.pushes.wait_sent(1)
        assert gateway.requests[0][1]["type"] == "slow_response_alert"
        assert gateway.requests[0][1]["urgent"] is True
        # Answering afterwards does not raise it again; the question is marked.
        state = await asker.request("join_question", {"question_id": q["question_id"]})
        assert state["question"]["status"] == "open"
        report = await boss.request("metrics")
        assert report["recent_alerts"][0]["question_id"] == q["question_id"]
    await h.running.aclose()


async def test_an_answer_in_time_means_no_alert(start_server, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(server=NO_TIMERS, escalation={"stages": ONLY_IMMEDIATE}, alerts={"slow_response_s": 600.0})
    async with h.connect("boss", admin=True, timeout=math.inf) as boss, h.connect("asker", timeout=math.inf) as asker:
        async with h.connect("local", timeout=math.inf) as local:
            q = (await asker.request("create_question", question_data()))["question"]
            answer = (await local.request("create_answer", {"question_id": q["question_id"], "content": "quick"}))[
                "answer"
            ]
        await trio.sleep(700)
        await boss.request("get_profile")
        alerts = [e for e in boss.pending_events() if e["type"] == "slow_response_alert"]
        # However the clock jumped: an alert exists only if it came before the answer.
        assert all(e["data"]["raised_at"] <= answer["created_at"] for e in alerts)
    await h.running.aclose()


async def test_alert_due_while_down_fires_at_start(start_server, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    clock = EngineClock()
    h = await start_server(
        clock=clock, server=NO_TIMERS, escalation={"stages": ONLY_IMMEDIATE}, alerts={"slow_response_s": 600.0}
    )
    async with h.connect("boss", admin=True, timeout=math.inf) as boss:
        seen = boss.last_seq
    async with h.connect("asker", timeout=math.inf) as asker:
        q = (await asker.request("create_question", question_data()))["question"]
    alerted_before = h.running.engine.questions[q["question_id"]].alerted_at
    await h.running.aclose()
    await trio.sleep(900)
    h2 = await start_server(
        clock=clock, server=NO_TIMERS, escalation={"stages": ONLY_IMMEDIATE}, alerts={"slow_response_s": 600.0}
    )
    async with h2.connect("boss", admin=True, resume_from=seen, timeout=math.inf) as boss:
        alert = await boss.next_event("slow_response_alert")
        assert alert["data"]["question_id"] == q["question_id"]
        assert alert["seq"] == seen + 1
        await boss.request("get_profile")
        assert [e for e in boss.pending_events() if e["type"] == "slow_response_alert"] == []  # exactly once
    assert h2.running.engine.questions[q["question_id"]].alerted_at is not None
    assert alerted_before is None or alerted_before == h2.running.engine.questions[q["question_id"]].alerted_at
    await h2.running.aclose()
