"""The server's own HTTP/1.1 connections: the listener, and every plain request-response exchange on it.

A connection here is an asyncio Protocol: bytes arrive in `data_received`, a request's head is parsed with
httptools (transport/heads.py), the request goes to the application (or to transport/fastpoll.py's lean poll) through
Tornado's `HTTPMessageDelegate` interface, and its answer leaves in one `transport.write`. Tornado's
`HTTP1Connection` does the same with a coroutine, a `Future` per read and per write and IOStream's buffers
per request; for a long-poll, answered once per event and asked again at once, that was most of its cost.

What this layer owns, as Tornado's did: keep-alive (HTTP/1.1 by default, HTTP/1.0 on request), pipelining
(one request at a time, the next read once the answer is written and the socket has room for more),
`Expect: 100-continue`, Content-Length bodies handed to the handler as they arrive with its flow control,
chunked and fixed-length answers, the bounds (header block size, body size, the idle wait for a request, the
wait for a body, the wait for a closing connection's last bytes), write flow control (a handler's `flush()`
waits while the socket is full), and telling a handler that its client went away. Beyond Tornado's: accepting
(the number of connections, and a pause when the process is out of file descriptors: see `Server`).
Refusals come as JSON like every other error (400 for a malformed request, with the parser's reason, 505 for
an HTTP version other than 1.0 and 1.1, 413 for a body over the hard limit, 431 for a header block over its
limit, 408 for a request that stalls past its timeout), and the connection then closes without losing the
answer to a reset: the rest of the request is read and dropped for a moment first. A handler's answer given before the
body is read ends the connection the same way, and says `Connection: close`.

What is not a plain exchange is handed, with the bytes already read, to Tornado's own HTTP/1.1 server for the
rest of the connection's life: a WebSocket upgrade (any `Upgrade` header), the hand-over paths (the SSE stream,
the WebSocket endpoint), and a chunked request body. A connection whose first request is for a hand-over path
is Tornado's from the start: a peek at its first bytes tells, before any of them is read (the head is parsed
here first all the same, so that Tornado never reads a head this layer refuses). A listener with TLS,
`xheaders` or request decompression is Tornado's entirely. On Tornado's connections, too, a malformed `Host` is
a JSON 400 and an answer before the body says `Connection: close` (_TornadoRequest, _TornadoExchange).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeGuard, cast

import attrs
import tornado.http1connection
import tornado.httpserver
import tornado.httputil
import tornado.ioloop
import tornado.iostream
import tornado.netutil

from chatserver.jsonutil import error_body
from chatserver.redaction import redact
from transport import compat
from transport.heads import HeadParser, MalformedHead, head_end

log = logging.getLogger("chatserver.http")

# After a refusal, how long the rest of the request is read and dropped before the connection closes: closing
# with unread bytes makes the kernel send a reset, which can destroy the answer before the client reads it.
LINGER = 2.0
# The timeouts (idle wait for a request, wait for a body) are checked by one sweep per second for all
# connections, not a timer per request.
SWEEP_INTERVAL = 1.0
# Bytes of pipelined requests read ahead while an answer is pending; reading pauses above this.
READ_AHEAD = 64 * 1024
HANDOVER_WAIT = 10.0  # at most this long for an answer still being sent before a connection goes to Tornado

# Connections accepted at most at a time (as Tornado's accept loop), and how long accepting pauses when the
# process has no file descriptor for one more; a refusal or pause is logged at most once per LOG_INTERVAL.
ACCEPT_BATCH = 128
ACCEPT_PAUSE = 0.1
LOG_INTERVAL = 10.0

_REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Payload Too Large",
            431: "Request Header Fields Too Large", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}


def refusal(status: int, message: str, extra: str = "") -> bytes:
    """A whole answer of this layer's own: the JSON error, and the end of the connection."""
    body = error_body(message)
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Cache-Control: no-store\r\n{extra}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode() + body


# What accept() reports of one connection (Linux passes a new connection's pending network error on; a firewall
# may refuse one): that connection is skipped, the others are accepted as usual.
_ONE_CONNECTION_ERRORS = frozenset((
    errno.EPROTO, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTDOWN,
    errno.EHOSTUNREACH, errno.ENONET, errno.EPERM,
))
_LIMIT_ANSWER = refusal(503, "the server is at its connection limit; retry later", "Retry-After: 1\r\n")


@attrs.frozen
class Limits:
    """The bounds of a connection, from HTTPServer's keyword arguments of the same meaning."""

    header_timeout: float  # the idle wait for a request (idle_connection_timeout)
    body_timeout: float | None
    max_header_size: int
    max_body_size: int | None
    no_keep_alive: bool
    decompress: bool


