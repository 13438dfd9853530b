"""The data-access functions of users, dialogs, members, messages and read marks, written once for both stores.

Each is a coroutine over a `Db` (reads) or a `Tx` (writes, run by `Store.write` in the writer's transaction).
The SQL is the subset SQLite and PostgreSQL share, with `?` placeholders; `greatest()` is PostgreSQL's and is
registered on SQLite's connections. A write that changes what a client may see appends its event to the log in
the same transaction (`chatserver.eventlog`): the store answers "was this new?", the log says who is told.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from chatserver import jsonutil
from chatserver.errors import BadRequest, Conflict, Forbidden, NotFound
from chatserver.eventlog import record_membership
from chatserver.models import Dialog, DialogView, Message, Receipt, User, now_iso
from chatserver.store import Db, IntegrityError, LogEvent, Row, Tx

MESSAGE_NEW = "message:new"
MESSAGE_UPDATE = "message:update"
DIALOG_UPDATE = "dialog:update"
DIALOG_RECEIPT = "dialog:receipt"
# A dialog of more members than this logs no dialog:receipt: each such event lists every member that moved and
# goes to every member, so in a dialog where all read it would cost members x members bytes a second. Their
# receipts are still recorded and answered by GET /api/dialogs/{id} (docs/protocol.md, "Receipts").
RECEIPT_EVENT_MEMBERS = 1000

_MESSAGE_COLUMNS = (
    "message_id, dialog_id, sender_id, content, type, meta, created_at, updated_at, client_message_id"
)
_LAST_MESSAGE_COLUMNS = ", ".join("l." + column.strip() for column in _MESSAGE_COLUMNS.split(","))


def _content_in(db: Db, text: str) -> str:
    """A message's content as the store keeps it. PostgreSQL's text cannot hold U+0000, which a message may: there
    it is kept escaped (`\\0`, and `\\` for a backslash); SQLite keeps the text as it is."""
    if db.dialect == "sqlite" or ("\\" not in text and "\x00" not in text):
        return text
    return text.replace("\\", "\\\\").replace("\x00", "\\0")


def _content_out(db: Db, text: str) -> str:
    if db.dialect == "sqlite" or "\\" not in text:
        return text
    return _ESCAPED.sub(lambda m: "\x00" if m.group(1) == "0" else m.group(1), text)


_ESCAPED = re.compile(r"\\(.)", re.DOTALL)


def _message(db: Db, row: Row | Sequence[Any]) -> Message:
    return Message(
        message_id=row[0],
        dialog_id=row[1],
        sender_id=row[2],
        content=_content_out(db, row[3]),
        type=row[4],
        meta=jsonutil.loads(row[5]),
        created_at=row[6],
        updated_at=row[7],
        client_message_id=row[8],
    )


def _row(db: Db, message: Message) -> tuple[Any, ...]:
    return (
        message.message_id,
        message.dialog_id,
        message.sender_id,
        _content_in(db, message.content),
        message.type,
        jsonutil.dumps(message.meta),
        message.created_at,
        message.updated_at,
        message.client_message_id,
    )


def _placeholders(count: int) -> str:
    return ",".join("?" * count)


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def ping(db: Db) -> bool:
    await db.fetchval("SELECT 1")
    return True


# -- users -----------------------------------------------------------------------------------------------


async def create_user(tx: Tx, user: User, password_hash: str) -> User:
    if await tx.fetchval("SELECT 1 FROM users WHERE phone = ?", user.phone) is not None:
        raise Conflict(f"a user with phone {user.phone} already exists", field="phone")
    try:
        await tx.execute(
            "INSERT INTO users (user_id, phone, name, password_hash, created_at) VALUES (?, ?, ?, ?, ?)",
            user.user_id, user.phone, user.name, password_hash, now_iso(),
        )
    except IntegrityError:
        raise Conflict(f"a user with phone {user.phone} already exists", field="phone") from None
    return user


async def get_user(db: Db, user_id: str) -> User | None:
    row = await db.fetchrow("SELECT user_id, name, phone FROM users WHERE user_id = ?", user_id)
    return User(row[0], row[1], row[2]) if row else None


async def user_by_phone(db: Db, phone: str) -> User | None:
    row = await db.fetchrow("SELECT user_id, name, phone FROM users WHERE phone = ?", phone)
    return User(row[0], row[1], row[2]) if row else None


async def password_hash(db: Db, phone: str) -> tuple[User, str] | None:
    row = await db.fetchrow("SELECT user_id, name, phone, password_hash FROM users WHERE phone = ?", phone)
    return (User(row[0], row[1], row[2]), row[3]) if row else None


async def unknown_users(db: Db, user_ids: Iterable[str]) -> list[str]:
    ids = list(dict.fromkeys(user_ids))
    known: set[str] = set()
    for chunk in _chunks(ids, 500):
        rows = await db.fetch(
            f"SELECT user_id FROM users WHERE user_id IN ({_placeholders(len(chunk))})", *chunk  # noqa: S608
        )
        known.update(row[0] for row in rows)
    return [i for i in ids if i not in known]


async def visible_users(db: Db, viewer_id: str, user_ids: Iterable[str]) -> list[User]:
    """Those of the users that are the viewer or share a dialog with the viewer, in the order asked."""
    ids = list(dict.fromkeys(user_ids))
    found: dict[str, User] = {}
    for chunk in _chunks(ids, 500):
        rows = await db.fetch(
            f"SELECT u.user_id, u.name, u.phone FROM users u WHERE u.user_id IN ({_placeholders(len(chunk))}) "  # noqa: S608
            "AND (u.user_id = ? OR EXISTS (SELECT 1 FROM dialog_members mine JOIN dialog_members theirs "
            "ON theirs.dialog_id = mine.dialog_id WHERE mine.user_id = ? AND theirs.user_id = u.user_id))",
            *chunk, viewer_id, viewer_id,
        )
        found.update((row[0], User(row[0], row[1], row[2])) for row in rows)
    return [found[i] for i in ids if i in found]


# -- dialogs ---------------------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class DialogChange:
    """What `save_dialog` did: the dialog before (None: created) and after, and its event (None: no change)."""

    before: Dialog | None
    after: Dialog
    event: LogEvent | None


async def save_dialog(tx: Tx, dialog: Dialog, *, source: str = "local") -> DialogChange:
    """Create the dialog or replace its title and members, and log its `dialog:update` (PROTOCOL section 3).

    An update older (by `updatedAt`) than the dialog held changes nothing: a redelivered or late event must not
    bring back a removed member. One that changes nothing (the same title, members and time) logs nothing.
    The creator is kept from the first save: an update cannot change who created a dialog.
    """
    before = await _dialog(tx, dialog.dialog_id)
    if before is not None and (
        dialog.updated_at < before.updated_at
        or (dialog.updated_at == before.updated_at and dialog.title == before.title
            and dialog.member_ids == before.member_ids)
    ):
        return DialogChange(before, before, None)
    if before is None:
        version = 1
        await tx.execute(
            "INSERT INTO dialogs (dialog_id, title, created_at, updated_at, activity_at, members_version, created_by) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            dialog.dialog_id, dialog.title, dialog.created_at, dialog.updated_at, dialog.updated_at, version,
            dialog.created_by,
        )
    else:
        version = int(await tx.fetchval("SELECT members_version FROM dialogs WHERE dialog_id = ?",
                                        dialog.dialog_id)) + 1
        await tx.execute(
            "UPDATE dialogs SET title = ?, updated_at = ?, activity_at = greatest(activity_at, ?), "
            "members_version = ? WHERE dialog_id = ?",
            dialog.title, dialog.updated_at, dialog.updated_at, version, dialog.dialog_id,
        )
        if dialog.member_ids:
            await tx.execute(
                f"DELETE FROM dialog_members WHERE dialog_id = ? AND user_id NOT IN "  # noqa: S608
                f"({_placeholders(len(dialog.member_ids))})",
                dialog.dialog_id, *dialog.member_ids,
            )
        else:
            await tx.execute("DELETE FROM dialog_members WHERE dialog_id = ?", dialog.dialog_id)
    for position, user_id in enumerate(dialog.member_ids):
        await tx.execute(
            "INSERT INTO dialog_members (dialog_id, user_id, position) VALUES (?, ?, ?) "
            "ON CONFLICT (dialog_id, user_id) DO UPDATE SET position = excluded.position",
            dialog.dialog_id, user_id, position,
        )
    old = set(before.member_ids) if before else set()
    removed = [user_id for user_id in (before.member_ids if before else ()) if user_id not in dialog.member_ids]
    added = [user_id for user_id in dialog.member_ids if user_id not in old]
    await record_membership(tx, dialog.dialog_id, version, added, removed)
    after = await _dialog(tx, dialog.dialog_id)
    assert after is not None
    counts = await unread_counts(tx, dialog.dialog_id)
    last = await _last_message(tx, dialog.dialog_id)
    data = after.to_json(last_message=last, unread_count=0)
    del data["unreadCount"]  # each member's own, spliced in at delivery (chatserver.feed)
    extra = {"removed": removed, "unread": {user_id: count for user_id, count in counts.items() if count}}
    event = await tx.append(
        DIALOG_UPDATE, dialog.dialog_id, jsonutil.dumps(data), members_version=version, change=True,
        source=source, extra=jsonutil.dumps(extra),
    )
    return DialogChange(before, after, event)


async def patch_dialog(
    tx: Tx, dialog_id: str, *, title: str | None, add: Sequence[str], remove: Sequence[str], actor: str | None
) -> DialogChange:
    """A dialog's title and members changed by `actor` (PROTOCOL section 13; None: the command line, which may
    do anything), read and changed in one transaction, so that concurrent changes on any process all apply.

    Any member may rename and add; a member may remove themselves; only the creator may remove others, and
    nobody may shrink a dialog without a creator (Chat3's or the command line's) but by leaving it.
    """
    before = await _dialog(tx, dialog_id)
    if before is None:
        raise NotFound(f"dialog {dialog_id} not found", dialog_id=dialog_id)
    if actor is not None:
        if actor not in before.member_ids:
            raise Forbidden("you are not a member of this dialog", dialog_id=dialog_id)
        others = [user_id for user_id in remove if user_id != actor and user_id in before.member_ids]
        if others and before.created_by != actor:
            raise Forbidden("only the dialog's creator may remove other members", dialog_id=dialog_id)
    gone = set(remove)
    members = tuple(dict.fromkeys(m for m in (*before.member_ids, *add) if m not in gone))
    changed = before.changed(title if title is not None else before.title, members)
    if changed.title == before.title and changed.member_ids == before.member_ids:
        return DialogChange(before, before, None)
    return await save_dialog(tx, changed)


async def get_dialog(db: Db, dialog_id: str) -> Dialog | None:
    return await _dialog(db, dialog_id)


async def _dialog(db: Db, dialog_id: str) -> Dialog | None:
    row = await db.fetchrow(
        "SELECT title, created_at, updated_at, created_by FROM dialogs WHERE dialog_id = ?", dialog_id
    )
    if row is None:
        return None
    members = await db.fetch("SELECT user_id FROM dialog_members WHERE dialog_id = ? ORDER BY position", dialog_id)
    return Dialog(
        dialog_id=dialog_id,
        title=row[0],
        member_ids=tuple(r[0] for r in members),
        created_at=row[1],
        updated_at=row[2],
        created_by=row[3],
    )


async def dialog_with_title(db: Db, user_id: str, title: str) -> Dialog | None:
    row = await db.fetchrow(
        "SELECT d.dialog_id FROM dialogs d JOIN dialog_members m ON m.dialog_id = d.dialog_id "
        "WHERE m.user_id = ? AND d.title = ? ORDER BY d.created_at LIMIT 1",
        user_id, title,
    )
    return await _dialog(db, row[0]) if row else None


async def dialog_views(db: Db, user_id: str) -> list[DialogView]:
    """The user's dialogs, most recently active first, each with its last message and the user's unread count.

    Two queries, however many dialogs: not a round of queries per dialog (the store runs a read in one snapshot).
    """
    rows = await db.fetch(
        "SELECT d.dialog_id, d.title, d.created_at, d.updated_at, d.created_by, "  # noqa: S608
        "(SELECT count(*) FROM messages x WHERE x.dialog_id = m.dialog_id AND x.seq > m.last_read_seq "
        f"AND x.sender_id != m.user_id), {_LAST_MESSAGE_COLUMNS} "
        "FROM dialog_members m JOIN dialogs d ON d.dialog_id = m.dialog_id "
        "LEFT JOIN messages l ON l.seq = d.last_seq "
        "WHERE m.user_id = ? ORDER BY d.activity_at DESC, d.last_seq DESC, d.dialog_id",
        user_id,
    )
    members: dict[str, list[str]] = {}
    for dialog_id, member in await db.fetch(
        "SELECT o.dialog_id, o.user_id FROM dialog_members m "
        "JOIN dialog_members o ON o.dialog_id = m.dialog_id WHERE m.user_id = ? ORDER BY o.position",
        user_id,
    ):
        members.setdefault(dialog_id, []).append(member)
    return [
        DialogView(
            Dialog(row[0], row[1], tuple(members.get(row[0], ())), row[2], row[3], row[4]),
            _message(db, row[6:]) if row[6] is not None else None,
            int(row[5]),
        )
        for row in rows
    ]


async def dialog_view(db: Db, dialog_id: str, user_id: str) -> DialogView | None:
    dialog = await _dialog(db, dialog_id)
    if dialog is None:
        return None
    return DialogView(dialog, await _last_message(db, dialog_id), await _unread(db, dialog_id, user_id))


async def _last_message(db: Db, dialog_id: str) -> Message | None:
    row = await db.fetchrow(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE seq = "  # noqa: S608
        "(SELECT last_seq FROM dialogs WHERE dialog_id = ?)",
        dialog_id,
    )
    return _message(db, row) if row else None


async def _unread(db: Db, dialog_id: str, user_id: str) -> int:
    count = await db.fetchval(
        "SELECT count(*) FROM messages WHERE dialog_id = ? AND sender_id != ? AND seq > "
        "coalesce((SELECT last_read_seq FROM dialog_members WHERE dialog_id = ? AND user_id = ?), 0)",
        dialog_id, user_id, dialog_id, user_id,
    )
    return int(count)


async def unread_counts(db: Db, dialog_id: str) -> dict[str, int]:
    """Every member's unread count in the dialog, in one pass."""
    rows = await db.fetch(
        "SELECT m.user_id, (SELECT count(*) FROM messages x WHERE x.dialog_id = m.dialog_id "
        "AND x.seq > m.last_read_seq AND x.sender_id != m.user_id) "
        "FROM dialog_members m WHERE m.dialog_id = ?",
        dialog_id,
    )
    return {row[0]: int(row[1]) for row in rows}


