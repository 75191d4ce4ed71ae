"""The web app's files on the client port: what a browser gets, over real sockets."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import pytest
import trio

from dongne.config import load_settings
from dongne.core import ConfigError, load_default_regions
from dongne.web import WebApp, content_security_policy

from .conftest import Harness


async def http(port: int, path: str, method: str = "GET", **headers: str) -> tuple[int, dict[str, str], bytes]:
    """One request over a fresh connection: the status, the headers (lower-cased) and the body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    async with stream:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in fields.items()}, body


def built_app(tmp_path: Path, **config: Any) -> WebApp:
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<!doctype html><title>dongne</title>" + "<p>hello</p>" * 50)
    (static / "app.js").write_text("console.log('dongne');\n" * 40)
    (static / "app-3RVOLRBA.js").write_text("console.log('built');\n")
    (static / ".secret").write_text("not served")
    (static / "notes.md").write_text("not a served kind")
    return WebApp({"ws_path": "/ws", **config}, {"type": "FeatureCollection", "features": []}, static_dir=static)


def test_files_are_answered_with_etag_gzip_and_304(tmp_path: Path) -> None:
    app = built_app(tmp_path)
    page = app.answer("GET", "/", [(b"host", b"127.0.0.1:8765")])
    assert page is not None and page.status == 200
    headers = dict(page.headers)
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert page.body == (tmp_path / "static" / "index.html").read_bytes()
    assert headers["cache-control"] == "no-cache" and headers["x-content-type-options"] == "nosniff"
    zipped = app.answer("GET", "/index.html", [(b"accept-encoding", b"gzip, br")])
    assert zipped is not None and dict(zipped.headers)["content-encoding"] == "gzip"
    assert gzip.decompress(zipped.body) == page.body
    assert dict(page.headers)["cache-control"] == "no-cache"  # the page is revalidated
    hashed = app.answer("GET", "/app-3RVOLRBA.js", [])
    assert hashed is not None and dict(hashed.headers)["cache-control"] == "public, max-age=31536000, immutable"
    again = app.answer("GET", "/app.js", [(b"if-none-match", dict(page.headers)["etag"].encode())])
    assert again is not None and again.status == 200  # another file's ETag does not match
    etag = dict(again.headers)["etag"].encode()
    cached = app.answer("GET", "/app.js", [(b"if-none-match", etag)])
    assert cached is not None and (cached.status, cached.body) == (304, b"")
    head = app.answer("HEAD", "/app.js", [])
    assert head is not None and head.body == b"" and dict(head.headers)["content-length"] == str(len(again.body))
    posted = app.answer("POST", "/app.js", [])
    assert posted is not None and posted.status == 405 and dict(posted.headers)["allow"] == "GET, HEAD"
    for path in ("/.secret", "/notes.md", "/../web/_site.py", "/static/app.js", "/nothing.js"):
        assert app.answer("GET", path, []) is None


def test_policy_names_only_the_configured_hosts() -> None:
    plain = content_security_policy(host="dongne.example:8765")
    assert (
        "script-src 'self';" in plain
        and "connect-src 'self' ws://dongne.example:8765 wss://dongne.example:8765;" in plain
    )
    assert "img-src 'self' data:;" in plain and "'unsafe-inline'" not in plain and "http" not in plain
    configured = content_security_policy(
        host=None, tile_url="https://tiles.example.org/{z}/{x}/{y}.png", token_url="https://app.example/api/token"
    )
    assert "img-src 'self' data: https://tiles.example.org;" in configured
    assert "connect-src 'self' https://app.example;" in configured
    # Leaflet fetches a.tile..., b.tile..., c.tile... for {s}: the policy allows the subdomains.
    subdomains = content_security_policy(host=None, tile_url="https://{s}.tile.example.org/{z}/{x}/{y}.png")
    assert "img-src 'self' data: https://*.tile.example.org;" in subdomains


def test_web_settings_are_checked() -> None:
    good = load_settings(None, environ={}, overrides={"web": {"tile_url": "http://127.0.0.1:9/{z}/{x}/{y}.png"}})
    assert good.web.tile_url.endswith("{y}.png") and good.web.enabled
    assert load_settings(None, environ={}, overrides={"web": {"tile_url": "https://{s}.t.example/{z}/{x}/{y}.png"}})
    for bad in (
        {"tile_url": "https://tiles.{s}.example/{z}/{x}/{y}.png"},
        {"tile_url": "https://{z}.example/{z}/{x}/{y}.png"},
        {"tile_url": "https://tiles.example.org/tile.png"},
        {"token_url": "/api/token"},
        {"tile_url": "ftp://x/{z}/{x}/{y}"},
    ):
        with pytest.raises(ConfigError, match="_url"):
            load_settings(None, environ={}, overrides={"web": bad})


async def test_client_port_serves_the_app_config_and_regions(server: Harness) -> None:
    port = server.running.port
    status, headers, body = await http(port, "/config.json")
    assert status == 200 and headers["content-type"] == "application/json"
    config = json.loads(body)
    assert config == {
        "protocol": 1,
        "ws_path": "/ws",
        "tile_url": "",
        "tile_attribution": "",
        "token_url": "",
        "min_update_interval_s": 2.0,
        "nearby_radii_m": [2000.0, 5000.0],
    }
    assert f"ws://127.0.0.1:{port}" in headers["content-security-policy"]
    status, headers, body = await http(port, "/regions.geojson", accept_encoding="gzip")
    assert status == 200 and headers["content-encoding"] == "gzip"
    regions = json.loads(gzip.decompress(body))
    assert {f["properties"]["name"] for f in regions["features"]} == set(load_default_regions().names)
    # The probes and the WebSocket upgrade are unchanged beside it.
    status, _, body = await http(port, "/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert (await http(port, "/admin"))[0] == 404
    async with server.connect("mina") as client:
        assert client.hello["user"]["user_id"] == "mina"


async def test_web_app_can_be_switched_off(start_server: Any) -> None:
    harness: Harness = await start_server(web={"enabled": False})
    for path in ("/config.json", "/regions.geojson"):
        assert (await http(harness.running.port, path))[0] == 404
    status, _, body = await http(harness.running.port, "/")
    assert status == 426 and b"WebSocket" in body
    harness.running.stop()


async def test_the_built_app_is_served_at_the_root(server: Harness) -> None:
    status, headers, body = await http(server.running.port, "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    # The page loads its bundle and styles from this host only, by relative names.
    assets = re.findall(rb'(?:src|href)="([^"]+)"', body)
    assert assets and all(b"//" not in a and not a.startswith(b"/") for a in assets)
    script = next(a.decode() for a in assets if a.endswith(b".js"))
    status, headers, _ = await http(server.running.port, "/" + script)
    assert status == 200 and headers["content-type"] == "text/javascript; charset=utf-8"
