"""RabbitMQ: the Chat3 listener (PROTOCOL section 6) and the cluster bus. The only module that imports pika.

`Chat3Listener` consumes Chat3's events from a durable queue bound to Chat3's topic exchange. Each delivery is
decoded, validated into the domain's models and handed to the one write path (`ChatService.accept_message`,
`accept_update`, `save_dialog`), which stores it idempotently with its event in the durable log; only then is
it acked, on the channel that delivered it. Poison is rejected without requeue (to the dead-letter exchange,
where the queue has one), logged with its reason and counted. A store that is unusable for a while is not
poison: the delivery is retried, then requeued in its place, with a capped backoff, and never dead-lettered.

`ClusterBus` carries the hints between server processes that share one database (`chatserver.cluster`: "the log
moved", typing) over a fanout exchange, each process consuming the others' through an exclusive queue of its
own. The events themselves travel through the log in the store, never over the bus.

Both run on the server's own asyncio loop (pika's `AsyncioConnection`) and never block or stop it: a lost
broker is retried with `loop.call_later` and a capped, jittered, exponential backoff while REST, WebSocket and
long-poll keep serving; `problem()` tells `/readyz` what is down meanwhile. This module never touches Tornado,
a socket of a client, or the broadcaster's publish side.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import pika
import pika.channel
import pika.exceptions
import pika.spec
from pika.adapters.asyncio_connection import AsyncioConnection

from chatserver import eventlog, jsonutil
from chatserver.cluster import Peers
from chatserver.config import Config, ConfigError
from chatserver.errors import BadRequest, ChatError
from chatserver.feed import LogFeed
from chatserver.lru import LRU
from chatserver.metrics import Metrics
from chatserver.models import Dialog, Message
from chatserver.service import ChatService
from chatserver.store import LogEvent, Store, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

HEARTBEAT = 30
BACKOFF_FIRST = 0.5
BACKOFF_CAP = 10.0
# A delivery whose store write fails transiently (the store is not the event's fault) is never dead-lettered:
# it is retried in place a few times, then requeued, after a pause that doubles with each failure of the same
# event up to a cap. So a store outage costs at most one attempt per TRANSIENT_PAUSE_CAP seconds, and loses
# nothing: the event (and every one behind it, in order) waits in the queue until the store is back.
TRANSIENT_PAUSE_FIRST = 0.1
TRANSIENT_PAUSE_CAP = 5.0
IN_PLACE_RETRIES = 3
LOG_PREFIX_BYTES = 60

CONSUMING = ""
CONNECTING = "connecting"
STOPPED = "stopped"

# Errors of the store that say "not now" rather than "never": a locked or busy database, a full disk, I/O, a
# database server that is away.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (StoreUnavailable, OSError)
CHAT3 = "chat3"  # the source of what Chat3 sent, in the log: never published back to it
OUTBOUND_LEASE = 15.0  # seconds a process holds the lease to publish outbound without renewing it
OUTBOUND_IDLE = 1.0  # seconds between looks at the log for outbound events, when nothing wakes the publisher
OUTBOUND_BATCH = 200
CONFIRM_TIMEOUT = 30.0


def connection_parameters(url: str, name: str) -> pika.URLParameters:
    """Parameters for `url` with heartbeats on (unless the URL sets them) and a name the broker's UI shows.

    Raises ConfigError for a URL pika cannot use. The URL holds a password: it is never logged.
    """
    usage = "expected amqp://user:password@host:port/vhost or amqps://..."
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigError(f"setting 'amqp_url' is not an AMQP URL: {usage}")
    try:
        params = pika.URLParameters(url)
    except Exception as exc:
        raise ConfigError(f"setting 'amqp_url' is not a usable AMQP URL ({type(exc).__name__}): {usage}") from None
    query = parse_qs(parts.query)
    if "heartbeat" not in query:
        params.heartbeat = HEARTBEAT
    if "blocked_connection_timeout" not in query:
        params.blocked_connection_timeout = 60
    params.connection_attempts = 1
    params.client_properties = {"connection_name": name, "product": "chatserver"}
    return params


def _describe(reason: BaseException | None) -> str:
    """One short line for a pika error, naming its root cause (pika wraps a refused connect three deep)."""
    for _ in range(5):
        inner = getattr(reason, "exceptions", None)
        if inner:
            reason = inner[-1]
        elif isinstance(getattr(reason, "exception", None), BaseException):
            reason = reason.exception  # type: ignore[union-attr]
        elif reason is not None and reason.args and isinstance(reason.args[0], BaseException):
            reason = reason.args[0]
        else:
            break
    text = f"{type(reason).__name__}: {reason}" if reason is not None else "unknown reason"
    return text if len(text) <= 200 else text[:197] + "..."


class _Link:
    """One AMQP connection with one channel on the running asyncio loop, reopened with backoff when lost.

    Subclasses declare their topology in `_setup(channel)` and call `_ready()` once consuming; `problem()`
    answers "" while ready, else what is wrong.
    """

    def __init__(self, url: str, name: str, *, backoff_first: float = BACKOFF_FIRST, backoff_cap: float = BACKOFF_CAP):
        self.name = name
        self._params = connection_parameters(url, name)
        self._backoff_first = backoff_first
        self._backoff_cap = backoff_cap
        self._attempts = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: AsyncioConnection | None = None
        self._channel: pika.channel.Channel | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._channel_problem: str | None = None
        self._stopping = False
        self._closed = asyncio.Event()
        self._down_since: float | None = None
        self.state = STOPPED

    # -- public ------------------------------------------------------------------------------------------

    def problem(self) -> str:
        return "" if self.state == CONSUMING else self.state

    def start(self) -> None:
        """Connect, from inside the running loop; returns at once (the link comes up in the background)."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._connect()

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop consuming, let in-flight work finish (within `timeout`), and close the connection."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._stopping = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        await self._wind_down(timeout)
        connection = self._connection
        if connection is not None and not connection.is_closed:
            if not connection.is_closing:
                connection.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), max(deadline - loop.time(), 0.1))
        self._set_state(STOPPED)

    # -- subclass hooks ----------------------------------------------------------------------------------

    def _setup(self, channel: pika.channel.Channel) -> None:
        raise NotImplementedError

    def _channel_lost(self, channel: pika.channel.Channel | None) -> None:
        """The channel is gone: forget what was in flight on it (the broker redelivers what was not acked)."""

    async def _wind_down(self, timeout: float) -> None:
        """Before the connection closes at stop: stop consuming and finish what is in flight."""

    def _set_state(self, state: str) -> None:
        self.state = state

    # -- connection --------------------------------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        self._closed.clear()
        self._channel_problem = None
        self._set_state(CONNECTING)
        self._connection = AsyncioConnection(
            self._params,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self._loop,
        )

    def _on_connection_open(self, connection: AsyncioConnection) -> None:
        if self._stopping:
            connection.close()
            return
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_open_error(self, connection: AsyncioConnection, error: BaseException) -> None:
        self._connection_gone(f"cannot connect: {_describe(error)}")

    def _on_connection_closed(self, connection: AsyncioConnection, reason: BaseException) -> None:
        self._channel = None
        self._connection_gone(self._channel_problem or f"connection lost: {_describe(reason)}")

    def _connection_gone(self, why: str) -> None:
        self._connection = None
        self._closed.set()
        if self._stopping:
            return
        self._set_state(f"disconnected: {why}")
        assert self._loop is not None
        if self._down_since is None:
            self._down_since = self._loop.time()
        delay = min(self._backoff_cap, self._backoff_first * 2**self._attempts) * random.uniform(0.5, 1.0)
        self._attempts += 1
        log.warning("%s: %s; reconnecting in %.1fs", self.name, why, delay)
        self._retry = self._loop.call_later(delay, self._connect)

    # -- channel -----------------------------------------------------------------------------------------

    def _on_channel_open(self, channel: pika.channel.Channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_consumer_cancelled)
        self._setup(channel)

    def _on_consumer_cancelled(self, _frame: Any) -> None:
        # The broker cancels a consumer whose queue was deleted: start over, which declares the queue again.
        connection = self._connection
        if self._stopping or connection is None or connection.is_closing or connection.is_closed:
            return
        self._channel_problem = "the broker cancelled the consumer (was the queue deleted?)"
        connection.close()

    def _on_channel_closed(self, channel: pika.channel.Channel, reason: BaseException) -> None:
        self._channel_lost(channel)
        if channel is not self._channel:
            return
        self._channel = None
        connection = self._connection
        if connection is None or connection.is_closing or connection.is_closed:
            return  # the connection's own close callback reconnects, with its reason
        # One channel per connection: without it the connection is of no use. Close it; its close callback
        # reconnects, and reports the channel's reason (a refused declare says more than "closed by us").
        self._channel_problem = f"channel closed: {_describe(reason)}"
        connection.close()

    def _ready(self) -> None:
        self._attempts = 0
        self._set_state(CONSUMING)
        if self._down_since is not None and self._loop is not None:
            log.warning("%s: consuming again after %.1fs", self.name, self._loop.time() - self._down_since)
            self._down_since = None
        else:
            log.info("%s: consuming", self.name)


