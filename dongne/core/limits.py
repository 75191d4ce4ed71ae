"""Rate limits as token buckets, fed an explicit ``now`` (ms).

A bucket holds up to ``burst`` tokens and gains ``rate`` per second; each
request takes one. An empty bucket says how long until the next token. The
``Limiter`` keys buckets per connection, per user and operation class, and per
IP address, and counts refusals so that persistent abuse can be cut off.
"""

from __future__ import annotations

import ipaddress
import math
from collections import deque
from collections.abc import Iterable

import attrs

from .settings import LimitSettings, ModerationSettings

__all__ = ["OP_CLASSES", "BucketSpec", "IpBlocklist", "Limiter", "TokenBucket", "ip_network"]

#: Which bucket each operation draws from (besides the connection's own).
OP_CLASSES: dict[str, str] = {
    "create_question": "question",
    "create_answer": "write",
    "accept_answer": "write",
    "close_question": "write",
    "mark_read": "write",
    "update_settings": "write",
    "typing_start": "typing",
    "typing_stop": "typing",
    "mark_notifications_read": "write",
    "delete_question": "write",
    "delete_answer": "write",
    "get_question": "read",
    "my_questions": "read",
    "my_answers": "read",
    "browse_questions": "read",
    "get_user": "read",
    "list_notifications": "read",
    "list_audit": "read",
    "list_reports": "read",
    "list_ip_blocks": "read",
    "report_content": "report",
}


@attrs.frozen
class BucketSpec:
    rate: float  # tokens per second
    burst: float  # capacity


@attrs.define
class TokenBucket:
    spec: BucketSpec
    tokens: float
    updated: int  # ms

    @classmethod
    def full(cls, spec: BucketSpec, now: int) -> TokenBucket:
        return cls(spec, spec.burst, now)

    def take(self, now: int) -> int:
        """Take a token; returns 0, or the ms until one is available (nothing taken)."""
        elapsed = max(0, now - self.updated)
        self.tokens = min(self.spec.burst, self.tokens + elapsed * self.spec.rate / 1000)
        self.updated = max(self.updated, now)
        if self.tokens >= 1:
            self.tokens -= 1
            return 0
        return max(1, math.ceil((1 - self.tokens) * 1000 / self.spec.rate))

    def give_back(self) -> None:
        """Return a token taken for a request that turned out not to count (never above ``burst``)."""
        self.tokens = min(self.spec.burst, self.tokens + 1)

    def idle_full(self, now: int) -> bool:
        return self.tokens + max(0, now - self.updated) * self.spec.rate / 1000 >= self.spec.burst


class Limiter:
    """Buckets per key, created full on first use and forgotten when full again.

    Args:
        specs: bucket parameters by kind (``"conn"``, ``"write"``, ...).
        abuse_limit: refusals within ``abuse_window_ms`` that mark a key as abusive.
    """

    def __init__(self, specs: dict[str, BucketSpec], *, abuse_limit: int, abuse_window_ms: int = 60_000) -> None:
        self.specs = specs
        self.abuse_limit = abuse_limit
        self.abuse_window_ms = abuse_window_ms
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._refusals: dict[str, deque[int]] = {}
        self.refused_total = 0

    def take(self, kind: str, key: str, now: int) -> int:
        """0 when allowed; else ms to wait. Unknown kinds are unlimited."""
        spec = self.specs.get(kind)
        if spec is None:
            return 0
        bucket = self._buckets.get((kind, key))
        if bucket is None:
            bucket = self._buckets[(kind, key)] = TokenBucket.full(spec, now)
        return bucket.take(now)

    def give_back(self, kind: str, key: str) -> None:
        """Return the token ``take`` took for a request that does not count against ``kind`` after all."""
        bucket = self._buckets.get((kind, key))
        if bucket is not None:
            bucket.give_back()

    def refused(self, key: str, now: int) -> bool:
        """Count a refusal against ``key``; True when it has now been abusive."""
        self.refused_total += 1
        times = self._refusals.setdefault(key, deque())
        times.append(now)
        while times and times[0] <= now - self.abuse_window_ms:
            times.popleft()
        return len(times) >= self.abuse_limit

    def forget(self, key: str) -> None:
        """Drop a key's refusal history (its connection closed)."""
        self._refusals.pop(key, None)

    def sweep(self, now: int) -> None:
        """Forget buckets that have refilled: memory follows active keys only."""
        for k in [k for k, b in self._buckets.items() if b.idle_full(now)]:
            del self._buckets[k]
        for key in [k for k, t in self._refusals.items() if not t or t[-1] <= now - self.abuse_window_ms]:
            del self._refusals[key]

    def __len__(self) -> int:
        return len(self._buckets)


def request_limiter(limits: LimitSettings, moderation: ModerationSettings) -> Limiter:
    """The engine's buckets: every frame of a connection, and each class of ``OP_CLASSES`` per user."""
    return Limiter(
        {
            "conn": BucketSpec(limits.conn_per_s, limits.conn_burst),
            "write": BucketSpec(limits.writes_per_minute / 60, limits.writes_burst),
            "question": BucketSpec(limits.questions_per_hour / 3600, limits.questions_burst),
            "typing": BucketSpec(limits.typing_per_s, limits.typing_burst),
            "read": BucketSpec(limits.reads_per_s, limits.reads_burst),
            "report": BucketSpec(moderation.reports_per_hour / 3600, moderation.reports_burst),
        },
        abuse_limit=limits.abuse_refusals_per_minute,
    )


#: IPv4-mapped IPv6 addresses (``::ffff:192.0.2.7``): a dual-stack socket's name for an IPv4 client.
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def ip_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address or CIDR network (host bits ignored), in the form client addresses are compared in.

    Client addresses are IPv4 when the client is (``transport.normalize_address``
    turns IPv4-mapped IPv6 into IPv4), so an IPv4-mapped network is its IPv4
    one: ``::ffff:10.0.0.0/104`` is ``10.0.0.0/8``. Kept as IPv6 it would
    match no client at all.

    Raises:
        ValueError: ``text`` is neither an address nor a network.
    """
    network = ipaddress.ip_network(text, strict=False)
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        return ipaddress.IPv4Network((int(network.network_address) & 0xFFFF_FFFF, network.prefixlen - 96))
    return network


class IpBlocklist:
    """Addresses and networks (CIDR) refused at accept."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.networks = [ip_network(e) for e in entries]

    def blocks(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # as the networks are
        return any(ip in net for net in self.networks)
