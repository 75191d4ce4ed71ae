"""What the engine asks its driver to do: store writes and connection actions.

An ``Outcome`` is returned by every engine call. The driver commits
``writes`` (in one transaction, possibly grouped with other outcomes') and only
then performs ``actions`` in order, so nothing acknowledged is ever lost.
"""

from __future__ import annotations

from typing import Any, Union

import attrs

from .records import Answer, Question, User

__all__ = [
    "SaveUser",
    "SaveQuestion",
    "SaveAnswer",
    "AppendEvent",
    "Write",
    "Send",
    "Close",
    "Replay",
    "Action",
    "Outcome",
]

# ---- writes -----------------------------------------------------------------


@attrs.frozen
class SaveUser:
    """Insert or replace a user's row (profile, points, last_seq)."""

    user: User


@attrs.frozen
class SaveQuestion:
    """Insert or replace a question's row."""

    question: Question


@attrs.frozen
class SaveAnswer:
    """Insert or replace an answer's row (content, receipt state, accepted)."""

    answer: Answer


@attrs.frozen
class AppendEvent:
    """Append a durable event to a user's inbox at ``seq``."""

    user_id: str
    seq: int
    type: str
    data: dict[str, Any]
    created_at: int


Write = Union[SaveUser, SaveQuestion, SaveAnswer, AppendEvent]

# ---- actions -----------------------------------------------------------------


@attrs.frozen
class Send:
    """Send one server frame (a msgpack map) to each of ``conn_ids``.

    The driver encodes the frame once, whatever the number of recipients.
    """

    conn_ids: tuple[int, ...]
    frame: dict[str, Any]


@attrs.frozen
class Close:
    """Close a connection with a WebSocket close code."""

    conn_id: int
    code: int
    reason: str


@attrs.frozen
class Replay:
    """Send ``user_id``'s durable events with ``after_seq < seq <= up_to_seq`` to a connection.

    Live frames for that connection wait until the replay is written.
    """

    conn_id: int
    user_id: str
    after_seq: int
    up_to_seq: int


Action = Union[Send, Close, Replay]


@attrs.frozen
class Outcome:
    writes: tuple[Write, ...] = ()
    actions: tuple[Action, ...] = ()


class OutcomeBuilder:
    """Accumulates writes and actions while one engine call runs."""

    __slots__ = ("writes", "actions")

    def __init__(self) -> None:
        self.writes: list[Write] = []
        self.actions: list[Action] = []

    def write(self, item: Write) -> None:
        self.writes.append(item)

    def send(self, conn_ids: tuple[int, ...] | list[int] | set[int], frame: dict[str, Any]) -> None:
        targets = tuple(sorted(conn_ids))
        if targets:
            self.actions.append(Send(targets, frame))

    def act(self, action: Action) -> None:
        self.actions.append(action)

    def build(self) -> Outcome:
        return Outcome(tuple(self.writes), tuple(self.actions))
