"""The stores on real databases: each test on a SQLite file and on a PostgreSQL database of its own (`database`).

Schema and migrations (old SQLite files, a newer schema, concurrent starts on PostgreSQL), the data-access
functions of `chatserver.queries` through `Store.read`/`Store.write`, group commit (the writes that wait share one
commit; a failing write is undone alone; a failed commit fails its group), and what SQLite's planner makes of the
queries. What the log itself guarantees (positions, recipients, pruning) is tests/test_eventlog.py's.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import pytest

from chatserver import eventlog, jsonutil, queries, schema
from chatserver.backends import open_store
from chatserver.errors import BadRequest, Conflict, Forbidden, NotFound
from chatserver.models import Dialog, Message, User, new_id
from chatserver.postgres import PostgresStore
from chatserver.sqlite import SQLiteStore
from chatserver.store import Db, IntegrityError, LogEvent, Store, StoreError, StoreUnavailable, Tx, drive
from tests import pg
from tests.conftest import require_service
from tests.storekit import (
    commits,
    dialog,
    head,
    logged,
    message,
    post,
    rows,
    run_sql,
    running,
    started,
    user,
    writer_held,
)
from tests.test_cli import Server, http, login

SQLITE_VERSION = len(schema.MIGRATIONS["sqlite"])
POSTGRES_VERSION = len(schema.MIGRATIONS["postgresql"])

# The SQLite schema as shipped in versions 1 and 2 (before the log), verbatim: the files users have.
OLD_SQLITE_SCHEMA = (
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
    """
    CREATE INDEX messages_by_dialog_sender ON messages (dialog_id, seq, sender_id);
    DROP INDEX messages_by_dialog;
    """,
)

# Every table of the schema, its columns in order (name, NOT NULL), and every index we name: both dialects end here.
TABLES: dict[str, list[tuple[str, bool]]] = {
    "users": [("user_id", True), ("phone", True), ("name", True), ("password_hash", True), ("created_at", True)],
    "dialogs": [("dialog_id", True), ("title", True), ("created_at", True), ("updated_at", True),
                ("last_seq", True), ("activity_at", True), ("members_version", True), ("created_by", False)],
    "dialog_members": [("dialog_id", True), ("user_id", True), ("position", True), ("last_read_seq", True),
                       ("delivered_seq", True)],
    "messages": [("seq", True), ("message_id", True), ("dialog_id", True), ("sender_id", True), ("content", True),
                 ("type", True), ("meta", True), ("created_at", True), ("updated_at", True),
                 ("client_message_id", False)],
    "log_meta": [("id", True), ("log_id", True), ("head", True), ("floor", True)],
    "events": [("position", True), ("type", True), ("dialog_id", True), ("user_id", False),
               ("members_version", True), ("change", True), ("source", True), ("data", True), ("extra", False)],
    "membership": [("dialog_id", True), ("user_id", True), ("from_version", True), ("to_version", False)],
    "outbound": [("id", True), ("position", True), ("owner", False), ("lease_until", True)],
}
INDEXES = {
    "dialog_members_by_user", "messages_by_dialog_sender", "messages_by_client_id", "events_by_dialog",
    "events_by_user", "membership_by_user",
}


@pytest.fixture
def store(database: str, io_loop: Any) -> Iterator[Store]:
    yield from running(database, io_loop)


def pg_name(database: str) -> str:
    return urlsplit(database).path.lstrip("/")


def normalized(sql: str) -> str:
    return " ".join(sql.split())


# -- schema -------------------------------------------------------------------------------------------------


async def _sqlite_schema(db: Db) -> tuple[dict[str, list[tuple[str, bool]]], set[str]]:
    names = [r[0] for r in await db.fetch("SELECT name FROM sqlite_master WHERE type = 'table' "
                                          "AND name NOT LIKE 'sqlite_%'")]
    tables = {}
    for name in names:
        info = await db.fetch(f"PRAGMA table_info({name})")
        tables[name] = [(r[1], bool(r[3]) or r[5] > 0) for r in info]  # a key column is never NULL here
    indexes = {r[0] for r in await db.fetch("SELECT name FROM sqlite_master WHERE type = 'index' "
                                            "AND name NOT LIKE 'sqlite_autoindex_%'")}
    return tables, indexes


async def _postgres_schema(db: Db) -> tuple[dict[str, list[tuple[str, bool]]], set[str]]:
    tables: dict[str, list[tuple[str, bool]]] = {}
    for table, column, nullable in await db.fetch(
        "SELECT table_name, column_name, is_nullable FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name != 'schema_version' ORDER BY table_name, ordinal_position"
    ):
        tables.setdefault(table, []).append((column, nullable == "NO"))
    indexes = {r[0] for r in await db.fetch(
        "SELECT i.indexname FROM pg_indexes i WHERE i.schemaname = 'public' AND NOT EXISTS "
        "(SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)"
    )}
    return tables, indexes


async def schema_of(store: Store) -> tuple[dict[str, list[tuple[str, bool]]], set[str]]:
    return await store.read(_sqlite_schema if store.dialect == "sqlite" else _postgres_schema)


@pytest.mark.gen_test(timeout=30)
async def test_the_schema_is_migrated_at_start_and_the_log_is_named_once(store: Store, database: str) -> None:
    tables, indexes = await schema_of(store)
    assert tables == TABLES and indexes == INDEXES
    log_id, top, floor = await store.read(eventlog.meta)
    assert re.fullmatch(r"[0-9a-f]{16}", log_id) and log_id == store.log_id
    assert (top, floor) == (0, 0)
    if store.dialect == "sqlite":
        with sqlite3.connect(database) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SQLITE_VERSION
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    else:
        versions = await rows(store, "SELECT version FROM schema_version ORDER BY version")
        assert versions == [(n,) for n in range(1, POSTGRES_VERSION + 1)]
    await post(store, message((await dialog(store, await user(store, "701"))).dialog_id, "usr_x"))
    await store.close()
    async with started(database) as again:  # migrates nothing, names nothing anew
        assert await again.read(eventlog.meta) == (log_id, 2, 0)
        assert again.log_id == log_id
        if again.dialect == "postgresql":
            assert len(await rows(again, "SELECT version FROM schema_version")) == POSTGRES_VERSION


def test_the_shipped_sqlite_migrations_are_never_edited() -> None:
    """A file of version 1 or 2 is what these steps made: the migrations after them assume exactly that."""
    shipped = schema.MIGRATIONS["sqlite"]
    for number, old in enumerate(OLD_SQLITE_SCHEMA):
        step = shipped[number]
        assert isinstance(step, str) and normalized(step) == normalized(old), f"migration {number + 1} was edited"


@pytest.mark.parametrize("store_kind", ["postgres"])
@pytest.mark.gen_test(timeout=30)
async def test_postgresql_started_twice_at_once_migrates_once(database: str) -> None:
    first, second = PostgresStore(database, pool_size=1), PostgresStore(database, pool_size=1)
    try:
        await asyncio.gather(first.start(), second.start())
        assert first.log_id == second.log_id != ""
        versions = await rows(first, "SELECT version FROM schema_version ORDER BY version")
        assert versions == [(n,) for n in range(1, POSTGRES_VERSION + 1)]
        assert await rows(first, "SELECT count(*) FROM log_meta") == [(1,)]
    finally:
        await asyncio.gather(first.close(), second.close())


def old_sqlite_file(path: Path, version: int) -> dict[str, Any]:
    """A SQLite file as versions 1 and 2 of the server left it: two users, two dialogs, four messages, a read mark."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = "2025-01-01T00:00:0{}.000Z".format
    old = {
        "ann": User("usr_ann", "Ann", "701"),
        "ben": User("usr_ben", "Ben", "702"),
        "talk": Dialog("dlg_talk", "Talk", ("usr_ann", "usr_ben"), stamp(0), stamp(0)),
        "alone": Dialog("dlg_alone", "Alone", ("usr_ann",), stamp(0), stamp(0)),
    }
    sent = [
        Message("msg_1", "dlg_talk", "usr_ann", "first", "text", {"n": 1}, stamp(1), stamp(1), "c-old"),
        Message("msg_2", "dlg_talk", "usr_ben", "second", "text", {}, stamp(2), stamp(2)),
        Message("msg_3", "dlg_alone", "usr_ann", "elsewhere", "text", {}, stamp(3), stamp(3)),
        Message("msg_4", "dlg_talk", "usr_ann", "fourth \u0000 kept", "text", {}, stamp(4), stamp(5)),
    ]
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SQLITE_SCHEMA[0])
        if version >= 2:
            conn.executescript(OLD_SQLITE_SCHEMA[1])
        conn.execute(f"PRAGMA user_version = {version}")
        for person in (old["ann"], old["ben"]):
            conn.execute("INSERT INTO users VALUES (?, ?, ?, 'hash', ?)", (person.user_id, person.phone,
                                                                          person.name, stamp(0)))
        for talk, last in ((old["talk"], 4), (old["alone"], 3)):
            conn.execute("INSERT INTO dialogs VALUES (?, ?, ?, ?, ?, ?)",
                         (talk.dialog_id, talk.title, talk.created_at, talk.updated_at, last, stamp(last)))
            for position, member in enumerate(talk.member_ids):
                conn.execute("INSERT INTO dialog_members (dialog_id, user_id, position) VALUES (?, ?, ?)",
                             (talk.dialog_id, member, position))
        for one in sent:  # seq from AUTOINCREMENT: 1, 2, 3, 4
            conn.execute(
                "INSERT INTO messages (message_id, dialog_id, sender_id, content, type, meta, created_at, "
                "updated_at, client_message_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (one.message_id, one.dialog_id, one.sender_id, one.content, one.type,
                 '{"n": 1}' if one.meta else "{}", one.created_at, one.updated_at, one.client_message_id),
            )
        conn.execute("UPDATE dialog_members SET last_read_seq = 1 WHERE user_id = 'usr_ben'")
    return {**old, "sent": sent}


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.gen_test(timeout=30)
async def test_an_old_sqlite_file_is_migrated_keeping_its_data_and_its_history_order_continues(
    tmp_path: Path, version: int
) -> None:
    path = tmp_path / "old.db"
    old = old_sqlite_file(path, version)
    ann, ben, talk, sent = old["ann"], old["ben"], old["talk"], old["sent"]
    async with started(str(path)) as store:
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SQLITE_VERSION
        assert await schema_of(store) == (TABLES, INDEXES)
        assert await store.read(queries.get_user, ann.user_id) == ann
        assert await store.read(queries.user_by_phone, "702") == ben
        assert await store.read(queries.get_dialog, talk.dialog_id) == talk
        assert await store.read(queries.list_messages, talk.dialog_id, limit=10) == [sent[0], sent[1], sent[3]]
        view = await store.read(queries.dialog_view, talk.dialog_id, ben.user_id)
        assert view is not None and view.last_message == sent[3] and view.unread_count == 1  # the read mark kept
        assert await store.read(queries.unread_counts, talk.dialog_id) == {ann.user_id: 1, ben.user_id: 1}
        views = await store.read(queries.dialog_views, ann.user_id)
        assert [(v.dialog.dialog_id, v.last_message) for v in views] == [
            (talk.dialog_id, sent[3]), ("dlg_alone", sent[2])
        ]
        # The log starts after the last message, with every member in member list version 1.
        log_id, top, floor = await store.read(eventlog.meta)
        assert (top, floor) == (4, 4) and log_id == store.log_id
        assert await store.read(eventlog.current_members, talk.dialog_id) == (1, frozenset(talk.member_ids))
        assert await store.read(eventlog.members_at, talk.dialog_id, 1) == frozenset(talk.member_ids)
        # New messages order after the old ones, in the history and in the log.
        newer = await post(store, message(talk.dialog_id, ann, "after the migration"))
        history = await store.read(queries.list_messages, talk.dialog_id, limit=10)
        assert history == [sent[0], sent[1], sent[3], newer]
        assert await store.read(queries.list_messages, talk.dialog_id, limit=10, before=newer.message_id) == [
            sent[0], sent[1], sent[3]
        ]
        assert await store.read(queries.list_messages, talk.dialog_id, limit=10, after=sent[3].message_id) == [newer]
        assert [(e.position, e.type) for e in await logged(store)] == [(5, "message:new")]
        # Old data keeps deduplicating and its read marks keep moving forward only.
        again = message(talk.dialog_id, ann, "a retry of an old send", client_id="c-old")
        assert await store.write(queries.insert_message, again) == (sent[0], False)
        read, _ = await store.write(queries.mark_read, talk.dialog_id, ben.user_id, sent[0].message_id)
        assert read.unread_count == 2
        read, _ = await store.write(queries.mark_read, talk.dialog_id, ben.user_id, newer.message_id)
        assert read.unread_count == 0
        assert await store.read(queries.unread_counts, talk.dialog_id) == {ann.user_id: 1, ben.user_id: 0}
    async with started(str(path)) as store:  # a second start migrates nothing and keeps the log's name
        assert await store.read(eventlog.meta) == (log_id, 7, 4)
        assert await rows(store, "SELECT count(*) FROM membership") == [(3,)]


