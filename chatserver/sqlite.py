"""The SQLite store: one file, WAL mode, reads on a small thread pool, writes on one writer thread.

The data-access functions (`chatserver.queries`, `chatserver.eventlog`) run here on SQLite's own threads, where
every call of `_SqliteDb` completes at once: `store.drive` runs each to its end in one step, never on the IOLoop.
Reads run in a read transaction of their own (one snapshot), never behind a write nor behind password hashing,
which has threads of its own. Writes go to the one writer thread (`_GroupWriter`): it takes every write waiting,
runs them in one `BEGIN IMMEDIATE` transaction (the database's write lock, which is also the log's lock, across
processes), each in a savepoint, and commits them with one fsync. Several processes may share the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from chatserver import eventlog, schema
from chatserver.eventlog import LogTx
from chatserver.store import (
    IntegrityError,
    LogEvent,
    P,
    ReadFn,
    Row,
    Store,
    StoreError,
    StoreUnavailable,
    T,
    Tx,
    WriteFn,
    drive,
    run_write,
)

log = logging.getLogger(__name__)

# Messages of sqlite3.OperationalError that say "not now" rather than "never" (a bug in a query is neither).
_TRANSIENT = ("locked", "busy", "disk", "full", "i/o", "unable to open", "readonly", "read-only")
MAX_GROUP = 64


def _greatest(a: Any, b: Any) -> Any:
    return a if a >= b else b


class _SqliteDb:
    """`store.Db` over one sqlite3 connection: each call is done when it returns."""

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def _run(self, sql: str, args: tuple[Any, ...]) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, args)
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc
        except sqlite3.OperationalError as exc:
            if any(word in str(exc).lower() for word in _TRANSIENT):
                raise StoreUnavailable(f"database error: {exc}") from exc
            raise

    async def execute(self, sql: str, *args: Any) -> None:
        self._run(sql, args)

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row: Row | None = self._run(sql, args).fetchone()
        return row

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return self._run(sql, args).fetchall()

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = self._run(sql, args).fetchone()
        return row[0] if row else None


class _SqliteTx(LogTx, _SqliteDb):
    """A write's view: the writer thread's connection inside its transaction, with the log's counter."""


