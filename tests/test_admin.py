"""The admin dashboard over HTTP: login, cookie, JSON feeds and the event stream."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio

from dongne.admin import COOKIE_NAME, CSRF_HEADER
from dongne.auth import SIGNIN_CODE_TTL_S, SigninCodeError, TokenVerifier, mint_signin_code, read_signin_code
from dongne.cli import main
from dongne.client import open_client
from dongne.store import is_postgres_url

from .conftest import SECRET, Harness, db_rows, question_data, token


def ops(server: Harness) -> str:
    return f"http://127.0.0.1:{server.running.ops_port}"


def admin_cookie(tok: str) -> dict[str, str]:
    return {"cookie": f"{COOKIE_NAME}={tok}"}


async def test_no_cookie_shows_the_login_form(server: Harness) -> None:
    """Without a cookie, /admin is a form to paste a token into; no data."""
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{ops(server)}/admin")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert 'action="/admin/login"' in response.text
    assert 'name="token"' in response.text
    assert 'id="map"' not in response.text
    assert "default-src 'none'" in response.headers["content-security-policy"]


async def test_login_refuses_invalid_and_non_admin_tokens(server: Harness) -> None:
    """A forged token gets 401, a valid user token 403; neither sets a cookie."""
    async with httpx.AsyncClient() as http:
        forged = await http.post(f"{ops(server)}/admin/login", data={"token": "not.a.jwt"})
        user = await http.post(f"{ops(server)}/admin/login", data={"token": token("traveller")})

    assert (forged.status_code, user.status_code) == (401, 403)
    assert "The token was refused" in forged.text
    assert "has no admin role" in user.text
    assert all("set-cookie" not in r.headers for r in (forged, user))


async def test_refusal_page_escapes_the_user_id(server: Harness) -> None:
    """The user id in the 403 message is user input: it is escaped."""
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{ops(server)}/admin/login", data={"token": token("<script>x</script>")})

    assert response.status_code == 403
    assert "&lt;script&gt;x&lt;/script&gt;" in response.text
    assert "<script>x" not in response.text


async def test_admin_login_sets_a_strict_http_only_cookie(server: Harness) -> None:
    """POST /admin/login with an admin token sets the cookie and redirects to the dashboard."""
    tok = token("boss", admin=True, nick="Boss")
    async with httpx.AsyncClient() as http:
        login = await http.post(f"{ops(server)}/admin/login", data={"token": tok})
        page = await http.get(f"{ops(server)}/admin", headers=admin_cookie(tok))
        script = await http.get(f"{ops(server)}/admin/static/dashboard.js")

    assert login.status_code == 303
    assert login.headers["location"] == "/admin"
    cookie = login.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}={tok};")
    assert {"HttpOnly", "SameSite=Strict", "Path=/admin"} <= {part.strip() for part in cookie.split(";")}
    assert page.status_code == 200
    assert 'id="map"' in page.text and 'src="/admin/static/dashboard.js"' in page.text
    assert ">Boss<" in page.text
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")


async def test_a_token_in_the_url_is_refused(server: Harness) -> None:
    """GET /admin/login?token=... no longer signs in: history and proxy logs would keep the token."""
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{ops(server)}/admin/login", params={"token": token("boss", admin=True)})

    assert response.status_code == 400
    assert "set-cookie" not in response.headers
    assert "dongne admin-link" in response.text and 'name="token"' in response.text


async def test_feeds_need_an_admin_cookie(server: Harness) -> None:
    """State, regions and stream answer 401 without a cookie and 403 for a user's token."""
    async with httpx.AsyncClient() as http:
        for path in ("/admin/api/state", "/admin/api/regions", "/admin/stream"):
            anonymous = await http.get(f"{ops(server)}{path}")
            user = await http.get(f"{ops(server)}{path}", headers=admin_cookie(token("traveller")))
            assert (path, 401, 403) == (path, anonymous.status_code, user.status_code)