@pytest.mark.gen_test(timeout=30)
async def test_a_newer_schema_refuses_to_start_and_is_left_untouched(database: str, store_kind: str) -> None:
    if store_kind == "sqlite":
        Path(database).parent.mkdir(parents=True)
        with sqlite3.connect(database) as conn:
            conn.execute(f"PRAGMA user_version = {SQLITE_VERSION + 1}")
        newer = SQLITE_VERSION + 1
    else:
        newer = POSTGRES_VERSION + 1
        pg.execute(pg_name(database), "CREATE TABLE schema_version (version INTEGER NOT NULL)")
        pg.execute(pg_name(database), "INSERT INTO schema_version VALUES ($1)", newer)
    store = open_store(database)
    with pytest.raises(StoreError) as caught:
        await store.start()
    await store.close()
    text = str(caught.value)
    assert f"schema version {newer}" in text and "upgrade" in text and "\n" not in text
    if store_kind == "sqlite":
        assert database in text
        with sqlite3.connect(database) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == newer
            assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    else:
        assert pg.execute(pg_name(database), "SELECT tablename FROM pg_tables WHERE schemaname = 'public'") == [
            ("schema_version",)
        ]


@pytest.mark.parametrize("kind", ["random-bytes", "directory", "under-a-file"])
@pytest.mark.gen_test
async def test_an_unusable_sqlite_file_is_a_store_error(tmp_path: Path, kind: str) -> None:
    if kind == "random-bytes":
        target = tmp_path / "random.db"
        target.write_bytes(bytes(range(256)) * 64)
    elif kind == "directory":
        target = tmp_path
    else:
        (tmp_path / "plain").write_text("x")
        target = tmp_path / "plain" / "chat.db"
    store = SQLiteStore(target)
    with pytest.raises(StoreError) as caught:
        await store.start()
    await store.close()
    assert str(target) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("where", ["127.0.0.1:1/chatserver", "NO_DATABASE"])
