"""One node's rows of a shared table out in batches; other nodes' rows in, as a replica (store/CLUSTER.md).

Theory of operation: with several nodes on one PostgreSQL database, some
live state (where connected users are, who is in which question's room) is
kept as rows per node in a table of its own. Each node diffs what its engine
holds against what it wrote and writes the difference in one statement every
interval, announcing the keys it changed; the others read those keys' rows
back and hand them to their engines as one core event. The table is the
truth and the notification only says "look": after each (re)connection of the
LISTEN connection the whole table is read again (a rebuild).

:class:`TableSync` is that shape once; ``positions.PositionSync`` and
``members.MemberSync`` fill in what is written, how, and what is read back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

import trio

from .core import Engine, Event, User
from .store import StoreError

if TYPE_CHECKING:  # psycopg is optional (the postgres extra)
    from .store._cluster import ClusterLink

__all__ = ["RETRY_S", "TableSync"]

#: How long to wait before reading the table again after a read failed.
RETRY_S = 1.0

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TableSync(Generic[K, V]):
    """This node's rows out to the store, and other nodes' in to the engine.

    Subclasses say what the node's rows should be (:meth:`wanted`), how a batch
    is written (:meth:`write`), how news is read (:meth:`read_news`) and what a
    read of the announced keys (or of all, for a rebuild) feeds the engine
    (:meth:`read`).

    Args:
        link: a connection of its own to the database (heartbeats never wait for a batch).
        node_id: this node's id (the rows it owns; its own news is skipped).
        engine: the engine, read for what this node's rows should be and who it knows.
        feed: hands the engine an event (``ClientServer.feed``).
        interval_s: how often changed rows are written (inf: never; the replica still follows others).

    Error handling: a batch that cannot be written is tried again, whole, at
    the next interval; a read that fails is tried again after ``RETRY_S``.
    """

    #: The table's name in logs (``<name>_write_failed``, ``<name>_read_failed``, ``<name>_news_unreadable``).
    name = "rows"

    def __init__(
        self,
        link: ClusterLink,
        node_id: str,
        engine: Engine,
        feed: Callable[[Event], None],
        *,
        interval_s: float = 0.5,
    ) -> None:
        self._link = link
        self._node_id = node_id
        self._engine = engine
        self._feed = feed
        self._interval_s = interval_s
        self._log = logging.getLogger(f"dongne.{self.name}")
        self._written: dict[K, V] = {}  # what the table holds for this node
        self._wanted: set[str] = set()  # keys other nodes announced, to read
        self._rebuild = False
        self._wakeup = trio.Event()
        self.batches = 0  # written so far
        self.applied = 0  # reads applied so far (news or rebuilds)

    # ---- what subclasses fill in ---------------------------------------------------

    def wanted(self) -> dict[K, V]:
        """What the table should hold for this node now (read from the engine, on the event loop)."""
        raise NotImplementedError

    async def write(self, changed: dict[K, V], gone: Sequence[K]) -> None:
        """Write one batch: ``changed`` rows upserted, ``gone`` rows deleted, announced (raises StoreError)."""
        raise NotImplementedError

    def read_news(self, payload: str) -> tuple[str, list[str] | None]:
        """``(origin node, keys)`` of a notification; keys None: read everything. Raises ValueError."""
        raise NotImplementedError

    async def read(self, keys: list[str] | None) -> Event:
        """The event that brings the engine other nodes' rows of ``keys`` (None: every row, a rebuild)."""
        raise NotImplementedError

    async def users_first_seen(self, user_ids: Iterable[str]) -> list[User]:
        """The rows of those of ``user_ids`` the engine does not know (made on another node since it loaded),
        read for it to adopt."""
        unknown = sorted(set(user_ids) - self._engine.users.keys())
        return await trio.to_thread.run_sync(self._link.read_users, unknown) if unknown else []

    # ---- out ----------------------------------------------------------------------

    def write_all_again(self) -> None:
        """The next batch writes every row, changed or not (``Membership.on_registered``: the node's peers
        expired it and deleted its rows; at the first registration there is nothing written yet)."""
        self._written.clear()

    async def publish(self) -> int:
        """Write the rows that changed since the last batch and delete the ones gone; how many."""
        wanted, written = self.wanted(), self._written
        changed = {key: value for key, value in wanted.items() if key not in written or written[key] != value}
        gone = [key for key in written if key not in wanted]
        if not changed and not gone:
            return 0
        try:
            await self.write(changed, gone)
        except StoreError as exc:
            self._log.warning(f"{self.name}_write_failed", extra={"error": str(exc), "rows": len(changed) + len(gone)})
            return 0
        written.update(changed)
        for key in gone:
            written.pop(key, None)
        self.batches += 1
        return len(changed) + len(gone)

    async def publish_periodically(self) -> None:
        """:meth:`publish` every ``interval_s``; at the end, this node's rows are deleted (by ``Membership``)."""
        if math.isinf(self._interval_s):
            return
        while True:
            await trio.sleep(self._interval_s)
            await self.publish()

    # ---- in -----------------------------------------------------------------------

    def news(self, channel: str, payload: str) -> None:
        """A notification on the table's channel (``cluster.Listener``); this node's own are skipped."""
        try:
            origin, keys = self.read_news(payload)
        except ValueError:
            self._log.warning(f"{self.name}_news_unreadable", extra={"channel": channel, "payload": payload[:80]})
            return
        if origin == self._node_id:
            return
        if keys is None:
            self._rebuild = True
        else:
            self._wanted.update(keys)
        self._wakeup.set()

    def rebuild_soon(self) -> None:
        """Read the whole table (the LISTEN connection was (re)made: news may have been missed)."""
        self._rebuild = True
        self._wakeup.set()

    async def apply_forever(self) -> None:
        """Read what other nodes announced (or everything, for a rebuild) and hand it to the engine."""
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            try:
                await self.apply()
            except StoreError as exc:  # a read the database refused: again, later
                self._log.warning(f"{self.name}_read_failed", extra={"error": str(exc)})
                await trio.sleep(RETRY_S)
                self._wakeup.set()

    async def apply(self) -> None:
        """One read of the announced keys' rows (all rows after a rebuild was asked for), fed to the engine.

        On failure what was asked stays asked.
        """
        rebuild, wanted = self._rebuild, self._wanted
        if not rebuild and not wanted:
            return
        self._rebuild, self._wanted = False, set()
        try:
            event = await self.read(None if rebuild else sorted(wanted))
        except BaseException:
            self._rebuild = self._rebuild or rebuild
            self._wanted |= wanted
            raise
        self._feed(event)
        self.applied += 1
