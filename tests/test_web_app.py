"""The traveller-and-local web app in a real browser: Debian's chromium driven by Playwright.

``dongne serve`` runs as a subprocess and serves the built app (``dongne/web/static``) on
its client port. Two browser contexts, a traveller and a local 800 m apart in Jeju City,
use the app as people do: the traveller asks, the local is alerted and answers, the
traveller accepts. Then the server is stopped (SIGTERM) and started again on the same port
and database: both pages recover without a reload, and an alert raised while the local's
page was offline arrives exactly once (as a system notification too, the page being hidden). A second test gives the app a street map from a tile
server on 127.0.0.1.

Every page is watched throughout: no console errors, no request to another host, and
axe-core (from clients/node_modules) finds no serious or critical violation on any screen.
Screenshots: ``test-artifacts/web-*.png``.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from dongne.auth import mint_token
from dongne.client import open_client

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
AXE = ROOT / "clients" / "node_modules" / "axe-core" / "axe.min.js"
SECRET = "web-app-test-secret-0123456789-0123456789"
LISTENING = re.compile(r"clients ws://(\S+):(\d+)\s+ops http://\S+:\d+")

# Jeju City: the traveller near city hall, the local 800 m east of them.
TRAVELLER_AT = {"latitude": 33.4996, "longitude": 126.5312}
LOCAL_AT = {"latitude": 33.4996, "longitude": 126.5398}
PHONE = {"width": 390, "height": 844}
# VIBRATION.strong in clients/web/src/signal.ts: what `vibration: "strong"` plays.
STRONG = [400, 150, 400, 150, 600]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium; apt-get install chromium)"
)

# Records navigator.vibrate calls, system notifications (permission granted; shown through the
# service worker's registration or `new Notification`, whichever the app uses; the page is
# "hidden" while window.__hidden is set) and every alert card the page shows (by question id).
WATCH_SCRIPT = """
window.__notifications = [];
window.__hidden = false;
Object.defineProperty(Document.prototype, "visibilityState", {
  configurable: true, get() { return window.__hidden ? "hidden" : "visible"; },
});
window.Notification = class {
  static permission = "granted";
  static requestPermission() { return Promise.resolve("granted"); }
  constructor(title, options) { window.__notifications.push({ title, tag: options && options.tag, via: "page" }); }
  close() {}
};
// Android Chrome's way (and the app's first choice): through the service worker's registration.
if (window.ServiceWorkerRegistration) {
  ServiceWorkerRegistration.prototype.showNotification = function (title, options) {
    window.__notifications.push({ title, tag: options && options.tag, via: "worker" });
    return Promise.resolve();
  };
}
window.__vibrations = [];
Object.defineProperty(Navigator.prototype, "vibrate", {
  configurable: true,
  value: function (pattern) { window.__vibrations.push(Array.isArray(pattern) ? pattern.slice() : [pattern]); return true; },
});
window.__alertsShown = {};
new MutationObserver((records) => {
  for (const record of records) for (const node of record.addedNodes) {
    if (node.nodeType === 1 && node.matches(".alert-card")) {
      const id = node.getAttribute("data-question-id");
      window.__alertsShown[id] = (window.__alertsShown[id] || 0) + 1;
    }
  }
}).observe(document, { childList: true, subtree: true });
"""


def mint(user_id: str, **claims: Any) -> str:
    return mint_token(SECRET, user_id, now_s=time.time(), **claims)


class Server:
    """``dongne serve`` in a subprocess; ``restart()`` brings it back on the same port and database."""

    def __init__(self, tmp_path: Path, config: Path | None = None) -> None:
        self.tmp_path = tmp_path
        self.config = config
        self.port = 0
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def start(self) -> None:
        self.starts += 1
        log_path = self.tmp_path / f"server-{self.starts}.log"
        env = {**os.environ, "DONGNE_JWT_SECRET": SECRET, "DONGNE_SNAPSHOTS_INTERVAL_S": "0"}
        args = [sys.executable, "-m", "dongne", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--ops-port", "0", "--db", str(self.tmp_path / "db.sqlite3")]  # fmt: skip
        if self.config is not None:
            args += ["--config", str(self.config)]
        with log_path.open("w") as log:
            self.proc = subprocess.Popen(
                args, cwd=self.tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while (match := LISTENING.search(log_path.read_text())) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        self.host, self.port = match.group(1), int(match.group(2))

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def launch(p: Any) -> Any:
    """Debian's chromium, headless; Playwright gives each launch a fresh profile of its own."""
    return p.chromium.launch(
        executable_path=str(CHROMIUM),
        headless=True,
        args=["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--no-first-run",
              "--disable-component-update", "--disable-sync", "--disable-default-apps"],
    )  # fmt: skip


