"""The durable event log (PROTOCOL section 9): its rows, how they are appended, and who may read each one.

Every non-ephemeral event is a row of `events`, written by the write that made the change it reports, in the same
transaction (`LogTx.append`). Its `position` is its place in one total order per database:

- Positions are gap-free in commit order, on every process. Each write transaction takes the log's lock first
  (`lock_head`: SQLite's `BEGIN IMMEDIATE`; on PostgreSQL `SELECT ... FOR UPDATE` of the one `log_meta` row) and
  holds it until it commits, so transactions that write the log commit one after another, each numbering its
  events after the last committed one. A reader never sees position N+1 before N is committed, and a write that
  is undone gives its positions back (savepoints restore the counter). Taking that lock first in every write also
  means two writers never wait for each other's locks in opposite orders.
- The log is named: `log_meta.log_id`, made once with the schema. A cursor is `<log_id>.<position>`; a cursor of
  another log (a replaced or restored database) gets `restarted`, one older than what is kept gets `expired`.
- Who receives an event is a fact of the log, not of the moment it is read. A row for one user (`user_id`, a read
  mark's `dialog:update`) is that user's. Any other row names its dialog's member list by version
  (`members_version`): every change of a dialog makes a new version, and `membership` keeps each member's
  periods as versions [from_version, to_version). A dialog change (`change`) goes to the members of its version and
  of the one before (a removed member gets that last `dialog:update`); it carries its own member list in its data,
  and in `extra` the members it removed and each member's unread count. So replay from the store gives exactly the
  events a user had as a member at their moment, and costs no copy of a member list per event.
- `floor`: every event after it is still kept. `prune` deletes the oldest beyond `event_retention`, but never one
  that Chat3 outbound (PROTOCOL section 14) has yet to publish while it is in use.
- `outbound`: how far Chat3 outbound has published (every message event of this server up to `position` is
  confirmed by the broker), and which process holds the lease to publish (one at a time, on any host).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from chatserver.store import Db, LogEvent, Row, Tx

EVENT_COLUMNS = "position, type, dialog_id, user_id, members_version, change, source, data, extra"
_EVENT_COLUMNS_E = ", ".join("e." + c.strip() for c in EVENT_COLUMNS.split(","))
PRUNE_BATCH = 5000
# Chat3 outbound counts as in use (its unpublished events are kept) while its lease was held this recently.
OUTBOUND_IN_USE_MS = 24 * 3600 * 1000
OUTBOUND_TYPES = ("message:new", "message:update")


def _event(row: Row) -> LogEvent:
    return LogEvent(
        position=int(row[0]),
        type=row[1],
        dialog_id=row[2],
        user_id=row[3],
        members_version=int(row[4]),
        change=bool(row[5]),
        source=row[6],
        data=row[7],
        extra=row[8],
    )


class LogTx:
    """The log's side of a write transaction: the next position, and the events appended so far.

    Mixed into each backend's transaction class, whose `execute` runs the SQL. `mark`/`restore` bracket one write
    of a group: a write that fails gives back its positions and its events.
    """

    head: int
    events: list[LogEvent]

    if TYPE_CHECKING:
        async def execute(self, sql: str, *args: Any) -> None: ...  # the backend's

    def begin_log(self, head: int) -> None:
        self.head = head
        self.events = []

    def mark(self) -> tuple[int, int]:
        return self.head, len(self.events)

    def restore(self, mark: tuple[int, int]) -> None:
        self.head = mark[0]
        del self.events[mark[1] :]

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
    ) -> LogEvent:
        self.head += 1
        event = LogEvent(self.head, type, dialog_id, data, members_version, user_id, change, source, extra)
        await self.execute(
            f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
            event.position, type, dialog_id, user_id, members_version, int(change), source, data, extra,
        )
        self.events.append(event)
        return event


# -- the log's lock and head ------------------------------------------------------------------------------


async def lock_head(db: Db) -> int:
    """The last position given out, with the log's lock taken (SQLite holds it from `BEGIN IMMEDIATE`)."""
    suffix = " FOR UPDATE" if db.dialect == "postgresql" else ""
    return int(await db.fetchval("SELECT head FROM log_meta WHERE id = 1" + suffix))  # noqa: S608


