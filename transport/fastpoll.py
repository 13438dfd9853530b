"""The lean path of `GET /api/poll` (PROTOCOL section 5): a parked long-poll without a RequestHandler.

A poll is the server's most frequent request: with a thousand pollers, every event is a thousand answers and a
thousand new polls. Tornado's `RequestHandler` costs a task, a routing pass, an output transform chain and
its own bookkeeping per poll, several times what the poll itself needs. So the one common shape of the
request (a bearer token in the header, a cursor this server issued, no `typing`, no body, no conditional
header, a kept-alive HTTP/1.1 connection) is answered here, straight on transport/http1.py's connection; every
other poll (the handshake without a cursor, typing dialogs, any error: bad token, bad cursor, bad timeout) goes to
`realtime.PollHandler` through the application. Both keep transport/poll.py's contract: the same reading of the
query, the same body, the same registry of parked polls; the same access line and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import tornado.escape
import tornado.httputil
import tornado.web

from chatserver.broadcaster import EventRecord, Replay
from chatserver.errors import ChatError
from transport import compat, http1
from transport.access import log_access
from transport.poll import Answers, PollContext, PollQuery, only_lingering

log = logging.getLogger(__name__)

_PATH = "/api/poll"
# A host name or IPv4 address and a port: a subset of the Host values HTTPServerRequest accepts (no comma).
_PLAIN_HOST = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]{1,5})?")
_MAX_FIELDS = 100  # far below HTTPServerRequest's 1,000 query fields


class LeanRouter(tornado.httputil.HTTPServerConnectionDelegate):
    """The HTTP server's delegate: common polls to `LeanPoll`, everything else to the application."""

    def __init__(self, app: tornado.web.Application, ctx: PollContext) -> None:
        self.app = app
        self.ctx = ctx
        self.latency = ctx.metrics.request_latency.labels("GET", "PollHandler")
        self.delivered = ctx.metrics.events_delivered.labels(LeanPoll.transport)  # looked up once, not per answer
        self.answers = Answers()

    def start_request(
        self, server_conn: object, request_conn: tornado.httputil.HTTPConnection
    ) -> tornado.httputil.HTTPMessageDelegate:
        return _Dispatch(self, server_conn, request_conn)

    def on_close(self, server_conn: object) -> None:
        self.app.on_close(server_conn)


class _Dispatch(tornado.httputil.HTTPMessageDelegate):
    """Decides at the request's headers who answers it, then forwards everything to that one."""

    def __init__(self, router: LeanRouter, server_conn: object, request_conn: tornado.httputil.HTTPConnection):
        self.router = router
        self.server_conn = server_conn
        self.request_conn = request_conn
        self.target: tornado.httputil.HTTPMessageDelegate | LeanPoll | None = None

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


class LeanPoll:
    """One poll with a cursor: answered at once when events wait, else parked (transport/poll.py's ParkedPolls).

    The request's delegate (Tornado's HTTPMessageDelegate interface, which transport/http1.py calls) without its
    class: one of these is held per parked poll, so it keeps slots and no `__dict__`, and of the request only
    what the answer and its access line need.
    """

    transport = "longpoll"
    __slots__ = (
        "__weakref__",  # ctx.requests holds it weakly
        "_done",
        "_started",
        "connection",
        "ctx",
        "cursor",
        "method",
        "parked_for",
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
        # PollHandler, which refuses it (joined, neither is a valid token or host).
        if not http1.answers_whole(request_conn):
            return None  # HTTP/1.0: PollHandler's
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
        # What HTTPServerRequest would parse, without building one. It refuses (400) a missing, malformed or
        # repeated Host and a query of over 1,000 fields: anything but a plain host and a short query is left to
        # the application.
        query = start_line.path.partition("?")[2]
        if not _PLAIN_HOST.fullmatch(host[0]) or query.count("&") >= _MAX_FIELDS:
            return None
        try:
            poll = PollQuery.read(*_poll_arguments(query))
        except ChatError:
            return None  # PollHandler answers the 400
        cursor = poll.cursor
        if cursor is None or poll.typing:
            return None  # the handshake, and typing dialogs to authorize: PollHandler's
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
        return cls(router, request_conn, start_line.path, remote_ip, user_id, cursor, poll.timeout, replay)

    def __init__(
        self,
        router: LeanRouter,
        connection: http1.Exchange,
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
        self.parked_for = 0.0
        self._started = time.time()
        self._done = False
        self.ctx.requests.add(self)

    # -- the request (HTTPMessageDelegate) -------------------------------------------------------------

    def headers_received(self, start_line: Any, headers: Any) -> None:
        return None

    def data_received(self, chunk: bytes) -> None:
        return None

    def finish(self) -> None:
        # The request is read: answer now, or park until an event for the caller or the timeout.
        replay, self.replay = self.replay, None
        ctx = self.ctx
        answer_now = self.timeout <= 0 or ctx.shutting_down
        # No replay: the cursor was current at the headers. Made now if events came since, or to answer at once.
        if replay is None and (answer_now or not ctx.broadcaster.is_current(self.cursor)):
            replay = self._replay()
            if replay is None:
                return  # answered from the store
        # Receipts alone park and linger, as a parked poll does that a receipt wakes (transport/poll.py).
        receipts_only = replay is not None and only_lingering(replay)
        if replay is not None and (answer_now or (replay.events and not receipts_only)):
            self._answer(replay)
            return
        self.connection.set_close_callback(self._gone)
        ctx.polls.park(self, self.timeout, linger=receipts_only)

    def on_connection_close(self) -> None:
        self._gone()

    # -- as a parked poll ------------------------------------------------------------------------------

    def deliver(self, record: EventRecord) -> None:
        self.ctx.polls.woken_by(self, record)

    def wants_typing(self, dialog_id: str) -> bool:
        return False

    def wake(self) -> None:
        replay = self._replay()
        if replay is not None:
            self._answer(replay)

    def shutdown(self) -> None:
        self.ctx.polls.wake_now(self)

    def request_time(self) -> float:
        """For the access line and the latency metric, as HTTPServerRequest.request_time() (never finished)."""
        return time.time() - self._started

    # -- answering -------------------------------------------------------------------------------------

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
        self.ctx.polls.unpark(self)
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
        connection.write_answer(router.answers.whole(replay, close=connection.disconnect_on_finish))
        ctx.requests.discard(self)
        log_access(ctx.metrics, self, 200, "PollHandler", router.latency)  # it reads method, uri, remote_ip, time
