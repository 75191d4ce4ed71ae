"""The admin dashboard's ASGI app.

Theory of operation: the page is static (``static/``); everything live comes
from two JSON feeds, ``/admin/api/state`` (one snapshot) and ``/admin/stream``
(server-sent events, one snapshot a second). The region map is drawn in the
browser from ``/admin/api/regions``, the server's own GeoJSON.

Auth: an admin signs in with a one-time link (``dongne admin-link`` prints
``/admin/login?code=...``; the code is HMAC-signed with a key derived from the
server's secret, lasts 5 minutes and is accepted once) or by pasting an admin
JWT into the login form. A link gets a fresh admin JWT of ``session_ttl_s``
(12 h); either is kept in an HttpOnly, SameSite=Strict cookie scoped to
``/admin``. Every request verifies the cookie's token again (so an expired
token stops working at once), and an open event stream checks it before each
event and ends when it expires. Tokens in URLs (``?token=``) are refused:
browser history and proxy logs keep them.

Used codes are recorded in the database until they expire (``claim_code``:
``signin_codes_used``), so a code opens one session, also across a restart
and across the nodes sharing the database.

Moderation: the page is a protocol client. ``POST /admin/api/session-token``
mints a short-lived admin JWT for the signed-in admin, and the page's script
opens a WebSocket to the client port with it and sends the moderation
operations as msgpack (``static/msgpack.js``). That POST is CSRF-checked: the
cookie is SameSite=Strict, the request must carry ``X-Dongne-CSRF`` equal to
a token derived from the session cookie (it is in the dashboard page), and a
POST whose ``Origin`` is another host or whose ``Sec-Fetch-Site`` is not
``same-origin`` is refused whatever it carries.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import jwt
import trio

from ..auth import Claims, SigninCodeError, TokenVerifier, mint_token, read_signin_code
from ..core.errors import CloseConnection
from ..core.regions import load_hotspots
from ._http import BodyTooLarge, Receive, Scope, Send, cookies, header, query, read_form, respond, respond_json

__all__ = ["COOKIE_NAME", "CSRF_HEADER", "AdminApp"]

COOKIE_NAME: Final = "dongne_admin"
#: The header the page sends with its CSRF token on state-changing requests.
CSRF_HEADER: Final = "x-dongne-csrf"
_CSRF_PURPOSE = b"dongne admin csrf v1"
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
        claim_code: records a sign-in code's nonce as used until its expiry
            (epoch s): True if this use is the first, False if it was used
            already, None if the use cannot be recorded now (the database
            refuses writes: the sign-in is refused with 503).
        now_s: the current time in epoch seconds, for token expiry.
        closing: when given, an awaitable that returns when the server shuts
            down; open event streams end then instead of holding up
            hypercorn's graceful shutdown.
        interval_s: seconds between two events on ``/admin/stream``.
        places: named hotspot coordinates, ``name -> (lat, lng)``, to put the
            overview's hotspots on the map (default: the bundled Jeju hotspots,
            the ones the engine counts).
        client_url: the client port's WebSocket URL (``ws://host:port``), or a
            function returning it once the port is known; the moderation
            panel connects there. A wildcard host (``0.0.0.0``, ``::``) is
            replaced by the host the browser used for the ops port. Without
            it the panel says moderation is unavailable.
        bans: returns the active bans, ``[{user_id, nick, banned_until,
            reason}]`` (there is no protocol operation that lists them).
        is_banned: whether a user is banned now: a banned admin's session
            is refused (403) from the next request, and its stream signs out.
        session_ttl_s: lifetime of the session a sign-in link opens.
        ws_token_ttl_s: lifetime of the tokens the page gets for the WebSocket.

    Routes (all under ``/admin``): ``GET /admin`` (the dashboard, or the login
    form), ``GET|POST /admin/login``, ``POST /admin/logout``,
    ``GET /admin/api/state``, ``GET /admin/api/regions``,
    ``GET /admin/api/bans``, ``POST /admin/api/session-token``,
    ``GET /admin/stream``, ``GET /admin/static/NAME``.
    """

    def __init__(
        self,
        overview: Callable[[], dict[str, Any]],
        regions: Mapping[str, Any],
        verifier: TokenVerifier,
        *,
        claim_code: Callable[[str, float], Awaitable[bool | None]],
        now_s: Callable[[], float] = time.time,
        closing: Callable[[], Awaitable[object]] | None = None,
        interval_s: float = 1.0,
        places: Mapping[str, tuple[float, float]] | None = None,
        client_url: str | Callable[[], str | None] | None = None,
        bans: Callable[[], list[dict[str, Any]]] | None = None,
        is_banned: Callable[[str], bool] | None = None,
        session_ttl_s: int = 12 * 3600,
        ws_token_ttl_s: int = 300,
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
        self._client_url = client_url
        self._bans = bans
        self._is_banned = is_banned
        self._session_ttl_s = session_ttl_s
        self._ws_token_ttl_s = ws_token_ttl_s
        self._csrf_key = verifier.derive_key(_CSRF_PURPOSE)
        self._claim_code = claim_code

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
            "/api/bans": ("GET",),
            "/api/session-token": ("POST",),
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
        if method == "POST" and (refusal := _cross_site(scope)) is not None:
            await respond_json(send, 403, {"error": refusal})
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
            elif path == "/api/session-token":
                await self._session_token(scope, send, token)
            elif path == "/api/bans":
                await respond_json(send, 200, {"bans": self._bans() if self._bans is not None else []}, head=head)
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
                403 for a valid token without the admin role, or of a banned user.
        """
        if not token:
            raise _Refused(401, "No token: sign in with an admin token.")
        try:
            claims = self._verifier.verify(token, now_s=self._now_s())
        except CloseConnection as exc:
            raise _Refused(401, f"The token was refused ({exc.reason}).") from None
        if not claims.is_admin:
            raise _Refused(403, f"The token for user '{claims.user_id}' is valid but has no admin role.")
        if self._is_banned is not None and self._is_banned(claims.user_id):
            raise _Refused(403, f"The user '{claims.user_id}' is banned.")
        return claims

    def _cookie(self, scope: Scope, token: str, max_age: int) -> tuple[bytes, bytes]:
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        value = f"{COOKIE_NAME}={token}; Path=/admin; Max-Age={max(0, max_age)}; HttpOnly; SameSite=Strict{secure}"
        return (b"set-cookie", value.encode())

    def _csrf(self, token: str) -> str:
        """The CSRF token bound to the session cookie's ``token``."""
        mac = hmac.new(self._csrf_key, token.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:24]).decode()

    async def _login(self, scope: Scope, receive: Receive, send: Send, root: str) -> None:
        if scope["method"] == "POST":
            try:
                form = await read_form(receive, _FORM_LIMIT)
            except BodyTooLarge:
                await self._login_page(send, 413, "That is too long to be a token.")
                return
            code = form.get("code", [""])[0].strip()
            if code:
                await self._redeem(scope, send, root, code)
                return
            token = form.get("token", [""])[0].strip()
        else:
            params = query(scope)
            if "code" in params:
                # The page posts the code back (its script does it at once):
                # a GET, e.g. a chat app's link preview, does not use it up.
                await self._code_page(send, params["code"][0].strip())
                return
            if "token" in params:
                await self._login_page(
                    send,
                    400,
                    "Tokens in links are not accepted (browser history and proxy logs keep them): "
                    "run dongne admin-link for a one-time sign-in link, or paste the token below.",
                )
                return
            await self._login_page(send, 200, "")
            return
        try:
            self._check(token)
        except _Refused as refused:
            await self._login_page(send, refused.status, refused.message)
            return
        # Valid and checked: read exp only to let the cookie die with the token.
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp", 0)
        cookie = self._cookie(scope, token, int(exp - self._now_s()))
        await respond(send, 303, b"", _HTML, headers=[(b"location", root.encode()), cookie])

    async def _redeem(self, scope: Scope, send: Send, root: str, code: str) -> None:
        """Exchange a one-time sign-in code for a session cookie (a fresh admin JWT)."""
        now = self._now_s()
        try:
            signin = read_signin_code(self._verifier.secret, code, now_s=now)
        except SigninCodeError as exc:
            await self._login_page(send, 401, str(exc).capitalize() + ".")
            return
        first = await self._claim_code(signin.nonce, signin.expires_s)
        if first is None:
            await self._login_page(send, 503, "The server cannot record the sign-in now: try the link again shortly.")
            return
        if not first:
            await self._login_page(
                send, 401, "This sign-in link was used already: run dongne admin-link for a new one."
            )
            return
        ttl = self._session_ttl_s
        token = mint_token(self._verifier.secret, signin.user_id, nick=signin.nick, admin=True, ttl_s=ttl, now_s=now)
        cookie = self._cookie(scope, token, ttl)
        await respond(send, 303, b"", _HTML, headers=[(b"location", root.encode()), cookie])

    async def _code_page(self, send: Send, code: str) -> None:
        page = self._static["login.html"].decode()
        form = (
            '<form id="code-form" method="post" action="/admin/login">'
            f'<input type="hidden" name="code" value="{html.escape(code)}">'
            '<button type="submit">Sign in with this link</button></form>'
        )
        page = page.replace("<!--message-->", '<p class="notice">Signing in with a one-time link…</p>' + form)
        await respond(send, 200, page.encode(), _HTML)

    async def _session_token(self, scope: Scope, send: Send, cookie_token: str) -> None:
        """A short-lived admin JWT for the page's WebSocket: CSRF-checked."""
        sent = header(scope, CSRF_HEADER.encode()) or ""
        if not hmac.compare_digest(sent.encode(), self._csrf(cookie_token).encode()):
            await respond_json(send, 403, {"error": f"missing or wrong {CSRF_HEADER} header"})
            return
        url = self._ws_url(scope)
        if url is None:
            await respond_json(send, 503, {"error": "the client port is not known"})
            return
        claims = self._check(cookie_token)
        now = self._now_s()
        token = mint_token(
            self._verifier.secret,
            claims.user_id,
            nick=claims.nick,
            admin=True,
            ttl_s=self._ws_token_ttl_s,
            now_s=now,
        )
        await respond_json(
            send, 200, {"token": token, "url": url, "expires_at": int((now + self._ws_token_ttl_s) * 1000)}
        )

    def _ws_url(self, scope: Scope) -> str | None:
        """The client port's URL as this browser can reach it."""
        url = self._client_url() if callable(self._client_url) else self._client_url
        if not url:
            return None
        parts = urlsplit(url)
        if parts.hostname in (None, "", "0.0.0.0", "::"):
            host = urlsplit("//" + (header(scope, b"host") or "127.0.0.1")).hostname or "127.0.0.1"
            netloc = f"[{host}]" if ":" in host else host
            if parts.port is not None:
                netloc += f":{parts.port}"
            parts = parts._replace(netloc=netloc)
        return urlunsplit(parts)

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
        url = self._ws_url(scope)
        meta = f'<meta name="dongne-csrf" content="{self._csrf(token)}">'
        page = page.replace("<!--csrf-->", meta)
        connect = ""
        if url is not None:
            parts = urlsplit(url)
            connect = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        await respond(send, 200, page.encode(), _HTML, head=head, connect=connect)

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


def _cross_site(scope: Scope) -> str | None:
    """Why a POST is refused as cross-site, or None.

    ``Sec-Fetch-Site`` (sent by every current browser, not settable by
    scripts) must be ``same-origin`` (or ``none``: typed by the user); a page
    on another port of the same host is "same-site" and would get the
    SameSite=Strict cookie, so it is refused too. Without that header, an
    ``Origin`` naming another host is refused (``null`` is let through: the
    pages' no-referrer policy makes a browser send it for their own forms).
    Clients that send neither (curl, tests) are judged by the cookie and the
    CSRF token alone.
    """
    site = header(scope, b"sec-fetch-site")
    if site is not None:
        if site not in ("same-origin", "none"):
            return f"cross-site request refused (Sec-Fetch-Site: {site})"
        return None
    origin = header(scope, b"origin")
    if origin is not None and origin != "null":
        host = header(scope, b"host") or ""
        if urlsplit(origin).netloc.lower() != host.lower():
            return "cross-site request refused (Origin is not this host)"
    return None
