"""The three real-time transports of PROTOCOL sections 4 and 5, and the SSE extension.

Each is a thin adapter between a connection and the broadcaster: it authenticates, replays from the client's
cursor, subscribes, and writes the pre-encoded event bytes it is handed. None of them keeps per-client state
beyond its open connection: the cursor is the client's, and any transport resumes from any other's cursor.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
from collections.abc import Callable
from typing import Any

import tornado.httputil
import tornado.iostream
import tornado.web
import tornado.websocket

from chatserver import jsonutil
from chatserver.broadcaster import EventRecord, Replay
from chatserver.errors import BadRequest, ChatError, Forbidden, Unavailable
from chatserver.models import check_id
from handlers.base import ApiHandler, AppContext, JsonErrors
from transport import compat, wsframes
from transport.outbox import Outbox
from transport.pings import HeartbeatSweep, PingSweep
from transport.poll import PollQuery, answer_body, only_lingering

log = logging.getLogger(__name__)

SLOW_CLIENT_CLOSE = 4008
TRY_AGAIN_CLOSE = 1013  # RFC 6455 7.4.1 "Try Again Later": a resume the database could not serve for now
WEBSOCKET_VERSION = "13"
_NONE_JOINED: frozenset[str] = frozenset()
# Seconds a resuming stream may take nothing of its replay before it is cut off as slow (see replay_into).
REPLAY_STALL = 20.0


async def _authenticate_stream(handler: ApiHandler | EventSocket) -> str:
    """The user of a WebSocket or SSE request: a bearer token in the Authorization header, else `?ticket=` (what
    browsers send, PROTOCOL section 12), else `?token=`."""
    scheme, _, token = handler.request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return await handler.service.authenticate(token.strip())
    return await handler.service.authenticate_stream(
        ticket=handler.get_query_argument("ticket", None), token=handler.get_query_argument("token", None)
    )


def _is_websocket_key(key: str) -> bool:
    """Whether a `Sec-WebSocket-Key` is what RFC 6455 4.1 asks of a client: 16 bytes in base64."""
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except ValueError:  # binascii.Error: not base64
        return False


def websocket_frame(payload: bytes) -> bytes:
    """One unfragmented text frame as a server sends it (RFC 6455 5.2): unmasked, so the same for every reader.

    No extension is negotiated on `/ws` (no permessage-deflate), so these bytes are all a reader needs.
    """
    n = len(payload)
    if n < 126:
        return b"\x81" + bytes((n,)) + payload
    if n < 65536:
        return b"\x81\x7e" + struct.pack("!H", n) + payload
    return b"\x81\x7f" + struct.pack("!Q", n) + payload


def event_frame(record: EventRecord) -> bytes:
    """The record's WebSocket frame, built by the first connection that sends it and shared by all the others."""
    frame = record.frame
    if frame is None:
        frame = record.frame = websocket_frame(record.payload)
    return frame


async def replay_into(
    handler: ApiHandler | EventSocket,
    outbox: Outbox,
    cursor: str,
    frame: Callable[[EventRecord], bytes],
    count: Callable[[Replay], None],
    gone: Callable[[], bool],
) -> bool:
    """A streaming transport's resume: the events after `cursor` into `outbox`, paced by what the client takes.

    Returns True where the caller may subscribe at once: the last of memory's answer was queued with no await
    after it, so no event can fall between the replay and the live ones, or come twice. Returns False when the
    client was cut off or went away meanwhile, or when the database could not serve the replay for now (logged;
    the caller ends the stream, and the client resumes from its cursor later): nothing to subscribe.

    A replay is never queued past the outbox's bound: where a frame would take it past, the replay waits for the
    client to take what is queued (at most REPLAY_STALL seconds, else it is cut off as slow). So a client that
    comes back behind by more than its bound is served, as fast as it reads, instead of being cut off at once at
    each try. Memory's last page goes in one step only when it fits; otherwise it is paced like the others and
    the replay goes on from where it ended.
    """
    try:
        while True:
            async for replay, last in handler.service.replay_pages(handler.user_id, cursor):
                count(replay)
                frames = [frame(record) for record in replay.events]
                if last and sum(len(f) for f in frames) <= outbox.room:
                    for one in frames:
                        outbox.push(one, direct=False)
                    return not outbox.closed and not gone()
                for one in frames:
                    if not await outbox.push_paced(one, REPLAY_STALL) or gone():
                        return False
                cursor = replay.cursor
                if last:
                    break
    except Unavailable as exc:
        # The stream's head is out: no error answer can follow it. The stream ends, and the client comes back.
        log.warning("a resume of %s ended: %s", handler.user_id, exc)
        return False


