"""A connection as the engine sees it: an explicit state, its user, its rooms.

Theory of operation: a connection starts ``AWAITING_HELLO``; a valid ``hello``
makes it ``READY``; any ``Close`` the engine decides on makes it ``CLOSING``,
after which its frames are ignored until the driver reports it
``Disconnected``. Only ``READY`` connections run operations.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import attrs

from .effects import OutcomeBuilder
from .protocol import Fields, Request
from .records import User

__all__ = ["Call", "ConnPhase", "ConnState"]


class ConnPhase(enum.Enum):
    AWAITING_HELLO = "awaiting_hello"
    READY = "ready"
    CLOSING = "closing"


@attrs.define
class ConnState:
    conn_id: int
    phase: ConnPhase = ConnPhase.AWAITING_HELLO
    user_id: str | None = None
    rooms: set[str] = attrs.Factory(set)
    # A request waiting for its question to be read from the store.
    waiting: Request | None = None
    # ``Freshness.now`` when that read began: a copy of a question changed since is read again.
    waiting_since: int = 0
    # A read operation waiting for its rows: the request and what makes its reply.
    reading: tuple[Request, Callable[[Any], Any]] | None = None


@attrs.define
class Call:
    """One request being handled: what every operation handler is given.

    Attributes:
        conn: the connection it came on (``READY``).
        user: its user.
        request: the decoded request.
        f: its data, with typed accessors that raise ``invalid_field``.
        now: ms since the epoch.
        out: where the handler puts its writes, frames and other effects.
    """

    conn: ConnState
    user: User
    request: Request
    f: Fields
    now: int
    out: OutcomeBuilder
    retried: bool = False  # the operation runs again after its Pending read (see core.lists.Pending)
    found: Any = None  # what that read handed the run again (``Retry.found``)
