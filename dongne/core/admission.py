"""Admission by client address: strict on what costs the server, loose on users.

Theory of operation. Many honest users share one address (a carrier's NAT puts
thousands of phones behind one, an airport's Wi-Fi hundreds), so a flat "new
connections per address" limit either locks them out or is too loose to stop
anyone. The server's real costs per address are handshakes that never
authenticate: bad or expired tokens, no ``hello`` in time, a first frame that
is not ``hello``, malformed upgrades, floods of bad frames. So each address
has:

- a loose bucket of handshakes (``connections_per_minute``), sized for a few
  thousand users reconnecting at once;
- a strict bucket of failures (``failures_per_minute``): a failed handshake
  takes a token when it fails, and may run the bucket into debt (down to
  minus one burst), so a concurrent flood keeps its address throttled for
  longer; while the bucket holds less than one token the address is
  throttled;
- a cap on handshakes in flight that have not authenticated yet
  (``max_unauthenticated``), which bounds what a flood can start before its
  failures are known.

The driver calls ``admit`` when a WebSocket upgrade request has been read
(and the client's address is known), then exactly one of ``authenticated``,
``failed`` or ``released`` (refused for the server's own reasons: not
charged) for each admitted handshake. ``offence`` charges a failure
without an admission (a refused upgrade, a connection closed for a flood of
bad frames after it authenticated).

Sans-I/O: every call takes ``now`` in ms; nothing here reads a clock.
"""

from __future__ import annotations

import math

import attrs

__all__ = ["AddressLimits", "AddressPolicy", "Admission"]


@attrs.frozen
class AddressLimits:
    """Per-address limits.

    Attributes:
        connections_per_minute: handshakes admitted per address per minute
            (also the burst).
        failures_per_minute: failed handshakes and offences per address per
            minute (also the burst) before the address is throttled.
        max_unauthenticated: admitted handshakes of one address that have
            neither authenticated nor failed yet.
    """

    connections_per_minute: float
    failures_per_minute: float
    max_unauthenticated: int


@attrs.frozen
class Admission:
    """What ``admit`` decided: admitted when ``retry_after_ms`` is 0.

    Attributes:
        retry_after_ms: 0, or how long until the address may try again.
        reason: why it was throttled: ``"failures"``, ``"unauthenticated"``
            or ``"connections"`` (empty when admitted).
    """

    retry_after_ms: int = 0
    reason: str = ""

    @property
    def admitted(self) -> bool:
        return self.retry_after_ms == 0


ADMITTED = Admission()


@attrs.define
class _Address:
    connections: float  # tokens
    failures: float  # tokens; may be negative (debt)
    updated: int  # ms
    pending: int = 0


class AddressPolicy:
    """Decides which handshakes of which address go ahead.

    Args:
        limits: the per-address limits.
        sweep_above: how many addresses are kept before idle ones are forgotten.
    """

    def __init__(self, limits: AddressLimits, *, sweep_above: int = 10_000) -> None:
        self.limits = limits
        self._conn_rate = limits.connections_per_minute / 60_000  # tokens per ms
        self._fail_rate = limits.failures_per_minute / 60_000
        self._addresses: dict[str, _Address] = {}
        self._sweep_above = sweep_above
        self._next_sweep = sweep_above

    # ---- events ----------------------------------------------------------------------

    def admit(self, address: str, now: int) -> Admission:
        """A WebSocket upgrade request from ``address``: admit it or say when to retry.

        An admitted handshake counts as unauthenticated until ``authenticated``
        or ``failed`` is called for it.
        """
        entry = self._entry(address, now)
        if entry.failures < 1:
            return Admission(math.ceil((1 - entry.failures) / self._fail_rate), "failures")
        if entry.pending >= self.limits.max_unauthenticated:
            # Retry once a typical handshake could have finished.
            return Admission(1000, "unauthenticated")
        if entry.connections < 1:
            return Admission(math.ceil((1 - entry.connections) / self._conn_rate), "connections")
        entry.connections -= 1
        entry.pending += 1
        return ADMITTED

    def authenticated(self, address: str, now: int) -> None:
        """An admitted handshake of ``address`` authenticated (a valid ``hello``)."""
        entry = self._entry(address, now)
        entry.pending = max(0, entry.pending - 1)

    def failed(self, address: str, now: int) -> None:
        """An admitted handshake of ``address`` ended without authenticating."""
        entry = self._entry(address, now)
        entry.pending = max(0, entry.pending - 1)
        self._charge(entry)

    def released(self, address: str, now: int) -> None:
        """An admitted handshake of ``address`` ended without authenticating, refused for the server's own
        reasons (see the server's ``_NOT_THE_CLIENTS_FAULT``): settled, and not charged."""
        entry = self._entry(address, now)
        entry.pending = max(0, entry.pending - 1)

    def offence(self, address: str, now: int) -> None:
        """Something of ``address`` cost the server outside an admitted handshake."""
        self._charge(self._entry(address, now))

    # ---- queries -----------------------------------------------------------------------

    def unauthenticated(self, address: str) -> int:
        """Admitted handshakes of ``address`` not yet settled."""
        entry = self._addresses.get(address)
        return 0 if entry is None else entry.pending

    def __len__(self) -> int:
        return len(self._addresses)

    def sweep(self, now: int) -> None:
        """Forget addresses whose buckets have refilled and that have nothing in flight."""
        for address in [a for a, e in self._addresses.items() if self._idle(e, now)]:
            del self._addresses[address]

    # ---- internals ---------------------------------------------------------------------

    def _charge(self, entry: _Address) -> None:
        entry.failures = max(-self.limits.failures_per_minute, entry.failures - 1)

    def _entry(self, address: str, now: int) -> _Address:
        entry = self._addresses.get(address)
        if entry is None:
            if len(self._addresses) >= self._next_sweep:
                self.sweep(now)
                self._next_sweep = max(self._sweep_above, 2 * len(self._addresses))
            entry = self._addresses[address] = _Address(
                float(self.limits.connections_per_minute), float(self.limits.failures_per_minute), now
            )
            return entry
        elapsed = max(0, now - entry.updated)
        if elapsed:
            entry.connections = min(self.limits.connections_per_minute, entry.connections + elapsed * self._conn_rate)
            entry.failures = min(self.limits.failures_per_minute, entry.failures + elapsed * self._fail_rate)
            entry.updated = now
        return entry

    def _idle(self, entry: _Address, now: int) -> bool:
        if entry.pending:
            return False
        elapsed = max(0, now - entry.updated)
        return (
            entry.connections + elapsed * self._conn_rate >= self.limits.connections_per_minute
            and entry.failures + elapsed * self._fail_rate >= self.limits.failures_per_minute
        )
