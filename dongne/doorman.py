"""Who may come in: the client's real address, blocks, per-address limits and origins, for the driver.

The rules are sans-I/O (``core.admission``, ``core.limits``, the transport's
proxy and origin checks); this keeps their state for one server and answers
the driver's questions: is this peer blocked, may this upgrade request come
in (or how is it refused), which address is a connection from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .config import ServerSettings
from .core.admission import AddressLimits, AddressPolicy
from .core.limits import IpBlocklist
from .core.settings import LimitSettings
from .transport import OriginPolicy, Refusal, TrustedProxies, UpgradeRequest

__all__ = ["Doorman"]

log = logging.getLogger("dongne.server")


class Doorman:
    """Admission by the client's real address (behind trusted proxies).

    Args:
        settings: the ``[server]`` settings (trusted proxies, origins).
        limits: the ``[limits]`` settings (per-address limits, the static blocklist).
        on_refused: called for each connection refused by a block or a limit (a metric).
    """

    def __init__(
        self, settings: ServerSettings, limits: LimitSettings, on_refused: Callable[[], None] = lambda: None
    ) -> None:
        self.addresses = AddressPolicy(
            AddressLimits(
                connections_per_minute=limits.connections_per_ip_per_minute,
                failures_per_minute=limits.failed_handshakes_per_ip_per_minute,
                max_unauthenticated=limits.unauthenticated_per_ip,
            )
        )
        self.proxies = TrustedProxies(settings.trusted_proxies, header=settings.forwarded_header)
        self._origins = OriginPolicy(settings.allowed_origins)
        self._blocklist = IpBlocklist(limits.ip_blocklist)
        self._runtime_blocks = IpBlocklist(())  # block_ip, from the engine (BlockAddresses)
        self._address_of: dict[int, str] = {}  # conn_id -> the client's address
        self._on_refused = on_refused

    def blocked(self, address: str) -> bool:
        return self._blocklist.blocks(address) or self._runtime_blocks.blocks(address)

    def block(self, cidrs: tuple[str, ...]) -> list[int]:
        """The run-time blocks are now ``cidrs``; returns the open connections from blocked addresses."""
        self._runtime_blocks = IpBlocklist(cidrs)
        return [conn_id for conn_id, address in self._address_of.items() if self._runtime_blocks.blocks(address)]

    def remember(self, conn_id: int, address: str) -> None:
        self._address_of[conn_id] = address

    def forget(self, conn_id: int) -> None:
        self._address_of.pop(conn_id, None)

    def address_of(self, conn_id: int) -> str | None:
        return self._address_of.get(conn_id)

    def admit(self, request: UpgradeRequest, now: int) -> Refusal | None:
        """Admit an upgrade request from its client's address, or say how to refuse it."""
        address = request.address
        if self.blocked(address):
            self._on_refused()
            return Refusal(403, "this address is blocked")
        if request.error is not None:
            self.addresses.offence(address, now)
            return Refusal(400, request.error)
        if not self._origins.allows(request.origin, request.host):
            self.addresses.offence(address, now)
            log.info(
                "origin_refused", extra={"address": address, "origin": request.origin[:200] if request.origin else ""}
            )
            return Refusal(403, "origin not allowed")
        admission = self.addresses.admit(address, now)
        if not admission.admitted:
            self._on_refused()
            log.debug("handshake_throttled", extra={"address": address, "reason": admission.reason})
            return Refusal(429, "too many connections from this address", admission.retry_after_ms)
        return None