class SQLiteStore(Store):
    """The SQLite backend; see the module docstring."""

    dialect = "sqlite"

    def __init__(self, path: str | Path, readers: int = 2, hashers: int = 2) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="store-read")
        self._hashers = ThreadPoolExecutor(max_workers=hashers, thread_name_prefix="hash")
        self._writer: _GroupWriter | None = None
        self._closed = False

    def describe(self) -> str:
        return f"SQLite database {self.path}"

    # -- connections -------------------------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        """This thread's connection, opened at its first use."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        try:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=10000")
            conn.create_function("greatest", 2, _greatest, deterministic=True)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from None
        self._local.conn = conn
        with self._lock:
            self._connections.append(conn)
        return conn

    # -- Store -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._readers, self._migrate)
        self._writer = _GroupWriter(self, loop)

    def _migrate(self) -> None:
        conn = self.connect()
        db = _SqliteDb(conn)
        steps = schema.MIGRATIONS["sqlite"]
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > len(steps):
                    raise StoreError(
                        f"database {self.path} has schema version {version}, newer than this server's "
                        f"{len(steps)}: upgrade the server"
                    )
                for number in range(version, len(steps)):
                    drive(schema.run_step(db, steps[number]))
                    conn.execute(f"PRAGMA user_version = {number + 1}")
                self.log_id = drive(eventlog.meta(db))[0]
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot use database {self.path}: {exc}") from None

    async def read(self, fn: ReadFn[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, functools.partial(self._read, fn, *args, **kwargs))

    def _read(self, fn: ReadFn[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        conn = self.connect()
        conn.execute("BEGIN")  # one snapshot for every statement of the read
        try:
            return drive(fn(_SqliteDb(conn), *args, **kwargs))  # type: ignore[arg-type]
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    async def _write(self, fn: WriteFn[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._writer is None or self._closed:
            raise RuntimeError("the store is not started, or closed")  # never a hang
        result: T = await self._writer.submit(lambda tx: fn(tx, *args, **kwargs))
        return result

    async def offload(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._hashers, functools.partial(func, *args, **kwargs))

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        """Finish the writes submitted, then stop the threads and close every connection."""
        if self._closed:
            return
        self._closed = True
        self._hashers.shutdown(wait=True)
        if self._writer is not None:
            self._writer.close()
        self._readers.shutdown(wait=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()


class _Write:
    __slots__ = ("call", "future")

    def __init__(self, call: Callable[[Tx], Awaitable[Any]], future: asyncio.Future[Any]) -> None:
        self.call = call
        self.future = future


class _GroupWriter:
    """The one writer thread. It takes every write waiting (up to MAX_GROUP) and runs them in submission order in
    one transaction, each in a savepoint: a write that fails is undone alone (with its log events), the others
    commit together, with one fsync. Then, on the loop, the store's `on_commit` gets the group's events and the
    futures their outcomes, in that order. A commit that fails fails every write of its group.

    A write that arrives while nothing else waits commits alone, at once: grouping never delays a write.
    """

    def __init__(self, store: SQLiteStore, loop: asyncio.AbstractEventLoop) -> None:
        self._store = store
        self._loop = loop
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="store-write", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[Tx], Awaitable[Any]]) -> asyncio.Future[Any]:
        future = self._loop.create_future()
        self._queue.put(_Write(call, future))
        return future

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group, stop = [first], False
            while len(group) < MAX_GROUP:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                group.append(more)
            try:
                outcomes, events = self._commit(group)
            except BaseException as exc:  # never lose the thread, never leave an awaiter hanging
                log.exception("a group of %d writes failed", len(group))
                outcomes, events = [(None, exc)] * len(group), []
            self._resolve(group, outcomes, events)
            if stop:
                return

    def _begin(self, tx: _SqliteTx) -> None:
        self._store.commits += 1
        tx.conn.execute("BEGIN IMMEDIATE")
        tx.begin_log(drive(eventlog.lock_head(tx)))

    def _commit(self, group: list[_Write]) -> tuple[list[tuple[Any, BaseException | None]], list[LogEvent]]:
        conn = self._store.connect()
        tx = _SqliteTx(conn)
        self._store.writes += len(group)
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            self._begin(tx)
            start = tx.head
            for write in group:
                try:
                    outcomes.append((drive(run_write(tx, tx.mark, tx.restore, write.call)), None))
                except BaseException as exc:
                    outcomes.append((None, exc))
                if not conn.in_transaction:
                    # SQLite rolled the group back (a full disk): what this group wrote so far is gone. Those
                    # writes fail with the error; the rest of the group goes on in a transaction of its own.
                    error = outcomes[-1][1] or StoreUnavailable("the group commit was rolled back")
                    outcomes = [(None, error)] * len(outcomes)
                    self._begin(tx)
                    start = tx.head
            if tx.head != start:
                drive(eventlog.save_head(tx, tx.head))
            conn.execute("COMMIT")
        except (sqlite3.Error, StoreError) as exc:  # BEGIN or COMMIT failed (locked too long, a full disk)
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            error = StoreUnavailable(f"database error: {exc}") if isinstance(exc, sqlite3.Error) else exc
            return [(None, error)] * len(group), []
        return outcomes, tx.events

    def _resolve(self, group: list[_Write], outcomes: list[tuple[Any, BaseException | None]],
                 events: list[LogEvent]) -> None:
        settled = [(write.future, value, error) for write, (value, error) in zip(group, outcomes, strict=True)]
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
            self._loop.call_soon_threadsafe(self._store.committed, events, settled)
