"""The admin dashboard in a real browser: Debian's chromium driven by Playwright.

The server runs as ``python -m dongne serve`` in a subprocess (ports from its
log line); WebSocket clients run in a helper thread with their own ``trio.run``;
the test itself is plain sync code, Playwright's sync API.
Screenshot: ``test-artifacts/admin-dashboard.png``.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from dongne.auth import mint_token
from dongne.client import open_client

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
SECRET = "browser-test-secret-0123456789-0123456789"
LISTENING = re.compile(r"clients (ws://\S+:\d+)\s+ops (http://\S+:\d+)")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium; apt-get install chromium)"
)


def mint(user_id: str, **claims: Any) -> str:
    return mint_token(SECRET, user_id, now_s=time.time(), **claims)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """``(client_url, ops_url)`` of a ``dongne serve`` subprocess, stopped with SIGTERM afterwards."""
    log_path = tmp_path / "server.log"
    env = {**os.environ, "DONGNE_JWT_SECRET": SECRET, "DONGNE_SNAPSHOTS_INTERVAL_S": "0"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dongne",
                "serve",
                "--port",
                "0",
                "--ops-port",
                "0",
                "--db",
                str(tmp_path / "db.sqlite3"),
            ],
            cwd=tmp_path,  # no ./config.toml
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while (match := LISTENING.search(log_path.read_text())) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield match.group(1), match.group(2)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Scenario:
    """Clients in a helper thread: two locals online, questions asked, one answered.

    ``ids`` receives each question id once it is created (or an exception);
    the connections stay open until ``stop()``.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.ids: queue.Queue[str | BaseException] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scenario", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def next_id(self) -> str:
        item = self.ids.get(timeout=30)
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started: a failure before start() must not be masked here
            self._thread.join(timeout=15)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self.ids.put(exc)

    async def _main(self) -> None:
        async with (
            open_client(self.url, mint("local1", nick="Jun", local=True, tags=["food"])) as local1,
            open_client(self.url, mint("local2", nick="Hana", local=True)) as local2,
            open_client(self.url, mint("traveller", nick="Mina")) as asker,
        ):
            await local1.request("update_location", {"location": {"lat": 33.5005, "lng": 126.5290}, "accuracy_m": 20.0})
            await local2.request("update_location", {"location": {"lat": 33.2530, "lng": 126.5600}, "accuracy_m": 20.0})
            asks = [
                {"title": "Where is the best black pork near the port?", "location": {"lat": 33.4996, "lng": 126.5312},
                 "hashtags": ["food", "blackpork"]},
                {"title": "Is Seongsan Ilchulbong worth it at sunrise tomorrow?", "location": {"lat": 33.4585, "lng": 126.9410},
                 "hashtags": ["hiking"]},
                # Entities are decoded server-side: the title really is "<img src=x onerror=...> ...".
                {"title": "&lt;img src=x onerror=window.__pwned=1&gt; Any quiet beach near Aewol?",
                 "location": {"lat": 33.4636, "lng": 126.3100}},
                {"title": "Pharmacy open now near Seogwipo harbour?", "location": {"lat": 33.2400, "lng": 126.5600},
                 "urgency": "urgent"},
            ]  # fmt: skip
            for i, data in enumerate(asks):
                question = (await asker.request("create_question", data))["question"]
                if i == 0:
                    await local1.request("join_question", {"question_id": question["question_id"]})
                    await local1.request(
                        "create_answer", {"question_id": question["question_id"], "content": "Dombedon, till 2am"}
                    )
                self.ids.put(question["question_id"])
            await trio.to_thread.run_sync(self._stop.wait)


def test_dashboard_in_a_browser(served: tuple[str, str]) -> None:
    """Log in, see all 15 regions, see new questions within 2 s, take a screenshot."""
    from playwright.sync_api import sync_playwright

    client_url, ops_url = served
    ARTIFACTS.mkdir(exist_ok=True)
    scenario = Scenario(client_url)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--no-first-run",
                  "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        try:
            page.goto(f"{ops_url}/admin")
            page.fill("#token", mint("boss", nick="Ops on call", admin=True))
            page.click("#login-form button[type=submit]")
            page.wait_for_url(f"{ops_url}/admin")
            # Predicates are functions, not expressions: Playwright evals an
            # expression again on every animation frame, which the page's CSP
            # (no 'unsafe-eval') refuses; a function is evaluated once, by DevTools.
            page.wait_for_function("() => document.querySelectorAll('#map [data-region]').length > 0", timeout=5000)
            assert page.locator("[data-region]").count() == 15
            assert page.evaluate("document.cookie") == ""  # HttpOnly: invisible to scripts
            page.wait_for_selector("#live-status[data-state=live]", timeout=5000)

            scenario.start()
            ids = []
            for _ in range(4):
                qid = scenario.next_id()  # returns once the server acknowledged the question
                page.wait_for_selector(f'#questions-table tr[data-question-id="{qid}"]', timeout=2000)
                ids.append(qid)
            for qid in ids:
                assert page.locator(f'#map [data-map-question-id="{qid}"]').count() == 1
            # User text is shown as text, never parsed as HTML.
            title = page.locator(f'tr[data-question-id="{ids[2]}"] .title').text_content()
            assert title is not None and title.startswith("<img src=x onerror=")
            assert page.locator("#questions-table img").count() == 0
            assert page.evaluate("window.__pwned") is None
            # The answered region turns green; locals are counted; rates come from two samples.
            page.wait_for_selector('[data-region="Jeju-si"][data-slo="good"]', timeout=3000)
            page.wait_for_function(
                "() => document.querySelector('[data-region-row=\"Jeju-si\"]').cells[1].textContent === '1'",
                timeout=3000,
            )
            page.wait_for_function(
                "() => document.getElementById('stat-frames-rate').textContent !== '—'", timeout=3000
            )
            # The node, alone on its SQLite file.
            assert page.locator("#nodes-list [data-node-id]").count() == 1
            assert (page.locator("#nodes-list .title").text_content() or "").endswith("(this node)")
            page.wait_for_timeout(1200)  # one more event, so the screenshot shows settled rates
            assert errors == []  # no script errors, no CSP violations, nothing failed to load
        finally:
            try:
                page.screenshot(path=str(ARTIFACTS / "admin-dashboard.png"), full_page=True)
            finally:
                browser.close()
                scenario.stop()
