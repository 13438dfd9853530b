"""The long-poll contract of PROTOCOL section 5, one for both of its paths: transport/fastpoll.py's lean poll and
handlers/realtime.py's PollHandler (the only path with the "tornado" http_engine).

- `PollQuery.read`: the reading of a poll's query (`cursor`, `typing`, `timeout`), with the 400 for what is wrong.
- `answer_body` and `Answers`: the answer's body (the events spliced in as the bytes they were encoded to once),
  and for the lean path the whole HTTP/1.1 answer around it, with the headers every JSON answer carries.
- `ParkedPolls`: the one registry of parked polls. A parked poll is a broadcaster subscriber, counted in
  `chatserver_connections{transport="longpoll"}`, held in the context's connections (shutdown wakes it); the polls
  an event wakes are answered together on the next turn of the loop, after the WebSocket frames of the same
  events; each poll's timeout is kept by `Deadlines`, one timer per distinct timeout.
- Receipts linger: a parked poll woken by `dialog:receipt` events alone, or a poll that finds only those waiting,
  is answered up to `config.poll_receipt_linger` seconds later (never past its own timeout), and at once when any
  other event comes meanwhile: receipts ride along with the next message's answer instead of costing every
  member's poller an answer and a new poll of its own (PROTOCOL section 11 coalesces them to one a second per
  dialog; a long-poller may see one up to that much later). WebSocket and SSE connections get them as they come.

A parked poll is any object with `deliver`, `wants_typing`, `parked_for` (its timeout while parked, else 0.0) and
`wake()` (answer now: an event came, its timeout passed, or the server shuts down).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from collections import OrderedDict
from typing import Any, Protocol

import attrs
import tornado.httputil

from chatserver.broadcaster import Broadcaster, EventRecord, Replay, Subscriber
from chatserver.config import Config
from chatserver.errors import BadRequest
from chatserver.metrics import Metrics
from chatserver.queries import DIALOG_RECEIPT
from chatserver.service import ChatService
from transport.outbox import TurnBatcher

log = logging.getLogger(__name__)

POLL_DEFAULT_TIMEOUT = 25.0
POLL_MAX_TIMEOUT = 60.0
MAX_TYPING_DIALOGS = 100

# What every JSON answer carries besides its length and date (handlers/base.py's JsonHandler sets the same).
ANSWER_HEADERS = (
    ("Content-Type", "application/json; charset=utf-8"),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
)
_ANSWER_HEAD = (
    b"HTTP/1.1 200 OK\r\n" + b"".join(f"{name}: {value}\r\n".encode() for name, value in ANSWER_HEADERS)
    + b"Date: %s\r\nContent-Length: %d\r\n%s\r\n"
)


class PollContext(Protocol):
    """What a poll needs of the application's context (handlers/base.py's AppContext is one)."""

    service: ChatService
    broadcaster: Broadcaster
    config: Config
    metrics: Metrics
    connections: set[Any]
    requests: weakref.WeakSet[Any]
    batcher: TurnBatcher
    background: set[Any]
    shutting_down: bool
    polls: ParkedPolls


class Parked(Subscriber, Protocol):
    """A poll, as the registry sees it: a broadcaster subscriber while it is parked."""

    parked_for: float

    def wake(self) -> None: ...


@attrs.frozen
class PollQuery:
    cursor: str | None  # None: the handshake, answered at once with the current cursor
    typing: frozenset[str]  # the dialogs whose typing events wake this poll
    timeout: float

    @classmethod
    def read(cls, cursor: str | None, typing: str | None, timeout: str | None) -> PollQuery:
        """The query as RequestHandler.get_query_argument gives its values (the last of each, stripped)."""
        seconds = _timeout(timeout)
        names = [name.strip() for name in (typing or "").split(",") if name.strip()]
        if len(names) > MAX_TYPING_DIALOGS:
            raise BadRequest(f"'typing' names more than {MAX_TYPING_DIALOGS} dialogs", field="typing")
        return cls(cursor or None, frozenset(names), seconds)


def _timeout(raw: str | None) -> float:
    if raw is None or raw == "":
        return POLL_DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest("'timeout' must be a number of seconds", field="timeout") from None
    if value != value:  # NaN
        raise BadRequest("'timeout' must be a number of seconds", field="timeout")
    return min(max(value, 0.0), POLL_MAX_TIMEOUT)


def lingers(record: EventRecord) -> bool:
    """Whether this event alone lets a parked poll linger (`poll_receipt_linger`) rather than answer at once."""
    return record.type == DIALOG_RECEIPT


def only_lingering(replay: Replay) -> bool:
    """Whether a poll that finds this replay waiting may park and linger rather than answer at once: receipts
    alone (and nothing more beyond them), as for a parked poll a receipt wakes."""
    return bool(replay.events) and not replay.more and all(lingers(record) for record in replay.events)


def answer_body(events: list[EventRecord], cursor: str, more: bool) -> bytes:
    """A poll's answer. The events are spliced in as the bytes they were encoded to once: no re-encoding. The
    cursor is one this server issued (letters, digits, a dot): nothing in it to escape."""
    tail = b',"more":true' if more else b""
    events_json = b",".join(record.payload for record in events)
    return b"".join((b'{"success":true,"data":{"events":[', events_json, b'],"cursor":"', cursor.encode(),
                     b'"', tail, b"}}"))


@functools.lru_cache(maxsize=4)
def _http_date(second: int) -> bytes:
    """The Date header of a second, formatted once (the format has no finer part)."""
    return tornado.httputil.format_timestamp(second).encode()


class Answers:
    """Whole HTTP/1.1 answers to polls (status line, ANSWER_HEADERS, Date, length, body). The polls an event wakes
    get the same events after the same cursor, so the answer made for the first is given to the others while it
    still applies (same events, cursor and second of the Date): one answer built per event, not one per poll."""

    def __init__(self) -> None:
        self._memo: tuple[int, str, bool, list[EventRecord], bytes] | None = None

    def whole(self, replay: Replay, *, close: bool = False) -> bytes:
        """The answer; with `close`, its head says `Connection: close` (never kept: such answers are rare)."""
        second = int(time.time())
        memo = self._memo
        if not close and memo is not None and memo[0] == second and memo[1] == replay.cursor and (
                memo[2] == replay.more and memo[3] == replay.events):
            return memo[4]
        body = answer_body(replay.events, replay.cursor, replay.more)
        answer = _ANSWER_HEAD % (_http_date(second), len(body), b"Connection: close\r\n" if close else b"") + body
        if not close:
            self._memo = (second, replay.cursor, replay.more, replay.events, answer)
        return answer


class ParkedPolls:
    """Every parked poll of one server, of both paths."""

    def __init__(self, broadcaster: Broadcaster, metrics: Metrics, connections: set[Any], batcher: TurnBatcher,
                 *, linger: float = 0.0) -> None:
        self._broadcaster = broadcaster
        self._metrics = metrics
        self._connections = connections
        self._batcher = batcher
        self._waking: dict[Parked, None] = {}  # in the order they were woken
        self.deadlines = Deadlines(self._expired)
        self._linger = linger  # seconds; 0: receipts wake at once
        # Polls woken by receipts alone, answered together when the one timer (of the first of them) fires.
        self._lingering: dict[Parked, None] = {}
        self._linger_timer: asyncio.TimerHandle | None = None

    def park(self, poll: Parked, timeout: float, *, linger: bool = False) -> None:
        """Wait for an event for the poll's user (or a typing event it wants), at most `timeout` seconds; with
        `linger` (receipts wait already), at most the linger."""
        poll.parked_for = timeout
        self._broadcaster.subscribe(poll)
        self._connections.add(poll)
        self._metrics.parked_polls += 1
        self.deadlines.add(poll, timeout)
        if linger:
            self.linger(poll)

    def woken_by(self, poll: Parked, record: EventRecord) -> None:
        """An event for a parked poll: a receipt lets it linger, any other wakes it on the next turn."""
        if lingers(record):
            self.linger(poll)
        else:
            self.wake_soon(poll)

    def linger(self, poll: Parked) -> None:
        """Wake the poll within the linger, unless another event wakes it before."""
        if not self._linger:
            self.wake_soon(poll)
            return
        if not poll.parked_for or poll in self._lingering:
            return
        self._lingering[poll] = None
        if self._linger_timer is None:
            self._linger_timer = asyncio.get_running_loop().call_later(self._linger, self._linger_over)

    def _linger_over(self) -> None:
        self._linger_timer = None
        polls, self._lingering = self._lingering, {}
        for poll in polls:
            self.wake_soon(poll)

    def unpark(self, poll: Parked) -> bool:
        """No longer parked (answered, or its client went away); False if it was not parked."""
        timeout = poll.parked_for
        if not timeout:
            return False
        poll.parked_for = 0.0
        self.deadlines.discard(poll, timeout)
        self._lingering.pop(poll, None)
        self._broadcaster.unsubscribe(poll)
        self._connections.discard(poll)
        self._metrics.parked_polls -= 1
        return True

    def wake_soon(self, poll: Parked) -> None:
        """Wake the poll on the next turn of the loop, with every other poll woken meanwhile (one callback for all
        the polls an event wakes, and events published together leave together)."""
        if not poll.parked_for or poll in self._waking:
            return
        if not self._waking:
            asyncio.get_running_loop().call_soon(self._wake_all)
        self._waking[poll] = None

    def wake_now(self, poll: Parked) -> None:
        if self.unpark(poll):
            poll.wake()

    def _wake_all(self) -> None:
        # The WebSocket frames of the same events first (outbox.TurnBatcher): a frame costs a few microseconds,
        # a poll's answer and its next request tens, so a thousand polls do not hold up a thousand frames.
        self._batcher.flush()
        polls, self._waking = self._waking, {}
        for poll in polls:
            try:
                self.wake_now(poll)
            except Exception:  # one failing answer must not keep the others waiting
                log.exception("answering a woken poll failed")

    def _expired(self, poll: Parked) -> None:
        self.wake_now(poll)


class Deadlines:
    """The parked polls' timeouts: one loop timer per distinct timeout, not a TimerHandle (and a context copy, a
    heap push and a cancel) per poll. Nearly every poll asks the default timeout, and polls with the same timeout
    expire in the order they parked, so each timeout keeps its polls in that order and one timer at the first
    one's deadline: each poll still times out at exactly its own deadline.
    """

    def __init__(self, expired: Any) -> None:
        self._expired = expired
        self._queues: dict[float, OrderedDict[Parked, float]] = {}
        self._timers: dict[float, asyncio.TimerHandle] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # looked up once: a getpid() call each on Python 3.11

    def add(self, poll: Parked, timeout: float) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = OrderedDict()
        queue[poll] = deadline
        if timeout not in self._timers:
            self._timers[timeout] = loop.call_at(deadline, self._expire, timeout)

    def discard(self, poll: Parked, timeout: float) -> None:
        queue = self._queues.get(timeout)
        if queue is not None:
            queue.pop(poll, None)  # the timer stays; it finds the queue shorter (or empty) when it fires

    def _expire(self, timeout: float) -> None:
        del self._timers[timeout]
        queue = self._queues.get(timeout)
        loop = self._loop
        assert loop is not None
        now = loop.time()
        while queue:
            poll, deadline = next(iter(queue.items()))
            if deadline > now:
                self._timers[timeout] = loop.call_at(deadline, self._expire, timeout)
                return
            del queue[poll]
            try:
                self._expired(poll)
            except Exception:  # one failing answer must not stop the others' timeouts
                log.exception("answering a timed-out poll failed")
        self._queues.pop(timeout, None)
