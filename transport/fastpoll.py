"""The lean path of `GET /api/poll` (PROTOCOL section 5): a parked long-poll without a RequestHandler.

A poll is the server's most frequent request: with a thousand pollers, every event is a thousand answers and a
thousand new polls. Tornado's `RequestHandler` costs a task, a routing pass, an output transform chain and
its own bookkeeping per poll, several times what the poll itself needs. So the one common shape of the
request (a bearer token in the header, a cursor this server issued, no `typing`, no body, no conditional
header) is answered here, straight on Tornado's HTTP/1.1 connection; every other poll (the handshake without a
cursor, typing dialogs, any error: bad token, bad cursor, bad timeout) goes to `realtime.PollHandler` through
the application, which answers it exactly as before. The answers here are the same: the same body (spliced
from the events' pre-encoded bytes), the same headers, the same access line, metrics and shutdown behaviour.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections import OrderedDict
from typing import Any

import tornado.escape
import tornado.httputil
import tornado.web

from chatserver.broadcaster import EventRecord, Replay
from chatserver.errors import ChatError
from transport import compat, http1
from transport.access import log_access
from transport.poll import POLL_DEFAULT_TIMEOUT, POLL_MAX_TIMEOUT, PollContext, poll_body

log = logging.getLogger(__name__)

_PATH = "/api/poll"
# A host name or IPv4 address and a port: a subset of the Host values HTTPServerRequest accepts (no comma).
_PLAIN_HOST = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]{1,5})?")
_MAX_FIELDS = 100  # far below HTTPServerRequest's 1,000 query fields
_OK = tornado.httputil.ResponseStartLine("", 200, "OK")
_SERVER = "TornadoServer/" + tornado.version


@functools.lru_cache(maxsize=4)
def _http_date(second: int) -> str:
    """The Date header of a second, formatted once (the format has no finer part)."""
    return tornado.httputil.format_timestamp(second)


# The answer's head as RequestHandler writes it, for transport/http1.py's connections: its defaults, JsonHandler's,
# then finish()'s length, in that order (only the date and the length vary; a poll's answer has no Etag).
_ANSWER_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: " + _SERVER.encode() + b"\r\nContent-Type: application/json; charset=utf-8\r\n"
    b"Date: %s\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nContent-Length: %d\r\n\r\n"
)


class LeanRouter(tornado.httputil.HTTPServerConnectionDelegate):
    """The HTTP server's delegate: common polls to `LeanPoll`, everything else to the application as before."""

    def __init__(self, app: tornado.web.Application, ctx: PollContext) -> None:
        self.app = app
        self.ctx = ctx
        self.latency = ctx.metrics.request_latency.labels("GET", "PollHandler")
        self.delivered = ctx.metrics.events_delivered.labels(LeanPoll.transport)  # looked up once, not per answer
        self._waking: list[LeanPoll] = []
        self.deadlines = Deadlines()
        self._answer_memo: tuple[int, str, bool, list[EventRecord], bytes] | None = None

    def start_request(
        self, server_conn: object, request_conn: tornado.httputil.HTTPConnection
    ) -> tornado.httputil.HTTPMessageDelegate:
        return _Dispatch(self, server_conn, request_conn)

    def answer_bytes(self, replay: Replay) -> bytes:
        """A poll's whole answer, head and body. The polls an event wakes get the same events after the same
        cursor, so the answer made for the first is kept and given to the others while it still applies (same
        events, cursor and second of the Date): one answer built per event, not one per poll."""
        second = int(time.time())
        memo = self._answer_memo
        if memo is not None and memo[0] == second and memo[1] == replay.cursor and memo[2] == replay.more and (
                memo[3] == replay.events):
            return memo[4]
        body = poll_body(replay.events, replay.cursor, replay.more)
        answer = _ANSWER_HEAD % (_http_date(second).encode(), len(body)) + body
        self._answer_memo = (second, replay.cursor, replay.more, replay.events, answer)
        return answer

    def on_close(self, server_conn: object) -> None:
        self.app.on_close(server_conn)

    def wake(self, poll: LeanPoll) -> None:
        """Answer this parked poll on the next turn of the loop, with every other poll woken meanwhile (one
        callback for all the polls an event wakes, not one each)."""
        if not self._waking:
            loop = self.deadlines.loop
            assert loop is not None  # set when the first poll parked
            loop.call_soon(self._wake_all)
        self._waking.append(poll)

    def _wake_all(self) -> None:
        # The WebSocket frames of the same events first (outbox.TurnBatcher): a frame costs a few microseconds,
        # a poll's answer and its next request tens, so a thousand polls do not hold up a thousand frames.
        self.ctx.batcher.flush()
        polls, self._waking = self._waking, []
        for poll in polls:
            try:
                poll._wake_now()
            except Exception:  # one failing answer must not keep the others waiting
                log.exception("answering a woken poll failed")


