"""The admin moderation panel in a real browser: Debian's chromium driven by Playwright.

The admin signs in with a one-time link from ``dongne admin-link``; the page
gets a short-lived token over a CSRF-checked POST and speaks the protocol
(msgpack over WebSocket) to the client port. A report filed by a test client
appears in the queue; "Hide" takes the answer out of another client's room
within a second. A cross-site form post for a session token is refused.
Screenshots: ``test-artifacts/admin-moderation-{desktop,phone}.png``.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from dongne.client import open_client

from .test_admin_browser import ARTIFACTS, CHROMIUM, SECRET, mint, served  # noqa: F401 (served: a fixture)

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium; apt-get install chromium)"
)

LAUNCH_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--no-first-run",
               "--disable-component-update", "--disable-sync"]  # fmt: skip

SPAM = "Cheap island tours!! Ask for Mr. Kim at <the shop> by the port, best prices"


class Room:
    """Clients in a helper thread: an asker, a spammer who answers, a viewer in the room, a reporter.

    ``facts`` receives ``{"question_id", "answer_id", "report_id"}`` once the
    report is filed, then ``("answer_deleted", monotonic time)`` when the
    viewer's room is told the answer is gone.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.facts: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="room", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def next(self, timeout: float = 30) -> Any:
        item = self.facts.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=15)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self.facts.put(exc)

    async def _main(self) -> None:
        async with (
            open_client(self.url, mint("traveller", nick="Mina")) as asker,
            open_client(self.url, mint("spammer", nick="Tours4U", local=True)) as spammer,
            open_client(self.url, mint("viewer", nick="Joon")) as viewer,
            open_client(self.url, mint("reporter", nick="Hana")) as reporter,
        ):
            where = {"lat": 33.4996, "lng": 126.5312}
            question = (await asker.request("create_question", {"title": "Bus from the airport to Aewol?",
                                                                 "location": where}))["question"]  # fmt: skip
            qid = question["question_id"]
            await viewer.request("join_question", {"question_id": qid})
            await spammer.request("join_question", {"question_id": qid})
            answer = (await spammer.request("create_answer", {"question_id": qid, "content": SPAM}))["answer"]
            await viewer.next_event("new_answer", timeout=10)
            report = await reporter.request(
                "report_content",
                {
                    "answer_id": answer["answer_id"],
                    "reason": "spam",
                    "note": "&lt;b&gt;a shop ad&lt;/b&gt;, not an answer",
                },
            )
            self.facts.put({"question_id": qid, "answer_id": answer["answer_id"], "report_id": report["report_id"]})
            event = await viewer.next_event("answer_deleted", timeout=60)
            self.facts.put(("answer_deleted", time.monotonic(), event["data"]))
            await trio.to_thread.run_sync(self._stop.wait)


def admin_link(ops_url: str, tmp_path: Path) -> str:
    """``dongne admin-link`` as an operator runs it: another process, the same secret."""
    out = subprocess.run(
        [sys.executable, "-m", "dongne", "admin-link", "boss", "--nick", "Moderator", "--ops-url", ops_url],
        cwd=tmp_path,
        env={**os.environ, "DONGNE_JWT_SECRET": SECRET},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.strip()


#: Values for the msgpack module's round trip against Python's msgpack.
MSGPACK_CASES: list[Any] = [
    None, True, False, 0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**53 - 1,
    -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**53 - 1),
    1.5, -0.25, 1e300, 3.141592653589793,
    "", "a", "x" * 31, "x" * 32, "x" * 255, "x" * 256, "y" * 70000, "가나다 😀 \u0000 é",
    [], [1, [2, [3, []]]], list(range(15)), list(range(16)), list(range(70000)),
    {}, {"a": 1}, {f"k{i}": i for i in range(15)}, {f"k{i}": i for i in range(16)},
    {"type": "resolve_report", "id": 34, "data": {"report_id": "r01", "action": "hide", "note": None}},
]  # fmt: skip