async def test_state_reflects_a_question_from_a_client(server: Harness) -> None:
    """A question created over the WebSocket shows in /admin/api/state with its stage and age."""
    tok = token("boss", admin=True)
    async with server.connect("asker") as asker:
        question = (await asker.request("create_question", question_data(title="Ferry to Udo today?")))["question"]
        async with httpx.AsyncClient() as http:
            response = await http.get(f"{ops(server)}/admin/api/state", headers=admin_cookie(tok))

    assert response.status_code == 200
    state = response.json()
    [row] = [q for q in state["open"] if q["question_id"] == question["question_id"]]
    assert row["title"] == "Ferry to Udo today?"
    assert row["region"] == "Jeju-si"
    assert row["stage"] is not None and row["age_s"] >= 0
    assert state["open_questions"] >= 1 and state["connections"] >= 1
    assert {"frames_in", "deliveries", "slo", "hotspots", "alerts", "locals_by_region"} <= state.keys()


async def test_regions_are_the_servers_geojson(server: Harness) -> None:
    """/admin/api/regions is the service area: Jeju's 15 divisions."""
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{ops(server)}/admin/api/regions", headers=admin_cookie(token("boss", admin=True)))

    regions = response.json()
    assert regions["type"] == "FeatureCollection"
    assert len(regions["features"]) == 15
    assert "Jeju-si" in {f["properties"]["name"] for f in regions["features"]}


async def test_stream_sends_an_overview_every_second(server: Harness) -> None:
    """/admin/stream is text/event-stream with a JSON overview per event."""
    events: list[dict[str, object]] = []
    async with httpx.AsyncClient() as http:
        with trio.fail_after(10):
            async with http.stream(
                "GET", f"{ops(server)}/admin/stream", headers=admin_cookie(token("boss", admin=True))
            ) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line.removeprefix("data: ")))
                    if len(events) == 2:
                        break

    assert len(events) == 2
    assert all({"now", "open", "connections", "frames_in"} <= e.keys() for e in events)


async def test_stream_ends_cleanly_when_the_server_stops(server: Harness) -> None:
    """A shutdown ends open streams with a complete response rather than a cut connection."""
    first_event = None
    async with httpx.AsyncClient() as http:
        with trio.fail_after(10):  # the stream ends: it does not hang open after the stop
            async with http.stream(
                "GET", f"{ops(server)}/admin/stream", headers=admin_cookie(token("boss", admin=True))
            ) as response:
                lines = response.aiter_lines()
                async for line in lines:
                    if line.startswith("data: "):
                        first_event = json.loads(line.removeprefix("data: "))
                        break
                assert first_event is not None, "the stream ended before its first event"
                server.running.stop()
                # Raises httpx.RemoteProtocolError if the body is cut off.
                rest = [line async for line in lines]

    assert {"now", "open", "connections", "frames_in"} <= first_event.keys()
    assert all(line == "" or line.startswith("data: ") for line in rest)
    assert response.is_stream_consumed


async def test_expired_cookie_is_refused(server: Harness) -> None:
    """The cookie's token is verified again on every request: once expired, it opens nothing."""
    expired = token("boss", admin=True, now_s=time.time() - 3600, ttl_s=60)
    async with httpx.AsyncClient() as http:
        page = await http.get(f"{ops(server)}/admin", headers=admin_cookie(expired))
        state = await http.get(f"{ops(server)}/admin/api/state", headers=admin_cookie(expired))
        login = await http.post(f"{ops(server)}/admin/login", data={"token": expired})

    assert page.status_code == 401
    assert "token expired" in page.text and 'name="token"' in page.text
    assert page.headers["set-cookie"].startswith(f"{COOKIE_NAME}=;")  # cleared
    assert "Max-Age=0" in page.headers["set-cookie"]
    assert state.status_code == 401
    assert "token expired" in state.json()["error"]
    assert login.status_code == 401


