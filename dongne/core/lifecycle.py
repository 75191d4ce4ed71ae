"""A question's lifecycle, as data.

Theory of operation: every legal transition lives in ``TRANSITIONS`` below and
nowhere else. ``advance`` is the only way to move a question; an illegal move
raises ``IllegalTransition``, which the engine maps to a wire error before any
state changes.

    OPEN ──answer──▶ ANSWERED ──answer──▶ ANSWERED
      ▲                 │
      └───unanswer──────┤  (its last answer deleted or hidden)
      │                 │
      │                 └──accept──▶ RESOLVED
      └──close──▶ CLOSED ◀──close──┘
      └──expire─▶ EXPIRED ◀─expire─┘   ([questions] ttl_s after it was asked)

Deletion is not a status: a deleted question keeps the status it had and
carries ``deleted_at``; it leaves every list, room and memory.
"""

from __future__ import annotations

import enum

__all__ = ["TRANSITIONS", "IllegalTransition", "QuestionEvent", "QuestionStatus", "advance"]


class QuestionStatus(enum.StrEnum):
    OPEN = "open"
    ANSWERED = "answered"
    RESOLVED = "resolved"
    CLOSED = "closed"
    EXPIRED = "expired"


class QuestionEvent(enum.StrEnum):
    ANSWER = "answer"
    UNANSWER = "unanswer"
    ACCEPT = "accept"
    CLOSE = "close"
    EXPIRE = "expire"


TRANSITIONS: dict[tuple[QuestionStatus, QuestionEvent], QuestionStatus] = {
    (QuestionStatus.OPEN, QuestionEvent.ANSWER): QuestionStatus.ANSWERED,
    (QuestionStatus.ANSWERED, QuestionEvent.ANSWER): QuestionStatus.ANSWERED,
    (QuestionStatus.ANSWERED, QuestionEvent.UNANSWER): QuestionStatus.OPEN,
    (QuestionStatus.ANSWERED, QuestionEvent.ACCEPT): QuestionStatus.RESOLVED,
    (QuestionStatus.OPEN, QuestionEvent.CLOSE): QuestionStatus.CLOSED,
    (QuestionStatus.ANSWERED, QuestionEvent.CLOSE): QuestionStatus.CLOSED,
    (QuestionStatus.OPEN, QuestionEvent.EXPIRE): QuestionStatus.EXPIRED,
    (QuestionStatus.ANSWERED, QuestionEvent.EXPIRE): QuestionStatus.EXPIRED,
}

#: Statuses in which a question still wants answers (and escalates).
ACTIVE = frozenset({QuestionStatus.OPEN, QuestionStatus.ANSWERED})


class IllegalTransition(ValueError):
    def __init__(self, status: QuestionStatus, event: QuestionEvent) -> None:
        super().__init__(f"cannot {event.value} a question that is {status.value}")
        self.status = status
        self.event = event


def advance(status: QuestionStatus, event: QuestionEvent) -> QuestionStatus:
    """The status after ``event``; raises ``IllegalTransition`` if not allowed."""
    try:
        return TRANSITIONS[(status, event)]
    except KeyError:
        raise IllegalTransition(status, event) from None