class Watched:
    """A page with its console errors, page errors and every request and WebSocket it opened."""

    def __init__(self, context: Any, name: str) -> None:
        self.name = name
        self.page = context.new_page()
        self.errors: list[str] = []
        self.log: list[str] = []  # every console message, for the report of a failure
        self.requests: list[str] = []
        self.tolerated: re.Pattern[str] | None = None
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("websocket", lambda ws: self.requests.append(ws.url))

    def _console(self, message: Any) -> None:
        self.log.append(f"{time.monotonic():.3f} {message.type}: {message.text}")
        if message.type != "error":
            return
        if self.tolerated is not None and self.tolerated.search(message.text):
            return
        self.errors.append(message.text)

    def axe(self, screen: str) -> None:
        """axe-core on what the page shows now: no serious or critical violation."""
        if not self.page.evaluate("() => typeof window.axe === 'object'"):
            # The page's CSP refuses inline scripts; the test's own evaluation is not subject to it.
            self.page.evaluate(AXE.read_text() + "\n;undefined")
        result = self.page.evaluate(
            "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
            ".filter(v => v.impact === 'serious' || v.impact === 'critical')"
            ".map(v => ({id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 5)}))"
        )
        assert result == [], f"{self.name} {screen}: {json.dumps(result, indent=1)}"

    def wait_open(self, timeout: float = 15_000) -> None:
        """Until the page's session is open (its hello answered, rooms and position restored)."""
        try:
            self.page.wait_for_selector("#conn-state[data-state=open]", timeout=timeout)
        except Exception as exc:
            shown = self.page.evaluate("() => document.body.innerText.slice(0, 400)")
            raise AssertionError(f"{self.name} did not connect: {shown!r}\n" + "\n".join(self.log[-30:])) from exc

    def shoot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"web-{name}.png"))


def new_context(browser: Any, server: Server, at: dict[str, float]) -> Any:
    context = browser.new_context(
        viewport=PHONE, device_scale_factor=2, locale="ko-KR", timezone_id="Asia/Seoul",
        geolocation={**at, "accuracy": 20}, permissions=["geolocation"],
    )  # fmt: skip
    context.add_init_script(WATCH_SCRIPT)
    return context


def ask_from_python(url: str, token: str, data: dict[str, Any]) -> str:
    """Ask a question over the Python client; returns its id once the server has acknowledged it."""

    async def main() -> str:
        async with open_client(url, token) as client:
            reply = await client.request("create_question", data)
            return str(reply["question"]["question_id"])

    return trio.run(main)


def wait_until_no_local_near(url: str, token: str, at: dict[str, float], timeout_s: float = 10.0) -> None:
    """Poll ``nearby_locals`` (bounded) until no local is live within 2 km of ``at``."""

    async def main() -> None:
        async with open_client(url, token) as client:
            with trio.fail_after(timeout_s):
                # The browser's close reaching the server: another process, no event to wait on.
                while (await client.request("nearby_locals", {"location": at}))["within_2km"]:  # noqa: ASYNC110
                    await trio.sleep(0.05)

    trio.run(main)


