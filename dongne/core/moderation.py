"""Moderation: bans, hidden content, users' reports, and the audit log of every admin action.

Every operation but ``report_content`` is for admins only (``forbidden`` for
anyone else) and writes an ``audit_log`` row in the same commit as what it
does. A banned user's connections are closed with 4003 at once, a ``hello``
with any token for that user is closed with 4003 until the ban ends, their
open questions stop escalating, and a banned local is alerted for nothing.
Hidden content goes the way an author's delete does (one code path,
``Questions.take_down_*``) and its author is told with a durable
``content_hidden``. ``[moderation] auto_hide_reports`` distinct users
reporting one item hide it at once, pending an admin's review.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from .connections import Call, ConnPhase, ConnState
from .cursors import CursorCodec
from .deadlines import Deadlines
from .effects import (
    AppendAudit,
    BlockAddresses,
    CancelPushes,
    Close,
    CountAnswer,
    DeleteIpBlock,
    Outcome,
    OutcomeBuilder,
    SaveAnswer,
    SaveIpBlock,
    SaveQuestion,
    SaveReport,
    SaveUser,
    StopEscalating,
)
from .errors import ProtocolError
from .freshness import Freshness
from .inbox import Inbox
from .lifecycle import ACTIVE, QuestionEvent, QuestionStatus, advance
from .limits import ip_network
from .lists import Pending, Retry
from .neighbourhood import Neighbourhood
from .questions import Questions
from .reads import AuditPage, ModerationItem, ReportsPage
from .records import Answer, IpBlock, Question, Report, User
from .settings import ModerationSettings

__all__ = ["AUTOMATIC", "BANNED", "FOREVER", "REPORT_REASONS", "Moderation"]

#: The reasons a report may give.
REPORT_REASONS = ("spam", "abuse", "wrong", "other")
#: The ``admin_id`` of the audit entries of what reports did by themselves.
AUTOMATIC = "auto_moderation"

#: ``banned_until`` of a ban without an end.
FOREVER = 2**62
#: The close code of a banned user's connections (PROTOCOL.md: do not retry).
BANNED = 4003


class Moderation:
    """The admins' operations.

    Args:
        users, questions, conns, user_conns: the engine's records (shared).
        where: positions and escalation progress.
    """

    def __init__(
        self,
        settings: ModerationSettings,
        qa: Questions,
        inbox: Inbox,
        new_id: Callable[[str, int], str],
        cursors: CursorCodec,
        deadlines: Deadlines,
        static_blocks: tuple[str, ...],
        *,
        users: dict[str, User],
        questions: dict[str, Question],
        conns: dict[int, ConnState],
        user_conns: dict[str, set[int]],
        where: Neighbourhood,
        freshness: Freshness,
    ) -> None:
        self._settings = settings
        self._freshness = freshness
        self._deadlines = deadlines
        self._static_blocks = static_blocks
        self._qa = qa
        self._inbox = inbox
        self._new_id = new_id
        self._cursors = cursors
        self._users = users
        self._questions = questions
        self._conns = conns
        self._user_conns = user_conns
        self._where = where
        self.open_reports: dict[str, Report] = {}  # report id -> report not resolved yet
        self.ban_ends: list[tuple[int, str]] = []  # a heap of (end, user id) of the timed bans in force
        self.ip_blocks: dict[str, IpBlock] = {}  # run-time blocks by normalised CIDR
        self._stored_as: dict[str, set[str]] = {}  # normalised CIDR -> how its rows were stored (older forms)

    def operations(self) -> dict[str, Callable[[Call], dict[str, Any] | Pending]]:
        return {
            "ban_user": self.ban_user,
            "unban_user": self.unban_user,
            "list_audit": self.list_audit,
            "hide_question": self.hide_question,
            "hide_answer": self.hide_answer,
            "unhide_question": self.unhide_question,
            "unhide_answer": self.unhide_answer,
            "report_content": self.report_content,
            "list_reports": self.list_reports,
            "resolve_report": self.resolve_report,
            "block_ip": self.block_ip,
            "unblock_ip": self.unblock_ip,
            "list_ip_blocks": self.list_ip_blocks,
        }

    def load(self, reports: list[Report], ip_blocks: list[IpBlock], now: int) -> Outcome:
        """Adopt stored reports and IP blocks; returns the blocks for the driver."""
        self.open_reports = {r.report_id: r for r in reports if r.status == "open"}
        # A row stored before IPv4-mapped addresses were normalised is its IPv4 network now; an unblock deletes
        # every row that is the same network, as it was stored.
        self.ip_blocks, self._stored_as = {}, {}
        for block in sorted((b for b in ip_blocks if b.active(now)), key=lambda b: b.created_at):
            cidr = _network(block.cidr)
            self._stored_as.setdefault(cidr, set()).add(block.cidr)
            self.ip_blocks[cidr] = attrs.evolve(block, cidr=cidr)  # the newest of them, as listed
        return self.blocks_in_force(now)

    # ---- IP blocks -----------------------------------------------------------------------

    def blocks_in_force(self, now: int) -> Outcome:
        """Forget run-time blocks that ran out; a ``BlockAddresses`` with those in force."""
        for cidr in [c for c, b in self.ip_blocks.items() if not b.active(now)]:
            del self.ip_blocks[cidr]
        return Outcome(actions=(BlockAddresses(tuple(sorted(self.ip_blocks))),))

    def block_ip(self, call: Call) -> dict[str, Any]:
        self._admin(call)
        f, now = call.f, call.now
        cidr = _network(f.string("cidr", max_len=64))
        reason = f.text("reason", max_len=500)
        until = f.integer("until", minimum=now + 1, maximum=FOREVER - 1) if f.has("until") else None
        block = IpBlock(cidr, until, reason, call.user.user_id, now)
        self.ip_blocks[cidr] = block
        self._stored_as.setdefault(cidr, set()).add(cidr)
        call.out.write(SaveIpBlock(block))
        call.out.write(AppendAudit(now, call.user.user_id, "block_ip", cidr, reason))
        if until is not None:
            self._deadlines.add(until, "ip_block", cidr)
        call.out.actions.extend(self.blocks_in_force(now).actions)
        return {"block": _block_wire(block)}

    def unblock_ip(self, call: Call) -> dict[str, Any]:
        self._admin(call)
        cidr = _network(call.f.string("cidr", max_len=64))
        reason = call.f.text("reason", max_len=500, min_len=0, default="")  # checked before anything changes
        block = self.ip_blocks.pop(cidr, None)
        if block is None:
            raise ProtocolError("not_found", "no such run-time block (blocks in config.toml stay)")
        for stored in sorted(self._stored_as.pop(cidr, {block.cidr})):
            call.out.write(DeleteIpBlock(stored))  # its rows, as they were stored
        call.out.write(AppendAudit(call.now, call.user.user_id, "unblock_ip", cidr, reason))
        call.out.actions.extend(self.blocks_in_force(call.now).actions)
        return {"cidr": cidr}

    def list_ip_blocks(self, call: Call) -> dict[str, Any]:
        self._admin(call)
        self.blocks_in_force(call.now)
        return {
            "blocks": [_block_wire(b) for b in sorted(self.ip_blocks.values(), key=lambda b: b.created_at)],
            "static": list(self._static_blocks),
        }

    def refuse_banned(self, user: User, now: int) -> tuple[int, str] | None:
        """The close code and reason for a ``hello`` of a banned user, or None."""
        if not user.banned_at(now):
            return None
        until = "for good" if user.banned_until == FOREVER else f"until {user.banned_until}"
        return BANNED, f"banned {until}: {user.ban_reason or ''}"[:120]

    # ---- operations --------------------------------------------------------------

    def _admin(self, call: Call) -> None:
        if call.user.role != "admin":
            raise ProtocolError("forbidden", f"{call.request.op} is an admin operation")

    def _target(self, call: Call) -> User:
        user = self._users.get(call.f.ident("user_id"))
        if user is None:
            raise ProtocolError("not_found", "no such user")
        return user

    def ban_user(self, call: Call) -> dict[str, Any]:
        self._admin(call)
        f, now = call.f, call.now
        target = self._target(call)
        reason = f.text("reason", max_len=500)
        until = f.integer("until", minimum=now + 1, maximum=FOREVER - 1) if f.has("until") else FOREVER
        if target.user_id == call.user.user_id:
            raise ProtocolError("forbidden", "you cannot ban yourself")
        self._ban(target, reason, until, call)
        # None: until unban_user (FOREVER is above 2**53, which JavaScript numbers cannot hold exactly).
        return {"user_id": target.user_id, "banned_until": None if until == FOREVER else until}

    def _ban(self, target: User, reason: str, until: int, call: Call) -> None:
        now, out = call.now, call.out
        target.banned_until, target.ban_reason = until, reason
        out.write(SaveUser(attrs.evolve(target), changed={"ban"}))
        out.write(AppendAudit(now, call.user.user_id, "ban_user", target.user_id, reason))
        out.note("user_banned", user=target.user_id, admin=call.user.user_id, until=until)
        out.write(CancelPushes(now, user_id=target.user_id))  # none of what waits for them is pushed
        # Their questions escalate no more, for good, in the store: those memory here does not follow too
        # (another node's, its news not come yet), which the node running them may take up again.
        out.write(StopEscalating(now, asker_id=target.user_id))
        self.ban_in_force(target, now, out)

    def ban_in_force(self, target: User, now: int, out: OutcomeBuilder) -> None:
        """A ban was just set (here, or on another node: ``UsersChanged``): close the user's connections with
        4003, stop escalating their questions, alert them no more."""
        self._where.refresh_local(target, now)  # a banned local is alerted for nothing
        self.ban_will_end(target, now)
        code, why = self.refuse_banned(target, now) or (BANNED, "banned")
        for conn_id in sorted(self._user_conns.get(target.user_id, ())):
            conn = self._conns.get(conn_id)
            if conn is not None and conn.phase is ConnPhase.READY:
                conn.phase = ConnPhase.CLOSING
                out.act(Close(conn_id, code, why))
        self._stop_escalating(target.user_id, now, out)
        self._inbox.cancel_pushes(now, out, user_id=target.user_id, commit=False)  # the queue here (_ban commits)

    def ban_will_end(self, user: User, now: int) -> None:
        """A timed ban in force: its local is one again when it ends (``bans_ended``)."""
        if user.banned_until is not None and now < user.banned_until < FOREVER:
            heapq.heappush(self.ban_ends, (user.banned_until, user.user_id))

    def bans_ended(self, now: int) -> None:
        """The timed bans ended by ``now``: their locals count again (unless banned anew meanwhile).

        Looked at as each event comes in rather than on a timer: no alert
        can be planned between a ban's end and the next event.
        """
        ends = self.ban_ends
        while ends and ends[0][0] <= now:
            _, user_id = heapq.heappop(ends)
            user = self._users.get(user_id)
            if user is not None:
                self._where.refresh_local(user, now)

    def unban_user(self, call: Call) -> dict[str, Any]:
        self._admin(call)
        target = self._target(call)
        reason = call.f.text("reason", max_len=500, default="unbanned")
        target.banned_until, target.ban_reason = None, None
        call.out.write(SaveUser(attrs.evolve(target), changed={"ban"}))
        call.out.write(AppendAudit(call.now, call.user.user_id, "unban_user", target.user_id, reason))
        self._where.refresh_local(target, call.now)
        return {"user_id": target.user_id, "banned_until": None}

    def list_audit(self, call: Call) -> Pending:
        self._admin(call)
        f = call.f
        before = f.integer("before", minimum=1, maximum=2**53, default=0) or None
        limit = f.integer("limit", minimum=1, maximum=100, default=50)

        def reply(rows: list[tuple[int, int, str, str, str, str]]) -> dict[str, Any]:
            entries = [
                {"id": i, "at": at, "admin_id": admin, "action": action, "target": target, "reason": reason}
                for i, at, admin, action, target, reason in rows[:limit]
            ]
            return {"entries": entries, "next": entries[-1]["id"] if len(rows) > limit else None}

        return Pending(AuditPage(before, limit), reply)

    # ---- items: in memory, or read from the store -------------------------------------

    def _item(self, call: Call, kind: str, item_id: str) -> tuple[Question, Answer | None, Sequence[Answer]] | Pending:
        """The question (and answer) an operation is about, hidden ones included; ``not_found`` if none.

        Third: the question's answers as read from the store, when it was
        read (a question out of memory); empty when memory held the item.

        Two requests about one item out of memory read it side by side, each
        its own copy; the first to run again changes its copy and commits.
        The other's copy is then as the item was before: acting on it would
        take the item down (or show it) twice, twice counted, its author told
        twice. So a copy read before a hide or unhide of its question here
        is read again: the driver runs a read after the commits queued
        before it, so the new one sees that change.
        """
        if kind == "question" and item_id in self._questions:
            return self._questions[item_id], None, ()
        if kind == "answer" and (answer := self._qa.answer_in_memory(item_id)) is not None:
            return self._questions[answer.question_id], answer, ()
        if not call.retried:
            return self._read(kind, item_id)
        question, answers, begun = call.found  # this request's own read: it goes with the request, whatever its end
        if self._freshness.stale(question.question_id, begun):
            return self._read(kind, item_id)  # changed since this read began
        question = self._questions.get(question.question_id, question)  # memory is newer than the store
        if kind == "question":
            return question, None, answers
        answer = next((a for a in answers if a.answer_id == item_id), None)
        if answer is None:
            raise ProtocolError("not_found", "no such answer")
        return question, answer, answers

    def _read(self, kind: str, item_id: str) -> Pending:
        begun = self._freshness.now
        return Pending(ModerationItem(kind, item_id), lambda found: self._keep(kind, item_id, found, begun))

    def _keep(self, kind: str, item_id: str, found: tuple[Question, list[Answer]] | None, begun: int) -> Retry:
        if found is None:
            raise ProtocolError("not_found", f"no such {kind}")
        question, answers = found
        return Retry((question, answers, begun))

    def _hide(
        self,
        kind: str,
        question: Question,
        answer: Answer | None,
        reason: str,
        call: Call,
        *,
        tell_caller: bool = False,
    ) -> bool:
        """Hide an item that is shown; False if it is hidden or deleted already.

        The room hears of it, but for the connection whose request hid it (as
        with an author's delete) unless ``tell_caller``. An item not in
        memory (an old question, an expired one) is marked in the store only.
        """
        now, out = call.now, call.out
        me = None if tell_caller else call.conn.conn_id
        if kind == "question":
            if question.deleted_at is not None:
                return False
            self._qa.take_down_question(question, now, out, hidden=True, except_conn=me)
            author, data = question.asker_id, {"question_id": question.question_id}
        else:
            assert answer is not None
            if answer.deleted_at is not None:
                return False
            self._qa.take_down_answer(question, answer, now, out, hidden=True, except_conn=me)
            author, data = answer.author_id, {"question_id": question.question_id, "answer_id": answer.answer_id}
        if author in self._users:
            self._inbox.append(author, "content_hidden", {**data, "reason": reason}, now, out)
        self._freshness.changed(question.question_id)
        return True

    def _unhide(
        self,
        kind: str,
        question: Question,
        answer: Answer | None,
        answers: Sequence[Answer],
        now: int,
        out: OutcomeBuilder,
        *,
        except_conn: int | None = None,
    ) -> bool:
        """Show a hidden item again; False if it is not hidden. An active question comes back into memory at once;
        an ended one (as an answer under a question out of memory) when next asked for.

        Its answers still ``sent`` are owed their ``delivered`` again (the
        hide forgot them): the asker's next hello gives it. An answer's room
        gets ``new_answer``, but for ``except_conn`` (the connection whose
        request showed it, as with a hide).
        """
        if kind == "question":
            if not question.hidden:
                return False
            self._freshness.changed(question.question_id)
            question.hidden, question.deleted_at = False, None
            out.write(SaveQuestion(attrs.evolve(question), unhide=True))
            shown = [a for a in answers if a.deleted_at is None]
            if question.status in ACTIVE:
                # Open again: in memory as it was before the hide (nearby, its expiry, its slow-response alert),
                # counted, its answers tracked. Its escalation stays stopped (the hide stored it as done).
                self._qa.adopt(question, shown)
                return True
            self._qa.count(question)
            for answer_shown in shown:
                self._inbox.track(question, answer_shown)
            return True
        assert answer is not None
        if not answer.hidden:
            return False
        self._freshness.changed(question.question_id)
        answer.hidden, answer.deleted_at = False, None
        question.answer_count += 1
        if question.status == QuestionStatus.OPEN:  # answered again (hiding its only answer reopened it)
            question.status = advance(question.status, QuestionEvent.ANSWER)
        out.write(SaveAnswer(attrs.evolve(answer), unhide=True))
        out.write(CountAnswer(question.question_id, 1, answer_id=answer.answer_id))
        if question.question_id in self._questions:
            self._qa.adopt_answer(answer)
            self._qa.touched(question.question_id, now)
        elif question.deleted_at is None:  # a hidden question's answers are owed nothing until it is shown
            self._inbox.track(question, answer)
        if question.deleted_at is None:  # a hidden (or deleted) question has no room
            self._qa.show_answer_again(question, answer, out, except_conn=except_conn)
        return True

    # ---- hiding ------------------------------------------------------------------------

    def _hide_op(self, call: Call, kind: str, show: bool) -> dict[str, Any] | Pending:
        self._admin(call)
        item_id = call.f.ident("id")
        reason = call.f.text("reason", max_len=500, min_len=0 if show else 1, default="" if show else None)
        item = self._item(call, kind, item_id)
        if isinstance(item, Pending):
            return item
        question, answer, answers = item
        if show:
            changed = self._unhide(kind, question, answer, answers, call.now, call.out, except_conn=call.conn.conn_id)
        else:
            changed = self._hide(kind, question, answer, reason, call)
        if changed:
            action = f"{'unhide' if show else 'hide'}_{kind}"
            call.out.write(AppendAudit(call.now, call.user.user_id, action, item_id, reason))
        return {"id": item_id, "hidden": not show, "changed": changed}

    def hide_question(self, call: Call) -> dict[str, Any] | Pending:
        return self._hide_op(call, "question", show=False)

    def hide_answer(self, call: Call) -> dict[str, Any] | Pending:
        return self._hide_op(call, "answer", show=False)

    def unhide_question(self, call: Call) -> dict[str, Any] | Pending:
        return self._hide_op(call, "question", show=True)

    def unhide_answer(self, call: Call) -> dict[str, Any] | Pending:
        return self._hide_op(call, "answer", show=True)

    # ---- reports -----------------------------------------------------------------------

    def report_content(self, call: Call) -> dict[str, Any] | Pending:
        """Any user reports a question or an answer, once; enough distinct reporters hide it at once."""
        f = call.f
        if f.has("question_id") == f.has("answer_id"):
            raise ProtocolError("invalid_field", "give exactly one of 'question_id' and 'answer_id'")
        kind = "question" if f.has("question_id") else "answer"
        item_id = f.ident(f"{kind}_id")
        reason = f.choice("reason", REPORT_REASONS, default="")
        note = f.text("note", max_len=500, min_len=0, default="")
        mine = [
            r for r in self.open_reports.values()
            if (r.item_kind, r.item_id, r.reporter_id) == (kind, item_id, call.user.user_id)
        ]  # fmt: skip
        if mine:  # the first, whatever became of the item since (hidden by these very reports, say)
            return {"report_id": mine[0].report_id, "status": "open"}
        item = self._item(call, kind, item_id)
        if isinstance(item, Pending):
            return item
        question, answer, _ = item
        if (kind == "question" and question.deleted_at is not None) or (
            answer is not None and answer.deleted_at is not None
        ):
            raise ProtocolError("not_found", f"no such {kind}")
        author = question.asker_id if answer is None else answer.author_id
        if author == call.user.user_id:
            raise ProtocolError("forbidden", "you cannot report your own content")
        report = Report(
            self._new_id("r", call.now), kind, item_id, question.question_id, call.user.user_id, reason, note, call.now
        )
        self.open_reports[report.report_id] = report
        call.out.write(SaveReport(attrs.evolve(report)))
        reporters = {r.reporter_id for r in self.open_reports.values() if (r.item_kind, r.item_id) == (kind, item_id)}
        if len(reporters) >= self._settings.auto_hide_reports:
            why = f"hidden after {len(reporters)} reports, pending review"
            if self._hide(kind, question, answer, why, call, tell_caller=True):  # the reporter is in no way its cause
                call.out.write(AppendAudit(call.now, AUTOMATIC, f"hide_{kind}", item_id, why))
                call.out.note("content_auto_hidden", kind=kind, item=item_id, reports=len(reporters))
        return {"report_id": report.report_id, "status": "open"}

    def list_reports(self, call: Call) -> Pending:
        self._admin(call)
        f = call.f
        status = f.choice("status", ("open", "resolved", "all"), default="open")
        limit = f.integer("limit", minimum=1, maximum=100, default=50)
        before = None
        if f.has("before"):
            at, report_id = self._cursors.decode("reports", status, f.raw("before"), "before")
            before = (int(at), str(report_id))

        def reply(rows: list[tuple[Report, str | None, str | None, bool]]) -> dict[str, Any]:
            items = [
                {
                    **_report_wire(r),
                    "item": {
                        "kind": r.item_kind,
                        "id": r.item_id,
                        "question_id": r.question_id,
                        "text": text,
                        "author_id": author,
                        "hidden": hidden,
                    },
                }
                for r, text, author, hidden in rows[:limit]
            ]
            last = rows[limit - 1][0] if len(rows) > limit else None
            return {
                "reports": items,
                "next": self._cursors.encode("reports", status, (last.created_at, last.report_id)) if last else None,
            }

        return Pending(ReportsPage(None if status == "all" else status, before, limit), reply)

    def resolve_report(self, call: Call) -> dict[str, Any] | Pending:
        """Close every open report of an item: ``dismiss`` (and show it again), ``hide`` it, or ``ban`` its author."""
        self._admin(call)
        f = call.f
        report = self.open_reports.get(f.ident("report_id"))
        if report is None:
            raise ProtocolError("not_found", "no such open report")
        action = f.choice("action", ("dismiss", "hide", "ban"), default="")
        item = self._item(call, report.item_kind, report.item_id)
        if isinstance(item, Pending):
            return item
        question, answer, answers = item
        kind, now, out = report.item_kind, call.now, call.out
        if action == "dismiss":
            self._unhide(kind, question, answer, answers, now, out, except_conn=call.conn.conn_id)
        elif action == "hide":
            self._hide(kind, question, answer, f"hidden after review: {report.reason}", call)
        else:
            author = self._users.get(question.asker_id if answer is None else answer.author_id)
            if author is not None and author.user_id != call.user.user_id:
                self._ban(author, f"reported for {report.reason}", FOREVER, call)
        resolved = [r for r in self.open_reports.values() if (r.item_kind, r.item_id) == (kind, report.item_id)]
        for r in resolved:
            r.status, r.resolved_by, r.resolved_at, r.action = "resolved", call.user.user_id, now, action
            out.write(SaveReport(attrs.evolve(r)))
            del self.open_reports[r.report_id]
        out.write(AppendAudit(now, call.user.user_id, "resolve_report", report.report_id, action))
        return {"report_id": report.report_id, "action": action, "resolved": len(resolved)}

    def _stop_escalating(self, user_id: str, now: int, out: OutcomeBuilder) -> None:
        """A banned asker's questions escalate no more, for good (neither a restart nor the ban's end takes
        them up again)."""
        for question in self._questions.values():
            if question.asker_id == user_id and question.status in ACTIVE:
                self._qa.stop_escalating(question, now, out)


def _report_wire(report: Report) -> dict[str, Any]:
    return {
        "report_id": report.report_id,
        "reason": report.reason,
        "note": report.note,
        "reporter_id": report.reporter_id,
        "created_at": report.created_at,
        "status": report.status,
        "action": report.action,
        "resolved_by": report.resolved_by,
        "resolved_at": report.resolved_at,
    }


def _network(text: str) -> str:
    """An address or CIDR network, normalised (IPv4-mapped as IPv4: ``core.limits.ip_network``);
    ``invalid_field`` otherwise."""
    try:
        return str(ip_network(text))
    except ValueError:
        raise ProtocolError("invalid_field", "'cidr' must be an IP address or a CIDR network") from None


def _block_wire(block: IpBlock) -> dict[str, Any]:
    return {
        "cidr": block.cidr,
        "until": block.until,
        "reason": block.reason,
        "admin_id": block.admin_id,
        "created_at": block.created_at,
    }
