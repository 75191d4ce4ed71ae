"""Sessions: a user's connections. ``hello`` authenticates one (token, bans, resume, receipts); leaving forgets it."""

from __future__ import annotations

from typing import Any

import attrs

from .connections import Call, ConnPhase, ConnState
from .effects import Outcome, OutcomeBuilder, Replay, SaveUser
from .errors import CloseConnection
from .inbox import Inbox
from .moderation import Moderation
from .neighbourhood import Neighbourhood
from .oversight import Oversight
from .presence import Presence
from .protocol import Request, reply_ok
from .records import User
from .text import normalize_text

__all__ = ["Sessions"]


class Sessions:
    """Who is connected as whom.

    Args:
        check_token: verifies a hello token at ``now_s``; raises ``CloseConnection(4001)``.
        connections_per_user: the most connections one user may have open.
        users, user_conns: the engine's records (shared).
        where, oversight, moderation, inbox, presence: the components a hello or a leaving touches.
    """

    def __init__(
        self,
        check_token: Any,
        connections_per_user: int,
        *,
        users: dict[str, User],
        user_conns: dict[str, set[int]],
        where: Neighbourhood,
        oversight: Oversight,
        moderation: Moderation,
        inbox: Inbox,
        presence: Presence,
    ) -> None:
        self._check_token = check_token
        self._connections_per_user = connections_per_user
        self._users = users
        self._user_conns = user_conns
        self._where = where
        self._oversight = oversight
        self._moderation = moderation
        self._inbox = inbox
        self._presence = presence

    def hello(self, conn: ConnState, request: Request, now: int, *, writable: bool) -> Outcome | tuple[int, str]:
        """Authenticate a connection; returns the reply (and replay) or the close code and reason that refuse it."""
        try:
            claims = self._check_token(request.data.get("token"), now / 1000)
        except CloseConnection as exc:
            return exc.code, exc.reason
        # Token claims are user text too: one Unicode form (an NFD tag must match NFC hashtags).
        claims = attrs.evolve(
            claims, nick=normalize_text(claims.nick), tags=tuple(normalize_text(tag) for tag in claims.tags)
        )
        resume = request.data.get("resume")
        last_seen: int | None = None
        if resume is not None:
            seq = resume.get("last_seq") if isinstance(resume, dict) else None
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
                # Refused before authenticating: the client can fix and retry.
                return 4002, "resume.last_seq must be a non-negative integer"
            last_seen = seq
        per_user = self._connections_per_user
        if len(self._user_conns.get(claims.user_id, ())) >= per_user:
            return 4008, f"at most {per_user} connections per user"
        out = OutcomeBuilder()
        user = self._users.get(claims.user_id)
        banned = self._moderation.refuse_banned(user, now) if user is not None else None
        if banned is not None:
            return banned
        if user is not None and user.banned_until is not None:
            # The ban ran out: memory forgets it, the store's row keeps it (an ended ban bans nobody). Writing
            # None could undo a newer ban another node committed before its news is read here.
            user.banned_until = user.ban_reason = None
        claimed = (claims.nick, claims.local, claims.tags, claims.role)
        if not writable and (user is None or (user.nick, user.local, user.tags, user.role) != claimed):
            return 1013, "the server cannot store your profile now; reconnect later"
        if user is None:
            user = User(claims.user_id, claims.nick, claims.local, claims.tags, claims.role, created_at=now)
            self._users[user.user_id] = user
            # New here; another node may have made the row (and set its settings, a ban) before its news came.
            out.write(SaveUser(attrs.evolve(user), changed={"profile"}))
        elif (user.nick, user.local, user.tags, user.role) != (claims.nick, claims.local, claims.tags, claims.role):
            user.nick, user.local, user.tags, user.role = claims.nick, claims.local, claims.tags, claims.role
            out.write(SaveUser(attrs.evolve(user), changed={"profile"}))
        self._where.refresh_local(user, now)
        self._oversight.role_is(user)
        conn.phase = ConnPhase.READY
        conn.user_id = user.user_id
        self._user_conns.setdefault(user.user_id, set()).add(conn.conn_id)
        hello: dict[str, Any] = {
            "user": user.to_wire(),
            "last_seq": user.last_seq,
            "unread": self._inbox.unread(user),
            "server_time": now,
            "protocol": 1,
        }
        if last_seen is not None:
            oldest = self._inbox.missed(user.user_id, last_seen) if last_seen < user.last_seq else None
            # Events after last_seen were pruned: the client learns it did not get everything.
            hello.update({"resumed": False, "oldest_seq": oldest} if oldest is not None else {"resumed": True})
        out.send((conn.conn_id,), reply_ok(request.id, hello))
        # Where this connection's durable stream starts, and the gap a resume asks for (none: an empty
        # replay, which only tells the driver the connection is at last_seq).
        after = last_seen if last_seen is not None and last_seen < user.last_seq else user.last_seq
        out.act(Replay(conn.conn_id, user.user_id, after, user.last_seq))
        if writable:  # receipts wait for the next hello otherwise
            self._inbox.deliver_pending(user.user_id, now, out)
        return out.build("hello", request=(conn.conn_id, request.id))

    def get_profile(self, call: Call) -> dict[str, Any]:
        """The ``get_profile`` operation: the caller's own user and newest seq."""
        return {"user": call.user.to_wire(), "last_seq": call.user.last_seq}

    def ping(self, call: Call) -> dict[str, Any]:
        """The ``ping`` operation: a liveness check that browsers can see (they cannot see WebSocket pings)."""
        return {"server_time": call.now}

    def left(self, conn: ConnState) -> Outcome:
        """A connection went away: it leaves its rooms (presence), and its user is offline if it was the last."""
        assert conn.user_id is not None
        out = OutcomeBuilder()
        for question_id in sorted(conn.rooms):
            self._presence.leave(conn, question_id, out)
        conns = self._user_conns.get(conn.user_id)
        if conns is not None:
            conns.discard(conn.conn_id)
            if not conns:
                del self._user_conns[conn.user_id]
                self._where.went_offline(conn.user_id)
        return out.build()