async def test_logout_clears_the_cookie(server: Harness) -> None:
    """POST /admin/logout expires the cookie and goes back to the form."""
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{ops(server)}/admin/logout", headers=admin_cookie(token("boss", admin=True)))

    assert response.status_code == 303
    assert response.headers["location"] == "/admin"
    assert response.headers["set-cookie"].startswith(f"{COOKIE_NAME}=;")
    assert "Max-Age=0" in response.headers["set-cookie"]


async def test_unknown_paths_and_methods(server: Harness) -> None:
    """Only the listed routes and bundled assets answer; other ops routes still work."""
    async with httpx.AsyncClient() as http:
        missing = await http.get(f"{ops(server)}/admin/nothing")
        traversal = await http.get(f"{ops(server)}/admin/static/..%2F_app.py")
        get_logout = await http.get(f"{ops(server)}/admin/logout")
        health = await http.get(f"{ops(server)}/health")

    assert (
        missing.status_code,
        traversal.status_code,
        get_logout.status_code,
        health.status_code,
    ) == (404, 404, 405, 200)


# ---- one-time sign-in links ----------------------------------------------------------


def code_of(link: str) -> str:
    return link.split("?code=", 1)[1]


async def test_a_sign_in_link_opens_a_session_once(server: Harness) -> None:
    """GET shows a page that posts the code back; the POST sets a 12 h session cookie; a second POST is refused."""
    code = mint_signin_code(SECRET, "boss", nick="Boss", now_s=time.time())
    async with httpx.AsyncClient() as http:
        shown = await http.get(f"{ops(server)}/admin/login", params={"code": code})
        first = await http.post(f"{ops(server)}/admin/login", data={"code": code})
        again = await http.post(f"{ops(server)}/admin/login", data={"code": code})

    # A GET (a link preview, a prefetch) does not use the code up.
    assert shown.status_code == 200 and "set-cookie" not in shown.headers
    assert 'id="code-form"' in shown.text and 'src="/admin/static/login.js"' in shown.text
    assert first.status_code == 303 and first.headers["location"] == "/admin"
    cookie = first.headers["set-cookie"]
    session = cookie.split(";", 1)[0].removeprefix(f"{COOKIE_NAME}=")
    claims = TokenVerifier(SECRET).verify(session, now_s=time.time())
    assert (claims.user_id, claims.nick, claims.is_admin) == ("boss", "Boss", True)
    exp = jwt.decode(session, options={"verify_signature": False})["exp"]
    assert exp <= time.time() + 12 * 3600 + 5
    assert {"HttpOnly", "SameSite=Strict", "Path=/admin", "Max-Age=43200"} <= {p.strip() for p in cookie.split(";")}
    assert again.status_code == 401 and "set-cookie" not in again.headers
    assert "used already" in again.text


@pytest.mark.backends("sqlite", "postgres")
async def test_a_sign_in_link_used_before_a_restart_or_on_another_node_is_refused(start_server: Any) -> None:
    """A code's use is in the database: a restarted server refuses it, and so does a second node (PostgreSQL)."""
    code = mint_signin_code(SECRET, "boss", nick="Boss", now_s=time.time())
    h = await start_server()
    async with httpx.AsyncClient() as http:
        first = await http.post(f"{ops(h)}/admin/login", data={"code": code})
        assert first.status_code == 303
        if is_postgres_url(str(h.db)):
            other_node = await start_server()
            on_b = await http.post(f"{ops(other_node)}/admin/login", data={"code": code})
            assert on_b.status_code == 401 and "used already" in on_b.text
            await other_node.running.aclose()
        await h.running.aclose()

        h = await start_server()
        again = await http.post(f"{ops(h)}/admin/login", data={"code": code})
        fresh = await http.post(
            f"{ops(h)}/admin/login", data={"code": mint_signin_code(SECRET, "boss", now_s=time.time())}
        )
    assert again.status_code == 401 and "used already" in again.text and "set-cookie" not in again.headers
    assert fresh.status_code == 303
    assert db_rows(h.db, "SELECT count(*) FROM signin_codes_used") == [(2,)]
    await h.running.aclose()


