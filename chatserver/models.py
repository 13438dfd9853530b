"""The domain's values: users, dialogs and messages, and how they are built from outside input.

Each value is a frozen, slotted attrs class. Named constructors (`Message.from_request`, `Message.from_chat3`,
`Dialog.from_chat3`) validate what arrives from a client or from Chat3 and raise `BadRequest` naming the
field; once built, a value is valid. `to_json` gives the wire shape of PROTOCOL section 2.
"""

from __future__ import annotations

import re
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import attrs

from chatserver.errors import BadRequest
from chatserver.jsonutil import is_valid_text

MAX_TYPE_LENGTH = 32
MAX_TITLE_LENGTH = 200
MAX_CLIENT_ID_LENGTH = 128
MAX_ID_LENGTH = 128
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def new_id(prefix: str) -> str:
    """An opaque id with a type prefix: `msg_`, `dlg_`, `usr_`."""
    return f"{prefix}_{secrets.token_hex(8)}"


def now_iso() -> str:
    """Now, as ISO-8601 UTC with milliseconds (`2025-11-05T10:00:00.123Z`)."""
    return _format_millis(time.time_ns() // 1_000_000)


def _format_millis(millis: int) -> str:
    seconds, rest = divmod(millis, 1000)
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{rest:03d}Z"


def require_str(
    body: dict[str, Any], field: str, *, max_length: int, allow_empty: bool = False, allow_nul: bool = False
) -> str:
    value = body.get(field)
    if not isinstance(value, str):
        raise BadRequest(f"'{field}' must be a string", field=field)
    return check_text(value, field, max_length=max_length, allow_empty=allow_empty, allow_nul=allow_nul)


def check_text(
    value: str, field: str, *, max_length: int, allow_empty: bool = False, allow_nul: bool = False
) -> str:
    """A text field as the store keeps it. U+0000 only where `allow_nul` (a message's content, kept verbatim):
    elsewhere (names, titles, ids) it is refused, as PostgreSQL's text cannot hold it."""
    if not is_valid_text(value):
        raise BadRequest(f"'{field}' is not valid Unicode (lone surrogate)", field=field)
    if not allow_nul and "\x00" in value:
        raise BadRequest(f"'{field}' must not contain U+0000", field=field)
    if not allow_empty and not value.strip():
        raise BadRequest(f"'{field}' must not be empty", field=field)
    if len(value) > max_length:
        raise BadRequest(f"'{field}' is longer than {max_length} characters", field=field)
    return value


def optional_str(body: dict[str, Any], field: str, *, max_length: int) -> str | None:
    if body.get(field) is None:
        return None
    return require_str(body, field, max_length=max_length)


def require_id(body: dict[str, Any], field: str, prefix: str) -> str:
    value = require_str(body, field, max_length=MAX_ID_LENGTH)
    check_id(value, field, prefix)
    return value


def check_id(value: str, field: str, prefix: str) -> str:
    if not is_id(value, prefix):
        raise BadRequest(f"'{field}' must be an id starting with '{prefix}_'", field=field)
    return value


def is_id(value: str, prefix: str) -> bool:
    """Whether the text has the shape of an id of this type (it may still name nothing)."""
    return value.startswith(prefix + "_") and value.isprintable() and len(value) <= MAX_ID_LENGTH


def require_timestamp(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not _TIMESTAMP.match(value):
        raise BadRequest(f"'{field}' must be an ISO-8601 UTC timestamp with milliseconds", field=field)
    return value


def require_object(body: dict[str, Any], field: str, *, default: dict[str, Any] | None = None) -> dict[str, Any]:
    value = body.get(field, default)
    if not isinstance(value, dict):
        raise BadRequest(f"'{field}' must be an object", field=field)
    return value


@attrs.frozen(slots=True)
class User:
    user_id: str
    name: str
    phone: str

    def to_json(self) -> dict[str, Any]:
        return {"userId": self.user_id, "name": self.name, "phone": self.phone}


@attrs.frozen(slots=True)
class Message:
    message_id: str
    dialog_id: str
    sender_id: str
    content: str
    type: str
    meta: dict[str, Any]
    created_at: str
    updated_at: str
    client_message_id: str | None = None

    @classmethod
    def from_request(
        cls, body: dict[str, Any], *, dialog_id: str, sender_id: str, max_content_length: int
    ) -> Message:
        """A new message from a client's POST body (PROTOCOL section 2)."""
        content = require_str(body, "content", max_length=max_content_length, allow_nul=True)
        msg_type = body.get("type", "text")
        if not isinstance(msg_type, str):
            raise BadRequest("'type' must be a string", field="type")
        check_text(msg_type, "type", max_length=MAX_TYPE_LENGTH)
        meta = require_object(body, "meta", default={})
        client_id = optional_str(body, "clientMessageId", max_length=MAX_CLIENT_ID_LENGTH)
        stamp = now_iso()
        return cls(
            message_id=new_id("msg"),
            dialog_id=dialog_id,
            sender_id=sender_id,
            content=content,
            type=msg_type,
            meta=meta,
            created_at=stamp,
            updated_at=stamp,
            client_message_id=client_id,
        )

    @classmethod
    def from_chat3(cls, data: Any, *, max_content_length: int) -> Message:
        """A message as Chat3 publishes it: every field of the section 2 shape, checked."""
        if not isinstance(data, dict):
            raise BadRequest("'data' must be a message object", field="data")
        created_at = require_timestamp(data, "createdAt")
        updated_at = data.get("updatedAt", created_at)
        if updated_at != created_at:
            updated_at = require_timestamp(data, "updatedAt")
        msg_type = data.get("type", "text")
        if not isinstance(msg_type, str):
            raise BadRequest("'type' must be a string", field="type")
        return cls(
            message_id=require_id(data, "messageId", "msg"),
            dialog_id=require_id(data, "dialogId", "dlg"),
            sender_id=require_id(data, "senderId", "usr"),
            content=require_str(data, "content", max_length=max_content_length, allow_nul=True),
            type=check_text(msg_type, "type", max_length=MAX_TYPE_LENGTH),
            meta=require_object(data, "meta", default={}),
            created_at=created_at,
            updated_at=updated_at,
            client_message_id=optional_str(data, "clientMessageId", max_length=MAX_CLIENT_ID_LENGTH),
        )

    def edited(self, content: str) -> Message:
        stamp = now_iso()
        # Two edits within one millisecond must still be ordered: updatedAt only moves forward.
        if stamp <= self.updated_at:
            stamp = _next_millisecond(self.updated_at)
        return attrs.evolve(self, content=content, updated_at=stamp)

    def to_json(self) -> dict[str, Any]:
        return {
            "messageId": self.message_id,
            "dialogId": self.dialog_id,
            "senderId": self.sender_id,
            "content": self.content,
            "type": self.type,
            "meta": self.meta,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "clientMessageId": self.client_message_id,
        }


@attrs.frozen(slots=True)
class Dialog:
    dialog_id: str
    title: str
    member_ids: tuple[str, ...]
    created_at: str
    updated_at: str
    # Who made it over REST (PROTOCOL section 13): None for a dialog from Chat3 or the command line.
    created_by: str | None = None

    @classmethod
    def from_request(cls, body: dict[str, Any], *, creator_id: str) -> Dialog:
        title = require_str(body, "title", max_length=MAX_TITLE_LENGTH)
        members = body.get("memberIds", [])
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise BadRequest("'memberIds' must be a list of user ids", field="memberIds")
        for member in members:
            check_id(member, "memberIds", "usr")
        stamp = now_iso()
        return cls(
            dialog_id=new_id("dlg"),
            title=title,
            member_ids=_unique((creator_id, *members)),
            created_at=stamp,
            updated_at=stamp,
            created_by=creator_id,
        )

    @classmethod
    def from_chat3(cls, data: Any) -> Dialog:
        if not isinstance(data, dict):
            raise BadRequest("'data' must be a dialog object", field="data")
        members = data.get("memberIds")
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise BadRequest("'memberIds' must be a list of user ids", field="memberIds")
        for member in members:
            check_id(member, "memberIds", "usr")
        created_at = require_timestamp(data, "createdAt")
        updated_at = data.get("updatedAt", created_at)
        if updated_at != created_at:
            updated_at = require_timestamp(data, "updatedAt")
        return cls(
            dialog_id=require_id(data, "dialogId", "dlg"),
            title=require_str(data, "title", max_length=MAX_TITLE_LENGTH),
            member_ids=_unique(members),
            created_at=created_at,
            updated_at=updated_at,
        )

    def changed(self, title: str, member_ids: tuple[str, ...]) -> Dialog:
        """This dialog with a new title and members, updated now (after its last update, however close)."""
        stamp = now_iso()
        if stamp <= self.updated_at:
            stamp = _next_millisecond(self.updated_at)
        return attrs.evolve(self, title=title, member_ids=member_ids, updated_at=stamp)

    def to_json(self, *, last_message: Message | None, unread_count: int) -> dict[str, Any]:
        return {
            "dialogId": self.dialog_id,
            "title": self.title,
            "memberIds": list(self.member_ids),
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "createdBy": self.created_by,
            "lastMessage": last_message.to_json() if last_message else None,
            "unreadCount": unread_count,
        }


@attrs.frozen(slots=True)
class Receipt:
    """How far one member of a dialog has been delivered and has read it (PROTOCOL section 11): message ids,
    None where nothing yet."""

    user_id: str
    delivered_message_id: str | None
    read_message_id: str | None

    def to_json(self) -> dict[str, Any]:
        return {"userId": self.user_id, "deliveredMessageId": self.delivered_message_id,
                "readMessageId": self.read_message_id}


@attrs.frozen(slots=True)
class DialogView:
    """A dialog as one member sees it: with its last message and that member's unread count, and (for one dialog
    asked for by id) the other members' receipts."""

    dialog: Dialog
    last_message: Message | None
    unread_count: int
    receipts: tuple[Receipt, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        data = self.dialog.to_json(last_message=self.last_message, unread_count=self.unread_count)
        if self.receipts is not None:
            data["receipts"] = [receipt.to_json() for receipt in self.receipts]
        return data


def _unique(ids: Any) -> tuple[str, ...]:
    return tuple(dict.fromkeys(ids))


def _next_millisecond(stamp: str) -> str:
    parsed = datetime.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return _format_millis(int(parsed.timestamp()) * 1000 + int(stamp[20:23]) + 1)
