"""The PROXY protocol, versions 1 and 2 (HAProxy's spec), sans I/O.

A TCP load balancer that cannot add HTTP headers prepends one header to each
connection naming the client's address. ``parse_proxy_header`` reads it from
the first bytes of a connection: ``None`` while more bytes are needed, a
``ProxyHeader`` once complete, ``ProxyProtocolError`` when the bytes are not
a PROXY header. It is believed only when the peer is a trusted proxy (the
driver's decision, not this module's).
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

__all__ = ["V2_SIGNATURE", "ProxyHeader", "ProxyProtocolError", "parse_proxy_header"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included


class ProxyProtocolError(ValueError):
    """The connection did not start with a valid PROXY header."""


@attrs.frozen
class ProxyHeader:
    """A parsed PROXY header.

    Attributes:
        source: the client's address, or ``None`` when the header names none
            (v1 ``UNKNOWN``, v2 ``LOCAL`` such as a balancer's own health check,
            or an address family other than TCP/UDP over IPv4/IPv6).
        length: how many bytes the header took; what follows is the client's.
    """

    source: str | None
    length: int


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """Parse the PROXY header at the start of ``data``.

    Returns:
        the header, or ``None`` when ``data`` is a valid but incomplete start.

    Raises:
        ProxyProtocolError: ``data`` does not start with a PROXY header.
    """
    if data[:12] == V2_SIGNATURE[: len(data[:12])] and data[:1] == b"\r":
        return _v2(data)
    if data[:6] == V1_PREFIX[: len(data[:6])]:
        return _v1(data)
    raise ProxyProtocolError("no PROXY protocol header")


def _v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError("PROXY v1 line too long")
        return None
    parts = data[:end].decode("ascii", "replace").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(None, end + 2)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("malformed PROXY v1 line")
    try:
        source = ipaddress.ip_address(parts[2])
        ipaddress.ip_address(parts[3])
        ports = [int(p) for p in parts[4:6]]
    except ValueError:
        raise ProxyProtocolError("malformed PROXY v1 addresses") from None
    if source.version != (4 if parts[1] == "TCP4" else 6) or not all(0 <= p <= 65535 for p in ports):
        raise ProxyProtocolError("malformed PROXY v1 addresses")
    return ProxyHeader(str(source), end + 2)


def _v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        return None
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    if version_command >> 4 != 2 or version_command & 0x0F > 1:
        raise ProxyProtocolError("unsupported PROXY v2 version or command")
    total = 16 + length
    if len(data) < total:
        return None
    if version_command & 0x0F == 0:  # LOCAL: the balancer's own connection
        return ProxyHeader(None, total)
    body = data[16:total]
    address_family = family >> 4
    if address_family == 1 and len(body) >= 12:
        return ProxyHeader(str(ipaddress.IPv4Address(body[:4])), total)
    if address_family == 2 and len(body) >= 36:
        source = ipaddress.IPv6Address(body[:16])
        return ProxyHeader(str(source.ipv4_mapped or source), total)
    if address_family in (1, 2):
        raise ProxyProtocolError("PROXY v2 address block too short")
    return ProxyHeader(None, total)  # UNSPEC or UNIX: no address we can use