def test_traveller_and_local(server: Server, tmp_path: Path) -> None:
    """Ask, alert (within 2 s, strong vibration), answer (seen within 1 s), accept, points; a restart survived."""
    from playwright.sync_api import sync_playwright

    own = re.compile(rf"^(https?|wss?)://{re.escape(server.host)}:{server.port}/")
    with sync_playwright() as p:
        browser = launch(p)
        traveller_ctx = new_context(browser, server, TRAVELLER_AT)
        local_ctx = new_context(browser, server, LOCAL_AT)
        traveller = Watched(traveller_ctx, "traveller")
        local = Watched(local_ctx, "local")
        watched_pages = [traveller, local]  # every page the test opens: all are checked at the end
        try:
            # Sign-in by link: the token leaves the address bar and stays in localStorage.
            local.page.goto(f"{server.url}/#token={mint('jun', nick='Jun', local=True)}")
            local.wait_open()

            # The local makes where they are their home (so alerts reach them offline), then shares it live.
            local.page.click("[data-tab=settings]")
            local.page.wait_for_selector("#home-line")
            local.page.wait_for_function("() => document.querySelector('#set-cap').value !== ''")
            local.axe("settings")
            local.page.click("#home-set")
            local.page.wait_for_function("() => /33\\.49/.test(document.querySelector('#home-line').textContent)")
            local.page.click("[data-tab=profile]")
            local.page.wait_for_selector("#my-answers li")
            local.axe("profile")
            local.page.click("[data-tab=nearby]")
            local.page.wait_for_selector("#sharing[data-live=true]", timeout=5000)
            local.page.wait_for_selector("#nearby-questions li")
            local.axe("nearby")

            # Without a token the traveller gets the sign-in screen; then the link signs them in.
            traveller.page.goto(f"{server.url}/")
            traveller.page.wait_for_selector("#signin-form")
            traveller.axe("sign-in")
            traveller.page.goto(f"{server.url}/#token={mint('mina', nick='Mina')}")
            traveller.wait_open()
            for watched in (traveller, local):
                assert "token" not in watched.page.url
                assert watched.page.evaluate("() => localStorage.getItem('dongne.token')")

            # The traveller sees one local within 2 km before asking.
            traveller.page.wait_for_function(
                "() => document.querySelector('#locals-2km').textContent.startsWith('1')", timeout=5000
            )
            traveller.axe("ask")
            traveller.page.fill("#ask-title", "항구 근처 흑돼지 맛집 어디인가요?")
            traveller.page.fill("#ask-body", "오늘 저녁 두 명입니다.")
            traveller.page.fill("#ask-tags", "#food 흑돼지")
            asked_at = time.monotonic()
            traveller.page.click("#ask-submit")
            traveller.page.wait_for_url(re.compile(r"#/q/q\w+$"), timeout=5000)
            qid = traveller.page.url.rsplit("/", 1)[1]

            # The local's alert: within 2 s, with the strong vibration (IMMEDIATE stage).
            card = f'.alert-card[data-question-id="{qid}"]'
            local.page.wait_for_selector(card, timeout=2000)
            assert time.monotonic() - asked_at < 2.0
            assert local.page.evaluate("() => window.__vibrations") == [STRONG]
            local.axe("alert")
            local.shoot("local-alert")

            # The local answers from the alert; the traveller sees it within 1 s and accepts it.
            local.page.fill(f"{card} textarea", "돈사돈 추천해요. 새벽 2시까지 열어요.")
            local.page.click(f"{card} button[type=submit]")
            answered_at = time.monotonic()
            traveller.page.wait_for_selector("#answers [data-answer-id]", timeout=1000)
            assert time.monotonic() - answered_at < 1.0
            assert "돈사돈" in traveller.page.inner_text("#answers")
            # The local, now in the question's room, starts another answer: presence and typing reach the traveller.
            local.page.wait_for_url(re.compile(rf"#/q/{qid}$"))
            traveller.page.wait_for_selector("#presence:has-text('Jun')", timeout=3000)
            local.page.fill("#answer-content", "그리고 ")
            traveller.page.wait_for_selector("#typing:has-text('Jun')", timeout=3000)
            traveller.axe("question")
            traveller.page.click("[data-accept]")
            local.page.wait_for_function(
                "() => document.querySelector('#points-value').textContent.includes('10')", timeout=3000
            )
            local.page.wait_for_selector("#answers .answer.accepted", timeout=3000)
            traveller.page.wait_for_selector("#answers .answer.accepted")
            traveller.shoot("traveller-question")
            local.shoot("local-accepted")
            local.axe("question")

            traveller.page.click("[data-tab=mine]")
            traveller.page.wait_for_selector(f'#my-questions [data-question-id="{qid}"]')
            traveller.axe("mine")
            # English, and back: every string comes from the one table.
            traveller.page.click("#lang-switch")
            traveller.page.wait_for_selector("html[lang=en] #screen-title:has-text('My questions')")
            traveller.axe("mine, in English")
            traveller.page.click("#lang-switch")
            traveller.page.wait_for_selector("html[lang=ko]")

            # A restart: SIGTERM, then the same port and database. The local's page is offline meanwhile.
            for watched in (traveller, local):
                watched.page.evaluate("() => { window.__sameDocument = true; }")
                watched.tolerated = re.compile(r"WebSocket connection to 'ws://[^']+/ws' failed")
            local_ctx.set_offline(True)
            server.stop()
            traveller.page.wait_for_selector("#reconnecting", timeout=5000)
            local.page.wait_for_selector("#reconnecting", timeout=5000)
            traveller.shoot("traveller-reconnecting")
            server.start()
            traveller.wait_open(timeout=20_000)
            traveller.page.wait_for_selector("#reconnecting", state="detached")

            # Someone asks near the local's home while the local's page is offline: the QUICK stage
            # (3 s, locals within 5 km, offline ones by their home) stores an alert for them.
            q2 = ask_from_python(
                server.ws_url,
                mint("sora", nick="Sora"),
                {"title": "Is the Dongmun market open tonight?", "location": {"lat": 33.5115, "lng": 126.5270}},
            )
            time.sleep(4.5)
            assert local.page.get_attribute("#conn-state", "data-state") != "open"  # still cut off
            local.page.evaluate("() => { window.__hidden = true; }")  # the local's phone is in a pocket
            local_ctx.set_offline(False)
            local.wait_open(timeout=20_000)
            card2 = f'.alert-card[data-question-id="{q2}"]'
            local.page.wait_for_selector(card2, timeout=5000)
            time.sleep(1.0)  # a second delivery, if there were one, would have come by now
            assert local.page.evaluate("() => window.__alertsShown") == {qid: 1, q2: 1}
            assert local.page.locator(".alert-card").count() == 1
            assert len(local.page.evaluate("() => window.__vibrations")) == 2
            # Through the service worker (the only way Android Chrome shows one), registered by the app.
            notes = local.page.evaluate("() => window.__notifications")
            assert [(n["tag"], n["via"]) for n in notes] == [(q2, "worker")]
            assert local.page.evaluate(
                "async () => (await navigator.serviceWorker.getRegistration()).active.scriptURL"
            ) == (f"{server.url}/sw.js")
            local.page.evaluate("() => { window.__hidden = false; }")
            for watched in (traveller, local):
                assert watched.page.evaluate("() => window.__sameDocument") is True  # no reload

            # The unread badges: the traveller's answer; the local's alerts and the acceptance.
            assert int(traveller.page.inner_text("#unread-badge")) >= 1
            assert int(local.page.inner_text("#unread-badge")) >= 3
            # The traveller's inbox after the restart: the answer and the acceptance's notice are there.
            traveller.page.click("[data-tab=inbox]")
            traveller.page.wait_for_selector("#notifications .n-item")
            traveller.axe("inbox")
            local.page.click("[data-tab=inbox]")
            local.page.wait_for_selector('#notifications [data-type="new_question_notification"]')
            local.axe("inbox")
            traveller.shoot("traveller-inbox")
            local.shoot("local-inbox")

            # The local closes the app; an alert comes meanwhile. Opened again (signed in by
            # localStorage), the page resumes from the last seq it kept: that alert is shown, once,
            # and none of those shown before comes back.
            local.page.close()
            # The browser closes the socket a little later: ask only once the server has seen the
            # local leave (else the alert goes to the closing page, which may keep its seq unseen).
            wait_until_no_local_near(server.ws_url, mint("sora", nick="Sora"), {"lat": 33.5120, "lng": 126.5250})
            q3 = ask_from_python(
                server.ws_url,
                mint("sora", nick="Sora"),
                {"title": "Any late-night pharmacy near Jungang-ro?", "location": {"lat": 33.5120, "lng": 126.5250}},
            )
            time.sleep(4.0)  # the QUICK stage, as above
            again = Watched(local_ctx, "local, reopened")
            watched_pages.append(again)
            again.page.goto(f"{server.url}/")
            again.wait_open()
            again.page.wait_for_selector(f'.alert-card[data-question-id="{q3}"]', timeout=5000)
            time.sleep(0.5)
            assert again.page.evaluate("() => window.__alertsShown") == {q3: 1}

            for watched in watched_pages:
                assert watched.errors == [], f"{watched.name}: {watched.errors}"
                foreign = [url for url in watched.requests if not own.match(url) and not url.startswith("data:")]
                assert foreign == [], f"{watched.name} asked other hosts: {foreign}"
        finally:
            browser.close()


