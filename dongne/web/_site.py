"""The web app's files, answered from memory on the client port.

The app is built by Node (``clients/web``, esbuild) into ``static/`` beside
this module and shipped inside the Python package, so the server never needs
Node: at start-up every file is read once, gzipped once and given a content
hash as its ETag. Two documents are generated: ``/config.json`` (what the
page needs from ``[web]`` and ``[location]``) and ``/regions.geojson`` (the
service area the engine uses, as /admin serves it).

Every answer carries a strict content security policy: the app's own
scripts and styles only, WebSocket to the host the page came from, and the
one tile server and token endpoint the operator configured, if any.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from ..transport import HttpAnswer

__all__ = ["WebApp", "content_security_policy"]

#: Content types by file suffix; a file of another kind is not served.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".geojson": "application/geo+json",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}

#: A file name the app may ask for: flat, no dot files, no traversal.
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
#: A name esbuild gave from the content's hash (``app-3RVOLRBA.js``, ``chunk-OOJM4CTU.js``).
_HASHED = re.compile(r"^/[A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)*-[A-Z0-9]{8}\.[a-z0-9]+$")
#: A Host header worth echoing into the policy (host, IPv4, [IPv6], port).
_HOST = re.compile(r"^[A-Za-z0-9.-]{1,253}(:\d{1,5})?$|^\[[0-9A-Fa-f:.]{2,45}\](:\d{1,5})?$")

#: Sent with every answer besides the policy.
SECURITY_HEADERS = (
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("permissions-policy", "geolocation=(self), camera=(), microphone=(), payment=()"),
)


@attrs.frozen
class _Document:
    body: bytes
    gzipped: bytes | None  # None: gzip would not make it smaller
    etag: str
    content_type: str

    @classmethod
    def of(cls, body: bytes, content_type: str) -> _Document:
        # mtime=0: the same file always compresses to the same bytes.
        packed = gzip.compress(body, compresslevel=9, mtime=0)
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        return cls(body, packed if len(packed) < len(body) else None, etag, content_type)


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of an absolute URL (for the policy), or "".

    A tile template's ``{s}`` (Leaflet's subdomains: a., b., c.) as the
    host's first label becomes the policy's wildcard, ``*.``.
    """
    if not url:
        return ""
    parts = urlsplit(url.replace("{z}", "0").replace("{x}", "0").replace("{y}", "0").replace("{r}", ""))
    if not parts.scheme or not parts.netloc:
        return ""
    netloc = parts.netloc
    if netloc.startswith("{s}."):
        netloc = "*." + netloc[4:]
    return f"{parts.scheme}://{netloc}" if "{" not in netloc else ""


def content_security_policy(*, host: str | None, tile_url: str = "", token_url: str = "") -> str:
    """The page's policy: itself, its WebSocket, and the configured tile server and token endpoint.

    ``'self'`` covers same-origin ``ws:``/``wss:`` in browsers that implement
    CSP level 3; the page's host is named as well for those that do not.
    """
    connect = ["'self'"]
    if host is not None:
        connect += [f"ws://{host}", f"wss://{host}"]
    if token := _origin(token_url):
        connect.append(token)
    images = ["'self'", "data:"]
    if tiles := _origin(tile_url):
        images.append(tiles)
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        f"img-src {' '.join(images)}; connect-src {' '.join(connect)}; "
        "media-src 'self'; manifest-src 'self'; font-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )


class WebApp:
    """Answers the app's GET/HEAD requests on the client port.

    Args:
        config: ``/config.json``, what the page reads before it connects.
        regions: the service area (a GeoJSON FeatureCollection), served as
            ``/regions.geojson``.
        tile_url: the street map's tile template ("" when there is none).
        token_url: the operator's token endpoint ("" when there is none).
        static_dir: the built files (default: ``static/`` in this package).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        regions: Mapping[str, Any],
        *,
        tile_url: str = "",
        token_url: str = "",
        static_dir: Path | Traversable | None = None,
    ) -> None:
        self._tile_url = tile_url
        self._token_url = token_url
        folder = static_dir if static_dir is not None else resources.files(__package__) / "static"
        self._files: dict[str, _Document] = {}
        if folder.is_dir():
            for entry in folder.iterdir():
                suffix = "." + entry.name.rpartition(".")[2]
                if entry.is_file() and _NAME.match(entry.name) and suffix in CONTENT_TYPES:
                    self._files["/" + entry.name] = _Document.of(entry.read_bytes(), CONTENT_TYPES[suffix])
        if "/index.html" in self._files:
            self._files["/"] = self._files["/index.html"]
        self._files["/config.json"] = _Document.of(_json(config), CONTENT_TYPES[".json"])
        self._files["/regions.geojson"] = _Document.of(_json(regions), CONTENT_TYPES[".geojson"])

    @property
    def has_page(self) -> bool:
        """Whether the built app is there (``index.html``)."""
        return "/" in self._files

    def answer(self, method: str, path: str, headers: Iterable[tuple[bytes, bytes]]) -> HttpAnswer | None:
        """The answer to a request for ``path``, or ``None`` when it is not the app's."""
        document = self._files.get(path)
        if document is None:
            return None
        if method not in ("GET", "HEAD"):
            return HttpAnswer(405, (("allow", "GET, HEAD"), ("content-length", "0"), ("connection", "close")))
        seen = {name.lower(): value for name, value in headers}
        host = seen.get(b"host", b"").decode("latin-1")
        policy = content_security_policy(
            host=host if _HOST.match(host) else None, tile_url=self._tile_url, token_url=self._token_url
        )
        # Files named by their content hash (app-3RVOLRBA.js) never change: cached for good.
        # The rest (the page, its config) is revalidated with the ETag: a new build shows at once.
        cache = "public, max-age=31536000, immutable" if _HASHED.match(path) else "no-cache"
        common = (
            ("content-security-policy", policy),
            *SECURITY_HEADERS,
            ("cache-control", cache),
            ("etag", document.etag),
            ("vary", "accept-encoding"),
            ("connection", "close"),
        )
        if document.etag in seen.get(b"if-none-match", b"").decode("latin-1"):
            return HttpAnswer(304, common)
        body, encoding = document.body, ""
        if document.gzipped is not None and b"gzip" in seen.get(b"accept-encoding", b"").lower():
            body, encoding = document.gzipped, "gzip"
        head = (
            ("content-type", document.content_type),
            ("content-length", str(len(body))),
            *((("content-encoding", encoding),) if encoding else ()),
            *common,
        )
        return HttpAnswer(200, head, b"" if method == "HEAD" else body)


def _json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()
