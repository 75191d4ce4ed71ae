"""The `dongne` command as an operator runs it: a real process, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
import trio_websocket

from dongne.client import open_client

from .conftest import question_data

LISTENING = re.compile(rb"clients ws://[^:]+:(\d+)\s+ops http://[^:]+:(\d+)")


async def _read_ports(proc: trio.Process) -> tuple[int, int, bytearray]:
    assert proc.stderr is not None
    seen = bytearray()
    with trio.fail_after(30):
        while True:
            chunk = await proc.stderr.receive_some(4096)
            if not chunk:
                raise AssertionError(f"server exited early: {seen.decode(errors='replace')}")
            seen += chunk
            match = LISTENING.search(seen)
            if match:
                return int(match.group(1)), int(match.group(2)), seen


async def _http_get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(4096):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _token(tmp_path: Path, user: str, *extra: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "dongne", "token", user, "--db", str(tmp_path / "d.sqlite3"), *extra],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    return out.stdout.strip()


async def _exit_and_stderr(proc: trio.Process, seen: bytes) -> tuple[int, bytes]:
    """Wait (10 s at most) for the server to exit; its exit code and all it wrote to stderr."""
    with trio.fail_after(10):
        code = await proc.wait()
        assert proc.stderr is not None
        while chunk := await proc.stderr.receive_some(65536):
            seen += chunk
    return code, seen


async def test_serve_token_health_and_graceful_sigterm(tmp_path: Path) -> None:
    db = tmp_path / "d.sqlite3"
    asker_token = _token(tmp_path, "asker", "--nick", "Mina")
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "dongne", "serve", "--db", str(db), "--port", "0", "--ops-port", "0"],
        stderr=subprocess.PIPE, cwd=tmp_path,
    )  # fmt: skip
    try:
        port, ops_port, seen = await _read_ports(proc)
        for p in (port, ops_port):
            status, body = await _http_get(p, "/health")
            assert (status, body["status"]) == (200, "ok")
            status, body = await _http_get(p, "/ready")
            assert (status, body["ready"]) == (200, True)
        # The token printed before the server first ran is accepted: they share the secret file.
        assert (db.parent / "d.sqlite3.jwt-secret").exists()
        async with open_client(f"ws://127.0.0.1:{port}", asker_token) as asker:
            assert asker.hello["user"]["nick"] == "Mina"
            qid = (await asker.request("create_question", question_data()))["question"]["question_id"]
            started = trio.current_time()
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                with trio.fail_after(10):
                    await asker.ws.get_message()
            assert closed.value.reason.code == 1001
        code, seen = await _exit_and_stderr(proc, seen)
        assert code == 0
        assert trio.current_time() - started < 5.0
        # Structured logs: one JSON object per line, ids but never the question's text.
        records = [json.loads(line) for line in seen.decode().splitlines() if line.strip()]
        assert all({"time", "level", "logger", "event"} <= r.keys() for r in records)
        created = [r for r in records if r["event"] == "question_created"]
        assert created and created[0]["question_id"] == qid and created[0]["region"] == "Jeju-si"
        assert any(r["event"] == "connection_closed" and r["close_code"] == 1001 for r in records)
        assert question_data()["title"] not in seen.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # Restarted, the question is still there.
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "dongne", "serve", "--db", str(db), "--port", "0", "--ops-port", "0"],
        stderr=subprocess.PIPE, cwd=tmp_path,
    )  # fmt: skip
    try:
        port, _, _ = await _read_ports(proc)
        async with open_client(f"ws://127.0.0.1:{port}", _token(tmp_path, "reader")) as reader:
            state = await reader.request("join_question", {"question_id": qid})
            assert state["question"]["asker_nick"] == "Mina"
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_bad_config_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nport = "eighty"\n')
    out = subprocess.run(
        [sys.executable, "-m", "dongne", "serve", "--config", str(bad)], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 2
    assert "[server] port must be an integer" in out.stderr
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[server]\nprot = 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "dongne", "serve", "--config", str(unknown)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "unknown setting [server] prot" in out.stderr


def test_bad_region_file_is_refused(tmp_path: Path) -> None:
    regions = tmp_path / "regions.geojson"
    regions.write_text('{"type": "FeatureCollection", "features": []}')
    out = subprocess.run(
        [sys.executable, "-m", "dongne", "serve", "--db", str(tmp_path / "d.sqlite3"), "--regions", str(regions)],
        capture_output=True, text=True, cwd=tmp_path, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2
    assert "regions.geojson" in out.stderr


def test_bad_region_file_in_the_config_is_refused_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "regions.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    config = tmp_path / "config.toml"
    config.write_text('[location]\nregions_file = "regions.geojson"\n')
    out = subprocess.run(
        [sys.executable, "-m", "dongne", "serve", "--config", str(config), "--db", str(tmp_path / "d.sqlite3")],
        capture_output=True, text=True, cwd=tmp_path, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2
    assert "[location] regions_file" in out.stderr and "regions.geojson" in out.stderr
    assert "Traceback" not in out.stderr


async def test_second_server_on_the_same_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "d.sqlite3"
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "dongne", "serve", "--db", str(db), "--port", "0", "--ops-port", "0"],
        stderr=subprocess.PIPE, cwd=tmp_path,
    )  # fmt: skip
    try:
        await _read_ports(proc)
        second = await trio.run_process(
            [sys.executable, "-m", "dongne", "serve", "--db", str(db), "--port", "0", "--ops-port", "0"],
            capture_stderr=True, check=False, cwd=tmp_path,
        )  # fmt: skip
        assert second.returncode == 2
        assert b"another server" in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await proc.wait()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "d.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 999")
    out = subprocess.run(
        [sys.executable, "-m", "dongne", "serve", "--db", str(db), "--port", "0", "--ops-port", "0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2
    assert "newer than this dongne" in out.stderr


async def test_a_second_sigint_during_shutdown_is_ignored(tmp_path: Path) -> None:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "dongne", "serve", "--db", str(tmp_path / "d.sqlite3"), "--port", "0", "--ops-port", "0"],
        stderr=subprocess.PIPE, cwd=tmp_path,
    )  # fmt: skip
    try:
        _, _, seen = await _read_ports(proc)
        proc.send_signal(signal.SIGINT)  # Ctrl+C, and again while it shuts down
        proc.send_signal(signal.SIGINT)
        code, seen = await _exit_and_stderr(proc, seen)
        assert code == 0
        assert b"Traceback" not in seen and b"KeyboardInterrupt" not in seen
        assert b'"database closed"' in seen
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _dongne(tmp_path: Path, *argv: str, secret: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DONGNE_")}
    if secret:
        env["DONGNE_JWT_SECRET"] = secret
    return subprocess.run(
        [sys.executable, "-m", "dongne", *argv], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )


def test_postgresql_urls_get_one_clear_line_for_what_they_cannot_do(tmp_path: Path) -> None:
    """No PostgreSQL needed: a server nobody listens for, and the commands that are for SQLite files."""
    url = f"postgresql:///dongne?host={tmp_path / 'nobody-here'}"
    secret = "cli-secret-0123456789-0123456789-0123456789"
    unreachable = _dongne(tmp_path, "serve", "--db", url, "--port", "0", "--ops-port", "0", secret=secret)
    no_secret = _dongne(tmp_path, "serve", "--db", url, "--port", "0", "--ops-port", "0")
    snapshot = _dongne(tmp_path, "snapshot", "--db", url)
    restore = _dongne(tmp_path, "restore", str(tmp_path / "some.sqlite3"), "--db", url, "--yes")
    token = _dongne(tmp_path, "token", "u1", "--db", url, secret=secret)
    not_a_db = _dongne(tmp_path, "serve", "--db", "mysql://localhost/dongne")
    bad_url = _dongne(tmp_path, "serve", "--db", "postgresql://u:pw@db/dongne?bogus=1", secret=secret)

    for done in (unreachable, no_secret, snapshot, restore, not_a_db, bad_url):
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("dongne:"), done.stderr
    assert "cannot open the database" in unreachable.stderr and "nobody-here" in unreachable.stderr
    assert "jwt_secret" in no_secret.stderr
    assert "pg_dump" in snapshot.stderr and "pg_dump" in restore.stderr
    assert "neither a SQLite file path nor a postgresql:// URL" in not_a_db.stderr
    assert "bogus" in bad_url.stderr and "pw" not in bad_url.stderr  # the password never printed
    assert token.returncode == 0 and token.stdout.count(".") == 2  # a JWT, with no database needed
    assert list(tmp_path.iterdir()) == []  # no SQLite file or secret was made on the side


@pytest.mark.parametrize("which", ["--port", "--ops-port", "demo"])
def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path, which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        if which == "demo":
            argv = ["demo", "--port", port, "--ops-port", "0", "--locals", "1", "--travellers", "1", "--duration", "5"]
        else:
            argv = ["serve", "--db", str(tmp_path / "d.sqlite3"), "--host", "127.0.0.1", "--port", "0",
                    "--ops-port", "0", which, port]  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-m", "dongne", *argv], capture_output=True, text=True, cwd=tmp_path, timeout=60
        )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "cannot listen on" in out.stderr and "in use" in out.stderr


def test_a_missing_region_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dongne", "serve", "--db", str(tmp_path / "d.sqlite3"), "--regions", "nowhere.json"],
        capture_output=True, text=True, cwd=tmp_path, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--regions: cannot read nowhere.json" in out.stderr


def test_an_empty_or_short_secret_is_refused_naming_where_it_came_from(tmp_path: Path) -> None:
    db = tmp_path / "d.sqlite3"
    (tmp_path / "d.sqlite3.jwt-secret").write_text("")  # a first start that ran out of space after creating it
    empty = _dongne(tmp_path, "serve", "--db", str(db), "--port", "0", "--ops-port", "0")
    token = _dongne(tmp_path, "token", "u1", "--db", str(db))
    short = _dongne(tmp_path, "serve", "--db", str(tmp_path / "e.sqlite3"), "--port", "0", secret="hunter2")
    for refused in (empty, token, short):
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "d.sqlite3.jwt-secret is empty" in empty.stderr and "at least 32 bytes" in empty.stderr
    assert "jwt_secret (or DONGNE_JWT_SECRET) is too short" in short.stderr


def test_a_generated_secret_is_written_whole_and_kept(tmp_path: Path) -> None:
    db = tmp_path / "d.sqlite3"
    first = _dongne(tmp_path, "token", "u1", "--db", str(db))
    again = _dongne(tmp_path, "token", "u1", "--db", str(db))
    assert first.returncode == again.returncode == 0
    kept = (tmp_path / "d.sqlite3.jwt-secret").read_text().strip()
    assert len(kept) >= 32 and sorted(p.name for p in tmp_path.iterdir()) == ["d.sqlite3.jwt-secret"]
    claims = jwt.decode(first.stdout.strip(), kept, algorithms=["HS256"])  # signed with the kept secret
    assert claims["sub"] == "u1"


def test_token_refuses_to_print_what_the_server_would_refuse(tmp_path: Path) -> None:
    db = str(tmp_path / "d.sqlite3")
    for argv, why in (
        (("u" * 65,), "sub must be a string of 1..64 chars"),
        (("u1", "--tags", "x" * 41), "tags must be a list of up to 20 short strings"),
        (("u1", "--ttl", "-100"), "expired"),
    ):
        out = _dongne(tmp_path, "token", *argv, "--db", db)
        assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr, out.stderr
        assert "the server would refuse this token" in out.stderr and why in out.stderr, out.stderr