def test_two_tabs_one_profile(server: Server) -> None:
    """Two tabs of one browser, two users (as ``dongne demo`` suggests): each stays itself across a restart.

    The tabs share localStorage: the second link's token is the one a new tab starts with, but
    the first tab keeps its own, asks before a link for another user replaces it, and comes back
    after the restart as the user it was. The local's alert card fits a 360x640 phone with a
    200-character title and five hashtags; signing out of one tab leaves the other signed in.
    """
    from playwright.sync_api import sync_playwright

    own = re.compile(rf"^(https?|wss?)://{re.escape(server.host)}:{server.port}/")
    with sync_playwright() as p:
        browser = launch(p)
        context = browser.new_context(
            viewport={"width": 360, "height": 640}, device_scale_factor=2, locale="ko-KR", timezone_id="Asia/Seoul",
            geolocation={**LOCAL_AT, "accuracy": 20}, permissions=["geolocation"],
        )  # fmt: skip
        context.add_init_script(WATCH_SCRIPT)
        mina = Watched(context, "mina's tab")
        jun = Watched(context, "jun's tab")
        try:
            mina.page.goto(f"{server.url}/#token={mint('mina', nick='Mina')}")
            mina.wait_open()
            mina.page.wait_for_selector("#user-nick:has-text('Mina')")
            jun.page.goto(f"{server.url}/#token={mint('jun', nick='Jun', local=True)}")
            jun.wait_open()
            jun.page.wait_for_selector("#user-nick:has-text('Jun')")
            jun.page.wait_for_selector("#sharing[data-live=true]", timeout=5000)
            assert "Jun" in mina.page.evaluate("() => atob(localStorage.getItem('dongne.token').split('.')[1])")

            # A link for another user opened in Mina's tab: it asks, showing both names; she stays.
            mina.page.evaluate(f"() => {{ location.hash = '#token={mint('jun', nick='Jun', local=True)}'; }}")
            mina.page.wait_for_selector("#switch-account [role=alertdialog]")
            text = mina.page.inner_text("#switch-account")
            assert "Mina" in text and "Jun" in text
            mina.axe("switch account")
            mina.shoot("switch-account-360x640")
            mina.page.click("#switch-no")
            mina.page.wait_for_selector("#switch-account", state="detached")
            assert "token" not in mina.page.url

            # A restart: each tab reconnects with its own token, not the last one stored.
            for watched in (mina, jun):
                watched.page.evaluate("() => { window.__sameDocument = true; }")
                watched.tolerated = re.compile(r"WebSocket connection to 'ws://[^']+/ws' failed")
            server.stop()
            mina.page.wait_for_selector("#reconnecting", timeout=5000)
            jun.page.wait_for_selector("#reconnecting", timeout=5000)
            server.start()
            for watched, nick in ((mina, "Mina"), (jun, "Jun")):
                watched.wait_open(timeout=20_000)
                watched.page.wait_for_selector(f"#user-nick:has-text('{nick}')")
                assert watched.page.evaluate("() => window.__sameDocument") is True
            assert mina.page.locator("[data-tab=ask]").count() == 1  # still the traveller's tabs
            assert jun.page.locator("[data-tab=nearby]").count() == 1

            # A long question on a small phone: the card stays between the top bar and the tab bar.
            title = ("제주시청 근처에서 오늘 밤 늦게까지 문을 여는 약국이나 편의점, 그리고 조용히 앉아 있을 수 있는 카페를 "
                     "찾고 있어요. 아이가 열이 나서 해열제가 필요하고, 택시를 기다리는 동안 따뜻한 곳에 있고 싶습니다. "
                     "혹시 아시는 곳이 있으면 위치와 영업시간을 알려주세요. 버스 정류장에서 가까우면 더 좋고요. 정말 감사합니다!! "
                     "다시 한 번 부탁드립니다. 꼭요!!").ljust(200, "!")[:200]  # fmt: skip
            assert len(title) == 200
            q = ask_from_python(
                server.ws_url,
                mint("sora", nick="Sora"),
                {"title": title, "location": {"lat": 33.4996, "lng": 126.5312},
                 "hashtags": ["pharmacy", "night", "kids", "cafe", "taxi"], "urgency": "urgent"},
            )  # fmt: skip
            card = f'.alert-card[data-question-id="{q}"]'
            jun.page.wait_for_selector(card, timeout=5000)
            time.sleep(0.5)  # its rise animation (0.25 s) is over
            box = jun.page.locator(card).bounding_box()
            top = jun.page.locator(".topbar").bounding_box()
            tabs = jun.page.locator(".tabbar").bounding_box()
            assert box is not None and top is not None and tabs is not None
            assert box["y"] >= top["y"] + top["height"] - 1, (box, top)
            assert box["y"] + box["height"] <= tabs["y"] + 1, (box, tabs)
            title_box = jun.page.locator(f"{card} .alert-title").bounding_box()
            assert title_box is not None and title_box["height"] < 4 * 27  # three lines, not eight
            jun.page.locator(f"{card} button[type=submit]").scroll_into_view_if_needed()
            assert jun.page.locator(f"{card} button[type=submit]").is_visible()
            jun.shoot("local-alert-360x640")
            jun.axe("alert, 360x640")

            # A place tapped on the map: alerts come for it, but it is not reported as the phone's position.
            jun.page.click(f"{card} .alert-form .btn-ghost >> nth=1")  # later
            jun.page.wait_for_selector(card, state="detached")
            jun.page.wait_for_selector("#sharing[data-live=true][data-source=gps]")
            box = jun.page.locator(".map-box svg.map").bounding_box()
            assert box is not None
            jun.page.mouse.click(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.45)
            jun.page.wait_for_selector("#sharing[data-live=true][data-source=map]", timeout=5000)
            assert "GPS" in jun.page.inner_text("#sharing")

            # Signing out of Mina's tab leaves Jun's signed in.
            mina.page.click("#user-menu")
            mina.page.wait_for_selector("#user-panel:has-text('Mina')")
            mina.axe("user menu")
            mina.shoot("user-menu-360x640")
            mina.page.click("#sign-out")
            mina.page.wait_for_selector("#signin-form")
            jun.page.wait_for_selector("#conn-state[data-state=open]")

            for watched in (mina, jun):
                assert watched.errors == [], f"{watched.name}: {watched.errors}"
                foreign = [url for url in watched.requests if not own.match(url) and not url.startswith("data:")]
                assert foreign == [], f"{watched.name} asked other hosts: {foreign}"
        finally:
            browser.close()


