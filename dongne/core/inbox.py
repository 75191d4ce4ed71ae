"""Each user's inbox: durable events with gap-free seqs, answer receipts, and push jobs.

A durable event is written to the user's inbox (``AppendEvent``) in the same
commit as what caused it and sent to the user's open connections after it;
a client that was away gets it by ``resume``. Receipts follow an answer from
``sent`` to ``delivered`` (its asker had a connection open) to ``read``.
"""

from __future__ import annotations

from typing import Any

import attrs

from .connections import Call
from .effects import (
    AppendEvent,
    CancelPushes,
    DeliverAnswer,
    DropPushes,
    EnqueuePush,
    OutcomeBuilder,
    Push,
    SaveAnswer,
    SaveUser,
)
from .fanout import StageAlerts
from .freshness import Freshness
from .protocol import durable_event, event
from .records import Answer, PushJob, Question, ReceiptState, User

__all__ = ["CONTENT_EVENTS", "DURABLE_EVENTS", "Inbox", "removed", "subject"]


#: Every kind of durable event (the ones in a user's inbox, with a seq).
DURABLE_EVENTS = frozenset(
    {
        "answer_notification",
        "answer_accepted_notification",
        "new_question_notification",
        "slow_response_alert",
        "content_hidden",
    }
)

#: The durable events that carry what a question or an answer says (a title, a body, an answer's text):
#: listed or replayed once that question or answer is taken down, they keep only its ids (:func:`removed`).
#: ``content_hidden`` carries none (ids and the moderator's reason), and is kept whole.
CONTENT_EVENTS = DURABLE_EVENTS - {"content_hidden"}


def subject(kind: str, data: Any) -> tuple[str, str | None] | None:
    """The question, and the answer if it names one, that a durable event's ``data`` shows.

    Returns:
        ``(question_id, answer_id or None)``; None for an event that shows no content (``content_hidden``,
        or ``data`` of another shape).
    """
    if kind not in CONTENT_EVENTS or not isinstance(data, dict):
        return None
    question_id = data.get("question_id")
    if not isinstance(question_id, str):
        return None
    answer = data.get("answer")  # answer_notification carries the answer; answer_accepted_notification its id
    answer_id = answer.get("answer_id") if isinstance(answer, dict) else data.get("answer_id")
    return question_id, answer_id if isinstance(answer_id, str) else None


def removed(about: tuple[str, str | None]) -> dict[str, Any]:
    """The ``data`` a durable event keeps once its question or answer is deleted or hidden: the ids and
    ``"removed": true``, so that a listed or replayed event still holds its seq (no gap) but none of the
    content (PROTOCOL.md, "Events")."""
    question_id, answer_id = about
    if answer_id is None:
        return {"question_id": question_id, "removed": True}
    return {"question_id": question_id, "answer_id": answer_id, "removed": True}


