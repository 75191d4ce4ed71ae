"""Durable storage: SQLite in WAL mode, schema migrations, group commit."""

from ._schema import MIGRATIONS as MIGRATIONS
from ._schema import SCHEMA_VERSION as SCHEMA_VERSION
from ._sqlite import Store as Store

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Store"]
