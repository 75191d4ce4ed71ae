"""The admin dashboard over HTTP: login, cookie, JSON feeds and the event stream."""

from __future__ import annotations

import json
import time

import httpx
import trio

from dongne.admin import COOKIE_NAME

from .conftest import Harness, question_data, token


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
        by_url = await http.get(f"{ops(server)}/admin/login", params={"token": token("traveller")})

    assert (forged.status_code, user.status_code, by_url.status_code) == (401, 403, 403)
    assert "The token was refused" in forged.text
    assert "has no admin role" in user.text
    assert all("set-cookie" not in r.headers for r in (forged, user, by_url))


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


async def test_login_by_url_for_a_printed_demo_link(server: Harness) -> None:
    """GET /admin/login?token=... works like the form."""
    tok = token("boss", admin=True)
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{ops(server)}/admin/login", params={"token": tok})

    assert response.status_code == 303
    assert response.headers["set-cookie"].startswith(f"{COOKIE_NAME}={tok};")


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
        login = await http.get(f"{ops(server)}/admin/login", params={"token": expired})

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
