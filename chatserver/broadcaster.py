"""The dialog broadcaster: the server's event log and its per-user fan-out.

It owns the epoch, the sequence numbers, the bounded history that resume reads from, the dedupe of messages
by id, and the registry of live subscribers. Every non-ephemeral event is encoded to JSON once, here, and the
same bytes go to every recipient. It never touches a socket, the store, Tornado or pika: transports register
`Subscriber`s, and only `ChatService` publishes (the one write path).

Cursors are `<epoch>.<seq>`: the epoch is random per process start, the sequence counts events. Neither is
derived from a clock.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol

import attrs

from chatserver import jsonutil
from chatserver.errors import BadRequest
from chatserver.lru import LRU

log = logging.getLogger(__name__)

MESSAGE_NEW = "message:new"
MESSAGE_UPDATE = "message:update"
DIALOG_UPDATE = "dialog:update"
TYPING_START = "typing:start"
TYPING_STOP = "typing:stop"
RESET = "reset"


@attrs.define(slots=True, eq=False)
class EventRecord:
    """One event as it was published: who gets it, and its JSON bytes, encoded once."""

    seq: int
    type: str
    recipients: frozenset[str]
    payload: bytes
    dialog_id: str | None = None
    # The WebSocket frame of `payload`, built once by the first WebSocket that sends it.
    frame: bytes | None = None

    @property
    def ephemeral(self) -> bool:
        return self.seq < 0


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
    """The in-process event log and fan-out. Single-threaded: call it from the IOLoop only."""

    def __init__(
        self,
        history_size: int,
        *,
        history_max_bytes: int = 64 * 1024 * 1024,
        dedupe_size: int | None = None,
        epoch: str | None = None,
    ) -> None:
        self.epoch = epoch or secrets.token_hex(5)
        self._history: deque[EventRecord] = deque()
        self._history_size = history_size
        self._history_max_bytes = history_max_bytes
        self._history_bytes = 0
        self._last_seq = 0
        self._latest: LRU[str, str] = LRU(dedupe_size or max(history_size, 10000))
        # A user's live connections, as a tuple replaced at each (un)subscribe: a delivery that unsubscribes
        # (a cut-off) never changes the tuple a fan-out iterates, so the fan-out needs no copy per recipient.
        # (Un)subscribing copies the user's few connections: linear in them, where a set was constant.
        self._subscribers: dict[str, tuple[Subscriber, ...]] = {}
        self.published = 0
        self.duplicates_dropped = 0
        self._current = (self.epoch, self._last_seq, self.cursor())  # the cursor of now, made once per event
        # The last scan of `events_after`: (cursor, last seq, epoch, every record after that cursor).
        self._after: tuple[str, int, str, list[EventRecord]] | None = None

    # -- cursors -----------------------------------------------------------------------------------------

    def cursor(self, seq: int | None = None) -> str:
        return f"{self.epoch}.{self._last_seq if seq is None else seq}"

    def current_cursor(self) -> str:
        """`cursor()`, formatted once per event rather than once per call."""
        epoch, seq, text = self._current
        if epoch is not self.epoch or seq != self._last_seq:
            text = self.cursor()
            self._current = (self.epoch, self._last_seq, text)
        return text

    def is_current(self, cursor: str) -> bool:
        """Whether `cursor` is the cursor of now: nothing after it for anyone. A string comparison, for the
        resuming poll that has seen everything (most of them); `events_after` answers the same, at more cost."""
        return cursor == self.current_cursor()

    def parse_cursor(self, cursor: str) -> int | None:
        """The sequence number of a cursor of this epoch, or None for a cursor of another epoch.

        Raises BadRequest for a cursor that is not one, or one ahead of anything issued in this epoch.
        """
        epoch, dot, seq_text = cursor.rpartition(".")
        if (not dot or not epoch or not (seq_text.isascii() and seq_text.isdecimal()) or len(seq_text) > 18
                or not (epoch.isascii() and epoch.isalnum())):
            raise BadRequest("'cursor' is not a cursor this server issued", field="cursor")
        if epoch != self.epoch:
            return None
        seq = int(seq_text)
        if seq > self._last_seq:
            raise BadRequest("'cursor' is ahead of any cursor this server issued", field="cursor")
        return seq

    # -- publishing --------------------------------------------------------------------------------------

    def publish(
        self, event_type: str, data: dict[str, Any], recipients: Iterable[str], *, dialog_id: str | None = None
    ) -> EventRecord | None:
        """Log an event and hand it to every live connection of its recipients.

        A `message:new` for a message already published, or a `message:update` not newer by `updatedAt` than
        the last one published, is dropped (returns None).
        """
        if event_type in (MESSAGE_NEW, MESSAGE_UPDATE) and self._is_duplicate(event_type, data):
            self.duplicates_dropped += 1
            return None
        self._last_seq += 1
        seq = self._last_seq
        payload = jsonutil.dumps_bytes({"type": event_type, "data": data, "cursor": self.cursor(seq)})
        record = EventRecord(seq, event_type, frozenset(recipients), payload, dialog_id)
        self._remember(record)
        self.published += 1
        # The fan-out, inlined: per recipient a lookup and a call, nothing more (it runs a thousand times an event).
        subscribers = self._subscribers
        for user_id in record.recipients:
            group = subscribers.get(user_id)
            if group:
                for subscriber in group:
                    try:
                        subscriber.deliver(record)
                    except Exception:  # one failing connection must never stop delivery to the others
                        log.exception("delivery to a connection of %s failed", user_id)
        return record

    def publish_typing(self, dialog_id: str, user_id: str, started: bool, members: Iterable[str]) -> None:
        """An ephemeral typing event: not logged, no cursor, only to connections that joined the dialog."""
        event_type = TYPING_START if started else TYPING_STOP
        payload = jsonutil.dumps_bytes({"type": event_type, "data": {"dialogId": dialog_id, "userId": user_id}})
        record = EventRecord(-1, event_type, frozenset(members) - {user_id}, payload, dialog_id)
        for member in record.recipients:
            for subscriber in self._subscribers.get(member, ()):
                if subscriber.wants_typing(dialog_id):
                    self._deliver(subscriber, record)

    def _is_duplicate(self, event_type: str, data: dict[str, Any]) -> bool:
        message_id, updated_at = data.get("messageId"), data.get("updatedAt")
        if not isinstance(message_id, str) or not isinstance(updated_at, str):
            return False
        seen = self._latest.get(message_id)
        if seen is not None and (event_type == MESSAGE_NEW or updated_at <= seen):
            return True
        self._latest.put(message_id, updated_at)
        return False

    def _remember(self, record: EventRecord) -> None:
        self._history.append(record)
        self._history_bytes += len(record.payload)
        while len(self._history) > self._history_size or (
            self._history_bytes > self._history_max_bytes and len(self._history) > 1
        ):
            evicted = self._history.popleft()
            self._history_bytes -= len(evicted.payload)

    @staticmethod
    def _deliver(subscriber: Subscriber, record: EventRecord) -> None:
        # One failing connection must never stop delivery to the others.
        try:
            subscriber.deliver(record)
        except Exception:
            log.exception("delivery to a connection of %s failed", subscriber.user_id)

    # -- resume ------------------------------------------------------------------------------------------

    def events_after(self, user_id: str, cursor: str, limit: int | None = None) -> Replay:
        """Every event for `user_id` after `cursor`, in order, or a single reset when that cannot be proven.

        Raises BadRequest for a cursor this server cannot parse or never issued.
        """
        memo = self._after
        if memo is not None and memo[0] == cursor and memo[1] == self._last_seq and memo[2] is self.epoch:
            records = memo[3]  # the polls an event wakes ask with the same cursor: scanned once, filtered each
        else:
            seq = self.parse_cursor(cursor)
            if seq is None:
                return self._reset("restarted")
            first = self._history[0].seq if self._history else self._last_seq + 1
            if seq < first - 1:
                return self._reset("expired")
            if seq == self._last_seq:
                return Replay([], cursor)
            records = []
            for record in reversed(self._history):
                if record.seq <= seq:
                    break
                records.append(record)
            records.reverse()
            self._after = (cursor, self._last_seq, self.epoch, records)
        pending = [record for record in records if user_id in record.recipients]
        if limit is not None and len(pending) > limit:
            return Replay(pending[:limit], self.cursor(pending[limit - 1].seq), more=True)
        return Replay(pending, self.current_cursor())

    def start_new_epoch(self) -> int:
        """Begin a new epoch: the history is forgotten, every cursor issued so far gets `restarted`, and every
        live connection is sent that reset now. For when this process can no longer vouch that its history
        holds every event (its cluster link was down); returns how many connections were reset.
        """
        old = self.epoch
        while self.epoch == old:
            self.epoch = secrets.token_hex(5)
        self._history.clear()
        self._history_bytes = 0
        reset = self._reset("restarted").events[0]
        subscribers = [s for group in self._subscribers.values() for s in group]
        for subscriber in subscribers:
            self._deliver(subscriber, reset)
        return len(subscribers)

    def _reset(self, reason: str) -> Replay:
        now = self.cursor()
        payload = jsonutil.dumps_bytes({"type": RESET, "data": {"reason": reason, "cursor": now}, "cursor": now})
        return Replay([EventRecord(self._last_seq, RESET, frozenset(), payload)], now, reset=reason)

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
        return len(self._history)

    @property
    def history_bytes(self) -> int:
        return self._history_bytes
