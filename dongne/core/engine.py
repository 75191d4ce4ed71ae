"""The engine: dongne's sans-I/O core, behind one entry point.

Theory of operation: the driver feeds ``Engine.handle`` one input event at a
time (a connection opened, a frame arrived, a question came back from the
store, a connection went away, a deadline passed, an escalation stage fell
due: ``core.events``) together with ``now`` in milliseconds since the epoch.
Each call updates the in-memory state and returns an ``Outcome``: the rows to
commit and what to do once they are committed (frames to send, connections
to close, escalations to start or cancel, push jobs, log lines, metrics).
The engine never touches a socket, a file or a clock, so every rule here is
tested with plain calls.

Each connection is in an explicit phase (``core.connections``): awaiting
hello, ready, closing. The operations live in components the engine owns:
``Questions`` (asking, answering, escalation), ``Places`` (positions,
nearby, settings), ``Presence`` (rooms, typing), ``Inbox`` (durable events,
receipts, push jobs) and ``Oversight`` (SLOs, slow-response alerts). Every
deadline (typing expiry, slow-response alerts, hello timeouts) is in one
heap, ``next_deadline()``; escalation stages run one trio task per question
in the driver, which asks ``escalation_due()`` and feeds ``EscalationDue``.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from .connections import Call, ConnPhase, ConnState
from .cursors import CursorCodec
from .deadlines import DeadlineKind, Deadlines
from .effects import Action, CancelEscalation, Close, Outcome, OutcomeBuilder, Send, StartEscalation
from .errors import CloseConnection, ProtocolError
from .events import (
    Connected,
    Disconnected,
    EscalationDue,
    Event,
    FrameReceived,
    InboxPruned,
    QuestionChanged,
    QuestionLoaded,
    ReadDone,
    ReadFailed,
    Reloaded,
    RemoteAlerts,
    RemoteMembers,
    RemotePositions,
    RoomRelayed,
    SeqsMoved,
    StageRefused,
    Tick,
    UserLoaded,
    UsersChanged,
    WritesFailing,
    WritesWork,
)
from .freshness import Freshness
from .inbox import Inbox
from .lifecycle import ACTIVE, QuestionStatus
from .limits import OP_CLASSES, request_limiter
from .lists import READ_OPS, Lists, Pending, Retry
from .moderation import Moderation
from .neighbourhood import Neighbourhood
from .oversight import Oversight
from .places import Places, RegionLookup, ServiceArea
from .presence import RELAYED_PRESENCE, Presence
from .protocol import Fields, Request, decode_request, reply_error, reply_ok
from .questions import RELAYED_ANSWER_NEWS, Questions
from .records import Answer, Claims, EscalationProgress, LoadedState, Question, User, stored_progress
from .regions import Hotspot
from .sessions import Sessions
from .settings import CoreSettings
from .text import SpamFilter

__all__ = ["Engine", "LoadedState", "TokenCheck"]

log = logging.getLogger("dongne.engine")


#: Verifies a hello token at ``now_s``; raises ``CloseConnection(4001)``.
TokenCheck = Callable[[object, float], Claims]

_NOTHING = Outcome()

#: The operations that write; refused with ``unavailable`` while commits fail.
WRITING_OPS = frozenset(
    {
        "create_question",
        "create_answer",
        "accept_answer",
        "close_question",
        "mark_read",
        "update_settings",
        "mark_notifications_read",
        "delete_question",
        "delete_answer",
        "ban_user",
        "unban_user",
        "hide_question",
        "hide_answer",
        "unhide_question",
        "unhide_answer",
        "report_content",
        "resolve_report",
        "block_ip",
        "unblock_ip",
    }
)
#: Refusals for what a request's fields said: the user can correct them and send it again, so the token the
#: request took from its operation's bucket (``OP_CLASSES``) goes back, or five titles too long in a row
#: would lock a user out of asking for three minutes. The connection's bucket still counts the frame (a
#: flood of bad requests stays a flood). Spam is not among them: it counts, as any request that reached
#: the state (``not_found``, ``forbidden``, ...) does.
CONTENT_ERRORS = frozenset({"invalid_field", "too_long", "invalid_location", "outside_service_area"})
#: What ``unavailable`` replies suggest as ``retry_after_ms``: about when the store is probed next.
UNAVAILABLE_RETRY_MS = 1000
#: How often memory looks for ended questions to let go (``Questions.cool_down``).
COOLING_EVERY_MS = 3_600_000


def _default_new_id(prefix: str, now: int) -> str:
    # Time-ordered: 12 hex digits of milliseconds, then 8 random hex digits.
    return f"{prefix}{now:012x}{secrets.token_hex(4)}"


class Engine:
    """All of dongne's rules, fed events, returning effects.

    Args:
        settings: everything the engine is configured with.
        check_token: verifies a hello token.
        region_of: names the service region of a point, ``None`` outside;
            when omitted every point is in service.
        new_id: makes ids, ``new_id(prefix, now)``; injectable for tests.
        hotspots: named places for hotspot statistics.
        region_names: the service regions (``browse_questions`` accepts no other).
        cursor_key: signs page cursors; derive it from the server's secret so
            that cursors survive restarts (random when omitted).
    """

    def __init__(
        self,
        settings: CoreSettings,
        check_token: TokenCheck,
        *,
        region_of: RegionLookup | None = None,
        new_id: Callable[[str, int], str] = _default_new_id,
        hotspots: Iterable[Hotspot] = (),
        region_names: Iterable[str] | None = None,
        cursor_key: bytes | None = None,
    ) -> None:
        self.settings = settings
        self._check_token = check_token
        #: Other nodes write to the same store (PostgreSQL; the app sets it): a hello for a user not in
        #: memory reads the user's row first (``Outcome.load_user``), since another node may have made it.
        self.shared_store = False
        limits = settings.limits
        self.limiter = request_limiter(limits, settings.moderation)
        self.users: dict[str, User] = {}
        self.questions: dict[str, Question] = {}
        self.answers: dict[str, dict[str, Answer]] = {}  # question id -> answer id -> answer
        self.conns: dict[int, ConnState] = {}
        self.user_conns: dict[str, set[int]] = {}
        self._deadlines = Deadlines()
        # When memory next looks for ended questions to let go (Questions.cool_down): at the first
        # event handled after it, so that an idle server (and a test's autojump clock) has no timer for it.
        self._next_cooling = 0
        self.writable = True  # False while commits fail (WritesFailing .. WritesWork)
        self._write_error: str | None = None
        self._hello_timeout_ms = None if math.isinf(settings.hello_timeout_s) else int(settings.hello_timeout_s * 1000)
        self.where = Neighbourhood(settings.location, settings.stages, hotspots)
        area = ServiceArea(region_of)
        self.presence = Presence(
            self._who,
            self._deadlines,
            rooms_per_connection=limits.rooms_per_connection,
            typing_ttl_ms=int(settings.engine.typing_ttl_s * 1000),
        )
        self.freshness = Freshness()  # store-only changes of questions out of memory, against stale reads
        self.inbox = Inbox(self.users, self.user_conns, self.answers, self.freshness)
        self.oversight = Oversight(
            settings.alerts, self._deadlines, self.inbox, self.where, self.questions, self.counts
        )
        self._qa = Questions(
            settings.engine,
            new_id,
            SpamFilter(settings.content.spam_patterns),
            area,
            self.presence,
            self.inbox,
            self.oversight,
            self.where,
            users=self.users,
            questions=self.questions,
            answers=self.answers,
            user_conns=self.user_conns,
            conns=self.conns,
            alerts_per_batch=settings.alerts_per_batch,
            deadlines=self._deadlines,
            ttl_ms=None if math.isinf(settings.questions.ttl_s) else int(settings.questions.ttl_s * 1000),
            keep_ms=int(max(settings.engine.hot_question_days, settings.alerts.slo_window_days) * 86_400_000),
            freshness=self.freshness,
        )
        cursors = CursorCodec(cursor_key or secrets.token_bytes(32))
        self.moderation = Moderation(
            settings.moderation,
            self._qa,
            self.inbox,
            new_id,
            cursors,
            self._deadlines,
            tuple(limits.ip_blocklist),
            users=self.users,
            questions=self.questions,
            conns=self.conns,
            user_conns=self.user_conns,
            where=self.where,
            freshness=self.freshness,
        )
        self.sessions = Sessions(
            check_token,
            limits.connections_per_user,
            users=self.users,
            user_conns=self.user_conns,
            where=self.where,
            oversight=self.oversight,
            moderation=self.moderation,
            inbox=self.inbox,
            presence=self.presence,
        )
        lists = Lists(
            cursors,
            users=self.users,
            questions=self.questions,
            answers=self.answers,
            answer_wire=self._qa.answer_wire,
            unread=self.inbox.unread,
            region_names=frozenset(region_names) if region_names is not None else None,
        )
        self._ops: dict[str, Callable[[Call], dict[str, Any] | Pending]] = {
            **self._qa.operations(),
            **Places(self.where, area, self.questions, self.user_conns).operations(),
            **lists.operations(),
            **self.moderation.operations(),
            "mark_notifications_read": self.inbox.mark_read,
            "get_profile": self.sessions.get_profile,
            "ping": self.sessions.ping,
            "metrics": self.oversight.metrics_op,
        }

    # ---- start-up --------------------------------------------------------------------

    def load(self, state: LoadedState, now: int) -> Outcome:
        """Adopt the durable state read from the store at start-up.

        Returns:
            A ``StartEscalation`` for every question with stages left
            (overdue ones run at once), and the run-time IP blocks in force.
        """
        where = self.where
        self.moderation.ban_ends.clear()  # a reload reads them again
        self.freshness.reloaded()  # memory is the store's again: a read begun before may predate it
        # First: it starts the answers not yet delivered over, and the answers below are tracked again.
        self.inbox.restore(state.last_push_job_id, state.oldest_seqs)
        for user in state.users:
            self.users[user.user_id] = user
            where.refresh_local(user, now)
            self.moderation.ban_will_end(user, now)
            self.oversight.role_is(user)
        notified: dict[str, list[str]] = {}
        for question_id, user_id, at in state.notified:
            notified.setdefault(question_id, []).append(user_id)
            where.ledger.record_alert(user_id, at)
        for question in state.questions:
            self.oversight.asked(question)
            if question.status == QuestionStatus.EXPIRED:  # counted, and out of memory at once, as at run time
                where.question_asked(question)
                continue
            self.questions[question.question_id] = question
            self.answers.setdefault(question.question_id, {})
            if question.status not in ACTIVE:
                where.question_asked(question)  # ended since: still asked within the hotspot and trending windows
            else:
                where.question_opened(question)
                asker = self.users.get(question.asker_id)
                banned = asker is not None and asker.banned_at(now)
                if question.question_id in state.escalations:
                    run, stopped = stored_progress(state.escalations[question.question_id])
                    if stopped:  # for good: nothing takes it up again
                        where.stopped[question.question_id] = run
                    elif not banned:  # a ban stops escalating for good
                        where.restore_escalation(
                            question.question_id,
                            run,
                            notified.get(question.question_id, ()),
                            state.notified_per_stage.get(question.question_id, {}),
                        )
        for answer in state.answers:
            self._qa.adopt_answer(answer)
        for asker_id, question_id, answer_id, author_id in state.undelivered:
            self.inbox.track_stored(asker_id, question_id, answer_id, author_id)
        for question in state.questions:
            self._qa.schedule_expiry(question)
        blocks = self.moderation.load(state.open_reports, state.ip_blocks, now)
        for block in state.ip_blocks:
            if block.until is not None:
                self._deadlines.add(block.until, "ip_block", block.cidr)
        return Outcome(actions=self._start_escalations().actions + blocks.actions)

    def _start_escalations(self) -> Outcome:
        """A ``StartEscalation`` for every question with stages left (the driver skips running ones)."""
        out = OutcomeBuilder()
        for question_id in sorted(self.where.escalations):
            question = self.questions[question_id]
            if self.where.escalation_due(question) is not None:
                out.act(StartEscalation(question_id, self._qa.escalation_until(question)))
        return out.build()

    # ---- the entry point ---------------------------------------------------------------

    def handle(self, event: Event, now: int) -> Outcome:
        """Handle one input event at ``now`` (ms since the epoch)."""
        if self.moderation.ban_ends and self.moderation.ban_ends[0][0] <= now:
            self.moderation.bans_ended(now)
        if now >= self._next_cooling:
            self._next_cooling = now + COOLING_EVERY_MS
            self._qa.cool_down(now)
        if isinstance(event, FrameReceived):
            return self._frame(event, now)
        if isinstance(event, EscalationDue):
            return self._escalation_due(event.question_id, now)
        if isinstance(event, StageRefused):
            return self._stage_refused(event)
        if isinstance(event, Tick):
            return self._tick(now)
        if isinstance(event, Connected):
            self.conns[event.conn_id] = ConnState(event.conn_id)
            if self._hello_timeout_ms is not None:
                self._deadlines.add(now + self._hello_timeout_ms, "hello", str(event.conn_id))
            return _NOTHING
        if isinstance(event, ReadDone):
            return self._read_done(event, now)
        if isinstance(event, ReadFailed):
            return self._read_failed(event.conn_id)
        if isinstance(event, QuestionLoaded):
            return self._question_loaded(event, now)
        if isinstance(event, UserLoaded):
            return self._user_loaded(event, now)
        if isinstance(event, QuestionChanged):
            out = OutcomeBuilder()
            self._qa.refresh(event.question_id, event.question, event.answers, out)
            if event.escalation is not None:
                self._take_up_escalation(event.question_id, event.escalation, now, out)
            return out.build()
        if isinstance(event, RoomRelayed):
            return self._room_relayed(event, now)
        if isinstance(event, UsersChanged):
            return self._users_changed(event.users, now)
        if isinstance(event, InboxPruned):
            for user_id, seq in event.oldest.items():  # only grows: a read from before a prune may come late
                self.inbox.oldest[user_id] = max(seq, self.inbox.oldest.get(user_id, 0))
            return _NOTHING
        if isinstance(event, SeqsMoved):
            for user_id, seq in event.heads.items():
                user = self.users.get(user_id)
                if user is not None:
                    user.last_seq = seq
            return _NOTHING
        if isinstance(event, RemotePositions):
            self._adopt(event.users, now)
            self.where.remote_moved(event.moved, event.gone, everyone=event.everyone)
            return _NOTHING
        if isinstance(event, RemoteAlerts):
            self.where.remote_alerts(event.alerts)
            return _NOTHING
        if isinstance(event, RemoteMembers):
            self._adopt(event.users, now)
            self.presence.remote_members(event.rooms, everyone=event.everyone)
            return _NOTHING
        if isinstance(event, Disconnected):
            return self._disconnected(event.conn_id, now)
        if isinstance(event, WritesFailing):
            return self._writes_failing(event.error, now)
        if isinstance(event, Reloaded):
            return self._reloaded(event, now)
        if isinstance(event, WritesWork):
            return self._writes_work(event.confirmed, now)
        raise TypeError(f"not an engine event: {event!r}")

    # ---- queries ---------------------------------------------------------------------

    def next_deadline(self) -> int | None:
        """When ``Tick`` next has work to do (ms since the epoch), if ever.

        Deadlines that no longer apply are dropped here as they reach the
        front: a hello timeout whose connection said hello (or closed), a
        typing state renewed or stopped since. Every connection leaves a hello
        timeout behind, every typing renewal a deadline, and each would wake
        the driver for a ``Tick`` with nothing to do (10,000 connections made
        within seconds cost ~9% of a core for the 10 s after).
        """
        deadlines = self._deadlines
        while (first := deadlines.first()) is not None and not self._applies(*first):
            deadlines.drop_first()
        return deadlines.next()

    def _applies(self, due: int, kind: str, key: str, subkey: str) -> bool:
        """Whether a deadline still has work for ``Tick`` (those whose check is cheap; the rest are kept)."""
        if kind == "hello":
            return self._awaiting_hello(key) is not None
        if kind == "typing":
            return self.presence.typing_ends_at(key, subkey, due)
        if kind == "remote_typing":
            return self.presence.remote_typing_ends_at(key, subkey, due)
        return True

    def _awaiting_hello(self, key: str) -> ConnState | None:
        """The connection a hello timeout's key names, if it is still waiting for its hello."""
        conn = self.conns.get(int(key))
        return conn if conn is not None and conn.phase is ConnPhase.AWAITING_HELLO else None

    def escalation_due(self, question_id: str) -> int | None:
        """When the question's next escalation stage is due (ms), or None when none is left."""
        question = self.questions.get(question_id)
        return None if question is None else self.where.escalation_due(question)

    def follows_escalation(self, question_id: str) -> bool:
        """Whether the engine keeps the question's escalation progress (else another node's news may bring it)."""
        return question_id in self.where.escalations or question_id in self.where.stopped

    def _take_up_escalation(
        self, question_id: str, progress: EscalationProgress, now: int, out: OutcomeBuilder
    ) -> None:
        """Follow the escalation of an active question another node asked, as the store holds it (``load``
        does the same for every question): its alerts count towards the caps; stages left get started."""
        question = self.questions.get(question_id)
        where = self.where
        if (
            question is None
            or question.status not in ACTIVE
            or self.follows_escalation(question_id)
            or not where.stages
        ):
            return
        run, stopped = stored_progress(progress.next_stage)
        if stopped:  # for good: nothing to take up, and its next news does not read the progress again
            where.stopped[question_id] = run
            return
        if run >= len(where.stages):
            # Every stage has run (here too, perhaps: its alerts are counted already): nothing to take up;
            # held as done, so that its next news does not read the progress again (who was alerted kept
            # for the count a slow-response alert reports).
            where.restore_escalation(question_id, run, (user_id for user_id, _ in progress.notified))
            return
        asker = self.users.get(question.asker_id)
        if asker is not None and asker.banned_at(now):
            return  # a ban stops escalating for good
        for user_id, at in progress.notified:
            where.ledger.record_alert(user_id, at)
        where.restore_escalation(question_id, run, (user_id for user_id, _ in progress.notified), progress.per_stage)
        if where.escalation_due(question) is not None:
            out.act(StartEscalation(question_id, self._qa.escalation_until(question)))

    def user_of(self, conn_id: int) -> str | None:
        conn = self.conns.get(conn_id)
        return conn.user_id if conn else None

    def counts(self) -> dict[str, int]:
        return {
            "connections": len(self.conns),
            "users_online": len(self.user_conns),
            "locals_online": len(self.where.live),
            "open_questions": sum(1 for q in self.questions.values() if q.status in ACTIVE),
        }

    def overview(self, now: int) -> dict[str, Any]:
        """What the admin dashboard shows."""
        return self.oversight.overview(now)

    # ---- frames ----------------------------------------------------------------------

    def _frame(self, event: FrameReceived, now: int) -> Outcome:
        conn = self.conns.get(event.conn_id)
        if conn is None or conn.phase is ConnPhase.CLOSING:
            return _NOTHING
        ready = conn.phase is ConnPhase.READY
        if event.text:
            if not ready:
                return self._close(conn, 4001, "the first frame must be hello", op="invalid")
            error = ProtocolError("bad_frame", "text frames are not accepted; send binary msgpack")
            return self._refuse_frame(conn, None, error, now)
        try:
            request = decode_request(event.payload)
        except ProtocolError as exc:
            if not ready:
                return self._close(conn, 4001, "the first frame must be hello", op="invalid")
            rid = exc.extra.get("id")
            return self._refuse_frame(conn, rid if isinstance(rid, int) else None, exc, now)
        op = request.op
        label = op if op == "hello" or op in self._ops else "unknown"
        wait = self.limiter.take("conn", f"c{conn.conn_id}", now)
        if ready and not wait and op in OP_CLASSES:
            wait = self.limiter.take(OP_CLASSES[op], f"u{conn.user_id}", now)
        if wait:
            if self.limiter.refused(f"c{conn.conn_id}", now):
                return self._close(conn, 4008, "rate limits exceeded again and again", op=label)
            error = ProtocolError("rate_limited", "too many requests; slow down", retry_after_ms=wait)
            return self._refuse(conn.conn_id, request.id, error, label)
        if not ready:
            if op != "hello":
                return self._close(conn, 4001, "the first frame must be hello", op=label)
            return self._hello(conn, request, now)
        if op == "hello":
            return self._refuse(
                conn.conn_id, request.id, ProtocolError("already_authenticated", "hello was already sent"), label
            )
        if label == "unknown":
            return self._refuse(
                conn.conn_id, request.id, ProtocolError("unknown_op", f"unknown operation {op[:40]!r}"), label
            )
        question_id = request.data.get("question_id")
        if (
            op not in READ_OPS
            and isinstance(question_id, str)
            and 0 < len(question_id) <= 64
            and question_id not in self.questions
        ):
            # Not in memory (older than the hot set, or no such question): ask the driver.
            return self._load_question(conn, request, question_id, label)
        return self._run(conn, request, now, label)

    def _load_question(self, conn: ConnState, request: Request, question_id: str, label: str) -> Outcome:
        conn.waiting, conn.waiting_since = request, self.freshness.now
        return Outcome(op=label, load_question=question_id)

    def _question_loaded(self, event: QuestionLoaded, now: int) -> Outcome:
        conn = self.conns.get(event.conn_id)
        if conn is None or conn.waiting is None:
            return _NOTHING
        request, conn.waiting = conn.waiting, None
        if conn.phase is not ConnPhase.READY:
            return _NOTHING
        if event.question is not None:
            question_id = event.question.question_id
            if question_id not in self.questions and self.freshness.stale(question_id, conn.waiting_since):
                # Changed in the store since this copy was read (hidden, say): adopting it would serve the
                # question as it was to everyone, and write it back. Read it again.
                return self._load_question(conn, request, question_id, request.op)
            self._adopt(event.users, now)
            self._qa.adopt(event.question, event.answers)
        return self._run(conn, request, now, request.op)

    def _run(self, conn: ConnState, request: Request, now: int, label: str, *, retry: Retry | None = None) -> Outcome:
        assert conn.user_id is not None
        if not self.writable and request.op in WRITING_OPS:
            # Checked here, not on arrival only: a store read may have been in flight when writes began to fail.
            error = ProtocolError(
                "unavailable",
                "writes are failing on the server; nothing was changed",
                retry_after_ms=UNAVAILABLE_RETRY_MS,
            )
            self._give_back(conn, request.op)  # nothing of it counted: retried through an outage, it does not
            return self._refuse(conn.conn_id, request.id, error, label)
        out = OutcomeBuilder()
        call = Call(conn, self.users[conn.user_id], request, Fields(request.data), now, out)
        if retry is not None:
            call.retried, call.found = True, retry.found
        try:
            data = self._ops[request.op](call)
        except ProtocolError as exc:
            if exc.code in CONTENT_ERRORS:
                self._give_back(conn, request.op)
            return self._refuse(conn.conn_id, request.id, exc, label)
        except Exception:  # a bug: the client gets "internal", the connection and the server stay up
            log.exception("request_failed", extra={"conn": conn.conn_id, "op": request.op, "user": conn.user_id})
            error = ProtocolError("internal", "internal error; the request was not applied")
            return self._refuse(conn.conn_id, request.id, error, label)
        if isinstance(data, Pending):
            conn.reading = (request, data.finish)
            return Outcome(op=label, read=data.read, request=(conn.conn_id, request.id))
        # The reply goes first: a client sees its own request acknowledged
        # before the events it caused.
        out.actions.insert(0, Send((conn.conn_id,), reply_ok(request.id, data)))
        return out.build(label, request=(conn.conn_id, request.id))

    def _user_loaded(self, event: UserLoaded, now: int) -> Outcome:
        """A hello's user as stored: added (as another node's news would add it), then the hello."""
        conn = self.conns.get(event.conn_id)
        if conn is None or conn.waiting is None or conn.phase is not ConnPhase.AWAITING_HELLO:
            return _NOTHING
        request, conn.waiting = conn.waiting, None
        if event.user is not None and event.user.user_id not in self.users:
            self._users_changed((event.user,), now)  # nothing to act on: the user was not held
        if event.user is not None and event.oldest_seq is not None:
            self.inbox.oldest[event.user.user_id] = event.oldest_seq
        return self._hello(conn, request, now, loaded=True)

    def _read_failed(self, conn_id: int) -> Outcome:
        conn = self.conns.get(conn_id)
        if conn is None:
            return _NOTHING
        waited = conn.reading[0] if conn.reading is not None else conn.waiting
        conn.reading = conn.waiting = None
        if waited is None:
            return _NOTHING
        if conn.phase is ConnPhase.AWAITING_HELLO:  # a hello's user could not be read
            return self._close(conn, 1013, "the server cannot read your profile now; reconnect later", op="hello")
        error = ProtocolError("internal", "internal error; the request was not applied")
        return self._refuse(conn_id, waited.id, error, waited.op)

    def _read_done(self, event: ReadDone, now: int) -> Outcome:
        conn = self.conns.get(event.conn_id)
        if conn is None or conn.reading is None:
            return _NOTHING
        (request, finish), conn.reading = conn.reading, None
        if conn.phase is not ConnPhase.READY:
            return _NOTHING
        try:
            data = finish(event.rows)
        except ProtocolError as exc:
            if exc.code in CONTENT_ERRORS:
                self._give_back(conn, request.op)
            return self._refuse(conn.conn_id, request.id, exc, request.op)
        except Exception:  # a bug: the client gets "internal", as in _run
            log.exception("request_failed", extra={"conn": conn.conn_id, "op": request.op, "user": conn.user_id})
            return self._refuse(conn.conn_id, request.id, ProtocolError("internal", "internal error"), request.op)
        if isinstance(data, Retry):
            return self._run(conn, request, now, request.op, retry=data)
        return Outcome(
            actions=(Send((conn.conn_id,), reply_ok(request.id, data)),),
            op=request.op,
            request=(conn.conn_id, request.id),
        )

    def _give_back(self, conn: ConnState, op: str) -> None:
        """Return the token a request took from its operation's bucket (``OP_CLASSES``): it did not count (refused
        for its fields, ``CONTENT_ERRORS``, or ``unavailable``, nothing of it applied)."""
        kind = OP_CLASSES.get(op)
        if kind is not None and conn.user_id is not None:
            self.limiter.give_back(kind, f"u{conn.user_id}")

    def not_applied(self, conn_id: int, op: str) -> None:
        """The driver refused a request the engine had decided (``unavailable``: its commit failed, or it was
        decided on memory holding writes that were refused): its operation's token goes back, as for a request
        refused while writes fail, so a client retrying through an outage is not rate-limited after it."""
        conn = self.conns.get(conn_id)
        if conn is not None:
            self._give_back(conn, op)

    def _refuse(self, conn_id: int, request_id: int | None, error: ProtocolError, label: str = "") -> Outcome:
        """An error reply to one request (or to a frame that was not one)."""
        extra = {k: v for k, v in error.extra.items() if k != "id"}
        frame = reply_error(request_id, error.code, error.message, **extra)
        return Outcome(actions=(Send((conn_id,), frame),), op=label, error=error.code)

    def _refuse_frame(self, conn: ConnState, request_id: int | None, error: ProtocolError, now: int) -> Outcome:
        """An error reply to a frame that could not be read; floods of them count as abuse."""
        if self.limiter.take("conn", f"c{conn.conn_id}", now) and self.limiter.refused(f"c{conn.conn_id}", now):
            return self._close(conn, 4008, "too many bad frames", op="invalid")
        return self._refuse(conn.conn_id, request_id, error, "invalid")

    def _close(self, conn: ConnState, code: int, reason: str, *, op: str = "") -> Outcome:
        conn.phase = ConnPhase.CLOSING
        return Outcome(actions=(Close(conn.conn_id, code, reason),), op=op, error=f"close_{code}")

    # ---- hello ---------------------------------------------------------------------

    def _hello(self, conn: ConnState, request: Request, now: int, *, loaded: bool = False) -> Outcome:
        if self.shared_store and not loaded:
            try:
                user_id: str | None = self._check_token(request.data.get("token"), now / 1000).user_id
            except CloseConnection:
                user_id = None  # refused below
            if user_id is not None and (user_id not in self.users or self._resumes_a_gap(user_id, request)):
                # Another node may have made the user, or pruned the events a resume asks for: read first.
                conn.waiting = request
                return Outcome(op="hello", load_user=user_id)
        refused = self.sessions.hello(conn, request, now, writable=self.writable)
        if isinstance(refused, tuple):
            return self._close(conn, *refused, op="hello")
        return refused

    def _resumes_a_gap(self, user_id: str, request: Request) -> bool:
        """Whether the hello resumes from before the user's newest event (its replay may meet pruned ones)."""
        resume = request.data.get("resume")
        seq = resume.get("last_seq") if isinstance(resume, dict) else None
        return isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < self.users[user_id].last_seq

    # ---- leaving ---------------------------------------------------------------------

    def _disconnected(self, conn_id: int, now: int) -> Outcome:
        """Forget a connection: leave its rooms (presence), drop its typing."""
        conn = self.conns.pop(conn_id, None)
        self.limiter.forget(f"c{conn_id}")
        if len(self.limiter) > 10_000:
            self.limiter.sweep(now)
        if conn is None or conn.user_id is None:
            return _NOTHING
        return self.sessions.left(conn)

    # ---- time ------------------------------------------------------------------------

    def _tick(self, now: int) -> Outcome:
        """Do what is due at ``now``: end typing states, raise slow-response alerts, close silent connections.

        What is live (typing ends, hello deadlines, IP blocks) and what is
        written (expiries, alerts) go in separate ticks: a tick's outcome is
        dropped whole if its commit fails (the reload makes the writes due
        again), and the live part would be lost with it. When both are due,
        the writes wait for the next tick, at once.
        """
        out = OutcomeBuilder()
        writes_due: list[tuple[int, DeadlineKind, str, str]] = []
        for due, kind, key, subkey in self._deadlines.pop_due(now):
            if kind == "typing":
                self.presence.typing_expired(key, subkey, due, out)
            elif kind == "remote_typing":
                self.presence.remote_typing_expired(key, subkey, due)
            elif kind in ("expire", "slow_response"):
                writes_due.append((due, kind, key, subkey))
            elif kind == "ip_block":
                out.actions.extend(self.moderation.blocks_in_force(now).actions)
            else:
                conn = self._awaiting_hello(key)
                if conn is not None:
                    conn.phase = ConnPhase.CLOSING
                    out.act(Close(conn.conn_id, 4001, "no hello within the time limit"))
        if writes_due and out.actions:
            for entry in writes_due:
                self._deadlines.add(*entry)
            return out.build()
        for _due, kind, key, _subkey in writes_due:
            if not self.writable:  # a write: it waits, it is not lost
                self._deadlines.add(now + UNAVAILABLE_RETRY_MS, kind, key)
            elif kind == "expire":
                self._qa.expire(key, now, out)
            else:
                self.oversight.alert_due(key, now, out)
        return out.build()

    def _escalation_due(self, question_id: str, now: int) -> Outcome:
        """Run every stage of the question's escalation that is due at ``now``."""
        out = OutcomeBuilder()
        question = self.questions.get(question_id)
        if question is not None and self.writable:  # otherwise the stage runs late, once writes work
            # Guarded: another node may have ended the question before its news came (StageRefused).
            self._qa.run_due_stages(question, now, out, guarded=True)
        return out.build()

    def _stage_refused(self, event: StageRefused) -> Outcome:
        """A stage's commit was refused, the question having ended in the store: its alerts are taken back
        (the hourly caps, the seqs), and the question's escalation ends here. Its news (the end) comes as
        for any change another node made.

        Each refused alert's seq is taken back from its user's head, whatever the engine numbered after it:
        PostgreSQL's commits number the user's later events from the store's head (``SeqsGiven``), each one
        lower by the refused alerts before it, so the head the engine tells (``hello``'s ``last_seq`` and
        ``unread``) is the store's.
        """
        out = OutcomeBuilder()
        for user_id, seq in sorted(event.seqs, key=lambda item: -item[1]):
            user = self.users.get(user_id)
            if user is not None and user.last_seq >= seq:
                user.last_seq -= 1
        if self.where.stage_refused(event.question_id, event.alerted):
            out.act(CancelEscalation(event.question_id))
        out.note("escalation_stage_refused", question_id=event.question_id, alerts=len(event.alerted))
        return out.build()

    # ---- storage faults ----------------------------------------------------------------

    def _writes_failing(self, error: str, now: int) -> Outcome:
        """Commits fail: refuse writes from now on and tell the admins (live: nothing can be stored), once
        an outage: not again when writes taken on trial fail (``WritesWork``)."""
        self.writable = False
        if self._write_error is not None:
            return _NOTHING
        self._write_error = error
        return self.oversight.storage_alert("failing", error, now, self.user_conns)

    def _writes_work(self, confirmed: bool, now: int) -> Outcome:
        actions: tuple[Action, ...] = ()
        if not self.writable:
            self.writable = True
            # Escalations whose tasks ended while writes failed run their overdue stages now.
            actions = self._start_escalations().actions
        if confirmed and self._write_error is not None:
            error, self._write_error = self._write_error, None
            actions = self.oversight.storage_alert("recovered", error, now, self.user_conns).actions + actions
        return Outcome(actions=actions) if actions else _NOTHING

    def _reloaded(self, event: Reloaded, now: int) -> Outcome:
        """Rebuild the durable state from the database after a failed commit.

        The failed commit's requests (and those queued behind it) changed
        memory before their writes failed; the database holds what really
        happened. Live state stays: connections, rooms, positions, typing.
        A connection whose user the database does not know (its first hello
        was in the failed commit) is closed with 1013, to come back later.
        """
        self.users.clear()
        self.questions.clear()
        self.answers.clear()
        self.where.forget_durable()
        self.oversight.forget_durable()
        self._qa.forget_durable()
        started = self.load(event.state, now)
        out = OutcomeBuilder()
        out.actions.extend(started.actions)
        for question_id in [q for q in self.presence.rooms if q not in self.questions]:
            self.presence.drop_room(question_id, self.conns)
        for conn in self.conns.values():
            if conn.user_id is None:
                continue
            user = self.users.get(conn.user_id)
            if user is None and conn.phase is ConnPhase.READY:
                conn.phase = ConnPhase.CLOSING
                out.act(Close(conn.conn_id, 1013, "the server lost your profile to a storage failure; reconnect"))
            elif user is not None and conn.phase is ConnPhase.CLOSING and not user.banned_at(now):
                # Its close may have been decided with a write that was refused
                # (a ban): it is a connection like the others again.
                conn.phase = ConnPhase.READY
        out.note("state_reloaded", users=len(self.users), questions=len(self.questions))
        return out.build()

    # ---- other nodes' changes (store/CLUSTER.md) -------------------------------------------

    def _adopt(self, users: tuple[User, ...], now: int) -> None:
        """Add the users another node made since this one loaded (read with its positions or room members)."""
        for user in users:
            if user.user_id not in self.users:
                self.users[user.user_id] = user
                self.where.refresh_local(user, now)
                self.oversight.role_is(user)

    def _room_relayed(self, event: RoomRelayed, now: int) -> Outcome:
        """Another node's room event, to this node's members of the room."""
        question_id, data = event.question_id, event.data
        if data.get("question_id") != question_id:
            return _NOTHING
        if event.kind == "new_answer":
            if not isinstance(data.get("answer"), dict):  # too large to relay: from memory, if read by now
                answer = self.answers.get(question_id, {}).get(str(data.get("answer_id")))
                if answer is None:
                    return _NOTHING
                data = {"question_id": question_id, "answer": self._qa.answer_wire(answer)}
        elif event.kind not in RELAYED_PRESENCE and event.kind not in RELAYED_ANSWER_NEWS:
            return _NOTHING
        out = OutcomeBuilder()
        self.presence.relayed(question_id, event.kind, data, now, out)
        return out.build()

    def _users_changed(self, users: tuple[User, ...], now: int) -> Outcome:
        """Merge users' rows another node may have changed: settings and bans hold here too."""
        out = OutcomeBuilder()
        for user in users:
            held = self.users.get(user.user_id)
            if held is None:
                self.users[user.user_id] = held = attrs.evolve(user)
            else:
                was_banned = held.banned_at(now)
                # What only grows (this node's own writes may still be on their way): never back.
                last_seq, points, read_seq = held.last_seq, held.points, held.read_seq
                for field in attrs.fields(User):
                    setattr(held, field.name, getattr(user, field.name))
                held.last_seq, held.points = max(last_seq, user.last_seq), max(points, user.points)
                held.read_seq = max(read_seq, user.read_seq)
                if held.banned_at(now) and not was_banned:
                    self.moderation.ban_in_force(held, now, out)
                    continue
            self.where.refresh_local(held, now)
            self.oversight.role_is(held)
        return out.build()

    # ---- helpers ---------------------------------------------------------------------------

    def _who(self, user_id: str) -> dict[str, Any]:
        user = self.users.get(user_id)
        return {"user_id": user_id, "nick": user.nick if user else user_id}