async def save_head(db: Db, head: int) -> None:
    await db.execute("UPDATE log_meta SET head = ? WHERE id = 1", head)


async def meta(db: Db) -> tuple[str, int, int]:
    """(log_id, head, floor): the log's name, its last committed position, and the last position pruned."""
    row = await db.fetchrow("SELECT log_id, head, floor FROM log_meta WHERE id = 1")
    assert row is not None
    return str(row[0]), int(row[1]), int(row[2])


async def head(db: Db) -> int:
    return int(await db.fetchval("SELECT head FROM log_meta WHERE id = 1"))


# -- reading -------------------------------------------------------------------------------------------


async def events_after(db: Db, position: int, limit: int) -> tuple[int, list[LogEvent]]:
    """(head, the first `limit` events after `position`), for every audience: what a process follows."""
    current = await head(db)
    rows = await db.fetch(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE position > ? AND position <= ? ORDER BY position LIMIT ?",  # noqa: S608
        position, current, limit,
    )
    return current, [_event(row) for row in rows]


async def events_for_user(db: Db, user_id: str, after: int, upto: int, limit: int) -> tuple[int, list[LogEvent]]:
    """(floor, the first `limit` events in (after, upto] that reach `user_id`), in order: resume from the store.

    Driven by the user's membership periods, so its cost is that of the user's dialogs' events in the range,
    however many other dialogs the log holds.
    """
    floor = int(await db.fetchval("SELECT floor FROM log_meta WHERE id = 1"))
    rows = await db.fetch(
        f"SELECT {_EVENT_COLUMNS_E} FROM membership m JOIN events e ON e.dialog_id = m.dialog_id "  # noqa: S608
        "WHERE m.user_id = ? AND e.position > ? AND e.position <= ? AND e.user_id IS NULL "
        "AND e.members_version >= m.from_version AND (m.to_version IS NULL OR e.members_version < m.to_version "
        "OR (e.change = 1 AND e.members_version = m.to_version)) "
        f"UNION ALL SELECT {EVENT_COLUMNS} FROM events WHERE user_id = ? AND position > ? AND position <= ? "
        "ORDER BY position LIMIT ?",
        user_id, after, upto, user_id, after, upto, limit,
    )
    return floor, [_event(row) for row in rows]


async def members_at(db: Db, dialog_id: str, version: int) -> frozenset[str]:
    """The members of a dialog's member list `version`."""
    rows = await db.fetch(
        "SELECT user_id FROM membership WHERE dialog_id = ? AND from_version <= ? "
        "AND (to_version IS NULL OR to_version > ?)",
        dialog_id, version, version,
    )
    return frozenset(row[0] for row in rows)


async def current_members(db: Db, dialog_id: str) -> tuple[int, frozenset[str]] | None:
    """(version, members) of a dialog as committed now; None for an unknown dialog."""
    version = await db.fetchval("SELECT members_version FROM dialogs WHERE dialog_id = ?", dialog_id)
    if version is None:
        return None
    rows = await db.fetch("SELECT user_id FROM dialog_members WHERE dialog_id = ?", dialog_id)
    return int(version), frozenset(row[0] for row in rows)


# -- membership periods --------------------------------------------------------------------------------


async def record_membership(tx: Tx, dialog_id: str, version: int, added: Sequence[str], removed: Sequence[str]) -> None:
    """Open a period for each member added at `version`, close the open one of each member removed."""
    for user_id in added:
        await tx.execute(
            "INSERT INTO membership (dialog_id, user_id, from_version) VALUES (?, ?, ?)", dialog_id, user_id, version
        )
    for user_id in removed:
        await tx.execute(
            "UPDATE membership SET to_version = ? WHERE dialog_id = ? AND user_id = ? AND to_version IS NULL",
            version, dialog_id, user_id,
        )


