"""What the driver needs of a store, whichever database is behind it.

Two backends implement :class:`Storage`: SQLite (``_sqlite.Store``, the
embedded default) and PostgreSQL (``_postgres.PostgresStore``). Every call is
blocking and is made from a worker thread (``trio.to_thread.run_sync``);
only :meth:`Storage.prepare` is pure Python, run on the event loop.

Theory of operation: the driver commits through one writer (the pipeline's
committer, one call at a time), and reads on as many threads as it likes.
A commit either happens whole or raises :class:`WriteFailed` with nothing of
it in the database; reads are never refused because writes fail.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from ..core.effects import Write
from ..core.reads import Read
from ..core.records import Answer, EscalationProgress, LoadedState, PushJob, Question, User
from ._writes import PreparedCommit, SeqsGiven

__all__ = [
    "Conflict",
    "LeaseLost",
    "QuestionEnded",
    "SeqConflict",
    "SeqsGiven",
    "Storage",
    "StoreError",
    "WriteFailed",
    "is_postgres_url",
]


class StoreError(RuntimeError):
    """The database cannot be used (newer schema, unreadable file, a server that cannot be reached)."""


class WriteFailed(StoreError):
    """A transaction could not be committed (disk full, I/O error, the database locked by another program,
    the connection to PostgreSQL lost).

    Nothing of it is in the database: it was rolled back. Reads still work.
    """


class LeaseLost(WriteFailed):
    """A commit carrying a lease epoch (``PreparedCommit.guard_lease``) was refused: another node holds
    the lease now. Nothing of it is in the database; the node must stop acting as the lease's holder.

    Attributes:
        epoch: the epoch the refused commit carried, when the committer knows it (``CommitPipeline`` sets it).
    """

    epoch: int | None = None


class SeqConflict(WriteFailed):
    """A commit's event took a seq already stored: a writer appended to an inbox without moving its head
    (PostgreSQL commits give seqs from the heads, ``InboxAppends``). Nothing of it is in the database.
    """


class Conflict(WriteFailed):
    """A guarded question write found the question no longer as this node saw it (``CountAnswer``,
    ``AcceptOnce``, ``CloseOnce``): another node answered the race first (several nodes; ``CLUSTER.md``).
    Nothing of the commit is in the database.

    Attributes:
        question_id: the question.
        what: the write refused: ``"answer"`` (the question is no longer open), ``"accept"`` (an answer was
            accepted or the question ended), ``"close"`` (it ended).
    """

    def __init__(self, message: str, question_id: str, what: str) -> None:
        super().__init__(message)
        self.question_id = question_id
        self.what = what


class QuestionEnded(WriteFailed):
    """A commit holding escalation stages (``IfOpen``) found some of their questions ended or taken down in
    the store (another node's accept, close, delete or hide; several nodes, ``CLUSTER.md``). Nothing of the
    commit is in the database; without those stages it may be committed again.

    Attributes:
        question_ids: the questions whose stages must not be committed.
    """

    def __init__(self, message: str, question_ids: tuple[str, ...]) -> None:
        super().__init__(message)
        self.question_ids = question_ids


class Storage(Protocol):
    """The store as the driver uses it (see the module docstring)."""

    #: Transactions and rows committed since ``open`` (the WAL checkpointer and metrics count them).
    commits: int
    rows_committed: int
    #: The database's incarnation, read at ``open``: push job ids are unique within one (``SqlStore``).
    incarnation: str

    @property
    def location(self) -> str:
        """Where the data is, for logs: a file path, or a URL without its password."""
        ...

    def open(self) -> None:
        """Open (creating or migrating) the database.

        Raises:
            StoreError: it cannot be opened, reached or migrated; the one-line message says why.
        """
        ...

    def close(self) -> None: ...

    def prepare(self, writes: Sequence[Write]) -> PreparedCommit:
        """Turn writes into the statements of one transaction (pure Python, no I/O)."""
        ...

    def commit(self, batch: PreparedCommit) -> SeqsGiven:
        """Run a prepared transaction; returns the seqs it gave where they differ from the engine's
        (PostgreSQL, when another node appended to a user's inbox first; ``InboxAppends``).

        Raises:
            WriteFailed: nothing of it was committed.
        """
        ...

    def apply(self, writes: Sequence[Write]) -> SeqsGiven:
        """``commit(prepare(writes))``."""
        ...

    def probe(self) -> None:
        """Commit a write that changes nothing, to learn whether writes work again.

        Raises:
            WriteFailed: they do not.
        """
        ...

    def claim_signin_code(self, nonce: str, expires_s: float, now_s: float) -> bool:
        """Record an admin sign-in code as used until ``expires_s``, forgetting those expired by ``now_s``.

        Returns:
            True if this call used it; False if it was used already (here, before a restart, or on
            another node).

        Raises:
            WriteFailed: nothing was recorded.
        """
        ...

    def load(
        self, *, hot_since: int, alerts_since: int | None = None, pushes_since: int | None = None, pushes: int = -1
    ) -> LoadedState:
        """Everything the engine keeps in memory (see ``LoadedState``); the records of alerts are read from
        ``alerts_since`` if that is earlier than ``hot_since`` (the caps' window, with a short hot set). Of
        this node's pending push jobs, those made before ``pushes_since`` are marked ``expired`` (too old to
        send), and at most ``pushes`` (negative: all) of the others are read, oldest first."""
        ...

    def pending_push_jobs(self, after_job_id: int, limit: int) -> list[PushJob]:
        """At most ``limit`` (negative: all) of this node's pending push jobs with ids above ``after_job_id``,
        oldest first."""
        ...

    def adopt_push_jobs(self, limit: int, since_ms: int) -> list[PushJob]:
        """Take over at most ``limit`` pending push jobs of nodes gone from the cluster (``SqlStore``)."""
        ...

    def read(self, query: Read) -> Any:
        """Answer a read path's query (``core.reads``) with records."""
        ...

    def find_question(self, question_id: str) -> tuple[Question, list[Answer]] | None: ...

    def read_rows(
        self, question_ids: Iterable[str], user_ids: Iterable[str]
    ) -> tuple[list[tuple[str, Question | None, list[Answer]]], list[User]]:
        """Questions (deleted ones too) with all their answers, and users, as committed (``SqlStore.read_rows``)."""
        ...

    def read_escalations(self, question_ids: Iterable[str]) -> dict[str, EscalationProgress]:
        """The escalation progress of those active questions that have one (``SqlStore.read_escalations``)."""
        ...

    def read_changes(self) -> tuple[list[str], list[str]]:
        """Ids of the questions and users changed since the last call or ``load`` (PostgreSQL; SQLite: none)."""
        ...

    def read_heads(self, user_ids: Iterable[str]) -> dict[str, int]:
        """Each user's newest durable seq as committed (0: none), by user id."""
        ...

    def read_oldest(self, user_ids: Iterable[str]) -> dict[str, int]:
        """Each user's oldest durable seq still kept, by user id (users without events left out)."""
        ...

    def read_event_rows(self, wanted: Sequence[tuple[str, int, int]]) -> dict[str, list[tuple[int, str, bytes]]]:
        """For each ``(user, after_seq, up_to_seq)``, the user's durable events in that range, in seq order,
        ``data`` as stored (msgpack), except that an event whose question or answer is deleted or hidden
        keeps only its ids (``core.inbox.removed``): several replays in one call."""
        ...

    def prune_events(self, before_ms: int, limit: int) -> dict[str, int]:
        """Delete at most ``limit`` durable events older than ``before_ms``, keeping each user's newest.

        Returns:
            The new oldest seq of each user who lost events.

        Raises:
            WriteFailed: nothing was deleted.
        """
        ...

    def prune_pushes(self, before_ms: int, limit: int) -> int:
        """Delete at most ``limit`` settled push jobs (not ``pending``) last changed before ``before_ms``.

        Returns:
            How many were deleted.

        Raises:
            WriteFailed: nothing was deleted.
        """
        ...

    def prune_alerts(self, before_ms: int, limit: int) -> int:
        """Delete at most ``limit`` alert records (``notified``) older than ``before_ms``, but for active questions'.

        Returns:
            How many were deleted.

        Raises:
            WriteFailed: nothing was deleted.
        """
        ...


def is_postgres_url(target: str) -> bool:
    """Whether ``--db`` / ``[store] url`` names a PostgreSQL database rather than a SQLite file."""
    return target.startswith(("postgresql://", "postgres://"))