def settings_from_python(url: str, token: str, change: dict[str, Any] | None = None) -> dict[str, Any]:
    """A user's alert settings over the Python client, after ``change`` (if given) was saved."""

    async def main() -> dict[str, Any]:
        async with open_client(url, token) as client:
            if change:
                await client.request("update_settings", change)
            return dict((await client.request("get_settings", {}))["settings"])

    return trio.run(main)


def test_settings_cannot_be_saved_before_they_are_loaded(server: Server) -> None:
    """The settings form sends every field: saved before ``get_settings`` answered (offline, a slow link), its
    empty fields would overwrite the local's settings (a cap of 0, no quiet hours). It waits for them."""
    from playwright.sync_api import sync_playwright

    token = mint("jun", nick="Jun", local=True)
    saved = settings_from_python(
        server.ws_url,
        token,
        {
            "max_alerts_per_hour": 50,
            "immediate_alerts": True,
            "quiet_hours": [23, 6],
            "home": {"lat": 33.4996, "lng": 126.5398},
        },
    )
    with sync_playwright() as p:
        browser = launch(p)
        local = Watched(new_context(browser, server, LOCAL_AT), "local")
        try:
            local.page.goto(f"{server.url}/#token={token}")
            local.wait_open()
            # The server is away: the socket's attempts fail, and so does what the screen fetches meanwhile.
            local.tolerated = re.compile(r"WebSocket connection to 'ws://[^']+/ws' failed|net::ERR_CONNECTION_REFUSED")
            server.stop()
            local.page.wait_for_selector("#reconnecting", timeout=5000)
            local.page.click("[data-tab=settings]")
            local.page.wait_for_selector("#home-set")
            for control in ("#home-set", "#settings-save", "#set-cap", "#set-immediate"):
                assert local.page.is_disabled(control), control
            assert local.page.input_value("#set-cap") == ""
            server.start()
            local.wait_open(timeout=20_000)
            local.page.wait_for_function("() => document.querySelector('#set-cap').value === '50'")
            assert local.page.is_enabled("#home-set") and local.page.is_checked("#set-quiet")
            assert local.errors == [], local.errors
        finally:
            browser.close()
    assert settings_from_python(server.ws_url, token) == saved


def request_from_python(url: str, token: str, op: str, data: dict[str, Any]) -> dict[str, Any]:
    """One request over the Python client; its reply's data."""

    async def main() -> dict[str, Any]:
        async with open_client(url, token) as client:
            return dict(await client.request(op, data))

    return trio.run(main)


DESKTOP = {"width": 1280, "height": 800}


