"""The engine: dongne's sans-I/O core.

Theory of operation: the driver feeds the engine what happened on the wire
(a connection opened, a request arrived, a connection went away, time passed)
together with ``now`` in milliseconds since the epoch. Each call updates the
in-memory state and returns an ``Outcome``: the rows to commit and the frames
to send once they are committed. The engine never touches a socket, a file or
a clock, so every rule here is tested with plain calls.
"""

from __future__ import annotations

import heapq
import logging
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from ..auth import Claims
from ..config import AlertSettings, ContentSettings, EngineSettings, LimitSettings, LocationSettings
from ._place_ops import PlaceOps
from .effects import (
    AppendEvent,
    CancelEscalation,
    EnqueuePush,
    Observe,
    Outcome,
    OutcomeBuilder,
    Push,
    Replay,
    SaveAnswer,
    SaveEscalation,
    SaveNotified,
    SaveQuestion,
    SaveUser,
    Send,
    StartEscalation,
)
from .errors import CloseConnection, ProtocolError
from .escalation import DEFAULT_STAGES, StagePlan
from .lifecycle import ACTIVE, IllegalTransition, QuestionEvent, QuestionStatus, advance
from .limits import OP_CLASSES, BucketSpec, Limiter
from .neighbourhood import Neighbourhood
from .protocol import Fields, Request, durable_event, event, reply_error, reply_ok
from .records import Answer, PushJob, Question, ReceiptState, User
from .regions import Hotspot
from .rooms import Room, TypingClock
from .slo import SloTracker
from .text import SpamFilter

__all__ = ["ConnState", "Engine", "LoadedState"]

log = logging.getLogger("dongne.engine")

#: The most users listed in a join_question reply's ``online``.
ONLINE_LIST_MAX = 100

TokenCheck = Callable[[object, float], Claims]  # (token, now_s) -> Claims, raises CloseConnection
RegionLookup = Callable[[float, float], "str | None"]


@attrs.define
class ConnState:
    conn_id: int
    user_id: str | None = None
    rooms: set[str] = attrs.Factory(set)


@attrs.frozen
class LoadedState:
    """What the store hands the engine at start-up."""

    users: list[User]
    questions: list[Question]
    answers: list[Answer]
    escalations: dict[str, int] = attrs.Factory(dict)  # question id -> stages already run
    notified: list[tuple[str, str, int]] = attrs.Factory(list)  # (question id, user id, at)
    pending_pushes: list[PushJob] = attrs.Factory(list)
    last_push_job_id: int = 0


def _default_new_id(prefix: str, now: int) -> str:
    # Time-ordered: 12 hex digits of milliseconds, then 8 random hex digits.
    return f"{prefix}{now:012x}{secrets.token_hex(4)}"