class Server(tornado.httpserver.HTTPServer):
    """Tornado's HTTPServer with the same parameters and methods, whose connections start here.

    `add_sockets`, `stop` and `close_all_connections` work as Tornado's (run.py and the tests use them); a
    connection handed to Tornado is served by the base class as if it had accepted it.

    Accepting is this class's own (`socket.accept` from the loop's reader on each listening socket), with two
    bounds Tornado's accept loop lacks. Past `max_connections` open connections, a new one is answered at once
    with a JSON 503 and closed. And when the process is out of file descriptors (EMFILE, ENFILE), accepting
    pauses for ACCEPT_PAUSE seconds, the waiting connections staying in the listen backlog, instead of failing
    again at once in a busy loop. Each refusal and pause is counted (`on_refused(reason)`: "limit", "emfile", or
    "error" for another failure of accept) and logged at most once per LOG_INTERVAL.
    """

    def initialize(self, *args: Any, handover_paths: tuple[str, ...] = (), max_connections: int = 0,
                   on_refused: Callable[[str], None] | None = None, tornado_only: bool = False,
                   **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        # Every connection to Tornado's HTTP/1.1 server from its first byte (the "tornado" http_engine): this
        # class then only accepts, bounds and counts.
        self.tornado_only = tornado_only
        self.params = Limits(
            header_timeout=kwargs.get("idle_connection_timeout") or 3600.0,  # Tornado's default
            body_timeout=kwargs.get("body_timeout"),
            max_header_size=kwargs.get("max_header_size") or 65536,
            max_body_size=kwargs.get("max_body_size"),
            no_keep_alive=bool(kwargs.get("no_keep_alive")),
            decompress=bool(kwargs.get("decompress_request")),
        )
        self.handover_paths = frozenset(handover_paths)
        self._handover_prefixes = tuple(p + c for p in handover_paths for c in "?/")
        # A connection whose first request is for one of these paths goes to Tornado before a byte of it is
        # read (a peek tells): no asyncio transport to build and drop, no descriptor to duplicate.
        self._tornado_starts = tuple(f"GET {p}{c}".encode() for p in handover_paths for c in "? /")
        self._peek = bool(self._tornado_starts)
        # Accepted, first bytes awaited: (address, when it was accepted).
        self._unread: dict[socket.socket, tuple[Any, float]] = {}
        self.front: set[Connection] = set()
        # Every connection's reads land here first: asyncio calls get_buffer and buffer_updated back to back.
        self.receive_buffer = memoryview(bytearray(READ_AHEAD))
        self._sweeper: asyncio.TimerHandle | None = None
        self.max_connections = max_connections  # 0: no limit
        self._listeners: dict[int, socket.socket] = {}
        self._listen_loop: asyncio.AbstractEventLoop | None = None
        self._resume: asyncio.TimerHandle | None = None  # while accepting is paused
        self._starting: set[socket.socket] = set()  # accepted, given to asyncio, not yet a Connection
        self.tornado_streams = 0  # open connections served by Tornado (its streams count themselves)
        self._refusals = _Refusals(on_refused)
        self.heads = HeadParser()  # every connection's heads, one at a time

    # -- accepting -------------------------------------------------------------------------------------

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        loop = cast(Any, tornado.ioloop.IOLoop.current()).asyncio_loop  # the loop this server runs on
        self._listen_loop = loop
        for sock in sockets:
            sock.setblocking(False)
            self._listeners[sock.fileno()] = sock
            loop.add_reader(sock.fileno(), self._accept, sock)

    def stop(self) -> None:
        loop = self._listen_loop
        for fd, sock in self._listeners.items():
            if loop is not None and self._resume is None:
                loop.remove_reader(fd)
            sock.close()
        self._listeners.clear()
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        super().stop()

    def open_connections(self) -> int:
        """The client connections open now, of every kind (each holds a file descriptor)."""
        return len(self._unread) + len(self.front) + len(self._starting) + self.tornado_streams

    def _accept(self, listener: socket.socket) -> None:
        # At most ACCEPT_BATCH at a time, so that a flood of connections does not starve the rest of the loop.
        for _ in range(ACCEPT_BATCH):
            try:
                connection, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # none left waiting
            except ConnectionAbortedError:
                continue  # gone while in the backlog
            except OSError as exc:
                if exc.errno in _ONE_CONNECTION_ERRORS:
                    continue
                self._pause_accepting(exc)
                return
            if self.max_connections and self.open_connections() >= self.max_connections:
                self._refuse_over_limit(connection)
                continue
            try:
                self._handle_accepted(connection, address)
            except Exception:
                log.exception("could not take an accepted connection")
                connection.close()

    def _pause_accepting(self, error: OSError) -> None:
        """No descriptor for a new connection (EMFILE, ENFILE), or another failure of the listener itself (out of
        memory, say): stop accepting for a moment rather than fail again at once; the connections wait in the
        backlog meanwhile."""
        loop = self._listen_loop
        if loop is None or self._resume is not None:
            return
        for fd in self._listeners:
            loop.remove_reader(fd)
        self._resume = loop.call_later(ACCEPT_PAUSE, self._resume_accepting)
        descriptors = error.errno in (errno.EMFILE, errno.ENFILE)
        self._refusals.count(
            "emfile" if descriptors else "error",
            f"cannot accept connections ({'out of file descriptors: ' if descriptors else ''}"
            f"{error.strerror or repr(error)}); accepting pauses for {ACCEPT_PAUSE}s at a time; "
            f"{self.open_connections()} connections open",
        )

    def _resume_accepting(self) -> None:
        self._resume = None
        loop = self._listen_loop
        assert loop is not None
        for fd, sock in self._listeners.items():
            loop.add_reader(fd, self._accept, sock)

    def _refuse_over_limit(self, connection: socket.socket) -> None:
        """Beyond max_connections: a 503 at once, and the end of the connection."""
        try:
            connection.setblocking(False)
            connection.send(_LIMIT_ANSWER)  # a fresh socket's buffer takes it whole
            # What the client sent already is read and dropped: closed with it unread, the kernel would send a
            # reset, which can destroy the answer before the client reads it.
            for _ in range(4):
                if not connection.recv(65536):
                    break
        except OSError:
            pass  # nothing (more) to read, or the client is gone already
        finally:
            connection.close()
        self._refusals.count("limit", f"connection refused: {self.max_connections} connections are open "
                                      "(max_connections)")

    def _handle_accepted(self, connection: socket.socket, address: Any) -> None:
        if self.tornado_only or self.ssl_options is not None or self.xheaders or self.params.decompress:
            self._serve_with_tornado(connection, address)
            return
        loop = asyncio.get_running_loop()
        if not self._peek:
            self._take(connection, address, loop.time())
            return
        self._unread[connection] = (address, loop.time())
        connection.setblocking(False)
        loop.add_reader(connection.fileno(), self._first_bytes, connection)
        self._keep_sweeping()

    def _serve_with_tornado(self, connection: socket.socket, address: Any) -> None:
        """Tornado's HTTP/1.1 server takes the connection from its first byte, as its TCPServer would hand it."""
        try:
            stream: tornado.iostream.IOStream
            if self.ssl_options is not None:
                connection = tornado.netutil.ssl_wrap_socket(
                    connection, self.ssl_options, server_side=True, do_handshake_on_connect=False)
                stream = _CountedSSLStream(self, connection, max_buffer_size=self.max_buffer_size,
                                           read_chunk_size=self.read_chunk_size)
            else:
                stream = _CountedStream(self, connection, max_buffer_size=self.max_buffer_size,
                                        read_chunk_size=self.read_chunk_size)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; a port scan's closed socket, say
            log.info("could not take an accepted connection: %r", exc)
            connection.close()
            return
        self.handle_stream(stream, address)

    def _first_bytes(self, connection: socket.socket) -> None:
        """The connection's first bytes have come: Tornado's if they are the whole head of a request for a
        hand-over path that the parser accepts (so Tornado never reads a head this layer would refuse)."""
        entry = self._unread.pop(connection, None)
        if entry is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(connection.fileno())
        try:
            start = connection.recv(self.params.max_header_size, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            self._unread[connection] = entry
            loop.add_reader(connection.fileno(), self._first_bytes, connection)
            return
        except OSError:
            connection.close()
            return
        if start.startswith(self._tornado_starts) and self._parses(start):
            self._serve_with_tornado(connection, entry[0])
        else:
            self._take(connection, *entry)  # also a closed one: the protocol sees its end

    def _parses(self, start: bytes) -> bool:
        end = head_end(bytearray(start))
        if end < 0:
            return False  # not all here yet: read by a Connection, handed over once it is whole
        try:
            self.heads.parse(start[:end])
        except MalformedHead:
            return False  # a Connection refuses it
        return True

    def _take(self, connection: socket.socket, address: Any, accepted: float) -> None:
        """The connection is ours: its wait for a first request counts from `accepted`, not from now."""
        loop = asyncio.get_running_loop()
        self._starting.add(connection)
        task = loop.create_task(
            loop.connect_accepted_socket(lambda: Connection(self, address, accepted), connection))
        task.add_done_callback(functools.partial(self._taken, connection))

    def _taken(self, connection: socket.socket, task: asyncio.Task[Any]) -> None:
        self._starting.discard(connection)  # a Connection now (in `front`), or failed
        if not task.cancelled() and task.exception() is not None:
            log.info("could not take an accepted connection: %r", task.exception())
            connection.close()

    def _drop_unread(self, connection: socket.socket) -> None:
        self._unread.pop(connection, None)
        asyncio.get_running_loop().remove_reader(connection.fileno())
        connection.close()

    def start_request(self, server_conn: object, request_conn: tornado.httputil.HTTPConnection
                      ) -> tornado.httputil.HTTPMessageDelegate:
        if isinstance(request_conn, Exchange):
            return super().start_request(server_conn, request_conn)
        assert isinstance(request_conn, tornado.http1connection.HTTP1Connection)  # handed to Tornado's server
        exchange = _TornadoExchange(request_conn)
        return _TornadoRequest(super().start_request(server_conn, exchange), exchange)

    async def close_all_connections(self) -> None:
        for connection in list(self._unread):
            self._drop_unread(connection)  # said nothing yet: nothing to answer
        while self.front:
            await asyncio.gather(*[conn.close() for conn in self.front])  # together: each may wait up to LINGER
        await super().close_all_connections()

    def _connection_started(self, conn: Connection) -> None:
        self.front.add(conn)
        self._keep_sweeping()

    def _keep_sweeping(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        if not self.front and not self._unread:
            return
        now = asyncio.get_running_loop().time()
        for conn in [c for c in self.front if 0 < c.deadline <= now]:
            conn.timed_out()
        timeout = self.params.header_timeout
        if timeout:
            for connection in [c for c, (_, accepted) in self._unread.items() if accepted + timeout <= now]:
                self._drop_unread(connection)  # connected and never said a word within the idle timeout
        self._keep_sweeping()


class _TornadoExchange(tornado.httputil.HTTPConnection):
    """What a handler writes its answer to on a connection Tornado's server reads: Tornado's HTTP1Connection, except
    that an answer begun before the request's body is read says `Connection: close`. Tornado ends the connection
    after such an answer without saying so (RFC 9112 9.6), and a client that kept it for its next request would
    have that request cut off."""

    def __init__(self, connection: tornado.http1connection.HTTP1Connection) -> None:
        self.connection = connection
        self.read_finished = False  # set by _TornadoRequest once Tornado has read the whole body

    def write_headers(self, start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
                      headers: tornado.httputil.HTTPHeaders, chunk: bytes | None = None) -> Any:
        if not self.read_finished:
            headers["Connection"] = "close"
        return self.connection.write_headers(start_line, headers, chunk)

    def write(self, chunk: bytes) -> Any:
        return self.connection.write(chunk)

    def finish(self) -> None:
        self.connection.finish()

    def set_close_callback(self, callback: Any) -> None:
        self.connection.set_close_callback(callback)

    def __getattr__(self, name: str) -> Any:
        # The rest of HTTP1Connection as it is: detach() for a WebSocket, context, set_body_timeout, ...
        return getattr(self.connection, name)


class _TornadoRequest(tornado.httputil.HTTPMessageDelegate):
    """A request's delegate on Tornado's HTTP1Connection (an upgrade, a stream, a chunked body, and what follows them
    on their connection), in front of the application's:

    - Tornado answers `Expect: 100-continue` after the delegate's headers_received whatever the request's version:
      an HTTP/1.0 request's expectation is dropped before that (RFC 9110 10.1.1: a server MUST ignore it).
    - A `Host` that Tornado's HTTPServerRequest refuses (missing on HTTP/1.1, malformed, repeated) would get its bare
      400 without a body: it gets this layer's JSON refusal instead, and the connection ends.
    - The exchange learns when the body has been read (Tornado calls finish() then, and only then).
    """

    def __init__(self, delegate: tornado.httputil.HTTPMessageDelegate, exchange: _TornadoExchange) -> None:
        self.delegate: tornado.httputil.HTTPMessageDelegate | None = delegate
        self.exchange = exchange

    def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: tornado.httputil.HTTPHeaders,
    ) -> Any:
        assert isinstance(start_line, tornado.httputil.RequestStartLine) and self.delegate is not None
        if start_line.version == "HTTP/1.0":
            headers.pop("Expect", None)
        try:
            tornado.httputil.HTTPServerRequest(start_line=start_line, headers=headers)
        except tornado.httputil.HTTPInputError as exc:
            context = getattr(self.exchange.connection, "context", None)
            log.info("malformed HTTP request from %s: %s", getattr(context, "remote_ip", None), redact(str(exc)))
            self.delegate = None
            body = error_body("malformed HTTP request")
            answer = tornado.httputil.HTTPHeaders({"Content-Type": "application/json; charset=utf-8",
                                                   "Cache-Control": "no-store", "Content-Length": str(len(body))})
            # Finished before the body is read: Tornado ends the connection once the answer is out.
            self.exchange.write_headers(tornado.httputil.ResponseStartLine("HTTP/1.1", 400, "Bad Request"), answer,
                                        body)
            self.exchange.finish()
            return None
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        return None if self.delegate is None else self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.exchange.read_finished = True
        if self.delegate is not None:
            self.delegate.finish()

    def on_connection_close(self) -> None:
        if self.delegate is not None:
            self.delegate.on_connection_close()


class _Refusals:
    """Counts refused connections and accept pauses by reason; logs each reason at most once per LOG_INTERVAL,
    with how many there were since its last line (a flood of them is one line, not one each)."""

    def __init__(self, on_refused: Callable[[str], None] | None) -> None:
        self._on_refused = on_refused
        self._unlogged: dict[str, int] = {}
        self._next_line: dict[str, float] = {}

    def count(self, reason: str, message: str) -> None:
        if self._on_refused is not None:
            self._on_refused(reason)
        unlogged = self._unlogged.get(reason, 0) + 1
        now = time.monotonic()
        if now < self._next_line.get(reason, 0.0):
            self._unlogged[reason] = unlogged
            return
        self._unlogged[reason] = 0
        self._next_line[reason] = now + LOG_INTERVAL
        more = f" ({unlogged - 1} more since the last such line)" if unlogged > 1 else ""
        log.warning("%s%s", message, more)


class _Counted:
    """A Tornado stream of a connection this server counts: `close_fd` (once per stream) uncounts it."""

    def _count(self, server: Server) -> None:
        self._counted_by = server
        server.tornado_streams += 1

    def close_fd(self) -> None:
        try:
            super().close_fd()  # type: ignore[misc]
        finally:
            self._counted_by.tornado_streams -= 1


class _CountedStream(_Counted, tornado.iostream.IOStream):
    def __init__(self, server: Server, sock: socket.socket, **kwargs: Any) -> None:
        super().__init__(sock, **kwargs)
        self._count(server)


class _CountedSSLStream(_Counted, tornado.iostream.SSLIOStream):
    def __init__(self, server: Server, sock: socket.socket, **kwargs: Any) -> None:
        super().__init__(sock, **kwargs)
        self._count(server)


_CR_LF = b"\r\n"
_NO_OPTIONS: frozenset[str] = frozenset()


def transfer_encoding_problem(start_line: tornado.httputil.RequestStartLine, fields: dict[str, list[str]]
                              ) -> str | None:
    """What makes a request's Transfer-Encoding one that cannot be read (RFC 9112 6.1 and 6.3, and Tornado, which
    reads only `chunked`), or None. Such a request is refused before it reaches Tornado."""
    if start_line.version != "HTTP/1.1":
        return "an HTTP/1.0 request may not have a Transfer-Encoding"
    if "Content-Length" in fields:
        return "a request may not have both Transfer-Encoding and Content-Length"
    value = ",".join(fields["Transfer-Encoding"])
    if value.lower() != "chunked":  # exactly what Tornado reads: no other coding, no list
        return f"only a chunked Transfer-Encoding is supported: {value!r}"
    return None


def connection_options(values: list[str]) -> frozenset[str]:
    """The connection options of a request's Connection fields, lowercased: every field, split at commas."""
    if len(values) == 1 and "," not in values[0]:
        return frozenset((values[0].strip().lower(),))
    return frozenset(option.strip().lower() for value in values for option in value.split(","))

class _Context:
    """What Tornado's `_HTTPRequestContext` tells a request about its connection."""

    __slots__ = ("address", "protocol", "remote_ip")

    def __init__(self, address: Any) -> None:
        self.address = address
        self.protocol = "http"
        # An IP connection's peer address; a Unix socket's is a path (or empty), reported as Tornado does.
        self.remote_ip = address[0] if isinstance(address, tuple) and address else "0.0.0.0"  # noqa: S104

    def __str__(self) -> str:
        return self.remote_ip


# A connection's states. From LINGERING on, nothing it receives is read as a request.
HEAD, HEADERS_WAIT, BODY, BODY_WAIT, ANSWERING, LINGERING, CLOSING, HANDING, HANDED, CLOSED = range(10)


class Connection(asyncio.BufferedProtocol):
    """One client connection: its requests one after another, each as an `Exchange` with the application.

    A BufferedProtocol: asyncio's plain Protocol receives into a new 256 KiB bytes object per read (an mmap and
    a munmap per request). Here every connection receives into its server's one buffer, and keeps only the bytes
    it got.
    """

    __slots__ = (  # one of these is held per open connection, a parked poll's included
        "_closed",
        "_handover_started",
        "_read_paused",
        "_running",
        "_write_waiters",
        "address",
        "body_timeout",
        "buffer",
        "context",
        "deadline",
        "exchange",
        "loop",
        "params",
        "remaining",
        "server",
        "state",
        "transport",
    )

    def __init__(self, server: Server, address: Any, accepted: float) -> None:
        self.server = server
        # The loop, looked up once: on Python 3.11 every asyncio.get_running_loop() is a getpid() system call.
        self.loop = asyncio.get_running_loop()
        self.params = server.params
        self.address = address
        self.context = _Context(address)
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.state = HEAD
        self.exchange: Exchange | None = None
        self.remaining = 0  # body bytes of the current request still to read
        # When the current wait (for a request or a body) times out; 0: no wait is bounded. The wait for the first
        # request counts from the accept (a peek at the first bytes may have come between), not from now.
        timeout = self.params.header_timeout
        self.deadline = accepted + timeout if timeout else 0.0
        self.body_timeout = self.params.body_timeout
        self._running = False
        self._read_paused = False
        self._write_waiters: list[asyncio.Future[None]] | None = None  # set while the socket is full
        self._closed: asyncio.Future[None] | None = None
        self._handover_started = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes
        self._closed = self.loop.create_future()
        self.server._connection_started(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.receive_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.state >= LINGERING:
            return  # dropped: the request was refused, the connection is closing, or the bytes are no longer ours
        self.buffer += self.server.receive_buffer[:nbytes]
        self._run()

    def eof_received(self) -> None:
        # The client sends nothing more: as with Tornado's IOStream, the connection is over (a parked poll or a
        # handler at work hears of it through connection_lost). asyncio closes it, after what is written.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        self.state = CLOSED
        self.server.front.discard(self)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        self._release_writers(tornado.iostream.StreamClosedError(real_error=exc))
        if state in (HANDING, HANDED):
            return
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            if not exchange.write_finished:
                exchange.connection_closed(delegate_finished=state == ANSWERING)
            exchange.delegate = _NO_DELEGATE
        callback = self.server.request_callback
        if isinstance(callback, tornado.httputil.HTTPServerConnectionDelegate):
            callback.on_close(self)

    def pause_writing(self) -> None:
        if self._write_waiters is None:
            self._write_waiters = []
        if self.state == ANSWERING:
            # A client that takes none of its answer for the idle timeout is cut off (the sweep): every wait
            # has a bound, this one too.
            timeout = self.params.header_timeout
            self.deadline = self.loop.time() + timeout if timeout else 0.0

    def resume_writing(self) -> None:
        self._release_writers(None)
        if self.state != ANSWERING:
            return
        self.deadline = 0.0
        exchange = self.exchange
        if exchange is not None and exchange.write_finished:
            # Its answer waited for the socket (see _answered): the next request, after the transport's own
            # write callback (which calls this one) is done with the socket.
            self.loop.call_soon(self._answered, exchange)

    # -- reading requests ------------------------------------------------------------------------------

    def _run(self) -> None:
        """Process what the buffer holds as far as it goes; re-entered calls (an answer written inside a
        handler call) only mark that there is more to do."""
        if self._running:
            return
        self._running = True
        try:
            while self._step():
                pass
        finally:
            self._running = False
        transport = self.transport
        if transport is None or self.state >= HANDING:
            return
        if len(self.buffer) > READ_AHEAD and self.state in (HEADERS_WAIT, BODY_WAIT, ANSWERING):
            if not self._read_paused:
                self._read_paused = True
                transport.pause_reading()
        elif self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    def _step(self) -> bool:
        state = self.state
        if state == HEAD:
            return self._read_head()
        if state == BODY:
            return self._read_body()
        return False  # waiting: for a handler, for the answer, or closing

    def _read_head(self) -> bool:
        buffer = self.buffer
        if buffer and buffer[0] in _CR_LF:
            # RFC 9112 2.2: at least one empty line before a request is ignored.
            start = 0
            while start < len(buffer) and buffer[start] in _CR_LF:
                start += 1
            del buffer[:start]
        limit = self.params.max_header_size
        end = head_end(buffer)
        if end < 0 or end > limit:
            if end >= 0 or len(buffer) > limit:
                self._refuse(431, f"the request's header block is larger than {limit} bytes")
            return False
        try:
            head = self.server.heads.parse(bytes(buffer[:end]))
        except MalformedHead as exc:
            log.info("malformed HTTP request from %s: %s", self.context.remote_ip, exc)
            self._refuse(exc.status, str(exc))
            return False
        start_line, headers, fields = head.start_line, head.headers, head.fields
        if "Transfer-Encoding" in fields:
            problem = transfer_encoding_problem(start_line, fields)
            if problem is not None:
                self._refuse(400, problem)  # here, as JSON: Tornado's refusal of it would be a bare 400
                return False
        if head.upgrade or self._for_tornado(start_line, fields):
            self._hand_over()
            return False
        del buffer[:end]
        length = int(fields["Content-Length"][0]) if "Content-Length" in fields else 0  # digits, once (llhttp)
        self.deadline = 0.0
        exchange = self.exchange = Exchange(self, start_line, headers, self._can_keep_alive(start_line, fields))
        self.remaining = length
        self.body_timeout = self.params.body_timeout
        self.state = HEADERS_WAIT
        try:
            exchange.delegate = self.server.start_request(self, exchange)
            result = exchange.delegate.headers_received(start_line, headers)
        except Exception:
            self._failed("headers_received")
            return False
        if result is not None:
            asyncio.ensure_future(result).add_done_callback(functools.partial(self._headers_done, exchange))
            return False
        return self._start_body()

    def _handler_done(self, future: asyncio.Future[Any], waiting: int, step: str) -> bool:
        """Whether to go on after a handler's awaitable resolved: still in the state that awaited it, no error."""
        if self.state != waiting:
            return False  # the connection moved on meanwhile (refused, closed, answered early)
        if not future.cancelled() and future.exception() is not None:
            self._failed(step, future.exception())
            return False
        return True

    def _headers_done(self, exchange: Exchange, future: asyncio.Future[Any]) -> None:
        # Its own exchange's: one answered at its headers may be followed by the next before this resolves.
        if exchange is not self.exchange:
            if not future.cancelled() and future.exception() is not None:
                log.error("HTTP headers_received failed after its answer", exc_info=future.exception())
            return
        if self._handler_done(future, HEADERS_WAIT, "headers_received") and self._start_body():
            self._run()

    def _start_body(self) -> bool:
        exchange = self.exchange
        assert exchange is not None
        if self.remaining > exchange.max_body_size and not exchange.write_finished:
            self._refuse(413, f"the body is larger than {exchange.max_body_size} bytes")
            return False
        if (self.remaining and not exchange.write_finished and exchange.headers.get("Expect") == "100-continue"
                and exchange.start_line.version == "HTTP/1.1"):  # RFC 9110 10.1.1: an HTTP/1.0 one is ignored
            self._write(b"HTTP/1.1 100 (Continue)\r\n\r\n")
        self.state = BODY
        if self.remaining and self.body_timeout:
            self.deadline = self.loop.time() + self.body_timeout
        return True

    def _read_body(self) -> bool:
        exchange = self.exchange
        assert exchange is not None
        if self.remaining:
            buffer = self.buffer
            if not buffer:
                return False
            chunk = bytes(buffer[: self.remaining])
            del buffer[: len(chunk)]
            self.remaining -= len(chunk)
            if exchange.write_finished:
                return True  # answered early: the rest of the body is read and dropped
            try:
                result = exchange.delegate.data_received(chunk)
            except Exception:
                self._failed("data_received")
                return False
            if result is not None:
                self.state = BODY_WAIT
                asyncio.ensure_future(result).add_done_callback(self._body_chunk_done)
                return False
            return True
        self.deadline = 0.0
        exchange.read_finished = True
        self.state = ANSWERING
        if exchange.write_finished:
            self._answered(exchange)
            return self.state == HEAD
        try:
            exchange.delegate.finish()
        except Exception:
            self._failed("finish")
            return False
        return self.state == HEAD

    def _body_chunk_done(self, future: asyncio.Future[Any]) -> None:
        if self._handler_done(future, BODY_WAIT, "data_received"):
            self.state = BODY
            self._run()

    def _can_keep_alive(self, start_line: tornado.httputil.RequestStartLine, fields: dict[str, list[str]]) -> bool:
        """HTTP/1.1 unless a `close` connection option; HTTP/1.0 only with a `keep-alive` option and no `close`
        (RFC 9112 9.3 and 9.6: the options of every Connection field), and, as Tornado, only where the request's
        end is known (a Content-Length, or a HEAD or GET)."""
        if self.params.no_keep_alive:
            return False
        options = connection_options(fields["Connection"]) if "Connection" in fields else _NO_OPTIONS
        if "close" in options:
            return False
        if start_line.version == "HTTP/1.1":
            return True
        return ("Content-Length" in fields or start_line.method in ("HEAD", "GET")) and "keep-alive" in options

    def _for_tornado(self, start_line: tornado.httputil.RequestStartLine, fields: dict[str, list[str]]) -> bool:
        """Whether this request (and the rest of its connection) is Tornado's: upgrades, streams, chunked bodies."""
        if "Upgrade" in fields or "Transfer-Encoding" in fields:
            return True
        path = start_line.path
        server = self.server
        return path in server.handover_paths or path.startswith(server._handover_prefixes)

    # -- answers ---------------------------------------------------------------------------------------

    def _write(self, data: bytes) -> asyncio.Future[None]:
        """Send bytes; the future resolves when the socket can take more (at once, unless it is full)."""
        future: asyncio.Future[None] = self.loop.create_future()
        transport = self.transport
        if transport is None or transport.is_closing() or self.state >= LINGERING:
            future.set_exception(tornado.iostream.StreamClosedError())
            future.exception()  # retrieved: nobody has to await a write to a closed connection
            return future
        transport.write(data)
        if self._write_waiters is None:
            future.set_result(None)
        else:
            self._write_waiters.append(future)
        return future

    def _release_writers(self, error: BaseException | None) -> None:
        waiters, self._write_waiters = self._write_waiters, None
        for future in waiters or ():
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
                future.exception()

    def body_unread(self) -> bool:
        """Whether the current request has body bytes still to read (or is past its headers and reading them)."""
        return self.state != HEADERS_WAIT or self.remaining > 0

    def _answered(self, exchange: Exchange) -> None:
        """The answer is written (maybe still leaving the socket buffer): the next request, or the end."""
        if exchange is not self.exchange or self.state >= LINGERING:
            return
        if not exchange.read_finished:
            if self.body_unread():
                # Answered before the body was read (a 413 at the headers, say): read and drop the rest, then close.
                self._linger()
                return
            exchange.read_finished = True  # answered at the headers of a request without a body: nothing to drop
        if self._write_waiters is not None and not exchange.disconnect_on_finish:
            # The socket is full: the next request is read once the client takes this answer (resume_writing),
            # as Tornado does; else a client that pipelines and never reads has answers buffered without bound.
            return
        self.exchange = None
        # The delegate and the exchange point at each other (a poll holds its exchange): unlinked here, the
        # pair is freed at once rather than by the cyclic collector, which a poll per cycle kept busy.
        exchange.delegate = _NO_DELEGATE
        if exchange.disconnect_on_finish:
            self._close_soon()
            return
        self._wait_for_request()
        if self.buffer and not self._running:
            self._run()

    def _wait_for_request(self) -> None:
        self.state = HEAD
        timeout = self.params.header_timeout
        self.deadline = self.loop.time() + timeout if timeout else 0.0

    # -- refusals, failures, timeouts, the end ---------------------------------------------------------

    def _refuse(self, status: int, message: str) -> None:
        """An error of the request itself, answered as JSON; the connection then closes."""
        exchange, self.exchange = self.exchange, None
        if exchange is not None and not exchange.write_finished:
            exchange.connection_closed(delegate_finished=False)
        self._write(refusal(status, message))
        self._linger()

    def _linger(self) -> None:
        self.exchange = None
        self.state = LINGERING
        self.buffer.clear()
        self.deadline = self.loop.time() + LINGER
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if self._read_paused:
                self._read_paused = False
                transport.resume_reading()
            if transport.can_write_eof():
                transport.write_eof()  # the client sees the end of the answer while we drop what it still sends

    def _failed(self, step: str, error: BaseException | None = None) -> None:
        # As Tornado: a request Tornado's own parsing refuses (HTTPServerRequest's Host check, say) is a 400; a
        # delegate that raised anything else is logged and its connection closed (the delegate is told).
        if error is None:
            error = sys.exc_info()[1]
        if isinstance(error, tornado.httputil.HTTPInputError):
            log.info("malformed HTTP request from %s: %s", self.context.remote_ip, redact(str(error)))
            self._refuse(400, "malformed HTTP request")
            return
        log.error("HTTP %s failed for a request from %s", step, self.context.remote_ip, exc_info=error)
        self._abort()

    def timed_out(self) -> None:
        if self.state == HEAD and not self.buffer and self.exchange is None:
            self._close_soon()  # an idle kept-alive connection: nothing to answer
        elif self.state in (LINGERING, CLOSING):
            self._abort()  # what it still had to send did not leave in time
        elif self.state in (HEAD, BODY):
            log.info("timed out reading a request from %s", self.context.remote_ip)
            self._refuse(408, "the request did not arrive in time")
        elif self.state == BODY_WAIT:
            self._abort()  # the handler took no more of the body in time
        elif self.state == ANSWERING and self._write_waiters is not None:
            log.info("%s took none of its answer in time; closing", self.context.remote_ip)
            self._abort()

    def _close_soon(self) -> None:
        """Close, between requests, once what is written has left (asyncio's close flushes), but no later than the
        idle timeout from now: a client that never takes the rest would hold the connection for ever (the sweep
        aborts it then)."""
        self.state = CLOSING
        self.deadline = self.loop.time() + (self.params.header_timeout or LINGER)
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        self.deadline = 0.0
        if self.transport is not None:
            self.transport.abort()

    async def close(self) -> None:
        """For the server's shutdown: close now, and wait until the connection is gone. What is written still
        leaves, for at most LINGER: a client that reads nothing would otherwise hold the shutdown forever."""
        if self.state >= HANDING:
            self.server.front.discard(self)
            return
        # The state stays: a request in progress hears of the end as a client that went away.
        self.deadline = 0.0
        if self.transport is not None:
            self.transport.close()
        if self._closed is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._closed), LINGER)
            except TimeoutError:
                self._abort()
                await self._closed

    # -- hand-over to Tornado --------------------------------------------------------------------------

    def _hand_over(self) -> None:
        """This connection, with the request in the buffer, goes to Tornado's HTTP/1.1 server for good."""
        transport = self.transport
        assert transport is not None
        if self.state != HANDING:
            self.state = HANDING
            self.deadline = 0.0
            transport.pause_reading()
            self._handover_started = self.loop.time()
        if transport.get_write_buffer_size():
            # The previous answer is still leaving: its bytes must not be lost or overtaken.
            if self.loop.time() - self._handover_started > HANDOVER_WAIT:
                self._abort()
                return
            self.loop.call_later(0.005, self._hand_over)
            return
        sock = transport.get_extra_info("socket")
        try:
            raw = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError as exc:
            log.info("could not hand a connection over: %r", exc)
            self._abort()
            return
        raw.setblocking(False)
        data = bytes(self.buffer)
        self.buffer.clear()
        self.state = HANDED
        self.server.front.discard(self)
        transport.abort()  # closes our descriptor; the duplicate keeps the connection
        server = self.server
        stream = _CountedStream(server, raw, max_buffer_size=server.max_buffer_size,
                                read_chunk_size=server.read_chunk_size)
        # What was read already is the start of what Tornado reads (IOStream has no public way to put it back).
        compat.unread(stream, data)
        server.handle_stream(stream, self.address)


class Exchange(tornado.httputil.HTTPConnection):
    """One request and its answer: the `HTTPConnection` a Tornado delegate (a RequestHandler's) writes to."""

    def __init__(self, conn: Connection, start_line: tornado.httputil.RequestStartLine,
                 headers: tornado.httputil.HTTPHeaders, keep_alive: bool) -> None:
        self.conn = conn
        self.context = conn.context
        self.start_line = start_line
        self.headers = headers
        self.delegate: tornado.httputil.HTTPMessageDelegate = _NO_DELEGATE
        self.disconnect_on_finish = not keep_alive
        self.max_body_size = conn.params.max_body_size or conn.server.max_buffer_size or 100 * 1024 * 1024
        self.read_finished = False
        self.write_finished = False
        self.chunking = False
        self.expected_remaining: int | None = None
        self.close_callback: Any = None

    # -- tornado.httputil.HTTPConnection -----------------------------------------------------------------

    def write_headers(self, start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
                      headers: tornado.httputil.HTTPHeaders, chunk: bytes | None = None) -> asyncio.Future[None]:
        assert isinstance(start_line, tornado.httputil.ResponseStartLine)
        request = self.start_line
        code = start_line.code
        # Tornado's framing: chunked when HTTP/1.1 has a body of unknown length.
        self.chunking = (request.version == "HTTP/1.1" and request.method != "HEAD" and code not in (204, 304)
                         and not 100 <= code < 200 and "Content-Length" not in headers)
        if not self.read_finished and self.conn.body_unread():
            self.disconnect_on_finish = True  # answered before the body is read: the connection ends (_answered)
        if request.version == "HTTP/1.1" and self.disconnect_on_finish:
            headers["Connection"] = "close"
        if request.version == "HTTP/1.0" and not self.disconnect_on_finish:
            headers["Connection"] = "Keep-Alive"
        if self.chunking:
            headers["Transfer-Encoding"] = "chunked"
        if request.method == "HEAD" or code == 304:
            self.expected_remaining = 0
        elif "Content-Length" in headers:
            self.expected_remaining = int(headers["Content-Length"])
        else:
            self.expected_remaining = None
        lines = [f"HTTP/1.1 {code} {start_line.reason}".encode("latin1")]
        lines.extend(f"{name}: {value}".encode("latin1") for name, value in headers.get_all())
        for line in lines:
            if b"\r" in line or b"\n" in line:
                raise ValueError(f"Illegal characters (CR or LF) in header: {line!r}")
        data = b"\r\n".join(lines) + b"\r\n\r\n"
        if chunk:
            data += self._frame(chunk)
        return self.conn._write(data)

    def write(self, chunk: bytes) -> asyncio.Future[None]:
        return self.conn._write(self._frame(chunk))

    def finish(self) -> None:
        if self.expected_remaining:
            self.conn._abort()
            raise tornado.httputil.HTTPOutputError(
                f"Tried to write {self.expected_remaining} bytes less than Content-Length")
        if self.chunking:
            self.conn._write(b"0\r\n\r\n")
        self.write_finished = True
        self.close_callback = None
        self.conn._answered(self)

    def set_close_callback(self, callback: Any) -> None:
        self.close_callback = callback

    def set_body_timeout(self, timeout: float) -> None:
        self.conn.body_timeout = timeout

    def set_max_body_size(self, max_body_size: int) -> None:
        self.max_body_size = max_body_size

    def close(self) -> None:
        """End the connection now, dropping what is not sent (a stream cut off for not reading its events)."""
        self.conn._abort()

    def detach(self) -> tornado.iostream.IOStream:
        raise NotImplementedError("upgrades are handed to Tornado's HTTP/1.1 server before they reach a handler")

    # -- ours ------------------------------------------------------------------------------------------

    def write_answer(self, data: bytes) -> None:
        """A complete answer (head and a Content-Length body) written at once, for transport/fastpoll.py. Its
        head says `Connection: close` where `disconnect_on_finish` (the connection then ends)."""
        if self.start_line.version != "HTTP/1.1":
            raise ValueError("write_answer is for HTTP/1.1 requests only")  # callers check first
        conn = self.conn
        transport = conn.transport
        if transport is not None and conn.state < LINGERING and not transport.is_closing():
            transport.write(data)  # no Future: nobody waits for this answer to leave
        self.write_finished = True
        self.close_callback = None
        self.conn._answered(self)

    def _frame(self, chunk: bytes) -> bytes:
        if self.expected_remaining is not None:
            self.expected_remaining -= len(chunk)
            if self.expected_remaining < 0:
                self.conn._abort()
                raise tornado.httputil.HTTPOutputError("Tried to write more data than Content-Length")
        if self.chunking and chunk:
            return b"%x\r\n" % len(chunk) + chunk + b"\r\n"  # an empty chunk would end the body
        return chunk

    def connection_closed(self, *, delegate_finished: bool) -> None:
        """The client went away (or the request was refused) before the answer was written."""
        try:
            if delegate_finished:
                callback, self.close_callback = self.close_callback, None
                if callback is not None:
                    callback()
            else:
                self.delegate.on_connection_close()
        except Exception:
            log.exception("a handler failed on its connection's close")


_NO_DELEGATE = tornado.httputil.HTTPMessageDelegate()


def answers_whole(exchange: tornado.httputil.HTTPConnection) -> TypeGuard[Exchange]:
    """Whether `Exchange.write_answer` may answer on this connection (one of ours, an HTTP/1.1 request)."""
    return isinstance(exchange, Exchange) and exchange.start_line.version == "HTTP/1.1"

