"""Errors, split by blame, each carrying the documented wire code.

``DongneError`` is the root. ``ProtocolError`` is a request the engine refuses:
its ``code`` is the error code sent back in the reply (see PROTOCOL.md,
"Error codes"). ``CloseConnection`` asks the driver to close the connection
with a WebSocket close code.
"""

from __future__ import annotations

__all__ = ["CloseConnection", "ConfigError", "DongneError", "ProtocolError"]


class DongneError(Exception):
    """Root of every error this package raises on purpose."""


class ProtocolError(DongneError):
    """A request that is refused; the connection stays usable.

    Args:
        code: the documented wire error code, e.g. ``"invalid_field"``.
        message: a human-readable explanation for client developers.
    """

    def __init__(self, code: str, message: str, **extra: object) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


class CloseConnection(DongneError):
    """The connection must be closed with a WebSocket close code.

    Args:
        code: the close code (1009, 4001, 4008, 4009, ...).
        reason: the close reason sent to the peer (kept short: 123 bytes max).
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class ConfigError(DongneError, ValueError):
    """The configuration is invalid; the message says which key and why."""
