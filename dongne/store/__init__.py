"""Durable storage: SQLite in WAL mode, schema migrations, group commit."""

from ._schema import MIGRATIONS as MIGRATIONS, SCHEMA_VERSION as SCHEMA_VERSION
from ._sqlite import Store as Store

__all__ = ["Store", "MIGRATIONS", "SCHEMA_VERSION"]
