"""The schema of each backend, as numbered migrations, and how a database is brought up to date.

One list per dialect; entry N-1 takes a database from version N-1 to N. Never edit a shipped entry: add one.
A step is SQL (statements split at ';', none holds one inside) or a function of the `Db` for what SQL alone
cannot say (the log's random id). Both lists end at the same tables, columns and meanings; `chatserver.queries`
and `chatserver.eventlog` are written once against them.

If you add a table or column here, add it to both lists, and to `tests/test_store.py`'s schema comparison.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from chatserver.store import Db

Step = str | Callable[[Db], Awaitable[None]]


async def _start_log(db: Db) -> None:
    """The log's name, made once, and its head: after every message already stored, so that message order (by
    position from now on) continues the order of the messages before the log (by their old sequence)."""
    last = await db.fetchval("SELECT coalesce(max(seq), 0) FROM messages")
    await db.execute(
        "INSERT INTO log_meta (id, log_id, head, floor) VALUES (1, ?, ?, ?)", secrets.token_hex(8), last, last
    )


_LOG_TABLES = """
    CREATE TABLE log_meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        log_id TEXT NOT NULL,
        head BIGINT NOT NULL,
        floor BIGINT NOT NULL
    );
    CREATE TABLE events (
        position {position} PRIMARY KEY,
        type TEXT NOT NULL,
        dialog_id TEXT NOT NULL,
        user_id TEXT,
        members_version BIGINT NOT NULL,
        change SMALLINT NOT NULL DEFAULT 0,
        source TEXT NOT NULL,
        data TEXT NOT NULL,
        extra TEXT
    );
    CREATE INDEX events_by_dialog ON events (dialog_id, position);
    CREATE INDEX events_by_user ON events (user_id, position) WHERE user_id IS NOT NULL;
    CREATE TABLE membership (
        dialog_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        from_version BIGINT NOT NULL,
        to_version BIGINT,
        PRIMARY KEY (dialog_id, user_id, from_version)
    );
    CREATE INDEX membership_by_user ON membership (user_id, dialog_id);
    CREATE TABLE outbound (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        position BIGINT NOT NULL,
        owner TEXT,
        lease_until BIGINT NOT NULL DEFAULT 0
    )
"""

SQLITE: tuple[Step, ...] = (
    """
    CREATE TABLE users (
        user_id TEXT PRIMARY KEY,
        phone TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE dialogs (
        dialog_id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        last_seq INTEGER NOT NULL DEFAULT 0,
        activity_at TEXT NOT NULL
    );
    CREATE TABLE dialog_members (
        dialog_id TEXT NOT NULL REFERENCES dialogs(dialog_id),
        user_id TEXT NOT NULL REFERENCES users(user_id),
        position INTEGER NOT NULL,
        last_read_seq INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (dialog_id, user_id)
    ) WITHOUT ROWID;
    CREATE INDEX dialog_members_by_user ON dialog_members (user_id, dialog_id);
    CREATE TABLE messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id TEXT NOT NULL UNIQUE,
        dialog_id TEXT NOT NULL REFERENCES dialogs(dialog_id),
        sender_id TEXT NOT NULL,
        content TEXT NOT NULL,
        type TEXT NOT NULL,
        meta TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        client_message_id TEXT
    );
    CREATE INDEX messages_by_dialog ON messages (dialog_id, seq);
    CREATE UNIQUE INDEX messages_by_client_id ON messages (dialog_id, sender_id, client_message_id)
        WHERE client_message_id IS NOT NULL;
    """,
    # 2: unread counts (messages after a read mark, not the reader's own) read the index alone, never the rows.
    # It serves history pages as the old index did.
    """
    CREATE INDEX messages_by_dialog_sender ON messages (dialog_id, seq, sender_id);
    DROP INDEX messages_by_dialog;
    """,
    # 3: the durable log. Each dialog's member list gets a version, and each member the periods (in versions) of
    # its membership, from what the dialogs hold now: version 1.
    _LOG_TABLES.format(position="INTEGER")  # noqa: S608 - the schema's own text, nothing from outside
    + """;
    ALTER TABLE dialogs ADD COLUMN members_version INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE dialogs ADD COLUMN created_by TEXT;
    INSERT INTO membership (dialog_id, user_id, from_version) SELECT dialog_id, user_id, 1 FROM dialog_members
    """,
    _start_log,
    # 5: receipts (PROTOCOL section 11): how far each member has been delivered each dialog, as a message seq.
    "ALTER TABLE dialog_members ADD COLUMN delivered_seq INTEGER NOT NULL DEFAULT 0",
)

# Every text is COLLATE "C": compared and ordered by bytes, as SQLite does, whatever the database's locale (and
# one collation everywhere, so that no comparison has two to choose from).
_POSTGRES_TABLES = """
    CREATE TABLE users (
        user_id TEXT PRIMARY KEY,
        phone TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE dialogs (
        dialog_id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        last_seq BIGINT NOT NULL DEFAULT 0,
        activity_at TEXT NOT NULL,
        members_version BIGINT NOT NULL DEFAULT 1,
        created_by TEXT
    );
    CREATE TABLE dialog_members (
        dialog_id TEXT NOT NULL REFERENCES dialogs(dialog_id),
        user_id TEXT NOT NULL REFERENCES users(user_id),
        position INTEGER NOT NULL,
        last_read_seq BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (dialog_id, user_id)
    );
    CREATE INDEX dialog_members_by_user ON dialog_members (user_id, dialog_id);
    CREATE TABLE messages (
        seq BIGINT PRIMARY KEY,
        message_id TEXT NOT NULL UNIQUE,
        dialog_id TEXT NOT NULL REFERENCES dialogs(dialog_id),
        sender_id TEXT NOT NULL,
        content TEXT NOT NULL,
        type TEXT NOT NULL,
        meta TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        client_message_id TEXT
    );
    CREATE INDEX messages_by_dialog_sender ON messages (dialog_id, seq, sender_id);
    CREATE UNIQUE INDEX messages_by_client_id ON messages (dialog_id, sender_id, client_message_id)
        WHERE client_message_id IS NOT NULL;
"""
POSTGRES: tuple[Step, ...] = (
    (_POSTGRES_TABLES + _LOG_TABLES.format(position="BIGINT")).replace(" TEXT", ' TEXT COLLATE "C"'),
    _start_log,
    # 3: receipts, as SQLite's 5.
    "ALTER TABLE dialog_members ADD COLUMN delivered_seq BIGINT NOT NULL DEFAULT 0",
)

MIGRATIONS = {"sqlite": SQLITE, "postgresql": POSTGRES}


async def run_step(db: Db, step: Step) -> None:
    if isinstance(step, str):
        for statement in step.split(";"):
            if statement.strip():
                await db.execute(statement)
    else:
        await step(db)