@pytest.mark.gen_test(timeout=30)
async def test_an_unusable_postgresql_is_a_store_error_that_never_shows_its_password(where: str) -> None:
    if where == "NO_DATABASE":
        require_service("PostgreSQL", pg.reachable())
        host = urlsplit(pg.url("x")).netloc.rsplit("@", 1)[-1]
        where = f"{host}/chatserver_test_missing_{new_id('x')[2:]}"
    store = open_store(f"postgresql://postgres:sekrit-word@{where}")
    assert isinstance(store, PostgresStore)
    with pytest.raises(StoreUnavailable) as caught:
        await store.start()
    await store.close()
    text = str(caught.value)
    assert "sekrit-word" not in text and "postgres:***@" in text and "\n" not in text


def test_open_store_takes_a_postgresql_url_and_anything_else_as_a_file(tmp_path: Path) -> None:
    for url in ("postgresql://u@h/d", "postgres://u@h:5/d", "PostgreSQL://h/d"):
        assert isinstance(open_store(url), PostgresStore), url
    for path in (str(tmp_path / "a.db"), "relative/b.db", "C:/c.db"):
        store = open_store(path)
        assert isinstance(store, SQLiteStore) and store.path == Path(path)
        store.close_now()


# -- users and dialogs --------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_a_duplicate_phone_is_a_conflict_also_when_two_processes_race(store: Store, database: str) -> None:
    await user(store, "701")
    with pytest.raises(Conflict) as caught:
        await user(store, "701")
    assert caught.value.field == "phone"
    async with started(database) as other:
        results = await asyncio.gather(user(store, "702"), user(other, "702"), return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "User"], results
    assert await rows(store, "SELECT count(*) FROM users WHERE phone = '702'") == [(1,)]


