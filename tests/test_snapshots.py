"""Snapshots and restore: real SQLite files, a real server, the CLI as a subprocess."""

from __future__ import annotations

import functools
import logging
import os
import pty
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from dongne.client import RequestError
from dongne.config import SnapshotSettings
from dongne.snapshots import SnapshotStatistics, run_periodic_snapshots
from dongne.store import (
    SCHEMA_VERSION,
    DatabaseInUseError,
    SnapshotCancelled,
    Store,
    list_snapshots,
    prune_snapshots,
    restore_snapshot,
    take_snapshot,
)

from .conftest import SECRET, question_data

NOON = datetime(2025, 5, 1, 12, 0, 0, tzinfo=UTC)


def _make_db(path: Path) -> Path:
    store = Store(path)
    store.open()
    store.close()
    return path


def _dongne(*args: str, cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DONGNE_")}
    env["DONGNE_JWT_SECRET"] = SECRET
    env.update(kwargs.pop("env", {}))
    return subprocess.run(
        [sys.executable, "-m", "dongne", *args], capture_output=True, text=True, cwd=cwd, env=env, **kwargs
    )


async def _adongne(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """``_dongne`` without blocking the event loop (an in-process server is running)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DONGNE_")}
    return await trio.run_process(
        [sys.executable, "-m", "dongne", *args], capture_stdout=True, capture_stderr=True, check=False, cwd=cwd, env=env
    )


def _rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as conn:
        return conn.execute(sql).fetchall()


def _question_ids(db: Path) -> set[str]:
    return {r[0] for r in _rows(db, "SELECT question_id FROM questions")}


async def test_a_snapshot_taken_while_the_server_writes_has_every_acknowledged_write(
    start_server: Any, tmp_path: Path
) -> None:
    h = await start_server()
    acked: list[str] = []
    taken: list[tuple[Path, list[str]]] = []
    written_during = 0
    done = False
    reached = {5 * n: trio.Event() for n in range(1, 6)}  # set as the acknowledged answers reach each count

    async def answer(local: Any, qid: str) -> None:
        while not done:
            reply = await local.request("create_answer", {"question_id": qid, "content": f"answer number {len(acked)}"})
            acked.append(reply["answer"]["answer_id"])
            if len(acked) in reached:
                reached[len(acked)].set()

    async with h.connect("asker") as asker, h.connect("local1", local=True) as local:
        qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, local, qid)
            for n in range(1, 6):
                await reached[5 * n].wait()
                before = list(acked)
                # One page per step: the copy spans many of the server's commits.
                path = await trio.to_thread.run_sync(
                    functools.partial(take_snapshot, h.db, tmp_path / "snaps", pages_per_step=1)
                )
                written_during += len(acked) - len(before)
                taken.append((path, before))
            done = True
    await h.running.aclose()

    assert written_during > 0  # the server kept committing while snapshots were copied
    assert [p for p, _ in taken] == list_snapshots(tmp_path / "snaps", h.db)
    for path, before in taken:
        assert _rows(path, "PRAGMA integrity_check") == [("ok",)]
        assert _rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert _rows(path, "PRAGMA journal_mode") == [("delete",)]  # one self-contained file
        assert set(before) <= {r[0] for r in _rows(path, "SELECT answer_id FROM answers")}
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == sorted(p.name for p, _ in taken)


def test_names_are_unique_per_second_and_prune_keeps_the_newest(tmp_path: Path) -> None:
    db = _make_db(tmp_path / "dongne.sqlite3")
    snaps = tmp_path / "snaps"
    first = take_snapshot(db, snaps, now=NOON)
    second = take_snapshot(db, snaps, now=NOON)
    third = take_snapshot(db, snaps, now=NOON.replace(second=1))
    (snaps / "notes.txt").write_text("operator's file")
    (snaps / "dongne-backup.sqlite3").write_text("not ours either")

    assert [first.name, second.name, third.name] == [
        "dongne-20250501T120000Z.sqlite3",
        "dongne-20250501T120000Z-1.sqlite3",
        "dongne-20250501T120001Z.sqlite3",
    ]
    assert list_snapshots(snaps, db) == [first, second, third]
    assert prune_snapshots(snaps, db, 2) == [first]
    assert prune_snapshots(snaps, db, 2) == []
    assert sorted(p.name for p in snaps.iterdir()) == sorted(
        ["dongne-backup.sqlite3", "notes.txt", second.name, third.name]
    )
    # The pruned name is not reused: names sort in the order snapshots were taken.
    fourth = take_snapshot(db, snaps, now=NOON)
    assert fourth.name == "dongne-20250501T120000Z-2.sqlite3"
    assert list_snapshots(snaps, db) == [second, fourth, third]
    with pytest.raises(ValueError):
        prune_snapshots(snaps, db, 0)


def test_databases_sharing_a_folder_list_and_prune_their_own_snapshots_only(tmp_path: Path) -> None:
    """``prod.sqlite3`` and ``staging.sqlite3`` get the same default folder, ``snapshots/`` beside them: each
    database's name is in its snapshots', and its pruning leaves the other's alone."""
    prod, staging = _make_db(tmp_path / "prod.sqlite3"), _make_db(tmp_path / "staging.sqlite3")
    snaps = tmp_path / "snapshots"
    ours = [take_snapshot(prod, snaps, now=NOON.replace(hour=hour)) for hour in (1, 2)]
    theirs = [take_snapshot(staging, snaps, now=NOON.replace(hour=hour)) for hour in (3, 4, 5)]

    assert [p.name for p in ours] == ["prod-20250501T010000Z.sqlite3", "prod-20250501T020000Z.sqlite3"]
    assert (list_snapshots(snaps, prod), list_snapshots(snaps, staging)) == (ours, theirs)
    assert prune_snapshots(snaps, staging, 2) == theirs[:1]
    assert prune_snapshots(snaps, prod, 2) == []
    assert sorted(snaps.iterdir()) == sorted(ours + theirs[1:])


def test_a_cancelled_snapshot_leaves_nothing_behind(tmp_path: Path) -> None:
    db = _make_db(tmp_path / "d.sqlite3")
    with pytest.raises(SnapshotCancelled):
        take_snapshot(db, tmp_path / "snaps", pages_per_step=1, should_stop=lambda: True)

    assert list((tmp_path / "snaps").iterdir()) == []


async def test_cli_snapshot_then_restore_brings_the_data_back(start_server: Any, tmp_path: Path) -> None:
    h = await start_server()
    async with h.connect("asker", nick="Mina") as asker, h.connect("local1", local=True) as local:
        q1 = (await asker.request("create_question", question_data()))["question"]["question_id"]
        await local.request("create_answer", {"question_id": q1, "content": "Dombedon, open till 2am."})
        made = await _adongne("snapshot", "--db", str(h.db), cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        snapshot = Path(made.stdout.decode().strip())
        assert snapshot.parent == h.db.parent / "snapshots"
        q2 = (await asker.request("create_question", question_data(title="After the snapshot")))["question"][
            "question_id"
        ]

        # Not while the server has the database open.
        refused = await _adongne("restore", str(snapshot), "--db", str(h.db), "--yes", cwd=tmp_path)
        assert refused.returncode == 2
        assert b"locked by a running server" in refused.stderr  # the server holds <db>.lock
        assert not list(await trio.Path(tmp_path).glob("*.before-restore-*"))
    await h.running.aclose()

    restored = await _adongne("restore", str(snapshot), "--db", str(h.db), "--yes", cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    [kept] = await trio.Path(tmp_path).glob("dongne.sqlite3.before-restore-*")
    assert {q1, q2} <= _question_ids(Path(kept))
    assert not await trio.Path(h.db.with_name(h.db.name + "-wal")).exists()

    h2 = await start_server()
    async with h2.connect("reader") as reader:
        state = await reader.request("join_question", {"question_id": q1})
        assert state["question"]["asker_nick"] == "Mina"
        assert [a["content"] for a in state["answers"]] == ["Dombedon, open till 2am."]
        with pytest.raises(RequestError) as gone:
            await reader.request("join_question", {"question_id": q2})
        assert gone.value.code == "not_found"
    await h2.running.aclose()


async def test_restore_refuses_while_this_process_has_the_database_open(start_server: Any, tmp_path: Path) -> None:
    h = await start_server()
    snapshot = await trio.to_thread.run_sync(take_snapshot, h.db, tmp_path / "snaps")
    with pytest.raises(DatabaseInUseError):
        await trio.to_thread.run_sync(restore_snapshot, snapshot, h.db)
    await h.running.aclose()

    assert not list(await trio.Path(tmp_path).glob("*.before-restore-*"))


def test_restore_refuses_corrupt_foreign_and_newer_snapshots(tmp_path: Path) -> None:
    db = _make_db(tmp_path / "d.sqlite3")
    good = take_snapshot(db, tmp_path / "snaps")
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not a database" * 500)
    truncated = tmp_path / "truncated.sqlite3"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    damaged = tmp_path / "damaged.sqlite3"
    data = bytearray(good.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    data[page_size : 2 * page_size] = b"\xff" * page_size  # page 2: a b-tree page
    damaged.write_bytes(bytes(data))
    foreign = tmp_path / "foreign.sqlite3"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    newer = tmp_path / "newer.sqlite3"
    newer.write_bytes(good.read_bytes())
    with sqlite3.connect(newer) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = db.read_bytes()

    for bad, message in (
        (garbage, "not a usable SQLite database"),
        (truncated, "not ok"),
        (damaged, "not ok"),
        (foreign, "not a dongne database"),
        (newer, f"schema version {SCHEMA_VERSION + 1}, newer than this dongne"),
    ):
        out = _dongne("restore", str(bad), "--db", str(db), "--yes", cwd=tmp_path)
        assert out.returncode == 2, (bad.name, out.stderr)
        if message != "not ok":
            assert message in out.stderr
        else:
            assert "not restored" in out.stderr

    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["d.sqlite3", "snaps", garbage.name, truncated.name, damaged.name, foreign.name, newer.name]
    )


def test_restore_asks_first(tmp_path: Path) -> None:
    db = _make_db(tmp_path / "d.sqlite3")
    snapshot = take_snapshot(db, tmp_path / "snaps")
    missing = _dongne("restore", str(tmp_path / "nope.sqlite3"), "--db", str(db), "--yes", cwd=tmp_path)
    assert missing.returncode == 2
    assert "no snapshot at" in missing.stderr
    piped = _dongne("restore", str(snapshot), "--db", str(db), cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert piped.returncode == 2
    assert "--yes" in piped.stderr

    for answer, code, kept in ((b"n\n", 1, 0), (b"y\n", 0, 1)):
        controller, terminal = pty.openpty()
        try:
            os.write(controller, answer)
            out = _dongne("restore", str(snapshot), "--db", str(db), cwd=tmp_path, stdin=terminal, timeout=60)
        finally:
            os.close(terminal)
            os.close(controller)
        assert out.returncode == code, out.stderr
        assert "[y/N]" in out.stderr
        assert len(list(tmp_path.glob("d.sqlite3.before-restore-*"))) == kept


def test_restore_keeps_what_a_crashed_server_left_in_the_wal(tmp_path: Path) -> None:
    db = _make_db(tmp_path / "d.sqlite3")
    snapshot = take_snapshot(db, tmp_path / "snaps")
    # A process that commits and dies without checkpointing: the rows are only in d.sqlite3-wal.
    subprocess.run(
        [sys.executable, "-c", (
            "import os, sqlite3, sys\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('PRAGMA wal_autocheckpoint=0')\n"
            "c.execute('CREATE TABLE crash_marker (x)')\n"
            "c.execute('INSERT INTO crash_marker VALUES (42)')\n"
            "os._exit(0)\n"
        ), str(db)],
        check=True,
    )  # fmt: skip
    assert db.with_name("d.sqlite3-wal").stat().st_size > 0

    kept = restore_snapshot(snapshot, db, now=NOON)

    assert kept == tmp_path / "d.sqlite3.before-restore-20250501T120000Z"
    assert _rows(kept, "SELECT x FROM crash_marker") == [(42,)]
    assert _rows(db, "SELECT name FROM sqlite_master WHERE name = 'crash_marker'") == []
    assert not db.with_name("d.sqlite3-wal").exists()
    assert not db.with_name("d.sqlite3-shm").exists()
    # A second restore in the same second keeps the first copy.
    assert restore_snapshot(snapshot, db, now=NOON) == tmp_path / "d.sqlite3.before-restore-20250501T120000Z-1"


def test_restore_onto_a_new_path_and_cli_errors(tmp_path: Path) -> None:
    db = _make_db(tmp_path / "d.sqlite3")
    out = _dongne("snapshot", "--db", str(db), "--dir", "elsewhere", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    snapshot = Path(out.stdout.strip())
    assert snapshot.parent == tmp_path / "elsewhere"
    # [snapshots] dir from the environment, relative to the database's folder.
    out = _dongne("snapshot", "--db", str(db), cwd=tmp_path, env={"DONGNE_SNAPSHOTS_DIR": "nightly"})
    assert Path(out.stdout.strip()).parent == tmp_path / "nightly"
    out = _dongne("snapshot", "--db", str(tmp_path / "missing.sqlite3"), cwd=tmp_path)
    assert out.returncode == 2
    assert "no database at" in out.stderr
    assert not (tmp_path / "missing.sqlite3").exists()

    fresh = tmp_path / "new" / "d.sqlite3"
    out = _dongne("restore", str(snapshot), "--db", str(fresh), "--yes", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "previous database" not in out.stdout
    assert _rows(fresh, "PRAGMA integrity_check") == [("ok",)]


async def test_periodic_snapshots_prune_to_keep(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dongne.snapshots")
    db = await trio.to_thread.run_sync(_make_db, tmp_path / "d.sqlite3")
    settings = SnapshotSettings(dir="snaps", interval_s=60.0, keep=3)

    def written() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "dongne.snapshots" and "written" in r.getMessage()]

    async with trio.open_nursery() as nursery:
        progress = await nursery.start(run_periodic_snapshots, db, settings)
        stats = await progress.wait_attempts(5)
        # The task then sleeps 60 s: the cancel comes before a sixth snapshot starts.
        nursery.cancel_scope.cancel()

    assert stats == SnapshotStatistics(written=5, failed=0)
    assert len(written()) == 5
    kept = list_snapshots(tmp_path / "snaps", db)
    assert [Path(m.split()[1]) for m in written()][-3:] == kept
    assert all(_rows(p, "PRAGMA integrity_check") == [("ok",)] for p in kept)


async def test_periodic_pruning_keeps_the_snapshot_just_taken_after_the_clock_was_ahead(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Names sort by the wall clock: two snapshots taken while it was hours ahead sort after the one taken
    now. Pruning to two keeps that one (the newest taken) and the later of the two."""
    db = await trio.to_thread.run_sync(_make_db, tmp_path / "d.sqlite3")
    ahead = datetime.now(UTC) + timedelta(hours=6)
    earlier = [take_snapshot(db, tmp_path / "snaps", now=ahead + timedelta(hours=n)) for n in range(2)]
    async with trio.open_nursery() as nursery:
        progress = await nursery.start(run_periodic_snapshots, db, SnapshotSettings(dir="snaps", interval_s=60, keep=2))
        stats = await progress.wait_attempts(1)
        nursery.cancel_scope.cancel()

    [taken] = set(list_snapshots(tmp_path / "snaps", db)) - set(earlier)
    assert stats == SnapshotStatistics(written=1, failed=0)
    assert list_snapshots(tmp_path / "snaps", db) == [taken, earlier[1]]


async def test_periodic_snapshots_survive_errors_and_retry(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dongne.snapshots")
    db = await trio.to_thread.run_sync(_make_db, tmp_path / "d.sqlite3")
    (tmp_path / "snaps").write_text("a file where the folder should be")
    settings = SnapshotSettings(dir="snaps", interval_s=60.0, keep=2)

    def messages(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "dongne.snapshots" and r.levelno == level]

    async with trio.open_nursery() as nursery:
        progress = await nursery.start(run_periodic_snapshots, db, settings)
        failing = await progress.wait_attempts(2)
        (tmp_path / "snaps").unlink()  # before the next attempt: the task sleeps 60 s after each
        retried = await progress.wait_attempts(3)
        nursery.cancel_scope.cancel()

    assert (failing, retried) == (SnapshotStatistics(written=0, failed=2), SnapshotStatistics(written=1, failed=2))
    assert "snapshot failed" in messages(logging.ERROR)[0]
    assert any("written" in m for m in messages(logging.INFO))
    assert list_snapshots(tmp_path / "snaps", db)


async def test_periodic_snapshots_off(autojump_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    db = await trio.to_thread.run_sync(_make_db, tmp_path / "d.sqlite3")
    async with trio.open_nursery() as nursery:
        await nursery.start(run_periodic_snapshots, db, SnapshotSettings(dir="snaps", interval_s=0, keep=2))
    # The nursery closed by itself: the task returned.

    assert not (tmp_path / "snaps").exists()
