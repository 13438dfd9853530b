"""The store for the store's own tests: started on the test's database, values to write, and a held writer.

`running` is the body of a `store` fixture: `open_store` on the `database` fixture (a SQLite file, or a PostgreSQL
database of the test's own), started on the test's loop and closed after it. `writer_held` keeps the store's one
writer busy so that the writes submitted meanwhile wait and then go as one group (group commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from chatserver import eventlog, queries
from chatserver.backends import open_store
from chatserver.models import Dialog, Message, User, new_id, now_iso
from chatserver.postgres import PostgresStore
from chatserver.sqlite import SQLiteStore
from chatserver.store import Db, LogEvent, Store, Tx

HOLD_LIMIT = 10.0  # seconds a held writer waits at most: a test that forgets to release it fails, never hangs


def running(database: str, io_loop: Any) -> Iterator[Store]:
    """A started store on `database`, closed afterwards (for a fixture: `yield from running(...)`)."""
    store = open_store(database)
    io_loop.run_sync(store.start)
    try:
        yield store
    finally:
        io_loop.run_sync(store.close)


@contextlib.asynccontextmanager
async def started(database: str) -> AsyncIterator[Store]:
    """Another store on the same database (another process, as the database sees it), for the `async with`."""
    store = open_store(database)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


def commits(store: Store) -> int:
    """Transactions the store's writer has begun (each a group of writes)."""
    assert isinstance(store, SQLiteStore | PostgresStore)
    return store.commits


async def user(store: Store, phone: str) -> User:
    return await store.write(queries.create_user, User(new_id("usr"), f"name {phone}", phone), "hash")


async def dialog(store: Store, *members: User, title: str = "D") -> Dialog:
    stamp = now_iso()
    dialog = Dialog(new_id("dlg"), title, tuple(m.user_id for m in members), stamp, stamp)
    return (await store.write(queries.save_dialog, dialog)).after


def message(dialog_id: str, sender: User | str, content: str = "hi", client_id: str | None = None) -> Message:
    stamp = now_iso()
    sender_id = sender if isinstance(sender, str) else sender.user_id
    return Message(new_id("msg"), dialog_id, sender_id, content, "text", {"k": [1]}, stamp, stamp, client_id)


async def post(store: Store, msg: Message) -> Message:
    stored, created = await store.write(queries.insert_message, msg)
    assert created
    return stored


async def head(store: Store) -> int:
    return await store.read(eventlog.head)


async def logged(store: Store, after: int = 0) -> list[LogEvent]:
    """Every event of the log after `after`, as the store holds them."""
    _, events = await store.read(eventlog.events_after, after, 100_000)
    return events


async def _all_rows(db: Db, sql: str) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in await db.fetch(sql)]


async def rows(store: Store, sql: str) -> list[tuple[Any, ...]]:
    """The rows of a query of the test's own, read in a snapshot."""
    return await store.read(_all_rows, sql)


async def _run(tx: Tx, sql: str, *args: Any) -> None:
    await tx.execute(sql, *args)


async def run_sql(store: Store, sql: str, *args: Any) -> None:
    """A statement of the test's own (`?` placeholders), as a write."""
    await store.write(_run, sql, *args)


@contextlib.asynccontextmanager
async def writer_held(store: Store) -> AsyncIterator[None]:
    """While inside, the store's writer runs a write that waits: writes submitted meanwhile queue behind it, and
    are taken together as one group when it ends (on leaving). The waiting write changes nothing and logs nothing.

    SQLite's writer is a thread (the write blocks it); PostgreSQL's is a task on the loop (the write awaits)."""
    loop = asyncio.get_running_loop()
    if isinstance(store, SQLiteStore):
        held, release = threading.Event(), threading.Event()

        async def hold_thread(_tx: Tx) -> None:
            held.set()
            release.wait(HOLD_LIMIT)

        blocker = asyncio.ensure_future(store.write(hold_thread))
        assert await loop.run_in_executor(None, held.wait, HOLD_LIMIT)
        done: Any = release.set
    else:
        entered, leave = asyncio.Event(), asyncio.Event()

        async def hold_task(_tx: Tx) -> None:
            entered.set()
            await asyncio.wait_for(leave.wait(), HOLD_LIMIT)

        blocker = asyncio.ensure_future(store.write(hold_task))
        await asyncio.wait_for(entered.wait(), HOLD_LIMIT)
        done = leave.set
    try:
        yield
        await asyncio.sleep(0.05)  # every write the body started has reached the writer's queue
    finally:
        done()
        await blocker