def test_forms_name_what_is_wrong(server: Server) -> None:
    """An empty alert cap is refused on the field (it is no 0: that would turn alerts off); a hashtag the server
    would refuse is named under the tags field before anything is sent; the user menu closes as menus do."""
    from playwright.sync_api import sync_playwright

    token = mint("jun", nick="Jun", local=True)
    saved = settings_from_python(server.ws_url, token, {"max_alerts_per_hour": 50})
    traveller_token = mint("mina", nick="Mina")
    with sync_playwright() as p:
        browser = launch(p)
        local = Watched(new_context(browser, server, LOCAL_AT), "local")
        traveller = Watched(new_context(browser, server, TRAVELLER_AT), "traveller")
        try:
            local.page.goto(f"{server.url}/#token={token}")
            local.wait_open()
            local.page.click("[data-tab=settings]")
            local.page.wait_for_function("() => document.querySelector('#set-cap').value === '50'")
            local.page.fill("#set-cap", "")
            local.page.click("#settings-save")
            local.page.wait_for_selector("#set-cap[aria-invalid=true]")
            assert local.page.evaluate("() => document.activeElement.id") == "set-cap"
            assert local.page.inner_text("#set-cap-error").strip()
            assert local.page.get_attribute("#set-cap", "aria-describedby") == "set-cap-error"
            local.axe("settings, an empty cap")
            local.shoot("settings-cap-invalid-390x844")
            local.page.set_viewport_size(DESKTOP)
            local.shoot("settings-cap-invalid-1280x800")
            local.page.set_viewport_size(PHONE)
            local.page.fill("#set-cap", "7")  # typing again clears the error; a number saves
            assert local.page.get_attribute("#set-cap", "aria-invalid") is None
            local.page.click("#settings-save")
            local.page.wait_for_selector(".toast-good")
            assert settings_from_python(server.ws_url, token)["max_alerts_per_hour"] == 7

            # The user menu: Escape (focus back on its button), a click outside, another screen.
            local.page.click("#user-menu")
            local.page.wait_for_selector("#user-panel:visible")
            local.page.keyboard.press("Escape")
            local.page.wait_for_selector("#user-panel", state="hidden")
            assert local.page.get_attribute("#user-menu", "aria-expanded") == "false"
            assert local.page.evaluate("() => document.activeElement.id") == "user-menu"
            local.page.click("#user-menu")
            local.page.wait_for_selector("#user-panel:visible")
            local.page.click("#home-line")
            local.page.wait_for_selector("#user-panel", state="hidden")
            local.page.click("#user-menu")
            local.page.wait_for_selector("#user-panel:visible")
            local.page.evaluate("() => { location.hash = '#/profile'; }")
            local.page.wait_for_selector("#main[data-screen=profile]")
            local.page.wait_for_selector("#user-panel", state="hidden")
            assert local.page.get_attribute("#user-menu", "aria-expanded") == "false"

            # A hashtag the server refuses: named under the field, nothing sent.
            traveller.page.goto(f"{server.url}/#token={traveller_token}")
            traveller.wait_open()
            traveller.page.fill("#ask-title", "버스 정류장 어디예요?")
            for bad in ("bus-stop", "café", "food!", "a" * 31):
                traveller.page.fill("#ask-tags", f"#food #{bad}")
                traveller.page.click("#ask-submit")
                traveller.page.wait_for_selector("#ask-tags[aria-invalid=true]")
                assert bad in traveller.page.inner_text("#ask-tags-error"), bad
                assert traveller.page.evaluate("() => document.activeElement.id") == "ask-tags"
            traveller.page.fill("#ask-tags", "#a #b #c #d #e #f")  # one over the cap: refused, not cut to five
            traveller.page.click("#ask-submit")
            traveller.page.wait_for_selector("#ask-tags[aria-invalid=true]")
            assert {"5", "6"} <= set(traveller.page.inner_text("#ask-tags-error"))
            traveller.axe("ask, a bad hashtag")
            traveller.shoot("ask-tag-invalid-390x844")
            traveller.page.set_viewport_size(DESKTOP)
            traveller.shoot("ask-tag-invalid-1280x800")
            traveller.page.set_viewport_size(PHONE)
            mine = request_from_python(server.ws_url, traveller_token, "my_questions", {"status": "all"})
            assert mine["questions"] == []
            traveller.page.fill("#ask-tags", "#food #bus_stop")
            assert traveller.page.get_attribute("#ask-tags", "aria-invalid") is None
            traveller.page.click("#ask-submit")
            traveller.page.wait_for_selector("#main[data-screen=q]")
            mine = request_from_python(server.ws_url, traveller_token, "my_questions", {"status": "all"})
            assert [q["hashtags"] for q in mine["questions"]] == [["food", "bus_stop"]]
            for watched in (local, traveller):
                assert watched.errors == [], f"{watched.name}: {watched.errors}"
        finally:
            browser.close()
    assert settings_from_python(server.ws_url, token) == {**saved, "max_alerts_per_hour": 7}


class ReplyDropper:
    """Routes a context's WebSocket through the test: the first reply to each op in ``drop`` never reaches the
    page, as when a reply is slower than the SDK's request timeout (the server did apply the request)."""

    def __init__(self, *ops: str) -> None:
        self.drop = list(ops)
        self.pending: dict[int, str] = {}
        self.dropped: list[str] = []

    def __call__(self, ws: Any) -> None:
        import msgpack

        upstream = ws.connect_to_server()

        def from_page(message: str | bytes) -> None:
            if isinstance(message, bytes):
                frame = msgpack.unpackb(message)
                if frame.get("type") in self.drop:
                    self.drop.remove(frame["type"])
                    self.pending[frame["id"]] = frame["type"]
            upstream.send(message)

        def from_server(message: str | bytes) -> None:
            if isinstance(message, bytes):
                frame = msgpack.unpackb(message)
                if frame.get("type") == "reply" and frame.get("id") in self.pending:
                    self.dropped.append(self.pending.pop(frame["id"]))
                    return
            ws.send(message)

        ws.on_message(from_page)
        upstream.on_message(from_server)

    def wait_dropped(self, watched: Watched, op: str, timeout_s: float = 10.0) -> None:
        """Until the reply to ``op`` was held back (the routes run while Playwright is called)."""
        deadline = time.monotonic() + timeout_s
        while op not in self.dropped:
            if time.monotonic() > deadline:
                shown = watched.page.evaluate("() => document.body.innerText.slice(0, 600)")
                raise AssertionError(f"no {op} reply was dropped ({self.pending}, {self.dropped}): {shown!r}")
            watched.page.wait_for_timeout(20)