# -- retention -----------------------------------------------------------------------------------------


async def prune(tx: Tx, retention: int, now_ms: int) -> int:
    """Delete up to PRUNE_BATCH of the oldest events beyond the newest `retention`; returns how many went.

    While Chat3 outbound is in use (its lease held within OUTBOUND_IN_USE), what it has not published stays.
    """
    _, current, floor = await meta(tx)
    target = min(current - retention, floor + PRUNE_BATCH)
    row = await tx.fetchrow("SELECT position, lease_until FROM outbound WHERE id = 1")
    if row is not None and int(row[1]) > now_ms - OUTBOUND_IN_USE_MS:
        target = min(target, int(row[0]))
    if target <= floor:
        return 0
    await tx.execute("DELETE FROM events WHERE position <= ?", target)
    await tx.execute("UPDATE log_meta SET floor = ? WHERE id = 1", target)
    return target - floor


# -- Chat3 outbound ------------------------------------------------------------------------------------


async def open_outbound(tx: Tx, now_ms: int) -> None:
    """Start outbound at the log's head, unless it has started before: run before the server takes a message,
    so that every message taken from then on is published, even one that commits before the first claim."""
    if await tx.fetchrow("SELECT position FROM outbound WHERE id = 1") is None:
        await tx.execute("INSERT INTO outbound (id, position, owner, lease_until) VALUES (1, ?, NULL, ?)",
                         tx.head, now_ms)


async def claim_outbound(tx: Tx, owner: str, now_ms: int, lease_ms: int) -> int | None:
    """Take or renew the lease to publish outbound; the position published up to, or None while another process
    holds it. The first claim ever starts at the log's head: what was written before outbound was on stays."""
    row = await tx.fetchrow("SELECT position, owner, lease_until FROM outbound WHERE id = 1")
    if row is None:
        await tx.execute("INSERT INTO outbound (id, position, owner, lease_until) VALUES (1, ?, ?, ?)",
                         tx.head, owner, now_ms + lease_ms)
        return tx.head
    if row[1] not in (None, owner) and int(row[2]) > now_ms:
        return None
    await tx.execute("UPDATE outbound SET owner = ?, lease_until = ? WHERE id = 1", owner, now_ms + lease_ms)
    return int(row[0])


async def advance_outbound(tx: Tx, owner: str, position: int) -> bool:
    """Record that every outbound event up to `position` is confirmed; False if the lease is no longer ours."""
    row = await tx.fetchrow("SELECT owner, position FROM outbound WHERE id = 1")
    if row is None or row[0] != owner:
        return False
    await tx.execute("UPDATE outbound SET position = ? WHERE id = 1", max(position, int(row[1])))
    return True


async def release_outbound(tx: Tx, owner: str, now_ms: int) -> None:
    """Give the lease up now (another process may take it at once); its time stays, so that the log keeps
    what outbound has not published while outbound counts as in use (OUTBOUND_IN_USE_MS)."""
    await tx.execute("UPDATE outbound SET owner = NULL, lease_until = ? WHERE id = 1 AND owner = ?", now_ms, owner)


async def outbound_after(db: Db, position: int, limit: int) -> tuple[int, list[LogEvent], int]:
    """(last position scanned, this server's message events after `position` to publish, how many wait in all)."""
    current = await head(db)
    rows = await db.fetch(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE position > ? AND position <= ? AND source = 'local' "  # noqa: S608
        "AND type IN (?, ?) ORDER BY position LIMIT ?",
        position, current, *OUTBOUND_TYPES, limit,
    )
    events = [_event(row) for row in rows]
    if len(events) < limit:
        waiting = len(events)
        scanned = current
    else:
        waiting = int(await db.fetchval(
            "SELECT count(*) FROM events WHERE position > ? AND source = 'local' AND type IN (?, ?)",
            position, *OUTBOUND_TYPES))
        scanned = events[-1].position
    return scanned, events, waiting