MSGPACK_CHECK = """
(input) => {
  const { encode, decode } = window.DongneMsgpack;
  const cases = input.cases;
  cases.protoBytes = input.protoBytes;
  const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);
  const out = { decoded: [], encoded: [] };
  for (const [bytes, value] of cases) {
    const got = decode(Uint8Array.from(bytes));
    out.decoded.push(same(got, value));
    out.encoded.push(Array.from(encode(value)));
  }
  // {"__proto__": {"polluted": true}, "constructor": 1}: data, not a prototype.
  const proto = decode(Uint8Array.from(cases.protoBytes));
  out.polluted = ({}).polluted === undefined && Object.getPrototypeOf(proto) === Object.prototype
    && Object.keys(proto).join() === "__proto__,constructor"
    && JSON.stringify(Object.getOwnPropertyDescriptor(proto, "__proto__").value) === '{"polluted":true}' ? "clean" : "polluted";
  out.bin = Array.from(decode(Uint8Array.from([0xc4, 3, 0, 1, 255])));
  out.binEncoded = Array.from(encode(new Uint8Array([0, 1, 255])));
  out.forever = decode(Uint8Array.from([0xcf, 0x40, 0, 0, 0, 0, 0, 0, 0])) === 2 ** 62;
  out.big = Array.from(encode(-(2n ** 63n)));
  const throws = (bytes) => { try { decode(Uint8Array.from(bytes)); return false; } catch (e) { return true; } };
  out.refused = [throws([0xa3, 0x61]), throws([0xd4, 1, 2]), throws([0x01, 0x02]), throws([0xc1])];
  return out;
}
"""


def check_msgpack(page: Any) -> None:
    cases = [[list(msgpack.packb(v)), v] for v in MSGPACK_CASES]
    proto = list(msgpack.packb({"__proto__": {"polluted": True}, "constructor": 1}))
    result = page.evaluate(MSGPACK_CHECK, {"cases": cases, "protoBytes": proto})
    failed = [v for v, ok in zip(MSGPACK_CASES, result["decoded"], strict=True) if not ok]
    assert failed == [], "decoded wrongly"
    for value, encoded in zip(MSGPACK_CASES, result["encoded"], strict=True):
        assert msgpack.unpackb(bytes(encoded), raw=False) == value
        assert bytes(encoded) == msgpack.packb(value), value  # the same (smallest) encodings as Python's
    assert result["polluted"] == "clean"
    assert result["bin"] == [0, 1, 255] and bytes(result["binEncoded"]) == msgpack.packb(b"\x00\x01\xff")
    assert result["forever"] is True
    assert bytes(result["big"]) == msgpack.packb(-(2**63))
    assert result["refused"] == [True, True, True, True]  # truncated, ext type, trailing bytes, reserved