def _count_resets(ctx: AppContext, replay: Replay) -> None:
    if replay.reset is not None:
        ctx.metrics.resets.labels(replay.reset).inc()


class EventSocket(JsonErrors, compat.LeanDetach):
    """`GET /ws?ticket=&cursor=` (or `?token=`): events of every dialog of the user, and join/leave/typing/ping
    frames."""

    transport = "websocket"
    # Ours in slots, as LeanDetach keeps Tornado's late ones: the instance dict keeps only names set in __init__,
    # which stay in the table of names the class's instances share (see compat.LeanDetach).
    __slots__ = ("_cursor", "_delivered", "_outbox", "_pings", "_tls", "ctx", "joined", "service", "user_id")

    def initialize(self, ctx: AppContext, pings: PingSweep) -> None:
        super().initialize(ctx)
        self._pings = pings
        self.user_id = ""
        # The dialogs joined for typing: most connections never join one, so the set is made at the first join.
        self.joined: set[str] | frozenset[str] = _NONE_JOINED
        self._cursor: str | None = None
        self._outbox: Outbox | None = None
        self._tls = False

    async def prepare(self) -> None:
        # Refused before the upgrade: 401 for a bad token or ticket, 400 for a bad cursor (never logged: see redact()).
        self.user_id = await _authenticate_stream(self)
        self._cursor = self.get_query_argument("cursor", None) or None
        if self._cursor is not None:
            await self.service.check_cursor(self._cursor)
        if self.ctx.shutting_down:
            raise tornado.web.HTTPError(503, "the server is shutting down")
        # Tornado's own refusals below (a plain GET, a foreign origin) are bare text: these are JSON, as all errors.
        headers = self.request.headers
        connection = {part.strip().lower() for part in headers.get("Connection", "").split(",")}
        if headers.get("Upgrade", "").lower() != "websocket" or "upgrade" not in connection:
            raise BadRequest("this is a WebSocket endpoint: send 'Upgrade: websocket' and 'Connection: Upgrade'")
        # Tornado's get() checks the origin next (same origin by Origin/Host or Sec-Fetch-Site, else check_origin,
        # which refuses as JSON); a cross-site fetch without an Origin never reaches check_origin: refused here.
        if headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none") and not headers.get("Origin"):
            raise Forbidden("a cross-site WebSocket must say its Origin")
        if "Host" not in headers:  # HTTP/1.0 allows a request without one; RFC 6455 4.1 does not
            raise BadRequest("a WebSocket upgrade needs a 'Host' header")
        if not _is_websocket_key(headers.get("Sec-WebSocket-Key", "")):
            raise BadRequest("'Sec-WebSocket-Key' must be 16 bytes in base64 (RFC 6455 4.1)")
        # The only version WebSocketHandler.get_websocket_protocol speaks; refused here so that the 426 is JSON too.
        if headers.get("Sec-WebSocket-Version") != WEBSOCKET_VERSION:
            raise tornado.web.HTTPError(426, f"this server speaks WebSocket version {WEBSOCKET_VERSION} (RFC 6455)")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if status_code == 426:  # RFC 6455 4.4: name the version this server speaks
            self.set_header("Sec-WebSocket-Version", WEBSOCKET_VERSION)
        super().write_error(status_code, **kwargs)

    def check_origin(self, origin: str) -> bool:
        """Tornado's get() asks this of an origin that is not the request's own: a refusal is a JSON 403."""
        if origin.rstrip("/") in self.ctx.config.origins or super().check_origin(origin):  # or the same host
            return True
        raise Forbidden("a WebSocket from this origin is not allowed here (see trusted_origins)")

    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol | None:
        """Tornado's protocol, reading the client's frames with transport/wsframes.py's RFC 6455 checks."""
        return wsframes.strict(super().get_websocket_protocol())

    def _release_handshake(self) -> None:
        """Let go of what only the HTTP handshake needed and would otherwise be held for the socket's life.

        Nothing reads these after the upgrade: the access line was written at the 101, and what Tornado logs of
        an error in on_message (method, URI, remote IP) stays. The request's headers and arguments, the
        response's headers, the HTTP/1.1 connection objects (the stream is ours now), the template namespace.
        """
        request = self.request
        compat.empty_headers(request.headers)  # in place: Tornado's get(), suspended for the socket's life, holds it
        for arguments in (request.arguments, request.query_arguments, request.body_arguments, request.files):
            arguments.clear()
        request.connection = None
        request.server_connection = None
        compat.drop_response_headers(self)
        self.ui = None  # type: ignore[assignment]  # what _break_cycles does at the close: no templates here

    async def open(self, *args: Any, **kwargs: Any) -> None:
        self._release_handshake()
        broadcaster = self.ctx.broadcaster
        self._delivered = self.ctx.metrics.events_delivered.labels(self.transport)
        self._tls = isinstance(self._stream(), tornado.iostream.SSLIOStream)  # TLS: Tornado's stream writes
        outbox = self._outbox = Outbox(self.ctx.config.client_buffer_limit, self._send, self._cut_off,
                                       write_now=self._write_now, batcher=self.ctx.batcher)
        cursor = self._cursor or broadcaster.cursor()
        ready = {"type": "ready", "data": {"userId": self.user_id, "cursor": cursor}}
        # The ready frame and the replay are queued, counted against the bound (never the fast path).
        outbox.push(websocket_frame(jsonutil.dumps_bytes(ready)), direct=False)
        if self._cursor is not None:
            self.service.acknowledged(self.user_id, self._cursor)  # a resume acknowledges its cursor

            def count(replay: Replay) -> None:
                _count_resets(self.ctx, replay)
                self._delivered.inc(len(replay.events))

            if not await replay_into(self, outbox, self._cursor, event_frame, count,
                                     lambda: self.ws_connection is None):
                if not outbox.closed and self.ws_connection is not None:
                    self.close(TRY_AGAIN_CLOSE, "the database is unavailable: reconnect with your cursor")
                return  # cut off, gone, or the database away while resuming: nothing to subscribe
        broadcaster.subscribe(self)
        self.ctx.connections.add(self)
        self.ctx.metrics.connections.labels(self.transport).inc()
        self._pings.add(self)

    # -- keep-alive: one server-wide sweep (transport/pings.py) instead of Tornado's task per connection ------

    def send_ping(self) -> bool:
        try:
            self.ping()
        except Exception:  # closed or closing: nothing to wait for
            return False
        return True

    def on_pong(self, data: bytes) -> None:
        self._pings.answered(self)

    def ping_timed_out(self) -> None:
        # What Tornado's own ping does when the pong does not come in time.
        self.close(reason="ping timed out")

    # -- from the broadcaster ----------------------------------------------------------------------------

    def deliver(self, record: EventRecord) -> None:
        # Counted as handed to the connection: events only, never ready, pong or error frames.
        outbox = self._outbox
        if outbox is not None:
            outbox.push(record.frame or event_frame(record))
            self._delivered.value += 1

    def wants_typing(self, dialog_id: str) -> bool:
        return dialog_id in self.joined

    def _stream(self) -> tornado.iostream.IOStream:
        connection = self.ws_connection
        if connection is None or connection.is_closing():
            raise tornado.websocket.WebSocketClosedError()
        return connection.stream  # type: ignore[attr-defined,no-any-return]

    def _write_now(self, frame: bytes) -> bool:
        """The Outbox's fast path: the frame straight into the socket when Tornado's stream holds nothing unsent.

        Declines (False) while the stream is still writing, so bytes never overtake each other. What the
        socket does not take at once is left to the stream, which sends it when the socket drains; until then
        the stream is writing and the next frames wait in the Outbox, counted against its bound.

        It runs once per event and connection: the protocol's `client_terminated`/`server_terminated` are what
        `is_closing()` reads but for the stream's closed flag (the send of a closed socket fails instead).
        tests/test_realtime.py's backpressure tests cover both paths.
        """
        connection = self.ws_connection
        if connection is None or connection.client_terminated or connection.server_terminated:
            raise tornado.websocket.WebSocketClosedError()
        stream = connection.stream  # type: ignore[attr-defined]
        if self._tls or stream.writing():
            return False
        try:
            sent = stream.socket.send(frame)
        except BlockingIOError:
            sent = 0
        except (OSError, AttributeError) as exc:  # closed: its socket is gone (None) or shut
            raise tornado.websocket.WebSocketClosedError() from exc
        if sent < len(frame):
            try:
                stream.write(frame[sent:])
            except tornado.iostream.StreamClosedError as exc:
                raise tornado.websocket.WebSocketClosedError() from exc
        return True

    async def _send(self, frame: bytes) -> None:
        try:
            await self._stream().write(frame)
        except tornado.iostream.StreamClosedError as exc:
            raise tornado.websocket.WebSocketClosedError() from exc

    def _cut_off(self) -> None:
        log.info("closing a WebSocket of %s: it stopped reading its events", self.user_id)
        self.ctx.metrics.slow_clients_closed.inc()
        # Forget it now: the close handshake may never finish with a client that does not read (Tornado
        # aborts the connection if the client does not answer the close in time).
        self.ctx.broadcaster.unsubscribe(self)
        self.close(SLOW_CLIENT_CLOSE, "too slow: reconnect with your cursor")

    # -- from the client ---------------------------------------------------------------------------------

    async def on_message(self, message: str | bytes) -> None:
        dialog_id = None
        try:
            frame = jsonutil.loads(message)
            if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
                raise BadRequest("a frame is a JSON object with a string 'type'")
            kind = frame["type"]
            if kind == "ping":
                self._reply({"type": "pong"})
                return
            if kind == "ack":
                cursor = frame.get("cursor")
                if not isinstance(cursor, str):
                    raise BadRequest("'cursor' must be a string", field="cursor")
                await self.service.acknowledge(self.user_id, cursor)  # answered only when refused
                return
            if kind not in ("dialog:join", "dialog:leave", "typing:start", "typing:stop"):
                raise BadRequest(f"unknown frame type {kind!r}")
            dialog_id = frame.get("dialogId")
            if not isinstance(dialog_id, str):
                dialog_id = None
                raise BadRequest("'dialogId' must be a string", field="dialogId")
            check_id(dialog_id, "dialogId", "dlg")
            if kind == "dialog:leave":
                if isinstance(self.joined, set):
                    self.joined.discard(dialog_id)
                self._reply({"type": "dialog:left", "data": {"dialogId": dialog_id}})
            elif kind == "dialog:join":
                await self.service.authorize_dialog(self.user_id, dialog_id)
                if not isinstance(self.joined, set):
                    self.joined = set()
                self.joined.add(dialog_id)
                self._reply({"type": "dialog:joined", "data": {"dialogId": dialog_id}})
            else:
                await self.service.set_typing(self.user_id, dialog_id, kind == "typing:start")
        except ChatError as error:
            data: dict[str, Any] = {"code": error.code, "message": error.message}
            if dialog_id is not None:
                data["dialogId"] = dialog_id
            self._reply({"type": "error", "data": data})

    def _reply(self, frame: dict[str, Any]) -> None:
        if self._outbox is not None:
            self._outbox.push(websocket_frame(jsonutil.dumps_bytes(frame)))

    def on_close(self) -> None:
        self._pings.discard(self)
        self.ctx.broadcaster.unsubscribe(self)
        if self._outbox is not None:
            self._outbox.close()
        if self in self.ctx.connections:
            self.ctx.connections.discard(self)
            self.ctx.metrics.connections.labels(self.transport).dec()

    def shutdown(self) -> None:
        self.close(1001, "server shutting down")


