"""Small ASGI helpers: responses, cookies, bodies. No framework: the ops port is tiny."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

__all__ = [
    "CSP",
    "BodyTooLarge",
    "Receive",
    "Scope",
    "Send",
    "cookies",
    "header",
    "query",
    "read_form",
    "respond",
    "respond_json",
]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

#: The content security policy of every admin response. The page loads nothing
#: from elsewhere, so it can be strict: no inline script or style, no frames,
#: no base. ``{connect}`` is where scripts may connect besides the ops port
#: itself: the dashboard page adds the client port's WebSocket URL.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'{connect}; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

#: Sent with every admin response (besides the CSP).
SECURITY_HEADERS: Headers = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


class BodyTooLarge(ValueError):
    """The request body is larger than the handler accepts."""


async def respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    *,
    headers: Iterable[tuple[bytes, bytes]] = (),
    head: bool = False,
    cache: bytes = b"no-store",
    connect: str = "",
) -> None:
    """Send a whole response (headers only for HEAD); ``connect``: more ``connect-src`` sources."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", cache),
                (b"content-security-policy", CSP.format(connect=f" {connect}" if connect else "").encode()),
                *SECURITY_HEADERS,
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


async def respond_json(send: Send, status: int, value: Any, *, head: bool = False) -> None:
    await respond(send, status, json.dumps(value, ensure_ascii=False).encode(), b"application/json", head=head)


def cookies(scope: Scope) -> dict[str, str]:
    """The request's cookies (the first of each name wins)."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        if name != b"cookie":
            continue
        for part in value.decode("latin-1").split(";"):
            key, sep, val = part.strip().partition("=")
            if sep and key and key not in out:
                out[key] = val.strip().strip('"')
    return out


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of the request header ``name`` (lower case), or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def query(scope: Scope) -> dict[str, list[str]]:
    return parse_qs(scope.get("query_string", b"").decode("latin-1"))


async def read_form(receive: Receive, limit: int) -> dict[str, list[str]]:
    """Read an ``application/x-www-form-urlencoded`` body of at most ``limit`` bytes.

    Raises:
        BodyTooLarge: the body is longer than ``limit``.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return parse_qs(b"".join(chunks).decode("utf-8", "replace"))
