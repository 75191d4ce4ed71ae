"""Questions and answers: asking, joining, answering, accepting, closing, typing, receipts; and escalation.

Every operation checks everything before it changes anything: a refused
request leaves no trace. A question moves only through ``lifecycle.advance``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from .connections import Call, ConnState
from .deadlines import Deadlines
from .effects import (
    AcceptOnce,
    AddPoints,
    CancelEscalation,
    CloseOnce,
    CountAnswer,
    IfOpen,
    Observe,
    OutcomeBuilder,
    RoomNews,
    SaveAnswer,
    SaveEscalation,
    SaveNotified,
    SaveQuestion,
    StartEscalation,
    StopEscalating,
)
from .errors import ProtocolError
from .fanout import StageAlerts
from .freshness import Freshness
from .inbox import Inbox
from .lifecycle import ACTIVE, IllegalTransition, QuestionEvent, QuestionStatus, advance
from .lists import RETRY, Pending, Retry
from .neighbourhood import Neighbourhood
from .oversight import Oversight
from .places import ServiceArea
from .presence import Presence
from .protocol import Fields, event
from .reads import AnswerHome
from .records import Answer, Question, ReceiptState, User
from .settings import EngineSettings
from .text import SpamFilter

__all__ = ["ONLINE_LIST_MAX", "RELAYED_ANSWER_NEWS", "Questions"]

#: Room events about answers that a node relays to the room's members on the other nodes, besides
#: ``new_answer`` (which may go by reference): small, and only live.
RELAYED_ANSWER_NEWS = frozenset({"answer_accepted", "answer_deleted"})

#: The ``reason`` of ``question_closed`` for a question that ended in each status.
_ENDED_BY = {QuestionStatus.RESOLVED: "accepted", QuestionStatus.CLOSED: "closed", QuestionStatus.EXPIRED: "expired"}

#: How far an answer's receipt got, to merge copies without going back.
_RECEIPT_ORDER = {"sent": 0, "delivered": 1, "read": 2}

#: The most users listed in a join_question reply's ``online``.
ONLINE_LIST_MAX = 100


#: An ended question stays in memory at least this long after it ended (a
#: write about it may still be on its way to the store).
QUIET_BEFORE_COOLING_MS = 3_600_000


#: What an answer's store read gives back when its question changed since the read began: read it again.
_READ_AGAIN = object()


class Questions:
    """The question and answer operations, and each question's escalation.

    Args:
        settings: the ``[engine]`` settings.
        new_id: makes ids, ``new_id(prefix, now)``.
        spam: refuses spam in titles, bodies and answers.
        area: the service area.
        presence: the rooms.
        inbox: durable events, receipts and push jobs.
        oversight: SLOs and slow-response alerts.
        where: positions and escalation progress.
        users, questions, answers, user_conns: the engine's records (shared).
        alerts_per_batch: the most alerts one escalation call delivers.
        deadlines: the engine's deadline heap (questions expire there).
        ttl_ms: how long after it was asked an unresolved question expires (``None``: never).
        keep_ms: how long after it was asked memory keeps an ended question (the store's hot set:
            ``hot_question_days``, or the SLO window if longer); see :meth:`cool_down`.
    """

    def __init__(
        self,
        settings: EngineSettings,
        new_id: Callable[[str, int], str],
        spam: SpamFilter,
        area: ServiceArea,
        presence: Presence,
        inbox: Inbox,
        oversight: Oversight,
        where: Neighbourhood,
        *,
        users: dict[str, User],
        questions: dict[str, Question],
        answers: dict[str, dict[str, Answer]],
        user_conns: dict[str, set[int]],
        conns: dict[int, ConnState],
        alerts_per_batch: int,
        deadlines: Deadlines,
        ttl_ms: int | None,
        keep_ms: int,
        freshness: Freshness,
    ) -> None:
        self._deadlines = deadlines
        self._freshness = freshness
        self._ttl_ms = ttl_ms
        self._keep_ms = keep_ms
        self._settings = settings
        self._new_id = new_id
        self._spam = spam
        self._area = area
        self._presence = presence
        self._inbox = inbox
        self._oversight = oversight
        self._where = where
        self._users = users
        self._questions = questions
        self._answers = answers
        self._user_conns = user_conns
        self._alerts_per_batch = alerts_per_batch
        self._conns = conns
        self._answer_homes: dict[str, str] = {}  # answer id -> its question's id, for answers in memory
        self._touched: dict[str, int] = {}  # question id -> when it last changed where its times do not say

    def operations(self) -> dict[str, Callable[[Call], dict[str, Any] | Pending]]:
        return {
            "create_question": self.create_question,
            "join_question": self.join_question,
            "leave_question": self.leave_question,
            "create_answer": self.create_answer,
            "accept_answer": self.accept_answer,
            "close_question": self.close_question,
            "typing_start": self.typing_start,
            "typing_stop": self.typing_stop,
            "mark_read": self.mark_read,
            "delete_question": self.delete_question,
            "delete_answer": self.delete_answer,
        }

    # ---- memory --------------------------------------------------------------------

    def adopt(self, question: Question, answers: tuple[Answer, ...] | list[Answer]) -> None:
        """Bring a question and its answers (read from the store) into memory; an active one (another
        node's, or one unhidden) is open here too: nearby, hotspots, its expiry."""
        if question.question_id in self._questions:
            return  # memory is newer than the store
        self._questions[question.question_id] = question
        self._answers.setdefault(question.question_id, {})
        for answer in answers:
            self.adopt_answer(answer)
        self._oversight.asked(question)  # its answer time, and its alert if it goes unanswered
        if question.status in ACTIVE:
            self._where.question_opened(question)
            self.schedule_expiry(question)
        else:
            self._where.question_asked(question)

    def refresh(
        self, question_id: str, question: Question | None, answers: tuple[Answer, ...], out: OutcomeBuilder
    ) -> None:
        """Merge the store's copy of a question and its answers into memory's (``QuestionChanged``).

        A merge, not a replacement: this node's own writes may still be on
        their way to the store, so nothing goes back. A question's status
        only moves forward (open, answered, then ended: an end in the store
        wins over an active copy); an answer memory holds that the store has
        not (yet) is kept, one the store holds deleted leaves; receipts and
        ``accepted`` only move forward; the count is the answers held. Copies
        are updated in place (the inbox and the neighbourhood hold the
        objects). A question that ended in the store ends here (its
        escalation is cancelled, the room hears ``question_closed``); a
        deleted one leaves memory, its room hears ``question_deleted``.
        The dispatcher here drops the pushes it holds about a deleted question
        or an answer that leaves (the take-down's commit cancelled them in the
        outbox, not in this node's queue). ``question`` ``None`` (no such row:
        yet) changes nothing.
        """
        held = self._questions.get(question_id)
        if question is None:
            return
        for answer in answers:  # receipts moved on, or answers gone, elsewhere: none to give here
            if answer.deleted_at is not None or answer.state != ReceiptState.SENT:
                self._inbox.untrack(question.asker_id, question_id, answer.answer_id)
        if question.deleted_at is not None:
            self._inbox.untrack(question.asker_id, question_id)
            self._inbox.drop_pushes(out, question_id=question_id)  # its take-down cancelled them in the outbox
            if held is not None:
                self._end(held, out)
                out.send(self._presence.others(question_id), event("question_deleted", {"question_id": question_id}))
                self._forget(held)
            self._withdraw(question_id)
            return
        if held is None:
            if question.status in ACTIVE:  # an ended one is loaded when asked for, as any old question
                self.adopt(question, tuple(a for a in answers if a.deleted_at is None))
            else:
                self.count(question)  # e.g. unhidden on another node: it counts here too
            return
        was_active = held.status in ACTIVE
        mine = attrs.evolve(held)
        for field in attrs.fields(Question):
            setattr(held, field.name, getattr(question, field.name))
        if question.status in ACTIVE and mine.status not in ACTIVE:
            held.status, held.accepted_answer_id, held.closed_at = mine.status, mine.accepted_answer_id, mine.closed_at
        firsts = [at for at in (mine.first_answer_at, question.first_answer_at) if at is not None]
        held.first_answer_at = min(firsts) if firsts else None
        held.alerted_at = question.alerted_at if question.alerted_at is not None else mine.alerted_at
        kept = self._answers.setdefault(question_id, {})
        for answer in answers:
            ours = kept.get(answer.answer_id)
            if answer.deleted_at is not None:
                if ours is not None:
                    del kept[answer.answer_id]
                    self._answer_homes.pop(answer.answer_id, None)
                    self._inbox.drop_pushes(out, question_id=question_id, answer_id=answer.answer_id)
            elif ours is None:
                self.adopt_answer(answer)
            else:
                receipt = (ours.state, ours.delivered_at, ours.read_at)
                accepted = ours.accepted or answer.accepted
                for field in attrs.fields(Answer):
                    setattr(ours, field.name, getattr(answer, field.name))
                ours.accepted = accepted
                if _RECEIPT_ORDER.get(receipt[0], 0) > _RECEIPT_ORDER.get(ours.state, 0):
                    ours.state, ours.delivered_at, ours.read_at = receipt
        held.answer_count = len(kept)
        if question.status == QuestionStatus.OPEN and mine.status == QuestionStatus.ANSWERED and kept:
            held.status = mine.status  # an answer here the store may not hold yet (none left: open, as stored)
        self._oversight.track(held)  # its first answer may have come on another node
        self._oversight.unanswered(held)  # and, open again without answers, it is owed its alert
        if was_active and held.status not in ACTIVE:
            self._end(held, out)
            reason = _ENDED_BY.get(held.status, "closed")
            out.send(
                self._presence.others(question_id),
                event("question_closed", {"question_id": question_id, "reason": reason}),
            )

    def adopt_answer(self, answer: Answer) -> None:
        self._answers.setdefault(answer.question_id, {})[answer.answer_id] = answer
        self._answer_homes[answer.answer_id] = answer.question_id
        question = self._questions.get(answer.question_id)
        if question is not None:
            self._inbox.track(question, answer)

    def schedule_expiry(self, question: Question) -> None:
        if question.status in ACTIVE and self._ttl_ms is not None:
            self._deadlines.add(question.created_at + self._ttl_ms, "expire", question.question_id)

    def answer_wire(self, answer: Answer) -> dict[str, Any]:
        """An answer as replies and events show it: with its author's standing."""
        author = self._users.get(answer.author_id)
        return {
            **answer.to_wire(),
            "author_local": author.local if author is not None else False,
            "author_points": author.points if author is not None else 0,
        }

    def escalation_until(self, question: Question) -> int:
        """When the question's last stage is due (ms)."""
        stages = self._where.stages
        return question.created_at + int(stages[-1].offset_s * 1000) if stages else question.created_at

    # ---- operations ----------------------------------------------------------------

    def _known(self, user_id: str) -> None:
        """Refuse, before anything changes, a write that needs a user this node has not heard of yet: one
        another node made a moment ago (several nodes: the user's news is on its way)."""
        if user_id not in self._users:
            raise ProtocolError("unavailable", "this server has not heard of that user yet; retry", retry_after_ms=1000)

    def _question(self, f: Fields) -> Question:
        question = self._questions.get(f.ident("question_id"))
        if question is None:
            raise ProtocolError("not_found", "no such question")
        return question

    def create_question(self, call: Call) -> dict[str, Any]:
        s, f, user, now, out = self._settings, call.f, call.user, call.now, call.out
        title = f.text("title", max_len=s.title_max)
        body = f.text("body", max_len=s.body_max, min_len=0, default="")
        self._spam.check(title, body)
        lat, lng = f.location()
        hashtags = f.hashtags("hashtags", max_items=s.hashtags_max)
        urgency = f.choice("urgency", ("normal", "urgent"), default="normal")
        region = self._area.region(lat, lng)
        # The asking connection joins the new room, unless it is in as many rooms as it may be: then the
        # question is asked all the same (a cap on a connection's rooms is no reason to refuse it) and the
        # reply says it was not joined.
        joins = self._presence.has_room_for(call.conn)
        question = Question(
            question_id=self._new_id("q", now),
            asker_id=user.user_id,
            asker_nick=user.nick,
            title=title,
            body=body,
            lat=lat,
            lng=lng,
            region=region,
            hashtags=hashtags,
            urgency=urgency,
            created_at=now,
        )
        self._questions[question.question_id] = question
        self._answers[question.question_id] = {}
        out.write(SaveQuestion(attrs.evolve(question)))
        if joins:
            self._presence.join(call.conn, user.user_id, question.question_id, out)
        out.note(
            "question_created",
            question_id=question.question_id,
            user=user.user_id,
            region=region,
            urgency=urgency,
            hashtags=len(hashtags),
        )
        self._where.question_opened(question)
        self._oversight.asked(question)
        self.schedule_expiry(question)
        if self._where.stages:
            self._where.restore_escalation(question.question_id, 0, ())
            # Stored as not begun, so that a restart before its first stage takes it up (a stage that
            # runs in this commit writes its own progress after this, which the commit keeps).
            out.write(SaveEscalation(question.question_id, 0, now))
            # Stages due now (IMMEDIATE) go out with the reply, in the same commit.
            self.run_due_stages(question, now, out)
            if self._where.escalation_due(question) is not None:
                out.act(StartEscalation(question.question_id, self.escalation_until(question)))
        return {"question": question.to_wire(), "joined": joins}

    def join_question(self, call: Call) -> dict[str, Any]:
        question = self._question(call.f)
        presence, question_id = self._presence, question.question_id
        presence.join(call.conn, call.user.user_id, question_id, call.out)
        answers = sorted(self._answers.get(question_id, {}).values(), key=lambda a: (a.created_at, a.answer_id))
        who = self._who
        online = presence.online(question_id)  # on every node (store/CLUSTER.md, "Room members across nodes")
        return {
            "question": question.to_wire(),
            "answers": [self.answer_wire(a) for a in answers],
            # At most ONLINE_LIST_MAX names; big rooms report the full count.
            "online": [who(uid) for uid in online[:ONLINE_LIST_MAX]],
            "online_count": len(online),
            "typing": presence.typing(question_id, call.now),
        }

    def leave_question(self, call: Call) -> dict[str, Any]:
        question = self._question(call.f)
        if question.question_id not in call.conn.rooms:
            raise ProtocolError("not_joined", "this connection has not joined that question")
        self._presence.leave(call.conn, question.question_id, call.out)
        return {"question_id": question.question_id}

    def create_answer(self, call: Call) -> dict[str, Any]:
        f, user, now, out = call.f, call.user, call.now, call.out
        question = self._question(f)
        content = f.text("content", max_len=self._settings.answer_max)
        self._spam.check(content)
        if question.asker_id == user.user_id:
            raise ProtocolError("forbidden", "you cannot answer your own question")
        self._known(question.asker_id)
        status = self._advance(question, QuestionEvent.ANSWER)
        answer = Answer(
            answer_id=self._new_id("a", now),
            question_id=question.question_id,
            author_id=user.user_id,
            author_nick=user.nick,
            content=content,
            created_at=now,
        )
        question.status = status
        question.answer_count += 1
        if question.first_answer_at is None:
            question.first_answer_at = now
            self._oversight.first_answer(question, now, out)
        self._answers[question.question_id][answer.answer_id] = answer
        self._answer_homes[answer.answer_id] = question.question_id
        self._inbox.answer_posted(question, answer, now)
        out.write(SaveAnswer(attrs.evolve(answer)))
        # Counted in SQL, and only while the question is active there (another node may have closed it).
        out.write(CountAnswer(question.question_id, 1, answered_at=now))
        out.note("answer_created", question_id=question.question_id, answer_id=answer.answer_id, user=user.user_id)
        wire = self.answer_wire(answer)
        news = {"question_id": question.question_id, "answer": wire}
        out.send(self._presence.others(question.question_id, except_conn=call.conn.conn_id), event("new_answer", news))
        out.write(RoomNews(question.question_id, "new_answer", news))  # the room's members on other nodes
        notice = {"question_id": question.question_id, "question_title": question.title, "answer": wire}
        self._inbox.append(question.asker_id, "answer_notification", notice, now, out)
        if not self._connected(question.asker_id):  # the asker's app is in the background: push
            self._inbox.enqueue_push(question.asker_id, "answer_notification", question, notice, now, out)
        # Clear the author's typing state in that room: the answer is in.
        self._presence.stop_typing(question.question_id, user.user_id, out)
        return {"answer": wire}

    def accept_answer(self, call: Call) -> dict[str, Any]:
        f, user, now, out = call.f, call.user, call.now, call.out
        question = self._question(f)
        answer = self._answers.get(question.question_id, {}).get(f.ident("answer_id"))
        if answer is None:
            raise ProtocolError("not_found", "no such answer to that question")
        if question.asker_id != user.user_id:
            raise ProtocolError("forbidden", "only the asker can accept an answer")
        self._known(answer.author_id)
        question.status = self._advance(question, QuestionEvent.ACCEPT)
        question.accepted_answer_id = answer.answer_id
        question.closed_at = now
        self._end(question, out)
        answer.accepted = True
        points = self._settings.accept_points
        author = self._users[answer.author_id]
        author.points += points
        out.write(AcceptOnce(question.question_id, answer.answer_id, now))  # refused if another node accepted first
        out.write(SaveAnswer(attrs.evolve(answer)))
        out.write(AddPoints(author.user_id, points))  # added in SQL: another node's accept may add too
        out.note("answer_accepted", question_id=question.question_id, answer_id=answer.answer_id, points=points)
        data = {
            "question_id": question.question_id,
            "answer_id": answer.answer_id,
            "author_id": author.user_id,
            "points": points,
        }
        others = self._presence.others(question.question_id, except_conn=call.conn.conn_id)
        out.send(others, event("answer_accepted", data))
        out.write(RoomNews(question.question_id, "answer_accepted", data))  # the room's members on other nodes
        out.send(others, event("question_closed", {"question_id": question.question_id, "reason": "accepted"}))
        notice = {**data, "question_title": question.title, "total_points": author.points}
        self._inbox.append(author.user_id, "answer_accepted_notification", notice, now, out)
        if not self._connected(author.user_id):
            self._inbox.enqueue_push(author.user_id, "answer_accepted_notification", question, notice, now, out)
        return {"question": question.to_wire(), "answer": self.answer_wire(answer)}

    def _connected(self, user_id: str) -> bool:
        """Whether the user has a connection, here or on another node (no push then: they get it live)."""
        return bool(self._user_conns.get(user_id)) or self._where.connected_elsewhere(user_id)

    def close_question(self, call: Call) -> dict[str, Any]:
        question = self._question(call.f)
        if question.asker_id != call.user.user_id:
            raise ProtocolError("forbidden", "only the asker can close a question")
        question.status = self._advance(question, QuestionEvent.CLOSE)
        question.closed_at = call.now
        self._end(question, call.out)
        call.out.write(CloseOnce(question.question_id, question.status, call.now))
        call.out.send(
            self._presence.others(question.question_id, except_conn=call.conn.conn_id),
            event("question_closed", {"question_id": question.question_id, "reason": "closed"}),
        )
        return {"question": question.to_wire()}

    def delete_question(self, call: Call) -> dict[str, Any]:
        """The asker takes a question down (soft delete): it leaves lists, rooms and memory."""
        question = self._question(call.f)
        if question.asker_id != call.user.user_id:
            raise ProtocolError("forbidden", "only the asker can delete a question")
        self.take_down_question(question, call.now, call.out, except_conn=call.conn.conn_id)
        call.out.note("question_deleted", question_id=question.question_id, user=call.user.user_id)
        return {"question_id": question.question_id}

    def take_down_question(
        self, question: Question, now: int, out: OutcomeBuilder, *, hidden: bool = False, except_conn: int | None = None
    ) -> None:
        """Delete (or hide) a question: it leaves lists, nearby, its room (``question_deleted``) and memory.

        Works as well for a question that is not in memory (read from the store): then only its row changes.
        """
        question.deleted_at = now
        question.hidden = hidden
        self._freshness.changed(question.question_id)  # a copy read before (in memory or not) is out of date
        if hidden:
            self.stop_escalating(question, now, out)  # an unhidden question does not escalate again
        self._end(question, out)
        self._withdraw(question.question_id)
        self._inbox.untrack(question.asker_id, question.question_id)  # no receipt for what is gone
        self._inbox.cancel_pushes(now, out, question_id=question.question_id)  # nor a push of its title
        out.write(SaveQuestion(attrs.evolve(question)))
        out.send(
            self._presence.others(question.question_id, except_conn=except_conn),
            event("question_deleted", {"question_id": question.question_id}),
        )
        self._forget(question)

    def take_down_answer(
        self,
        question: Question,
        answer: Answer,
        now: int,
        out: OutcomeBuilder,
        *,
        hidden: bool = False,
        except_conn: int | None = None,
    ) -> None:
        """Delete (or hide) an answer: it leaves lists, its question's count and room (``answer_deleted``), memory.

        Works as well for a question that is not in memory (read from the store): then only the rows change.
        """
        answer.deleted_at = now
        answer.hidden = hidden
        self._freshness.changed(question.question_id)  # a copy read before (in memory or not) is out of date
        self._answers.get(question.question_id, {}).pop(answer.answer_id, None)
        self._answer_homes.pop(answer.answer_id, None)
        self._inbox.untrack(question.asker_id, question.question_id, answer.answer_id)  # no receipt for it
        self._inbox.cancel_pushes(now, out, question_id=question.question_id, answer_id=answer.answer_id)
        if question.question_id in self._questions:
            self.touched(question.question_id, now)  # the answer's time is not in memory any more
        question.answer_count = max(0, question.answer_count - 1)
        if question.answer_count == 0 and question.status == QuestionStatus.ANSWERED:
            # Open again: it has no answer (CountAnswer does the same in SQL, where the count is).
            question.status = self._advance(question, QuestionEvent.UNANSWER)
            self._oversight.unanswered(question)
        out.write(SaveAnswer(attrs.evolve(answer)))
        out.write(CountAnswer(question.question_id, -1, answer_id=answer.answer_id))
        gone = {"question_id": question.question_id, "answer_id": answer.answer_id}
        out.send(self._presence.others(question.question_id, except_conn=except_conn), event("answer_deleted", gone))
        out.write(RoomNews(question.question_id, "answer_deleted", gone))  # the room's members on other nodes

    def show_answer_again(
        self, question: Question, answer: Answer, out: OutcomeBuilder, *, except_conn: int | None = None
    ) -> None:
        """An unhidden answer's room hears of it as of a new one (``new_answer``), as it heard of its hiding
        (``answer_deleted``): members who saw it go see it come back, without joining again."""
        news = {"question_id": question.question_id, "answer": self.answer_wire(answer)}
        out.send(self._presence.others(question.question_id, except_conn=except_conn), event("new_answer", news))
        out.write(RoomNews(question.question_id, "new_answer", news))  # the room's members on other nodes

    def answer_in_memory(self, answer_id: str) -> Answer | None:
        question_id = self._answer_homes.get(answer_id)
        return self._answers.get(question_id or "", {}).get(answer_id)

    def delete_answer(self, call: Call) -> dict[str, Any] | Pending:
        """An answer's author takes it down (soft delete); an accepted answer stays."""
        answer_id = call.f.ident("answer_id")
        question_id = self._answer_homes.get(answer_id)
        if question_id is None and (not call.retried or call.found is _READ_AGAIN):
            begun = self._freshness.now
            return Pending(AnswerHome(answer_id), lambda found: self._adopt_found(found, begun))
        answers = self._answers.get(question_id or "", {})
        answer = answers.get(answer_id)
        if answer is None:
            raise ProtocolError("not_found", "no such answer")
        if answer.author_id != call.user.user_id:
            raise ProtocolError("forbidden", "only its author can delete an answer")
        if answer.accepted:
            raise ProtocolError("forbidden", "an accepted answer cannot be deleted")
        question = self._questions[answer.question_id]
        self.take_down_answer(question, answer, call.now, call.out, except_conn=call.conn.conn_id)
        return {"question_id": answer.question_id, "answer_id": answer_id}

    def expire(self, question_id: str, now: int, out: OutcomeBuilder) -> None:
        """A question's time to live is up: unless it is resolved or closed, it expires and leaves memory."""
        question = self._questions.get(question_id)
        if question is None or question.status not in ACTIVE or self._ttl_ms is None:
            return
        if now < question.created_at + self._ttl_ms:
            return
        question.status = advance(question.status, QuestionEvent.EXPIRE)
        question.closed_at = now
        self._end(question, out)
        out.write(CloseOnce(question_id, question.status, now, conflict=False))  # ended elsewhere: no matter
        out.note("question_expired", question_id=question_id)
        closing = event("question_closed", {"question_id": question_id, "reason": "expired"})
        room = self._presence.room_of(question_id)
        if room is not None:
            out.send(room.conn_ids(), closing)
        self._forget(question)

    def _adopt_found(self, found: tuple[Question, list[Answer]] | None, begun: int) -> Retry:
        if found is None:
            raise ProtocolError("not_found", "no such answer")
        question, answers = found
        if question.question_id not in self._questions and self._freshness.stale(question.question_id, begun):
            return Retry(_READ_AGAIN)  # changed since this copy was read (hidden, say): adopting it would show it
        self.adopt(question, answers)
        return RETRY

    def forget_durable(self) -> None:
        """Forget the answers' homes and touches (the engine reloads its records after a failed commit)."""
        self._answer_homes.clear()
        self._touched.clear()

    def cool_down(self, now: int) -> int:
        """Let go of the ended questions memory no longer needs; returns how many.

        Memory holds what the store's hot set holds (``Storage.load``: every
        active question and those asked within ``keep_ms``); over weeks of
        running, questions that ended, and old ones read on demand
        (``get_question``, ``join_question``), would otherwise stay until the
        next restart. One goes when it has ended, was asked before the hot
        set, has been quiet for :data:`QUIET_BEFORE_COOLING_MS` (since it
        ended, or since its last receipt or deletion: a write about it may
        still be on its way to the store, and a read of the store meanwhile
        would bring back the copy from before it), and nobody is in its room
        here; a later request reads it from the store again, as any old
        question.
        """
        oldest, quiet = now - self._keep_ms, now - QUIET_BEFORE_COOLING_MS
        cold = [
            q
            for q in self._questions.values()
            if q.status not in ACTIVE
            and q.created_at < oldest
            and self._last_change(q) < quiet
            and self._presence.room_of(q.question_id) is None
        ]
        for question in cold:
            self._forget(question)
        return len(cold)

    def touched(self, question_id: str, now: int) -> None:
        """Note a change to a question in memory that its times and its answers' do not show (an answer unhidden,
        or deleted: it leaves memory with its time)."""
        self._touched[question_id] = now

    def _last_change(self, question: Question) -> int:
        """When the question or one of its answers last changed (ms): their times, and :meth:`touched`."""
        last = max(
            question.closed_at or 0,
            question.deleted_at or 0,
            question.alerted_at or 0,
            self._touched.get(question.question_id, 0),
        )
        for answer in self._answers.get(question.question_id, {}).values():
            last = max(last, answer.created_at, answer.delivered_at or 0, answer.read_at or 0, answer.deleted_at or 0)
        return last

    def count(self, question: Question) -> None:
        """Count a question that stays out of memory until it is next asked for (one unhidden, one another
        node showed ended): hotspots, trending, the answer-time SLO."""
        self._where.question_asked(question)
        self._oversight.asked(question)

    def _withdraw(self, question_id: str) -> None:
        """A question deleted or hidden stops counting anywhere: hotspots, trending, the answer-time SLO."""
        self._where.question_withdrawn(question_id)
        self._oversight.withdrawn(question_id)

    def _forget(self, question: Question) -> None:
        """Drop a question from memory (it stays in the database); its room is gone."""
        self._presence.drop_room(question.question_id, self._conns)
        for answer_id in self._answers.pop(question.question_id, {}):
            self._answer_homes.pop(answer_id, None)
        self._questions.pop(question.question_id, None)
        self._touched.pop(question.question_id, None)

    def typing_start(self, call: Call) -> dict[str, Any]:
        question = self._question(call.f)
        expires_at = self._presence.start_typing(call.conn, call.user.user_id, question.question_id, call.now, call.out)
        return {"question_id": question.question_id, "expires_at": expires_at}

    def typing_stop(self, call: Call) -> dict[str, Any]:
        question = self._question(call.f)
        self._presence.joined(call.conn, question.question_id)
        self._presence.stop_typing(question.question_id, call.user.user_id, call.out)
        return {"question_id": question.question_id}

    def mark_read(self, call: Call) -> dict[str, Any]:
        question = self._question(call.f)
        if question.asker_id != call.user.user_id:
            raise ProtocolError("forbidden", "only the asker marks answers read")
        wanted = call.f.ident_list("answer_ids", max_items=500)
        answers = self._answers.get(question.question_id, {})
        if wanted is None:
            chosen = list(answers.values())
        else:
            missing = [aid for aid in wanted if aid not in answers]
            if missing:
                raise ProtocolError("not_found", f"no such answer: {missing[0]}")
            chosen = [answers[aid] for aid in wanted]
        changed = self._inbox.mark_answers_read(call.user.user_id, chosen, call.now, call.out)
        return {"question_id": question.question_id, "answer_ids": changed}

    # ---- escalation ------------------------------------------------------------------

    def run_due_stages(self, question: Question, now: int, out: OutcomeBuilder, *, guarded: bool = False) -> None:
        """Plan each stage due at ``now`` and deliver up to ``alerts_per_batch`` of their alerts.

        A stage is planned at once (nearest first, caps and "never twice"
        settled for all its targets), but its alerts leave in batches: the
        rest stay pending and ``escalation_due`` keeps answering the stage's
        due time until they are out. So one call's work, and the commit it
        joins, stay small however many locals a stage reaches: a reply
        committed next to it waits for a hundred alerts, not a thousand. The
        stage's progress is saved with its last batch; after a restart in
        the middle, the stage is planned again without those already alerted.

        ``guarded``: what it writes is committed only while the question is open in the store (``IfOpen``:
        the stages after the ask's, which another node may have ended meanwhile).
        """
        where = self._where
        question_id = question.question_id
        room = self._alerts_per_batch
        brief: dict[str, Any] | None = None
        wrote = False
        alerted: list[tuple[str, int]] = []  # for the guard: each alert and when its caps counted it
        while room > 0 and (esc := where.escalations.get(question_id)) is not None:
            if esc.delivering is None:
                due = where.escalation_due(question)
                if due is None or due > now:
                    break
                stage, hits = where.run_stage(question, self._user_conns.keys(), now)
                out.note(
                    "escalation_stage",
                    question_id=question_id,
                    stage=stage.name,
                    targets=len(hits),
                    offline=sum(1 for hit in hits if not hit[2]),
                    late_ms=now - (question.created_at + int(stage.offset_s * 1000)),
                )
                if hits:
                    out.act(Observe("escalation_stage_latency", question.created_at, stage.name))
                esc.delivering, esc.pending = stage, hits
            elif esc.delivering.only_if_unanswered and question.answer_count > 0:
                where.drop_pending(esc)  # answered since the stage was planned: the rest of it is not sent
            stage = esc.delivering
            batch = esc.pending[:room]
            del esc.pending[:room]
            room -= len(batch)
            # Online or not is asked as the batch leaves, not when the stage was planned: a local who left
            # since gets a push, one who came back a live event only (``append_alert``).
            connected = where.online(self._user_conns.keys())
            sent = tuple((uid, stage.name, dist, uid in connected) for uid, dist, _ in batch)
            if sent:
                out.write(SaveNotified(question_id, sent, now))
                alerted.extend((uid, esc.planned_at) for uid, _, _ in batch)
                wrote = True
            if not esc.pending:
                esc.delivering = None
                out.write(SaveEscalation(question_id, esc.next_stage, now))
                wrote = True
            if not batch:
                continue
            if brief is None:
                brief = where.brief(question)
            # The question, stage and style are packed once for the batch.
            alerts = StageAlerts("new_question_notification", question_id, brief, stage.name, esc.style)
            for uid, _, dist, online in sent:
                self._inbox.append_alert(uid, alerts, dist, now, out)
                if not online:
                    data, _ = alerts.data(dist)
                    self._inbox.enqueue_push(uid, "new_question_notification", question, data, now, out)
        if where.escalation_due(question) is None:
            where.escalation_done(question_id)
        if guarded and wrote:
            out.write(IfOpen(question_id, tuple(alerted)))

    def stop_escalating(self, question: Question, now: int, out: OutcomeBuilder) -> None:
        """Stop the question's escalation for good (a ban of its asker, a hide): stored as stopped, whatever
        the plan (``records.stopped_for_good``), so that no restart takes it up again, with a longer plan
        either, nor an unhide or a ban's end.

        Stored whatever memory here follows of it (``StopEscalating``): another node may run its stages
        (the lease holder), and its news may not have come here (the question read from the store): the
        holder only ends it in memory when the news comes, and a takeover, a restart or the unhide's news
        would read it from the store again.
        """
        question_id = question.question_id
        following = question_id in self._where.escalations
        run = self._where.stop_for_good(question_id)
        if run is None and question.status not in ACTIVE:
            return  # ended: no stage runs again, whatever the store holds
        if following:
            out.act(CancelEscalation(question_id))
        out.write(StopEscalating(now, question_id=question_id, stages_run=run or 0))

    def _end(self, question: Question, out: OutcomeBuilder) -> None:
        if question.question_id in self._where.escalations:
            out.act(CancelEscalation(question.question_id))
        self._where.question_ended(question.question_id)

    # ---- helpers ---------------------------------------------------------------------

    def _advance(self, question: Question, what: QuestionEvent) -> QuestionStatus:
        try:
            return advance(question.status, what)
        except IllegalTransition as exc:
            if exc.status == QuestionStatus.RESOLVED and what == QuestionEvent.ACCEPT:
                raise ProtocolError("already_accepted", "an answer was already accepted") from None
            if what == QuestionEvent.ACCEPT and exc.status == QuestionStatus.OPEN:
                raise ProtocolError("not_found", "the question has no answers yet") from None
            raise ProtocolError("question_closed", str(exc)) from None

    def _who(self, user_id: str) -> dict[str, Any]:
        user = self._users.get(user_id)
        return {"user_id": user_id, "nick": user.nick if user else user_id}
