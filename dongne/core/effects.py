"""What the engine asks its driver to do: store writes and connection actions.

An ``Outcome`` is returned by every engine call. The driver commits
``writes`` (in one transaction, possibly grouped with other outcomes') and only
then performs ``actions`` in order, so nothing acknowledged is ever lost.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
import msgpack

from .reads import Read
from .records import Answer, IpBlock, PushJob, Question, Report, User

__all__ = [
    "USER_PARTS",
    "AcceptOnce",
    "Action",
    "AddPoints",
    "Alert",
    "AppendAudit",
    "AppendEvent",
    "BlockAddresses",
    "CancelEscalation",
    "CancelPushes",
    "Close",
    "CloseOnce",
    "CountAnswer",
    "DeleteIpBlock",
    "DeliverAnswer",
    "DropPushes",
    "EnqueuePush",
    "IfOpen",
    "Note",
    "Observe",
    "Outcome",
    "Push",
    "RelayRoom",
    "Replay",
    "RoomNews",
    "SaveAnswer",
    "SaveEscalation",
    "SaveIpBlock",
    "SaveNotified",
    "SavePushStatus",
    "SaveQuestion",
    "SaveReport",
    "SaveUser",
    "Send",
    "SendEach",
    "StartEscalation",
    "StopEscalating",
    "Write",
    "rows_of",
]

# ---- writes -----------------------------------------------------------------

#: The parts of a user's row a :class:`SaveUser` may change (its ``changed``).
USER_PARTS = frozenset({"profile", "settings", "ban"})


def _user_parts(parts: Iterable[str]) -> frozenset[str]:
    named = frozenset(parts)
    if not named <= USER_PARTS:
        raise ValueError(f"not parts of a user's row: {sorted(named - USER_PARTS)}")
    return named


@attrs.frozen
class SaveUser:
    """Insert a user's row, or update the parts of an existing one that ``changed`` names.

    The parts (:data:`USER_PARTS`): ``profile`` (nick, local, tags, role:
    the token's claims), ``settings`` (``update_settings``'s fields) and
    ``ban`` (``banned_until``, ``ban_reason``). An existing row keeps the
    parts a save does not name: a node's copy of a user may be older than
    the store (another node's ban committed before its news is read here),
    and a settings save writing that copy whole undid the ban. ``read_seq``
    and ``last_seq`` only grow (the greater of the row's and the save's).
    ``points`` is written only when the row is inserted; afterwards only
    :class:`AddPoints` changes it, in SQL, so that two nodes' accepted
    answers add up instead of the last whole row winning (``store/CLUSTER.md``).
    The default names every part (a user's first save, or a whole copy).
    """

    user: User
    changed: frozenset[str] = attrs.field(default=USER_PARTS, converter=_user_parts)


@attrs.frozen
class AddPoints:
    """Add ``points`` to a user's points, in the store (an accepted answer's author)."""

    user_id: str
    points: int


@attrs.frozen
class SaveQuestion:
    """Insert a question's row, or update an existing one from memory but for the fields nodes race on.

    ``status``, ``accepted_answer_id``, ``answer_count``, ``first_answer_at``
    and ``closed_at`` are written only when the row is inserted; afterwards
    only :class:`CountAnswer`, :class:`AcceptOnce` and :class:`CloseOnce`
    change them, in SQL, so that several nodes' writes add up instead of the
    last whole row winning (``store/CLUSTER.md``).

    Nor does a save bring back a question taken down in the store: an
    existing row keeps its ``deleted_at`` (and ``hidden``, as the first
    take-down said) and ``alerted_at`` once set, unless ``unhide`` (a
    moderator shows it again): a node's copy may be older than the row
    (deleted on another node, its news not read here yet).
    """

    question: Question
    unhide: bool = False


@attrs.frozen
class CountAnswer:
    """Add ``delta`` to a question's answer count, in the store (never below 0).

    ``answered_at`` set (a new answer): the write is guarded: it applies only
    while the question is open or answered and not taken down (another node
    may have closed, deleted or hidden it),
    moves an open question to answered and sets ``first_answer_at`` if unset;
    otherwise the commit fails with ``Conflict``. Unset (an answer deleted,
    hidden or shown again): no guard, no status change.

    ``answer_id``: the answer taken down (``delta`` -1) or shown again (+1):
    the count changes only if its row is not taken down yet (is still taken
    down), read once the question's row is locked: two nodes taking the same
    answer down (its author and an admin) count it out once.
    """

    question_id: str
    delta: int = 1
    answered_at: int | None = None
    answer_id: str = ""


@attrs.frozen
class AcceptOnce:
    """Accept ``answer_id``: the question becomes resolved at ``at``, if no answer was accepted and it is open
    or answered and not taken down; otherwise the commit fails with ``Conflict`` (another node accepted or closed it first)."""

    question_id: str
    answer_id: str
    at: int


@attrs.frozen
class CloseOnce:
    """Move an open or answered question not taken down to ``status`` (closed, expired) at ``at``; otherwise
    the commit fails with ``Conflict`` (another node resolved, closed, expired, deleted or hid it first).

    ``conflict`` False (an expiry: every node holding the question expires
    it at the same time): a question that ended already is left as it is,
    and the commit goes on.
    """

    question_id: str
    status: str
    at: int
    conflict: bool = True


@attrs.frozen
class SaveAnswer:
    """Insert an answer's row, or update an existing one (receipt state, accepted, taken down).

    What a node's older copy would undo stays (``store/CLUSTER.md``): a
    receipt only moves forward (``sent``, ``delivered``, ``read``; its
    times are kept once set), ``accepted`` stays, and ``deleted_at`` and
    ``hidden`` stay as the first take-down wrote them, unless ``unhide``
    (a moderator shows the answer again).
    """

    answer: Answer
    unhide: bool = False


@attrs.frozen
class DeliverAnswer:
    """Mark an answer memory does not hold ``delivered`` at ``at``, in the store, if it is still ``sent``
    (its question expired or left memory before its asker came back)."""

    question_id: str
    answer_id: str
    at: int


@attrs.frozen
class AppendEvent:
    """Append a durable event to a user's inbox at ``seq``.

    ``packed``, when not empty, is the msgpack of the event's data, already
    made for the frame (an escalation stage's alerts, ``core.fanout``): the
    store writes it as it is, and ``data`` is then ``None`` (a stage's
    alerts are hundreds; nothing reads their dicts).
    """

    user_id: str
    seq: int
    type: str
    data: dict[str, Any] | None
    created_at: int
    packed: bytes = b""

    def event_data(self) -> dict[str, Any]:
        """The event's data map, from ``packed`` when ``data`` was not kept."""
        if self.data is not None:
            return self.data
        data: dict[str, Any] = msgpack.unpackb(self.packed)
        return data


@attrs.frozen
class SaveReport:
    """Insert a report, or record how it was resolved (a second report of one item by one user is ignored)."""

    report: Report


@attrs.frozen
class SaveIpBlock:
    """Insert or replace a run-time IP block."""

    block: IpBlock


@attrs.frozen
class DeleteIpBlock:
    """Remove a run-time IP block."""

    cidr: str


@attrs.frozen
class AppendAudit:
    """Record an admin's action in the audit log."""

    at: int
    admin_id: str
    action: str  # the operation's name, e.g. "ban_user"
    target: str
    reason: str


@attrs.frozen
class SaveEscalation:
    """Record how far a question's escalation got (``next_stage`` stages done). One stopped for good
    (``StopEscalating``) stays stopped: a save from a stage committed after the stop (the lease holder's,
    planned before the hide, committed after an unhide) only adds to the stages it counts as run."""

    question_id: str
    next_stage: int
    updated_at: int


@attrs.frozen
class StopEscalating:
    """Stop for good, in the store, the escalation of a question (a hide), or of every active question of
    ``asker_id`` (a ban): whatever this node's memory holds of it, as another node may run it whose news has
    not come here. Its stored progress is marked stopped (``records.stopped_for_good``) of the most stages
    run that either counts: the store's, or ``stages_run`` (this node's memory: a stage being delivered in
    batches has not stored its progress yet). A question without an escalation row has none to stop."""

    at: int
    question_id: str = ""
    asker_id: str = ""
    stages_run: int = 0


@attrs.frozen
class SaveNotified:
    """Record users notified for a question: ``(user_id, stage, distance_m, online)``."""

    question_id: str
    targets: tuple[tuple[str, str, float | None, bool], ...]
    at: int


@attrs.frozen
class EnqueuePush:
    """Put a push job in the durable outbox."""

    job: PushJob


@attrs.frozen
class SavePushStatus:
    """Record a push job's delivery attempts and outcome."""

    job_id: int
    status: str
    attempts: int
    last_error: str | None
    at: int


@attrs.frozen
class CancelPushes:
    """Mark ``cancelled`` the pending push jobs of a question (of one of its answers, if ``answer_id``), or to a
    user: what was taken down, or who was banned, is not pushed (not even after a restart)."""

    at: int
    question_id: str = ""
    answer_id: str = ""
    user_id: str = ""


@attrs.frozen
class RoomNews:
    """A room event that follows this commit, for the question's room members on other nodes (several nodes,
    ``store/CLUSTER.md``): announced inside the commit, so only if it succeeds (PostgreSQL with news on;
    otherwise nothing). Writes no row."""

    question_id: str
    kind: str  # "new_answer", "answer_accepted" or "answer_deleted"
    data: dict[str, Any]


@attrs.frozen
class IfOpen:
    """Commit the outcome holding this only if its question is still open in the store (active, neither
    deleted nor hidden): an escalation stage's guard (PostgreSQL, ``store/CLUSTER.md``). Another node may
    have ended or taken it down before its news came here; then nothing of the outcome is stored or sent,
    the rest of the commit goes on, and the engine hears ``StageRefused``. Writes no row.

    ``alerted``: the stage's alerts in the outcome, ``(user_id, when their hourly caps counted it)``, for
    the engine to take back if it is refused.
    """

    question_id: str
    alerted: tuple[tuple[str, int], ...] = ()


Write = (
    SaveUser
    | AddPoints
    | SaveQuestion
    | CountAnswer
    | AcceptOnce
    | CloseOnce
    | SaveAnswer
    | DeliverAnswer
    | AppendEvent
    | SaveEscalation
    | StopEscalating
    | SaveNotified
    | EnqueuePush
    | SavePushStatus
    | CancelPushes
    | AppendAudit
    | SaveReport
    | SaveIpBlock
    | DeleteIpBlock
    | RoomNews
    | IfOpen
)


def rows_of(writes: tuple[Write, ...] | list[Write]) -> int:
    """How many table rows ``writes`` insert or replace (a SaveNotified is one per target)."""
    return sum(
        len(w.targets) if isinstance(w, SaveNotified) else 0 if isinstance(w, (RoomNews, IfOpen)) else 1 for w in writes
    )


# ---- actions -----------------------------------------------------------------


@attrs.frozen
class Send:
    """Send one server frame (a msgpack map) to each of ``conn_ids``.

    The driver encodes the frame once, whatever the number of recipients.
    """

    conn_ids: tuple[int, ...]
    frame: dict[str, Any]


@attrs.frozen
class SendEach:
    """Send frames already packed, each to its own connections: a stage's alerts.

    Each alert is its own frame (its seq and distance are the local's), but
    they share their type: ``frames`` is ``(conn_ids, seq, msgpack of the
    frame)``, one per alert, and ``kind`` their type, which the driver counts
    once per batch. An escalation stage sends hundreds; as one action with
    bytes, not a dict and a :class:`Send` each, they cost a fraction of the
    objects (``OutcomeBuilder.send_packed`` fills it).
    """

    kind: str
    frames: list[tuple[tuple[int, ...], int, bytes]]


@attrs.frozen
class Close:
    """Close a connection with a WebSocket close code."""

    conn_id: int
    code: int
    reason: str


@attrs.frozen
class Replay:
    """Send ``user_id``'s durable events with ``after_seq < seq <= up_to_seq`` to a connection.

    Live frames for that connection wait until the replay is written. Every
    ``hello`` has one: ``after_seq == up_to_seq`` (nothing to replay) says
    where the connection's durable stream starts, so the driver can tell a
    duplicate or a gap from the next event (events another node appended).
    """

    conn_id: int
    user_id: str
    after_seq: int
    up_to_seq: int


@attrs.frozen
class RelayRoom:
    """Tell the question's room members on other nodes (several nodes, ``store/CLUSTER.md``): an ephemeral
    room event (typing, presence) the driver sends outside any commit, lossy; nothing on one node."""

    question_id: str
    kind: str  # "user_typing" | "user_stop_typing" | "user_online" | "user_offline"
    data: dict[str, Any]


@attrs.frozen
class StartEscalation:
    """Run the escalation task of a question: its stages are due until ``until`` (ms)."""

    question_id: str
    until: int


@attrs.frozen
class CancelEscalation:
    """Cancel a question's escalation task (accepted or closed)."""

    question_id: str


@attrs.frozen
class Push:
    """Hand a committed push job to the push dispatcher."""

    job: PushJob


@attrs.frozen
class DropPushes:
    """Tell the push dispatcher to drop the jobs it holds that ``CancelPushes`` with these keys cancels."""

    question_id: str = ""
    answer_id: str = ""
    user_id: str = ""


@attrs.frozen
class Alert:
    """POST an operators' alert to the alert webhook now, outside the outbox (it may be the outbox that fails)."""

    kind: str
    data: dict[str, Any]


@attrs.frozen
class BlockAddresses:
    """The run-time IP blocks now in force (all of them): refuse new connections from them, close existing ones."""

    cidrs: tuple[str, ...]


@attrs.frozen
class Observe:
    """Record a duration metric once committed: (now - ``since_ms``) seconds."""

    metric: str  # "escalation_stage_latency" | "time_to_first_answer"
    since_ms: int
    label: str


@attrs.frozen
class Note:
    """Something worth a log line once committed (ids and counts, never user text)."""

    event: str
    fields: dict[str, Any]


Action = (
    Send
    | SendEach
    | Close
    | Replay
    | RelayRoom
    | StartEscalation
    | CancelEscalation
    | Push
    | DropPushes
    | Alert
    | BlockAddresses
    | Observe
    | Note
)


@attrs.frozen
class Outcome:
    """What one engine call decided.

    Attributes:
        writes: rows to commit, in one transaction.
        actions: what to do once they are committed, in order.
        op: for a frame, what it was (an operation's name, ``"unknown"`` or
            ``"invalid"``), for the driver's metrics; empty otherwise.
        error: the error code of the reply, if the request was refused.
        load_question: a question the request names that is not in memory:
            the driver reads it from the store and hands it back in a
            ``QuestionLoaded`` event, before anything else from that
            connection. ``writes`` and ``actions`` are empty then.
        request: ``(conn_id, request id)`` of the request this outcome
            answers, so that the driver can refuse it if its writes cannot
            be committed.
        read: a query for the store (``core.reads``): the driver runs it and
            hands its rows back in a ``ReadDone`` event, before anything else
            from that connection. ``writes`` and ``actions`` are empty then.
        load_user: a hello's user, not in memory, on a store other nodes share
            (``Engine.shared_store``): the driver reads the user's row (with
            the inbox head) and hands it back in a ``UserLoaded`` event, before
            anything else from that connection. ``writes`` and ``actions`` are
            empty then.
    """

    writes: tuple[Write, ...] = ()
    actions: tuple[Action, ...] = ()
    op: str = ""
    error: str | None = None
    load_question: str | None = None
    request: tuple[int, int | None] | None = None
    read: Read | None = None
    load_user: str | None = None


class OutcomeBuilder:
    """Accumulates writes and actions while one engine call runs."""

    __slots__ = ("actions", "writes")

    def __init__(self) -> None:
        self.writes: list[Write] = []
        self.actions: list[Action] = []

    def write(self, item: Write) -> None:
        self.writes.append(item)

    def send(self, conn_ids: tuple[int, ...] | list[int] | set[int], frame: dict[str, Any]) -> None:
        targets = tuple(sorted(conn_ids))
        if targets:
            self.actions.append(Send(targets, frame))

    def send_packed(self, conn_ids: tuple[int, ...] | list[int] | set[int], kind: str, seq: int, packed: bytes) -> None:
        """Send a durable event of type ``kind`` already packed; joins the last action if it is a :class:`SendEach` of that kind."""
        targets = tuple(sorted(conn_ids))
        if not targets:
            return
        actions = self.actions
        last = actions[-1] if actions else None
        if type(last) is SendEach and last.kind == kind:
            last.frames.append((targets, seq, packed))
        else:
            actions.append(SendEach(kind, [(targets, seq, packed)]))

    def act(self, action: Action) -> None:
        self.actions.append(action)

    def note(self, event: str, **fields: Any) -> None:
        self.actions.append(Note(event, fields))

    def build(self, op: str = "", error: str | None = None, request: tuple[int, int | None] | None = None) -> Outcome:
        return Outcome(tuple(self.writes), tuple(self.actions), op, error, request=request)
