"""What every HTTP handler shares: the context it is handed, the JSON envelope, auth, and error mapping.

Handlers get their collaborators through the route kwargs (`initialize(ctx=...)`), never from globals. A
domain error raised anywhere in a handler becomes, here and only here, the HTTP status and the
`{"success": false, "error"}` body of PROTOCOL section 2.
"""

from __future__ import annotations

import ipaddress
import logging
import weakref
from collections.abc import Sequence
from typing import Any

import attrs
import tornado.web

from chatserver import jsonutil
from chatserver.broadcaster import Broadcaster
from chatserver.cluster import Peers
from chatserver.config import Config
from chatserver.errors import ChatError, TooLarge, TooManyRequests, Unauthorized, Unavailable
from chatserver.jsonutil import error_body
from chatserver.metrics import Metrics
from chatserver.numbers import is_ascii_decimal
from chatserver.redaction import redact
from chatserver.service import ChatService
from transport import compat
from transport.access import log_access
from transport.outbox import TurnBatcher
from transport.poll import ParkedPolls

log = logging.getLogger("chatserver.http")

STATUS = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "too_many_requests": 429,
    "unavailable": 503,
}


@attrs.define(slots=True, eq=False)
class AppContext:
    """The collaborators handlers need, built once in `run.py` (or a test) and passed through routes."""

    service: ChatService
    broadcaster: Broadcaster
    config: Config
    metrics: Metrics
    # What this process tells the others that share its database (wake-ups, typing).
    peers: Peers
    # Named parts that /readyz reports on; each answers "" when usable, else what is wrong.
    readiness: dict[str, Any] = attrs.Factory(dict)
    # Open real-time connections, so that shutdown can close them (WebSocket, SSE, parked polls).
    connections: set[Any] = attrs.Factory(set)
    # HTTP requests being handled (from the handler's start to its finish), so that shutdown can wait for them.
    requests: weakref.WeakSet[Any] = attrs.Factory(weakref.WeakSet)
    # The WebSocket frames waiting for the end of this turn of the loop (outbox.py), flushed before poll answers.
    batcher: TurnBatcher = attrs.Factory(TurnBatcher)
    # Tasks started outside any request's own (a lean poll's replay from the store), held until done.
    background: set[Any] = attrs.Factory(set)
    shutting_down: bool = False
    # The parked long-polls of both paths (the lean one and PollHandler).
    polls: ParkedPolls = attrs.Factory(
        lambda ctx: ParkedPolls(ctx.broadcaster, ctx.metrics, ctx.connections, ctx.batcher,
                                linger=ctx.config.poll_receipt_linger), takes_self=True)


def implemented_methods(handler_class: type[tornado.web.RequestHandler]) -> tuple[str, ...]:
    """The methods a handler class implements: what the `Allow` header of its 405 lists (RFC 9110 10.2.1)."""
    base = tornado.web.RequestHandler
    return tuple(
        method for method in base.SUPPORTED_METHODS
        if getattr(handler_class, method.lower(), None) is not getattr(base, method.lower(), None)
    )