async def test_used_sign_in_codes_are_forgotten_once_expired(start_server: Any, db_path: Path) -> None:
    """The table keeps a code only until it expires: the next sign-in drops the expired ones."""
    h = await start_server()
    with sqlite3.connect(db_path) as conn:  # two codes used earlier: one expired a second ago, one still valid
        conn.executemany(
            "INSERT INTO signin_codes_used (nonce, expires_at) VALUES (?, ?)",
            [("expired-nonce", time.time() - 1), ("valid-nonce", time.time() + 60)],
        )
    async with httpx.AsyncClient() as http:
        new = mint_signin_code(SECRET, "boss", now_s=time.time())
        assert (await http.post(f"{ops(h)}/admin/login", data={"code": new})).status_code == 303
    left = db_rows(h.db, "SELECT nonce FROM signin_codes_used ORDER BY expires_at")
    assert len(left) == 2 and left[0] == ("valid-nonce",)
    await h.running.aclose()


async def test_a_sign_in_is_refused_with_503_while_the_database_refuses_writes(
    start_server: Any, db_path: Path
) -> None:
    """With the write lock held by another program the code's use cannot be recorded: 503, the code not
    used up, and it works once the lock is released."""
    h = await start_server(store={"busy_timeout_s": 0.2})
    code = mint_signin_code(SECRET, "boss", now_s=time.time())
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    async with httpx.AsyncClient() as http:
        try:
            refused = await http.post(f"{ops(h)}/admin/login", data={"code": code})
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        later = await http.post(f"{ops(h)}/admin/login", data={"code": code})
    assert refused.status_code == 503 and "set-cookie" not in refused.headers
    assert later.status_code == 303
    await h.running.aclose()


async def test_an_expired_or_forged_sign_in_link_is_refused(server: Harness) -> None:
    """A code older than 5 minutes, or signed with another secret, opens nothing."""
    old = mint_signin_code(SECRET, "boss", now_s=time.time() - SIGNIN_CODE_TTL_S - 1)
    forged = mint_signin_code("another-secret-0123456789-0123456789", "boss", now_s=time.time())
    async with httpx.AsyncClient() as http:
        expired = await http.post(f"{ops(server)}/admin/login", data={"code": old})
        foreign = await http.post(f"{ops(server)}/admin/login", data={"code": forged})
        garbage = await http.post(f"{ops(server)}/admin/login", data={"code": "x.y"})

    assert (expired.status_code, foreign.status_code, garbage.status_code) == (401, 401, 401)
    assert "expired" in expired.text
    assert "secret" in foreign.text
    assert all("set-cookie" not in r.headers for r in (expired, foreign, garbage))


def test_sign_in_codes_expire_after_five_minutes_exactly() -> None:
    """Explicit times: valid up to the last second before now + 300 s, not at it; tampering is detected."""
    t0 = 1_800_000_000.0
    code = mint_signin_code(SECRET, "boss", now_s=t0)
    assert read_signin_code(SECRET, code, now_s=t0 + 299).user_id == "boss"
    with pytest.raises(SigninCodeError, match="expired"):
        read_signin_code(SECRET, code, now_s=t0 + 300)
    body, mac = code.split(".")
    with pytest.raises(SigninCodeError):
        read_signin_code(SECRET, body[:-2] + ("AA" if body[-2:] != "AA" else "BB") + "." + mac, now_s=t0)
    # Two links for the same admin are two different codes (each used once).
    assert mint_signin_code(SECRET, "boss", now_s=t0) != code