class _Dispatch(tornado.httputil.HTTPMessageDelegate):
    """Decides at the request's headers who answers it, then forwards everything to that one."""

    def __init__(self, router: LeanRouter, server_conn: object, request_conn: tornado.httputil.HTTPConnection):
        self.router = router
        self.server_conn = server_conn
        self.request_conn = request_conn
        self.target: tornado.httputil.HTTPMessageDelegate | None = None

    def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: tornado.httputil.HTTPHeaders,
    ) -> Any:
        assert isinstance(start_line, tornado.httputil.RequestStartLine)
        if start_line.method == "GET" and start_line.path.startswith(_PATH + "?"):
            poll = LeanPoll.accept(self.router, self.server_conn, self.request_conn, start_line, headers)
            if poll is not None:
                self.target = poll
                return None
        self.target = self.router.app.start_request(self.server_conn, self.request_conn)
        return self.target.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        assert self.target is not None
        return self.target.data_received(chunk)

    def finish(self) -> None:
        assert self.target is not None
        self.target.finish()

    def on_connection_close(self) -> None:
        if self.target is not None:
            self.target.on_connection_close()


def _timeout(raw: str | None) -> float | None:
    """PollHandler's reading of `timeout`, or None where PollHandler would answer 400."""
    if raw is None or raw == "":
        return POLL_DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        return None
    if value != value:  # NaN
        return None
    return min(max(value, 0.0), POLL_MAX_TIMEOUT)


def _query_arguments(query: str) -> dict[str, list[bytes]]:
    """`tornado.escape.parse_qs_bytes(query, keep_blank_values=True)`, split by hand where nothing is escaped."""
    if "%" in query or "+" in query:
        return tornado.escape.parse_qs_bytes(query, keep_blank_values=True)
    arguments: dict[str, list[bytes]] = {}
    for field in query.split("&"):
        if field:
            name, _, value = field.partition("=")
            arguments.setdefault(name, []).append(value.encode("latin1"))
    return arguments


def _poll_arguments(query: str) -> tuple[str | None, str | None, str | None]:
    """The last `cursor`, `typing` and `timeout` of a query, stripped, as RequestHandler.get_query_argument reads
    them; a plain ASCII query (nothing escaped) is split here, anything else by Tornado's parser."""
    if "%" in query or "+" in query or not query.isascii():
        arguments = _query_arguments(query)
        return _last(arguments, "cursor"), _last(arguments, "typing"), _last(arguments, "timeout")
    found: dict[str, str] = {}
    for field in query.split("&"):
        name, _, value = field.partition("=")
        found[name] = value  # the last one wins
    cursor, typing, timeout = found.get("cursor"), found.get("typing"), found.get("timeout")
    return (None if cursor is None else cursor.strip(), None if typing is None else typing.strip(),
            None if timeout is None else timeout.strip())


def _last(arguments: dict[str, list[bytes]], name: str) -> str | None:
    values = arguments.get(name)
    if not values:
        return None
    try:
        return values[-1].decode("utf-8").strip()
    except UnicodeDecodeError:
        return "\ufffd"  # PollHandler's 400 for bad bytes: never eligible below


class Deadlines:
    """The parked polls' timeouts: one loop timer per distinct timeout, not a TimerHandle (and a context copy,
    about 400 bytes and a heap push and cancel) per poll. Nearly every poll asks the default timeout, and polls
    with the same timeout expire in the order they parked, so each timeout keeps its polls in that order and one
    timer at the first one's deadline: each poll still times out at exactly its own deadline.
    """

    def __init__(self) -> None:
        self._queues: dict[float, OrderedDict[LeanPoll, float]] = {}
        self._timers: dict[float, asyncio.TimerHandle] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # looked up once: a getpid() call each on Python 3.11

    def add(self, poll: LeanPoll, timeout: float) -> None:
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = OrderedDict()
        queue[poll] = deadline
        if timeout not in self._timers:
            self._timers[timeout] = loop.call_at(deadline, self._expire, timeout)

    def discard(self, poll: LeanPoll, timeout: float) -> None:
        queue = self._queues.get(timeout)
        if queue is not None:
            queue.pop(poll, None)  # the timer stays; it finds the queue shorter (or empty) when it fires

    def _expire(self, timeout: float) -> None:
        del self._timers[timeout]
        queue = self._queues.get(timeout)
        loop = self.loop
        assert loop is not None
        now = loop.time()
        while queue:
            poll, deadline = next(iter(queue.items()))
            if deadline > now:
                self._timers[timeout] = loop.call_at(deadline, self._expire, timeout)
                return
            del queue[poll]
            try:
                poll.expired()
            except Exception:  # one failing answer must not stop the others' timeouts
                log.exception("answering a timed-out poll failed")
        self._queues.pop(timeout, None)


