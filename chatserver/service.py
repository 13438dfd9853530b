"""The chat service: every use case of the server, and the one write path.

Handlers and the Chat3 listener call this and nothing else of the domain's write side. A message, whoever
sends it (a REST client, Chat3, a broker redelivery), goes through `accept_message` or `accept_update`: it is
validated, stored idempotently, and only then published to the broadcaster, once. That is the seed's bug made
impossible: there is no second path that could forget to emit.

It also owns authorization (`authorize_dialog`: who may read, post to, poll or join a dialog) and the cache of
dialog membership that fan-out and authorization read from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from chatserver import broadcaster as events
from chatserver.auth import DUMMY_HASH, TokenSigner, hash_password, verify_password
from chatserver.broadcaster import Broadcaster, EventRecord
from chatserver.config import Config
from chatserver.errors import BadRequest, Forbidden, NotFound, Unauthorized
from chatserver.lru import LRU
from chatserver.models import (
    MAX_ID_LENGTH,
    Dialog,
    DialogView,
    Message,
    User,
    check_text,
    is_id,
    new_id,
    require_id,
    require_str,
)
from chatserver.store import AsyncStore, SQLiteStore
from chatserver.throttle import Throttle
from chatserver.tickets import StreamTickets

log = logging.getLogger(__name__)

MAX_LIMIT = 200
DEFAULT_LIMIT = 50
MAX_USER_IDS = 200
# A typing event repeating the user's last one in a dialog within this many seconds is dropped.
TYPING_REPEAT = 1.0


@attrs.frozen(slots=True)
class Outcome:
    """What a write did: the message as stored, and whether it was new (and so published)."""

    message: Message
    published: bool


# Called with every event this process originates (type, data, recipients), for cluster fan-out.
Relay = Callable[[str, dict[str, Any], frozenset[str]], None]


class ChatService:
    def __init__(
        self,
        db: AsyncStore,
        broadcaster: Broadcaster,
        config: Config,
        tokens: TokenSigner,
        tickets: StreamTickets,
        *,
        membership_cache_size: int = 10000,
        user_cache_size: int = 100000,
        throttle: Throttle | None = None,
    ) -> None:
        self.db = db
        self.broadcaster = broadcaster
        self.config = config
        self.tokens = tokens
        self.tickets = tickets
        self._members: LRU[str, frozenset[str]] = LRU(membership_cache_size)
        # Users known to exist (never deleted, so never stale).
        self._users: LRU[str, bool] = LRU(user_cache_size)
        # The last typing state each user announced in each dialog, and when.
        self._typing: LRU[tuple[str, str], tuple[bool, float]] = LRU(membership_cache_size)
        self._clock = time.monotonic
        self.throttle = throttle or Throttle(config, self._clock)
        self.relays: list[Relay] = []

    # -- auth --------------------------------------------------------------------------------------------

    async def login(self, body: dict[str, Any], address: str) -> tuple[str, User]:
        """A token for the phone and password, tried from `address`: throttled (before the password is hashed)."""
        phone = require_str(body, "phone", max_length=64)
        password = require_str(body, "password", max_length=1024, allow_empty=True)
        attempt = self.throttle.admit_login(phone, address)
        found = await self.db.run(SQLiteStore.password_hash, phone)
        stored = found[1] if found else DUMMY_HASH
        ok = await self.db.offload(verify_password, password, stored)
        if found is None or not ok:
            raise Unauthorized("wrong phone or password")
        self.throttle.login_succeeded(attempt)
        return self.tokens.issue(found[0].user_id), found[0]

    async def authenticate(self, token: str) -> str:
        """The user id of a valid token whose user exists in this database; Unauthorized otherwise.

        A token signed with this secret may still name a user this database lacks (a database restored from an
        older backup, another one sharing the secret): it authenticates nobody. Users are never deleted, so a
        user found once is remembered and later requests cost no store call.
        """
        return await self._existing_user(self.tokens.verify(token))

    async def _existing_user(self, user_id: str) -> str:
        if user_id not in self._users:
            if await self.db.run(SQLiteStore.get_user, user_id) is None:
                raise Unauthorized("the token's user does not exist")
            self._users.put(user_id, True)
        return user_id

    def issue_stream_ticket(self, user_id: str) -> tuple[str, int]:
        """A ticket for one `/ws` or `/api/events` request of this (authenticated) user, and its lifetime in seconds."""
        return self.tickets.issue(user_id), self.tickets.ttl

    async def authenticate_stream(self, *, ticket: str | None, token: str | None) -> str:
        """The user of a stream request: by its ticket (used up here) where it has one, else by its token."""
        if ticket:
            return await self._existing_user(self.tickets.redeem(ticket))
        if not token:
            raise Unauthorized("missing ticket or token: ask POST /api/stream-ticket for a ticket")
        return await self.authenticate(token)

    def authenticate_known(self, token: str) -> str:
        """`authenticate` without the store, for paths that cannot wait: Unauthorized also where the user is not
        (yet) among those remembered, and the caller then takes the path that awaits `authenticate`. The token's
        signature is checked once per token (TokenSigner.verify_cached): these paths see the same token often."""
        user_id = self.tokens.verify_cached(token)
        if user_id not in self._users:
            raise Unauthorized("the token's user is not known yet")
        return user_id

    async def current_user(self, user_id: str) -> User:
        user = await self.db.run(SQLiteStore.get_user, user_id)
        if user is None:
            raise Unauthorized("the token's user no longer exists")
        return user

    async def create_user(self, phone: str, name: str, password: str) -> User:
        check_text(phone, "phone", max_length=64)
        check_text(name, "name", max_length=200)
        check_text(password, "password", max_length=1024)
        password_hash = await self.db.offload(hash_password, password)
        return await self.db.write(SQLiteStore.create_user, User(new_id("usr"), name, phone), password_hash)

    async def find_users(self, user_id: str, ids: str | None, phone: str | None) -> list[User]:
        """`GET /api/users` (extension): users by id among those the caller shares a dialog with (or the caller),
        or the one user with exactly this phone. Never a directory: unknown and unrelated ids are just left out."""
        if (ids is None) == (phone is None):
            raise BadRequest("give exactly one of 'ids' or 'phone'", field="ids")
        if phone is not None:
            check_text(phone, "phone", max_length=64)
            user = await self.db.run(SQLiteStore.user_by_phone, phone)
            return [user] if user else []
        assert ids is not None
        wanted = ids.split(",")
        if len(wanted) > MAX_USER_IDS:
            raise BadRequest(f"'ids' names more than {MAX_USER_IDS} users", field="ids")
        for one in wanted:
            if not is_id(one, "usr"):
                raise BadRequest("'ids' must be a comma-separated list of user ids", field="ids")
        return await self.db.run(SQLiteStore.visible_users, user_id, wanted)

    # -- membership --------------------------------------------------------------------------------------

    async def members(self, dialog_id: str) -> frozenset[str]:
        """The dialog's members, from the cache or the store; NotFound for an unknown dialog."""
        cached = self._members.get(dialog_id)
        if cached is not None:
            return cached
        dialog = await self.db.run(SQLiteStore.get_dialog, dialog_id)
        if dialog is None:
            raise NotFound(f"dialog {dialog_id} not found", dialog_id=dialog_id)
        return self._cache_members(dialog)

    def _cache_members(self, dialog: Dialog) -> frozenset[str]:
        return self._remember_members(dialog.dialog_id, frozenset(dialog.member_ids))

    def _remember_members(self, dialog_id: str, members: frozenset[str]) -> frozenset[str]:
        self._members.put(dialog_id, members)
        return members

    async def authorize_dialog(self, user_id: str, dialog_id: str) -> frozenset[str]:
        """The members of a dialog the user belongs to; NotFound or Forbidden otherwise."""
        if not is_id(dialog_id, "dlg"):
            raise NotFound(f"dialog {dialog_id[:MAX_ID_LENGTH]!r} not found")
        members = await self.members(dialog_id)
        if user_id not in members:
            raise Forbidden("you are not a member of this dialog", dialog_id=dialog_id)
        return members

    # -- dialogs -----------------------------------------------------------------------------------------

    async def list_dialogs(self, user_id: str) -> list[DialogView]:
        return await self.db.run(SQLiteStore.dialog_views, user_id)

    async def get_dialog(self, user_id: str, dialog_id: str) -> DialogView:
        await self.authorize_dialog(user_id, dialog_id)
        view = await self.db.run(SQLiteStore.dialog_view, dialog_id, user_id)
        if view is None:
            raise NotFound(f"dialog {dialog_id} not found", dialog_id=dialog_id)
        return view

    async def create_dialog(self, user_id: str, body: dict[str, Any]) -> DialogView:
        dialog = Dialog.from_request(body, creator_id=user_id)
        await self.save_dialog(dialog)
        view = await self.db.run(SQLiteStore.dialog_view, dialog.dialog_id, user_id)
        assert view is not None
        return view

    async def save_dialog(self, dialog: Dialog) -> bool:
        """The write path of dialogs: create or update, then `dialog:update` to every member, old and new.

        Returns False, publishing nothing, for an update older than the dialog held (the store keeps the newer).
        """
        unknown = await self.db.run(SQLiteStore.unknown_users, dialog.member_ids)
        if unknown:
            raise BadRequest(f"unknown users in 'memberIds': {', '.join(unknown)}", field="memberIds")
        if not dialog.member_ids:
            raise BadRequest("'memberIds' must name at least one user", field="memberIds")
        before, after = await self.db.write(SQLiteStore.save_dialog, dialog)
        if after.updated_at > dialog.updated_at:
            return False
        self._cache_members(after)
        recipients = set(after.member_ids) | set(before.member_ids if before else ())
        await self._publish_dialog(after, recipients)
        return True

    async def _publish_dialog(self, dialog: Dialog, recipients: Iterable[str]) -> None:
        # The dialog object carries each member's own unreadCount: members with the same count share one
        # event (one encode), so a change to a big dialog costs a few events, not one per member.
        counts = await self.db.run(SQLiteStore.unread_counts, dialog.dialog_id)
        view = await self.db.run(SQLiteStore.dialog_view, dialog.dialog_id, dialog.member_ids[0])
        last = view.last_message if view else None
        groups: dict[int, set[str]] = {}
        for user_id in recipients:
            groups.setdefault(counts.get(user_id, 0), set()).add(user_id)
        for unread, users in sorted(groups.items()):
            data = dialog.to_json(last_message=last, unread_count=unread)
            self._publish(events.DIALOG_UPDATE, data, frozenset(users), dialog.dialog_id)

    # -- messages ----------------------------------------------------------------------------------------

    async def list_messages(
        self, user_id: str, dialog_id: str, *, limit: int, before: str | None, after: str | None
    ) -> list[Message]:
        if not 1 <= limit <= MAX_LIMIT:
            raise BadRequest(f"'limit' must be between 1 and {MAX_LIMIT}", field="limit")
        await self.authorize_dialog(user_id, dialog_id)
        return await self.db.run(SQLiteStore.list_messages, dialog_id, limit=limit, before=before, after=after)

    async def post_message(self, user_id: str, dialog_id: str, body: dict[str, Any]) -> Outcome:
        await self.authorize_dialog(user_id, dialog_id)
        message = Message.from_request(
            body, dialog_id=dialog_id, sender_id=user_id, max_content_length=self.config.max_content_length
        )
        self.throttle.admit_write(user_id)
        return await self.accept_message(message)

    async def editable_message(self, user_id: str, message_id: str) -> Message:
        """The message, if the user may edit it: NotFound, or Forbidden for a non-member or another sender."""
        if not is_id(message_id, "msg"):
            raise NotFound(f"message {message_id[:MAX_ID_LENGTH]!r} not found")
        stored = await self.db.run(SQLiteStore.get_message, message_id)
        if stored is None:
            raise NotFound(f"message {message_id} not found")
        await self.authorize_dialog(user_id, stored.dialog_id)
        if stored.sender_id != user_id:
            raise Forbidden("only the sender may edit a message")
        return stored

    async def edit_message(self, user_id: str, message_id: str, body: dict[str, Any]) -> Message:
        stored = await self.editable_message(user_id, message_id)
        content = require_str(body, "content", max_length=self.config.max_content_length)
        self.throttle.admit_write(user_id)
        return (await self.accept_update(stored.edited(content))).message

    async def accept_message(self, message: Message) -> Outcome:
        """Store a new message (idempotently) and, if it was new, publish `message:new` to every member."""
        members = await self.members(message.dialog_id)
        stored, created = await self.db.write(SQLiteStore.insert_message, message)
        if created:
            self._publish(events.MESSAGE_NEW, stored.to_json(), members, stored.dialog_id)
        return Outcome(stored, created)

    async def accept_update(self, message: Message) -> Outcome:
        """Store a newer version of a message and, if it was newer, publish `message:update`."""
        members = await self.members(message.dialog_id)
        stored, applied = await self.db.write(SQLiteStore.apply_update, message)
        if applied:
            self._publish(events.MESSAGE_UPDATE, stored.to_json(), members, stored.dialog_id)
        return Outcome(stored, applied)

    async def mark_read(self, user_id: str, dialog_id: str, body: dict[str, Any]) -> DialogView:
        await self.authorize_dialog(user_id, dialog_id)
        message_id = require_id(body, "messageId", "msg")
        view = await self.db.write(SQLiteStore.mark_read, dialog_id, user_id, message_id)
        self._publish(events.DIALOG_UPDATE, view.to_json(), frozenset((user_id,)), dialog_id)
        return view

    async def set_typing(self, user_id: str, dialog_id: str, typing: Any) -> None:
        if not isinstance(typing, bool):
            raise BadRequest("'typing' must be true or false", field="typing")
        members = await self.authorize_dialog(user_id, dialog_id)
        if self._repeated_typing(user_id, dialog_id, typing):
            return
        self.broadcaster.publish_typing(dialog_id, user_id, typing, members)
        for relay in self.relays:
            relay(
                events.TYPING_START if typing else events.TYPING_STOP,
                {"dialogId": dialog_id, "userId": user_id},
                members,
            )

    def _repeated_typing(self, user_id: str, dialog_id: str, typing: bool) -> bool:
        """Whether to drop this typing event: the state the user last announced in the dialog, less than
        TYPING_REPEAT seconds ago, or a change past the user's typing rate (chatserver.throttle).

        Such a repeat tells nobody anything new: it is dropped rather than fanned out to every member, so a client
        spamming typing frames costs the others nothing. A change dropped for the rate is not remembered as
        announced.
        """
        key = (user_id, dialog_id)
        now = self._clock()
        last = self._typing.get(key)
        if last is not None and last[0] == typing and now - last[1] < TYPING_REPEAT:
            return True
        if not self.throttle.admit_typing(user_id):
            return True
        self._typing.put(key, (typing, now))
        return False

    # -- cluster ------------------------------------------------------------------------------------------

    def apply_remote(self, event_type: str, data: dict[str, Any], recipients: frozenset[str]) -> None:
        """An event another process of the cluster originated (and stored): publish it here, to this process's
        connections, without storing it again and without relaying it again.

        The broadcaster drops a `message:new` it already published (the same Chat3 event consumed here too).
        """
        dialog_id = data.get("dialogId")
        if not isinstance(dialog_id, str):
            raise BadRequest("'dialogId' must be a string", field="dialogId")
        if event_type in (events.TYPING_START, events.TYPING_STOP):
            user_id = data.get("userId")
            if not isinstance(user_id, str):
                raise BadRequest("'userId' must be a string", field="userId")
            self.broadcaster.publish_typing(dialog_id, user_id, event_type == events.TYPING_START, recipients)
            return
        if event_type not in (events.MESSAGE_NEW, events.MESSAGE_UPDATE, events.DIALOG_UPDATE):
            raise BadRequest(f"unknown event type {event_type!r}", field="type")
        if event_type == events.DIALOG_UPDATE:
            members = data.get("memberIds")
            if isinstance(members, list) and all(isinstance(m, str) for m in members):
                self._remember_members(dialog_id, frozenset(members))
        self.broadcaster.publish(event_type, data, recipients, dialog_id=dialog_id)

    def resync(self) -> int:
        """This process may have missed events (its cluster link was down): every client of it is reset, and
        reloads over REST. Returns how many connections were reset."""
        return self.broadcaster.start_new_epoch()

    def _publish(self, event_type: str, data: dict[str, Any], recipients: frozenset[str], dialog_id: str) -> None:
        record: EventRecord | None = self.broadcaster.publish(event_type, data, recipients, dialog_id=dialog_id)
        if record is not None:
            for relay in self.relays:
                relay(event_type, data, recipients)
