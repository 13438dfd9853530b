"""Which store a `database` setting names, and opening it: a PostgreSQL URL or a SQLite file path.

The one module that knows both backends, so that neither `chatserver.store` (the interface they implement) nor
a backend imports the other.
"""

from __future__ import annotations

from chatserver.postgres import PostgresStore
from chatserver.sqlite import SQLiteStore
from chatserver.store import Store, is_postgres_url


def open_store(db: str, *, pool_size: int = 4) -> Store:
    """The backend for a `db` setting: a PostgreSQL URL or a SQLite file path. Not started yet (`start()`)."""
    if is_postgres_url(db):
        return PostgresStore(db, pool_size=pool_size)
    return SQLiteStore(db)
