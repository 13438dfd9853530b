"""Persistence: users, dialogs, members, messages and read marks in one SQLite file.

`SQLiteStore` is synchronous and thread-aware (one connection per worker thread, WAL mode, a versioned
schema migrated at open). `AsyncStore` is how the rest of the server reaches it: every call runs on a small
thread pool, never on the IOLoop. Writes share commits (`GroupWriter`): the writes that arrive while one commit
is on disk go together in the next, each still all-or-nothing, so a burst costs one fsync, not one each.
The store knows nothing of events or transports; it answers "was this new?"
so that the service can decide what to publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from chatserver import jsonutil
from chatserver.errors import BadRequest, Conflict, NotFound
from chatserver.models import Dialog, DialogView, Message, User, now_iso

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class StoreError(Exception):
    """The database file cannot be opened or used; the text is for the operator."""


# One entry per schema version; entry N-1 takes a database from version N-1 to N. Never edit a shipped entry.
MIGRATIONS: tuple[str, ...] = (
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
    # 2: unread counts (messages after a read mark, not the reader's own) read the index alone, never the rows:
    # at a million messages the dialog list of a member of a thousand dialogs went from over a second to a tenth.
    # It serves history pages as the old index did.
    """
    CREATE INDEX messages_by_dialog_sender ON messages (dialog_id, seq, sender_id);
    DROP INDEX messages_by_dialog;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

_MESSAGE_COLUMNS = (
    "message_id, dialog_id, sender_id, content, type, meta, created_at, updated_at, client_message_id"
)

_LAST_MESSAGE_COLUMNS = ", ".join("l." + column.strip() for column in _MESSAGE_COLUMNS.split(","))


def _message(row: Sequence[Any]) -> Message:
    return Message(
        message_id=row[0],
        dialog_id=row[1],
        sender_id=row[2],
        content=row[3],
        type=row[4],
        meta=jsonutil.loads(row[5]),
        created_at=row[6],
        updated_at=row[7],
        client_message_id=row[8],
    )


