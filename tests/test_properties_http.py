"""Property tests (Hypothesis) of what clients send, over real sockets to a real server.

Request heads for the HTTP layer: well-formed ones, in every shape the RFCs allow (any order and case,
connection options in lists and in several fields, both versions; CRLF line ends), get their endpoint's answer
and the keep-alive RFC 9112 calls for; heads with a defect the RFCs require a server to refuse, and any head with a
bare LF (which RFC 9112 2.2 lets a server refuse, and this one does), get a JSON 400 (or 431) and the end of the
connection; any byte-level mutation of a head gets well-formed answers and never a 5xx.
WebSocket frames from clients (RFC 6455): messages in fragments with control frames between them and any mask
get their replies and pongs; every violation (an unmasked frame, reserved bits or opcodes, broken
fragmentation, an oversized or fragmented control frame, text that is not UTF-8, a bad close, a message over the
limit) gets a Close frame with 1002, 1007 or 1009. After every input, the server still serves another client,
every connection it held has ended, and nothing was logged as an error.

The oracles are the RFCs and docs/protocol.md, not a parser: they hold whichever parser the server uses.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import string
import struct
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import pytest
import tornado.httputil
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from chatserver import jsonutil
from handlers.base import AppContext
from tests.conftest import Client
from tests.test_http1 import JSON, Answer, assert_eof, connect, port_of, read_answer

WAIT = 5.0
PROPERTY = settings(
    max_examples=100,
    deadline=None,
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TOKEN_CHARS = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
# Fields whose meaning the generated requests must not change by chance (framing, routing, auth, caching, proxies).
MEANINGFUL = frozenset((
    "host", "content-length", "transfer-encoding", "connection", "expect", "upgrade", "authorization", "cookie",
    "if-none-match", "if-modified-since", "if-match", "range", "last-event-id", "origin", "x-real-ip",
    "x-forwarded-for", "x-scheme", "x-forwarded-proto", "accept-encoding", "content-encoding", "keep-alive", "te",
    "trailer", "proxy-connection", "sec-websocket-key", "sec-websocket-version",
))
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def run(io_loop: Any, check: Callable[[], Awaitable[None]], timeout: float = 30) -> None:
    io_loop.run_sync(check, timeout=timeout)


def assert_no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, "\n".join(r.getMessage() for r in errors[:3])


async def assert_serves_others(port: int) -> None:
    async with connect(port) as (reader, writer):
        writer.write(HEALTH)
        answer = await read_answer(reader)
    assert answer.status == 200 and answer.json() == {"success": True, "data": {"status": "ok"}}


def assert_json_error(answer: Answer) -> None:
    assert answer.headers.get("Content-Type") == JSON, answer
    body = answer.json()
    assert body["success"] is False and isinstance(body["error"], str) and body["error"], body


# -- request heads -------------------------------------------------------------------------------------------


class Endpoint(NamedTuple):
    method: str
    path: str
    with_token: bool
    status: int
    may_have_body: bool


ENDPOINTS = [
    Endpoint("GET", "/healthz", False, 200, False),
    Endpoint("GET", "/api/me", True, 200, True),
    Endpoint("GET", "/api/me", False, 401, False),
    Endpoint("GET", "/api/poll?cursor={cursor}&timeout=0", True, 200, True),  # the lean poll, or with a body not
    Endpoint("GET", "/api/nowhere", False, 404, False),
    Endpoint("POST", "/healthz", False, 405, True),
    Endpoint("DELETE", "/healthz", False, 405, True),
]


class Head(NamedTuple):
    """A generated request: its bytes, and what the RFCs make of it."""

    raw: bytes
    endpoint: Endpoint
    version: str
    keep_alive: bool


field_names = st.text(TOKEN_CHARS, min_size=1, max_size=16).filter(lambda name: name.lower() not in MEANINGFUL)
# Visible ASCII, spaces and tabs inside, and obs-text (RFC 9110 5.5); no leading or trailing whitespace.
field_values = st.text(st.sampled_from([chr(c) for c in range(0x20, 0x7F)] + ["\t"] + [chr(c) for c in (0x80, 0xE9,
                                                                                                          0xFF)]),
                       max_size=30).map(lambda value: value.strip(" \t"))
options = st.lists(st.sampled_from(["close", "CLOSE", "Close", "keep-alive", "Keep-Alive", "foo", "te", "upgrade"]),
                   min_size=1, max_size=3)


@pytest.fixture
def store_kind() -> str:
    """The HTTP layer's properties do not depend on the store: one is enough."""
    return "sqlite"