async def mark_read(tx: Tx, dialog_id: str, user_id: str, message_id: str) -> tuple[DialogView, bool]:
    """Move the reader's read mark forward (never back), and log a `dialog:update` for the reader alone; returns
    the dialog as the reader sees it and whether the mark moved. What is read was delivered: the delivered
    position moves up to it too (PROTOCOL section 11)."""
    row = await tx.fetchrow("SELECT seq, dialog_id FROM messages WHERE message_id = ?", message_id)
    if row is None:
        raise NotFound(f"message {message_id} not found", field="messageId")
    if row[1] != dialog_id:
        raise BadRequest("'messageId' is not a message of this dialog", field="messageId")
    before = await tx.fetchval(
        "SELECT last_read_seq FROM dialog_members WHERE dialog_id = ? AND user_id = ?", dialog_id, user_id
    )
    await tx.execute(
        "UPDATE dialog_members SET last_read_seq = greatest(last_read_seq, ?), "
        "delivered_seq = greatest(delivered_seq, ?) WHERE dialog_id = ? AND user_id = ?",
        row[0], row[0], dialog_id, user_id,
    )
    view = await dialog_view(tx, dialog_id, user_id)
    assert view is not None
    version = await tx.fetchval("SELECT members_version FROM dialogs WHERE dialog_id = ?", dialog_id)
    await tx.append(DIALOG_UPDATE, dialog_id, jsonutil.dumps(view.to_json()), members_version=int(version),
                    user_id=user_id)
    return view, before is not None and int(before) < int(row[0])