def test_admin_link_and_short_admin_tokens_from_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dongne admin-link` prints a working link; `dongne token --admin` lasts 12 h by default."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DONGNE_JWT_SECRET", SECRET)
    db = str(tmp_path / "db.sqlite3")
    assert main(["admin-link", "boss", "--nick", "Boss", "--ops-url", "http://127.0.0.1:9999/", "--db", db]) == 0
    link = capsys.readouterr().out.strip()
    assert link.startswith("http://127.0.0.1:9999/admin/login?code=")
    signin = read_signin_code(SECRET, code_of(link), now_s=time.time())
    assert (signin.user_id, signin.nick) == ("boss", "Boss")
    assert signin.expires_s <= time.time() + SIGNIN_CODE_TTL_S

    assert main(["token", "boss", "--admin", "--db", db]) == 0
    admin = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert admin["exp"] - admin["iat"] == 12 * 3600
    assert main(["token", "mina", "--db", db]) == 0
    user = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert user["exp"] - user["iat"] == 30 * 24 * 3600


# ---- CSRF: the session token for the moderation panel ------------------------------------


async def csrf_of(http: httpx.AsyncClient, server: Harness, tok: str) -> str:
    page = await http.get(f"{ops(server)}/admin", headers=admin_cookie(tok))
    match = re.search(r'<meta name="dongne-csrf" content="([^"]+)">', page.text)
    assert match is not None, page.text[:500]
    return match.group(1)


async def test_the_session_token_needs_the_csrf_header_and_a_same_origin_request(server: Harness) -> None:
    """POST /admin/api/session-token: refused without the header, with a wrong one, or from another site."""
    tok = token("boss", admin=True, nick="Boss")
    url = f"{ops(server)}/admin/api/session-token"
    async with httpx.AsyncClient() as http:
        csrf = await csrf_of(http, server, tok)
        other = await csrf_of(http, server, token("boss2", admin=True))
        missing = await http.post(url, headers=admin_cookie(tok))
        wrong = await http.post(url, headers={**admin_cookie(tok), CSRF_HEADER: other})
        no_cookie = await http.post(url, headers={CSRF_HEADER: csrf})
        foreign = await http.post(url, headers={**admin_cookie(tok), CSRF_HEADER: csrf, "origin": "http://evil.test"})
        same_site = await http.post(
            url, headers={**admin_cookie(tok), CSRF_HEADER: csrf, "sec-fetch-site": "same-site"}
        )
        granted = await http.post(
            url,
            headers={
                **admin_cookie(tok),
                CSRF_HEADER: csrf,
                "origin": ops(server),
                "sec-fetch-site": "same-origin",
            },
        )
        page = await http.get(f"{ops(server)}/admin", headers=admin_cookie(tok))

    assert (missing.status_code, wrong.status_code, no_cookie.status_code) == (403, 403, 401)
    assert (foreign.status_code, same_site.status_code) == (403, 403)
    assert all("token" not in r.json() for r in (missing, wrong, no_cookie, foreign, same_site))
    assert granted.status_code == 200
    grant = granted.json()
    assert grant["url"] == server.url
    # The page may connect to the client port, and nowhere else.
    assert f"connect-src 'self' {server.url};" in page.headers["content-security-policy"]
    claims = jwt.decode(grant["token"], options={"verify_signature": False})
    assert claims["sub"] == "boss" and claims["role"] == "admin"
    assert claims["exp"] - claims["iat"] == 300
    # It is a working admin token on the client port.
    async with open_client(grant["url"], grant["token"]) as admin:
        assert (await admin.request("list_reports", {}))["reports"] == []


async def test_bans_are_listed_for_the_panel(server: Harness) -> None:
    """/admin/api/bans lists the bans in force (no protocol operation does)."""
    tok = token("boss", admin=True)
    async with server.connect("mallory", nick="Mal"), server.connect("boss", admin=True) as admin:
        await admin.request("ban_user", {"user_id": "mallory", "reason": "casino links"})
        async with httpx.AsyncClient() as http:
            listed = (await http.get(f"{ops(server)}/admin/api/bans", headers=admin_cookie(tok))).json()
            anonymous = await http.get(f"{ops(server)}/admin/api/bans")
        await admin.request("unban_user", {"user_id": "mallory"})
        async with httpx.AsyncClient() as http:
            after = (await http.get(f"{ops(server)}/admin/api/bans", headers=admin_cookie(tok))).json()

    [ban] = listed["bans"]
    assert (ban["user_id"], ban["nick"], ban["reason"]) == ("mallory", "Mal", "casino links")
    assert anonymous.status_code == 401
    assert after["bans"] == []


async def test_a_banned_admin_loses_the_dashboard_at_once(server: Harness) -> None:
    """A ban refuses the user everywhere: the banned admin's session gets 403 on the feeds, and the
    stream it had open signs out."""
    rogue = admin_cookie(token("rogue", admin=True))
    async with (
        server.connect("rogue", admin=True),
        server.connect("boss", admin=True) as boss,
        httpx.AsyncClient(timeout=10) as http,
        http.stream("GET", f"{ops(server)}/admin/stream", headers=rogue) as stream,
    ):
        before = await http.get(f"{ops(server)}/admin/api/state", headers=rogue)
        await boss.request("ban_user", {"user_id": "rogue", "reason": "leaked the reports"})
        after = {path: (await http.get(f"{ops(server)}{path}", headers=rogue)).status_code
                 for path in ("/admin/api/state", "/admin/api/bans", "/admin/api/regions")}  # fmt: skip
        events = []
        with trio.fail_after(10):
            async for line in stream.aiter_lines():
                events.append(line)
                if line.startswith("event: signed-out"):
                    break
    assert before.status_code == 200
    assert after == dict.fromkeys(after, 403)
    assert "event: signed-out" in events


async def test_the_moderation_panel_connects_to_the_configured_public_url(start_server: Any) -> None:
    """Behind a TLS-terminating proxy the page (https) cannot open ws://: [server] public_url is where the
    panel's WebSocket goes, and the page's content security policy allows exactly that."""
    h = await start_server(server={"public_url": "wss://dongne.example.org/"})
    tok = token("boss", admin=True, nick="Boss")
    async with httpx.AsyncClient() as http:
        csrf = await csrf_of(http, h, tok)
        granted = await http.post(
            f"{ops(h)}/admin/api/session-token",
            headers={**admin_cookie(tok), CSRF_HEADER: csrf, "origin": ops(h), "sec-fetch-site": "same-origin"},
        )
        page = await http.get(f"{ops(h)}/admin", headers=admin_cookie(tok))
    assert granted.status_code == 200 and granted.json()["url"] == "wss://dongne.example.org"
    assert "connect-src 'self' wss://dongne.example.org;" in page.headers["content-security-policy"]
    await h.running.aclose()


@pytest.mark.parametrize("bad", ["https://dongne.example.org", "dongne.example.org", "wss://"])
def test_a_public_url_that_is_not_a_websocket_url_is_a_config_error(bad: str) -> None:
    from dongne.config import ServerSettings
    from dongne.core import ConfigError

    with pytest.raises(ConfigError, match="public_url"):
        ServerSettings(public_url=bad)


async def test_the_dashboard_writes_an_ipv6_client_host_in_brackets(start_server) -> None:  # type: ignore[no-untyped-def]
    """[server] host = "::1" (or "::"), no public_url: the dashboard's client URL is ws://[::1]:port."""
    h = await start_server(server={"host": "::1"})
    async with httpx.AsyncClient(cookies={"dongne_admin": token("boss", admin=True)}) as http:
        page = await http.get(f"http://127.0.0.1:{h.running.ops_port}/admin")
    assert page.status_code == 200
    assert f"ws://[::1]:{h.running.port}" in page.headers["content-security-policy"]  # the page's connect-src