@pytest.mark.gen_test(timeout=30)
async def test_save_dialog_replaces_title_and_members_and_ignores_what_is_not_newer(store: Store) -> None:
    ann, ben, cid = await user(store, "701"), await user(store, "702"), await user(store, "703")
    talk = await dialog(store, ann, ben)
    made = attrs.evolve(talk, created_by=ann.user_id)
    await run_sql(store, "UPDATE dialogs SET created_by = ? WHERE dialog_id = ?", ann.user_id, talk.dialog_id)
    changed = made.changed("Renamed", (ann.user_id, cid.user_id))
    change = await store.write(queries.save_dialog, attrs.evolve(changed, created_by=None))
    assert change.before == made and change.event is not None
    assert change.after == changed  # the creator is kept, whatever the update says
    assert await store.read(queries.dialog_views, ben.user_id) == []
    assert [v.dialog.dialog_id for v in await store.read(queries.dialog_views, cid.user_id)] == [talk.dialog_id]
    assert await store.read(queries.unknown_users, [ann.user_id, "usr_nobody", ann.user_id]) == ["usr_nobody"]
    top = await head(store)
    for stale in (attrs.evolve(talk, title="Older", updated_at="2000-01-01T00:00:00.000Z"), changed):
        unchanged = await store.write(queries.save_dialog, stale)
        assert unchanged.event is None and unchanged.after == changed
    assert await head(store) == top  # nothing logged
    assert await store.read(queries.get_dialog, talk.dialog_id) == changed


# -- messages -----------------------------------------------------------------------------------------------


@pytest.fixture
def pair(store: Store, io_loop: Any) -> tuple[User, User, Dialog]:
    async def make() -> tuple[User, User, Dialog]:
        ann, ben = await user(store, "701"), await user(store, "702")
        return ann, ben, await dialog(store, ann, ben)

    return io_loop.run_sync(make)  # type: ignore[no-any-return]


@pytest.mark.gen_test(timeout=30)
async def test_insert_is_idempotent_by_message_id_and_logs_once(store: Store, pair: tuple[User, User, Dialog]) -> None:
    ann, _, talk = pair
    sent = message(talk.dialog_id, ann)
    top = await head(store)
    assert await store.write(queries.insert_message, sent) == (sent, True)
    again = attrs.evolve(sent, content="a redelivery that differs")
    assert await store.write(queries.insert_message, again) == (sent, False)
    assert await store.read(queries.list_messages, talk.dialog_id, limit=10) == [sent]
    assert [(e.position, e.type) for e in await logged(store, top)] == [(top + 1, "message:new")]


@pytest.mark.gen_test(timeout=30)
async def test_insert_is_idempotent_by_client_message_id_per_sender_and_dialog(
    store: Store, pair: tuple[User, User, Dialog]
) -> None:
    ann, ben, talk = pair
    other = await dialog(store, ann, ben)

    async def insert(msg: Message) -> tuple[Message, bool]:
        return await store.write(queries.insert_message, msg)

    first, created = await insert(message(talk.dialog_id, ann, "one", client_id="c1"))
    assert created
    assert await insert(message(talk.dialog_id, ann, "one again", client_id="c1")) == (first, False)
    assert (await insert(message(talk.dialog_id, ben, "ben's", client_id="c1")))[1]
    assert (await insert(message(other.dialog_id, ann, "elsewhere", client_id="c1")))[1]
    assert (await insert(message(talk.dialog_id, ann, "no id")))[1]
    assert (await insert(message(talk.dialog_id, ann, "no id either")))[1]
    assert len(await store.read(queries.list_messages, talk.dialog_id, limit=200)) == 4


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_inserts_of_one_client_message_id_on_two_processes_store_one(
    store: Store, database: str, pair: tuple[User, User, Dialog]
) -> None:
    ann, _, talk = pair
    top = await head(store)
    async with started(database) as other:
        results = await asyncio.gather(*(
            one.write(queries.insert_message, message(talk.dialog_id, ann, f"race {n}", client_id="r1"))
            for n in range(6) for one in (store, other)
        ))
    assert sum(created for _, created in results) == 1
    assert len({stored.message_id for stored, _ in results}) == 1
    assert len(await store.read(queries.list_messages, talk.dialog_id, limit=50)) == 1
    assert len(await logged(store, top)) == 1


@pytest.mark.gen_test(timeout=30)
async def test_apply_update_applies_only_newer_versions_and_never_moves_a_message(
    store: Store, pair: tuple[User, User, Dialog]
) -> None:
    ann, ben, talk = pair
    sent = await post(store, message(talk.dialog_id, ann, "v1"))
    top = await head(store)

    async def update(msg: Message) -> tuple[Message, bool]:
        return await store.write(queries.apply_update, msg)

    assert await update(attrs.evolve(sent, content="older", updated_at="2000-01-01T00:00:00.000Z")) == (sent, False)
    assert await update(attrs.evolve(sent, content="same stamp")) == (sent, False)
    assert await head(store) == top  # nothing logged
    newer = attrs.evolve(sent, content="v2", updated_at="2999-01-01T00:00:00.000Z", meta={"edited": True})
    assert await update(newer) == (newer, True)
    assert await store.read(queries.get_message, sent.message_id) == newer
    hijack = attrs.evolve(newer, sender_id=ben.user_id, dialog_id="dlg_other", updated_at="2999-01-02T00:00:00.000Z",
                          created_at="2999-01-02T00:00:00.000Z", client_message_id="stolen")
    stored, applied = await update(hijack)
    assert applied and (stored.sender_id, stored.dialog_id) == (ann.user_id, talk.dialog_id)
    assert (stored.created_at, stored.client_message_id) == (sent.created_at, None)
    assert await update(newer) == (stored, False)
    events = await logged(store, top)
    assert [(e.type, e.dialog_id) for e in events] == [("message:update", talk.dialog_id)] * 2
    assert [Message(**_fields(e)) for e in events] == [newer, stored]


