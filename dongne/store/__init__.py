"""Durable storage: SQLite in WAL mode, schema migrations, group commit, snapshots."""

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
from ._schema import MIGRATIONS as MIGRATIONS
from ._schema import SCHEMA_VERSION as SCHEMA_VERSION
from ._sqlite import Store as Store
from ._sqlite import StoreError as StoreError
from ._sqlite import WriteFailed as WriteFailed
from ._writes import MAX_ROWS_PER_STATEMENT as MAX_ROWS_PER_STATEMENT
from ._writes import PreparedCommit as PreparedCommit

__all__ = [
    "MAX_ROWS_PER_STATEMENT",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "DatabaseInUseError",
    "InvalidSnapshotError",
    "PreparedCommit",
    "SnapshotCancelled",
    "SnapshotError",
    "Store",
    "StoreError",
    "WriteFailed",
    "check_not_in_use",
    "hold_database_lock",
    "list_snapshots",
    "prune_snapshots",
    "restore_snapshot",
    "take_snapshot",
]
