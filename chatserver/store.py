"""The store: one interface over SQLite and PostgreSQL, and what every backend shares.

A backend (`chatserver.sqlite.SQLiteStore`, `chatserver.postgres.PostgresStore`) runs the data-access functions of
`chatserver.queries` and `chatserver.eventlog`, which are written once, as coroutines over a `Db`: SQL with `?`
placeholders in the subset both databases speak. PostgreSQL awaits them on the IOLoop (asyncpg); SQLite runs them
on its own threads, where every `Db` call completes at once, so `drive` runs such a coroutine to its end in one
step and no loop is needed there.

Every write goes through `Store.write`: one writer per process takes the writes that arrive together, runs them in
one transaction, each in a savepoint (one that fails is undone alone), and commits them with one fsync. A write
that reports a change appends its event to the log in that same transaction (`Tx.append`); positions are given out
under the log's lock, held from the transaction's start to its commit, so they are gap-free in commit order on
every process (see `chatserver.eventlog`). After a commit the store hands the group's events to `on_commit`, on the
loop, before any awaiter of the group resumes: what was committed is published even if its writer was cancelled.

This module knows nothing of HTTP, transports or the broadcaster.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, overload

import attrs

from chatserver.errors import Unavailable

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

POSTGRES_SCHEMES = ("postgresql", "postgres")
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):")


class StoreError(Exception):
    """The database cannot be opened or used; the text is for the operator."""


class StoreUnavailable(StoreError, Unavailable):
    """The database is unusable for now (locked, unreachable, out of disk): worth retrying later. A client that
    meets it gets 503 (it is the domain's `Unavailable`)."""


class IntegrityError(StoreError):
    """A write broke a constraint of the schema (a taken phone, say)."""


class Row(Protocol):
    """A row as both drivers give it (sqlite3.Row, asyncpg.Record): by index, by slice, iterable."""

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Any]: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Any]: ...


class Db(Protocol):
    """A connection, as the data-access functions see it: SQL with `?` placeholders, rows as sequences."""

    dialect: str  # "sqlite" or "postgresql"

    async def execute(self, sql: str, *args: Any) -> None: ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...

    async def fetch(self, sql: str, *args: Any) -> Sequence[Row]: ...

    async def fetchval(self, sql: str, *args: Any) -> Any: ...


@attrs.frozen(slots=True)
class LogEvent:
    """One event of the durable log, as stored (see `chatserver.eventlog` for what each field means)."""

    position: int
    type: str
    dialog_id: str
    data: str  # the event's `data`, as JSON text: spliced into every payload as it is
    members_version: int
    user_id: str | None = None  # set: the event is for this user alone
    change: bool = False  # a dialog change: for the members of the version before too
    source: str = "local"  # "local" or "chat3": where the change came from (Chat3 outbound skips chat3's)
    extra: str | None = None  # JSON: for a dialog change, the members removed and each member's unread count


class Tx(Db, Protocol):
    """A write's connection: inside the writer's transaction, with the log's lock held."""

    head: int  # the last position given out in this transaction

    async def append(
        self,
        type: str,
        dialog_id: str,
        data: str,
        *,
        members_version: int,
        user_id: str | None = None,
        change: bool = False,
        source: str = "local",
        extra: str | None = None,
    ) -> LogEvent: ...


Settled = tuple["asyncio.Future[Any]", Any, BaseException | None]  # a write's future, its value, its error
ReadFn = Callable[Concatenate[Db, P], Awaitable[T]]
WriteFn = Callable[Concatenate[Tx, P], Awaitable[T]]


