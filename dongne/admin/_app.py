"""The admin dashboard's ASGI app.

Theory of operation: the page is static (``static/``); everything live comes
from two JSON feeds, ``/admin/api/state`` (one snapshot) and ``/admin/stream``
(server-sent events, one snapshot a second). The region map is drawn in the
browser from ``/admin/api/regions``, the server's own GeoJSON.

Auth: an admin JWT, pasted once into the login form (or passed as
``/admin/login?token=...``), is verified and kept in an HttpOnly,
SameSite=Strict cookie scoped to ``/admin``. Every request verifies the
cookie's token again (so an expired token stops working at once), and an open
event stream checks it before each event and ends when it expires.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Any, Final

import jwt
import trio

from ..auth import Claims, TokenVerifier
from ..core.errors import CloseConnection
from ..core.regions import load_hotspots
from ._http import BodyTooLarge, Receive, Scope, Send, cookies, query, read_form, respond, respond_json

__all__ = ["COOKIE_NAME", "AdminApp"]

COOKIE_NAME: Final = "dongne_admin"
_FORM_LIMIT = 16 * 1024
_CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".svg": b"image/svg+xml",
}
_HTML = _CONTENT_TYPES[".html"]


class _Refused(Exception):
    """The token does not grant access: ``status`` is 401 (invalid) or 403 (not an admin)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _load_static() -> dict[str, bytes]:
    folder = resources.files(__package__).joinpath("static")
    return {item.name: item.read_bytes() for item in folder.iterdir() if item.is_file()}


