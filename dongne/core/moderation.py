"""Moderation: bans, and the audit log of every admin action.

Every operation here is for admins only (``forbidden`` for anyone else) and
writes an ``audit_log`` row in the same commit as what it does. A banned
user's connections are closed with 4003 at once, a ``hello`` with any token
for that user is closed with 4003 until the ban ends, their open questions
stop escalating, and a banned local is alerted for nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from .connections import Call, ConnPhase, ConnState
from .effects import AppendAudit, CancelEscalation, Close, OutcomeBuilder, SaveUser
from .errors import ProtocolError
from .lifecycle import ACTIVE
from .lists import Pending
from .neighbourhood import Neighbourhood
from .reads import AuditPage
from .records import Question, User

__all__ = ["BANNED", "FOREVER", "Moderation"]

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
        *,
        users: dict[str, User],
        questions: dict[str, Question],
        conns: dict[int, ConnState],
        user_conns: dict[str, set[int]],
        where: Neighbourhood,
    ) -> None:
        self._users = users
        self._questions = questions
        self._conns = conns
        self._user_conns = user_conns
        self._where = where

    def operations(self) -> dict[str, Callable[[Call], dict[str, Any] | Pending]]:
        return {"ban_user": self.ban_user, "unban_user": self.unban_user, "list_audit": self.list_audit}

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
        f, now, out = call.f, call.now, call.out
        target = self._target(call)
        reason = f.text("reason", max_len=500)
        until = f.integer("until", minimum=now + 1, maximum=FOREVER - 1) if f.has("until") else FOREVER
        if target.user_id == call.user.user_id:
            raise ProtocolError("forbidden", "you cannot ban yourself")
        target.banned_until, target.ban_reason = until, reason
        out.write(SaveUser(attrs.evolve(target)))
        out.write(AppendAudit(now, call.user.user_id, "ban_user", target.user_id, reason))
        out.note("user_banned", user=target.user_id, admin=call.user.user_id, until=until)
        self._where.refresh_local(target)  # a banned local is alerted for nothing
        code, why = self.refuse_banned(target, now) or (BANNED, "banned")
        for conn_id in sorted(self._user_conns.get(target.user_id, ())):
            conn = self._conns.get(conn_id)
            if conn is not None and conn.phase is ConnPhase.READY:
                conn.phase = ConnPhase.CLOSING
                out.act(Close(conn_id, code, why))
        self._stop_escalating(target.user_id, out)
        return {"user_id": target.user_id, "banned_until": until}

    def unban_user(self, call: Call) -> dict[str, Any]:
        self._admin(call)
        target = self._target(call)
        reason = call.f.text("reason", max_len=500, default="unbanned")
        target.banned_until, target.ban_reason = None, None
        call.out.write(SaveUser(attrs.evolve(target)))
        call.out.write(AppendAudit(call.now, call.user.user_id, "unban_user", target.user_id, reason))
        self._where.refresh_local(target)
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

    def _stop_escalating(self, user_id: str, out: OutcomeBuilder) -> None:
        for question in self._questions.values():
            if (
                question.asker_id == user_id
                and question.status in ACTIVE
                and question.question_id in self._where.escalations
            ):
                self._where.escalations.pop(question.question_id, None)
                out.act(CancelEscalation(question.question_id))