def _fields(event: LogEvent) -> dict[str, Any]:
    data = jsonutil.loads(event.data)
    keys = {"messageId": "message_id", "dialogId": "dialog_id", "senderId": "sender_id", "createdAt": "created_at",
            "updatedAt": "updated_at", "clientMessageId": "client_message_id"}
    return {keys.get(k, k): v for k, v in data.items()}


@pytest.mark.gen_test(timeout=30)
async def test_apply_update_of_an_unseen_message_stores_it(store: Store, pair: tuple[User, User, Dialog]) -> None:
    ann, _, talk = pair
    unseen = message(talk.dialog_id, ann, "first seen as an update")
    assert await store.write(queries.apply_update, unseen) == (unseen, True)
    assert await store.read(queries.list_messages, talk.dialog_id, limit=5) == [unseen]
    view = await store.read(queries.dialog_view, talk.dialog_id, ann.user_id)
    assert view is not None and view.last_message == unseen
    assert [e.type for e in await logged(store)][-1] == "message:update"


@pytest.mark.gen_test(timeout=30)
async def test_a_message_to_an_unknown_dialog_or_from_a_non_member_is_refused_and_logs_nothing(
    store: Store, pair: tuple[User, User, Dialog]
) -> None:
    ann, _, talk = pair
    stranger = await user(store, "709")
    top = await head(store)
    with pytest.raises(NotFound):
        await store.write(queries.insert_message, message("dlg_missing", ann))
    with pytest.raises(NotFound):
        await store.write(queries.apply_update, message("dlg_missing", ann))
    with pytest.raises(Forbidden):
        await store.write(queries.insert_message, message(talk.dialog_id, stranger), sender_is_member=True)
    assert await head(store) == top
    assert await store.read(queries.list_messages, talk.dialog_id, limit=5) == []


@pytest.mark.gen_test(timeout=30)
async def test_unread_counts_follow_messages_of_others_and_read_marks(
    store: Store, pair: tuple[User, User, Dialog]
) -> None:
    ann, ben, talk = pair
    sent = [await post(store, message(talk.dialog_id, ann, f"a{i}")) for i in range(3)]
    await post(store, message(talk.dialog_id, ben, "b"))
    assert await store.read(queries.unread_counts, talk.dialog_id) == {ann.user_id: 1, ben.user_id: 3}

    async def mark(message_id: str) -> int:
        return (await store.write(queries.mark_read, talk.dialog_id, ben.user_id, message_id))[0].unread_count

    assert await mark(sent[1].message_id) == 1
    assert await mark(sent[0].message_id) == 1  # never backwards
    assert await store.read(queries.unread_counts, talk.dialog_id) == {ann.user_id: 1, ben.user_id: 1}
    assert await mark(sent[2].message_id) == 0
    with pytest.raises(NotFound):
        await mark("msg_missing")
    other = await dialog(store, ann, ben)
    elsewhere = await post(store, message(other.dialog_id, ann))
    with pytest.raises(BadRequest):
        await mark(elsewhere.message_id)


@pytest.mark.gen_test(timeout=30)
async def test_dialog_views_are_most_recently_active_first(store: Store) -> None:
    ann, ben = await user(store, "701"), await user(store, "702")
    first, second, third = await dialog(store, ann, ben), await dialog(store, ann, ben), await dialog(store, ann)
    await post(store, message(first.dialog_id, ben))
    await post(store, message(second.dialog_id, ben))
    await post(store, message(first.dialog_id, ben, "latest"))
    views = await store.read(queries.dialog_views, ann.user_id)
    assert [v.dialog.dialog_id for v in views][:2] == [first.dialog_id, second.dialog_id]
    assert {v.dialog.dialog_id for v in views} == {first.dialog_id, second.dialog_id, third.dialog_id}
    assert views[0].last_message is not None and views[0].last_message.content == "latest"
    assert [v.unread_count for v in views[:2]] == [2, 1]
    assert views[0].dialog.member_ids == (ann.user_id, ben.user_id)
    ids = [v.dialog.dialog_id for v in await store.read(queries.dialog_views, ben.user_id)]
    assert ids == [first.dialog_id, second.dialog_id]


@pytest.mark.gen_test(timeout=30)
async def test_list_messages_pages(store: Store, pair: tuple[User, User, Dialog]) -> None:
    ann, _, talk = pair
    ids = [(await post(store, message(talk.dialog_id, ann, f"m{i}"))).message_id for i in range(10)]

    async def page(**kwargs: Any) -> list[str]:
        return [m.message_id for m in await store.read(queries.list_messages, talk.dialog_id, **kwargs)]

    assert await page(limit=4) == ids[6:]
    assert await page(limit=100) == ids
    assert await page(limit=4, before=ids[6]) == ids[2:6]
    assert await page(limit=4, before=ids[2]) == ids[:2]
    assert await page(limit=4, after=ids[2]) == ids[3:7]
    assert await page(limit=4, after=ids[8]) == ids[9:]
    assert await page(limit=100, after=ids[1], before=ids[5]) == ids[2:5]
    assert await page(limit=2, after=ids[1], before=ids[5]) == ids[2:4]
    assert await page(limit=5, after=ids[9]) == []
    empty = await dialog(store, ann)
    assert await store.read(queries.list_messages, empty.dialog_id, limit=50) == []
    for field in ("before", "after"):
        with pytest.raises(BadRequest) as caught:
            await store.read(queries.list_messages, empty.dialog_id, limit=5, **{field: ids[0]})
        assert caught.value.field == field