class LeanPoll(tornado.httputil.HTTPMessageDelegate):
    """One poll with a cursor: answered at once when events wait, else parked as a broadcaster subscriber."""

    transport = "longpoll"
    # Slots: one of these is held per parked poll. Of the request, only what the answer and its access line need.
    __slots__ = (
        "_done",
        "_parked",
        "_started",
        "_waking",
        "connection",
        "ctx",
        "cursor",
        "method",
        "remote_ip",
        "replay",
        "router",
        "timeout",
        "uri",
        "user_id",
    )

    @classmethod
    def accept(
        cls,
        router: LeanRouter,
        server_conn: object,
        request_conn: tornado.httputil.HTTPConnection,
        start_line: tornado.httputil.RequestStartLine,
        headers: tornado.httputil.HTTPHeaders,
    ) -> LeanPoll | None:
        """The poll, if it is one this path answers exactly as PollHandler would; else None (no side effect)."""
        # HTTPHeaders' own map (normalized name -> values): a repeated Authorization or Host is left to
        # PollHandler, which refuses it as it always did (joined, neither is a valid token or host).
        fields = compat.header_fields(headers)
        length = fields.get("Content-Length")
        if (length is not None and length != ["0"]) or "Transfer-Encoding" in fields or "If-None-Match" in fields:
            return None
        authorization, host = fields.get("Authorization"), fields.get("Host")
        if authorization is None or host is None or len(authorization) != 1 or len(host) != 1:
            return None
        scheme, _, token = authorization[0].partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        # What HTTPServerRequest would parse, without building one (its construction was ~7% of a poll). It refuses
        # (400) a missing, malformed or repeated Host and a query of over 1,000 fields: anything but a plain host
        # and a short query is left to the application, which answers it as it always did.
        query = start_line.path.partition("?")[2]
        if not _PLAIN_HOST.fullmatch(host[0]) or query.count("&") >= _MAX_FIELDS:
            return None
        cursor, typing, raw_timeout = _poll_arguments(query)
        timeout = _timeout(raw_timeout)
        if not cursor or timeout is None or (typing is not None and typing.replace(",", "").strip()):
            return None
        ctx = router.ctx
        broadcaster = ctx.broadcaster
        try:
            user_id = ctx.service.authenticate_known(token)  # a user not seen yet: PollHandler looks
            # A poll that has seen everything (the usual one) parks without a replay to build.
            if broadcaster.is_current(cursor):
                replay = None
            else:
                replay = broadcaster.events_after(user_id, cursor, ctx.config.poll_max_events)
                if replay is None:
                    return None  # older than memory holds, or ahead of it: PollHandler reads the store
        except ChatError:
            return None
        ctx.service.acknowledged(user_id, cursor)  # the poll's cursor is its acknowledgement, as PollHandler's
        # HTTPServerRequest's remote_ip: the connection's (X-Real-Ip/X-Forwarded-For applied there when xheaders).
        remote_ip = getattr(getattr(request_conn, "context", None), "remote_ip", None)
        return cls(router, request_conn, start_line.path, remote_ip, user_id, cursor, timeout, replay)

    def __init__(
        self,
        router: LeanRouter,
        connection: tornado.httputil.HTTPConnection,
        uri: str,
        remote_ip: str | None,
        user_id: str,
        cursor: str,
        timeout: float,
        replay: Replay | None,
    ) -> None:
        self.router = router
        self.ctx = router.ctx
        # Of the request, what the answer and its access line need (log_access reads these and request_time()).
        self.connection = connection
        self.method = "GET"
        self.uri = uri
        self.remote_ip = remote_ip
        self.user_id = user_id
        self.cursor = cursor
        self.timeout = timeout
        self.replay: Replay | None = replay
        self._started = time.time()
        self._parked = False
        self._waking = False
        self._done = False
        self.ctx.requests.add(self)

    # -- the request ---------------------------------------------------------------------------------------

    def headers_received(self, start_line: Any, headers: Any) -> None:
        return None

    def data_received(self, chunk: bytes) -> None:
        return None

    def finish(self) -> None:
        # The request is read: answer now, or park until an event for the caller or the timeout.
        replay, self.replay = self.replay, None
        broadcaster = self.ctx.broadcaster
        answer_now = self.timeout <= 0 or self.ctx.shutting_down
        # No replay: the cursor was current at the headers. Made now if events came since, or to answer at once.
        if replay is None and (answer_now or not broadcaster.is_current(self.cursor)):
            replay = self._replay()
            if replay is None:
                return  # answered from the store
        if replay is not None and (replay.events or answer_now):
            self._answer(replay)
            return
        self.connection.set_close_callback(self._gone)  # type: ignore[union-attr]
        self._parked = True
        broadcaster.subscribe(self)
        self.ctx.connections.add(self)
        self.ctx.metrics.parked_polls += 1  # chatserver_polls_waiting and chatserver_connections{longpoll}
        self.router.deadlines.add(self, self.timeout)

    def on_connection_close(self) -> None:
        self._gone()

    # -- as a broadcaster subscriber -------------------------------------------------------------------

    def deliver(self, record: EventRecord) -> None:
        # Woken on the next turn of the loop, as PollHandler is: events published together leave together.
        if self._parked and not self._waking:
            self._waking = True
            self.router.wake(self)

    def wants_typing(self, dialog_id: str) -> bool:
        return False

    def shutdown(self) -> None:
        self._wake_now()

    def expired(self) -> None:
        """Its timeout passed (Deadlines): answered with what there is, as before."""
        self._wake_now()

    def request_time(self) -> float:
        """For the access line and the latency metric, as HTTPServerRequest.request_time() (never finished)."""
        return time.time() - self._started

    # -- answering -------------------------------------------------------------------------------------

    def _unpark(self) -> None:
        if not self._parked:
            return
        self._parked = False
        self.router.deadlines.discard(self, self.timeout)
        self.ctx.broadcaster.unsubscribe(self)
        self.ctx.connections.discard(self)
        self.ctx.metrics.parked_polls -= 1

    def _wake_now(self) -> None:
        if not self._parked:
            return
        self._unpark()
        replay = self._replay()
        if replay is not None:
            self._answer(replay)

    def _replay(self) -> Replay | None:
        """The replay from memory; None where memory no longer holds the cursor (its events were evicted while
        the poll waited): then it is read from the store and answered when it comes."""
        replay = self.ctx.broadcaster.events_after(self.user_id, self.cursor, self.ctx.config.poll_max_events)
        if replay is None:
            task = asyncio.get_running_loop().create_task(self._replay_from_store())
            self.ctx.background.add(task)
            task.add_done_callback(self.ctx.background.discard)
        return replay

    async def _replay_from_store(self) -> None:
        try:
            replay = await self.ctx.service.replay(self.user_id, self.cursor, self.ctx.config.poll_max_events)
        except Exception:  # the store failed: the client polls again with its cursor
            log.warning("a poll's replay from the store failed", exc_info=True)
            replay = Replay([], self.cursor)
        self._answer(replay)

    def _gone(self) -> None:
        # The client went away: drop the waiter now, not at its timeout; nobody is left to answer.
        self._unpark()
        self._done = True
        self.ctx.requests.discard(self)

    def _answer(self, replay: Replay) -> None:
        if self._done:
            return
        self._done = True
        ctx = self.ctx
        if replay.reset is not None:
            ctx.metrics.resets.labels(replay.reset).inc()
        router = self.router
        router.delivered.inc(len(replay.events))
        connection = self.connection
        assert connection is not None
        if http1.keeps_bytes_for(connection):
            connection.write_answer(router.answer_bytes(replay))
        else:
            self._write_with_tornado(connection, poll_body(replay.events, replay.cursor, replay.more))
        ctx.requests.discard(self)
        log_access(ctx.metrics, self, 200, "PollHandler", self.router.latency)  # it reads method, uri, remote_ip, time

    def _write_with_tornado(self, connection: tornado.httputil.HTTPConnection, body: bytes) -> None:
        # RequestHandler's headers, in its order: its defaults, JsonHandler's, then finish()'s length.
        headers = tornado.httputil.HTTPHeaders()
        headers["Server"] = _SERVER
        headers["Content-Type"] = "application/json; charset=utf-8"
        headers["Date"] = _http_date(int(time.time()))
        headers["Cache-Control"] = "no-store"
        headers["X-Content-Type-Options"] = "nosniff"
        headers["Content-Length"] = str(len(body))
        try:
            connection.write_headers(_OK, headers, body)
            connection.finish()
        except Exception as exc:  # the client went away while we answered: nothing left to do
            log.debug("poll answer not written: %r", exc)
