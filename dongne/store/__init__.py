"""Durable storage behind one interface (``Storage``): SQLite in WAL mode (the default) or PostgreSQL;
schema migrations, group commit, snapshots (SQLite).

``PostgresStore`` lives in ``dongne.store._postgres`` and needs psycopg (the
``postgres`` extra); ``store_for`` imports it only for a ``postgresql://`` URL. So does
``dongne.store._cluster`` (membership, the escalation lease, LISTEN: the
groundwork for several nodes, ``CLUSTER.md``).
"""

from ._backup import DatabaseInUseError as DatabaseInUseError
from ._backup import InvalidSnapshotError as InvalidSnapshotError
from ._backup import SnapshotCancelled as SnapshotCancelled
from ._backup import SnapshotError as SnapshotError
from ._backup import check_not_in_use as check_not_in_use
from ._backup import hold_database_lock as hold_database_lock
from ._backup import list_snapshots as list_snapshots
from ._backup import prune_snapshots as prune_snapshots
from ._backup import restore_snapshot as restore_snapshot
from ._backup import take_snapshot as take_snapshot
from ._interface import Conflict as Conflict
from ._interface import LeaseLost as LeaseLost
from ._interface import QuestionEnded as QuestionEnded
from ._interface import SeqConflict as SeqConflict
from ._interface import SeqsGiven as SeqsGiven
from ._interface import Storage as Storage
from ._interface import StoreError as StoreError
from ._interface import WriteFailed as WriteFailed
from ._interface import is_postgres_url as is_postgres_url
from ._open import store_for as store_for
from ._schema import MIGRATIONS as MIGRATIONS
from ._schema import SCHEMA_VERSION as SCHEMA_VERSION
from ._sqlite import Store as Store
from ._writes import MAX_ROWS_PER_STATEMENT as MAX_ROWS_PER_STATEMENT
from ._writes import PreparedCommit as PreparedCommit

__all__ = [
    "MAX_ROWS_PER_STATEMENT",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Conflict",
    "DatabaseInUseError",
    "InvalidSnapshotError",
    "LeaseLost",
    "PreparedCommit",
    "QuestionEnded",
    "SeqConflict",
    "SeqsGiven",
    "SnapshotCancelled",
    "SnapshotError",
    "Storage",
    "Store",
    "StoreError",
    "WriteFailed",
    "check_not_in_use",
    "hold_database_lock",
    "is_postgres_url",
    "list_snapshots",
    "prune_snapshots",
    "restore_snapshot",
    "store_for",
    "take_snapshot",
]
