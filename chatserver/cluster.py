"""What processes sharing one database tell each other beside the log: wake-ups and typing.

The log in the store is the truth; these are only hints. `Peers` carries them over whatever channel the
processes share: PostgreSQL's NOTIFY (`Store.send_ephemeral`, always there with PostgreSQL), and the broker's
cluster exchange where one is configured (`chatserver.chat3.ClusterBus`, the faster wake-up for SQLite files).
A message is JSON: `{"origin", "n", "type": "typing", "dialogId", "userId", "typing"}` or `{"origin", "n",
"type": "head", "position"}`; a process ignores its own, and one it got already over another channel (by origin
and n). Whatever is lost is lost: a missed wake-up is caught by the follower's poll of the log, a missed typing
event is ephemeral by contract.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

from chatserver import jsonutil
from chatserver.errors import ChatError
from chatserver.feed import LogFeed
from chatserver.lru import LRU
from chatserver.service import ChatService
from chatserver.store import Store

log = logging.getLogger(__name__)

Send = Callable[[bytes], None]


class Peers:
    """This process's side of the hints: what it sends, and what it does with what others send."""

    def __init__(self, service: ChatService, feed: LogFeed) -> None:
        self.origin = secrets.token_hex(6)
        self.service = service
        self.feed = feed
        self.channels: list[Send] = []
        self._sent = 0
        self._seen: LRU[tuple[str, int], bool] = LRU(4096)
        self._tasks: set[asyncio.Task[None]] = set()
        service.typing_relays.append(self.send_typing)

    def attach_store(self, store: Store) -> None:
        """Use the store's own channel (PostgreSQL's NOTIFY), where it has one."""
        store.on_ephemeral = self.received
        if store.dialect == "postgresql":
            self.channels.append(lambda payload: self._spawn(store.send_ephemeral(payload)))

    def send_typing(self, dialog_id: str, user_id: str, typing: bool, members: frozenset[str]) -> None:
        self._send({"type": "typing", "dialogId": dialog_id, "userId": user_id, "typing": typing})

    def send_head(self, position: int) -> None:
        self._send({"type": "head", "position": position})

    def _send(self, message: dict[str, Any]) -> None:
        if not self.channels:
            return
        self._sent += 1
        payload = jsonutil.dumps_bytes({"origin": self.origin, "n": self._sent, **message})
        for send in self.channels:
            try:
                send(payload)
            except Exception as exc:  # a hint that cannot go is dropped, never the write that made it
                log.debug("a hint to the other processes was not sent: %r", exc)

    def received(self, payload: bytes) -> None:
        """A hint from another process (or this one's own echo, ignored)."""
        try:
            message = jsonutil.loads_object(payload)
        except ChatError:
            log.warning("ignored a malformed message from another process")
            return
        origin, number = message.get("origin"), message.get("n")
        if origin == self.origin or not isinstance(origin, str) or not isinstance(number, int):
            return
        if (origin, number) in self._seen:
            return  # the same hint over a second channel
        self._seen.put((origin, number), True)
        kind = message.get("type")
        if kind == "head":
            self.feed.wake()
        elif kind == "typing":
            dialog_id, user_id, typing = message.get("dialogId"), message.get("userId"), message.get("typing")
            if isinstance(dialog_id, str) and isinstance(user_id, str) and isinstance(typing, bool):
                self._spawn(self._typing(dialog_id, user_id, typing))

    async def _typing(self, dialog_id: str, user_id: str, typing: bool) -> None:
        try:
            await self.service.apply_remote_typing(dialog_id, user_id, typing)
        except ChatError as exc:
            log.debug("ignored a typing event from another process: %s", exc.message)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