@pytest.fixture
def http_engine() -> str:
    """The lean engine's own contract, byte by byte (JSON refusals, the parser's reasons, its bounds): with the
    Tornado engine, Tornado's HTTP1Connection answers malformed requests its own way (docs/protocol.md, "HTTP")."""
    return "lean"


@st.composite
def heads(draw: st.DrawFn, token: str, cursor: str, endpoints: list[Endpoint] = ENDPOINTS) -> Head:
    endpoint = draw(st.sampled_from(endpoints))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0"]))
    path = endpoint.path.format(cursor=cursor)
    if "?" not in path and draw(st.booleans()):
        path += "?" + draw(st.text(string.ascii_letters + string.digits + "=&-_.~", max_size=20))
    fields = [("Host", draw(st.sampled_from(["127.0.0.1", "localhost", "example.com:8080", "x"])))]
    if endpoint.with_token:
        fields.append(("Authorization", f"{draw(st.sampled_from(['Bearer', 'bearer', 'BEARER']))} {token}"))
    fields += draw(st.lists(st.tuples(field_names, field_values), max_size=4))
    connection_fields = draw(st.lists(options, max_size=2))
    for chosen in connection_fields:
        fields.append(("Connection", draw(st.sampled_from([",", ", ", " ,", ",\t"])).join(chosen)))
    body, has_length = b"", endpoint.may_have_body and draw(st.booleans())
    if has_length:
        body = draw(st.binary(max_size=40))
        fields.append(("Content-Length", str(len(body))))
    fields = draw(st.permutations(fields))
    ending = "\r\n"  # a bare LF is refused (a defect below)
    lines = [f"{endpoint.method} {path} {version}"] + [
        f"{name}:{draw(st.sampled_from(['', ' ', '  ', chr(9)]))}{value}" for name, value in fields
    ]
    raw = draw(st.sampled_from(["", "\r\n", "\r\n\r\n"])) + ending.join(lines) + ending + ending
    chosen_options = {option.lower() for chosen in connection_fields for option in chosen}
    if "close" in chosen_options:
        keep_alive = False
    elif version == "HTTP/1.1":
        keep_alive = True
    else:  # HTTP/1.0: kept on request, where the request's end is known
        keep_alive = "keep-alive" in chosen_options and (endpoint.method == "GET" or has_length)
    return Head(raw.encode("latin1") + body, endpoint, version, keep_alive)


