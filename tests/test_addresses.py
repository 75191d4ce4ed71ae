"""The client's address behind proxies, the Origin check, the PROXY protocol and the per-address policy, without I/O."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from dongne.core.admission import AddressLimits, AddressPolicy
from dongne.transport import OriginPolicy, ProxyProtocolError, TrustedProxies, parse_proxy_header
from dongne.transport._addresses import forwarded_for, x_forwarded_for
from dongne.transport._proxy_protocol import V2_SIGNATURE

# ---- forwarding headers ------------------------------------------------------------------


def test_x_forwarded_for_lists_every_hop_in_order() -> None:
    values = [b"203.0.113.7, 10.0.0.2", b"[2001:db8::1]:443,192.0.2.9:8080 ,2001:db8::2"]

    assert x_forwarded_for(values) == ["203.0.113.7", "10.0.0.2", "2001:db8::1", "192.0.2.9", "2001:db8::2"]


def test_forwarded_for_reads_quoted_and_bracketed_elements() -> None:
    values = [b'for=192.0.2.60;proto=http;by=203.0.113.43, For="[2001:db8:cafe::17]:4711"', b"for=unknown, proto=https"]

    assert forwarded_for(values) == ["192.0.2.60", "2001:db8:cafe::17", "unknown", ""]


def test_headers_from_an_untrusted_peer_are_ignored() -> None:
    proxies = TrustedProxies(["127.0.0.1/32"])
    forged = [(b"x-forwarded-for", b"198.51.100.1")]

    assert proxies.client_address("203.0.113.5", forged) == "203.0.113.5"
    assert TrustedProxies().client_address("203.0.113.5", forged) == "203.0.113.5"


def test_the_rightmost_untrusted_hop_is_the_client() -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "127.0.0.1"])
    # The client forged the first entry; our proxies appended the rest.
    headers = [(b"x-forwarded-for", b"198.51.100.1, 203.0.113.9, 10.1.2.3")]

    assert proxies.client_address("127.0.0.1", headers) == "203.0.113.9"


def test_a_trusted_peer_without_the_header_is_the_client() -> None:
    proxies = TrustedProxies(["127.0.0.1"])

    assert proxies.client_address("127.0.0.1", []) == "127.0.0.1"


def test_every_hop_trusted_gives_the_leftmost() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])

    assert proxies.client_address("10.0.0.1", [(b"x-forwarded-for", b"10.9.9.9, 10.0.0.5")]) == "10.9.9.9"


def test_garbage_stops_the_walk_at_the_last_trusted_hop() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])

    assert proxies.client_address("10.0.0.1", [(b"x-forwarded-for", b"203.0.113.9, nonsense, 10.0.0.5")]) == "10.0.0.5"
    assert proxies.client_address("10.0.0.1", [(b"x-forwarded-for", b"junk")]) == "10.0.0.1"


def test_only_the_configured_header_is_read() -> None:
    headers = [(b"forwarded", b"for=198.51.100.1"), (b"x-forwarded-for", b"203.0.113.9")]

    assert TrustedProxies(["127.0.0.1"]).client_address("127.0.0.1", headers) == "203.0.113.9"
    assert TrustedProxies(["127.0.0.1"], header="forwarded").client_address("127.0.0.1", headers) == "198.51.100.1"


def test_ipv4_mapped_peers_count_as_ipv4() -> None:
    proxies = TrustedProxies(["127.0.0.1"])

    assert proxies.client_address("::ffff:127.0.0.1", [(b"x-forwarded-for", b"::ffff:203.0.113.9")]) == "203.0.113.9"


# ---- origins ------------------------------------------------------------------------------


def test_origins() -> None:
    policy = OriginPolicy(["https://dongne.example", "https://*.jeju.example"])

    assert policy.allows(None)  # not a browser
    assert policy.allows("https://dongne.example") and policy.allows("HTTPS://DONGNE.EXAMPLE")
    assert policy.allows("https://app.jeju.example")
    assert not policy.allows("https://jeju.example")
    assert not policy.allows("https://evil.example")
    assert not policy.allows("http://dongne.example")
    assert not policy.allows("https://dongne.example.evil.example")
    assert not policy.allows("null")
    assert OriginPolicy().allows("https://evil.example")  # the default: any


# ---- the PROXY protocol ---------------------------------------------------------------------


def test_proxy_v1() -> None:
    line = b"PROXY TCP4 203.0.113.9 10.0.0.1 56324 443\r\n"

    assert parse_proxy_header(line[:10]) is None
    header = parse_proxy_header(line + b"GET / HTTP/1.1\r\n")
    assert header is not None and (header.source, header.length) == ("203.0.113.9", len(line))
    v6 = parse_proxy_header(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n")
    assert v6 is not None and v6.source == "2001:db8::1"
    unknown = parse_proxy_header(b"PROXY UNKNOWN\r\n")
    assert unknown is not None and unknown.source is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 203.0.113.9 nope 1 2\r\n",
        b"PROXY TCP6 203.0.113.9 10.0.0.1 1 2\r\n",
        b"PROXY " + b"1" * 120,
    ],
)
def test_proxy_v1_refuses_what_is_not_a_header(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(data)


def _v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(body)) + body


def test_proxy_v2() -> None:
    v4 = _v2(1, 0x11, ipaddress.IPv4Address("203.0.113.9").packed + bytes(4) + struct.pack("!HH", 1, 2) + b"\x04tlv")
    v6 = _v2(1, 0x21, ipaddress.IPv6Address("2001:db8::1").packed + bytes(16) + struct.pack("!HH", 1, 2))
    local = _v2(0, 0x00, b"")

    assert parse_proxy_header(v4[:14]) is None
    assert parse_proxy_header(v4[:-1]) is None
    header = parse_proxy_header(v4 + b"GET")
    assert header is not None and (header.source, header.length) == ("203.0.113.9", len(v4))
    parsed6 = parse_proxy_header(v6)
    assert parsed6 is not None and parsed6.source == "2001:db8::1"
    parsed_local = parse_proxy_header(local)
    assert parsed_local is not None and parsed_local.source is None
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(V2_SIGNATURE + b"\x13\x11\x00\x00")  # version 1 in a v2 header


# ---- the per-address policy, on explicit time -------------------------------------------------

LIMITS = AddressLimits(connections_per_minute=600.0, failures_per_minute=6.0, max_unauthenticated=3)


def test_authenticated_users_share_an_address_loosely() -> None:
    policy = AddressPolicy(LIMITS)

    for _ in range(600):
        assert policy.admit("198.51.100.1", 0).admitted
        policy.authenticated("198.51.100.1", 0)
    over = policy.admit("198.51.100.1", 0)
    assert (over.reason, over.retry_after_ms) == ("connections", 100)  # 10 a second come back
    assert policy.admit("198.51.100.1", 100).admitted


def test_failures_throttle_an_address_strictly_and_not_its_neighbours() -> None:
    policy = AddressPolicy(LIMITS)

    for now in range(6):
        assert policy.admit("198.51.100.1", now).admitted
        policy.failed("198.51.100.1", now)
    throttled = policy.admit("198.51.100.1", 6)
    assert (throttled.reason, throttled.retry_after_ms) == ("failures", 9_994)  # one failure back per 10 s
    assert policy.admit("198.51.100.2", 6).admitted
    assert not policy.admit("198.51.100.1", 9_999).admitted
    assert policy.admit("198.51.100.1", 10_000).admitted


def test_unauthenticated_handshakes_in_flight_are_capped() -> None:
    policy = AddressPolicy(LIMITS)

    assert all(policy.admit("198.51.100.1", 0).admitted for _ in range(3))
    assert policy.admit("198.51.100.1", 0).reason == "unauthenticated"
    policy.authenticated("198.51.100.1", 1)
    assert policy.unauthenticated("198.51.100.1") == 2
    assert policy.admit("198.51.100.1", 1).admitted


def test_a_concurrent_flood_runs_into_debt() -> None:
    policy = AddressPolicy(AddressLimits(connections_per_minute=600.0, failures_per_minute=6.0, max_unauthenticated=12))

    for _ in range(12):
        assert policy.admit("198.51.100.1", 0).admitted
    for _ in range(12):
        policy.failed("198.51.100.1", 0)
    # Six failures of debt (capped at one burst) plus one token: 70 s at one per 10 s.
    assert policy.admit("198.51.100.1", 0).retry_after_ms == 70_000


def test_offences_count_as_failures() -> None:
    policy = AddressPolicy(LIMITS)

    for _ in range(6):
        policy.offence("198.51.100.1", 0)
    assert policy.admit("198.51.100.1", 0).reason == "failures"


def test_idle_addresses_are_forgotten() -> None:
    policy = AddressPolicy(LIMITS, sweep_above=2)

    policy.admit("198.51.100.1", 0)
    policy.failed("198.51.100.1", 0)
    policy.admit("198.51.100.2", 0)  # still in flight
    policy.admit("198.51.100.3", 60_000)  # the sweep: .1 has refilled, .2 has not settled
    assert len(policy) == 2
    assert policy.unauthenticated("198.51.100.2") == 1