class Engine(PlaceOps):
    """All of dongne's rules, fed events, returning effects.

    Args:
        settings: the ``[engine]`` settings.
        check_token: verifies a hello token; raises ``CloseConnection(4001)``.
        region_of: names the service region of a point, ``None`` outside;
            when omitted every point is in service.
        new_id: makes ids, ``new_id(prefix, now)``; injectable for tests.
        location: the ``[location]`` settings.
        stages: the escalation plan.
        hotspots: named places for hotspot statistics.
    """

    def __init__(
        self,
        settings: EngineSettings,
        check_token: TokenCheck,
        *,
        region_of: RegionLookup | None = None,
        new_id: Callable[[str, int], str] = _default_new_id,
        location: LocationSettings = LocationSettings(),
        stages: tuple[StagePlan, ...] = DEFAULT_STAGES,
        hotspots: tuple[Hotspot, ...] = (),
        limits: LimitSettings = LimitSettings(),
        content: ContentSettings = ContentSettings(),
        alerts: AlertSettings = AlertSettings(),
        alerts_per_batch: int = 100,
    ) -> None:
        self.settings = settings
        self.alerts_per_batch = alerts_per_batch
        self.alert_settings = alerts
        self.slo = SloTracker(alerts.slo_window_days)
        self._alert_heap: list[tuple[int, str]] = []  # (due ms, question id)
        self.recent_alerts: deque[dict[str, Any]] = deque(maxlen=50)
        self.admins: set[str] = set()
        self.limit_settings = limits
        self.limiter = Limiter(
            {
                "conn": BucketSpec(limits.conn_per_s, limits.conn_burst),
                "write": BucketSpec(limits.writes_per_minute / 60, limits.writes_burst),
                "question": BucketSpec(limits.questions_per_hour / 3600, limits.questions_burst),
                "typing": BucketSpec(limits.typing_per_s, limits.typing_burst),
            },
            abuse_limit=limits.abuse_refusals_per_minute,
        )
        self.spam = SpamFilter(content.spam_patterns)
        self.where = Neighbourhood(location, stages, hotspots)
        self._push_seq = 0
        self._check_token = check_token
        self._region_of = region_of
        self._new_id = new_id
        self.users: dict[str, User] = {}
        self.questions: dict[str, Question] = {}
        self.answers: dict[str, dict[str, Answer]] = {}  # question id -> answer id -> answer
        self.rooms: dict[str, Room] = {}
        self.conns: dict[int, ConnState] = {}
        self.user_conns: dict[str, set[int]] = {}
        self._undelivered: dict[str, set[tuple[str, str]]] = {}  # asker -> {(question, answer)}
        self._typing = TypingClock()
        self._ops: dict[str, Callable[[ConnState, User, Request, Fields, int, OutcomeBuilder], dict[str, Any]]] = {
            "create_question": self._op_create_question,
            "join_question": self._op_join_question,
            "leave_question": self._op_leave_question,
            "create_answer": self._op_create_answer,
            "accept_answer": self._op_accept_answer,
            "close_question": self._op_close_question,
            "typing_start": self._op_typing_start,
            "typing_stop": self._op_typing_stop,
            "mark_read": self._op_mark_read,
            "get_profile": self._op_get_profile,
            "update_location": self._op_update_location,
            "nearby_questions": self._op_nearby_questions,
            "nearby_locals": self._op_nearby_locals,
            "update_settings": self._op_update_settings,
            "get_settings": self._op_get_settings,
            "trending": self._op_trending,
            "hotspots": self._op_hotspots,
            "metrics": self._op_metrics,
        }

    # ---- loading -------------------------------------------------------------

    def load(self, state: LoadedState) -> None:
        """Adopt the durable state read from the store at start-up."""
        for user in state.users:
            self.users[user.user_id] = user
            self.where.refresh_local(user)
            if user.role == "admin":
                self.admins.add(user.user_id)
        notified: dict[str, list[str]] = {}
        for question_id, user_id, at in state.notified:
            notified.setdefault(question_id, []).append(user_id)
            self.where.ledger.record_alert(user_id, at)
        for question in state.questions:
            self.questions[question.question_id] = question
            self.answers.setdefault(question.question_id, {})
            self.slo.asked(
                question.question_id, question.created_at, question.region, question.urgency == "urgent",
                question.first_answer_at,
            )  # fmt: skip
            self._watch_response(question)
            if question.status in ACTIVE:
                self.where.question_opened(question, question.created_at)
                if question.question_id in state.escalations:
                    self.where.restore_escalation(
                        question.question_id,
                        state.escalations[question.question_id],
                        notified.get(question.question_id, ()),
                    )
        for answer in state.answers:
            self._adopt_answer(answer)
        self._push_seq = state.last_push_job_id

    def escalating(self) -> list[str]:
        """Questions whose escalation has stages left (the driver starts their tasks)."""
        return sorted(qid for qid in self.where.escalations if self.escalation_due(qid) is not None)

    def last_stage_due(self, question_id: str) -> int | None:
        """When the question's last escalation stage is due (ms)."""
        question = self.questions.get(question_id)
        if question is None or not self.where.stages:
            return None
        return question.created_at + int(self.where.stages[-1].offset_s * 1000)

    def escalation_due(self, question_id: str) -> int | None:
        """When the question's next escalation stage is due (ms), or None when done."""
        question = self.questions.get(question_id)
        return None if question is None else self.where.escalation_due(question)

    def adopt_question(self, question: Question, answers: Iterable[Answer]) -> None:
        """Bring a question (and its answers) read from the store into memory."""
        if question.question_id in self.questions:
            return
        self.questions[question.question_id] = question
        self.answers.setdefault(question.question_id, {})
        for answer in answers:
            self._adopt_answer(answer)

    def _adopt_answer(self, answer: Answer) -> None:
        self.answers.setdefault(answer.question_id, {})[answer.answer_id] = answer
        question = self.questions.get(answer.question_id)
        if question is not None and answer.state == ReceiptState.SENT:
            self._undelivered.setdefault(question.asker_id, set()).add((question.question_id, answer.answer_id))

    def missing_question(self, request: Request) -> str | None:
        """A question id this request names that is not in memory (the driver loads it)."""
        qid = request.data.get("question_id")
        if isinstance(qid, str) and 0 < len(qid) <= 64 and qid not in self.questions:
            return qid
        return None

    # ---- connections ---------------------------------------------------------

    def open_connection(self, conn_id: int) -> None:
        self.conns[conn_id] = ConnState(conn_id)

    def is_authenticated(self, conn_id: int) -> bool:
        conn = self.conns.get(conn_id)
        return conn is not None and conn.user_id is not None

    def close_connection(self, conn_id: int, now: int) -> Outcome:
        """Forget a connection: leave its rooms (presence), drop its typing."""
        out = OutcomeBuilder()
        conn = self.conns.pop(conn_id, None)
        self.limiter.forget(f"c{conn_id}")
        if len(self.limiter) > 10_000:
            self.limiter.sweep(now)
        if conn is None or conn.user_id is None:
            return out.build()
        for question_id in sorted(conn.rooms):
            self._leave_room(conn, question_id, out)
        conns = self.user_conns.get(conn.user_id)
        if conns is not None:
            conns.discard(conn_id)
            if not conns:
                del self.user_conns[conn.user_id]
                self.where.went_offline(conn.user_id)
        return out.build()

    def user_of(self, conn_id: int) -> str | None:
        conn = self.conns.get(conn_id)
        return conn.user_id if conn else None

    # ---- requests --------------------------------------------------------------

    def receive(self, conn_id: int, request: Request, now: int) -> Outcome:
        """Handle one decoded request from a connection.

        Raises:
            CloseConnection: the connection must be closed (auth failure, 4001;
                persistent abuse of the rate limits, 4008).
        """
        conn = self.conns[conn_id]
        wait = self.limiter.take("conn", f"c{conn_id}", now)
        if conn.user_id is not None and not wait and request.op in OP_CLASSES:
            wait = self.limiter.take(OP_CLASSES[request.op], f"u{conn.user_id}", now)
        if wait:
            return self._rate_limited(conn_id, request.id, wait, now)
        if conn.user_id is None:
            if request.op != "hello":
                raise CloseConnection(4001, "the first frame must be hello")
            return self._hello(conn, request, now)
        if request.op == "hello":
            return self.refuse(conn_id, request.id, ProtocolError("already_authenticated", "hello was already sent"))
        handler = self._ops.get(request.op)
        if handler is None:
            return self.refuse(
                conn_id, request.id, ProtocolError("unknown_op", f"unknown operation {request.op[:40]!r}")
            )
        out = OutcomeBuilder()
        user = self.users[conn.user_id]
        try:
            data = handler(conn, user, request, Fields(request.data), now, out)
        except ProtocolError as exc:
            return self.refuse(conn_id, request.id, exc)
        # The reply goes first: a client sees its own request acknowledged
        # before the events it caused.
        out.actions.insert(0, _send_one(conn_id, reply_ok(request.id, data)))
        return out.build()

    def _rate_limited(self, conn_id: int, request_id: int, wait_ms: int, now: int) -> Outcome:
        if self.limiter.refused(f"c{conn_id}", now):
            raise CloseConnection(4008, "rate limits exceeded again and again")
        error = ProtocolError("rate_limited", "too many requests; slow down", retry_after_ms=wait_ms)
        return self.refuse(conn_id, request_id, error)

    def refuse_frame(self, conn_id: int, request_id: int | None, error: ProtocolError, now: int) -> Outcome:
        """An error reply to a frame that could not be read; floods count as abuse.

        Raises:
            CloseConnection: 4008 when the connection keeps flooding.
        """
        if self.limiter.take("conn", f"c{conn_id}", now) and self.limiter.refused(f"c{conn_id}", now):
            raise CloseConnection(4008, "too many bad frames")
        return self.refuse(conn_id, request_id, error)

    def knows_op(self, op: str) -> bool:
        return op == "hello" or op in self._ops

    def refuse(self, conn_id: int, request_id: int | None, error: ProtocolError) -> Outcome:
        """An error reply to one request (or to a frame that was not one)."""
        frame = reply_error(request_id, error.code, error.message, **_extra(error))
        return Outcome(actions=(_send_one(conn_id, frame),))

    # ---- time ----------------------------------------------------------------

    def next_deadline(self) -> int | None:
        """When ``tick`` next has work to do (ms since the epoch), if ever."""
        deadlines = [
            d
            for d in (self._typing.next_deadline(), self._alert_heap[0][0] if self._alert_heap else None)
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    def tick(self, now: int) -> Outcome:
        """Do what is due at ``now``: expire typing states, raise slow-response alerts."""
        out = OutcomeBuilder()
        for expires_at, question_id, user_id in self._typing.pop_due(now):
            room = self.rooms.get(question_id)
            if room is not None and room.typing.get(user_id) == expires_at:
                self._stop_typing(question_id, room, user_id, out)
        while self._alert_heap and self._alert_heap[0][0] <= now:
            _due, question_id = heapq.heappop(self._alert_heap)
            question = self.questions.get(question_id)
            if question is not None and self._awaits_alert(question):
                self._raise_slow_response_alert(question, now, out)
        return out.build()

    # ---- slow-response alerts -------------------------------------------------

    def _awaits_alert(self, question: Question) -> bool:
        return question.status == QuestionStatus.OPEN and question.answer_count == 0 and question.alerted_at is None

    def _watch_response(self, question: Question) -> None:
        if self._awaits_alert(question):
            due = question.created_at + int(self.alert_settings.slow_response_s * 1000)
            heapq.heappush(self._alert_heap, (due, question.question_id))

    def _raise_slow_response_alert(self, question: Question, now: int, out: OutcomeBuilder) -> None:
        question.alerted_at = now
        out.write(SaveQuestion(attrs.evolve(question)))
        esc = self.where.escalations.get(question.question_id)
        stages = self.where.stages
        data = {
            "question_id": question.question_id,
            "question": self.where.brief(question),
            "age_s": round((now - question.created_at) / 1000, 1),
            "threshold_s": self.alert_settings.slow_response_s,
            "stage": stages[esc.next_stage - 1].name
            if esc is not None and esc.next_stage > 0
            else (stages[-1].name if stages else None),
            "notified": len(esc.notified) if esc is not None else None,
            "raised_at": now,
        }
        self.recent_alerts.appendleft(data)
        out.note(
            "slow_response_alert", question_id=question.question_id, region=question.region, admins=len(self.admins)
        )
        for admin_id in sorted(self.admins):
            self._push_durable(admin_id, "slow_response_alert", data, now, out)
        self._enqueue_push("", "slow_response_alert", question, data, now, out)

    # ---- hello -----------------------------------------------------------------

    def _hello(self, conn: ConnState, request: Request, now: int) -> Outcome:
        claims = self._check_token(request.data.get("token"), now / 1000)
        resume = request.data.get("resume")
        last_seen: int | None = None
        if resume is not None:
            seq = resume.get("last_seq") if isinstance(resume, dict) else None
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
                # Refuse before authenticating: the client can fix and retry.
                raise CloseConnection(4002, "resume.last_seq must be a non-negative integer")
            last_seen = seq
        if len(self.user_conns.get(claims.user_id, ())) >= self.limit_settings.connections_per_user:
            raise CloseConnection(4008, f"at most {self.limit_settings.connections_per_user} connections per user")
        out = OutcomeBuilder()
        user = self.users.get(claims.user_id)
        if user is None:
            user = User(claims.user_id, claims.nick, claims.local, claims.tags, claims.role, created_at=now)
            self.users[user.user_id] = user
            out.write(SaveUser(attrs.evolve(user)))
        elif (user.nick, user.local, user.tags, user.role) != (claims.nick, claims.local, claims.tags, claims.role):
            user.nick, user.local, user.tags, user.role = claims.nick, claims.local, claims.tags, claims.role
            out.write(SaveUser(attrs.evolve(user)))
        self.where.refresh_local(user)
        if user.role == "admin":
            self.admins.add(user.user_id)
        else:
            self.admins.discard(user.user_id)
        conn.user_id = user.user_id
        self.user_conns.setdefault(user.user_id, set()).add(conn.conn_id)
        out.send(
            (conn.conn_id,),
            reply_ok(
                request.id,
                {"user": user.to_wire(), "last_seq": user.last_seq, "server_time": now, "protocol": 1},
            ),
        )
        if last_seen is not None and last_seen < user.last_seq:
            out.act(Replay(conn.conn_id, user.user_id, last_seen, user.last_seq))
        self._mark_delivered(user.user_id, now, out)
        return out.build()

    # ---- durable events -------------------------------------------------------

    def _push_durable(self, user_id: str, kind: str, data: dict[str, Any], now: int, out: OutcomeBuilder) -> None:
        user = self.users[user_id]
        user.last_seq += 1
        # The inbox row is the record of last_seq (the store takes the newest
        # seq per user at start-up): no rewrite of the user's row per event.
        out.write(AppendEvent(user_id, user.last_seq, kind, data, now))
        out.send(self.user_conns.get(user_id, ()), durable_event(kind, user.last_seq, data))

    def _mark_delivered(self, asker_id: str, now: int, out: OutcomeBuilder) -> None:
        pending = self._undelivered.pop(asker_id, None)
        for question_id, answer_id in sorted(pending or ()):
            answer = self.answers.get(question_id, {}).get(answer_id)
            if answer is not None and answer.state == ReceiptState.SENT:
                self._set_receipt(answer, ReceiptState.DELIVERED, now, out)

    def _set_receipt(self, answer: Answer, state: str, now: int, out: OutcomeBuilder) -> None:
        answer.state = state
        if state == ReceiptState.DELIVERED:
            answer.delivered_at = now
        else:
            answer.read_at = now
            answer.delivered_at = answer.delivered_at or now
        out.write(SaveAnswer(attrs.evolve(answer)))
        out.send(
            self.user_conns.get(answer.author_id, ()),
            event(
                "receipt",
                {"question_id": answer.question_id, "answer_id": answer.answer_id, "state": state, "at": now},
            ),
        )

    # ---- operations ----------------------------------------------------------

    def _question(self, fields: Fields) -> Question:
        qid = fields.ident("question_id")
        question = self.questions.get(qid)
        if question is None:
            raise ProtocolError("not_found", "no such question")
        return question

    def _op_get_profile(
        self, conn: ConnState, user: User, request: Request, f: Fields, now: int, out: OutcomeBuilder
    ) -> dict[str, Any]:
        return {"user": user.to_wire(), "last_seq": user.last_seq}

    def _op_create_question(
        self, conn: ConnState, user: User, request: Request, f: Fields, now: int, out: OutcomeBuilder
    ) -> dict[str, Any]:
        s = self.settings
        title = f.text("title", max_len=s.title_max)
        body = f.text("body", max_len=s.body_max, min_len=0, default="")
        self.spam.check(title, body)
        lat, lng = f.location()
        hashtags = f.hashtags("hashtags", max_items=s.hashtags_max)
        urgency = f.choice("urgency", ("normal", "urgent"), default="normal")
        region = self._in_service(lat, lng)
        self._check_room_capacity(conn)  # before anything changes: a refusal leaves no trace
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
        self.questions[question.question_id] = question
        self.answers[question.question_id] = {}
        out.write(SaveQuestion(attrs.evolve(question)))
        self._join_room(conn, user, question.question_id, out)
        out.note(
            "question_created",
            question_id=question.question_id, user=user.user_id, region=region, urgency=urgency, hashtags=len(hashtags),
        )  # fmt: skip
        self.where.question_opened(question, now)
        self.slo.asked(question.question_id, now, question.region, question.urgency == "urgent")
        self._watch_response(question)
        if self.where.stages:
            self.where.restore_escalation(question.question_id, 0, ())
            # Stages due now (IMMEDIATE) go out with the reply, in the same commit.
            self._run_due_stages(question, now, out)
            if self.where.escalation_due(question) is not None:
                out.act(StartEscalation(question.question_id))
        return {"question": question.to_wire()}

    def _op_join_question(
        self, conn: ConnState, user: User, request: Request, f: Fields, now: int, out: OutcomeBuilder
    ) -> dict[str, Any]:
        question = self._question(f)
        self._join_room(conn, user, question.question_id, out)
        room = self.rooms[question.question_id]
        answers = sorted(self.answers.get(question.question_id, {}).values(), key=lambda a: (a.created_at, a.answer_id))
        return {
            "question": question.to_wire(),
            "answers": [a.to_wire() for a in answers],
            # At most ONLINE_LIST_MAX names; big rooms report the full count.
            "online": [self._who(uid) for uid in sorted(room.members)[:ONLINE_LIST_MAX]],
            "online_count": len(room.members),
            "typing": [self._who(uid) for uid in sorted(room.typing)],
        }

    def _op_leave_question(
        self, conn: ConnState, user: User, request: Request, f: Fields, now: int, out: OutcomeBuilder
    ) -> dict[str, Any]:
        question = self._question(f)
        if question.question_id not in conn.rooms:
            raise ProtocolError("not_joined", "this connection has not joined that question")
        self._leave_room(conn, question.question_id, out)
        return {"question_id": question.question_id}

    def _op_create_answer(
        self, conn: ConnState, user: User, request: Request, f: Fields, now: int, out: OutcomeBuilder
    ) -> dict[str, Any]:
        question = self._question(f)
        content = f.text("content", max_len=self.settings.answer_max)
        self.spam.check(content)
        if question.asker_id == user.user_id:
            raise ProtocolError("forbidden", "you cannot answer your own question")
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
            self.slo.answered(question.question_id, now)
            out.act(Observe("time_to_first_answer", question.created_at, question.region or ""))
        self.answers[question.question_id][answer.answer_id] = answer
        asker_online = bool(self.user_conns.get(question.asker_id))
        if asker_online:
            answer.state = ReceiptState.DELIVERED
            answer.delivered_at = now
        else:
            self._undelivered.setdefault(question.asker_id, set()).add((question.question_id, answer.answer_id))
        out.write(SaveAnswer(attrs.evolve(answer)))
        out.write(SaveQuestion(attrs.evolve(question)))
        out.note("answer_created", question_id=question.question_id, answer_id=answer.answer_id, user=user.user_id)
        wire = answer.to_wire()
        room = self.rooms.get(question.question_id)
        if room is not None:
            out.send(
                room.conn_ids(except_conn=conn.conn_id),
                event("new_answer", {"question_id": question.question_id, "answer": wire}),
            )
        self._push_durable(
            question.asker_id,
            "answer_notification",
            {"question_id": question.question_id, "question_title": question.title, "answer": wire},
            now,
            out,
        )
        # Clear the author's typing state in that room: the answer is in.
        if room is not None and user.user_id in room.typing:
            self._stop_typing(question.question_id, room, user.user_id, out)
        return {"answer": wire}

    def _op_accept_answer(
        self, conn: ConnState, user: User, request: Request, f: Fields, now: int, out: OutcomeBuilder
    ) -> dict[str, Any]:
        question = self._question(f)
        answer_id = f.ident("answer_id")
        answer = self.answers.get(question.question_id, {}).get(answer_id)
        if answer is None:
            raise ProtocolError("not_found", "no such answer to that question")
        if question.asker_id != user.user_id:
            raise ProtocolError("forbidden", "only the asker can accept an answer")
        question.status = self._advance(question, QuestionEvent.ACCEPT)
        question.accepted_answer_id = answer.answer_id
        question.closed_at = now
        self._end_question(question, out)
        answer.accepted = True
        points = self.settings.accept_points
        author = self.users[answer.author_id]
        author.points += points
        out.write(SaveQuestion(attrs.evolve(question)))
        out.write(SaveAnswer(attrs.evolve(answer)))
        out.write(SaveUser(attrs.evolve(author)))
        out.note("answer_accepted", question_id=question.question_id, answer_id=answer.answer_id, points=points)
        data = {
            "question_id": question.question_id,
            "answer_id": answer.answer_id,
            "author_id": author.user_id,
            "points": points,
        }
        room = self.rooms.get(question.question_id)
        if room is not None:
            out.send(room.conn_ids(except_conn=conn.conn_id), event("answer_accepted", data))
        self._push_durable(
            author.user_id,
            "answer_accepted_notification",
            {**data, "question_title": question.title, "total_points": author.points},
            now,
            out,
        )
        return {"question": question.to_wire(), "answer": answer.to_wire()}

    def _op_close_question(
        self, conn: ConnState, user: User, request: Request, f: Fields, now: int, out: OutcomeBuilder
    ) -> dict[str, Any]:
        question = self._question(f)
        if question.asker_id != user.user_id:
            raise ProtocolError("forbidden", "only the asker can close a question")
        question.status = self._advance(question, QuestionEvent.CLOSE)
        question.closed_at = now
        self._end_question(question, out)
        out.write(SaveQuestion(attrs.evolve(question)))
        room = self.rooms.get(question.question_id)
        if room is not None:
            out.send(
                room.conn_ids(except_conn=conn.conn_id), event("question_closed", {"question_id": question.question_id})
            )
        return {"question": question.to_wire()}

    def _op_typing_start(
        self, conn: ConnState, user: User, request: Request, f: Fields, now: int, out: OutcomeBuilder
    ) -> dict[str, Any]:
        question = self._question(f)
        room = self._joined_room(conn, question)
        expires_at = now + int(self.settings.typing_ttl_s * 1000)
        already = user.user_id in room.typing
        room.typing[user.user_id] = expires_at
        self._typing.push(expires_at, question.question_id, user.user_id)
        if not already:
            out.send(
                room.conn_ids(except_user=user.user_id),
                event("user_typing", {"question_id": question.question_id, **self._who(user.user_id)}),
            )
        return {"question_id": question.question_id, "expires_at": expires_at}

    def _op_typing_stop(
        self, conn: ConnState, user: User, request: Request, f: Fields, now: int, out: OutcomeBuilder
    ) -> dict[str, Any]:
        question = self._question(f)
        room = self._joined_room(conn, question)
        if user.user_id in room.typing:
            self._stop_typing(question.question_id, room, user.user_id, out)
        return {"question_id": question.question_id}

    def _op_mark_read(
        self, conn: ConnState, user: User, request: Request, f: Fields, now: int, out: OutcomeBuilder
    ) -> dict[str, Any]:
        question = self._question(f)
        if question.asker_id != user.user_id:
            raise ProtocolError("forbidden", "only the asker marks answers read")
        wanted = f.ident_list("answer_ids", max_items=500)
        answers = self.answers.get(question.question_id, {})
        if wanted is None:
            chosen = list(answers.values())
        else:
            missing = [aid for aid in wanted if aid not in answers]
            if missing:
                raise ProtocolError("not_found", f"no such answer: {missing[0]}")
            chosen = [answers[aid] for aid in wanted]
        changed = []
        for answer in sorted(chosen, key=lambda a: (a.created_at, a.answer_id)):
            if answer.state != ReceiptState.READ:
                self._undelivered.get(user.user_id, set()).discard((question.question_id, answer.answer_id))
                self._set_receipt(answer, ReceiptState.READ, now, out)
                changed.append(answer.answer_id)
        return {"question_id": question.question_id, "answer_ids": changed}

    # ---- escalation ------------------------------------------------------------

    def fire_escalation(self, question_id: str, now: int) -> Outcome:
        """Run every stage of the question's escalation that is due at ``now``."""
        out = OutcomeBuilder()
        question = self.questions.get(question_id)
        if question is not None:
            self._run_due_stages(question, now, out)
        return out.build()

    def _run_due_stages(self, question: Question, now: int, out: OutcomeBuilder) -> None:
        """Plan each stage due at ``now`` and deliver up to ``alerts_per_batch`` of their alerts.

        A stage is planned at once (nearest first, caps and "never twice"
        settled for all its targets), but its alerts leave in batches: the
        rest stay pending and ``escalation_due`` keeps answering the stage's
        due time until they are out. So one call's work, and the commit it
        joins, stay small however many locals a stage reaches: a reply
        committed next to it waits for a hundred alerts, not a thousand. The
        stage's progress is saved with its last batch; after a restart in
        the middle, the stage is planned again without those already alerted.
        """
        question_id = question.question_id
        room = self.alerts_per_batch
        brief: dict[str, Any] | None = None
        while room > 0 and (esc := self.where.escalations.get(question_id)) is not None:
            if esc.delivering is None:
                due = self.where.escalation_due(question)
                if due is None or due > now:
                    break
                stage, targets = self.where.run_stage(question, self.user_conns.keys(), now)
                out.note(
                    "escalation_stage",
                    question_id=question_id, stage=stage.name, targets=len(targets),
                    offline=sum(1 for t in targets if not t.online), late_ms=now - (question.created_at + int(stage.offset_s * 1000)),
                )  # fmt: skip
                if targets:
                    out.act(Observe("escalation_stage_latency", question.created_at, stage.name))
                esc.delivering, esc.pending = stage, targets
            batch = esc.pending[:room]
            del esc.pending[:room]
            room -= len(batch)
            if batch:
                out.write(
                    SaveNotified(question_id, tuple((t.user_id, t.stage, t.distance_m, t.online) for t in batch), now)
                )
            if not esc.pending:
                esc.delivering = None
                out.write(SaveEscalation(question_id, esc.next_stage, now))
            if brief is None:
                brief = self.where.brief(question)
            for target in batch:
                data = {"question_id": question_id, "question": brief, **target.to_wire()}
                data.pop("user_id", None)
                data.pop("online", None)
                self._push_durable(target.user_id, "new_question_notification", data, now, out)
                if not target.online:
                    self._enqueue_push(target.user_id, "new_question_notification", question, data, now, out)
        if self.where.escalation_due(question) is None:
            self.where.escalations.pop(question_id, None)  # every stage has run

    def _enqueue_push(
        self, user_id: str, kind: str, question: Question, data: dict[str, Any], now: int, out: OutcomeBuilder
    ) -> None:
        """A job for the push outbox (committed with ``out``), then for the dispatcher."""
        self._push_seq += 1
        job = PushJob(
            job_id=self._push_seq,
            user_id=user_id,
            kind=kind,
            urgent=question.urgency == "urgent",
            payload={"title": question.title, "region": question.region, "data": data},
            created_at=now,
        )
        out.write(EnqueuePush(job))
        out.act(Push(job))

    def _end_question(self, question: Question, out: OutcomeBuilder) -> None:
        if question.question_id in self.where.escalations:
            out.act(CancelEscalation(question.question_id))
        self.where.question_ended(question.question_id)

    # ---- helpers ---------------------------------------------------------------

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
        user = self.users.get(user_id)
        return {"user_id": user_id, "nick": user.nick if user else user_id}

    def _joined_room(self, conn: ConnState, question: Question) -> Room:
        if question.question_id not in conn.rooms:
            raise ProtocolError("not_joined", "join the question first")
        return self.rooms[question.question_id]

    def _check_room_capacity(self, conn: ConnState, question_id: str | None = None) -> None:
        if question_id not in conn.rooms and len(conn.rooms) >= self.limit_settings.rooms_per_connection:
            raise ProtocolError(
                "limit_exceeded", f"a connection can be in at most {self.limit_settings.rooms_per_connection} rooms"
            )

    def _join_room(self, conn: ConnState, user: User, question_id: str, out: OutcomeBuilder) -> None:
        self._check_room_capacity(conn, question_id)
        room = self.rooms.setdefault(question_id, Room())
        conn.rooms.add(question_id)
        if room.add(user.user_id, conn.conn_id):
            out.send(
                room.conn_ids(except_user=user.user_id),
                event("user_online", {"question_id": question_id, **self._who(user.user_id)}),
            )

    def _leave_room(self, conn: ConnState, question_id: str, out: OutcomeBuilder) -> None:
        conn.rooms.discard(question_id)
        room = self.rooms.get(question_id)
        if room is None or conn.user_id is None:
            return
        if room.remove(conn.user_id, conn.conn_id):
            if conn.user_id in room.typing:
                self._stop_typing(question_id, room, conn.user_id, out)
            out.send(room.conn_ids(), event("user_offline", {"question_id": question_id, **self._who(conn.user_id)}))
        if room.empty:
            del self.rooms[question_id]

    def _stop_typing(self, question_id: str, room: Room, user_id: str, out: OutcomeBuilder) -> None:
        room.typing.pop(user_id, None)
        out.send(
            room.conn_ids(except_user=user_id),
            event("user_stop_typing", {"question_id": question_id, **self._who(user_id)}),
        )


def _send_one(conn_id: int, frame: dict[str, Any]) -> Send:
    return Send((conn_id,), frame)


def _extra(error: ProtocolError) -> dict[str, Any]:
    return {k: v for k, v in error.extra.items() if k != "id"}
