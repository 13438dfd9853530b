"""The PostgreSQL store: asyncpg on the IOLoop, a pool for reads, one writer connection, LISTEN for wake-ups.

asyncpg speaks PostgreSQL's protocol natively on asyncio: no thread per query, prepared statements cached per
connection, and LISTEN/NOTIFY as plain callbacks on the loop, which is how processes sharing one database wake
each other (`chatserver_log`, the new head after each commit that logged events) and pass ephemeral events
(`chatserver_ephemeral`, typing) with no broker and no further setting.

Reads run on pooled connections, each in a read-only REPEATABLE READ transaction (one snapshot). Writes run on
the one writer connection of this process (`_writer`): the writes waiting are taken together into one
transaction, each in a savepoint; the transaction first locks the log's head row, which orders the commits of
every process that writes the log (see `chatserver.eventlog`), and ends with a NOTIFY that PostgreSQL delivers
at the commit. A lost connection is reopened for the next group; the listener's is reopened with backoff and a
wake-up, since notifications sent while it was away are gone (the log is the truth; the follower reads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

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
    run_write,
)

log = logging.getLogger(__name__)

LOG_CHANNEL = "chatserver_log"
EPHEMERAL_CHANNEL = "chatserver_ephemeral"
MAX_GROUP = 64
MIGRATION_LOCK = 7_263_512_001  # pg_advisory_xact_lock key: one process migrates at a time
CONNECT_TIMEOUT = 10.0
ACQUIRE_TIMEOUT = 10.0  # a read waits at most this long for a pooled connection
LISTEN_BACKOFF_FIRST = 0.2
LISTEN_BACKOFF_CAP = 5.0
# Errors that say the database is unreachable or gone for now, rather than that a query is wrong.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.QueryCanceledError,
    # What asyncpg raises when a connection the server cut under an operation is asked for the next one (the
    # rollback of the read that was cut): "cannot switch to state ...; another operation is in progress".
    asyncpg.InternalClientError,
    ConnectionError,
    OSError,
    TimeoutError,
)


@functools.lru_cache(maxsize=1024)
def _numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's `$1`, `$2`... (the SQL of this server holds no `?` in a literal)."""
    count = iter(range(1, sql.count("?") + 1))
    return re.sub(r"\?", lambda _: f"${next(count)}", sql)


class _PgDb:
    """`store.Db` over one asyncpg connection."""

    dialect = "postgresql"

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def execute(self, sql: str, *args: Any) -> None:
        with _errors():
            await self.conn.execute(_numbered(sql), *args)

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        with _errors():
            row: Row | None = await self.conn.fetchrow(_numbered(sql), *args)
            return row

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        with _errors():
            return list(await self.conn.fetch(_numbered(sql), *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        with _errors():
            return await self.conn.fetchval(_numbered(sql), *args)


class _PgTx(LogTx, _PgDb):
    """A write's view: the writer connection inside its transaction, with the log's counter."""


@contextlib.contextmanager
def _errors() -> Any:
    try:
        yield
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise IntegrityError(str(exc)) from exc
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(f"PostgreSQL is unavailable: {type(exc).__name__}: {exc}") from exc


def redact_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=netloc[0].split(":", 1)[0] + ":***@" + netloc[1]))


