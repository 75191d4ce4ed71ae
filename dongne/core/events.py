"""What the driver tells the engine: small frozen input events.

The driver feeds each one to ``Engine.handle`` together with ``now`` (ms since
the epoch) and acts on the ``Outcome`` it gets back. Nothing else changes the
engine's state once it is loaded.
"""

from __future__ import annotations

from typing import Any

import attrs

from .records import Answer, EscalationProgress, LoadedState, Question, User

__all__ = [
    "Connected",
    "Disconnected",
    "EscalationDue",
    "Event",
    "FrameReceived",
    "InboxPruned",
    "QuestionChanged",
    "QuestionLoaded",
    "ReadDone",
    "ReadFailed",
    "Reloaded",
    "RemoteAlerts",
    "RemoteMembers",
    "RemotePositions",
    "RoomRelayed",
    "SeqsMoved",
    "StageRefused",
    "Tick",
    "UserLoaded",
    "UsersChanged",
    "WritesFailing",
    "WritesWork",
]


@attrs.frozen
class Connected:
    """A client finished its WebSocket handshake; it must send ``hello`` next."""

    conn_id: int


@attrs.frozen
class FrameReceived:
    """A whole message arrived. ``text`` is True for a text frame (the protocol wants binary)."""

    conn_id: int
    payload: bytes
    text: bool = False


@attrs.frozen
class QuestionLoaded:
    """The store's answer to an ``Outcome.load_question``: the question (``None``: not found) and its answers.

    ``users``: the rows of its asker and answers' authors the engine did not
    know (made on another node, whose news has not arrived): adopted first.
    The engine then handles the request that asked for it.
    """

    conn_id: int
    question: Question | None
    answers: tuple[Answer, ...] = ()
    users: tuple[User, ...] = ()


@attrs.frozen
class UserLoaded:
    """The store's answer to an ``Outcome.load_user``: the hello's user as stored (``None``: a new user).

    The engine adds the user, then handles the hello that asked for it, so a
    user another node created is not made afresh here (seqs from 0, default
    settings, a ``SaveUser`` over the stored row). With it, where the user's
    kept events start: a resume's reply says whether its replay is whole,
    whichever node pruned the rest.
    """

    conn_id: int
    user: User | None
    #: The user's oldest durable seq still kept (another node may have pruned older ones); None: no events.
    oldest_seq: int | None = None


@attrs.frozen
class QuestionChanged:
    """A question as the store holds it now, which memory may not: another node changed it, or a guarded
    write of this node's lost a race to one (``Conflict``; several nodes, ``store/CLUSTER.md``).

    The engine merges it into its copy (``Questions.refresh``: nothing goes
    back, since this node's own writes may still be on their way): a
    question it holds that ended ends here too (its escalation is cancelled,
    its room hears ``question_closed``); a deleted one (``deleted_at``)
    leaves memory. An active question it does not hold is adopted as a
    lazily loaded one is, and listed nearby. ``question`` ``None`` (no such
    row) changes nothing. ``answers`` may include deleted ones (they leave).

    ``escalation``: the question's escalation progress as the store holds
    it, read when the engine did not follow that escalation (a question asked
    on another node): an active question whose escalation the engine does
    not follow takes it up (the alerts count towards the hourly caps) and,
    with stages left, gets a ``StartEscalation`` (the driver runs it if this
    node holds the escalation lease). None: not read.
    """

    question_id: str
    question: Question | None
    answers: tuple[Answer, ...] = ()
    escalation: EscalationProgress | None = None


@attrs.frozen
class UsersChanged:
    """Users' rows as the store holds them, which another node may have changed (settings, a ban, points).

    The engine merges each into its copy: settings and bans from the store
    (a ban now in force closes the user's connections here with 4003),
    ``points``, ``read_seq`` and ``last_seq`` never go back. A user it does
    not know is added (created on another node).
    """

    users: tuple[User, ...]


@attrs.frozen
class RoomRelayed:
    """A room event another node relayed (``RoomNews``, ``RelayRoom``; several nodes, ``store/CLUSTER.md``).

    The engine sends it to this node's members of the question's room (a
    presence or typing event not to that user's own connections):
    ``new_answer``, ``answer_accepted``, ``answer_deleted``, presence and
    typing. A ``new_answer`` too large to relay whole carries ``answer_id``
    only: it is sent from memory if the answer is there (the driver reads it
    first), and dropped otherwise. Other kinds are ignored.
    """

    question_id: str
    kind: str
    data: dict[str, Any]


@attrs.frozen
class ReadDone:
    """The store's rows for an ``Outcome.read``; the engine then replies to the request that asked."""

    conn_id: int
    rows: Any


@attrs.frozen
class ReadFailed:
    """The store could not answer an ``Outcome.read`` or ``load_question``: the request gets ``internal``."""

    conn_id: int


@attrs.frozen
class InboxPruned:
    """Old durable events were deleted: each affected user's oldest kept seq (here, or read after another
    node's pruner named them: a seq below the one held changes nothing)."""

    oldest: dict[str, int]