def test_no_reply_is_not_a_failure(server: Server) -> None:
    """A question or answer whose reply is slower than the request timeout was posted all the same: the app finds
    it rather than offering to send it again (twice posted, the locals alerted twice). An alert card whose
    question ended goes, with a word, when answered or when it comes to the front."""
    from playwright.sync_api import sync_playwright

    traveller_token = mint("mina", nick="Mina")
    local_token = mint("jun", nick="Jun", local=True)
    with sync_playwright() as p:
        browser = launch(p)
        traveller_ctx = new_context(browser, server, TRAVELLER_AT)
        local_ctx = new_context(browser, server, LOCAL_AT)
        traveller_ws = ReplyDropper("create_question")
        local_ws = ReplyDropper("create_answer", "create_answer")
        for ctx, router in ((traveller_ctx, traveller_ws), (local_ctx, local_ws)):
            ctx.route_web_socket(re.compile(r"/ws$"), router)
            ctx.clock.install()  # time runs; fast_forward jumps it past the SDK's request timeout (10 s)
        traveller = Watched(traveller_ctx, "traveller")
        local = Watched(local_ctx, "local")
        try:
            local.page.goto(f"{server.url}/#token={local_token}")
            local.wait_open()
            local.page.wait_for_selector("#sharing[data-live=true]", timeout=5000)
            traveller.page.goto(f"{server.url}/#token={traveller_token}")
            traveller.wait_open()
            traveller.page.wait_for_function("() => document.querySelector('#locals-2km').textContent.startsWith('1')")

            # The question's reply is held back past the timeout: the app finds it posted and opens it.
            traveller.page.fill("#ask-title", "공항 가는 버스 몇 번이에요?")
            traveller.page.click("#ask-submit")
            traveller_ws.wait_dropped(traveller, "create_question")
            traveller.page.clock.fast_forward(11_000)
            traveller.page.wait_for_selector("#main[data-screen=q]")
            asked = request_from_python(server.ws_url, traveller_token, "my_questions", {"status": "all"})
            assert len(asked["questions"]) == 1
            qid = asked["questions"][0]["question_id"]
            assert traveller.page.url.endswith(f"#/q/{qid}")

            # The local answers from the alert card; the reply is held back: the answer is found, sent once.
            card = f'.alert-card[data-question-id="{qid}"]'
            local.page.wait_for_selector(card, timeout=5000)
            local.page.fill(f"{card} textarea", "100번이나 600번이요.")
            local.page.click(f"{card} button[type=submit]")
            local_ws.wait_dropped(local, "create_answer")
            local.page.clock.fast_forward(11_000)
            local.page.wait_for_selector(card, state="detached")
            local.page.wait_for_selector("#main[data-screen=q] .answer.mine")
            # And from the question's screen.
            local.page.fill("#answer-content", "600번이 더 빨라요.")
            local_ws.dropped.clear()
            local.page.click("#answer-submit")
            local_ws.wait_dropped(local, "create_answer")
            local.page.clock.fast_forward(11_000)
            local.page.wait_for_function("() => document.querySelectorAll('.answer.mine').length === 2")
            assert local.page.input_value("#answer-content") == ""
            assert local.page.inner_text("#answer-form .form-error") == ""
            answers = request_from_python(server.ws_url, local_token, "get_question", {"question_id": qid})["answers"]
            assert [a["content"] for a in answers] == ["100번이나 600번이요.", "600번이 더 빨라요."]
            local.page.click("[data-tab=nearby]")

            # An alert whose question the asker closed: answering it dismisses the card, with a word why.
            here = {"lat": 33.4996, "lng": 126.5312}
            closed = ask_from_python(
                server.ws_url, mint("sora", nick="Sora"), {"title": "곧 닫을 질문", "location": here}
            )
            card = f'.alert-card[data-question-id="{closed}"]'
            local.page.wait_for_selector(card, timeout=5000)
            request_from_python(server.ws_url, mint("sora", nick="Sora"), "close_question", {"question_id": closed})
            local.page.fill(f"{card} textarea", "늦었네요")
            local.page.click(f"{card} button[type=submit]")
            local.page.wait_for_selector(card, state="detached")
            local.page.wait_for_selector(".toast:has-text('곧 닫을 질문')")
            local.shoot("alert-ended-390x844")
            local.page.set_viewport_size(DESKTOP)
            local.shoot("alert-ended-1280x800")
            local.page.set_viewport_size(PHONE)
            assert local.page.locator(".alert-card .form-error:not(:empty)").count() == 0

            # Two alerts; the one behind is closed meanwhile: when it comes to the front it is checked and goes.
            first = ask_from_python(server.ws_url, mint("yuna", nick="Yuna"), {"title": "첫째 질문", "location": here})
            local.page.wait_for_selector(f'.alert-card[data-question-id="{first}"]', timeout=5000)
            behind = ask_from_python(server.ws_url, mint("hoon", nick="Hoon"), {"title": "뒤의 질문", "location": here})
            local.page.wait_for_selector(".alert-more:not(:empty)", timeout=5000)
            request_from_python(server.ws_url, mint("hoon", nick="Hoon"), "close_question", {"question_id": behind})
            local.page.click(f'.alert-card[data-question-id="{first}"] .alert-form .btn-ghost >> nth=1')  # later
            local.page.wait_for_selector(".toast:has-text('뒤의 질문')")
            local.page.wait_for_selector(".alert-card", state="detached")
            for watched in (traveller, local):
                assert watched.errors == [], f"{watched.name}: {watched.errors}"
        finally:
            browser.close()