def test_moderation_panel_in_a_browser(served: tuple[str, str], tmp_path: Path) -> None:  # noqa: F811
    from playwright.sync_api import sync_playwright

    client_url, ops_url = served
    ARTIFACTS.mkdir(exist_ok=True)
    room = Room(client_url)
    link = admin_link(ops_url, tmp_path)
    assert link.startswith(f"{ops_url}/admin/login?code=")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        try:
            # The one-time link: the page posts the code back and lands on the dashboard.
            page.goto(link)
            page.wait_for_url(f"{ops_url}/admin")
            page.wait_for_selector("#mod-status[data-state=live]", timeout=5000)
            assert page.evaluate("document.cookie") == ""  # HttpOnly
            assert page.locator("#viewer").text_content() == "Moderator"
            # IP blocks are listed when the server has list_ip_blocks (it has).
            page.wait_for_selector("#ip-blocks-box:not([hidden])", timeout=5000)

            check_msgpack(page)

            room.start()
            facts = room.next()
            card = page.locator(f'#reports-list [data-report-id="{facts["report_id"]}"]')
            card.wait_for(timeout=5000)  # the panel polls every 3 s
            assert card.locator(".reported-text").text_content() == SPAM.replace("<the shop>", "")
            assert card.get_attribute("data-item-id") == facts["answer_id"]
            note = card.locator(".note").text_content()
            assert note is not None and "<b>a shop ad</b>" in note  # text, not markup
            assert page.locator("#reports-list b").count() == 0
            assert errors == []

            page.wait_for_timeout(300)
            page.locator("#moderation").screenshot(path=str(ARTIFACTS / "admin-moderation-desktop.png"))
            page.set_viewport_size({"width": 390, "height": 844})
            page.wait_for_timeout(300)
            page.locator("#moderation").screenshot(path=str(ARTIFACTS / "admin-moderation-phone.png"))
            page.screenshot(path=str(ARTIFACTS / "admin-moderation-phone-page.png"), full_page=False)
            page.set_viewport_size({"width": 1440, "height": 1000})

            clicked = time.monotonic()
            card.locator("button[data-action=hide]").click()
            kind, at, data = room.next(timeout=10)
            assert kind == "answer_deleted" and data["answer_id"] == facts["answer_id"]
            assert at - clicked <= 1.0, f"the answer left the room {at - clicked:.2f} s after the click"
            card.wait_for(state="detached", timeout=5000)
            page.wait_for_selector("#audit-list li", timeout=5000)
            audit = page.locator("#audit-list").text_content() or ""
            assert "boss · resolve report" in audit
            assert "Hidden the answer" in (page.locator("#mod-message").text_content() or "")
            assert errors == []
            page.locator("#moderation").screenshot(path=str(ARTIFACTS / "admin-moderation-after.png"))

            # The link worked once: opening it again is refused.
            page.goto(link)
            page.wait_for_selector("#login-error:not([hidden])", timeout=5000)
            assert "used already" in (page.locator("#login-error").text_content() or "")
        finally:
            try:
                page.screenshot(path=str(ARTIFACTS / "admin-moderation-page.png"), full_page=True)
            finally:
                browser.close()
                room.stop()


def test_a_cross_site_form_post_gets_no_session_token(served: tuple[str, str], tmp_path: Path) -> None:  # noqa: F811
    """A page on another site posts a form to /admin/api/session-token in the admin's browser: refused."""
    from playwright.sync_api import sync_playwright

    _, ops_url = served
    link = admin_link(ops_url, tmp_path)
    evil = (
        "<!doctype html><title>win a prize</title>"
        f'<form id="f" method="post" action="{ops_url}/admin/api/session-token">'
        '<input name="x" value="1"><button id="go">go</button></form>'
    )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        page = browser.new_context().new_page()
        try:
            page.goto(link)  # signed in: the browser holds the session cookie
            page.wait_for_url(f"{ops_url}/admin")
            page.route(
                "http://evil.test/**", lambda route: route.fulfill(status=200, content_type="text/html", body=evil)
            )
            page.goto("http://evil.test/")
            with page.expect_response(f"{ops_url}/admin/api/session-token") as info:
                page.click("#go")
            response = info.value
            assert response.status == 403
            body = json.loads(response.text())
            assert "token" not in body and "cross-site" in body["error"]
            # The same browser, same-origin, with the page's CSRF token: granted.
            page.goto(f"{ops_url}/admin")
            grant = page.evaluate(
                """async () => {
                  const csrf = document.querySelector('meta[name="dongne-csrf"]').content;
                  const r = await fetch('/admin/api/session-token', {method: 'POST', headers: {'X-Dongne-CSRF': csrf}});
                  const bare = await fetch('/admin/api/session-token', {method: 'POST'});
                  return [r.status, Object.keys(await r.json()), bare.status];
                }"""
            )
            assert grant[0] == 200 and "token" in grant[1]
            assert grant[2] == 403  # same origin but without the header
        finally:
            browser.close()