def client_address(request: Any, proxies: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str:
    """The address of the client behind a request: the peer's, or where the peer is a trusted proxy, the nearest
    address in X-Forwarded-For that is not one (what came before it, the client wrote: it is not believed)."""
    address: str = request.remote_ip or ""
    if not proxies or not _is_among(address, proxies):
        return address
    hops = [hop.strip() for field in request.headers.get_list("X-Forwarded-For") for hop in field.split(",")]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return address  # not what a proxy of ours appends: the last address known for sure
        if not _is_among(hop, proxies):
            return hop
        address = hop
    return address


def _is_among(address: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's `log_function`: one access line per request, with secrets redacted."""
    ctx = getattr(handler, "ctx", None)
    log_access(ctx.metrics if isinstance(ctx, AppContext) else None, handler.request, handler.get_status(),
               type(handler).__name__)


class JsonErrors(tornado.web.RequestHandler):
    """The one place where an exception becomes an HTTP status and a JSON error body."""

    ctx: AppContext

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Only what the class implements, unless it names its own: any other method is a 405 before prepare()
        # looks at a token or a dialog.
        if "SUPPORTED_METHODS" not in cls.__dict__:
            cls.SUPPORTED_METHODS = implemented_methods(cls)

    def initialize(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.service = ctx.service
        ctx.requests.add(self)

    def on_finish(self) -> None:
        # The response is written (a WebSocket's at its upgrade): no longer in flight.
        self.ctx.requests.discard(self)

    def on_connection_close(self) -> None:
        # The client went away: nobody is waiting for an answer, and a handler still reading a body never
        # finishes (Tornado drops it), so shutdown must not wait for it.
        self.ctx.requests.discard(self)
        super().on_connection_close()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        message = compat.status_reason(self)
        exc_info = kwargs.get("exc_info")
        error = exc_info[1] if exc_info else None
        if isinstance(error, ChatError):
            status_code = STATUS.get(error.code, 400)
            message = error.message
            self.set_status(status_code)
            if isinstance(error, TooManyRequests):
                self.set_header("Retry-After", str(error.retry_after))
            elif isinstance(error, Unavailable):
                self.set_header("Retry-After", "1")
        elif isinstance(error, tornado.web.HTTPError) and error.log_message:
            message = error.log_message % error.args if error.args else error.log_message
        if status_code == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="chatserver"')
        elif status_code == 405:
            self.set_header("Allow", ", ".join(self.SUPPORTED_METHODS))
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(error_body(message))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ChatError | tornado.web.HTTPError):
            return  # an answer the code chose (bad input, shutting down), already in the access log with its status
        # Not Tornado's own line: it prints the request's URI, and with it a `?token=`.
        log.error("uncaught exception in %s %s", self.request.method, redact(self.request.uri or ""),
                  exc_info=(typ, value, tb))


class JsonHandler(JsonErrors):
    """Base of every JSON endpoint: envelope, errors as JSON, no caching."""

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    def reply(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(jsonutil.dumps({"success": True, "data": data}))


@tornado.web.stream_request_body
class ApiHandler(JsonHandler):
    """An authenticated `/api/` endpoint whose body is read up to `max_body_size` and no further."""

    requires_auth = True
    user_id: str

    async def prepare(self) -> None:
        self._body = bytearray()
        limit = self.ctx.config.max_body_size
        length = self.request.headers.get("Content-Length")
        if length is not None and is_ascii_decimal(length) and int(length) > limit:
            # Answered before a byte of the body is read; finishing early makes Tornado close the connection
            # rather than read the rest.
            raise TooLarge(f"the body is larger than {limit} bytes")
        if self.requires_auth:
            self.user_id = await self.authenticate()

    def data_received(self, chunk: bytes) -> None:
        if compat.handler_finished(self):
            return
        limit = self.ctx.config.max_body_size
        if len(self._body) + len(chunk) > limit:
            # A chunked body has no length to refuse up front: it gets its 413 as soon as it outgrows the limit
            # (and the connection is closed), before the server's hard stop would answer a bare 400.
            self._body.clear()
            error = TooLarge(f"the body is larger than {limit} bytes")
            self.send_error(413, exc_info=(TooLarge, error, None))
            return
        self._body.extend(chunk)

    async def authenticate(self) -> str:
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
        return await self.service.authenticate(token.strip())

    def json_body(self) -> dict[str, Any]:
        return jsonutil.loads_object(bytes(self._body))


class NotFoundHandler(JsonHandler):
    """Any path without a route: a JSON 404, not Tornado's HTML page."""

    SUPPORTED_METHODS = tornado.web.RequestHandler.SUPPORTED_METHODS

    def prepare(self) -> None:
        raise tornado.web.HTTPError(404, "no such endpoint")