class SQLiteStore:
    """The SQLite implementation. Every method is blocking: call it through `AsyncStore`, or from a CLI."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.commits = 0  # transactions committed or tried, of single writes and of groups (tests read it)
        self._migrate()

    # -- connections -------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
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
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from None
        self._local.conn = conn
        with self._lock:
            self._connections.append(conn)
        return conn

    def _write(self) -> _Transaction | _Savepoint:
        """One write, all or nothing: its own transaction, or a savepoint in the group commit it runs in."""
        conn = self._connect()
        if getattr(self._local, "grouped", False):
            return _Savepoint(conn)
        self.commits += 1
        return _Transaction(conn)

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def _migrate(self) -> None:
        conn = self._connect()
        try:
            with self._write():
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"database {self.path} has schema version {version}, newer than this server's "
                        f"{SCHEMA_VERSION}: upgrade the server"
                    )
                for number in range(version, SCHEMA_VERSION):
                    # executescript() would commit our transaction; the scripts hold no ';' inside a statement.
                    for statement in MIGRATIONS[number].split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {number + 1}")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot use database {self.path}: {exc}") from None

    def schema_version(self) -> int:
        return int(self._connect().execute("PRAGMA user_version").fetchone()[0])

    def ping(self) -> bool:
        self._connect().execute("SELECT 1").fetchone()
        return True

    # -- users -------------------------------------------------------------------------------------------

    def create_user(self, user: User, password_hash: str) -> User:
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO users (user_id, phone, name, password_hash, created_at) VALUES (?, ?, ?, ?, ?)",
                    (user.user_id, user.phone, user.name, password_hash, now_iso()),
                )
        except sqlite3.IntegrityError:
            raise Conflict(f"a user with phone {user.phone} already exists", field="phone") from None
        return user

    def get_user(self, user_id: str) -> User | None:
        row = self._connect().execute(
            "SELECT user_id, name, phone FROM users WHERE user_id = ?", (user_id,)
        ).fetchone()
        return User(*row) if row else None

    def user_by_phone(self, phone: str) -> User | None:
        row = self._connect().execute("SELECT user_id, name, phone FROM users WHERE phone = ?", (phone,)).fetchone()
        return User(*row) if row else None

    def password_hash(self, phone: str) -> tuple[User, str] | None:
        row = self._connect().execute(
            "SELECT user_id, name, phone, password_hash FROM users WHERE phone = ?", (phone,)
        ).fetchone()
        return (User(row[0], row[1], row[2]), row[3]) if row else None

    def unknown_users(self, user_ids: Iterable[str]) -> list[str]:
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return []
        conn = self._connect()
        known = {
            row[0]
            for chunk in _chunks(ids, 500)
            for row in conn.execute(
                f"SELECT user_id FROM users WHERE user_id IN ({','.join('?' * len(chunk))})", chunk  # noqa: S608
            )
        }
        return [i for i in ids if i not in known]

    def visible_users(self, viewer_id: str, user_ids: Iterable[str]) -> list[User]:
        """Those of the users that are the viewer or share a dialog with the viewer, in the order asked."""
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return []
        conn = self._connect()
        found: dict[str, User] = {}
        for chunk in _chunks(ids, 500):
            rows = conn.execute(
                f"SELECT u.user_id, u.name, u.phone FROM users u WHERE u.user_id IN ({','.join('?' * len(chunk))}) "  # noqa: S608
                "AND (u.user_id = ? OR EXISTS (SELECT 1 FROM dialog_members mine JOIN dialog_members theirs "
                "ON theirs.dialog_id = mine.dialog_id WHERE mine.user_id = ? AND theirs.user_id = u.user_id))",
                (*chunk, viewer_id, viewer_id),
            )
            found.update((row[0], User(*row)) for row in rows)
        return [found[i] for i in ids if i in found]

    # -- dialogs -----------------------------------------------------------------------------------------

    def save_dialog(self, dialog: Dialog) -> tuple[Dialog | None, Dialog]:
        """Create the dialog or replace its title and members; returns (before, after).

        An update older (by `updatedAt`) than the dialog held changes nothing, and `after` is then `before`: a
        redelivered or late event must not bring back a removed member.
        """
        with self._write() as conn:
            before = self._dialog(conn, dialog.dialog_id)
            if before is not None and dialog.updated_at < before.updated_at:
                return before, before
            if before is None:
                conn.execute(
                    "INSERT INTO dialogs (dialog_id, title, created_at, updated_at, activity_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (dialog.dialog_id, dialog.title, dialog.created_at, dialog.updated_at, dialog.updated_at),
                )
            else:
                conn.execute(
                    "UPDATE dialogs SET title = ?, updated_at = ?, activity_at = max(activity_at, ?) "
                    "WHERE dialog_id = ?",
                    (dialog.title, dialog.updated_at, dialog.updated_at, dialog.dialog_id),
                )
                conn.execute(
                    f"DELETE FROM dialog_members WHERE dialog_id = ? AND user_id NOT IN "  # noqa: S608
                    f"({','.join('?' * len(dialog.member_ids))})",
                    (dialog.dialog_id, *dialog.member_ids),
                )
            for position, user_id in enumerate(dialog.member_ids):
                conn.execute(
                    "INSERT INTO dialog_members (dialog_id, user_id, position) VALUES (?, ?, ?) "
                    "ON CONFLICT (dialog_id, user_id) DO UPDATE SET position = excluded.position",
                    (dialog.dialog_id, user_id, position),
                )
            after = self._dialog(conn, dialog.dialog_id)
        assert after is not None
        return before, after

    def get_dialog(self, dialog_id: str) -> Dialog | None:
        return self._dialog(self._connect(), dialog_id)

    def _dialog(self, conn: sqlite3.Connection, dialog_id: str) -> Dialog | None:
        row = conn.execute(
            "SELECT title, created_at, updated_at FROM dialogs WHERE dialog_id = ?", (dialog_id,)
        ).fetchone()
        if row is None:
            return None
        members = tuple(
            r[0]
            for r in conn.execute(
                "SELECT user_id FROM dialog_members WHERE dialog_id = ? ORDER BY position", (dialog_id,)
            )
        )
        return Dialog(dialog_id=dialog_id, title=row[0], member_ids=members, created_at=row[1], updated_at=row[2])

    def dialog_with_title(self, user_id: str, title: str) -> Dialog | None:
        row = self._connect().execute(
            "SELECT d.dialog_id FROM dialogs d JOIN dialog_members m ON m.dialog_id = d.dialog_id "
            "WHERE m.user_id = ? AND d.title = ? ORDER BY d.created_at LIMIT 1",
            (user_id, title),
        ).fetchone()
        return self.get_dialog(row[0]) if row else None

    def dialog_views(self, user_id: str) -> list[DialogView]:
        """The user's dialogs, most recently active first, each with its last message and the user's unread count.

        Two queries in one snapshot, however many dialogs: not a round of queries per dialog.
        """
        conn = self._connect()
        conn.execute("BEGIN")
        try:
            rows = conn.execute(
                "SELECT d.dialog_id, d.title, d.created_at, d.updated_at, "  # noqa: S608
                "(SELECT count(*) FROM messages x WHERE x.dialog_id = m.dialog_id AND x.seq > m.last_read_seq "
                f"AND x.sender_id != m.user_id), {_LAST_MESSAGE_COLUMNS} "
                "FROM dialog_members m JOIN dialogs d ON d.dialog_id = m.dialog_id "
                "LEFT JOIN messages l ON l.seq = d.last_seq "
                "WHERE m.user_id = ? ORDER BY d.activity_at DESC, d.last_seq DESC, d.dialog_id",
                (user_id,),
            ).fetchall()
            members: dict[str, list[str]] = {}
            for dialog_id, member in conn.execute(
                "SELECT o.dialog_id, o.user_id FROM dialog_members m "
                "JOIN dialog_members o ON o.dialog_id = m.dialog_id WHERE m.user_id = ? ORDER BY o.position",
                (user_id,),
            ):
                members.setdefault(dialog_id, []).append(member)
        finally:
            conn.execute("COMMIT")
        return [
            DialogView(
                Dialog(row[0], row[1], tuple(members.get(row[0], ())), row[2], row[3]),
                _message(row[5:]) if row[5] is not None else None,
                int(row[4]),
            )
            for row in rows
        ]

    def dialog_view(self, dialog_id: str, user_id: str) -> DialogView | None:
        return self._view(self._connect(), dialog_id, user_id)

    def _view(self, conn: sqlite3.Connection, dialog_id: str, user_id: str) -> DialogView | None:
        dialog = self._dialog(conn, dialog_id)
        if dialog is None:
            return None
        row = conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE seq = "  # noqa: S608
            "(SELECT last_seq FROM dialogs WHERE dialog_id = ?)",
            (dialog_id,),
        ).fetchone()
        return DialogView(dialog, _message(row) if row else None, self._unread(conn, dialog_id, user_id))

    def _unread(self, conn: sqlite3.Connection, dialog_id: str, user_id: str) -> int:
        row = conn.execute(
            "SELECT count(*) FROM messages WHERE dialog_id = ? AND sender_id != ? AND seq > "
            "coalesce((SELECT last_read_seq FROM dialog_members WHERE dialog_id = ? AND user_id = ?), 0)",
            (dialog_id, user_id, dialog_id, user_id),
        ).fetchone()
        return int(row[0])

    def unread_counts(self, dialog_id: str) -> dict[str, int]:
        """Every member's unread count in the dialog, in one pass."""
        conn = self._connect()
        return {
            row[0]: int(row[1])
            for row in conn.execute(
                "SELECT m.user_id, (SELECT count(*) FROM messages x WHERE x.dialog_id = m.dialog_id "
                "AND x.seq > m.last_read_seq AND x.sender_id != m.user_id) "
                "FROM dialog_members m WHERE m.dialog_id = ?",
                (dialog_id,),
            )
        }

    def mark_read(self, dialog_id: str, user_id: str, message_id: str) -> DialogView:
        with self._write() as conn:
            row = conn.execute("SELECT seq, dialog_id FROM messages WHERE message_id = ?", (message_id,)).fetchone()
            if row is None:
                raise NotFound(f"message {message_id} not found", field="messageId")
            if row[1] != dialog_id:
                raise BadRequest("'messageId' is not a message of this dialog", field="messageId")
            conn.execute(
                "UPDATE dialog_members SET last_read_seq = max(last_read_seq, ?) WHERE dialog_id = ? AND user_id = ?",
                (row[0], dialog_id, user_id),
            )
            view = self._view(conn, dialog_id, user_id)
        assert view is not None
        return view

    # -- messages ----------------------------------------------------------------------------------------

    def insert_message(self, message: Message) -> tuple[Message, bool]:
        """Store a new message; returns (stored message, created). Idempotent by id and by clientMessageId."""
        with self._write() as conn:
            existing = self._existing(conn, message)
            if existing is not None:
                return existing, False
            seq = conn.execute(
                f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                _row(message),
            ).lastrowid
            conn.execute(
                "UPDATE dialogs SET last_seq = ?, activity_at = max(activity_at, ?) WHERE dialog_id = ?",
                (seq, message.created_at, message.dialog_id),
            )
        return message, True

    def _existing(self, conn: sqlite3.Connection, message: Message) -> Message | None:
        row = conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE message_id = ?", (message.message_id,)  # noqa: S608
        ).fetchone()
        if row is None and message.client_message_id is not None:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages "  # noqa: S608
                "WHERE dialog_id = ? AND sender_id = ? AND client_message_id = ?",
                (message.dialog_id, message.sender_id, message.client_message_id),
            ).fetchone()
        return _message(row) if row else None

    def apply_update(self, message: Message) -> tuple[Message, bool]:
        """Store a newer version of a message (or the message itself, if unseen); returns (stored, applied).

        A version that is not newer by `updatedAt` than the stored one changes nothing.
        """
        with self._write() as conn:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE message_id = ?", (message.message_id,)  # noqa: S608
            ).fetchone()
            if row is None:
                seq = conn.execute(
                    f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    _row(message),
                ).lastrowid
                conn.execute(
                    "UPDATE dialogs SET last_seq = max(last_seq, ?), activity_at = max(activity_at, ?) "
                    "WHERE dialog_id = ?",
                    (seq, message.created_at, message.dialog_id),
                )
                return message, True
            stored = _message(row)
            if message.updated_at <= stored.updated_at:
                return stored, False
            conn.execute(
                "UPDATE messages SET content = ?, type = ?, meta = ?, updated_at = ? WHERE message_id = ?",
                (message.content, message.type, jsonutil.dumps(message.meta), message.updated_at, message.message_id),
            )
            # The dialog and sender of a message never change, whatever an update says.
            updated = Message(
                message_id=stored.message_id,
                dialog_id=stored.dialog_id,
                sender_id=stored.sender_id,
                content=message.content,
                type=message.type,
                meta=message.meta,
                created_at=stored.created_at,
                updated_at=message.updated_at,
                client_message_id=stored.client_message_id,
            )
        return updated, True

    def get_message(self, message_id: str) -> Message | None:
        row = self._connect().execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE message_id = ?", (message_id,)  # noqa: S608
        ).fetchone()
        return _message(row) if row else None

    def list_messages(
        self, dialog_id: str, *, limit: int, before: str | None = None, after: str | None = None
    ) -> list[Message]:
        """A page of the dialog's history, oldest first.

        Without bounds: the newest `limit`. With `before`: the `limit` messages just before it. With `after`:
        the `limit` just after it. With both: the first `limit` after `after` that are before `before`.
        """
        conn = self._connect()
        low = self._seq_in_dialog(conn, dialog_id, after, "after") if after else None
        high = self._seq_in_dialog(conn, dialog_id, before, "before") if before else None
        clauses, params = ["dialog_id = ?"], [dialog_id]
        if low is not None:
            clauses.append("seq > ?")
            params.append(low)
        if high is not None:
            clauses.append("seq < ?")
            params.append(high)
        ascending = low is not None
        query = (
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE {' AND '.join(clauses)} "  # noqa: S608
            f"ORDER BY seq {'ASC' if ascending else 'DESC'} LIMIT ?"
        )
        rows = conn.execute(query, (*params, limit)).fetchall()
        messages = [_message(r) for r in rows]
        return messages if ascending else messages[::-1]

    def _seq_in_dialog(self, conn: sqlite3.Connection, dialog_id: str, message_id: str, field: str) -> int:
        row = conn.execute(
            "SELECT seq FROM messages WHERE message_id = ? AND dialog_id = ?", (message_id, dialog_id)
        ).fetchone()
        if row is None:
            raise BadRequest(f"'{field}' is not a message of this dialog", field=field)
        return int(row[0])