class AdminApp:
    """The ASGI app behind ``/admin`` on the ops port.

    Args:
        overview: returns the engine's overview plus traffic counters
            (``frames_in``, ``deliveries``); called at most twice a second
            however many dashboards are open.
        regions: the service area as a GeoJSON FeatureCollection, served as is.
        verifier: checks admin tokens (the server's own secret).
        now_s: the current time in epoch seconds, for token expiry.
        closing: when given, an awaitable that returns when the server shuts
            down; open event streams end then instead of holding up
            hypercorn's graceful shutdown.
        interval_s: seconds between two events on ``/admin/stream``.
        places: named hotspot coordinates, ``name -> (lat, lng)``, to put the
            overview's hotspots on the map (default: the bundled Jeju hotspots,
            the ones the engine counts).

    Routes (all under ``/admin``): ``GET /admin`` (the dashboard, or the login
    form), ``GET|POST /admin/login``, ``POST /admin/logout``,
    ``GET /admin/api/state``, ``GET /admin/api/regions``,
    ``GET /admin/stream``, ``GET /admin/static/NAME``.
    """

    def __init__(
        self,
        overview: Callable[[], dict[str, Any]],
        regions: Mapping[str, Any],
        verifier: TokenVerifier,
        *,
        now_s: Callable[[], float] = time.time,
        closing: Callable[[], Awaitable[object]] | None = None,
        interval_s: float = 1.0,
        places: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        self._overview = overview
        self._regions_json = json.dumps(regions, ensure_ascii=False).encode()
        self._verifier = verifier
        self._now_s = now_s
        self._closing = closing
        self._interval_s = interval_s
        self._places = dict(places) if places is not None else {h.name: (h.lat, h.lng) for h in load_hotspots()}
        self._static = _load_static()
        self._cached: tuple[float, bytes] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        root = scope.get("root_path", "") + "/admin"
        path = scope["path"].removeprefix("/admin") or "/"
        method = scope["method"]
        head = method == "HEAD"
        if method == "HEAD":
            method = "GET"
        if path.startswith("/static/") and method == "GET":
            await self._static_file(send, path.removeprefix("/static/"), head)
            return
        routes: dict[str, tuple[str, ...]] = {
            "/": ("GET",),
            "/login": ("GET", "POST"),
            "/logout": ("POST",),
            "/api/state": ("GET",),
            "/api/regions": ("GET",),
            "/stream": ("GET",),
        }
        if path not in routes:
            await respond_json(send, 404, {"error": "not found"}, head=head)
            return
        if method not in routes[path]:
            allow = ", ".join(routes[path]).encode()
            await respond(
                send, 405, b'{"error": "method not allowed"}', b"application/json", headers=[(b"allow", allow)]
            )
            return
        if path == "/login":
            await self._login(scope, receive, send, root)
        elif path == "/logout":
            await respond(send, 303, b"", _HTML, headers=[(b"location", root.encode()), self._cookie(scope, "", 0)])
        elif path == "/":
            await self._page(scope, send, head)
        else:
            token = cookies(scope).get(COOKIE_NAME, "")
            try:
                self._check(token)
            except _Refused as refused:
                await respond_json(send, refused.status, {"error": refused.message}, head=head)
                return
            if path == "/api/state":
                await respond(send, 200, self._snapshot(), b"application/json", head=head)
            elif path == "/api/regions":
                await respond(send, 200, self._regions_json, b"application/geo+json", head=head)
            elif head:
                await respond(send, 200, b"", b"text/event-stream; charset=utf-8", head=True)
            else:
                await self._stream(receive, send, token)

    # ---- auth ------------------------------------------------------------------------

    def _check(self, token: str) -> Claims:
        """Verify ``token`` now.

        Raises:
            _Refused: 401 for a missing, malformed, forged or expired token;
                403 for a valid token without the admin role.
        """
        if not token:
            raise _Refused(401, "No token: sign in with an admin token.")
        try:
            claims = self._verifier.verify(token, now_s=self._now_s())
        except CloseConnection as exc:
            raise _Refused(401, f"The token was refused ({exc.reason}).") from None
        if not claims.is_admin:
            raise _Refused(403, f"The token for user '{claims.user_id}' is valid but has no admin role.")
        return claims

    def _cookie(self, scope: Scope, token: str, max_age: int) -> tuple[bytes, bytes]:
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        value = f"{COOKIE_NAME}={token}; Path=/admin; Max-Age={max(0, max_age)}; HttpOnly; SameSite=Strict{secure}"
        return (b"set-cookie", value.encode())

    async def _login(self, scope: Scope, receive: Receive, send: Send, root: str) -> None:
        if scope["method"] == "POST":
            try:
                form = await read_form(receive, _FORM_LIMIT)
            except BodyTooLarge:
                await self._login_page(send, 413, "That is too long to be a token.")
                return
            token = form.get("token", [""])[0].strip()
        else:
            values = query(scope).get("token")
            if values is None:
                await self._login_page(send, 200, "")
                return
            token = values[0].strip()
        try:
            self._check(token)
        except _Refused as refused:
            await self._login_page(send, refused.status, refused.message)
            return
        # Valid and checked: read exp only to let the cookie die with the token.
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp", 0)
        cookie = self._cookie(scope, token, int(exp - self._now_s()))
        await respond(send, 303, b"", _HTML, headers=[(b"location", root.encode()), cookie])

    async def _login_page(self, send: Send, status: int, message: str, *headers: tuple[bytes, bytes]) -> None:
        page = self._static["login.html"].decode()
        hidden = "" if message else " hidden"
        page = page.replace("<!--message-->", f'<p id="login-error" class="error"{hidden}>{html.escape(message)}</p>')
        await respond(send, status, page.encode(), _HTML, headers=headers)

    async def _page(self, scope: Scope, send: Send, head: bool) -> None:
        token = cookies(scope).get(COOKIE_NAME)
        if not token:
            await self._login_page(send, 200, "")
            return
        try:
            claims = self._check(token)
        except _Refused as refused:
            # A stale cookie is cleared so the form starts afresh.
            await self._login_page(send, refused.status, f"Signed out. {refused.message}", self._cookie(scope, "", 0))
            return
        page = self._static["dashboard.html"].decode().replace("<!--nick-->", html.escape(claims.nick))
        await respond(send, 200, page.encode(), _HTML, head=head)

    # ---- data ------------------------------------------------------------------------

    def _snapshot(self) -> bytes:
        """The overview as JSON, recomputed at most every half interval (shared by all viewers)."""
        now = trio.current_time()
        if self._cached is not None and now - self._cached[0] < self._interval_s / 2:
            return self._cached[1]
        state = self._overview()
        hotspots = state.get("hotspots")
        if isinstance(hotspots, dict):
            for spot in hotspots.get("hotspots", ()):
                where = self._places.get(spot.get("name"))
                if where is not None:
                    spot["lat"], spot["lng"] = where
        body = json.dumps(state, ensure_ascii=False, separators=(",", ":")).encode()
        self._cached = (now, body)
        return body

    async def _static_file(self, send: Send, name: str, head: bool) -> None:
        body = self._static.get(name)
        suffix = name[name.rfind(".") :] if "." in name else ""
        if body is None or suffix not in _CONTENT_TYPES or suffix == ".html":
            await respond_json(send, 404, {"error": "not found"}, head=head)
            return
        await respond(send, 200, body, _CONTENT_TYPES[suffix], head=head, cache=b"no-cache")

    async def _stream(self, receive: Receive, send: Send, token: str) -> None:
        """Server-sent events: the overview every ``interval_s`` until the client leaves.

        Resource handling: one task per viewer, plus a watcher for
        ``http.disconnect`` (and for shutdown) that cancels it.
        """
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-store"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        gone = False

        async def watch_disconnect(scope: trio.CancelScope) -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            scope.cancel()

        async def watch_closing(scope: trio.CancelScope, closing: Callable[[], Awaitable[object]]) -> None:
            await closing()
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_disconnect, nursery.cancel_scope)
            if self._closing is not None:
                nursery.start_soon(watch_closing, nursery.cancel_scope, self._closing)
            await send({"type": "http.response.body", "body": b"retry: 2000\n\n", "more_body": True})
            while True:
                try:
                    self._check(token)
                except _Refused as refused:
                    data = json.dumps({"status": refused.status, "error": refused.message}).encode()
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b"event: signed-out\ndata: " + data + b"\n\n",
                            "more_body": True,
                        }
                    )
                    break
                await send(
                    {"type": "http.response.body", "body": b"data: " + self._snapshot() + b"\n\n", "more_body": True}
                )
                await trio.sleep(self._interval_s)
            nursery.cancel_scope.cancel()
        if not gone:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