# ---- the street map


def png(width: int = 256, height: int = 256) -> bytes:
    """A plain light-green PNG tile."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + b"\xd8\xeb\xd0" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


class OperatorServer:
    """The operator's side on 127.0.0.1: map tiles (any ``/{z}/{x}/{y}.png``) and a token endpoint.

    ``/token`` answers ``{"token": ...}`` to a request that carries the session cookie (the
    app fetches it with credentials), with the CORS headers a cross-origin fetch needs.
    """

    def __init__(self, token: str) -> None:
        tile = png()
        seen: list[str] = []
        cookies: list[str] = []
        self.paths = seen
        self.cookies = cookies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.path)
                if re.fullmatch(r"/\d+/\d+/\d+\.png", self.path):
                    self.answer(200, "image/png", tile)
                elif self.path == "/token":
                    cookies.append(self.headers.get("cookie", ""))
                    if "session=traveller" in self.headers.get("cookie", ""):
                        self.answer(200, "application/json", json.dumps({"token": token}).encode())
                    else:
                        self.answer(401, "application/json", b'{"error": "not signed in"}')
                else:
                    self.send_error(404)

            def answer(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                if origin := self.headers.get("origin"):
                    self.send_header("access-control-allow-origin", origin)
                    self.send_header("access-control-allow-credentials", "true")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="operator", daemon=True)

    def __enter__(self) -> OperatorServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_street_map_and_sign_in_from_the_operator(tmp_path: Path) -> None:
    """``[web] token_url`` signs the page in (with its cookie; ``#token=`` links ignored); ``[web] tile_url`` gives Leaflet its tiles; nothing else is fetched."""
    from playwright.sync_api import sync_playwright

    with OperatorServer(mint("mina", nick="Mina")) as tiles:
        config = tmp_path / "web.toml"
        config.write_text(
            "[web]\n"
            f'tile_url = "http://127.0.0.1:{tiles.port}/{{z}}/{{x}}/{{y}}.png"\n'
            'tile_attribution = "Test tiles <b>not bold</b>"\n'
            f'token_url = "http://127.0.0.1:{tiles.port}/token"\n'
        )
        server = Server(tmp_path, config)
        server.start()
        own = re.compile(rf"^(https?|wss?)://{re.escape(server.host)}:{server.port}/")
        operator = re.compile(rf"^http://127\.0\.0\.1:{tiles.port}/(\d+/\d+/\d+\.png|token)$")
        try:
            with sync_playwright() as p:
                browser = launch(p)
                try:
                    context = new_context(browser, server, TRAVELLER_AT)
                    context.add_cookies(
                        [{"name": "session", "value": "traveller", "url": f"http://127.0.0.1:{tiles.port}/"}]
                    )
                    traveller = Watched(context, "traveller")
                    # A sign-in link for someone else is ignored with token_url (no login CSRF by link):
                    # the app asks token_url, with the operator's cookie.
                    traveller.page.goto(f"{server.url}/#token={mint('mallory', nick='Mallory')}")
                    traveller.wait_open()
                    assert tiles.cookies == ["session=traveller"]
                    traveller.page.wait_for_selector("#user-nick:has-text('Mina')")
                    assert "token" not in traveller.page.url
                    # Tokens from token_url are kept in memory only.
                    assert traveller.page.evaluate(
                        "() => [localStorage.getItem('dongne.token'), sessionStorage.getItem('dongne.token')]"
                    ) == [None, None]
                    traveller.page.wait_for_selector(".leaflet-tile-loaded", timeout=10_000)
                    # The regions, drawn over the tiles.
                    traveller.page.wait_for_selector(".leaflet-overlay-pane path", state="attached", timeout=5000)
                    attribution = traveller.page.inner_text(".leaflet-control-attribution")
                    assert "Test tiles <b>not bold</b>" in attribution  # the operator's text, shown as text
                    traveller.axe("ask with street map")
                    traveller.shoot("street-map")
                    tile_paths = [path for path in tiles.paths if path != "/token"]
                    assert tile_paths, "no tile was requested"
                    assert all(re.fullmatch(r"/\d+/\d+/\d+\.png", path) for path in tile_paths)
                    foreign = [url for url in traveller.requests if not own.match(url) and not operator.match(url)
                               and not url.startswith("data:")]  # fmt: skip
                    assert foreign == [], f"requests to other hosts: {foreign}"
                    assert traveller.errors == []
                finally:
                    browser.close()
        finally:
            server.stop()
