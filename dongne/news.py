"""Other nodes' news (several nodes on one PostgreSQL database; ``store/CLUSTER.md``): the questions and users
they changed, read back into memory, who their stages alerted, and room events, both ways.

Theory of operation: commits announce the rows they change on
``dongne_changes`` and the rooms' events on ``dongne_rooms``; the app's
Listener hands each notification here. The store is the truth and the bus is
lossy: a notification only names rows to read again (``follow_changes``, in
rounds, merged by the engine: ``UsersChanged`` with where their kept events
start, ``InboxPruned``; ``QuestionChanged``), and the
catch-up (``catch_up_changes``) reads the rows changed since its last look.
Commits also announce who their escalation stages alerted on
``dongne_alerts``; those go to the engine as they come (``RemoteAlerts``, no
read), so that the hourly caps here count the lease holder's alerts (and the
holder those of the IMMEDIATE stages other nodes run). A lost one is read
from the store only when an escalation is taken up or reloaded.
Room events are ephemeral: another node's go to this node's members of the
room (``RoomRelayed``); this node's typing and presence go out through one
task (``relay_rooms``) and a bounded queue that drops rather than waits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import trio

from .core import (
    Answer,
    EscalationProgress,
    Event,
    InboxPruned,
    Question,
    QuestionChanged,
    RelayRoom,
    RemoteAlerts,
    RoomRelayed,
    User,
    UsersChanged,
)
from .store import Storage, StoreError
from .store._writes import ROOMS_CHANNEL, read_alerts_news, read_changes_news, read_room_news, room_news

__all__ = ["ROOM_RELAY_QUEUE", "NodeNews"]

log = logging.getLogger("dongne.news")

#: Room events waiting to be relayed to other nodes; past it they are dropped (typing and presence).
ROOM_RELAY_QUEUE = 1000

#: How long a failed read of changed rows waits before it is tried again.
RETRY_S = 1.0


class NodeNews:
    """Other nodes' changed rows and room events in, this node's room events out.

    Args:
        store: the open store (``read_rows``, ``read_changes``; blocking: on worker threads).
        feed: hands the engine an event (and its outcome to the pipeline).
        spawn: starts a task beside the connections.
        node_id: this node's id (its own news is skipped).
        follows_escalation: whether the engine keeps a question's escalation progress
            (``Engine.follows_escalation``); for the others it is read with the question.
    """

    def __init__(
        self,
        store: Storage,
        feed: Callable[[Event], None],
        spawn: Callable[..., None],
        node_id: Callable[[], str],
        follows_escalation: Callable[[str], bool] = lambda question_id: True,
    ) -> None:
        self._store = store
        self._feed = feed
        self._spawn = spawn
        self._node_id = node_id
        self._follows_escalation = follows_escalation
        self._changed_questions: set[str] = set()
        self._changed_users: set[str] = set()
        self._changes_wakeup = trio.Event()
        #: Sends a notification outside any commit (``ClusterLink.notify``; the app sets it on PostgreSQL);
        #: None: one node, nothing to relay.
        self.notify_outside: Callable[[str, str], None] | None = None
        self._rooms_out, self._rooms_in = trio.open_memory_channel[str](ROOM_RELAY_QUEUE)
        #: Room events not relayed (queue full, too large, or the notification failed).
        self.room_relays_dropped = 0
        #: Rounds of other nodes' changes merged into memory, for tests and logs.
        self.changes_followed = 0

    def changes_news(self, channel: str, payload: str) -> None:
        """A notification on ``dongne_changes``: questions and users another node changed; ours are skipped."""
        try:
            origin, questions, users = read_changes_news(payload)
        except ValueError:
            log.warning("changes_news_unreadable", extra={"channel": channel, "payload": payload[:80]})
            return
        if origin != self._node_id():
            self.rows_changed(questions, users)

    def alerts_news(self, channel: str, payload: str) -> None:
        """A notification on ``dongne_alerts``: who another node's stages alerted, for the hourly caps here
        (``RemoteAlerts``, one event per notification); ours are skipped (counted when they were planned)."""
        try:
            origin, alerts = read_alerts_news(payload)
        except ValueError:
            log.warning("alerts_news_unreadable", extra={"channel": channel, "payload": payload[:80]})
            return
        if origin != self._node_id() and alerts:
            self._feed(RemoteAlerts(tuple(alerts)))

    def rows_changed(self, questions: Iterable[str], users: Iterable[str]) -> None:
        """These rows may differ from memory: :meth:`follow_changes` reads them and merges them in."""
        self._changed_questions.update(questions)
        self._changed_users.update(users)
        if self._changed_questions or self._changed_users:
            self._changes_wakeup.set()

    async def follow_changes(self) -> None:
        """Read the rows :meth:`rows_changed` names and merge them into memory (``UsersChanged``,
        ``QuestionChanged``), in rounds: what is named during a read waits for the next.

        A question whose escalation the engine does not follow (asked on
        another node) comes with its escalation's progress: the engine takes
        it up, and the node holding the escalation lease runs the stages left.

        Error handling: a read that fails is logged and tried again a second
        later with the same rows (and any named since).
        """
        while True:
            await self._changes_wakeup.wait()
            self._changes_wakeup = trio.Event()
            questions, self._changed_questions = self._changed_questions, set()
            users, self._changed_users = self._changed_users, set()
            unfollowed = sorted(q for q in questions if not self._follows_escalation(q))
            try:
                found, people, progress, oldest = await trio.to_thread.run_sync(
                    self._read, sorted(questions), sorted(users), unfollowed
                )
            except StoreError as exc:
                log.warning("changes_read_failed", extra={"error": str(exc)})
                self.rows_changed(questions, users)
                await trio.sleep(RETRY_S)
                continue
            if people:
                self._feed(UsersChanged(tuple(people)))
            if oldest:
                self._feed(InboxPruned(oldest))
            for question_id, question, answers in found:
                self._feed(QuestionChanged(question_id, question, tuple(answers), progress.get(question_id)))
            self.changes_followed += 1

    def _read(
        self, questions: list[str], users: list[str], unfollowed: list[str]
    ) -> tuple[
        list[tuple[str, Question | None, list[Answer]]], list[User], dict[str, EscalationProgress], dict[str, int]
    ]:
        """One round's reads (blocking: on a worker thread): with the users, where their kept events start
        (another node's pruner may have deleted older ones: it names the users it pruned)."""
        found, people = self._store.read_rows(questions, users)
        progress = self._store.read_escalations(unfollowed) if unfollowed else {}
        oldest = self._store.read_oldest(users) if users else {}
        return found, people, progress, oldest

    async def catch_up_changes(self) -> None:
        """Read which questions and users changed since the last look (notifications may be lost) and follow them."""
        try:
            questions, users = await trio.to_thread.run_sync(self._store.read_changes)
        except StoreError as exc:
            log.warning("catch_up_failed", extra={"error": str(exc)})
            return
        self.rows_changed(questions, users)

    def relay(self, action: RelayRoom) -> None:
        """Queue an ephemeral room event for the other nodes (lossy: a full queue drops it)."""
        if self.notify_outside is None:
            return
        try:
            payload = room_news(self._node_id(), action.question_id, action.kind, action.data)
            self._rooms_out.send_nowait(payload)
        except (ValueError, trio.WouldBlock):
            self.room_relays_dropped += 1

    async def relay_rooms(self) -> None:
        """Send the queued room events, in order, one notification each (on a worker thread).

        Error handling: one that cannot be sent is logged and dropped (typing
        and presence are ephemeral).
        """
        notify = self.notify_outside
        assert notify is not None
        async for payload in self._rooms_in:
            try:
                await trio.to_thread.run_sync(notify, ROOMS_CHANNEL, payload)
            except StoreError as exc:
                self.room_relays_dropped += 1
                log.warning("room_relay_failed", extra={"error": str(exc)})

    def room_news(self, channel: str, payload: str) -> None:
        """A notification on ``dongne_rooms``: another node's room event, to this node's members of the room."""
        try:
            origin, question_id, kind, data = read_room_news(payload)
        except ValueError:
            log.warning("room_news_unreadable", extra={"channel": channel, "payload": payload[:80]})
            return
        if origin == self._node_id():
            return
        if kind == "new_answer" and not isinstance(data.get("answer"), dict):
            self._spawn(self._relay_after_reading, question_id, kind, data)  # too large to relay whole
            return
        self._feed(RoomRelayed(question_id, kind, data))

    async def _relay_after_reading(self, question_id: str, kind: str, data: dict[str, Any]) -> None:
        """A ``new_answer`` relayed by reference: read the question (and so the answer) first."""
        try:
            found, _ = await trio.to_thread.run_sync(self._store.read_rows, [question_id], [])
        except StoreError as exc:
            log.warning("room_news_read_failed", extra={"question_id": question_id, "error": str(exc)})
            return
        for qid, question, answers in found:
            self._feed(QuestionChanged(qid, question, tuple(answers)))
        self._feed(RoomRelayed(question_id, kind, data))
