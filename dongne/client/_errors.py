"""Errors of the client: refusals, lost connections, ended sessions."""

from __future__ import annotations

from typing import Any

FATAL_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1010, 4001, 4002, 4003, 4008})


# ---- errors ----------------------------------------------------------------------


class RequestError(Exception):
    """The server refused a request; ``code`` is the documented error code."""

    def __init__(self, code: str, message: str, error: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.error = error


class SessionError(Exception):
    """The root of the errors a ``Session`` raises (besides ``RequestError``)."""


class ConnectionLost(SessionError, ConnectionError):
    """The connection dropped before the reply arrived.

    The request may or may not have been applied; the session is reconnecting.
    Send it again only if doing so twice is harmless (or check first).
    """


class SessionClosed(SessionError):
    """The session is over and will not reconnect.

    Attributes:
        code: the server's close code that ended it, if any.
        reason: the server's close reason, if any.
    """

    def __init__(self, message: str, *, code: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class AuthenticationFailed(SessionClosed):
    """The server refused the token (close code 4001). Get a new token."""


class ConnectFailed(SessionClosed):
    """No connection could be made within the allowed attempts.

    Attributes:
        attempts: how many connection attempts failed in a row.
        last_error: what the last attempt failed with.
    """

    def __init__(
        self, message: str, *, attempts: int = 0, last_error: BaseException | None = None, **close: Any
    ) -> None:
        super().__init__(message, **close)
        self.attempts = attempts
        self.last_error = last_error
