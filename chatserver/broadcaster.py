"""The dialog broadcaster: the tail of the durable log in memory, and per-user fan-out.

It holds the last `history_size` events of the log (`chatserver.eventlog`), each as the JSON bytes it is sent as,
encoded once, and hands each new one to every live connection of its recipients. It is a cache: the log in the
store is the truth, `chatserver.feed.LogFeed` is the only publisher (in position order, every position once),
and a cursor older than what this holds is answered from the store (`ChatService.replay`). It never touches a
socket, the store, Tornado or pika: transports register `Subscriber`s.

Cursors are `<log_id>.<position>`: the log's name, made once with the database, and a position in it. Neither is
derived from a clock, and both mean the same on every process that uses the database.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from typing import Protocol

import attrs

from chatserver import jsonutil
from chatserver.errors import BadRequest
from chatserver.numbers import is_ascii_decimal

log = logging.getLogger(__name__)

MESSAGE_NEW = "message:new"
MESSAGE_UPDATE = "message:update"
DIALOG_UPDATE = "dialog:update"
TYPING_START = "typing:start"
TYPING_STOP = "typing:stop"
RESET = "reset"
MAX_POSITION_DIGITS = 18


@attrs.define(slots=True, eq=False)
class EventRecord:
    """One event as it is sent: who gets it, and its JSON bytes, encoded once.

    A logged event is one record, or several with the same position where its JSON differs per recipient (a
    dialog change carries each member's own unread count); each recipient is in exactly one of them.
    """

    position: int
    type: str
    recipients: frozenset[str]
    payload: bytes
    dialog_id: str | None = None
    # The WebSocket frame of `payload`, built once by the first WebSocket that sends it.
    frame: bytes | None = None

    @property
    def ephemeral(self) -> bool:
        return self.position < 0


def event_payload(event_type: str, data: bytes, cursor: str) -> bytes:
    """An event's JSON, spliced from its data's JSON text: nothing is encoded twice."""
    return b"".join((b'{"type":"', event_type.encode(), b'","data":', data, b',"cursor":"', cursor.encode(), b'"}'))


class Subscriber(Protocol):
    """A live connection of one user. `deliver` must not block and must not raise."""

    user_id: str

    def deliver(self, record: EventRecord) -> None: ...

    def wants_typing(self, dialog_id: str) -> bool: ...


@attrs.frozen(slots=True)
class Replay:
    """What a resuming client gets: events after its cursor (or one reset), and where it stands after them."""

    events: list[EventRecord]
    cursor: str
    more: bool = False
    reset: str | None = None


class Broadcaster:
    """The log's tail in memory and the fan-out. Single-threaded: call it from the IOLoop only."""

    def __init__(
        self,
        history_size: int,
        *,
        log_id: str,
        position: int = 0,
        history_max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.log_id = log_id
        self._history: deque[EventRecord] = deque()
        self._history_size = history_size
        self._history_max_bytes = history_max_bytes
        self._history_bytes = 0
        self._history_positions = 0  # distinct positions held (a position may have several records)
        self.last_position = position
        # The position of the last `message:new` published; at start the head, which may be one (a bound, never
        # below the true one). An acknowledgement past it moves no delivered position further than one of it.
        self.last_message_position = position
        # A user's live connections, as a tuple replaced at each (un)subscribe: a delivery that unsubscribes
        # (a cut-off) never changes the tuple a fan-out iterates, so the fan-out needs no copy per recipient.
        # (Un)subscribing copies the user's few connections: linear in them, where a set would be constant.
        self._subscribers: dict[str, tuple[Subscriber, ...]] = {}
        self.published = 0
        self._current = (self.last_position, self.cursor())  # the cursor of now, made once per event
        # The last scan of `events_after`: (cursor, last position, every record after that cursor).
        self._after: tuple[str, int, list[EventRecord]] | None = None

    # -- cursors -----------------------------------------------------------------------------------------

    def cursor(self, position: int | None = None) -> str:
        return f"{self.log_id}.{self.last_position if position is None else position}"

    def current_cursor(self) -> str:
        """`cursor()`, formatted once per event rather than once per call."""
        position, text = self._current
        if position != self.last_position:
            text = self.cursor()
            self._current = (self.last_position, text)
        return text

    def is_current(self, cursor: str) -> bool:
        """Whether `cursor` is the cursor of now: nothing after it for anyone. A string comparison, for the
        resuming poll that has seen everything (most of them); `events_after` answers the same, at more cost."""
        return cursor == self.current_cursor()

    def parse_cursor(self, cursor: str) -> int | None:
        """The position of a cursor of this log, or None for a cursor of another log (PROTOCOL section 9).

        Raises BadRequest for a text that is not a cursor. Whether the position was ever issued is the store's
        to say (another process may be ahead of this one): see `ChatService.replay`.
        """
        log_id, dot, position = cursor.rpartition(".")
        if (not dot or not log_id or not is_ascii_decimal(position)
                or len(position) > MAX_POSITION_DIGITS or not log_id.isascii() or not log_id.isalnum()):
            raise BadRequest("'cursor' is not a cursor this server issued", field="cursor")
        if log_id != self.log_id:
            return None
        return int(position)

    @property
    def first_position(self) -> int:
        """The first position held in memory; `last_position + 1` when none is."""
        return self._history[0].position if self._history else self.last_position + 1

    # -- publishing --------------------------------------------------------------------------------------

    def publish(self, position: int, records: list[EventRecord]) -> None:
        """Hold the event at `position` (the next one of the log) and hand it to every live connection of its
        recipients. `LogFeed` calls this, in position order, once per position."""
        if position != self.last_position + 1:
            raise ValueError(f"position {position} published after {self.last_position}")
        self.last_position = position
        self.published += 1
        self._history_positions += 1
        subscribers = self._subscribers
        for record in records:
            self._remember(record)
            if record.type == MESSAGE_NEW:
                self.last_message_position = position
            # The fan-out: per recipient a lookup and a call, nothing more (it runs a thousand times an event).
            for user_id in record.recipients:
                group = subscribers.get(user_id)
                if group:
                    _hand(group, record, user_id)
        self._evict()

    def publish_typing(self, dialog_id: str, user_id: str, started: bool, members: Iterable[str]) -> None:
        """An ephemeral typing event: not logged, no cursor, only to connections that joined the dialog."""
        event_type = TYPING_START if started else TYPING_STOP
        payload = jsonutil.dumps_bytes({"type": event_type, "data": {"dialogId": dialog_id, "userId": user_id}})
        record = EventRecord(-1, event_type, frozenset(members) - {user_id}, payload, dialog_id)
        for member in record.recipients:
            group = [s for s in self._subscribers.get(member, ()) if s.wants_typing(dialog_id)]
            if group:
                _hand(group, record, member)

    def _remember(self, record: EventRecord) -> None:
        self._history.append(record)
        self._history_bytes += len(record.payload)

    def _evict(self) -> None:
        history = self._history
        while len(history) > 1 and (
            self._history_positions > self._history_size or self._history_bytes > self._history_max_bytes
        ):
            # A whole position at a time: the memory never holds part of a position's records.
            position = history[0].position
            while history and history[0].position == position:
                self._history_bytes -= len(history.popleft().payload)
            self._history_positions -= 1

    # -- resume ------------------------------------------------------------------------------------------

    def events_after(self, user_id: str, cursor: str, limit: int | None = None) -> Replay | None:
        """Every event for `user_id` after `cursor`, in order, from memory; a reset for a cursor of another log;
        None where memory cannot answer (a cursor older than what it holds, or ahead of what it published).

        Raises BadRequest for a text that is not a cursor.
        """
        memo = self._after
        if memo is not None and memo[0] == cursor and memo[1] == self.last_position:
            records = memo[2]  # the polls an event wakes ask with the same cursor: scanned once, filtered each
        else:
            position = self.parse_cursor(cursor)
            if position is None:
                return self.reset("restarted")
            if position < self.first_position - 1 or position > self.last_position:
                return None
            if position == self.last_position:
                return Replay([], cursor)
            records = []
            for record in reversed(self._history):
                if record.position <= position:
                    break
                records.append(record)
            records.reverse()
            self._after = (cursor, self.last_position, records)
        pending = [record for record in records if user_id in record.recipients]
        if limit is not None and len(pending) > limit:
            return Replay(pending[:limit], self.cursor(pending[limit - 1].position), more=True)
        return Replay(pending, self.current_cursor())

    def reset(self, reason: str) -> Replay:
        """PROTOCOL section 3's reset, to the cursor of now."""
        now = self.cursor()
        payload = jsonutil.dumps_bytes({"type": RESET, "data": {"reason": reason, "cursor": now}, "cursor": now})
        return Replay([EventRecord(self.last_position, RESET, frozenset(), payload)], now, reset=reason)

    # -- subscribers -------------------------------------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> None:
        group = self._subscribers.get(subscriber.user_id, ())
        if subscriber not in group:
            self._subscribers[subscriber.user_id] = (*group, subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        group = self._subscribers.get(subscriber.user_id)
        if group is None or subscriber not in group:
            return
        if len(group) == 1:
            del self._subscribers[subscriber.user_id]
        else:
            rest = list(group)
            rest.remove(subscriber)
            self._subscribers[subscriber.user_id] = tuple(rest)

    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    @property
    def history_length(self) -> int:
        return self._history_positions

    @property
    def history_bytes(self) -> int:
        return self._history_bytes


def _hand(group: Iterable[Subscriber], record: EventRecord, user_id: str) -> None:
    """The record to each of a user's connections: one that fails never stops delivery to the others."""
    for subscriber in group:
        try:
            subscriber.deliver(record)
        except Exception:
            log.exception("delivery to a connection of %s failed", user_id)