NUL_CONTENTS = ["kept \u0000 verbatim", "\u0000", "\\0 is not a NUL", "a\\", "\\\\0\u0000\\", "<b>\u2028</b>"]


@pytest.mark.gen_test(timeout=30)
async def test_nul_and_backslashes_in_content_are_kept_verbatim(store: Store, pair: tuple[User, User, Dialog]) -> None:
    ann, ben, talk = pair
    sent = [await post(store, message(talk.dialog_id, ann, text)) for text in NUL_CONTENTS]
    assert [m.content for m in await store.read(queries.list_messages, talk.dialog_id, limit=50)] == NUL_CONTENTS
    for one in sent:
        assert await store.read(queries.get_message, one.message_id) == one
    edited = sent[0].edited("edited \u0000 \\0 too")
    assert await store.write(queries.apply_update, edited) == (edited, True)
    assert await store.read(queries.get_message, edited.message_id) == edited
    # A redelivery of one is recognised (not stored twice), and the dialog list shows the last verbatim.
    assert await store.write(queries.insert_message, sent[-1]) == (sent[-1], False)
    views = await store.read(queries.dialog_views, ben.user_id)
    assert views[0].last_message == sent[-1]
    # The log holds each as the JSON it is sent as.
    contents = [_fields(e)["content"] for e in await logged(store) if e.type.startswith("message:")]
    assert contents == [*NUL_CONTENTS, edited.content]


@pytest.mark.gen_test(timeout=30)
async def test_a_restarted_store_serves_every_kind_of_data_it_stored(store: Store, database: str) -> None:
    ann, ben = await user(store, "701"), await user(store, "702")
    talk = await dialog(store, ann, ben, title="Talk")
    sent = await post(store, message(talk.dialog_id, ann, "kept \u0000 verbatim <b>", client_id="c1"))
    await store.write(queries.mark_read, talk.dialog_id, ben.user_id, sent.message_id)
    meta = await store.read(eventlog.meta)
    await store.close()
    async with started(database) as again:
        assert await again.read(queries.user_by_phone, "702") == ben
        assert await again.read(queries.password_hash, "701") == (ann, "hash")
        assert await again.read(queries.get_dialog, talk.dialog_id) == talk
        assert await again.read(queries.get_message, sent.message_id) == sent
        view = await again.read(queries.dialog_view, talk.dialog_id, ben.user_id)
        assert view is not None and view.last_message == sent and view.unread_count == 0
        assert await again.read(eventlog.meta) == meta
        assert [e.type for e in await logged(again)] == ["dialog:update", "message:new", "dialog:update"]


@pytest.mark.gen_test(timeout=60)
async def test_a_restarted_server_on_the_same_database_serves_what_it_stored(tmp_path: Path, database: str) -> None:
    """A real `python run.py` stopped with SIGTERM and started again on the same --db: the message is there,
    and a token from before the restart still works (the secret lives in the state folder)."""
    servers: list[Server] = []
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, _restart_round_trip, tmp_path, database, servers)
    finally:
        for server in servers:
            server.close()


def _restart_round_trip(tmp_path: Path, database: str, servers: list[Server]) -> None:
    first = Server(tmp_path, "--demo", "--port", "0", "--db", database)
    servers.append(first)
    url = first.url()
    token = login(url, "79111111111", "demo")
    dialog_id = http("GET", f"{url}/api/dialogs", token=token)[1]["data"][0]["dialogId"]
    status, sent = http("POST", f"{url}/api/messages/dialog/{dialog_id}", {"content": "kept"}, token)
    assert status == 201
    assert first.stop() == 0

    second = Server(tmp_path, "--port", "0", "--db", database)
    servers.append(second)
    url = second.url()
    status, body = http("GET", f"{url}/api/messages/dialog/{dialog_id}", token=token)
    assert status == 200 and body["data"] == [sent["data"]]
    bob = login(url, "79777777777", "demo")
    status, body = http("GET", f"{url}/api/dialogs", token=bob)
    assert body["data"][0]["lastMessage"] == sent["data"] and body["data"][0]["unreadCount"] == 1
    assert second.stop() == 0


# -- group commit -------------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_writes_waiting_behind_a_commit_share_the_next_one_and_keep_their_order(
    store: Store, pair: tuple[User, User, Dialog]
) -> None:
    ann, _, talk = pair
    sent = [message(talk.dialog_id, ann, f"m{n}") for n in range(20)]
    timeline: list[Any] = []
    store.on_commit = lambda events: timeline.append([e.position for e in events])

    async def send(msg: Message) -> None:
        await post(store, msg)
        timeline.append(msg.message_id)

    top, before, writes = await head(store), commits(store), store.writes
    async with writer_held(store):
        tasks = [asyncio.ensure_future(send(m)) for m in sent]
    await asyncio.gather(*tasks)

    assert commits(store) == before + 2  # the held write's, then one for the twenty
    assert store.writes == writes + 21
    # The group's events are handed on first, in position order, then the writers resume in the order stored.
    assert timeline == [list(range(top + 1, top + 21)), *(m.message_id for m in sent)]
    assert await store.read(queries.list_messages, talk.dialog_id, limit=50) == sent