@attrs.define(slots=True, eq=False)
class _Deliveries:
    """The deliveries of one channel, handled one at a time in the order the broker sent them."""

    channel: pika.channel.Channel
    queue: asyncio.Queue[tuple[pika.spec.Basic.Deliver, bytes] | None] = attrs.Factory(asyncio.Queue)
    task: asyncio.Task[None] | None = None
    closed: bool = False

    def discard(self) -> None:
        """Drop what has not started (the broker redelivers it) and end after the delivery in hand."""
        self.closed = True
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class Chat3Listener(_Link):
    """Consumes Chat3's events (PROTOCOL section 6) into the service; see the module docstring."""

    def __init__(self, service: ChatService, config: Config, metrics: Metrics, **backoff: float) -> None:
        super().__init__(config.amqp_url, "chat3 listener", **backoff)
        self.service = service
        self.config = config
        self.metrics = metrics
        self._deliveries: _Deliveries | None = None
        self._consumer_tag: str | None = None
        self._failures: LRU[bytes, int] = LRU(1000)

    def _set_state(self, state: str) -> None:
        super()._set_state(state)
        self.metrics.chat3_connected.set(1 if state == CONSUMING else 0)

    # -- topology: exchange, queue, binding, qos, consume ------------------------------------------------

    def _setup(self, channel: pika.channel.Channel) -> None:
        channel.exchange_declare(
            exchange=self.config.chat3_exchange,
            exchange_type="topic",
            durable=True,
            callback=functools.partial(self._on_exchange_declared, channel),
        )

    def _on_exchange_declared(self, channel: pika.channel.Channel, _frame: Any) -> None:
        arguments = {}
        if self.config.chat3_dead_letter_exchange:
            arguments["x-dead-letter-exchange"] = self.config.chat3_dead_letter_exchange
        channel.queue_declare(
            queue=self.config.chat3_queue,
            durable=True,
            arguments=arguments or None,
            callback=functools.partial(self._on_queue_declared, channel),
        )

    def _on_queue_declared(self, channel: pika.channel.Channel, _frame: Any) -> None:
        channel.queue_bind(
            queue=self.config.chat3_queue,
            exchange=self.config.chat3_exchange,
            routing_key="#",
            callback=functools.partial(self._on_bound, channel),
        )

    def _on_bound(self, channel: pika.channel.Channel, _frame: Any) -> None:
        channel.basic_qos(prefetch_count=self.config.amqp_prefetch, callback=functools.partial(self._on_qos, channel))

    def _on_qos(self, channel: pika.channel.Channel, _frame: Any) -> None:
        if self._stopping or channel is not self._channel or channel is None:
            return
        previous = self._deliveries
        deliveries = _Deliveries(channel)
        # A new channel's first delivery may be a redelivery of the old channel's delivery in hand: wait for
        # that one to finish, so that the two never race and events keep their order.
        deliveries.task = asyncio.get_running_loop().create_task(
            self._handle_deliveries(deliveries, previous.task if previous else None)
        )
        self._deliveries = deliveries
        self._consumer_tag = channel.basic_consume(self.config.chat3_queue, self._on_message)
        self._ready()

    def _on_message(
        self, channel: pika.channel.Channel, method: pika.spec.Basic.Deliver, _props: Any, body: bytes
    ) -> None:
        # Bounded: the broker sends at most `amqp_prefetch` deliveries before one is acked.
        deliveries = self._deliveries
        if deliveries is not None and deliveries.channel is channel and not deliveries.closed:
            deliveries.queue.put_nowait((method, body))

    def _channel_lost(self, channel: pika.channel.Channel | None) -> None:
        if self._deliveries is not None and self._deliveries.channel is channel:
            self._deliveries.discard()
        self._consumer_tag = None

    async def _wind_down(self, timeout: float) -> None:
        channel, tag = self._channel, self._consumer_tag
        if channel is not None and channel.is_open and tag is not None:
            channel.basic_cancel(tag)
        self._consumer_tag = None
        deliveries = self._deliveries
        if deliveries is not None and deliveries.task is not None:
            deliveries.discard()
            try:
                await asyncio.wait_for(asyncio.shield(deliveries.task), timeout)
            except TimeoutError:
                log.warning(
                    "%s: a delivery was still in hand after %.1fs; the broker will redeliver it", self.name, timeout
                )

    # -- deliveries --------------------------------------------------------------------------------------

    async def _handle_deliveries(self, deliveries: _Deliveries, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            with contextlib.suppress(Exception):
                await previous
        while True:
            item = await deliveries.queue.get()
            if item is None or deliveries.closed:
                return
            method, body = item
            try:
                await self._handle(deliveries, method, body)
            except Exception:
                log.exception("%s: delivery %s could not be handled", self.name, method.delivery_tag)

    async def _handle(self, deliveries: _Deliveries, method: pika.spec.Basic.Deliver, body: bytes) -> None:
        channel, tag = deliveries.channel, method.delivery_tag
        attempt = 0
        while True:
            try:
                outcome = await apply_chat3_event(self.service, body, self.config.max_content_length)
                break
            except TRANSIENT_ERRORS as exc:  # before ChatError: a store that is away is not the event's fault
                failures = self._count_failure(body)
                self.metrics.chat3_retries.inc()
                await asyncio.sleep(min(TRANSIENT_PAUSE_CAP, TRANSIENT_PAUSE_FIRST * 2 ** (failures - 1)))
                if deliveries.closed:
                    return  # the channel is gone: the broker redelivers this one
                attempt += 1
                if attempt > IN_PLACE_RETRIES:
                    self._requeue(deliveries, tag, f"failed {failures} times: {_describe(exc)}")
                    return
            except ChatError as exc:
                self._reject(channel, method, body, exc.message)
                return
            except Exception as exc:
                # A bug, not the event's fault; still, never loop on it: dead-letter it where it can be looked at.
                log.exception("%s: delivery %s failed unexpectedly", self.name, tag)
                self._reject(channel, method, body, f"internal error: {_describe(exc)}")
                return
        self._failures.pop(_digest(body))
        self.metrics.chat3_events.labels(outcome).inc()
        if self._usable(channel):
            channel.basic_ack(tag)
        else:
            log.info("%s: channel closed before delivery %s was acked; the broker redelivers it", self.name, tag)

    def _requeue(self, deliveries: _Deliveries, tag: int, why: str) -> None:
        """Give back this delivery and every one buffered behind it, in one nack: the broker puts them back in
        their places, so they come again in the same order (the store is retried when they do)."""
        last = tag
        while not deliveries.queue.empty():
            item = deliveries.queue.get_nowait()
            if item is not None:
                last = max(last, item[0].delivery_tag)
            else:
                deliveries.queue.put_nowait(None)
                break
        log.warning("%s: store unusable (%s); requeued deliveries %s to %s", self.name, why, tag, last)
        if self._usable(deliveries.channel):
            deliveries.channel.basic_nack(last, multiple=True, requeue=True)

    def _reject(self, channel: pika.channel.Channel, method: pika.spec.Basic.Deliver, body: bytes, why: str) -> None:
        self._failures.pop(_digest(body))
        self.metrics.chat3_events.labels("rejected").inc()
        log.warning(
            "%s: rejected delivery %s (routing key %r): %s; body starts %r",
            self.name,
            method.delivery_tag,
            method.routing_key,
            why,
            body[:LOG_PREFIX_BYTES],
        )
        if self._usable(channel):
            channel.basic_reject(method.delivery_tag, requeue=False)

    def _usable(self, channel: pika.channel.Channel) -> bool:
        # Delivery tags belong to their channel: an ack on another (or a reopened) channel would be an error.
        return channel is self._channel and channel is not None and bool(channel.is_open)

    def _count_failure(self, body: bytes) -> int:
        key = _digest(body)
        failures = (self._failures.get(key) or 0) + 1
        self._failures.put(key, failures)
        return failures


def _digest(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()


async def apply_chat3_event(service: ChatService, body: bytes, max_content_length: int) -> str:
    """Validate one Chat3 event and hand it to the write path; returns the outcome for the metrics.

    Raises a ChatError (BadRequest, NotFound) for poison: not JSON, not an object, an unknown event, a missing or
    wrongly typed field, a message of an unknown dialog, a dialog naming unknown users.
    """
    event = jsonutil.loads_object(body)
    kind, data = event.get("event"), event.get("data")
    if kind == "message.created":
        message = Message.from_chat3(data, max_content_length=max_content_length)
        outcome = await service.accept_message(message, source=CHAT3)
    elif kind == "message.updated":
        outcome = await service.accept_update(Message.from_chat3(data, max_content_length=max_content_length),
                                              source=CHAT3)
    elif kind == "dialog.updated":
        return "accepted" if await service.save_dialog(Dialog.from_chat3(data), source=CHAT3) else "duplicate"
    else:
        raise BadRequest(f"unknown event {kind!r}", field="event")
    return "accepted" if outcome.created else "duplicate"


class ClusterBus(_Link):
    """The hints between server processes over the broker: a fanout exchange, and an exclusive queue per process
    that consumes the others' (see `chatserver.cluster`). This process's `Peers` sends through `send`; what
    arrives goes to `Peers.received`. While the broker is away hints are dropped (logged once, counted): never
    buffered, never blocking; when the link is back, the log's follower reads what it missed from the store.
    """

    def __init__(self, peers: Peers, config: Config, metrics: Metrics, **backoff: float) -> None:
        super().__init__(config.amqp_url, "cluster bus", **backoff)
        self.peers = peers
        self.exchange = config.cluster_exchange
        self.metrics = metrics
        self._blocked = False
        self._warned = False

    def _setup(self, channel: pika.channel.Channel) -> None:
        assert self._connection is not None
        self._connection.add_on_connection_blocked_callback(self._on_blocked)
        self._connection.add_on_connection_unblocked_callback(self._on_unblocked)
        channel.exchange_declare(
            exchange=self.exchange,
            exchange_type="fanout",
            durable=False,
            callback=functools.partial(self._on_exchange_declared, channel),
        )

    def _on_exchange_declared(self, channel: pika.channel.Channel, _frame: Any) -> None:
        channel.queue_declare(
            queue="", exclusive=True, auto_delete=True, callback=functools.partial(self._on_queue_declared, channel)
        )

    def _on_queue_declared(self, channel: pika.channel.Channel, frame: Any) -> None:
        queue = frame.method.queue
        channel.queue_bind(
            queue=queue, exchange=self.exchange, callback=functools.partial(self._on_bound, channel, queue)
        )

    def _on_bound(self, channel: pika.channel.Channel, queue: str, _frame: Any) -> None:
        if self._stopping or channel is not self._channel or channel is None:
            return
        # Hints, not records: auto-ack, and handled at once.
        channel.basic_consume(queue, self._on_message, auto_ack=True)
        recovering = self._down_since is not None
        self._blocked = False
        self._warned = False
        self._ready()
        if recovering:
            # Hints were lost while the link was down: the log holds what they were about.
            self.peers.feed.wake()

    def _on_blocked(self, _connection: Any, _frame: Any) -> None:
        self._blocked = True

    def _on_unblocked(self, _connection: Any, _frame: Any) -> None:
        self._blocked = False

    def send(self, payload: bytes) -> None:
        # Called inside the write path: whatever happens here must never fail the write that was just made.
        channel = self._channel
        if channel is None or not channel.is_open or self._blocked or self.state != CONSUMING:
            self._drop(self.state or "blocked by the broker")
            return
        properties = pika.BasicProperties(content_type="application/json")
        try:
            channel.basic_publish(self.exchange, "", payload, properties)
        except pika.exceptions.AMQPError as exc:
            self._drop(_describe(exc))
            return
        self.metrics.cluster_events.labels("sent").inc()

    def _drop(self, why: str) -> None:
        self.metrics.cluster_events.labels("dropped").inc()
        if not self._warned:  # once per outage, not once per hint
            self._warned = True
            log.warning("%s: not connected (%s); the other processes rely on their poll of the log", self.name, why)

    def _on_message(self, _channel: pika.channel.Channel, _method: Any, _properties: Any, body: bytes) -> None:
        self.metrics.cluster_events.labels("received").inc()
        self.peers.received(body)


class Chat3Outbound(_Link):
    """PROTOCOL section 14: every message created or edited through this server, published to Chat3 from the log.

    A transactional outbox: the events are already in the log (written with the message, in its transaction);
    this reads this server's message events after the position the log says was published, publishes each to
    `chat3_outbound_exchange` as a Chat3 event (persistent, routing key the event name, AMQP `message_id` the
    message's id and version) on a channel in confirm mode, and records the new position once the broker has
    confirmed every one of them. A process that dies between the publish and that record leaves the position
    where it was, and the events are published again: more than once only ever with the same `messageId`, which
    a Chat3 consumer (and our own listener) removes as a duplicate. Events that came from Chat3 are never
    published back. One process publishes at a time, whichever holds the lease in the log (renewed every few
    seconds; a process that dies loses it within OUTBOUND_LEASE).
    """

    def __init__(self, store: Store, feed: LogFeed, config: Config, metrics: Metrics, **backoff: float) -> None:
        super().__init__(config.amqp_url, "chat3 outbound", **backoff)
        self.store = store
        self.exchange = config.chat3_outbound_exchange
        self.metrics = metrics
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._confirms: dict[int, asyncio.Future[None]] = {}
        self._tag = 0
        self._up = asyncio.Event()
        self._more = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        feed.commit_hooks.append(lambda _position: self._more.set())

    def start(self) -> None:
        super().start()
        self._task = asyncio.get_running_loop().create_task(self._publish_loop())

    async def _wind_down(self, timeout: float) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.store.write(eventlog.release_outbound, self.owner, int(time.time() * 1000)), timeout)

    # -- topology ----------------------------------------------------------------------------------------

    def _setup(self, channel: pika.channel.Channel) -> None:
        self._tag = 0
        channel.confirm_delivery(self._on_confirm, callback=functools.partial(self._on_confirm_mode, channel))

    def _on_confirm_mode(self, channel: pika.channel.Channel, _frame: Any) -> None:
        channel.exchange_declare(exchange=self.exchange, exchange_type="topic", durable=True,
                                 callback=functools.partial(self._on_declared, channel))

    def _on_declared(self, channel: pika.channel.Channel, _frame: Any) -> None:
        if self._stopping or channel is not self._channel:
            return
        self._ready()
        self._up.set()

    def _channel_lost(self, channel: pika.channel.Channel | None) -> None:
        self._up.clear()
        confirms, self._confirms = self._confirms, {}
        for future in confirms.values():  # unconfirmed: published again from the log's position
            if not future.done():
                future.set_exception(ConnectionError("the channel closed before the broker confirmed"))

    def _restart_connection(self) -> None:
        connection = self._connection
        if connection is not None and not connection.is_closing and not connection.is_closed:
            self._channel_problem = "confirms did not come in time"
            connection.close()
        self._channel_lost(self._channel)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        ok = isinstance(method, pika.spec.Basic.Ack)
        tags = [t for t in self._confirms if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        for tag in tags:
            future = self._confirms.pop(tag, None)
            if future is not None and not future.done():
                if ok:
                    future.set_result(None)
                else:
                    future.set_exception(ConnectionError("the broker refused the message (nack)"))

    # -- publishing --------------------------------------------------------------------------------------

    async def _publish_loop(self) -> None:
        attempts = 0
        while True:
            try:
                if await self._publish_some():
                    attempts = 0
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempts += 1
                delay = min(self._backoff_cap, self._backoff_first * 2**attempts)
                log.warning("%s: %s; trying again in %.1fs", self.name, _describe(exc), delay)
                if self._confirms:
                    # Confirms that never came: start over on a new channel, from the position the log holds.
                    self._restart_connection()
                await asyncio.sleep(delay)
                continue
            self._more.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._more.wait(), OUTBOUND_IDLE)

    async def _publish_some(self) -> bool:
        """Publish the next batch, if this process holds the lease; True when there may be more at once."""
        await self._up.wait()
        now = int(time.time() * 1000)
        position = await self.store.write(eventlog.claim_outbound, self.owner, now, int(OUTBOUND_LEASE * 1000))
        if position is None:
            return False  # another process publishes
        scanned, events, waiting = await self.store.read(eventlog.outbound_after, position, OUTBOUND_BATCH)
        self.metrics.chat3_outbound_pending.set(waiting)
        if scanned == position:
            return False
        confirms = [self._publish(event) for event in events]
        if confirms:
            await asyncio.wait_for(asyncio.gather(*confirms), CONFIRM_TIMEOUT)
        if not await self.store.write(eventlog.advance_outbound, self.owner, scanned):
            return False  # the lease went to another process meanwhile: it publishes from the recorded position
        self.metrics.chat3_outbound_published.inc(len(events))
        self.metrics.chat3_outbound_pending.set(waiting - len(events))
        return True

    def _publish(self, event: LogEvent) -> asyncio.Future[None]:
        channel = self._channel
        if channel is None or not channel.is_open:
            raise ConnectionError("not connected to the broker")
        name = "message.created" if event.type == "message:new" else "message.updated"
        data = jsonutil.loads_object(event.data)
        body = b'{"event":"' + name.encode() + b'","data":' + event.data.encode() + b"}"
        properties = pika.BasicProperties(
            delivery_mode=2, content_type="application/json", app_id="chatserver",
            message_id=f"{data.get('messageId')}@{data.get('updatedAt')}",
        )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tag += 1
        self._confirms[self._tag] = future
        channel.basic_publish(self.exchange, name, body, properties)
        return future


@attrs.define(slots=True, eq=False)
class Amqp:
    """What `start_amqp` started: the listener, and the cluster bus where cluster mode is on."""

    listener: Chat3Listener
    bus: ClusterBus | None
    peers: Peers
    outbound: Chat3Outbound | None = None

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop consuming Chat3 events (finishing and acking those in hand), then leave the cluster; all of it
        within about `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self.listener.stop(timeout * 0.6)
        if self.outbound is not None:
            await self.outbound.stop(max(deadline - loop.time(), 0.1) / 2)
        if self.bus is not None:
            if self.bus.send in self.peers.channels:
                self.peers.channels.remove(self.bus.send)
            await self.bus.stop(max(deadline - loop.time(), 0.1))


async def prepare_outbound(store: Store, config: Config) -> None:
    """Where outbound is on, fix where it starts in the log before the server takes its first message."""
    if config.amqp_url and config.chat3_outbound_exchange:
        try:
            await store.write(eventlog.open_outbound, int(time.time() * 1000))
        except StoreError as exc:  # the first claim starts it, at the head it then finds
            log.warning("chat3 outbound: could not mark where it starts: %s", exc)


def start_amqp(
    service: ChatService,
    peers: Peers,
    config: Config,
    metrics: Metrics,
    readiness: MutableMapping[str, Callable[[], str]],
    **backoff: float,
) -> Amqp | None:
    """Start the Chat3 listener (and the cluster bus) inside the running loop; None when `amqp_url` is empty.

    Registers each in `readiness` ("broker", "cluster") so that `/readyz` names what is down. Raises
    ConfigError for an unusable URL, or cluster mode without a broker.
    """
    if log.getEffectiveLevel() > logging.DEBUG:
        # pika reports one refused connect as seven ERROR lines; each link logs one line with the root cause.
        logging.getLogger("pika").setLevel(logging.CRITICAL)
    if not config.amqp_url:
        for setting in ("cluster_exchange", "chat3_outbound_exchange"):
            if getattr(config, setting):
                raise ConfigError(f"setting '{setting}' needs 'amqp_url' (it runs on the broker)")
        return None
    listener = Chat3Listener(service, config, metrics, **backoff)
    outbound = None
    if config.chat3_outbound_exchange:
        outbound = Chat3Outbound(service.store, service.feed, config, metrics, **backoff)
        readiness["chat3_outbound"] = outbound.problem
        outbound.start()
    bus = None
    if config.cluster_exchange:
        bus = ClusterBus(peers, config, metrics, **backoff)
        peers.channels.append(bus.send)
        peers.feed.commit_hooks.append(peers.send_head)
        readiness["cluster"] = bus.problem
        bus.start()
    readiness["broker"] = listener.problem
    listener.start()
    return Amqp(listener, bus, peers, outbound)
