"""Behind a real nginx: TLS terminated by nginx, wss:// proxied to dongne, clients on 127.0.0.2 and 127.0.0.3.

Debian's nginx (``.ci/run`` installs it) runs as this test's own process with a
throwaway self-signed certificate made by ``openssl``. Without either program
the tests skip, saying why.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from .addressed import attempt
from .conftest import UNLIMITED, token

NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; "" close; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""


def _program(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        pytest.skip(
            f"{name} is not installed (.ci/run installs Debian's nginx and openssl); cannot test behind a proxy"
        )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _certificate(directory: Path) -> ssl.SSLContext:
    """A throwaway self-signed certificate for 127.0.0.1; returns a client context that trusts only it."""
    await trio.run_process(
        [
            _program("openssl"),
            *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem")),
        ],
        capture_stdout=True,
        capture_stderr=True,
    )
    return ssl.create_default_context(cafile=str(directory / "cert.pem"))


@attrs.define
class Proxy:
    port: int
    tls: ssl.SSLContext


async def _wait_listening(port: int, proc: trio.Process) -> bool:
    with trio.move_on_after(10):
        while proc.returncode is None:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return True
    return False


@pytest.fixture
async def start_nginx(tmp_path: Path) -> AsyncIterator[Callable[[int], Any]]:
    """``await start_nginx(upstream_port)`` runs nginx in front of dongne; stopped after the test."""
    nginx = _program("nginx")
    directory = tmp_path / "nginx"
    directory.mkdir()
    with trio.fail_after(60):
        tls = await _certificate(directory)
    procs: list[trio.Process] = []

    async def start(upstream: int) -> Proxy:
        for _ in range(3):  # the free port may be taken between our probe and nginx's bind
            port = _free_port()
            conf = directory / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=directory, port=port, upstream=upstream))
            proc = await trio.lowlevel.open_process(
                [nginx, "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log"), "-g", "daemon off;"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(proc)
            if await _wait_listening(port, proc):
                return Proxy(port, tls)
            await _stop(proc)
        errors = (directory / "error.log").read_text() if (directory / "error.log").exists() else ""
        pytest.fail(f"nginx did not start: {errors[-2000:]}")

    try:
        yield start
    finally:
        for proc in procs:
            await _stop(proc)


async def _stop(proc: trio.Process) -> None:
    """Stop our nginx (its master takes its worker with it), bounded even under cancellation."""
    with trio.CancelScope(shield=True):
        if proc.returncode is None:
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


PROXIED = {"trusted_proxies": ["127.0.0.1"]}


def _addresses(h: Any) -> set[str | None]:
    clients = h.running.clients
    return {clients.address_of(c) for c in clients.conns}


async def test_per_address_limits_count_clients_behind_nginx_apart(start_server, start_nginx) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(server=PROXIED, limits={**UNLIMITED, "connections_per_ip_per_minute": 3.0})
    proxy = await start_nginx(h.running.port)

    # Three from 127.0.0.2 get in; one of them forges X-Forwarded-For, which
    # nginx appends the real address to.
    for i in range(3):
        forged = [(b"X-Forwarded-For", b"127.0.0.4")] if i == 1 else []
        async with attempt(proxy.port, token(f"two{i}"), bind="127.0.0.2", tls=proxy.tls, headers=forged) as ok:
            assert ok.ok
            assert _addresses(h) == {"127.0.0.2"}
    async with attempt(proxy.port, token("two3"), bind="127.0.0.2", tls=proxy.tls) as over:
        assert over.status == 429
        assert int(over.headers["retry-after"]) >= 1
    # 127.0.0.3 has its own allowance.
    for i in range(3):
        async with attempt(proxy.port, token(f"three{i}"), bind="127.0.0.3", tls=proxy.tls) as ok:
            assert ok.ok
            assert _addresses(h) == {"127.0.0.3"}
    async with attempt(proxy.port, token("three3"), bind="127.0.0.3", tls=proxy.tls) as over:
        assert over.status == 429
    assert h.running.clients.statistics().refused_connections == 2
    await h.running.aclose()


async def test_blocking_one_client_behind_nginx_leaves_the_other_working(start_server, start_nginx) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(server=PROXIED, limits={**UNLIMITED, "ip_blocklist": ["127.0.0.2"]})
    proxy = await start_nginx(h.running.port)

    async with attempt(proxy.port, token("blocked"), bind="127.0.0.2", tls=proxy.tls) as blocked:
        assert blocked.status == 403
    async with attempt(proxy.port, token("neighbour"), bind="127.0.0.3", tls=proxy.tls) as other:
        assert other.ok
        assert _addresses(h) == {"127.0.0.3"}
    # Forging the neighbour's address does not help the blocked client.
    forged = [(b"X-Forwarded-For", b"127.0.0.3")]
    async with attempt(proxy.port, token("blocked"), bind="127.0.0.2", tls=proxy.tls, headers=forged) as again:
        assert again.status == 403
    await h.running.aclose()


async def test_a_client_forging_forwarded_for_directly_is_not_believed(start_server, start_nginx) -> None:  # type: ignore[no-untyped-def]
    h = await start_server(
        server=PROXIED, limits={**UNLIMITED, "connections_per_ip_per_minute": 1.0, "ip_blocklist": ["127.0.0.3"]}
    )
    proxy = await start_nginx(h.running.port)

    async with attempt(proxy.port, token("via"), bind="127.0.0.2", tls=proxy.tls) as via:
        assert via.ok
    # Straight to dongne, past nginx, claiming to be a fresh address: it is still 127.0.0.2.
    forged = [(b"X-Forwarded-For", b"198.51.100.7")]
    async with attempt(h.running.port, token("direct"), bind="127.0.0.2", headers=forged) as direct:
        assert direct.status == 429
    # ... and claiming to be a blocked one does not get anyone else blocked either.
    async with attempt(
        h.running.port, token("fresh"), bind="127.0.0.4", headers=[(b"X-Forwarded-For", b"127.0.0.3")]
    ) as fresh:
        assert fresh.ok
        assert _addresses(h) == {"127.0.0.4"}
    await h.running.aclose()