async def insert_then_fail(tx: Tx, msg: Message, how: str) -> None:
    """A write that stores a message (and logs its event), then fails: in its own code, or in the database."""
    await queries.insert_message(tx, msg)
    if how == "raises":
        raise RuntimeError("the write failed after logging")
    await tx.execute("INSERT INTO users (user_id, phone, name, password_hash, created_at) "
                     "SELECT user_id, phone, name, password_hash, created_at FROM users")  # every key taken


@pytest.mark.parametrize("how", ["raises", "violates"])
@pytest.mark.gen_test(timeout=30)
async def test_a_failing_write_in_a_group_is_undone_alone_with_its_events_and_positions(
    store: Store, pair: tuple[User, User, Dialog], how: str
) -> None:
    ann, _, talk = pair
    first, failed, last = (message(talk.dialog_id, ann, text) for text in ("first", "failed", "last"))
    handed: list[LogEvent] = []
    store.on_commit = handed.extend
    top, before = await head(store), commits(store)
    async with writer_held(store):
        tasks = [
            asyncio.ensure_future(user(store, "801")),
            asyncio.ensure_future(post(store, first)),
            asyncio.ensure_future(store.write(insert_then_fail, failed, how)),
            asyncio.ensure_future(user(store, ann.phone)),
            asyncio.ensure_future(post(store, last)),
            asyncio.ensure_future(user(store, "802")),
        ]
    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert commits(store) == before + 2  # one group
    assert isinstance(results[2], RuntimeError if how == "raises" else IntegrityError), results[2]
    assert isinstance(results[3], Conflict)
    assert [r.phone for r in (results[0], results[5])] == ["801", "802"]
    assert results[1] == first and results[4] == last
    # The failed write left no message and no event; the next write has the position it would have had.
    assert await store.read(queries.get_message, failed.message_id) is None
    stored = await logged(store, top)
    assert [(e.position, _fields(e)["message_id"]) for e in stored] == [
        (top + 1, first.message_id), (top + 2, last.message_id)
    ]
    assert handed == stored
    assert await head(store) == top + 2
    assert await store.read(queries.list_messages, talk.dialog_id, limit=5) == [first, last]
    for phone in ("801", "802"):
        assert await store.read(queries.user_by_phone, phone) is not None


async def orphan_checked_at_commit(tx: Tx) -> None:
    await tx.execute("INSERT INTO commit_guard (user_id) VALUES ('usr_nobody')")


@pytest.mark.gen_test(timeout=30)
async def test_a_group_whose_commit_fails_fails_every_write_of_it(
    store: Store, pair: tuple[User, User, Dialog]
) -> None:
    # A foreign key checked at COMMIT (deferred) makes the database refuse the commit itself, as a full disk or a
    # lost connection would: nothing of the group is stored, nothing is handed on, and every awaiter hears of it.
    ann, _, talk = pair
    await run_sql(store, "CREATE TABLE commit_guard (user_id TEXT REFERENCES users(user_id) "
                         "DEFERRABLE INITIALLY DEFERRED)")
    good, also = message(talk.dialog_id, ann, "would have been fine"), message(talk.dialog_id, ann, "this too")
    handed: list[LogEvent] = []
    store.on_commit = handed.extend
    top = await head(store)
    async with writer_held(store):
        tasks = [asyncio.ensure_future(post(store, good)),
                 asyncio.ensure_future(store.write(orphan_checked_at_commit)),
                 asyncio.ensure_future(post(store, also))]
    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert all(isinstance(r, StoreError) for r in results), results
    assert handed == [] and await head(store) == top
    assert await store.read(queries.list_messages, talk.dialog_id, limit=5) == []
    assert await rows(store, "SELECT count(*) FROM commit_guard") == [(0,)]
    # The writer goes on, and the next write gets the first position the failed group would have used.
    assert await post(store, good) == good
    assert [e.position for e in handed] == [top + 1]


@pytest.mark.gen_test(timeout=30)
async def test_close_finishes_the_writes_submitted_and_a_write_after_it_is_refused(
    store: Store, database: str, pair: tuple[User, User, Dialog]
) -> None:
    ann, _, talk = pair
    sent = [message(talk.dialog_id, ann, f"before close {n}") for n in range(10)]
    tasks = [asyncio.ensure_future(post(store, m)) for m in sent]
    await asyncio.sleep(0)  # each write is submitted
    await store.close()
    assert await asyncio.gather(*tasks) == sent
    with pytest.raises(RuntimeError):
        await store.write(queries.create_user, User(new_id("usr"), "n", "900"), "hash")
    await store.close()  # twice is once
    async with started(database) as again:
        assert await again.read(queries.list_messages, talk.dialog_id, limit=50) == sent
    if store.dialect == "postgresql":  # every connection released
        assert await server_connections(database) == []


class ClosedWhileListening(PostgresStore):
    """A PostgreSQL store that is closed the moment its listener's connection is made: before the listener has
    sent LISTEN and recorded the connection (a server stopped right after it started)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, pool_size=1)
        self.opened: list[Any] = []
        self.closing: asyncio.Task[None] | None = None
        self.listener_connected = asyncio.Event()

    async def _connect(self, role: str) -> Any:
        conn = await super()._connect(role)
        self.opened.append(conn)
        if role == "listen" and self.closing is None:
            self.closing = asyncio.get_running_loop().create_task(self.close())
            self.listener_connected.set()
        return conn


async def server_connections(database: str) -> list[tuple[str]]:
    """This store's connections the PostgreSQL server still has, once those closing have gone (bounded wait)."""
    loop = asyncio.get_running_loop()
    sql = "SELECT application_name FROM pg_stat_activity WHERE datname = $1 AND application_name LIKE 'chatserver-%'"
    for _ in range(50):
        found: list[tuple[str]] = await loop.run_in_executor(None, pg.execute, pg_name(database), sql,
                                                             pg_name(database))
        if not found:
            break
        await asyncio.sleep(0.05)
    return found