class PostgresStore(Store):
    """The PostgreSQL backend; see the module docstring."""

    dialect = "postgresql"

    def __init__(self, url: str, *, pool_size: int = 4, hashers: int = 2, name: str = "chatserver") -> None:
        self.url = url
        self.name = name
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._hashers = ThreadPoolExecutor(max_workers=hashers, thread_name_prefix="hash")
        self._queue: asyncio.Queue[tuple[Callable[[Tx], Awaitable[Any]], asyncio.Future[Any]] | None] = asyncio.Queue()
        self._writer_conn: asyncpg.Connection | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._listener: asyncpg.Connection | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._listen_lost = asyncio.Event()
        self._closed = False

    def describe(self) -> str:
        return f"PostgreSQL database {redact_url(self.url)}"

    async def _connect(self, role: str) -> asyncpg.Connection:
        try:
            return await asyncpg.connect(
                self.url, timeout=CONNECT_TIMEOUT,
                server_settings={"application_name": f"{self.name}-{role}", "jit": "off"},
            )
        except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
            raise StoreUnavailable(f"cannot connect to {self.describe()}: {type(exc).__name__}: {exc}") from None
        except ValueError as exc:  # asyncpg's refusal of a malformed URL
            raise StoreError(f"cannot use {self.describe()}: {exc}") from None

    # -- Store -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        conn = await self._connect("migrate")
        try:
            await self._migrate(conn)
        finally:
            await conn.close()
        try:
            self._pool = await asyncpg.create_pool(
                # min_size 0: connections are made as reads need them, never retried in the background while
                # the database is away (each read that finds it away answers at once, with StoreUnavailable).
                self.url, min_size=0, max_size=self._pool_size, timeout=CONNECT_TIMEOUT,
                server_settings={"application_name": f"{self.name}-read", "jit": "off"},
            )
        except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
            raise StoreUnavailable(f"cannot connect to {self.describe()}: {exc}") from None
        self._writer_task = asyncio.get_running_loop().create_task(self._write_groups())
        self._listen_task = asyncio.get_running_loop().create_task(self._listen())

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        steps = schema.MIGRATIONS["postgresql"]
        db = _PgDb(conn)
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                version = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
                if version > len(steps):
                    raise StoreError(f"{self.describe()} has schema version {version}, newer than this server's "
                                     f"{len(steps)}: upgrade the server")
                for number in range(version, len(steps)):
                    await schema.run_step(db, steps[number])
                    await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", number + 1)
                self.log_id = (await eventlog.meta(db))[0]
        except asyncpg.PostgresError as exc:
            raise StoreError(f"cannot use {self.describe()}: {exc}") from None

    async def read(self, fn: ReadFn[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._pool is None:
            raise RuntimeError("the store is not started")
        try:
            conn = await self._pool.acquire(timeout=ACQUIRE_TIMEOUT)
        except Exception as exc:  # whatever stops a connection from being made or lent: the database is away
            raise StoreUnavailable(f"PostgreSQL is unavailable: {type(exc).__name__}: {exc}") from exc
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return await fn(_PgDb(conn), *args, **kwargs)
        except Exception as exc:
            if not isinstance(exc, _UNAVAILABLE) and not conn.is_closed():
                raise
            raise StoreUnavailable(f"PostgreSQL is unavailable: {type(exc).__name__}: {exc}") from exc
        finally:
            await self._give_back(conn)

    async def _give_back(self, conn: Any) -> None:
        """Return a read's connection to the pool. A connection the database cut under the read fails its reset
        (asyncpg then terminates it, and the pool opens another when one is needed): what the read answered or
        raised stands, and that failure is no error of the read's."""
        assert self._pool is not None
        try:
            await self._pool.release(conn)
        except Exception as exc:
            log.debug("a read's connection was dropped instead of pooled: %r", exc)

    async def _write(self, fn: WriteFn[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._writer_task is None or self._closed:
            raise RuntimeError("the store is not started, or closed")  # never a hang
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((lambda tx: fn(tx, *args, **kwargs), future))
        return await future

    async def offload(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._hashers, functools.partial(func, *args, **kwargs))

    async def send_ephemeral(self, payload: bytes) -> None:
        if self._pool is None:
            return
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                await conn.execute("SELECT pg_notify($1, $2)", EPHEMERAL_CHANNEL, payload.decode())
        except Exception as exc:
            log.debug("an ephemeral event was not sent: %r", exc)  # ephemeral: never retried

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer_task is not None:
            self._queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await self._writer_task
        if self._listen_task is not None:
            self._listen_task.cancel()
            with contextlib.suppress(BaseException):
                await self._listen_task
        for conn in (self._writer_conn, self._listener):
            if conn is not None and not conn.is_closed():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2.0)
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 5.0)
        self._hashers.shutdown(wait=False)

    # -- the writer --------------------------------------------------------------------------------------

    async def _write_groups(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            group, stop = [first], False
            while len(group) < MAX_GROUP and not self._queue.empty():
                more = self._queue.get_nowait()
                if more is None:
                    stop = True
                    break
                group.append(more)
            try:
                outcomes, events = await self._commit([call for call, _ in group])
            except Exception as exc:  # never lose the writer, never leave an awaiter hanging
                log.exception("a group of %d writes failed", len(group))
                outcomes, events = [(None, exc)] * len(group), []
            self.committed(events, [(future, value, error) for (_, future), (value, error)
                                    in zip(group, outcomes, strict=True)])
            if stop:
                return

    async def _commit(
        self, calls: list[Callable[[Tx], Awaitable[Any]]]
    ) -> tuple[list[tuple[Any, BaseException | None]], list[LogEvent]]:
        conn = self._writer_conn
        if conn is None or conn.is_closed():
            try:
                conn = self._writer_conn = await self._connect("write")
            except StoreError as exc:
                return [(None, exc)] * len(calls), []
        tx = _PgTx(conn)
        outcomes: list[tuple[Any, BaseException | None]] = []
        self.writes += len(calls)
        try:
            with _errors():
                async with conn.transaction():
                    self.commits += 1
                    tx.begin_log(await eventlog.lock_head(tx))
                    start = tx.head
                    for call in calls:
                        try:
                            outcomes.append((await run_write(tx, tx.mark, tx.restore, call), None))
                        except Exception as exc:
                            outcomes.append((None, exc))
                    if tx.head != start:
                        await eventlog.save_head(tx, tx.head)
                        await conn.execute("SELECT pg_notify($1, $2)", LOG_CHANNEL, str(tx.head))
        except StoreError as exc:  # the transaction or its commit failed: nothing of the group is stored
            if conn.is_closed():
                self._writer_conn = None
            return [(None, exc)] * len(calls), []
        return outcomes, tx.events

    # -- the listener ------------------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Hold a LISTEN connection; when it is lost, reopen it with backoff and wake the follower (what was
        notified meanwhile is lost, the log is not)."""
        attempts = 0
        while not self._closed:
            try:
                conn = await self._connect("listen")
                try:
                    conn.add_termination_listener(lambda _conn: self._listen_lost.set())
                    await conn.add_listener(LOG_CHANNEL, self._on_log)
                    await conn.add_listener(EPHEMERAL_CHANNEL, self._on_ephemeral)
                except BaseException:  # LISTEN failed, or close() cancelled this half-way: never left open
                    conn.terminate()
                    raise
            except (StoreError, asyncpg.PostgresError, *_UNAVAILABLE) as exc:
                attempts += 1
                delay = min(LISTEN_BACKOFF_CAP, LISTEN_BACKOFF_FIRST * 2**attempts) * random.uniform(0.5, 1.0)
                log.warning("LISTEN on %s failed (%s); retrying in %.1fs", self.describe(), exc, delay)
                await asyncio.sleep(delay)
                continue
            self._listener = conn
            if attempts:
                log.warning("LISTEN on %s again", self.describe())
            attempts = 0
            self._wake()  # what was committed while nobody listened
            self._listen_lost.clear()
            await self._listen_lost.wait()
            self._listener = None
            with contextlib.suppress(Exception):
                conn.terminate()
            if not self._closed:
                log.warning("the LISTEN connection to %s was lost; reconnecting", self.describe())

    def _on_log(self, *_args: Any) -> None:
        self._wake()

    def _wake(self) -> None:
        if self.on_wakeup is not None:
            try:
                self.on_wakeup()
            except Exception:
                log.exception("a wake-up failed")

    def _on_ephemeral(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if self.on_ephemeral is not None:
            try:
                self.on_ephemeral(payload.encode())
            except Exception:
                log.exception("an ephemeral event failed")

    @property
    def listening(self) -> bool:
        return self._listener is not None and not self._listener.is_closed()