# -- receipts --------------------------------------------------------------------------------------------


ACK_CHUNK = 400  # users per statement of record_receipts (two parameters each, under SQLite's 999 of old builds)


async def record_receipts(
    tx: Tx, acks: dict[str, int], reads: Iterable[tuple[str, str]]
) -> list[LogEvent]:
    """Move delivered positions for acknowledged log positions, and log one `dialog:receipt` per dialog in which
    any member's delivered or read position moved (PROTOCOL section 11); returns the events logged.

    `acks`: user -> a log position the user's client acknowledged. In every dialog the user is a member of now,
    the delivered position becomes the last message at or before it that another member sent (a sender's own
    messages never move it: they were never delivered to them), and only forward. `reads`: (dialog, user) whose
    read position `mark_read` moved since the last call. Each event carries, for every member that moved, where
    they stand now (`receipts`), and the first of them also as the event's own `userId`, `deliveredMessageId`
    and `readMessageId`.
    """
    moved: dict[str, dict[str, None]] = {}  # dialog -> members that moved, in the order they came
    order = {user_id: n for n, user_id in enumerate(acks)}
    rows: list[Row] = []
    for chunk in _chunks(list(acks), ACK_CHUNK):
        # One statement for a chunk of users: (user, position) pairs as a VALUES table (its columns are column1,
        # column2 in SQLite and PostgreSQL alike).
        pairs = ",".join(["(CAST(? AS TEXT), CAST(? AS BIGINT))"] * len(chunk))
        rows.extend(await tx.fetch(
            "UPDATE dialog_members SET delivered_seq = (SELECT max(x.seq) FROM messages x "  # noqa: S608
            "WHERE x.dialog_id = dialog_members.dialog_id AND x.seq <= a.column2 "
            "AND x.sender_id != dialog_members.user_id) "
            f"FROM (VALUES {pairs}) AS a WHERE dialog_members.user_id = a.column1 AND EXISTS (SELECT 1 FROM messages x "
            "WHERE x.dialog_id = dialog_members.dialog_id AND x.seq > dialog_members.delivered_seq "
            "AND x.seq <= a.column2 AND x.sender_id != dialog_members.user_id) "
            "RETURNING dialog_members.dialog_id, dialog_members.user_id",
            *[value for user_id in chunk for value in (user_id, acks[user_id])],
        ))
    for dialog_id, user_id in sorted(((row[0], row[1]) for row in rows), key=lambda row: order[row[1]]):
        moved.setdefault(dialog_id, {})[user_id] = None
    for dialog_id, user_id in reads:
        moved.setdefault(dialog_id, {})[user_id] = None
    events = []
    for dialog_id, users in moved.items():
        version = await tx.fetchval("SELECT members_version FROM dialogs WHERE dialog_id = ?", dialog_id)
        size = await tx.fetchval("SELECT count(*) FROM dialog_members WHERE dialog_id = ?", dialog_id)
        if int(size or 0) > RECEIPT_EVENT_MEMBERS:
            continue  # recorded, not logged: see RECEIPT_EVENT_MEMBERS
        found = {receipt.user_id: receipt for receipt in await _receipts(tx, dialog_id, list(users))}
        entries = [found[user_id].to_json() for user_id in users if user_id in found]
        if version is None or not entries:
            continue  # the dialog or the reader's membership is gone since
        data = {"dialogId": dialog_id, **entries[0], "receipts": entries}
        events.append(await tx.append(DIALOG_RECEIPT, dialog_id, jsonutil.dumps(data), members_version=int(version)))
    return events


