"""Choosing the backend: a ``postgresql://`` URL or a SQLite file path."""

from __future__ import annotations

from pathlib import Path

from ._interface import Storage, StoreError, is_postgres_url
from ._sqlite import Store

__all__ = ["store_for"]


def store_for(
    target: str | Path,
    *,
    synchronous: str = "FULL",
    background_checkpoints: bool = False,
    busy_timeout_s: float = 30.0,
) -> Storage:
    """The store for ``--db`` / ``[store] url``, not yet open.

    Args:
        target: a ``postgresql://`` (or ``postgres://``) URL in libpq's syntax, or a SQLite file path.
        synchronous: SQLite's ``synchronous`` (PostgreSQL commits durably, as configured on its server).
        background_checkpoints: SQLite only (see ``Store``).
        busy_timeout_s: how long a commit waits for a lock another program holds.

    Raises:
        StoreError: a PostgreSQL URL, and psycopg is not installed.
    """
    if isinstance(target, str) and is_postgres_url(target):
        try:
            from ._postgres import PostgresStore
        except ImportError:
            raise StoreError("a postgresql:// database needs psycopg 3: pip install 'dongne[postgres]'") from None
        return PostgresStore(target, lock_timeout_s=busy_timeout_s)
    return Store(
        target, synchronous=synchronous, background_checkpoints=background_checkpoints, busy_timeout_s=busy_timeout_s
    )
