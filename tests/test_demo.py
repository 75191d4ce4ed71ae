"""`dongne demo`: a newcomer sees the system live within seconds."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from dongne.client import open_client

URL = re.compile(rb"Dashboard: (http://127\.0\.0\.1:(\d+)/admin/login\?code=(\S+))")
APP = re.compile(rb"(Traveller|Local): +http://127\.0\.0\.1:(\d+)/#token=(\S+)")


async def test_demo_prints_a_dashboard_url_and_comes_alive(tmp_path: Path) -> None:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "dongne", "demo", "--port", "0", "--ops-port", "0", "--duration", "12",
         "--locals", "20", "--travellers", "8", "--seed", "7"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        out = b""
        with trio.fail_after(30):
            while not (match := URL.search(out)):
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, out
                out += chunk
        login, ops_port = match.group(1).decode(), int(match.group(2))
        links = {m.group(1): (int(m.group(2)), m.group(3).decode()) for m in APP.finditer(out)}
        assert links.keys() == {b"Traveller", b"Local"}
        for role, (port, token) in links.items():
            # The link opens the web app; its token signs in the right kind of user.
            async with httpx.AsyncClient() as http:
                assert (await http.get(f"http://127.0.0.1:{port}/config.json")).status_code == 200
            async with open_client(f"ws://127.0.0.1:{port}", token) as me:
                assert me.hello["user"]["local"] is (role == b"Local")
        async with httpx.AsyncClient(follow_redirects=True) as http:
            # The page posts the code back (a link preview that only GETs does not use it up).
            page = await http.post(f"http://127.0.0.1:{ops_port}/admin/login", data={"code": match.group(3).decode()})
            assert page.status_code == 200
            assert login.endswith(match.group(3).decode())
            assert "data-region" in page.text or "dashboard" in page.text.lower()
            state: dict = {}  # type: ignore[type-arg]
            with trio.fail_after(20):
                while state.get("open_questions", 0) < 1 or state.get("locals_online", 0) < 5:
                    await trio.sleep(0.5)
                    state = (await http.get(f"http://127.0.0.1:{ops_port}/admin/api/state")).json()
        assert state["connections"] >= 20
        with trio.fail_after(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # The temporary database went with it.
    assert not list(await trio.Path(tmp_path).iterdir())