async def dialog_detail(db: Db, dialog_id: str, user_id: str) -> DialogView | None:
    """`dialog_view` with the receipts of every other member (`GET /api/dialogs/{id}`), in one snapshot."""
    view = await dialog_view(db, dialog_id, user_id)
    if view is None:
        return None
    others = [member for member in view.dialog.member_ids if member != user_id]
    found = {receipt.user_id: receipt for receipt in await _receipts(db, dialog_id, others)}
    return attrs.evolve(view, receipts=tuple(found[member] for member in others if member in found))


async def _receipts(db: Db, dialog_id: str, user_ids: list[str]) -> list[Receipt]:
    """Where each of these members of the dialog stands (those that are members), as message ids."""
    found: list[Receipt] = []
    for chunk in _chunks(user_ids, 500):
        rows = await db.fetch(
            "SELECT m.user_id, d.message_id, r.message_id FROM dialog_members m "  # noqa: S608
            "LEFT JOIN messages d ON d.seq = m.delivered_seq LEFT JOIN messages r ON r.seq = m.last_read_seq "
            f"WHERE m.dialog_id = ? AND m.user_id IN ({_placeholders(len(chunk))})",
            dialog_id, *chunk,
        )
        found.extend(Receipt(row[0], row[1], row[2]) for row in rows)
    return found


