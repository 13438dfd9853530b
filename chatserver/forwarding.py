"""One writer for the messages of every worker on a SQLite file: the others forward them to it.

Each worker that commits its own clients' messages makes its own small commits, and every commit is a fan-out turn
on every worker: with two workers, twice the commits and more, smaller sends to each connection than one process
makes for the same messages (docs/benchmarks.md, "Worker processes"). So on SQLite, whose one file lock lets one
process write at a time anyway, worker WRITER commits the new messages and the edits of all of them, in its group
commits, and the others hand theirs to it over the supervisor's channel (chatserver/siblings.py):

- `WRITE=` (to WRITER): the write, by name (only the operations in OPERATIONS) and its message as JSON;
- `RESULT=` (back to the worker that asked): the stored message, or the error, and the log's position after the
  commit. The commit's events reach every worker as any commit's do (`EVENTS=`), ahead of the result on the same
  channel; a worker that has not published up to that position reads the log first (at most CATCH_UP_WAIT), so a
  client's 201 never comes before its event is published where it is connected.

A write is forwarded only while WRITER serves (the supervisor says UP, DOWN, GONE); otherwise, or when it does not
fit in one message or the channel is full, it is committed here, as SQLite allows any process to. A forwarded
write whose writer goes away before answering fails as Unavailable (503): it may have been committed, and a client
sends it again with the same `clientMessageId`, which stores it once. Every wait ends: FORWARD_TIMEOUT at most.
PostgreSQL takes writes from every worker at once, so nothing is forwarded there. Nothing here is HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import attrs

from chatserver import jsonutil, queries
from chatserver.errors import BadRequest, ChatError, Conflict, Forbidden, NotFound, TooLarge, Unauthorized
from chatserver.feed import LogFeed
from chatserver.models import Message
from chatserver.store import StoreUnavailable
from chatserver.supervisor import ADDRESSED

log = logging.getLogger(__name__)

WRITER = 1
WRITE = b"WRITE="
RESULT = b"RESULT="
OPERATIONS: dict[str, Callable[..., Awaitable[tuple[Message, bool]]]] = {
    "insert_message": queries.insert_message,
    "apply_update": queries.apply_update,
}
_NAMES = {fn: name for name, fn in OPERATIONS.items()}
_KEYWORDS = {"source": str, "sender_is_member": bool}
# The largest forwarded write: its answer, the same message and a little more, must fit in one message too.
FORWARD_LIMIT = 30_000
FORWARD_TIMEOUT = 15.0
CATCH_UP_WAIT = 5.0
_ERRORS: dict[str, type[ChatError]] = {
    cls.code: cls for cls in (BadRequest, Unauthorized, Forbidden, NotFound, Conflict, TooLarge)
}


def addressed(index: int, message: bytes) -> bytes:
    """`message` for the supervisor to pass to worker `index` alone (chatserver/supervisor.py)."""
    return ADDRESSED + str(index).encode() + b"\n" + message


def _known_keywords(kwargs: dict[str, Any]) -> bool:
    return all(key in _KEYWORDS and isinstance(value, _KEYWORDS[key]) for key, value in kwargs.items())


def encode_error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ChatError):
        return {"code": exc.code, "message": exc.message, "field": exc.field, "dialogId": exc.dialog_id}
    return {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}


def decode_error(error: dict[str, Any]) -> Exception:
    code, message = error.get("code"), str(error.get("message", ""))
    if code == "unavailable":
        return StoreUnavailable(message)
    cls = _ERRORS.get(str(code))
    if cls is None:
        return RuntimeError(f"the forwarded write failed on worker {WRITER}: {message}")
    field, dialog_id = error.get("field"), error.get("dialogId")
    return cls(message, field=field if isinstance(field, str) else None,
               dialog_id=dialog_id if isinstance(dialog_id, str) else None)


def message_from(data: Any) -> Message:
    """A Message from its JSON form (`attrs.asdict`); ValueError where it is not one."""
    if not isinstance(data, dict) or set(data) != {f.name for f in attrs.fields(Message)}:
        raise ValueError("not a message")
    message = Message(**data)
    if not all(isinstance(getattr(message, name), str) for name in
               ("message_id", "dialog_id", "sender_id", "content", "type", "created_at", "updated_at")):
        raise ValueError("a message field has the wrong type")
    if not isinstance(message.meta, dict) or not (message.client_message_id is None
                                                   or isinstance(message.client_message_id, str)):
        raise ValueError("a message field has the wrong type")
    return message


class WriteForwarding:
    """This worker's side: forwarding its writes (a worker other than WRITER), or committing its siblings' (WRITER).
    `send` puts a message on the channel to the supervisor and raises OSError where it cannot."""

    def __init__(self, index: int, feed: LogFeed, send: Callable[[bytes], None]) -> None:
        self.index = index
        self.feed = feed
        self.store = feed.store
        self._send = send
        self.writer_up = False
        # Numbers of this process's forwarded writes: from a random start, so that an answer meant for a worker
        # of the same index that has since been restarted never matches one of this process's writes.
        self._next = secrets.randbits(48)
        self._waiting: dict[int, asyncio.Future[tuple[Message, bool]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.forwarded = 0  # writes this worker had committed by WRITER
        self.committed_for_others = 0  # writes WRITER committed for the others

    def start(self) -> None:
        if self.index != WRITER and self.store.dialect == "sqlite":
            self.store.forward = self.forward

    def stop(self) -> None:
        if self.store.forward == self.forward:
            self.store.forward = None
        self._fail_waiting("this worker is stopping")

    # -- a worker other than WRITER ---------------------------------------------------------------------------

    def forward(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> Awaitable[tuple[Message, bool]] | None:
        """The outcome of `fn(*args, **kwargs)` as WRITER commits it; None where it is to be committed here."""
        name = _NAMES.get(fn)
        if (name is None or not self.writer_up or len(args) != 1 or not isinstance(args[0], Message)
                or not _known_keywords(kwargs)):
            return None
        self._next += 1
        number = self._next
        payload = jsonutil.dumps_bytes({"id": number, "from": self.index, "op": name,
                                        "message": attrs.asdict(args[0]), "kwargs": kwargs})
        if len(payload) > FORWARD_LIMIT:
            return None
        try:
            self._send(addressed(WRITER, WRITE + payload))
        except OSError:  # the channel is full, or the supervisor is gone: nothing was sent
            return None
        future: asyncio.Future[tuple[Message, bool]] = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        self.forwarded += 1
        return self._outcome(number, future)

    async def _outcome(self, number: int, future: asyncio.Future[tuple[Message, bool]]) -> tuple[Message, bool]:
        try:
            return await asyncio.wait_for(future, FORWARD_TIMEOUT)
        except TimeoutError:
            raise StoreUnavailable(f"worker {WRITER} did not answer a forwarded write within "
                                   f"{FORWARD_TIMEOUT:.0f}s; it may have been stored: send it again") from None
        finally:
            self._waiting.pop(number, None)

    def answered(self, payload: bytes) -> None:
        """A `RESULT=` from WRITER: the forwarded write's outcome, once this worker has published its events."""
        try:
            reply = jsonutil.loads(payload)
            number, position = reply["id"], reply["position"]
            if not (isinstance(number, int) and isinstance(position, int)):
                raise ValueError("id and position must be numbers")
            outcome: tuple[Message, bool] | Exception = (
                decode_error(reply["error"]) if "error" in reply else (message_from(reply["message"]),
                                                                        bool(reply["flag"])))
        except (ChatError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignored a malformed answer to a forwarded write: %s", exc)
            return
        future = self._waiting.get(number)
        if future is None or future.done():
            return  # its wait ended (a timeout, a cancelled request)
        if self.feed.broadcaster.last_position >= position:
            _settle(future, outcome)
            return
        self._spawn(self._settle_when_published(future, outcome))

    async def _settle_when_published(self, future: asyncio.Future[tuple[Message, bool]],
                                     outcome: tuple[Message, bool] | Exception) -> None:
        try:
            await asyncio.wait_for(self.feed.catch_up(), CATCH_UP_WAIT)
        except TimeoutError:
            log.debug("answering a forwarded write before its event is read here")
        _settle(future, outcome)

    def writer_changed(self, up: bool, gone: bool) -> None:
        """WRITER serves (UP), takes no new writes (DOWN), or is gone: its unanswered writes fail."""
        self.writer_up = up
        if gone:
            self._fail_waiting(f"worker {WRITER} stopped before it answered")

    def _fail_waiting(self, why: str) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(StoreUnavailable(
                    f"{why}; the message may have been stored: send it again with the same clientMessageId"))

    # -- WRITER -------------------------------------------------------------------------------------------------

    def asked(self, payload: bytes) -> None:
        """A `WRITE=` from a sibling: committed here, its outcome sent back."""
        try:
            request = jsonutil.loads(payload)
            number, sibling, op = request["id"], request["from"], OPERATIONS[request["op"]]
            kwargs = request["kwargs"]
            if not (isinstance(number, int) and isinstance(sibling, int) and isinstance(kwargs, dict)):
                raise ValueError("id, from and kwargs have the wrong types")
            if not _known_keywords(kwargs):
                raise ValueError("unknown keywords")
            message = message_from(request["message"])
        except (ChatError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignored a malformed forwarded write: %s", exc)
            return
        self._spawn(self._commit(sibling, number, op, message, kwargs))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """A task held until it ends (the loop keeps only a weak reference)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _commit(self, sibling: int, number: int, op: Callable[..., Awaitable[tuple[Message, bool]]],
                      message: Message, kwargs: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"id": number}
        try:
            stored, flag = await self.store.write(op, message, **kwargs)
            reply.update(message=attrs.asdict(stored), flag=flag)
        except RuntimeError as exc:  # this worker's store closed under it: it is stopping
            reply["error"] = {"code": "unavailable", "message": f"worker {WRITER} is stopping: {exc}"}
        except Exception as exc:
            reply["error"] = encode_error(exc)
        # Published here before this task resumed: the position covers the write's events.
        reply["position"] = self.feed.broadcaster.last_position
        self.committed_for_others += 1
        try:
            self._send(addressed(sibling, RESULT + jsonutil.dumps_bytes(reply)))
        except OSError as exc:  # the sibling's wait ends with FORWARD_TIMEOUT, or with GONE
            log.warning("the answer to worker %d's forwarded write was not sent: %s", sibling, exc)


def _settle(future: asyncio.Future[tuple[Message, bool]], outcome: tuple[Message, bool] | Exception) -> None:
    if future.done():
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
