"""Question rooms: who is in each room (by connection), who is typing, and the events both cause.

With several nodes (store/CLUSTER.md, "Room members across nodes") each room
also has members and typers on other nodes: the members as the store's
replica says (``RemoteMembers``), the typers as their nodes' relayed
``user_typing`` / ``user_stop_typing`` say, each until ``typing_ttl_ms`` after
it was last heard. A ``join_question`` reply lists both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from .connections import ConnState
from .deadlines import Deadlines
from .effects import OutcomeBuilder, RelayRoom
from .errors import ProtocolError
from .protocol import event

__all__ = ["RELAYED_PRESENCE", "Presence", "Room"]

#: The ephemeral room events nodes relay to each other (``RelayRoom``): each about one user.
RELAYED_PRESENCE = frozenset({"user_typing", "user_stop_typing", "user_online", "user_offline"})


@attrs.define
class Room:
    """The live audience of one question.

    ``members`` maps a user id to the ids of that user's connections in the
    room; a user is *present* while that set is non-empty.
    """

    members: dict[str, set[int]] = attrs.Factory(dict)
    typing: dict[str, int] = attrs.Factory(dict)  # user id -> expires_at (ms)
    typing_relayed: dict[str, int] = attrs.Factory(dict)  # user id -> when other nodes were last told (ms)

    def conn_ids(self, *, except_conn: int | None = None, except_user: str | None = None) -> list[int]:
        out: list[int] = []
        for user_id, conns in self.members.items():
            if user_id == except_user:
                continue
            out.extend(c for c in conns if c != except_conn)
        return out

    def add(self, user_id: str, conn_id: int) -> bool:
        """Add a connection; True when this makes the user newly present."""
        conns = self.members.setdefault(user_id, set())
        newly = not conns
        conns.add(conn_id)
        return newly

    def remove(self, user_id: str, conn_id: int) -> bool:
        """Remove a connection; True when the user is no longer present."""
        conns = self.members.get(user_id)
        if not conns or conn_id not in conns:
            return False
        conns.discard(conn_id)
        if conns:
            return False
        del self.members[user_id]
        return True

    @property
    def empty(self) -> bool:
        return not self.members


class Presence:
    """The rooms of every question someone has joined.

    Args:
        who: a user's public name card, ``{"user_id", "nick"}``.
        deadlines: the engine's deadline heap (typing states expire there).
        rooms_per_connection: the most rooms one connection may be in.
        typing_ttl_ms: how long a typing state lasts without a renewal.
    """

    def __init__(
        self,
        who: Callable[[str], dict[str, Any]],
        deadlines: Deadlines,
        *,
        rooms_per_connection: int,
        typing_ttl_ms: int,
    ) -> None:
        self.rooms: dict[str, Room] = {}
        #: Each room's members on other nodes (question id -> user ids; ``RemoteMembers``), rooms here or not.
        self.remote: dict[str, frozenset[str]] = {}
        #: Each room's typers on other nodes (question id -> user id -> (expires_at ms, name card)), from
        #: their relayed events, rooms here or not.
        self.remote_typing: dict[str, dict[str, tuple[int, dict[str, Any]]]] = {}
        self._who = who
        self._deadlines = deadlines
        self._rooms_per_connection = rooms_per_connection
        self._typing_ttl_ms = typing_ttl_ms

    def drop_room(self, question_id: str, conns: dict[int, ConnState]) -> None:
        """Forget a room whose question is gone (its creation was never committed)."""
        room = self.rooms.pop(question_id, None)
        for conn_ids in room.members.values() if room is not None else ():
            for conn_id in conn_ids:
                conn = conns.get(conn_id)
                if conn is not None:
                    conn.rooms.discard(question_id)

    def room_of(self, question_id: str) -> Room | None:
        return self.rooms.get(question_id)

    def others(self, question_id: str, *, except_conn: int | None = None) -> list[int]:
        """The connections in a question's room, but ``except_conn``."""
        room = self.rooms.get(question_id)
        return room.conn_ids(except_conn=except_conn) if room is not None else []

    def has_room_for(self, conn: ConnState, question_id: str | None = None) -> bool:
        """Whether ``conn`` may join the question's room (it is in it already, or below its cap of rooms)."""
        return question_id in conn.rooms or len(conn.rooms) < self._rooms_per_connection

    def check_capacity(self, conn: ConnState, question_id: str | None = None) -> None:
        """Raise ``limit_exceeded`` if ``conn`` may not join one more room."""
        if not self.has_room_for(conn, question_id):
            raise ProtocolError("limit_exceeded", f"a connection can be in at most {self._rooms_per_connection} rooms")

    def joined(self, conn: ConnState, question_id: str) -> Room:
        """The room ``conn`` is in, or ``not_joined``."""
        if question_id not in conn.rooms:
            raise ProtocolError("not_joined", "join the question first")
        return self.rooms[question_id]

    def join(self, conn: ConnState, user_id: str, question_id: str, out: OutcomeBuilder) -> Room:
        self.check_capacity(conn, question_id)
        room = self.rooms.setdefault(question_id, Room())
        conn.rooms.add(question_id)
        if room.add(user_id, conn.conn_id):
            self._tell(room, out, "user_online", {"question_id": question_id, **self._who(user_id)})
        return room

    def _tell(self, room: Room, out: OutcomeBuilder, kind: str, data: dict[str, Any]) -> None:
        """A presence or typing event to the room but its user's own connections, here and on other nodes."""
        out.send(room.conn_ids(except_user=data["user_id"]), event(kind, data))
        out.act(RelayRoom(data["question_id"], kind, data))

    def relayed(self, question_id: str, kind: str, data: dict[str, Any], now: int, out: OutcomeBuilder) -> None:
        """A room event another node relayed (``RoomRelayed``): to this node's members of the room.

        Typing is kept too (for join replies), in rooms with no member here
        as well; a ``user_typing`` renewing a remote typer still typing only
        extends it (the room heard it start).
        """
        user_id = data.get("user_id") if kind in RELAYED_PRESENCE else None
        if not isinstance(user_id, str):
            user_id = None
        elif kind in ("user_typing", "user_stop_typing") and not self._remote_typed(
            question_id, user_id, data, now, typing=kind == "user_typing"
        ):
            return  # a renewal
        room = self.rooms.get(question_id)
        if room is not None:
            out.send(room.conn_ids(except_user=user_id), event(kind, data))

    def _remote_typed(self, question_id: str, user_id: str, data: dict[str, Any], now: int, *, typing: bool) -> bool:
        """Keep (or forget) another node's typer; False for a renewal of one still typing (no news here)."""
        typers = self.remote_typing.setdefault(question_id, {})
        held = typers.pop(user_id, None)
        if typing:
            expires_at = now + self._typing_ttl_ms
            typers[user_id] = (expires_at, {"user_id": user_id, "nick": str(data.get("nick", user_id))})
            self._deadlines.add(expires_at, "remote_typing", question_id, user_id)
        elif not typers:
            del self.remote_typing[question_id]
        return not (typing and held is not None and held[0] > now)

    def remote_typing_ends_at(self, question_id: str, user_id: str, expires_at: int) -> bool:
        """Whether another node's typer is held until ``expires_at`` (not renewed or stopped since)."""
        typers = self.remote_typing.get(question_id)
        return typers is not None and typers.get(user_id, (None,))[0] == expires_at

    def remote_typing_expired(self, question_id: str, user_id: str, expires_at: int) -> None:
        """A remote typer's deadline fell due: forget them unless renewed since (their node tells the room
        when they stop; a lost stop is what this covers, for join replies)."""
        if self.remote_typing_ends_at(question_id, user_id, expires_at):
            typers = self.remote_typing[question_id]
            del typers[user_id]
            if not typers:
                del self.remote_typing[question_id]

    def remote_members(self, rooms: tuple[tuple[str, tuple[str, ...]], ...], *, everyone: bool) -> None:
        """Other nodes' members of these rooms (``RemoteMembers``); ``everyone``: no other room has any."""
        if everyone:
            self.remote.clear()
        for question_id, users in rooms:
            if users:
                self.remote[question_id] = frozenset(users)
            else:
                self.remote.pop(question_id, None)

    def online(self, question_id: str) -> list[str]:
        """The room's members on every node, by user id (a user here and elsewhere once)."""
        room = self.rooms.get(question_id)
        here = room.members.keys() if room is not None else set()
        return sorted(here | self.remote.get(question_id, frozenset()))

    def typing(self, question_id: str, now: int) -> list[dict[str, Any]]:
        """The room's typers on every node at ``now``, as name cards, by user id."""
        room = self.rooms.get(question_id)
        cards = {user_id: self._who(user_id) for user_id in (room.typing if room is not None else ())}
        for user_id, (expires_at, card) in self.remote_typing.get(question_id, {}).items():
            if expires_at > now:
                cards.setdefault(user_id, card)
        return [cards[user_id] for user_id in sorted(cards)]

    def leave(self, conn: ConnState, question_id: str, out: OutcomeBuilder) -> None:
        conn.rooms.discard(question_id)
        room = self.rooms.get(question_id)
        if room is None or conn.user_id is None:
            return
        if room.remove(conn.user_id, conn.conn_id):
            if conn.user_id in room.typing:
                self.stop_typing(question_id, conn.user_id, out)
            self._tell(room, out, "user_offline", {"question_id": question_id, **self._who(conn.user_id)})
        if room.empty:
            del self.rooms[question_id]

    def start_typing(self, conn: ConnState, user_id: str, question_id: str, now: int, out: OutcomeBuilder) -> int:
        """Mark ``user_id`` typing until the returned time (ms); tell the room when it starts."""
        room = self.joined(conn, question_id)
        expires_at = now + self._typing_ttl_ms
        already = user_id in room.typing
        room.typing[user_id] = expires_at
        self._deadlines.add(expires_at, "typing", question_id, user_id)
        data = {"question_id": question_id, **self._who(user_id)}
        if not already:
            self._tell(room, out, "user_typing", data)
            room.typing_relayed[user_id] = now
        elif now - room.typing_relayed.get(user_id, now) >= self._typing_ttl_ms // 2:
            # Renewals reach other nodes now and then (not the room here: it heard the start), so that
            # their copy of this typer lasts as long as the typing does here.
            out.act(RelayRoom(question_id, "user_typing", data))
            room.typing_relayed[user_id] = now
        return expires_at

    def stop_typing(self, question_id: str, user_id: str, out: OutcomeBuilder) -> None:
        room = self.rooms.get(question_id)
        if room is None or user_id not in room.typing:
            return
        del room.typing[user_id]
        room.typing_relayed.pop(user_id, None)
        self._tell(room, out, "user_stop_typing", {"question_id": question_id, **self._who(user_id)})

    def typing_ends_at(self, question_id: str, user_id: str, expires_at: int) -> bool:
        """Whether ``user_id`` types in the room until ``expires_at`` (not renewed or stopped since)."""
        room = self.rooms.get(question_id)
        return room is not None and room.typing.get(user_id) == expires_at

    def typing_expired(self, question_id: str, user_id: str, expires_at: int, out: OutcomeBuilder) -> None:
        """A typing deadline fell due: end the state unless it was renewed since."""
        if self.typing_ends_at(question_id, user_id, expires_at):
            self.stop_typing(question_id, user_id, out)