@pytest.mark.parametrize("store_kind", ["postgres"])
@pytest.mark.gen_test(timeout=30)
async def test_a_postgresql_store_closed_as_it_starts_listening_leaves_no_connection_open(database: str) -> None:
    store = ClosedWhileListening(database)
    await store.start()
    await asyncio.wait_for(store.listener_connected.wait(), 10)
    assert store.closing is not None
    await store.closing
    assert store.opened and [conn.is_closed() for conn in store.opened] == [True] * len(store.opened)
    assert await server_connections(database) == []


# -- what SQLite's planner makes of the queries ------------------------------------------------------------


class PlanDb:
    """`store.Db` over a plain sqlite3 connection that keeps the query plan of every statement it runs."""

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.plans: list[tuple[str, list[str]]] = []

    def _run(self, sql: str, args: tuple[Any, ...]) -> sqlite3.Cursor:
        plan = [str(row[-1]) for row in self.conn.execute("EXPLAIN QUERY PLAN " + sql, args)]
        self.plans.append((sql, plan))
        return self.conn.execute(sql, args)

    async def execute(self, sql: str, *args: Any) -> None:
        self._run(sql, args)

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        return self._run(sql, args).fetchone()

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return self._run(sql, args).fetchall()

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = self._run(sql, args).fetchone()
        return row[0] if row else None


@pytest.fixture
def filled(tmp_path: Path, io_loop: Any) -> tuple[Path, dict[str, str]]:
    """A SQLite file with a dialog of two, messages and read marks: what the read queries below look at."""
    path = tmp_path / "plans.db"

    async def fill() -> dict[str, str]:
        async with started(str(path)) as store:
            ann, ben = await user(store, "701"), await user(store, "702")
            talk = await dialog(store, ann, ben)
            sent = [await post(store, message(talk.dialog_id, (ann, ben)[n % 2], f"m{n}")) for n in range(6)]
            await store.write(queries.mark_read, talk.dialog_id, ben.user_id, sent[2].message_id)
            return {"user": ben.user_id, "dialog": talk.dialog_id, "message": sent[3].message_id}

    return path, io_loop.run_sync(fill)


READS: dict[str, Any] = {
    "dialog_views": lambda db, ids: queries.dialog_views(db, ids["user"]),
    "dialog_view": lambda db, ids: queries.dialog_view(db, ids["dialog"], ids["user"]),
    "unread_counts": lambda db, ids: queries.unread_counts(db, ids["dialog"]),
    "history": lambda db, ids: queries.list_messages(db, ids["dialog"], limit=50),
    "history_before": lambda db, ids: queries.list_messages(db, ids["dialog"], limit=50, before=ids["message"]),
    "history_after": lambda db, ids: queries.list_messages(db, ids["dialog"], limit=50, after=ids["message"]),
    "events_after": lambda db, ids: eventlog.events_after(db, 2, 1000),
    "events_for_user": lambda db, ids: eventlog.events_for_user(db, ids["user"], 2, 100, 500),
    "members_at": lambda db, ids: eventlog.members_at(db, ids["dialog"], 1),
    "current_members": lambda db, ids: eventlog.current_members(db, ids["dialog"]),
}


@pytest.mark.parametrize("read", sorted(READS))
def test_no_read_scans_a_table(filled: tuple[Path, dict[str, str]], read: str) -> None:
    path, ids = filled
    with sqlite3.connect(path) as conn:
        db = PlanDb(conn)
        drive(READS[read](db, ids))
    assert db.plans
    for sql, plan in db.plans:
        assert not any(step.startswith("SCAN") for step in plan), (sql, plan)


def test_history_pages_and_unread_counts_read_the_dialog_index(filled: tuple[Path, dict[str, str]]) -> None:
    path, ids = filled
    with sqlite3.connect(path) as conn:
        pages = PlanDb(conn)
        drive(queries.list_messages(pages, ids["dialog"], limit=50, before=ids["message"]))
        drive(queries.list_messages(pages, ids["dialog"], limit=50, after=ids["message"]))
        counts = PlanDb(conn)
        drive(queries.unread_counts(counts, ids["dialog"]))
    for sql, plan in pages.plans:
        if sql.startswith("SELECT message_id"):
            text = " ".join(plan)
            assert "messages_by_dialog_sender" in text and "TEMP B-TREE" not in text, text
    text = " ".join(counts.plans[0][1])
    assert "COVERING INDEX messages_by_dialog_sender" in text, text


def test_the_log_is_read_by_its_indexes(filled: tuple[Path, dict[str, str]]) -> None:
    path, ids = filled
    with sqlite3.connect(path) as conn:
        db = PlanDb(conn)
        drive(eventlog.events_for_user(db, ids["user"], 0, 100, 500))
        drive(eventlog.events_after(db, 0, 500))
    text = " ".join(db.plans[1][1])
    assert all(name in text for name in ("membership_by_user", "events_by_dialog", "events_by_user")), text
    assert "SEARCH events USING INTEGER PRIMARY KEY" in " ".join(db.plans[3][1]), db.plans[3]