class _Transaction:
    """`BEGIN IMMEDIATE` ... `COMMIT`, or `ROLLBACK` on error: a write takes the lock up front."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error:
                # A failed COMMIT (a full disk) leaves the transaction open: end it, or every later write on
                # this connection would fail too.
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        elif self.conn.in_transaction:
            # SQLite has already rolled back after some errors (a full disk): a second ROLLBACK would fail and
            # hide the error that matters.
            self.conn.execute("ROLLBACK")


class _Savepoint:
    """One write of a group commit: `SAVEPOINT` ... `RELEASE`, or `ROLLBACK TO` it on error (the rest stays)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("SAVEPOINT one_write")
        return self.conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.conn.in_transaction:
            return  # SQLite rolled the whole group back (a full disk): GroupWriter fails every write of it
        if exc_type is not None:
            self.conn.execute("ROLLBACK TO one_write")
        self.conn.execute("RELEASE one_write")


class _Write:
    __slots__ = ("call", "future", "loop")

    def __init__(self, call: Callable[[SQLiteStore], Any], loop: asyncio.AbstractEventLoop) -> None:
        self.call = call
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()


class GroupWriter:
    """The one writer thread. It takes every write waiting (up to `max_group`) and runs them in submission order
    in one transaction, each in a savepoint: a write that fails is undone alone, the others commit together, with
    one fsync. Then it resolves their futures in that order, in one callback on the loop: the awaiters resume, and
    publish, in the order the writes were stored. A commit that fails fails every write of its group.

    A write that arrives while nothing else waits commits alone, at once: grouping never delays a write.
    """

    def __init__(self, store: SQLiteStore, max_group: int = 64) -> None:
        self._store = store
        self._max_group = max_group
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="store-write", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[SQLiteStore], T]) -> asyncio.Future[T]:
        if self._closed:
            raise RuntimeError("the store's writer is closed")  # as an executor after shutdown: never a hang
        write = _Write(call, asyncio.get_running_loop())
        self._queue.put(write)
        return write.future

    def close(self) -> None:
        """Finish what was submitted, then stop the thread."""
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group, stop = [first], False
            while len(group) < self._max_group:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                group.append(more)
            try:
                outcomes = self._commit(group) if len(group) > 1 else [self._alone(first)]
            except BaseException as exc:  # never lose the thread, never leave an awaiter hanging
                log.exception("a group of %d writes failed", len(group))
                outcomes = [(None, exc)] * len(group)
            self._resolve(group, outcomes)
            if stop:
                return

    def _alone(self, write: _Write) -> tuple[Any, BaseException | None]:
        try:
            return write.call(self._store), None
        except BaseException as exc:
            return None, exc

    def _commit(self, group: list[_Write]) -> list[tuple[Any, BaseException | None]]:
        store = self._store
        conn = store._connect()
        outcomes: list[tuple[Any, BaseException | None]] = []
        store._local.grouped = True
        try:
            store.commits += 1
            conn.execute("BEGIN IMMEDIATE")
            for write in group:
                try:
                    outcomes.append((write.call(store), None))
                except BaseException as exc:
                    outcomes.append((None, exc))
                if not conn.in_transaction:
                    # SQLite rolled the group back (a full disk): what this group wrote so far is gone. Those
                    # writes fail with the error; the rest of the group goes on in a transaction of its own.
                    error = outcomes[-1][1] or sqlite3.OperationalError("the group commit was rolled back")
                    outcomes = [(None, error)] * len(outcomes)
                    store.commits += 1
                    conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                return [(None, exc)] * len(group)
        except sqlite3.Error as exc:  # BEGIN failed (the database is locked for longer than busy_timeout)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return [(None, exc)] * len(group)
        finally:
            store._local.grouped = False
        return outcomes

    @staticmethod
    def _resolve(group: list[_Write], outcomes: list[tuple[Any, BaseException | None]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Write, tuple[Any, BaseException | None]]]] = {}
        for write, outcome in zip(group, outcomes, strict=True):
            by_loop.setdefault(write.loop, []).append((write, outcome))
        for loop, settled in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is left to tell
                loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[_Write, tuple[Any, BaseException | None]]]) -> None:
    """On the loop: each write's future gets its outcome, in the order the writes were stored."""
    for write, (value, error) in settled:
        if write.future.done():
            continue  # its awaiter was cancelled; the write is stored all the same
        if error is None:
            write.future.set_result(value)
        else:
            write.future.set_exception(error)