class Inbox:
    """Durable events, receipts and the push outbox.

    Args:
        users: every known user, by id (shared with the engine).
        user_conns: each online user's connection ids (shared with the engine).
        answers: each question's answers by id (shared with the engine).
        freshness: told of receipts written to the store only (shared with the engine).
    """

    def __init__(
        self,
        users: dict[str, User],
        user_conns: dict[str, set[int]],
        answers: dict[str, dict[str, Answer]],
        freshness: Freshness,
    ) -> None:
        self._users = users
        self._freshness = freshness
        self._user_conns = user_conns
        self._answers = answers
        # asker -> {(question, answer): author}, for answers in memory and out of it (an expired question's)
        self._undelivered: dict[str, dict[tuple[str, str], str]] = {}
        self._push_seq = 0
        self.oldest: dict[str, int] = {}  # user -> oldest durable event kept (older ones were pruned)

    def restore(self, last_push_job_id: int, oldest: dict[str, int]) -> None:
        """Start from the stored state (at start-up, or again after a failed commit)."""
        self._undelivered.clear()
        self._push_seq = last_push_job_id
        self.oldest = dict(oldest)

    def unread(self, user: User) -> int:
        """How many of a user's durable events are not marked read, among those still kept (retention
        deleted older ones, read or not: they are no longer listed, so they no longer count)."""
        kept_from = self.oldest.get(user.user_id, 0)
        return max(0, user.last_seq - max(user.read_seq, kept_from - 1))

    def missed(self, user_id: str, last_seen: int) -> int | None:
        """The oldest kept seq if events after ``last_seen`` were pruned (the resume cannot be whole), else None."""
        oldest = self.oldest.get(user_id)
        return oldest if oldest is not None and oldest > last_seen + 1 else None

    def mark_read(self, call: Call) -> dict[str, Any]:
        """``mark_notifications_read``: everything up to ``up_to_seq`` is read; every device's badge learns it."""
        user = call.user
        up_to = call.f.integer("up_to_seq", minimum=0, maximum=2**53)
        read_seq = max(user.read_seq, min(up_to, user.last_seq))
        if read_seq != user.read_seq:
            user.read_seq = read_seq
            call.out.write(SaveUser(attrs.evolve(user), changed=()))  # read_seq: only grows
        unread = self.unread(user)
        call.out.send(self._user_conns.get(user.user_id, ()), event("unread_count", {"unread": unread}))
        return {"unread": unread}

    def track(self, question: Question, answer: Answer) -> None:
        """Remember an answer its asker has not received yet (state ``sent``)."""
        if answer.state == ReceiptState.SENT:
            self.track_stored(question.asker_id, question.question_id, answer.answer_id, answer.author_id)

    def track_stored(self, asker_id: str, question_id: str, answer_id: str, author_id: str) -> None:
        """Remember an answer still ``sent`` that memory may not hold (its question expired)."""
        self._undelivered.setdefault(asker_id, {})[question_id, answer_id] = author_id

    def untrack(self, asker_id: str, question_id: str, answer_id: str | None = None) -> None:
        """Forget an answer (``None``: every answer of the question) that is gone, or no longer ``sent``."""
        pending = self._undelivered.get(asker_id)
        if pending is None:
            return
        if answer_id is not None:
            pending.pop((question_id, answer_id), None)
        else:
            for key in [k for k in pending if k[0] == question_id]:
                del pending[key]
        if not pending:
            del self._undelivered[asker_id]

    def append(self, user_id: str, kind: str, data: dict[str, Any], now: int, out: OutcomeBuilder) -> None:
        """A durable event for ``user_id``: the next seq, written, then sent to the user's connections."""
        user = self._users[user_id]
        user.last_seq += 1
        # The inbox row is the record of last_seq (the store takes the newest
        # seq per user at start-up): no rewrite of the user's row per event.
        out.write(AppendEvent(user_id, user.last_seq, kind, data, now))
        out.send(self._user_conns.get(user_id, ()), durable_event(kind, user.last_seq, data))

    def append_alert(
        self, user_id: str, alerts: StageAlerts, distance_m: float | None, now: int, out: OutcomeBuilder
    ) -> None:
        """:meth:`append` for one alert of a stage, spliced from what the stage packed once (no dicts)."""
        packed = alerts.packed(distance_m)
        user = self._users[user_id]
        seq = user.last_seq = user.last_seq + 1
        out.write(AppendEvent(user_id, seq, alerts.kind, None, now, packed))
        conns = self._user_conns.get(user_id)
        if conns:
            out.send_packed(conns, alerts.kind, seq, alerts.frame(seq, packed))

    def answer_posted(self, question: Question, answer: Answer, now: int) -> None:
        """A new answer is ``delivered`` at once if its asker is online, else tracked."""
        if self._user_conns.get(question.asker_id):
            answer.state = ReceiptState.DELIVERED
            answer.delivered_at = now
        else:
            self.track(question, answer)

    def deliver_pending(self, asker_id: str, now: int, out: OutcomeBuilder) -> None:
        """The asker came online: every answer still ``sent`` to them is ``delivered``.

        One whose question memory no longer holds (it expired meanwhile) is
        marked in the store only, where it is still ``sent``; its author hears
        it all the same.
        """
        pending = self._undelivered.pop(asker_id, None)
        for (question_id, answer_id), author_id in sorted((pending or {}).items()):
            held = self._answers.get(question_id)
            if held is None:
                out.write(DeliverAnswer(question_id, answer_id, now))
                self._freshness.changed(question_id)  # a copy read before would say "sent"
                self._tell_author(author_id, question_id, answer_id, ReceiptState.DELIVERED, now, out)
                continue
            answer = held.get(answer_id)
            if answer is not None and answer.state == ReceiptState.SENT:
                self._set_receipt(answer, ReceiptState.DELIVERED, now, out)

    def mark_answers_read(self, asker_id: str, answers: list[Answer], now: int, out: OutcomeBuilder) -> list[str]:
        """Mark answers ``read`` (oldest first); returns the ids that changed."""
        changed = []
        for answer in sorted(answers, key=lambda a: (a.created_at, a.answer_id)):
            if answer.state != ReceiptState.READ:
                self.untrack(asker_id, answer.question_id, answer.answer_id)
                self._set_receipt(answer, ReceiptState.READ, now, out)
                changed.append(answer.answer_id)
        return changed

    def _set_receipt(self, answer: Answer, state: str, now: int, out: OutcomeBuilder) -> None:
        answer.state = state
        if state == ReceiptState.DELIVERED:
            answer.delivered_at = now
        else:
            answer.read_at = now
            answer.delivered_at = answer.delivered_at or now
        out.write(SaveAnswer(attrs.evolve(answer)))
        self._tell_author(answer.author_id, answer.question_id, answer.answer_id, state, now, out)

    def _tell_author(
        self, author_id: str, question_id: str, answer_id: str, state: str, now: int, out: OutcomeBuilder
    ) -> None:
        out.send(
            self._user_conns.get(author_id, ()),
            event("receipt", {"question_id": question_id, "answer_id": answer_id, "state": state, "at": now}),
        )

    def enqueue_push(
        self, user_id: str, kind: str, question: Question, data: dict[str, Any], now: int, out: OutcomeBuilder
    ) -> None:
        """A job for the push outbox (committed with ``out``), then for the dispatcher."""
        self._push_seq += 1
        answer = data.get("answer_id") or (data.get("answer") or {}).get("answer_id") or ""
        job = PushJob(
            job_id=self._push_seq,
            user_id=user_id,
            kind=kind,
            urgent=question.urgency == "urgent",
            payload={"title": question.title, "region": question.region, "data": data},
            created_at=now,
            question_id=question.question_id,
            answer_id=answer,
        )
        out.write(EnqueuePush(job))
        out.act(Push(job))

    def cancel_pushes(
        self,
        now: int,
        out: OutcomeBuilder,
        *,
        question_id: str = "",
        answer_id: str = "",
        user_id: str = "",
        commit: bool = True,
    ) -> None:
        """No push about a question (or one of its answers), or to a user, leaves any more: the pending jobs
        are cancelled in ``out``'s commit (unless ``commit`` is False: another node committed it), and the
        dispatcher drops those it holds, queued or between attempts."""
        if commit:
            out.write(CancelPushes(now, question_id, answer_id, user_id))
        self.drop_pushes(out, question_id=question_id, answer_id=answer_id, user_id=user_id)

    @staticmethod
    def drop_pushes(out: OutcomeBuilder, *, question_id: str = "", answer_id: str = "", user_id: str = "") -> None:
        """Another node cancelled these pushes in the outbox (a take-down, ``QuestionChanged``): the dispatcher
        here drops those it holds, queued or between attempts."""
        out.act(DropPushes(question_id, answer_id, user_id))
