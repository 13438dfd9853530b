"""The chat service: every use case of the server, and the one write path.

Handlers and the Chat3 listener call this and nothing else of the domain's write side. A message, whoever
sends it (a REST client, Chat3, a broker redelivery), goes through `accept_message` or `accept_update`: it is
validated and stored idempotently, and its event is written to the durable log in the same transaction. The
log's follower (`chatserver.feed.LogFeed`) publishes what was committed, once, on every process. That is the
seed's bug made impossible: there is no path that stores without its event, nor one that could emit twice.

It also owns authorization (`authorize_dialog`: who may read, post to, poll or join a dialog), with the
membership the log's follower keeps current, and resume (`replay`): from the broadcaster's memory, else from
the log in the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs

from chatserver import eventlog, queries
from chatserver.auth import DUMMY_HASH, TokenSigner, verify_password
from chatserver.broadcaster import Broadcaster, Replay
from chatserver.config import Config
from chatserver.errors import BadRequest, Forbidden, NotFound, Unauthorized
from chatserver.feed import LogFeed, Membership, record_for_user
from chatserver.lru import LRU
from chatserver.models import (
    MAX_ID_LENGTH,
    Dialog,
    DialogView,
    Message,
    User,
    check_id,
    check_text,
    is_id,
    require_id,
    require_str,
)
from chatserver.receipts import Receipts
from chatserver.store import Store, StoreUnavailable
from chatserver.throttle import Throttle
from chatserver.tickets import StreamTickets

log = logging.getLogger(__name__)

MAX_LIMIT = 200
DEFAULT_LIMIT = 50
MAX_USER_IDS = 200
MAX_MEMBER_CHANGES = 1000
# A typing event repeating the user's last one in a dialog within this many seconds is dropped.
TYPING_REPEAT = 1.0
# Events per page of a replay for a transport that streams (WebSocket, SSE): each page is sent before the next is
# read, so a resume far behind queues at most a page beyond the connection's bound.
STORE_PAGE = 500
# How long a resume waits for this process to read what another process has committed (a cursor from it).
CATCH_UP_WAIT = 5.0


@attrs.frozen(slots=True)
class Outcome:
    """What a write did: the message as stored, and whether it was stored as new (and so logged)."""

    message: Message
    created: bool


# Called with every typing event this process originates (dialog, user, started, members), for the other
# processes (which have no log of ephemeral events).
TypingRelay = Callable[[str, str, bool, frozenset[str]], None]


class ChatService:
    def __init__(
        self,
        store: Store,
        broadcaster: Broadcaster,
        feed: LogFeed,
        config: Config,
        tokens: TokenSigner,
        tickets: StreamTickets,
        *,
        cache_size: int = 10000,
        user_cache_size: int = 100000,
        throttle: Throttle | None = None,
        receipts: Receipts | None = None,
    ) -> None:
        self.store = store
        self.broadcaster = broadcaster
        self.feed = feed
        self.membership: Membership = feed.membership
        self.config = config
        self.tokens = tokens
        self.tickets = tickets
        # Users known to exist (never deleted, so never stale).
        self._users: LRU[str, bool] = LRU(user_cache_size)
        # The last typing state each user announced in each dialog, and when.
        self._typing: LRU[tuple[str, str], tuple[bool, float]] = LRU(cache_size)
        self._clock = time.monotonic
        self.throttle = throttle or Throttle(config, self._clock)
        self.typing_relays: list[TypingRelay] = []
        self.receipts = receipts or Receipts(store)

    # -- auth --------------------------------------------------------------------------------------------

    async def login(self, body: dict[str, Any], address: str) -> tuple[str, User]:
        """A token for the phone and password, tried from `address`: throttled (before the password is hashed)."""
        # U+0000 is in no stored phone (it is refused where users are made): such a phone is one nobody has.
        phone = require_str(body, "phone", max_length=64, allow_nul=True)
        password = require_str(body, "password", max_length=1024, allow_empty=True, allow_nul=True)
        attempt = self.throttle.admit_login(phone, address)
        found = None if "\x00" in phone else await self.store.read(queries.password_hash, phone)
        stored = found[1] if found else DUMMY_HASH
        ok = await self.store.offload(verify_password, password, stored)
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
            if await self.store.read(queries.get_user, user_id) is None:
                raise Unauthorized("the token's user does not exist")
            self._users.put(user_id, True)
        return user_id

    def issue_stream_ticket(self, user_id: str) -> tuple[str, int]:
        """A ticket for one `/ws` or `/api/events` request of this (authenticated) user, and its lifetime in seconds;
        TooManyRequests past the user's ticket rate (chatserver.throttle)."""
        self.throttle.admit_ticket(user_id)
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
        user = await self.store.read(queries.get_user, user_id)
        if user is None:
            raise Unauthorized("the token's user no longer exists")
        return user

    async def find_users(self, user_id: str, ids: str | None, phone: str | None) -> list[User]:
        """`GET /api/users` (extension): users by id among those the caller shares a dialog with (or the caller),
        or the one user with exactly this phone. Never a directory: unknown and unrelated ids are just left out."""
        if (ids is None) == (phone is None):
            raise BadRequest("give exactly one of 'ids' or 'phone'", field="ids")
        if phone is not None:
            check_text(phone, "phone", max_length=64)
            user = await self.store.read(queries.user_by_phone, phone)
            return [user] if user else []
        assert ids is not None
        wanted = ids.split(",")
        if len(wanted) > MAX_USER_IDS:
            raise BadRequest(f"'ids' names more than {MAX_USER_IDS} users", field="ids")
        for one in wanted:
            if not is_id(one, "usr"):
                raise BadRequest("'ids' must be a comma-separated list of user ids", field="ids")
        return await self.store.read(queries.visible_users, user_id, wanted)

    # -- membership --------------------------------------------------------------------------------------

    async def members(self, dialog_id: str) -> frozenset[str]:
        """The dialog's members as this process follows them; NotFound for an unknown dialog."""
        return await self.membership.current(dialog_id)

    async def authorize_dialog(self, user_id: str, dialog_id: str) -> frozenset[str]:
        """The members of a dialog the user belongs to; NotFound or Forbidden otherwise.

        A refusal is checked against the store first: a member added a moment ago on another process is let in
        before this process has followed the change. A removal takes effect here once followed (within the
        log's poll interval at most, at once where a wake-up comes).
        """
        if not is_id(dialog_id, "dlg"):
            raise NotFound(f"dialog {dialog_id[:MAX_ID_LENGTH]!r} not found")
        members = await self.membership.current(dialog_id)
        if user_id not in members:
            members = await self.membership.current(dialog_id, fresh=True)
            if user_id not in members:
                raise Forbidden("you are not a member of this dialog", dialog_id=dialog_id)
        return members

    # -- dialogs -----------------------------------------------------------------------------------------

    async def list_dialogs(self, user_id: str) -> list[DialogView]:
        return await self.store.read(queries.dialog_views, user_id)

    async def get_dialog(self, user_id: str, dialog_id: str) -> DialogView:
        """One dialog as the user sees it, with the other members' receipts (PROTOCOL section 11)."""
        await self.authorize_dialog(user_id, dialog_id)
        view = await self.store.read(queries.dialog_detail, dialog_id, user_id)
        if view is None:
            raise NotFound(f"dialog {dialog_id} not found", dialog_id=dialog_id)
        return view

    async def create_dialog(self, user_id: str, body: dict[str, Any]) -> DialogView:
        dialog = Dialog.from_request(body, creator_id=user_id)
        await self.save_dialog(dialog)
        view = await self.store.read(queries.dialog_view, dialog.dialog_id, user_id)
        assert view is not None
        return view

    async def save_dialog(self, dialog: Dialog, *, source: str = "local") -> bool:
        """The write path of whole dialogs (created over REST, or upserted by Chat3): stored, and its
        `dialog:update` logged for every member, old and new. False where nothing changed (an update older
        than, or the same as, what the store holds)."""
        if not dialog.member_ids:
            raise BadRequest("'memberIds' must name at least one user", field="memberIds")
        unknown = await self.store.read(queries.unknown_users, dialog.member_ids)
        if unknown:
            raise BadRequest(f"unknown users in 'memberIds': {', '.join(unknown)}", field="memberIds")
        change = await self.store.write(queries.save_dialog, dialog, source=source)
        return change.event is not None

    async def update_dialog(self, user_id: str, dialog_id: str, body: dict[str, Any]) -> DialogView:
        """`PATCH /api/dialogs/{id}` (PROTOCOL section 13): a new title, members added, members removed."""
        await self.authorize_dialog(user_id, dialog_id)
        title = body.get("title")
        if title is not None:
            title = require_str(body, "title", max_length=200)
        add = _user_ids(body, "addMemberIds")
        remove = _user_ids(body, "removeMemberIds")
        unknown = await self.store.read(queries.unknown_users, [*add, *remove])
        if unknown:
            field = "addMemberIds" if unknown[0] in add else "removeMemberIds"
            raise BadRequest(f"unknown users in '{field}': {', '.join(unknown)}", field=field)
        await self.store.write(queries.patch_dialog, dialog_id, title=title, add=add, remove=remove, actor=user_id)
        view = await self.store.read(queries.dialog_view, dialog_id, user_id)
        if view is None:
            raise NotFound(f"dialog {dialog_id} not found", dialog_id=dialog_id)
        return view

    # -- messages ----------------------------------------------------------------------------------------

    async def list_messages(
        self, user_id: str, dialog_id: str, *, limit: int, before: str | None, after: str | None
    ) -> list[Message]:
        if not 1 <= limit <= MAX_LIMIT:
            raise BadRequest(f"'limit' must be between 1 and {MAX_LIMIT}", field="limit")
        await self.authorize_dialog(user_id, dialog_id)
        return await self.store.read(queries.list_messages, dialog_id, limit=limit, before=before, after=after)

    async def post_message(self, user_id: str, dialog_id: str, body: dict[str, Any]) -> Outcome:
        await self.authorize_dialog(user_id, dialog_id)
        message = Message.from_request(
            body, dialog_id=dialog_id, sender_id=user_id, max_content_length=self.config.max_content_length
        )
        self.throttle.admit_write(user_id)
        return await self.accept_message(message, sender_is_member=True)

    async def editable_message(self, user_id: str, message_id: str) -> Message:
        """The message, if the user may edit it: NotFound, or Forbidden for a non-member or another sender."""
        if not is_id(message_id, "msg"):
            raise NotFound(f"message {message_id[:MAX_ID_LENGTH]!r} not found")
        stored = await self.store.read(queries.get_message, message_id)
        if stored is None:
            raise NotFound(f"message {message_id} not found")
        await self.authorize_dialog(user_id, stored.dialog_id)
        if stored.sender_id != user_id:
            raise Forbidden("only the sender may edit a message")
        return stored

    async def edit_message(self, user_id: str, message_id: str, body: dict[str, Any]) -> Message:
        stored = await self.editable_message(user_id, message_id)
        content = require_str(body, "content", max_length=self.config.max_content_length, allow_nul=True)
        self.throttle.admit_write(user_id)
        return (await self.accept_update(stored.edited(content))).message

    async def accept_message(self, message: Message, *, source: str = "local",
                             sender_is_member: bool = False) -> Outcome:
        """Store a new message (idempotently) and, if it was new, log its `message:new` for every member."""
        stored, created = await self.store.write(queries.insert_message, message, source=source,
                                                 sender_is_member=sender_is_member)
        return Outcome(stored, created)

    async def accept_update(self, message: Message, *, source: str = "local") -> Outcome:
        """Store a newer version of a message and, if it was newer, log its `message:update`."""
        stored, applied = await self.store.write(queries.apply_update, message, source=source)
        return Outcome(stored, applied)

    async def mark_read(self, user_id: str, dialog_id: str, body: dict[str, Any]) -> DialogView:
        await self.authorize_dialog(user_id, dialog_id)
        message_id = require_id(body, "messageId", "msg")
        view, moved = await self.store.write(queries.mark_read, dialog_id, user_id, message_id)
        if moved:
            self.receipts.read(dialog_id, user_id)
        return view

    # -- receipts ----------------------------------------------------------------------------------------

    async def acknowledge(self, user_id: str, cursor: str) -> bool:
        """A client of the user has every event up to `cursor` (a WebSocket `ack` frame, `POST /api/ack`): its
        delivered positions move, in the next flush of receipts. BadRequest for a text that is not a cursor or
        one ahead of any issued; False (nothing acknowledged) for a cursor of another log."""
        await self.check_cursor(cursor)
        return self.acknowledged(user_id, cursor)

    def acknowledged(self, user_id: str, cursor: str) -> bool:
        """`acknowledge` for a cursor already checked (a resume's, a poll's): cheap, never waits."""
        broadcaster = self.broadcaster
        try:
            position = broadcaster.parse_cursor(cursor)
        except BadRequest:
            return False
        if position is None or position > broadcaster.last_position:
            return False
        # Only messages move a delivered position: a cursor past the last one acknowledges no more than it does, so
        # acknowledgements that differ only by receipts, typing or dialog events after it cost nothing.
        self.receipts.acknowledge(user_id, min(position, broadcaster.last_message_position))
        return True

    # -- typing ------------------------------------------------------------------------------------------

    async def set_typing(self, user_id: str, dialog_id: str, typing: Any) -> None:
        if not isinstance(typing, bool):
            raise BadRequest("'typing' must be true or false", field="typing")
        members = await self.authorize_dialog(user_id, dialog_id)
        if self._repeated_typing(user_id, dialog_id, typing):
            return
        self.broadcaster.publish_typing(dialog_id, user_id, typing, members)
        for relay in self.typing_relays:
            relay(dialog_id, user_id, typing, members)

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

    async def apply_remote_typing(self, dialog_id: str, user_id: str, typing: bool) -> None:
        """A typing event another process originated: to this process's connections that joined the dialog."""
        check_id(dialog_id, "dialogId", "dlg")
        check_id(user_id, "userId", "usr")
        members = await self.membership.current(dialog_id)
        if user_id in members:
            self.broadcaster.publish_typing(dialog_id, user_id, typing, members)

    # -- resume ------------------------------------------------------------------------------------------

    async def check_cursor(self, cursor: str) -> None:
        """BadRequest for a text that is not a cursor, or a position no process has issued (PROTOCOL section 3).

        A cursor ahead of this process's position may come from another process that is ahead: this one reads
        the log up to the store's head first, and only then judges.
        """
        broadcaster = self.broadcaster
        position = broadcaster.parse_cursor(cursor)
        if position is None or position <= broadcaster.last_position:
            return
        try:
            await asyncio.wait_for(self.feed.catch_up(), CATCH_UP_WAIT)
        except TimeoutError:
            raise StoreUnavailable("the event log could not be read in time") from None
        if position > broadcaster.last_position:
            raise BadRequest("'cursor' is ahead of any cursor this server issued", field="cursor")

    async def replay(self, user_id: str, cursor: str, limit: int | None = None) -> Replay:
        """Every event for the user after `cursor`, or one reset (PROTOCOL sections 3 and 9): from memory where it
        holds them, else one page (at most `limit`, or STORE_PAGE, with `more`) from the log in the store."""
        await self.check_cursor(cursor)
        broadcaster = self.broadcaster
        replay = broadcaster.events_after(user_id, cursor, limit)
        if replay is not None:
            return replay
        position = broadcaster.parse_cursor(cursor)
        assert position is not None  # another log's cursor is answered from memory, with a reset
        return await self._replay_from_store(user_id, position, limit or STORE_PAGE)

    async def _replay_from_store(self, user_id: str, position: int, limit: int) -> Replay:
        broadcaster = self.broadcaster
        upto = broadcaster.last_position
        floor, logged = await self.store.read(eventlog.events_for_user, user_id, position, upto, limit)
        if position < floor:
            return broadcaster.reset("expired")
        records = [record_for_user(event, broadcaster.cursor(event.position), user_id) for event in logged]
        if len(logged) == limit:
            return Replay(records, broadcaster.cursor(logged[-1].position), more=True)
        return Replay(records, broadcaster.cursor(upto))

    async def replay_pages(self, user_id: str, cursor: str) -> AsyncIterator[tuple[Replay, bool]]:
        """A streaming transport's resume: (page, last), each page at most STORE_PAGE events. Pages read from the
        store while memory cannot answer, then from memory, the last one the end of what memory holds. The last
        comes with no await between the memory's answer and the caller's next step: the caller subscribes right
        then, before it awaits anything, so that no event falls between the replay and the live ones, or comes
        twice."""
        broadcaster = self.broadcaster
        while True:
            replay = broadcaster.events_after(user_id, cursor, STORE_PAGE)
            if replay is not None and not replay.more:
                yield replay, True
                return
            page = replay or await self.replay(user_id, cursor, STORE_PAGE)
            cursor = page.cursor
            yield page, False


def _user_ids(body: dict[str, Any], field: str) -> list[str]:
    value = body.get(field, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"'{field}' must be a list of user ids", field=field)
    if len(value) > MAX_MEMBER_CHANGES:
        raise BadRequest(f"'{field}' names more than {MAX_MEMBER_CHANGES} users", field=field)
    for one in value:
        check_id(one, field, "usr")
    return list(dict.fromkeys(value))