@attrs.frozen
class RemotePositions:
    """Positions of users connected to other nodes, as the store holds them (several nodes; CLUSTER.md).

    The engine keeps them beside its own users' (``Neighbourhood.remote``):
    locals among them enter the live index, so they count in ``nearby_locals``
    and stages plan them as online (their alerts are durable events the node
    they are connected to delivers; no push). A user connected here too is
    placed by this node's own position while connected.

    A user connected elsewhere who shared no position is listed too, with
    ``lat`` and ``lng`` None: online (no push for them here), not placed.

    Attributes:
        moved: ``(user_id, lat, lng, region)``, positions already snapped by the node that took them, and
            the region it named (None: outside any, or no position).
        gone: users no other node places any more.
        users: rows of users the engine did not know (made on another node since it loaded):
            adopted, so that they can be planned (their settings).
        everyone: ``moved`` is every other node's position: any other remote one is gone (a rebuild).
    """

    moved: tuple[tuple[str, float | None, float | None, str | None], ...] = ()
    gone: tuple[str, ...] = ()
    users: tuple[User, ...] = ()
    everyone: bool = False


@attrs.frozen
class RemoteAlerts:
    """Who another node's escalation stages alerted, from its commits' news (several nodes; CLUSTER.md).

    They count towards the hourly caps here too: the lease holder runs the
    later stages for every node's questions, and each node runs the
    IMMEDIATE stage of the questions asked on it. For a question whose
    escalation the engine follows, each user not yet alerted for it joins
    the alerted and is recorded in the alert ledger at ``at``; one already
    there is counted already (read from the store by a take-up or a reload).
    A question whose escalation it does not follow is skipped: its alerts
    are counted from the store when it takes the escalation up
    (``QuestionChanged.escalation``).

    Attributes:
        alerts: ``(question_id, at, user ids)``, ``at`` being when the node committing them sent them (ms).
    """

    alerts: tuple[tuple[str, int, tuple[str, ...]], ...]


@attrs.frozen
class RemoteMembers:
    """Who is in which question's room on other nodes, as the store holds it (several nodes; CLUSTER.md).

    The engine keeps them beside its own rooms (``Presence.remote``): a
    ``join_question`` reply's ``online`` and ``online_count`` list the room's
    members on every node, a user in the room here and elsewhere once.

    Attributes:
        rooms: ``(question_id, user ids)``, each listed room's members on other nodes (sorted; empty: none
            any more).
        users: rows of users the engine did not know (made on another node since it loaded): adopted, so
            that their names are known.
        everyone: ``rooms`` lists every room with members on other nodes: any other is empty (a rebuild).
    """

    rooms: tuple[tuple[str, tuple[str, ...]], ...] = ()
    users: tuple[User, ...] = ()
    everyone: bool = False


@attrs.frozen
class SeqsMoved:
    """Users' inbox heads as the store holds them, which another writer moved (several nodes; CLUSTER.md).

    Each listed user's ``last_seq`` becomes the given seq, up or down: after
    a refused commit (a ``Conflict``) the heads read from the store replace
    what it counted in memory; for news from another node, and for a commit
    that numbered a user's events on from another node's, the driver passes
    only heads above the engine's. The user's next durable event continues
    from there. Users the engine does not know are skipped. Delivering the
    events another node appended is the driver's job (it reads them from the
    store), not the engine's.
    """

    heads: dict[str, int]


@attrs.frozen
class Disconnected:
    """The connection is gone (closed by either side, or broken)."""

    conn_id: int


@attrs.frozen
class Tick:
    """Time passed: do what is due at ``now`` (see ``Engine.next_deadline``)."""


@attrs.frozen
class EscalationDue:
    """A question's next escalation stage is due (see ``Engine.escalation_due``)."""

    question_id: str


@attrs.frozen
class StageRefused:
    """An escalation stage's outcome was not committed: its guard (``IfOpen``) found the question ended or
    taken down in the store (another node's accept, close, delete or hide, whose news had not come). The
    rest of its commit was; nothing of the stage was stored or sent.

    ``alerted`` is the guard's; ``seqs``: the outcome's inbox events, ``(user_id, seq)`` as the engine
    numbered them.
    """

    question_id: str
    alerted: tuple[tuple[str, int], ...] = ()
    seqs: tuple[tuple[str, int], ...] = ()


@attrs.frozen
class WritesFailing:
    """Commits fail (disk full, I/O error, locked): refuse writes until ``WritesWork``.

    What the failed commit and those queued behind it changed in memory is
    rebuilt by ``Reloaded`` from what the database holds.
    """

    error: str


@attrs.frozen
class Reloaded:
    """The durable state as the database holds it, read after a failed commit."""

    state: LoadedState


@attrs.frozen
class WritesWork:
    """A write succeeded again: accept writes.

    ``confirmed``: a real commit went through (or writes were taken for a while and nothing failed), and
    the admins are told ``recovered``. Without it only the driver's probe did (a one-row write can fit
    where a real commit does not: the room a failed commit left on a full disk): writes are taken on trial,
    and a failure meanwhile (``WritesFailing``) is still the same outage, with no second ``failing``.
    """

    confirmed: bool = True


Event = (
    Connected
    | FrameReceived
    | QuestionLoaded
    | UserLoaded
    | QuestionChanged
    | UsersChanged
    | RoomRelayed
    | ReadDone
    | ReadFailed
    | Disconnected
    | Tick
    | EscalationDue
    | StageRefused
    | InboxPruned
    | SeqsMoved
    | RemotePositions
    | RemoteMembers
    | RemoteAlerts
    | WritesFailing
    | Reloaded
    | WritesWork
)