def test_well_formed_request_heads_get_their_answer_and_the_keep_alive_the_rfc_calls_for(
    io_loop: Any, alice: Client, base_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = port_of(base_url)
    cursor = alice.ctx.broadcaster.cursor()

    @PROPERTY
    @given(head=heads(alice.token, cursor))
    def check(head: Head) -> None:
        note(f"sent {head.raw!r}")

        async def exchange() -> None:
            async with connect(port) as (reader, writer):
                writer.write(head.raw)
                answer = await read_answer(reader)
                assert answer.status == head.endpoint.status, (answer, head.raw)
                if answer.status >= 400:
                    assert_json_error(answer)
                if head.version == "HTTP/1.1":
                    assert (answer.headers.get("Connection") == "close") is not head.keep_alive, (answer, head.raw)
                else:
                    assert (answer.headers.get("Connection") == "Keep-Alive") is head.keep_alive, (answer, head.raw)
                if head.keep_alive:
                    writer.write(HEALTH)
                    assert (await read_answer(reader)).status == 200
                else:
                    await assert_eof(reader)

        run(io_loop, exchange)

    check()
    assert_no_errors_logged(caplog)
    run(io_loop, lambda: assert_serves_others(port))


class Defect(NamedTuple):
    name: str
    apply: Callable[[list[str]], list[str]]
    status: int
    # Where the RFCs let a server either refuse or go on (replace with a space, ignore the line), both are right.
    may_be_served: bool = False
    also: int = 0  # another status the RFCs allow


def _with_field(line: str) -> Callable[[list[str]], list[str]]:
    return lambda lines: [*lines, line]


def _in_request_line(make: Callable[[str, str, str], str]) -> Callable[[list[str]], list[str]]:
    def apply(lines: list[str]) -> list[str]:
        method, target, version = lines[0].split(" ")
        return [make(method, target, version), *lines[1:]]

    return apply


DEFECTS = [
    # RFC 9112 5.1: no whitespace between a field name and its colon (a server MUST refuse with 400).
    Defect("space-before-colon", _with_field("X-Space : y"), 400),
    Defect("tab-before-colon", _with_field("X-Tab\t: y"), 400),
    Defect("no-colon", _with_field("just some words"), 400),
    Defect("empty-name", _with_field(": nameless"), 400),
    *(Defect(f"bad-name-{ord(c):x}", _with_field(f"X{c}Y: z"), 400) for c in '()<>@"/[]?={}\x7f\xe9'),
    # RFC 9112 6.3: an invalid or ambiguous length is unrecoverable.
    *(Defect(f"content-length-{value!r}", _with_field(f"Content-Length: {value}"), 400)
      for value in ("abc", "-1", "+1", "1.0", "0x1", "", "1 2", "\xb2", "1, 2")),
    Defect("two-content-lengths", lambda lines: [*lines, "Content-Length: 1", "Content-Length: 2"], 400),
    # RFC 9112 3.2: an HTTP/1.1 request without a Host, or with two, MUST be refused with 400.
    Defect("no-host", lambda lines: [line for line in lines if not line.lower().startswith("host:")], 400),
    Defect("two-hosts", _with_field("Host: elsewhere.example"), 400),
    # RFC 9112 3: the request line is method SP target SP version.
    *(Defect(f"version-{version}", _in_request_line(lambda m, t, _, v=version: f"{m} {t} {v}"), 400)
      for version in ("HTTP/1", "http/1.1", "HTTP/1.1.1", "HTTP/x.y", "HTTP/11")),
    # A version of the right shape that this server does not speak: 505 says so (RFC 9110 15.6.6), 400 refuses it.
    Defect("version-HTTP/2.0", _in_request_line(lambda m, t, v: f"{m} {t} HTTP/2.0"), 400, also=505),
    # RFC 9112 3: a recipient MAY split the request line at any run of whitespace (llhttp reads two spaces as one).
    Defect("two-spaces", _in_request_line(lambda m, t, v: f"{m}  {t} {v}"), 400, may_be_served=True),
    Defect("four-parts", _in_request_line(lambda m, t, v: f"{m} {t} {v} extra"), 400),
    Defect("no-version", _in_request_line(lambda m, t, v: f"{m} {t}"), 400),
    Defect("bad-method", _in_request_line(lambda m, t, v: f"G(E)T {t} {v}"), 400),
    # RFC 9112 6.1: a Transfer-Encoding this server cannot read, or in HTTP/1.0 (here HTTP/1.1 requests).
    Defect("transfer-encoding-gzip", _with_field("Transfer-Encoding: gzip"), 400),
    Defect("transfer-encoding-and-length", lambda lines: [*lines, "Transfer-Encoding: chunked",
                                                          "Content-Length: 0"], 400),
    Defect("header-block-over-16k", _with_field("X-Big: " + "b" * 17000), 431),
    # Either refused or served: obs-fold (RFC 9112 5.2), a field line after the request line that starts with
    # whitespace (2.2), a NUL, CR or other control byte in a value (RFC 9110 5.5).
    Defect("obs-fold", lambda lines: [*lines, "X-Fold: a", " b"], 400, may_be_served=True),
    Defect("whitespace-first-line", lambda lines: [lines[0], " X-Indented: y", *lines[1:]], 400, may_be_served=True),
    *(Defect(f"control-{ord(c):x}-in-value", _with_field(f"X-Ctl: a{c}b"), 400, may_be_served=True)
      for c in "\x00\r\x01\x1b\x7f"),
]


def test_request_heads_with_a_defect_the_rfcs_refuse_get_a_json_refusal_and_the_end(
    io_loop: Any, alice: Client, base_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = port_of(base_url)

    @PROPERTY
    @given(defect=st.sampled_from(DEFECTS), extra=st.lists(st.tuples(field_names, field_values), max_size=3),
           bare_lf=st.booleans())
    def check(defect: Defect, extra: list[tuple[str, str]], bare_lf: bool) -> None:
        lines = ["GET /healthz HTTP/1.1", "Host: x", *(f"{name}: {value}" for name, value in extra)]
        ending = "\n" if bare_lf else "\r\n"
        raw = (ending.join(defect.apply(lines)) + ending + ending).encode("latin1")
        note(f"{defect.name}: sent {raw!r}")

        async def exchange() -> None:
            async with connect(port) as (reader, writer):
                writer.write(raw)
                answer = await read_answer(reader)
                if defect.may_be_served and answer.status == 200 and not bare_lf:
                    return
                assert answer.status in (defect.status, defect.also), (defect.name, answer)
                assert_json_error(answer)
                assert answer.headers["Connection"] == "close"
                await assert_eof(reader)

        run(io_loop, exchange)

    check()
    assert_no_errors_logged(caplog)
    run(io_loop, lambda: assert_serves_others(port))


def parse_answers(data: bytes, *, heads_only: bool) -> list[tuple[int, tornado.httputil.HTTPHeaders, bytes]]:
    """Every whole answer in `data`, in order (a cut-off last one is left out). `heads_only`: only the first
    answer, without its body (an answer to a HEAD has a length and no body, so what follows cannot be split)."""
    answers = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        first, _, fields = head.decode("latin1").partition("\r\n")
        start = tornado.httputil.parse_response_start_line(first)
        headers = tornado.httputil.HTTPHeaders.parse(fields)
        if heads_only:
            return [(start.code, headers, b"")]
        length = int(headers.get("Content-Length", "0"))
        if start.code < 200 or start.code in (204, 304):
            length = 0
        if len(rest) < length:
            break
        answers.append((start.code, headers, rest[:length]))
        data = rest[length:]
    return answers


def test_any_mutation_of_a_request_head_gets_well_formed_answers_and_never_a_5xx(
    io_loop: Any, alice: Client, base_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = port_of(base_url)
    cursor = alice.ctx.broadcaster.cursor()

    @PROPERTY
    @given(head=heads(alice.token, cursor), at=st.floats(0, 1), cut=st.integers(0, 8), noise=st.binary(max_size=12))
    def check(head: Head, at: float, cut: int, noise: bytes) -> None:
        position = int(at * len(head.raw))
        raw = head.raw[:position] + noise + head.raw[position + cut:] + b"\r\n\r\n"
        note(f"sent {raw!r}")

        async def exchange() -> None:
            sock = socket.socket()
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            loop_time = loop.time
            try:
                await loop.sock_connect(sock, ("127.0.0.1", port))
                await loop.sock_sendall(sock, raw)
                sock.shutdown(socket.SHUT_WR)  # nothing more comes: every wait of the server ends at once
                data, deadline = b"", loop_time() + WAIT
                while loop_time() < deadline:
                    try:
                        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), deadline - loop_time())
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    data += chunk
                else:
                    raise AssertionError(f"the connection was not ended: {raw!r}")
            finally:
                sock.close()
            heads_only = b"HEAD" in raw.upper()
            for status, headers, body in parse_answers(data, heads_only=heads_only):
                assert status < 500, (status, raw)
                if status >= 400 and not heads_only and not tornado_refusal(raw, status, headers, body):
                    assert headers["Content-Type"] == JSON, (status, raw)
                    assert jsonutil.loads(body)["success"] is False

        run(io_loop, exchange)

    check()
    assert_no_errors_logged(caplog)
    run(io_loop, lambda: assert_serves_others(port))


def tornado_refusal(raw: bytes, status: int, headers: tornado.httputil.HTTPHeaders, body: bytes) -> bool:
    """Tornado's own bare 400, which only a connection it serves can get (docs/protocol.md, "HTTP"): one whose
    first request is for the SSE stream or the WebSocket endpoint, or a chunked body it reads."""
    bare = status == 400 and not body and "Content-Type" not in headers
    handed = raw.lstrip(b"\r\n").startswith((b"GET /ws", b"GET /api/events")) or b"transfer-encoding" in raw.lower()
    return bare and handed


# -- WebSocket frames ----------------------------------------------------------------------------------------

MAX_MESSAGE = 65536  # the server's max_body_size, its largest WebSocket message


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = b"\0\0\0\0",
                 rsv: int = 0) -> bytes:
    first = (0x80 if fin else 0) | rsv | opcode
    masked = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        head = bytes((first, masked | n))
    elif n < 65536:
        head = bytes((first, masked | 126)) + struct.pack("!H", n)
    else:
        head = bytes((first, masked | 127)) + struct.pack("!Q", n)
    if mask is None:
        return head + payload
    key = (mask * (n // 4 + 1))[:n]
    return head + mask + (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


class Message(NamedTuple):
    payload: bytes
    reply: dict[str, Any]


def messages(dialog_id: str) -> st.SearchStrategy[Message]:
    padding = st.integers(0, 300).map(lambda n: b" " * n)
    kinds = st.sampled_from([
        (b'{"type": "ping"}', {"type": "pong"}),
        (b"not json", {"type": "error", "data": {"code": "bad_request"}}),
        (b'{"type": "nope"}', {"type": "error", "data": {"code": "bad_request"}}),
        (b"[1, 2]", {"type": "error", "data": {"code": "bad_request"}}),
        (jsonutil.dumps_bytes({"type": "dialog:join", "dialogId": dialog_id}),
         {"type": "dialog:joined", "data": {"dialogId": dialog_id}}),
        (jsonutil.dumps_bytes({"type": "dialog:leave", "dialogId": dialog_id}),
         {"type": "dialog:left", "data": {"dialogId": dialog_id}}),
        ('{"type": "ping", "note": "привет"}'.encode(), {"type": "pong"}),
    ])
    return st.builds(lambda kind, pad: Message(pad + kind[0] + pad, kind[1]), kinds, padding)


@st.composite
def sent_messages(draw: st.DrawFn, dialog_id: str) -> tuple[bytes, list[dict[str, Any]], list[bytes]]:
    """Messages in fragments (text or binary, each fragment with a mask of its own) with pings and pongs between
    them: the bytes, the replies they call for in order, and the pings' payloads in order."""
    frames, replies, pings = [], [], []
    for message in draw(st.lists(messages(dialog_id), max_size=4)):
        cuts = sorted(draw(st.lists(st.integers(0, len(message.payload)), max_size=3)))
        pieces = [message.payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(message.payload)], strict=True)]
        opcode = draw(st.sampled_from([0x1, 0x2]))
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            frames.append(client_frame(opcode if index == 0 else 0x0, piece, fin=last,
                                       mask=draw(st.binary(min_size=4, max_size=4))))
            for control in draw(st.lists(st.sampled_from([0x9, 0xA]), max_size=2)):
                payload = draw(st.binary(max_size=125))
                frames.append(client_frame(control, payload, mask=draw(st.binary(min_size=4, max_size=4))))
                if control == 0x9:
                    pings.append(payload)
        replies.append(message.reply)
    return b"".join(frames), replies, pings


class Ending(NamedTuple):
    name: str
    frames: bytes
    close_code: int | None  # the code of the server's Close frame; None: it echoes an empty close


PING = b'{"type": "ping"}'
VALID_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4000, 4999]
INVALID_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535]
NOT_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"ok\xe2\x82"]


