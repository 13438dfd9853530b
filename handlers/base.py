"""What every HTTP handler shares: the context it is handed, the JSON envelope, auth, and error mapping.

Handlers get their collaborators through the route kwargs (`initialize(ctx=...)`), never from globals. A
domain error raised anywhere in a handler becomes, here and only here, the HTTP status and the
`{"success": false, "error"}` body of PROTOCOL section 2.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import weakref
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import unquote, unquote_plus

import attrs
import tornado.web

from chatserver import jsonutil
from chatserver.auth import token_spans
from chatserver.broadcaster import Broadcaster
from chatserver.cluster import Peers
from chatserver.config import Config
from chatserver.errors import ChatError, TooLarge, TooManyRequests, Unauthorized, Unavailable
from chatserver.metrics import Metrics
from chatserver.service import ChatService
from handlers.outbox import TurnBatcher
from transport import compat

log = logging.getLogger("chatserver.http")
access_log = logging.getLogger("chatserver.access")

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
# A value ends at '&', or at whitespace where a whole log line is redacted (run.py's log formatter).
_SECRET_PARAM = re.compile(r"(?i)\b(token|access_token|ticket|password)=[^&\s]*")
# A query parameter whose name is percent-encoded (`?%74oken=`): Tornado decodes names, so it may be a secret too.
_ENCODED_PARAM = re.compile(r"(?<=[?&])([^=&\s]*%[^=&\s]*)=[^&\s]*")
_SECRET_NAMES = frozenset(("token", "access_token", "ticket", "password"))
_SCHEMES = ("bearer", "basic", "digest", "negotiate", "ntlm", "token")
# A credential after its scheme, as Tornado logs a header value it refuses (`'Bearer <token>\x00'`, repr-escaped),
# whatever separates the two (`Bearer,<token>`).
_SCHEME_CREDENTIAL = re.compile(
    r"(?i)\b(bearer|basic|digest|negotiate|ntlm|(?-i:Token))(?:[\s,:=]|\\t|\\x[0-9a-f]{2})+[^\s'\"&,]+"
)
# The value of an auth-like header wherever a line names one: `Cookie: <value>` (to the end of the line or of the
# folded traceback's part), or `'Authorization': '<value>'` as a dict of headers prints.
_AUTH_FIELD = re.compile(
    r"(?i)(?<![\w-])((?:proxy-)?authorization|(?:set-)?cookie|sec-websocket-protocol"
    r"|x-[a-z0-9-]*(?:auth|token|key|secret|session)[a-z0-9-]*)(['\"]?[ \t]*[:=][ \t]*)"
    r"('(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"|[^\s'\"|\\](?:[^\r\n'\"|\\]*[^\s'\"|\\])?)"
)
_AUTH_NAMES = ("authorization", "cookie", "sec-websocket-protocol", "x-")
# A header value Tornado refuses (`Invalid header value '<value>'`): the line does not say which header it was, so
# it may be any credential: the value is dropped whatever it is.
_REFUSED_VALUE = re.compile(r"(Invalid header value )(?:'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\")")
# A run of URL characters with percent-escapes in it, which may spell a token once decoded (`<body>%2E<signature>`).
# It starts only where such a run starts: linear in the line's length.
_ESCAPED_RUN = re.compile(r"(?<![A-Za-z0-9_.~%-])(?:[A-Za-z0-9_.~-]|%[0-9A-Fa-f]{2})*%[0-9A-Fa-f]{2}[A-Za-z0-9_.~%-]*")
REDACTED = "[redacted]"


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


def error_body(message: str) -> bytes:
    """PROTOCOL section 2's error envelope, as every refusal carries it (handlers, and handlers/http1.py's own)."""
    return jsonutil.dumps_bytes({"success": False, "error": message})


def implemented_methods(handler_class: type[tornado.web.RequestHandler]) -> tuple[str, ...]:
    """The methods a handler class implements: what the `Allow` header of its 405 lists (RFC 9110 10.2.1)."""
    base = tornado.web.RequestHandler
    return tuple(
        method for method in base.SUPPORTED_METHODS
        if getattr(handler_class, method.lower(), None) is not getattr(base, method.lower(), None)
    )


def redact(text: str) -> str:
    """The URI (or a whole log line) with every credential in it replaced: a log must never hold one.

    By value: anything shaped like a token (chatserver.auth.token_spans), also percent-encoded, wherever it is.
    By field: `token=`/`password=` parameters, a credential after an auth scheme, the value of an auth-like header
    (Authorization, Cookie, Sec-WebSocket-Protocol, X-Auth-…), and a header value Tornado refused unnamed. Each
    pattern runs only on a line holding the words it needs: this runs on every access line.
    """
    lower = text.lower()
    if "token=" in lower or "password=" in lower:
        text = _SECRET_PARAM.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    if any(scheme in lower for scheme in _SCHEMES):
        text = _SCHEME_CREDENTIAL.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    if any(name in lower for name in _AUTH_NAMES):
        text = _AUTH_FIELD.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    if "Invalid header value" in text:
        text = _REFUSED_VALUE.sub(lambda m: f"{m.group(1)}{REDACTED}", text)
    text = _redact_spans(text, token_spans(text))
    if "%" in text:
        text = _ESCAPED_RUN.sub(_redact_escaped, text)
        text = _ENCODED_PARAM.sub(
            lambda m: f"{m.group(1)}={REDACTED}" if unquote_plus(m.group(1)).lower() in _SECRET_NAMES else m.group(0),
            text,
        )
    return text


def _redact_spans(text: str, spans: Iterable[tuple[int, int]]) -> str:
    parts, end = [], 0
    for start, stop in spans:
        parts += (text[end:start], REDACTED)
        end = stop
    return "".join((*parts, text[end:])) if parts else text


def _redact_escaped(match: re.Match[str]) -> str:
    """The run, or REDACTED where it decodes (once, twice or three times: a path may be encoded over again) to
    something holding a token."""
    run = decoded = match.group(0)
    for _ in range(3):
        decoded = unquote(decoded)
        if next(token_spans(decoded), None) is not None:
            return REDACTED
        if "%" not in decoded:
            break
    return run

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
    log_access(ctx if isinstance(ctx, AppContext) else None, handler.request, handler.get_status(),
               type(handler).__name__)


def log_access(
    ctx: AppContext | None, request: Any, status: int, handler_name: str, latency: Any = None
) -> None:
    """The access line and the latency metric of one request (also for handlers/fastpoll.py's lean polls).

    `latency` is the metric's child for this method and handler where the caller has it at hand.
    """
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if access_log.isEnabledFor(level):  # redact() is a regex: not run for a line nobody will read
        access_log.log(
            level, "%d %s %s (%s) %.1fms",
            status, request.method, redact(request.uri or ""), request.remote_ip, 1000.0 * request.request_time(),
        )
    if ctx is not None:
        if latency is None:
            latency = ctx.metrics.request_latency.labels(request.method, handler_name)
        latency.observe(request.request_time())


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
        message = self._reason
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
        if length is not None and length.isascii() and length.isdecimal() and int(length) > limit:
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