# -- messages --------------------------------------------------------------------------------------------


async def _members_version(tx: Tx, dialog_id: str) -> int:
    version = await tx.fetchval("SELECT members_version FROM dialogs WHERE dialog_id = ?", dialog_id)
    if version is None:
        raise NotFound(f"dialog {dialog_id} not found", dialog_id=dialog_id)
    return int(version)


async def insert_message(
    tx: Tx, message: Message, *, source: str = "local", sender_is_member: bool = False
) -> tuple[Message, bool]:
    """Store a new message and log its `message:new`; returns (stored message, created).

    Idempotent by id and by clientMessageId: a message stored before is returned as it is, and nothing is
    logged. `sender_is_member`: refuse (Forbidden) a sender who is not a member as of this transaction, so that
    a member removed by another process a moment ago cannot post. Its position in the log is its place in the
    dialog's history (`seq`): history pages and live events have one order.
    """
    existing = await _existing(tx, message)
    if existing is not None:
        return existing, False
    version = await _members_version(tx, message.dialog_id)
    if sender_is_member and await tx.fetchval(
        "SELECT 1 FROM dialog_members WHERE dialog_id = ? AND user_id = ?", message.dialog_id, message.sender_id
    ) is None:
        raise Forbidden("you are not a member of this dialog", dialog_id=message.dialog_id)
    event = await tx.append(MESSAGE_NEW, message.dialog_id, jsonutil.dumps(message.to_json()),
                            members_version=version, source=source)
    await _insert(tx, event.position, message)
    return message, True


