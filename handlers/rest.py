"""The REST endpoints of PROTOCOL section 2: parse, call the service, shape the answer. Nothing more."""

from __future__ import annotations

import re

from chatserver.errors import BadRequest
from chatserver.models import require_str
from chatserver.service import DEFAULT_LIMIT, MAX_LIMIT
from handlers.base import ApiHandler, client_address

_LIMIT = re.compile(r"[0-9]{1,6}")
MAX_CURSOR_LENGTH = 256  # far above any cursor issued (a 16-character log id, a dot, at most 18 digits)


class LoginHandler(ApiHandler):
    requires_auth = False

    async def post(self) -> None:
        address = client_address(self.request, self.ctx.config.proxies)
        token, user = await self.service.login(self.json_body(), address)
        self.reply({"token": token, "user": user.to_json()})


class MeHandler(ApiHandler):
    async def get(self) -> None:
        self.reply((await self.service.current_user(self.user_id)).to_json())


class StreamTicketHandler(ApiHandler):
    """`POST /api/stream-ticket` (PROTOCOL section 12): a one-use, 30-second ticket for `/ws` or `/api/events`."""

    async def post(self) -> None:
        ticket, ttl = self.service.issue_stream_ticket(self.user_id)
        self.reply({"ticket": ticket, "expiresIn": ttl}, 201)


class UsersHandler(ApiHandler):
    """`GET /api/users?ids=` or `?phone=` (extension): names of people the caller shares a dialog with; a lookup
    by exact phone."""

    async def get(self) -> None:
        users = await self.service.find_users(
            self.user_id, self.get_query_argument("ids", None), self.get_query_argument("phone", None)
        )
        self.reply([user.to_json() for user in users])


class DialogsHandler(ApiHandler):
    async def get(self) -> None:
        self.reply([view.to_json() for view in await self.service.list_dialogs(self.user_id)])

    async def post(self) -> None:
        view = await self.service.create_dialog(self.user_id, self.json_body())
        self.reply(view.to_json(), 201)


class DialogApiHandler(ApiHandler):
    """An endpoint under one dialog: membership is checked before the body is even read (403 wins over 400)."""

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        await self.service.authorize_dialog(self.user_id, self.path_args[0])


class DialogHandler(DialogApiHandler):
    async def get(self, dialog_id: str) -> None:
        self.reply((await self.service.get_dialog(self.user_id, dialog_id)).to_json())

    async def patch(self, dialog_id: str) -> None:
        self.reply((await self.service.update_dialog(self.user_id, dialog_id, self.json_body())).to_json())


class DialogMessagesHandler(DialogApiHandler):
    async def get(self, dialog_id: str) -> None:
        limit_text = self.get_query_argument("limit", str(DEFAULT_LIMIT))
        # ASCII digits only: str.isdigit() also accepts '²', which int() then refuses.
        if not _LIMIT.fullmatch(limit_text):
            raise BadRequest(f"'limit' must be an integer between 1 and {MAX_LIMIT}", field="limit")
        messages = await self.service.list_messages(
            self.user_id,
            dialog_id,
            limit=int(limit_text),
            before=self.get_query_argument("before", None) or None,
            after=self.get_query_argument("after", None) or None,
        )
        self.reply([message.to_json() for message in messages])

    async def post(self, dialog_id: str) -> None:
        outcome = await self.service.post_message(self.user_id, dialog_id, self.json_body())
        self.reply(outcome.message.to_json(), 201)


class MessageHandler(ApiHandler):
    async def prepare(self) -> None:  # type: ignore[override]
        # As under a dialog: 404 and 403 are decided before the body is read.
        await super().prepare()
        await self.service.editable_message(self.user_id, self.path_args[0])

    async def patch(self, message_id: str) -> None:
        message = await self.service.edit_message(self.user_id, message_id, self.json_body())
        self.reply(message.to_json())


class TypingHandler(DialogApiHandler):
    async def post(self, dialog_id: str) -> None:
        await self.service.set_typing(self.user_id, dialog_id, self.json_body().get("typing"))
        self.set_status(204)
        self.finish()


class AckHandler(ApiHandler):
    """`POST /api/ack {"cursor"}` (PROTOCOL section 11): the caller's client has every event up to the cursor (for
    SSE clients, which cannot write on their stream)."""

    async def post(self) -> None:
        cursor = require_str(self.json_body(), "cursor", max_length=MAX_CURSOR_LENGTH)
        self.reply({"acknowledged": await self.service.acknowledge(self.user_id, cursor)})


class ReadHandler(DialogApiHandler):
    async def post(self, dialog_id: str) -> None:
        view = await self.service.mark_read(self.user_id, dialog_id, self.json_body())
        self.reply(view.to_json())
