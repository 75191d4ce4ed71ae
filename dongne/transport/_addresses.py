"""The client's real address behind reverse proxies, and the Origin check.

Theory of operation. A proxy that forwards a request appends the address it
got the request from to ``X-Forwarded-For`` (or adds a ``Forwarded: for=``
element, RFC 7239). Everything left of what our own proxies appended was
written by the client and proves nothing. So, only when the peer is a trusted
proxy, walk the list from the right, skipping trusted proxies: the first
address that is not trusted is the client. From any other peer the headers
are ignored, whatever they say. An entry that is not an address (``unknown``,
an obfuscated name, garbage) stops the walk: the last trusted hop before it
is the best address known.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["OriginPolicy", "TrustedProxies", "forwarded_for", "normalize_address", "x_forwarded_for"]

Headers = Sequence[tuple[bytes, bytes]]
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse(text: str) -> _Address | None:
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def normalize_address(address: str) -> str:
    """``address`` in canonical form (IPv4-mapped IPv6 as IPv4); unchanged when not an address."""
    ip = _parse(address)
    return address if ip is None else str(ip)


def x_forwarded_for(values: Iterable[bytes]) -> list[str]:
    """The addresses of ``X-Forwarded-For`` header values, in order (several headers join as one list)."""
    out: list[str] = []
    for value in values:
        for part in value.decode("latin-1").split(","):
            part = part.strip()
            if part:
                out.append(_strip_port(part))
    return out


def forwarded_for(values: Iterable[bytes]) -> list[str]:
    """The ``for=`` of each ``Forwarded`` element (RFC 7239), in order; "" for an element without one."""
    out: list[str] = []
    for value in values:
        for element in _split_quoted(value.decode("latin-1"), ","):
            found = ""
            for pair in _split_quoted(element, ";"):
                name, _, raw = pair.partition("=")
                if name.strip().lower() == "for":
                    raw = raw.strip()
                    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
                        raw = raw[1:-1].replace("\\", "")
                    found = _strip_port(raw)
            if element.strip():
                out.append(found)
    return out


def _split_quoted(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def _strip_port(text: str) -> str:
    """``[2001:db8::1]:443`` → ``2001:db8::1``; ``192.0.2.1:443`` → ``192.0.2.1``; others as they are."""
    if text.startswith("["):
        end = text.find("]")
        return text[1:end] if end > 0 else text
    if text.count(":") == 1:
        return text.split(":", 1)[0]
    return text


class TrustedProxies:
    """Which peers may say who the client is, and the header they say it in.

    Args:
        networks: addresses or CIDR networks of trusted proxies.
        header: ``"x-forwarded-for"`` or ``"forwarded"``: the header the
            proxies set. Only that one is read: a proxy that sets one passes
            the other through as the client wrote it.
    """

    def __init__(self, networks: Iterable[str] = (), *, header: str = "x-forwarded-for") -> None:
        if header not in ("x-forwarded-for", "forwarded"):
            raise ValueError(f"unknown forwarding header {header!r}")
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self.header = header.encode()

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str) -> bool:
        ip = _parse(address)
        return ip is not None and self._trusts(ip)

    def _trusts(self, ip: _Address) -> bool:
        return any(ip in net for net in self.networks)

    def client_address(self, peer: str, headers: Headers) -> str:
        """The client's address for a request that came from ``peer`` with ``headers``."""
        peer = normalize_address(peer)
        if not self.networks or not self.trusts(peer):
            return peer
        values = [value for name, value in headers if name.lower() == self.header]
        hops = x_forwarded_for(values) if self.header == b"x-forwarded-for" else forwarded_for(values)
        client = peer
        for hop in reversed(hops):
            ip = _parse(hop)
            if ip is None:
                break
            client = str(ip)
            if not self._trusts(ip):
                break
        return client


class OriginPolicy:
    """The browser origins allowed to open WebSockets (cross-site WebSocket hijacking defence).

    A request without ``Origin`` is not from a browser page (native apps, servers)
    and is allowed. Entries are origins (``https://app.example``), ``*.``
    patterns (``https://*.example``: any subdomain), ``null`` or ``*`` (any).
    """

    def __init__(self, allowed: Iterable[str] = ("*",)) -> None:
        entries = [a.strip().lower().rstrip("/") for a in allowed]
        self.any = "*" in entries
        self.exact = {e for e in entries if "*" not in e}
        self.suffixes = [(e.split("*.", 1)[0], e.split("*.", 1)[1]) for e in entries if "*." in e]

    def allows(self, origin: str | None, host: str = "") -> bool:
        """Whether a handshake with this ``Origin`` may proceed; ``host`` is its ``Host`` header.

        A page whose origin is the very host it connects to was served by this
        server (the web app): it is always allowed.
        """
        if origin is None or self.any:
            return True
        origin = origin.strip().lower().rstrip("/")
        if origin in self.exact:
            return True
        _scheme, sep, authority = origin.partition("://")
        if sep and host and authority == host.strip().lower():
            return True
        for scheme, suffix in self.suffixes:
            if origin.startswith(scheme) and origin.endswith("." + suffix):
                host = origin[len(scheme) : -len(suffix) - 1]
                if host and "/" not in host and ":" not in host:
                    return True
        return False
