"""The ops port's ASGI app: health, readiness (and later metrics and admin)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

__all__ = ["OpsApp"]


class OpsApp:
    """A small ASGI 3 app served by hypercorn on the ops port.

    Args:
        is_ready: True while the engine is loaded and accepting clients.
        status: a dict of live figures for ``/health``.
    """

    def __init__(
        self,
        is_ready: Callable[[], bool],
        status: Callable[[], dict[str, Any]],
        metrics: Callable[[], bytes] | None = None,
        admin: Any = None,
    ) -> None:
        self._is_ready = is_ready
        self._status = status
        self._metrics = metrics
        self._admin = admin  # an ASGI app for /admin...

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if self._admin is not None and (path == "/admin" or path.startswith("/admin/")):
            await self._admin(scope, receive, send)
        elif scope["method"] not in ("GET", "HEAD"):
            await _json(send, 405, {"error": "method not allowed"})
        elif path == "/health":
            await _json(send, 200, {"status": "ok", **self._status()})
        elif path == "/ready":
            ready = self._is_ready()
            await _json(send, 200 if ready else 503, {"ready": ready})
        elif path == "/metrics" and self._metrics is not None:
            body = self._metrics()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body, "more_body": False})
        else:
            await _json(send, 404, {"error": "not found"})


async def _json(send: ASGISendCallable, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": False})