@st.composite
def endings(draw: st.DrawFn) -> Ending:
    mask = draw(st.binary(min_size=4, max_size=4))
    kind = draw(st.sampled_from([
        "valid-close", "empty-close", "unmasked", "reserved-bits", "reserved-opcode", "long-control",
        "fragmented-control", "lone-continuation", "new-message-mid-message", "not-utf8", "short-close",
        "bad-close-code", "close-reason-not-utf8", "too-big",
    ]))
    if kind == "valid-close":
        code = draw(st.sampled_from(VALID_CODES))
        reason = draw(st.text(max_size=30)).encode()[:120]
        return Ending(kind, client_frame(0x8, struct.pack("!H", code) + reason, mask=mask), code)
    if kind == "empty-close":
        return Ending(kind, client_frame(0x8, b"", mask=mask), None)
    if kind == "unmasked":
        return Ending(kind, client_frame(draw(st.sampled_from([0x1, 0x9])), PING, mask=None), 1002)
    if kind == "reserved-bits":
        return Ending(kind, client_frame(0x1, PING, mask=mask, rsv=draw(st.sampled_from([0x10, 0x20, 0x40, 0x70]))),
                      1002)
    if kind == "reserved-opcode":
        opcode = draw(st.sampled_from([0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF]))
        return Ending(kind, client_frame(opcode, b"", mask=mask), 1002)
    if kind == "long-control":
        size = draw(st.integers(126, 1000))
        return Ending(kind, client_frame(draw(st.sampled_from([0x8, 0x9, 0xA])), b"x" * size, mask=mask), 1002)
    if kind == "fragmented-control":
        return Ending(kind, client_frame(draw(st.sampled_from([0x9, 0xA])), b"p", fin=False, mask=mask), 1002)
    if kind == "lone-continuation":
        return Ending(kind, client_frame(0x0, PING, fin=draw(st.booleans()), mask=mask), 1002)
    if kind == "new-message-mid-message":
        return Ending(kind, client_frame(0x1, PING[:4], fin=False, mask=mask) + client_frame(0x1, PING, mask=mask),
                      1002)
    if kind == "not-utf8":
        payload = b"x" * draw(st.integers(0, 20)) + draw(st.sampled_from(NOT_UTF8))
        split = draw(st.integers(0, len(payload)))
        frames = (client_frame(0x1, payload, mask=mask) if split in (0, len(payload)) else
                  client_frame(0x1, payload[:split], fin=False, mask=mask) + client_frame(0x0, payload[split:],
                                                                                           mask=mask))
        return Ending(kind, frames, 1007)
    if kind == "short-close":
        return Ending(kind, client_frame(0x8, b"\x03", mask=mask), 1002)
    if kind == "bad-close-code":
        return Ending(kind, client_frame(0x8, struct.pack("!H", draw(st.sampled_from(INVALID_CODES))), mask=mask),
                      1002)
    if kind == "close-reason-not-utf8":
        code = draw(st.sampled_from(VALID_CODES))
        return Ending(kind, client_frame(0x8, struct.pack("!H", code) + draw(st.sampled_from(NOT_UTF8)), mask=mask),
                      1007)
    pieces = draw(st.integers(1, 3))  # too big: a message one byte over the limit, whole or in fragments
    size = MAX_MESSAGE + 1
    step = -(-size // pieces)
    frames = b"".join(client_frame(0x1 if i == 0 else 0x0, b" " * min(step, size - i * step), fin=(i == pieces - 1),
                                   mask=mask) for i in range(pieces))
    return Ending(kind, frames, 1009)


async def read_server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await asyncio.wait_for(reader.readexactly(2), WAIT)
    assert not second & 0x80, "a server's frames are never masked"
    assert first & 0x80 and not first & 0x70, "whole frames, no extension"
    length = second & 0x7F
    if length == 126:
        length = struct.unpack("!H", await reader.readexactly(2))[0]
    elif length == 127:
        length = struct.unpack("!Q", await reader.readexactly(8))[0]
    return first & 0x0F, await asyncio.wait_for(reader.readexactly(length), WAIT)


async def read_past_pings(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The server's next frame other than a ping: the keep-alive sweep (transport/pings.py) pings every socket on its
    own clock, so its ping may come before any frame, even the ready frame (queued) or the echo of a close."""
    opcode, payload = await read_server_frame(reader)
    while opcode == 0x9:
        opcode, payload = await read_server_frame(reader)
    return opcode, payload


def matches(reply: dict[str, Any], expected: dict[str, Any]) -> bool:
    """The reply is the expected one (an error frame's message text is free)."""
    if reply.get("type") != expected["type"]:
        return False
    return all(reply.get("data", {}).get(key) == value for key, value in expected.get("data", {}).items())


async def open_websocket(port: int, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 101"), head
    opcode, ready = await read_past_pings(reader)
    assert opcode == 0x1 and jsonutil.loads(ready)["type"] == "ready"
    return reader, writer


def test_websocket_frames_from_clients_get_their_replies_or_the_right_close_code(
    io_loop: Any, alice: Client, base_url: str, dialog_id: str, ctx: AppContext, caplog: pytest.LogCaptureFixture
) -> None:
    port = port_of(base_url)
    bystander = io_loop.run_sync(alice.websocket)  # another client, served throughout

    @PROPERTY
    @given(sent=sent_messages(dialog_id), ending=st.none() | endings())
    def check(sent: tuple[bytes, list[dict[str, Any]], list[bytes]], ending: Ending | None) -> None:
        frames, replies, pings = sent
        note(f"frames {frames[:200]!r}, then {ending.name if ending else 'a ping message and a ping'}")

        async def exchange() -> None:
            reader, writer = await open_websocket(port, alice.token)
            try:
                if ending is None:  # then a last message and a last ping, whose answers come last
                    last_ping = os.urandom(8)
                    writer.write(frames + client_frame(0x1, PING) + client_frame(0x9, last_ping))
                    expected, all_pings = [*replies, {"type": "pong"}], [*pings, last_ping]
                else:
                    writer.write(frames + ending.frames)
                    expected, all_pings = replies, pings
                got, pongs, close = [], [], None
                while close is None:
                    if ending is None and len(got) == len(expected) and pongs and pongs[-1] == all_pings[-1]:
                        break
                    opcode, payload = await read_past_pings(reader)
                    if opcode == 0x1:
                        got.append(jsonutil.loads(payload))
                    elif opcode == 0xA:
                        pongs.append(payload)
                    else:
                        assert opcode == 0x8, opcode
                        close = payload
                # Replies in order, none invented (those of messages just before a close may not be sent).
                assert len(got) <= len(expected) and all(map(matches, got, expected)), (got, expected)
                remaining = iter(all_pings)  # pongs answer pings in order (RFC 6455 5.5.3 lets it skip some)
                assert all(pong in remaining for pong in pongs), (pongs, all_pings)
                if ending is None:
                    assert len(got) == len(expected)
                    writer.write(client_frame(0x8, struct.pack("!H", 1000)))
                    opcode, close = await read_past_pings(reader)
                    assert opcode == 0x8 and close[:2] == struct.pack("!H", 1000), (opcode, close)
                elif ending.close_code is None:
                    assert close == b"", close
                else:
                    assert close is not None and struct.unpack("!H", close[:2])[0] == ending.close_code, (
                        ending.name, close)
                    close[2:].decode("utf-8")
            finally:
                writer.close()
            bystander.send({"type": "ping"})
            assert (await bystander.next_of("pong"))["type"] == "pong"
            deadline = asyncio.get_running_loop().time() + WAIT  # its connection ends: only the bystander's is left
            while len(ctx.connections) != 1:
                assert asyncio.get_running_loop().time() < deadline, "a WebSocket was never closed"
                await asyncio.sleep(0.01)

        run(io_loop, exchange)

    check()
    assert_no_errors_logged(caplog)
    bystander.close()