class AsyncStore:
    """The store as the IOLoop sees it: each call runs on the store's threads and is awaited.

    Writes go to one writer thread (`GroupWriter`), in the order they are submitted, and their awaiters resume
    in that same order: so the order in which messages are stored (history pages) is the order in which they are
    published (live events). Reads run on their own threads and never wait behind a write, nor behind password
    hashing, which has threads of its own: a burst of logins must not stall every history page and membership
    check behind ~50 ms of scrypt each.
    """

    def __init__(self, store: SQLiteStore, readers: int = 2, hashers: int = 2) -> None:
        self.sync = store
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="store-read")
        self._writer = GroupWriter(store)
        self._hashers = ThreadPoolExecutor(max_workers=hashers, thread_name_prefix="hash")

    async def run(self, method: Callable[Concatenate[SQLiteStore, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A read."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, functools.partial(method, self.sync, *args, **kwargs))

    async def write(self, method: Callable[Concatenate[SQLiteStore, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A write, serialized behind every write submitted before it (and maybe committed with them)."""
        return await self._writer.submit(lambda store: method(store, *args, **kwargs))

    async def offload(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run CPU-heavy work (password hashing) off the loop too."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._hashers, functools.partial(func, *args, **kwargs))

    def close(self) -> None:
        self._hashers.shutdown(wait=True)
        self._writer.close()
        self._readers.shutdown(wait=True)
        self.sync.close()


def _row(message: Message) -> tuple[Any, ...]:
    return (
        message.message_id,
        message.dialog_id,
        message.sender_id,
        message.content,
        message.type,
        jsonutil.dumps(message.meta),
        message.created_at,
        message.updated_at,
        message.client_message_id,
    )


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
