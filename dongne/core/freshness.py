"""Which copies of a question read from the store may be older than a change made here.

A question out of memory (ended, older than the hot set) is read from the
store on demand, on a worker thread, and may be changed in the store only
meanwhile: hidden or shown again by a moderator, an answer marked
``delivered``. A copy read before such a change and used after it would
bring the question back as it was (served to everyone, written back), so a
read notes when it began (:attr:`Freshness.now`) and is read again if its
question changed since (:meth:`Freshness.stale`). The driver runs every read
after the commits queued before it, so the second read sees the change.
"""

from __future__ import annotations

__all__ = ["Freshness"]


class Freshness:
    """Counts the store-only changes of questions; keeps the latest ``kept`` questions' apart.

    A read begun before the oldest change no longer kept, or before a
    :meth:`reloaded`, is stale whatever its question: a read again, never a
    wrong copy.
    """

    def __init__(self, kept: int = 1000) -> None:
        self._kept = kept
        self._count = 0
        self._changed: dict[str, int] = {}  # question id -> the count after its latest change, oldest first
        self._forgotten = 0  # reads begun below this count are stale: their changes are no longer kept

    @property
    def now(self) -> int:
        """What a read beginning now notes, to ask :meth:`stale` when its copy comes."""
        return self._count

    def changed(self, question_id: str) -> None:
        """The question (or one of its answers) changed in a way a copy read before would not show."""
        self._count += 1
        self._changed.pop(question_id, None)  # the newest last
        self._changed[question_id] = self._count
        if len(self._changed) > self._kept:
            self._forgotten = self._changed.pop(next(iter(self._changed)))

    def stale(self, question_id: str, begun: int) -> bool:
        """Whether a copy of the question read from ``begun`` on may predate a change of it."""
        return begun < max(self._forgotten, self._changed.get(question_id, 0))

    def reloaded(self) -> None:
        """Memory was read from the store again: a read begun before may predate what it now holds."""
        self._changed.clear()
        self._forgotten = self._count