compat.refuse_after_upgrade(EventSocket)


class PollHandler(ApiHandler):
    """`GET /api/poll?cursor=&typing=&timeout=`: answered at once, or parked (transport/poll.py's ParkedPolls) until
    an event, a typing event of a dialog it names, or its timeout."""

    transport = "longpoll"

    def initialize(self, ctx: AppContext) -> None:
        super().initialize(ctx)
        self.typing_dialogs: frozenset[str] = frozenset()
        self.parked_for = 0.0
        self._typing: list[EventRecord] = []
        self._wake: asyncio.Future[None] | None = None
        self._gone = False

    async def get(self) -> None:
        query = PollQuery.read(self.get_query_argument("cursor", None), self.get_query_argument("typing", None),
                               self.get_query_argument("timeout", None))
        for dialog_id in query.typing:
            await self.service.authorize_dialog(self.user_id, dialog_id)
        self.typing_dialogs = query.typing
        if query.cursor is None:
            self._answer([], self.ctx.broadcaster.cursor(), more=False)
            return
        limit = self.ctx.config.poll_max_events
        replay = await self.service.replay(self.user_id, query.cursor, limit)
        self.service.acknowledged(self.user_id, query.cursor)  # the poll's cursor is its acknowledgement
        # Receipts alone park and linger, as a parked poll does that a receipt wakes (transport/poll.py).
        receipts_only = only_lingering(replay)
        if (not replay.events or receipts_only) and query.timeout > 0 and not self.ctx.shutting_down:
            self._wake = asyncio.get_running_loop().create_future()
            self.ctx.polls.park(self, query.timeout, linger=receipts_only)
            await self._wake
            if self._gone:
                return
            # From the poll's own cursor where receipts waited: they go in this answer.
            replay = await self.service.replay(self.user_id, query.cursor if receipts_only else replay.cursor, limit)
        _count_resets(self.ctx, replay)
        self._answer(self._typing + replay.events, replay.cursor, replay.more)

    def compute_etag(self) -> None:
        """None: a poll's answer is never the same resource twice, and never a 304 (it is not cached either)."""
        return None

    # -- as a parked poll (transport/poll.py) ------------------------------------------------------------

    def deliver(self, record: EventRecord) -> None:
        # Logged events are read back from the history on wake-up; typing events exist only here.
        if record.ephemeral:
            self._typing.append(record)
        self.ctx.polls.woken_by(self, record)

    def wants_typing(self, dialog_id: str) -> bool:
        return dialog_id in self.typing_dialogs

    def wake(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def shutdown(self) -> None:
        self.ctx.polls.wake_now(self)

    def on_connection_close(self) -> None:
        # The client went away: drop the waiter now, not at its timeout (and no longer in flight: super()).
        self._gone = True
        self.ctx.polls.unpark(self)
        self.wake()
        super().on_connection_close()

    def _answer(self, events: list[EventRecord], cursor: str, more: bool) -> None:
        self.ctx.metrics.events_delivered.labels(self.transport).inc(len(events))
        self.finish(answer_body(events, cursor, more))


class EventStreamHandler(ApiHandler):
    """`GET /api/events` (extension): Server-Sent Events, the cursor as each event's id."""

    transport = "sse"

    def initialize(self, ctx: AppContext, heartbeats: HeartbeatSweep) -> None:
        super().initialize(ctx)
        self._heartbeats = heartbeats
        self.joined: frozenset[str] = frozenset()
        self._outbox: Outbox | None = None
        self._done: asyncio.Future[None] | None = None
        self._gone = False

    async def authenticate(self) -> str:
        return await _authenticate_stream(self)

    async def get(self) -> None:
        broadcaster = self.ctx.broadcaster
        cursor = self.request.headers.get("Last-Event-ID") or self.get_query_argument("cursor", None) or None
        names = [d.strip() for d in self.get_query_argument("typing", "").split(",") if d.strip()]
        for dialog_id in names[:101]:
            await self.service.authorize_dialog(self.user_id, dialog_id)
        if len(names) > 100:
            raise BadRequest("'typing' names more than 100 dialogs", field="typing")
        self.joined = frozenset(names)
        if cursor is not None:
            await self.service.check_cursor(cursor)
            self.service.acknowledged(self.user_id, cursor)  # a resume acknowledges its cursor
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("X-Accel-Buffering", "no")
        self._done = asyncio.get_running_loop().create_future()
        self._outbox = Outbox(self.ctx.config.client_buffer_limit, self._send, self._cut_off)
        ready = {"type": "ready", "data": {"userId": self.user_id, "cursor": cursor or broadcaster.cursor()}}
        self._outbox.push(b"retry: 1000\n" + self._frame(jsonutil.dumps_bytes(ready), cursor or broadcaster.cursor()))
        if cursor is not None:
            def count(replay: Replay) -> None:
                _count_resets(self.ctx, replay)
                self.ctx.metrics.events_delivered.labels(self.transport).inc(len(replay.events))

            if not await replay_into(self, self._outbox, cursor, self._event_frame, count, lambda: self._gone):
                self._outbox.close()
                if not compat.handler_finished(self) and not self._gone:
                    self.finish()
                return
        broadcaster.subscribe(self)
        self.ctx.connections.add(self)
        self.ctx.metrics.connections.labels(self.transport).inc()
        self._heartbeats.add(self)
        try:
            await self._done
        finally:
            self._heartbeats.discard(self)
            broadcaster.unsubscribe(self)
            self._outbox.close()
            self.ctx.connections.discard(self)
            self.ctx.metrics.connections.labels(self.transport).dec()
        if not compat.handler_finished(self) and not self._gone:
            self.finish()

    @staticmethod
    def _frame(payload: bytes, cursor: str | None) -> bytes:
        head = b"id: " + cursor.encode() + b"\n" if cursor else b""
        return head + b"data: " + payload + b"\n\n"

    def _event_frame(self, record: EventRecord) -> bytes:
        cursor = None if record.ephemeral else self.ctx.broadcaster.cursor(record.position)
        return self._frame(record.payload, cursor)

    def deliver(self, record: EventRecord) -> None:
        if self._outbox is None:
            return
        self._outbox.push(self._event_frame(record))
        self._count_delivery()  # events only: the ready event and heartbeat comments are not counted

    def wants_typing(self, dialog_id: str) -> bool:
        return dialog_id in self.joined

    async def _send(self, data: bytes) -> None:
        self.write(data)
        flushed = self.flush()
        assert self._done is not None  # made before the outbox that calls this
        # Until the bytes are out or the stream has ended: a connection closed under a flush (a cut-off) may
        # never resolve the flush's future (Tornado's HTTP/1.1 connection forgets it at its close), and the
        # outbox's writer must not wait on it for ever.
        await asyncio.wait((flushed, self._done), return_when=asyncio.FIRST_COMPLETED)
        if not flushed.done():
            raise tornado.iostream.StreamClosedError()
        flushed.result()

    def _count_delivery(self) -> None:
        self.ctx.metrics.events_delivered.labels(self.transport).inc()

    def send_heartbeat(self) -> None:
        """From the server's one HeartbeatSweep, every `sse_heartbeat` seconds: a comment line."""
        if self._outbox is not None:
            self._outbox.push(b": keepalive\n\n")

    def _cut_off(self) -> None:
        log.info("closing an SSE stream of %s: it stopped reading its events", self.user_id)
        self.ctx.metrics.slow_clients_closed.inc()
        # As a WebSocket's: forgotten at once, and its connection ended now with what it did not take (nothing
        # else would end it: its answer never finishes leaving). The client resumes from its cursor.
        self.ctx.broadcaster.unsubscribe(self)
        close = getattr(self.request.connection, "close", None)  # Tornado's HTTP1Connection, http1.Exchange
        if close is not None:
            close()
        self.on_connection_close()

    def _stop(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def on_connection_close(self) -> None:
        self._gone = True
        self._stop()
        super().on_connection_close()

    def shutdown(self) -> None:
        self._stop()