async def _insert(tx: Tx, seq: int, message: Message) -> None:
    await tx.execute(
        f"INSERT INTO messages (seq, {_MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
        seq, *_row(tx, message),
    )
    await tx.execute(
        "UPDATE dialogs SET last_seq = greatest(last_seq, ?), activity_at = greatest(activity_at, ?) "
        "WHERE dialog_id = ?",
        seq, message.created_at, message.dialog_id,
    )


async def _existing(db: Db, message: Message) -> Message | None:
    row = await db.fetchrow(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE message_id = ?",  # noqa: S608
                            message.message_id)
    if row is None and message.client_message_id is not None:
        row = await db.fetchrow(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages "  # noqa: S608
            "WHERE dialog_id = ? AND sender_id = ? AND client_message_id = ?",
            message.dialog_id, message.sender_id, message.client_message_id,
        )
    return _message(db, row) if row else None


async def apply_update(tx: Tx, message: Message, *, source: str = "local") -> tuple[Message, bool]:
    """Store a newer version of a message (or the message itself, if unseen) and log its `message:update`;
    returns (stored, applied). A version not newer by `updatedAt` than the stored one changes nothing."""
    row = await tx.fetchrow(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE message_id = ?",  # noqa: S608
                            message.message_id)
    if row is None:
        version = await _members_version(tx, message.dialog_id)
        event = await tx.append(MESSAGE_UPDATE, message.dialog_id, jsonutil.dumps(message.to_json()),
                                members_version=version, source=source)
        await _insert(tx, event.position, message)
        return message, True
    stored = _message(tx, row)
    if message.updated_at <= stored.updated_at:
        return stored, False
    await tx.execute(
        "UPDATE messages SET content = ?, type = ?, meta = ?, updated_at = ? WHERE message_id = ?",
        _content_in(tx, message.content), message.type, jsonutil.dumps(message.meta), message.updated_at,
        message.message_id,
    )
    # The dialog and sender of a message never change, whatever an update says.
    updated = attrs.evolve(message, dialog_id=stored.dialog_id, sender_id=stored.sender_id,
                           created_at=stored.created_at, client_message_id=stored.client_message_id)
    version = await _members_version(tx, stored.dialog_id)
    await tx.append(MESSAGE_UPDATE, stored.dialog_id, jsonutil.dumps(updated.to_json()), members_version=version,
                    source=source)
    return updated, True


async def get_message(db: Db, message_id: str) -> Message | None:
    row = await db.fetchrow(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE message_id = ?",  # noqa: S608
                            message_id)
    return _message(db, row) if row else None


async def list_messages(
    db: Db, dialog_id: str, *, limit: int, before: str | None = None, after: str | None = None
) -> list[Message]:
    """A page of the dialog's history, oldest first.

    Without bounds: the newest `limit`. With `before`: the `limit` messages just before it. With `after`:
    the `limit` just after it. With both: the first `limit` after `after` that are before `before`.
    """
    low = await _seq_in_dialog(db, dialog_id, after, "after") if after else None
    high = await _seq_in_dialog(db, dialog_id, before, "before") if before else None
    clauses: list[str] = ["dialog_id = ?"]
    params: list[Any] = [dialog_id]
    if low is not None:
        clauses.append("seq > ?")
        params.append(low)
    if high is not None:
        clauses.append("seq < ?")
        params.append(high)
    ascending = low is not None
    rows = await db.fetch(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE {' AND '.join(clauses)} "  # noqa: S608
        f"ORDER BY seq {'ASC' if ascending else 'DESC'} LIMIT ?",
        *params, limit,
    )
    messages = [_message(db, r) for r in rows]
    return messages if ascending else messages[::-1]


async def _seq_in_dialog(db: Db, dialog_id: str, message_id: str, field: str) -> int:
    seq = await db.fetchval("SELECT seq FROM messages WHERE message_id = ? AND dialog_id = ?", message_id, dialog_id)
    if seq is None:
        raise BadRequest(f"'{field}' is not a message of this dialog", field=field)
    return int(seq)