class Store(abc.ABC):
    """What the server holds of a database: reads, grouped writes, the log's identity, and wake-ups."""

    dialect: str
    log_id: str = ""
    # Counted by the writer: transactions begun, and the writes run in them (writes / commits: the group size).
    commits: int = 0
    writes: int = 0
    # Called on the loop with the events of each commit, in position order, before its writers resume.
    on_commit: Callable[[list[LogEvent]], None] | None = None
    # Called on the loop when another process may have committed events (PostgreSQL's NOTIFY).
    on_wakeup: Callable[[], None] | None = None
    # Called on the loop with ephemeral payloads other processes sent (typing), see `send_ephemeral`.
    on_ephemeral: Callable[[bytes], None] | None = None
    # Set in a worker whose sibling commits some of its writes (chatserver/siblings.py): asked first with each
    # write; it answers with the write's outcome to await, or None, and the write is then run here.
    forward: Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Awaitable[Any] | None] | None = None

    @abc.abstractmethod
    async def read(self, fn: ReadFn[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a read in a snapshot of its own; never waits behind a write."""

    async def write(self, fn: WriteFn[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a write, all or nothing, in the order submitted; maybe committed with others (group commit), maybe
        by a sibling worker's writer (`forward`)."""
        if self.forward is not None:
            forwarded = self.forward(fn, args, kwargs)
            if forwarded is not None:
                result: T = await forwarded
                return result
        return await self._write(fn, *args, **kwargs)

    @abc.abstractmethod
    async def _write(self, fn: WriteFn[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`write` on this process's writer."""

    @abc.abstractmethod
    async def offload(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run CPU-heavy work (password hashing) off the loop, on threads that never hold up a read."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect, migrate the schema, learn the log's id; on the loop, before serving."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish the writes submitted, then release every connection and thread."""

    async def send_ephemeral(self, payload: bytes) -> None:  # noqa: B027 - most backends have no channel
        """Hand an ephemeral payload (typing) to the other processes on this database, where the backend can."""

    def describe(self) -> str:
        """The database, for logs and errors (never a password)."""
        return self.dialect

    def committed(self, events: list[LogEvent], settled: Sequence[Settled]) -> None:
        """On the loop, after a commit: each write's outcome, in order, then its events to `on_commit`.

        Setting a future only schedules its awaiter, so every awaiter still resumes after `on_commit` has
        published. Settled first, the awaiters' answers (a POST's 201) are queued on the loop ahead of the frames
        the publish joins for the end of the turn: the writers' clients send their next writes sooner, and those
        arrive together and share the next commit, whose events then leave joined in fewer sends.
        """
        settle(settled)
        if events and self.on_commit is not None:
            try:
                self.on_commit(events)
            except Exception:
                log.exception("handing on the events of a commit failed")


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (a data-access function over SQLite's `Db`) to its end, now."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a store coroutine suspended on a synchronous connection")


def is_postgres_url(value: str) -> bool:
    match = _URL.match(value)
    return match is not None and match.group("scheme").lower() in POSTGRES_SCHEMES


def check_db_setting(value: str) -> None:
    """Refuse a `db` that is neither a file path nor a usable PostgreSQL URL (ValueError with the reason).

    `postgresql:/x` or `mysql://h/d` must not become a folder named `postgresql:` beside the server.
    """
    match = _URL.match(value)
    if match is None or len(match.group("scheme")) == 1:  # no scheme, or a Windows drive letter
        return
    scheme = match.group("scheme").lower()
    if scheme not in POSTGRES_SCHEMES:
        if "://" in value:
            raise ValueError(f"'{scheme}://' databases are not supported: use a SQLite file path or postgresql://")
        return
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if not value[match.end() :].startswith("//") or not (parts.hostname or parts.path.strip("/")):
        raise ValueError("expected postgresql://user@host:port/dbname (or a SQLite file path)")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ValueError("the port in the postgresql:// URL is not a number") from None


async def run_write(tx: Tx, mark: Callable[[], Any], restore: Callable[[Any], None],
                    fn: WriteFn[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """One write of a group, in a savepoint: on an error only its own changes (and log events) are undone."""
    saved = mark()
    await tx.execute("SAVEPOINT one_write")
    try:
        result = await fn(tx, *args, **kwargs)
    except BaseException:
        restore(saved)
        await _rollback_savepoint(tx)
        raise
    await tx.execute("RELEASE SAVEPOINT one_write")
    return result


async def _rollback_savepoint(tx: Tx) -> None:
    try:
        await tx.execute("ROLLBACK TO SAVEPOINT one_write")
        await tx.execute("RELEASE SAVEPOINT one_write")
    except Exception as exc:  # the whole transaction is gone (SQLite after a full disk): the writer sees to it
        log.debug("a savepoint could not be rolled back: %r", exc)


def settle(futures: Sequence[Settled]) -> None:
    """On the loop: each write's future gets its outcome, in the order the writes were stored."""
    for future, value, error in futures:
        if future.done():
            continue  # its awaiter was cancelled; the write is stored (and published) all the same
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
