"""transport/http1.py, the server's own HTTP/1.1 connections, proved byte by byte over real sockets.

Keep-alive and its HTTP/1.0 form, pipelining, bodies in pieces and `Expect: 100-continue`; every refusal of the
layer itself (400, 408, 413, 431) a readable JSON answer followed by the end of the connection, never a reset;
the idle and body timeouts (on a server of our own with short ones); the hand-over of a connection that served
plain requests to Tornado for a WebSocket, the SSE stream and a chunked body; a parked poll dropped as soon as
its client goes; `close_all_connections`; and the fast header parser against Tornado's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple
from urllib.parse import urlparse

import pytest
import tornado.httputil
import tornado.testing

from chatserver import jsonutil
from handlers.app import make_app
from handlers.base import AppContext
from tests.conftest import Client
from transport import heads, http1

WAIT = 5.0  # the bound on every read that should succeed
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
JSON = "application/json; charset=utf-8"
REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Payload Too Large",
           431: "Request Header Fields Too Large"}


class Answer(NamedTuple):
    status: int
    headers: tornado.httputil.HTTPHeaders
    body: bytes

    def json(self) -> Any:
        return jsonutil.loads(self.body)


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def connect(port: int, receive_buffer: int = 0) -> AsyncIterator[Stream]:
    """A raw TCP connection to the server (with a small receive buffer, if asked), closed at the end."""
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), WAIT)
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        yield reader, writer
    finally:
        writer.close()


async def read_head(
    reader: asyncio.StreamReader,
) -> tuple[tornado.httputil.ResponseStartLine, tornado.httputil.HTTPHeaders]:
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    text = raw.decode("latin1")
    first, _, rest = text.partition("\r\n")
    return tornado.httputil.parse_response_start_line(first), tornado.httputil.HTTPHeaders.parse(rest)


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One whole answer: by its Content-Length, its chunks, or (neither) up to the end of the connection."""
    start, headers = await read_head(reader)
    if "Content-Length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["Content-Length"])), WAIT)
    elif headers.get("Transfer-Encoding") == "chunked":
        body = b""
        while True:
            size = int(await asyncio.wait_for(reader.readuntil(b"\r\n"), WAIT), 16)
            chunk = await asyncio.wait_for(reader.readexactly(size + 2), WAIT)
            assert chunk.endswith(b"\r\n"), chunk
            if not size:
                break
            body += chunk[:-2]
    else:
        body = await asyncio.wait_for(reader.read(), WAIT)
    return Answer(start.code, headers, body)


async def assert_eof(reader: asyncio.StreamReader, seconds: float = WAIT) -> None:
    """The server ends the connection with nothing more to say (an EOF, not a reset, not more bytes)."""
    assert await asyncio.wait_for(reader.read(), seconds) == b""


async def nothing_within(reader: asyncio.StreamReader, seconds: float) -> None:
    with pytest.raises(TimeoutError):
        got = await asyncio.wait_for(reader.read(1), seconds)
        raise AssertionError(f"expected no answer yet, got {got!r}")


def request(method: str, path: str, *, token: str | None = None, version: str = "HTTP/1.1",
            body: bytes | None = None, **headers: str) -> bytes:
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines.extend(f"{name.replace('_', '-')}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin1") + (body or b"")


def port_of(base_url: str) -> int:
    port = urlparse(base_url).port
    assert port is not None
    return port


def assert_me(answer: Answer, client: Client) -> None:
    assert answer.status == 200, answer
    assert answer.headers["Content-Type"] == JSON
    assert answer.json()["data"]["userId"] == client.user_id


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """All the server sends before it ends its side, which after a refusal is at once (not when it stops reading
    the rest of the request, LINGER later). A reset would raise here: its answer could be lost."""
    return await asyncio.wait_for(reader.read(), http1.LINGER / 2)


def assert_refused(raw: bytes, status: int, error: str) -> None:
    """The whole of what the server sent: exactly one JSON refusal that announces the close."""
    head, _, body = raw.partition(b"\r\n\r\n")
    first, _, rest = head.decode("latin1").partition("\r\n")
    assert first == f"HTTP/1.1 {status} {REASONS[status]}", raw[:300]
    headers = tornado.httputil.HTTPHeaders.parse(rest)
    assert headers["Content-Type"] == JSON
    assert headers["Connection"] == "close"
    assert headers["Cache-Control"] == "no-store"
    assert int(headers["Content-Length"]) == len(body)
    assert jsonutil.loads(body) == {"success": False, "error": error}


async def eventually(condition: Any, seconds: float = WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def cursor_of(client: Client) -> str:
    status, hello = await client.poll()
    assert status == 200, hello
    return str(hello["data"]["cursor"])


# -- keep-alive ------------------------------------------------------------------------------------------------


@pytest.fixture
def store_kind() -> str:
    """The HTTP layer's tests run on one store: what they prove does not depend on it."""
    return "sqlite"


@pytest.fixture
def http_engine() -> str:
    """The lean engine's own contract, byte by byte (JSON refusals, the parser's reasons, its bounds): with the
    Tornado engine, Tornado's HTTP1Connection answers malformed requests its own way (docs/protocol.md, "HTTP")."""
    return "lean"


@pytest.mark.gen_test
async def test_http11_connection_serves_rest_requests_and_polls_until_connection_close(
    alice: Client, base_url: str
) -> None:
    cursor = await cursor_of(alice)
    async with connect(port_of(base_url)) as (reader, writer):
        writer.write(request("GET", "/api/me", token=alice.token))
        first = await read_answer(reader)
        assert_me(first, alice)
        assert "Connection" not in first.headers
        # The lean poll path (answered at once: timeout 0) and the full PollHandler (a handshake without cursor).
        writer.write(request("GET", f"/api/poll?cursor={cursor}&timeout=0", token=alice.token))
        lean = await read_answer(reader)
        assert lean.status == 200 and "Connection" not in lean.headers
        assert lean.json() == {"success": True, "data": {"events": [], "cursor": cursor}}
        writer.write(request("GET", "/api/poll", token=alice.token))
        full = await read_answer(reader)
        assert full.status == 200 and full.json()["data"]["cursor"] == cursor
        writer.write(request("GET", "/api/me", token=alice.token, Connection="close"))
        last = await read_answer(reader)
        assert_me(last, alice)
        assert last.headers["Connection"] == "close"
        await assert_eof(reader)


@pytest.mark.gen_test
async def test_http10_closes_after_the_answer_unless_asked_to_keep_alive(alice: Client, base_url: str) -> None:
    async with connect(port_of(base_url)) as (reader, writer):
        writer.write(request("GET", "/api/me", token=alice.token, version="HTTP/1.0"))
        answer = await read_answer(reader)
        assert_me(answer, alice)
        assert "Connection" not in answer.headers and "Transfer-Encoding" not in answer.headers
        await assert_eof(reader)
    cursor = await cursor_of(alice)
    async with connect(port_of(base_url)) as (reader, writer):
        for _ in range(2):
            writer.write(request("GET", "/api/me", token=alice.token, version="HTTP/1.0", Connection="keep-alive"))
            answer = await read_answer(reader)
            assert_me(answer, alice)
            assert answer.headers["Connection"] == "Keep-Alive"
        # A poll the lean path answers on an HTTP/1.0 connection: Tornado's framing, kept alive too.
        writer.write(request("GET", f"/api/poll?cursor={cursor}&timeout=0", token=alice.token, version="HTTP/1.0",
                             Connection="keep-alive"))
        poll = await read_answer(reader)
        assert poll.status == 200 and poll.headers["Connection"] == "Keep-Alive"
        assert poll.json()["data"] == {"events": [], "cursor": cursor}
        writer.write(request("GET", "/api/me", token=alice.token, version="HTTP/1.0"))
        assert_me(await read_answer(reader), alice)
        await assert_eof(reader)


# RFC 9112 9.6: a "close" among the connection options, in one field or in any of several, ends the connection.
CLOSE_OPTIONS = [
    pytest.param("HTTP/1.1", ["close, foo"], id="close-in-a-list"),
    pytest.param("HTTP/1.1", ["Foo", "close"], id="close-in-a-second-field"),
    pytest.param("HTTP/1.1", ["upgrade ,CLOSE"], id="close-among-odd-spacing"),
    pytest.param("HTTP/1.0", ["keep-alive, close"], id="http10-keep-alive-and-close"),
    pytest.param("HTTP/1.0", ["keep-alive", "close"], id="http10-close-in-a-second-field"),
]


def with_connection_fields(raw: bytes, values: list[str]) -> bytes:
    head, _, body = raw.partition(b"\r\n\r\n")
    fields = "".join(f"\r\nConnection: {value}" for value in values).encode()
    return head + fields + b"\r\n\r\n" + body


@pytest.mark.gen_test
@pytest.mark.parametrize(("version", "values"), CLOSE_OPTIONS)
async def test_a_close_connection_option_ends_the_connection_after_the_answer(
    alice: Client, base_url: str, version: str, values: list[str]
) -> None:
    cursor = await cursor_of(alice)
    for path in ("/api/me", f"/api/poll?cursor={cursor}&timeout=0"):  # a handler's answer, and the lean poll's
        async with connect(port_of(base_url)) as (reader, writer):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # this layer's connection, not Tornado's
            assert (await read_answer(reader)).status == 200
            writer.write(with_connection_fields(request("GET", path, token=alice.token, version=version), values))
            answer = await read_answer(reader)
            assert answer.status == 200, answer
            if version == "HTTP/1.1":
                assert answer.headers["Connection"] == "close"
            else:
                assert "Connection" not in answer.headers
            await assert_eof(reader)


@pytest.mark.gen_test
async def test_http10_keep_alive_in_a_list_of_options_keeps_the_connection(alice: Client, base_url: str) -> None:
    async with connect(port_of(base_url)) as (reader, writer):
        for _ in range(2):
            writer.write(request("GET", "/api/me", token=alice.token, version="HTTP/1.0", Connection="Keep-Alive, foo"))
            answer = await read_answer(reader)
            assert_me(answer, alice)
            assert answer.headers["Connection"] == "Keep-Alive"


@pytest.mark.gen_test
async def test_an_http10_request_expecting_100_continue_gets_no_interim_answer(
    alice: Client, base_url: str, dialog_id: str
) -> None:
    # RFC 9110 10.1.1: a server MUST ignore a 100-continue expectation in an HTTP/1.0 request. The client sends
    # its body after a while without one; the first thing it reads is the final answer.
    body = jsonutil.dumps_bytes({"content": "no continue for 1.0"})
    whole = request("POST", f"/api/messages/dialog/{dialog_id}", token=alice.token, body=body, version="HTTP/1.0",
                    Expect="100-continue")
    async with connect(port_of(base_url)) as (reader, writer):
        writer.write(whole[: -len(body)])
        await nothing_within(reader, 0.3)
        writer.write(body)
        answer = await read_answer(reader)
        assert answer.status == 201 and answer.json()["data"]["content"] == "no continue for 1.0"
        await assert_eof(reader)


@pytest.mark.gen_test
@pytest.mark.parametrize("first", [False, True], ids=["after-a-request-of-this-layer", "first-on-its-connection"])
async def test_an_http10_request_to_a_tornado_path_expecting_100_continue_gets_no_interim_answer(
    alice: Client, base_url: str, first: bool
) -> None:
    # The SSE stream is served by Tornado's HTTP/1.1 connection, which answers any 100-continue.
    cursor = await cursor_of(alice)
    whole = request("GET", f"/api/events?cursor={cursor}", token=alice.token, body=b"{}", version="HTTP/1.0",
                    Expect="100-continue")
    async with connect(port_of(base_url)) as (reader, writer):
        if not first:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_answer(reader)).status == 200
        writer.write(whole[:-2])
        await nothing_within(reader, 0.3)
        writer.write(whole[-2:])
        start, headers = await read_head(reader)
        assert start.code == 200 and headers["Content-Type"].startswith("text/event-stream")
    await eventually(lambda: not alice.ctx.connections)


# -- pipelining ------------------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_pipelined_requests_are_answered_completely_and_in_order(
    alice: Client, base_url: str, dialog_id: str
) -> None:
    cursor = await cursor_of(alice)
    history = f"/api/messages/dialog/{dialog_id}"
    async with connect(port_of(base_url)) as (reader, writer):
        writer.write(
            request("GET", "/api/me", token=alice.token)
            + request("POST", history, token=alice.token, body=b'{"content": "pipelined"}')
            + request("GET", history, token=alice.token)
            + request("GET", f"/api/poll?cursor={cursor}&timeout=0", token=alice.token)
            + request("GET", "/api/nowhere", token=alice.token)
        )
        assert_me(await read_answer(reader), alice)
        posted = await read_answer(reader)
        assert posted.status == 201 and posted.json()["data"]["content"] == "pipelined"
        listed = await read_answer(reader)
        assert listed.status == 200 and listed.json()["data"] == [posted.json()["data"]]
        polled = await read_answer(reader)
        events = polled.json()["data"]["events"]
        assert [e["data"]["messageId"] for e in events] == [posted.json()["data"]["messageId"]]
        missing = await read_answer(reader)
        assert missing.status == 404 and missing.json()["success"] is False
        await nothing_within(reader, 0.2)


@pytest.mark.gen_test(timeout=30)
async def test_pipelined_requests_wait_while_the_client_reads_no_answers(http_server: Any, base_url: str) -> None:
    # As with Tornado, the next request is read once the answer has left: a client that pipelines without
    # reading must not make the server buffer answers (or requests) without bound.
    count = 3000
    async with connect(port_of(base_url)) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_answer(reader)).status == 200
        (conn,) = http_server.front
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * count)
        for _ in range(10):
            await asyncio.sleep(0.05)
            assert conn.transport.get_write_buffer_size() <= 2 * 64 * 1024
            assert len(conn.buffer) <= 2 * http1.READ_AHEAD
        for _ in range(count):
            answer = await read_answer(reader)
            assert answer.status == 200 and answer.json() == {"success": True, "data": {"status": "ok"}}
        await nothing_within(reader, 0.1)


@pytest.mark.gen_test
async def test_head_answers_carry_no_body_and_empty_lines_between_requests_are_ignored(
    alice: Client, base_url: str, dialog_id: str
) -> None:
    async with connect(port_of(base_url)) as (reader, writer):
        writer.write(
            b"\r\n" + request("HEAD", "/healthz")
            + request("POST", f"/api/messages/dialog/{dialog_id}", token=alice.token, body=b'{"content": "crlf"}')
            + b"\r\n\r\n" + request("GET", "/healthz")
        )
        start, headers = await read_head(reader)
        health = jsonutil.dumps_bytes({"success": True, "data": {"status": "ok"}})
        assert start.code == 200 and int(headers["Content-Length"]) == len(health)
        posted = await read_answer(reader)  # the HEAD's body would have been read as this answer's head
        assert posted.status == 201 and posted.json()["data"]["content"] == "crlf"
        answer = await read_answer(reader)
        assert answer.status == 200 and answer.json() == {"success": True, "data": {"status": "ok"}}
        await nothing_within(reader, 0.1)


@pytest.mark.gen_test
async def test_a_repeated_content_length_is_refused_even_where_the_values_agree(
    alice: Client, base_url: str, dialog_id: str
) -> None:
    # RFC 9110 8.6 lets a recipient refuse them; llhttp does, so no two readings of the body's length can differ.
    body = b'{"content": "said twice"}'
    for lengths, reason in ((f"{len(body)}, {len(body)}", "Invalid character in Content-Length"),
                            (f"{len(body)}\r\nContent-Length: {len(body)}", "Duplicate Content-Length")):
        head = (f"POST /api/messages/dialog/{dialog_id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice.token}"
                f"\r\nContent-Length: {lengths}\r\n\r\n")
        async with connect(port_of(base_url)) as (reader, writer):
            writer.write(head.encode() + body)
            raw = await read_to_end(reader)
        assert_refused(raw, 400, f"malformed HTTP request: {reason}")


# -- bodies ----------------------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_body_sent_in_pieces_is_answered_once_complete(alice: Client, base_url: str, dialog_id: str) -> None:
    body = jsonutil.dumps_bytes({"content": "arrived in four pieces"})
    whole = request("POST", f"/api/messages/dialog/{dialog_id}", token=alice.token, body=body)
    head_end = whole.index(b"\r\n\r\n") + 4
    pieces = [whole[: head_end - 10], whole[head_end - 10 : head_end + 5], whole[head_end + 5 : -3], whole[-3:]]
    async with connect(port_of(base_url)) as (reader, writer):
        for piece in pieces[:-1]:
            writer.write(piece)
            await nothing_within(reader, 0.15)
        writer.write(pieces[-1])
        answer = await read_answer(reader)
        assert answer.status == 201, answer
        assert answer.json()["data"]["content"] == "arrived in four pieces"
        writer.write(request("GET", "/api/me", token=alice.token))
        assert_me(await read_answer(reader), alice)


@pytest.mark.gen_test
async def test_expect_100_continue_is_answered_before_the_body_is_sent(
    alice: Client, base_url: str, dialog_id: str
) -> None:
    body = jsonutil.dumps_bytes({"content": "after continue"})
    whole = request("POST", f"/api/messages/dialog/{dialog_id}", token=alice.token, body=body, Expect="100-continue")
    async with connect(port_of(base_url)) as (reader, writer):
        writer.write(whole[: -len(body)])
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert interim == b"HTTP/1.1 100 (Continue)\r\n\r\n"
        writer.write(body)
        answer = await read_answer(reader)
        assert answer.status == 201 and answer.json()["data"]["content"] == "after continue"


@pytest.mark.gen_test
async def test_a_request_without_a_body_refused_at_its_headers_keeps_its_connection(
    alice: Client, base_url: str
) -> None:
    # A 401 from a handler that streams its body comes before the (empty) body is read: nothing is left to drop.
    async with connect(port_of(base_url)) as (reader, writer):
        for _ in range(2):
            writer.write(request("GET", "/api/me"))
            answer = await read_answer(reader)
            assert answer.status == 401 and "Connection" not in answer.headers
        writer.write(request("GET", "/api/me", token=alice.token))
        assert_me(await read_answer(reader), alice)


@pytest.mark.gen_test
async def test_expect_100_continue_refused_at_the_headers_gets_no_continue_and_a_close(
    alice: Client, base_url: str, dialog_id: str
) -> None:
    whole = request("POST", f"/api/messages/dialog/{dialog_id}", body=b'{"content": "x"}', Expect="100-continue")
    async with connect(port_of(base_url)) as (reader, writer):
        writer.write(whole[: whole.index(b"\r\n\r\n") + 4])
        answer = await read_answer(reader)
        assert answer.status == 401 and answer.json()["success"] is False
        await assert_eof(reader)


# -- refusals --------------------------------------------------------------------------------------------------

# A "%d" stands for the server's hard limit on a body (its params.max_body_size).
REFUSALS = [
    pytest.param(b"GARBAGE\r\n\r\n", 400,
                 "malformed HTTP request: Invalid method encountered", id="request-line-without-method-and-version"),
    pytest.param(b"GET /api/me HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400,
                 "malformed HTTP request: Expected CRLF after version",
                 id="request-line-with-four-parts"),
    pytest.param(b"GET /api/me HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400,
                 "malformed HTTP request: Invalid header token",
                 id="header-line-without-colon"),
    pytest.param(b"GET /api/me HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n", 400,
                 "malformed HTTP request: Invalid header token",
                 id="header-name-with-space"),
    pytest.param(b"GET /api/me HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n", 400,
                 "malformed HTTP request: Unexpected whitespace after header value",
                 id="folded-header-line"),
    pytest.param(b"GET /api/me HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 17000 + b"\r\n\r\n", 431,
                 "the request's header block is larger than 16384 bytes", id="header-block-over-16k"),
    pytest.param(b"GET /api/me HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 17000, 431,
                 "the request's header block is larger than 16384 bytes", id="unterminated-header-block-over-16k"),
    pytest.param(b"POST /api/nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", 413,
                 "the body is larger than %d bytes", id="content-length-over-hard-limit"),
    pytest.param(b"POST /api/nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcde",
                 400, "malformed HTTP request: Duplicate Content-Length", id="two-unequal-content-lengths"),
    pytest.param(b"POST /api/nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nabcde",
                 400, "malformed HTTP request: Invalid character in Content-Length", id="unequal-content-length-list"),
    pytest.param(b"POST /api/nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: five\r\n\r\n", 400,
                 "malformed HTTP request: Invalid character in Content-Length", id="non-integer-content-length"),
    pytest.param(b"POST /api/nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400,
                 "malformed HTTP request: Invalid character in Content-Length", id="negative-content-length"),
    pytest.param(b"GET /api/me HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "malformed HTTP request",
                 id="host-tornado-refuses"),
    pytest.param(b"GET /api/me HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400, "malformed HTTP request",
                 id="two-hosts"),
    # A Transfer-Encoding this layer would hand to Tornado, whose own refusal is a bare 400 without a body.
    pytest.param(b"POST /api/nowhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                 b"0\r\n\r\n", 400, "malformed HTTP request: Content-Length can't be present with Transfer-Encoding",
                 id="transfer-encoding-and-content-length"),
    pytest.param(b"POST /api/nowhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400,
                 "malformed HTTP request: Request has invalid `Transfer-Encoding`", id="transfer-encoding-not-chunked"),
    pytest.param(b"POST /api/nowhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
                 "malformed HTTP request: Invalid `Transfer-Encoding` header value", id="transfer-encoding-twice"),
    pytest.param(b"POST /api/nowhere HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
                 "an HTTP/1.0 request may not have a Transfer-Encoding", id="transfer-encoding-in-http10"),
    # A Host that Tornado refuses, on a connection Tornado's own server reads (an upgrade, the stream, a chunked
    # body): the same JSON refusal, not Tornado's bare 400.
    pytest.param(b"GET /ws?token=x HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 400,
                 "malformed HTTP request", id="upgrade-without-host"),
    pytest.param(b"GET /api/events HTTP/1.1\r\n\r\n", 400, "malformed HTTP request", id="stream-without-host"),
    pytest.param(b"GET /api/events?token=x HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "malformed HTTP request",
                 id="stream-with-a-host-tornado-refuses"),
    pytest.param(b"POST /api/me HTTP/1.1\r\nHost: x\r\nHost: y\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                 400, "malformed HTTP request", id="chunked-with-two-hosts"),
]


@pytest.mark.gen_test
@pytest.mark.parametrize(("sent", "status", "error"), REFUSALS)
async def test_a_request_the_layer_refuses_gets_a_json_answer_then_the_end_of_the_connection(
    http_server: Any, base_url: str, sent: bytes, status: int, error: str
) -> None:
    if b"%d" in sent:
        limit = http_server.params.max_body_size
        sent, error = sent % (limit + 1), error % limit
    async with connect(port_of(base_url)) as (reader, writer):
        writer.write(sent)
        raw = await read_to_end(reader)
    assert_refused(raw, status, error)


@pytest.mark.gen_test
async def test_a_refusal_survives_a_client_that_keeps_sending_its_body(
    http_server: Any, alice: Client, base_url: str, dialog_id: str
) -> None:
    # Closing with unread bytes would make the kernel send a reset that destroys the answer: the server reads
    # and drops the rest for a moment instead.
    limit = http_server.params.max_body_size
    head = f"POST /api/nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: {limit * 4}\r\n\r\n".encode()
    async with connect(port_of(base_url)) as (reader, writer):
        writer.write(head + b"x" * (512 * 1024))
        raw = await read_to_end(reader)
    assert_refused(raw, 413, f"the body is larger than {limit} bytes")
    # The handler's own, lower limit answers first where there is one, and the connection ends the same way.
    small = alice.ctx.config.max_body_size
    async with connect(port_of(base_url)) as (reader, writer):
        writer.write(
            f"POST /api/messages/dialog/{dialog_id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice.token}\r\n"
            f"Content-Length: {small * 8}\r\n\r\n".encode() + b"x" * (small * 4)
        )
        raw = await read_to_end(reader)
    head_bytes, _, body = raw.partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n"), raw[:300]
    assert jsonutil.loads(body) == {"success": False, "error": f"the body is larger than {small} bytes"}


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# What is sent first: a request whose body is not all sent yet, or a whole request (then a second one follows it).
# The first kind is answered before its body is read, and that ends the connection; the second may keep it.
EARLY_ANSWERS = [
    pytest.param("POST {post} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\nContent-Length: 100\r\n\r\n"
                 "{{\"content\"", 401, True, id="bad-token-before-a-body-with-a-length"),
    pytest.param("POST {post} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {over}\r\n\r\n",
                 413, True, id="length-over-the-limit"),
    pytest.param("POST {post} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\nTransfer-Encoding: chunked\r\n\r\n"
                 "{part}", 401, True, id="bad-token-before-a-chunked-body"),
    pytest.param("POST {post} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n"
                 "\r\n{big}", 413, True, id="chunked-body-over-the-limit"),
    pytest.param("POST {post} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\nContent-Length: 2\r\n\r\n{{}}",
                 401, False, id="bad-token-with-the-whole-body"),
    pytest.param("GET /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n\r\n", 401, False,
                 id="bad-token-on-the-stream"),
]


@pytest.mark.gen_test
@pytest.mark.parametrize(("sent", "status", "partial"), EARLY_ANSWERS)
async def test_an_answer_that_ends_the_connection_says_connection_close_and_one_that_does_not_serves_the_next(
    alice: Client, base_url: str, dialog_id: str, sent: str, status: int, partial: bool
) -> None:
    # RFC 9112 9.6: a server that closes after its answer says `Connection: close`, or a client that keeps the
    # connection for its next request has that request cut off.
    limit = alice.ctx.config.max_body_size
    request = sent.format(post=f"/api/messages/dialog/{dialog_id}", token=alice.token, over=limit + 1,
                          part=chunk(b'{"content"').decode(), big=chunk(b"x" * (limit + 1)).decode())
    async with connect(port_of(base_url)) as (reader, writer):
        writer.write(request.encode() + (b"" if partial else b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))
        answer = await read_answer(reader)
        assert answer.status == status, answer
        assert answer.json()["success"] is False
        if partial:
            assert answer.headers.get("Connection") == "close", answer.headers
        if answer.headers.get("Connection") == "close":
            await assert_eof(reader)
        else:
            assert (await read_answer(reader)).status == 200


# -- timeouts (a server of our own, with short ones) -----------------------------------------------------------


class SmallServer(NamedTuple):
    server: http1.Server
    port: int


def start_small_server(ctx: AppContext, idle_timeout: float = 1, *, handover: bool = False,
                       send_buffer: int = 0) -> SmallServer:
    """The application behind an http1.Server with a short idle timeout and a 1 s body timeout. `handover`: with
    the production server's hand-over paths (a first request for one goes to Tornado, told by a peek);
    `send_buffer`, where given, is the SO_SNDBUF its connections inherit."""
    server = http1.Server(
        make_app(ctx),
        handover_paths=("/ws", "/api/events") if handover else (),
        max_header_size=16 * 1024,
        max_body_size=1024 * 1024,
        idle_connection_timeout=idle_timeout,
        body_timeout=1,
        decompress_request=False,
    )
    sock, port = tornado.testing.bind_unused_port()
    if send_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)  # accepted sockets inherit it
    server.add_socket(sock)
    return SmallServer(server, port)


async def stop_small_server(small: SmallServer) -> None:
    small.server.stop()
    await asyncio.wait_for(small.server.close_all_connections(), 10)


@pytest.fixture
def small_server(io_loop: Any, ctx: AppContext, seed: dict[str, Any]) -> Iterator[SmallServer]:
    """A server of `start_small_server` with a 1 s idle timeout."""
    small = start_small_server(ctx)
    yield small
    io_loop.run_sync(lambda: stop_small_server(small))


@pytest.mark.gen_test
async def test_a_request_head_that_stalls_gets_408_after_the_idle_timeout(small_server: SmallServer) -> None:
    loop = asyncio.get_running_loop()
    async with connect(small_server.port) as (reader, writer):
        started = loop.time()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        raw = await asyncio.wait_for(reader.read(), 1 + http1.SWEEP_INTERVAL + 1.5)
        waited = loop.time() - started
    assert_refused(raw, 408, "the request did not arrive in time")
    assert waited >= 0.9, waited


@pytest.mark.gen_test(timeout=30)
async def test_the_wait_for_a_request_head_counts_from_the_connection_not_from_its_first_byte(
    ctx: AppContext, seed: dict[str, Any]
) -> None:
    # One deadline from the accept: a first byte just before it does not buy a second idle timeout.
    idle = 3.0
    small = start_small_server(ctx, idle_timeout=idle, handover=True)
    loop = asyncio.get_running_loop()
    try:
        async with connect(small.port) as (reader, writer):
            started = loop.time()
            await nothing_within(reader, idle - 0.5)
            writer.write(b"G")
            raw = await asyncio.wait_for(reader.read(), idle + http1.SWEEP_INTERVAL + 1.5)
            waited = loop.time() - started
        assert_refused(raw, 408, "the request did not arrive in time")
        assert idle - 0.1 <= waited < idle + http1.SWEEP_INTERVAL + 0.8, waited
    finally:
        await stop_small_server(small)


@pytest.mark.gen_test
async def test_a_body_that_stalls_gets_408_after_the_body_timeout(small_server: SmallServer) -> None:
    loop = asyncio.get_running_loop()
    async with connect(small_server.port) as (reader, writer):
        writer.write(b"POST /api/nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        started = loop.time()
        raw = await asyncio.wait_for(reader.read(), 1 + http1.SWEEP_INTERVAL + 1.5)
        waited = loop.time() - started
    assert_refused(raw, 408, "the request did not arrive in time")
    assert waited >= 0.9, waited


@pytest.mark.gen_test
async def test_an_idle_connection_is_closed_without_an_answer_at_the_idle_timeout(small_server: SmallServer) -> None:
    async with connect(small_server.port) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await read_answer(reader)
        assert answer.status == 200 and answer.json() == {"success": True, "data": {"status": "ok"}}
        await assert_eof(reader, 1 + http1.SWEEP_INTERVAL + 1.5)
    async with connect(small_server.port) as (reader, _):
        await assert_eof(reader, 1 + http1.SWEEP_INTERVAL + 1.5)  # never said a word
    await eventually(lambda: not small_server.server.front)


@pytest.mark.gen_test
async def test_a_client_that_takes_none_of_its_answers_is_cut_off_at_the_idle_timeout(
    small_server: SmallServer,
) -> None:
    # Answers wait for the client (the next pipelined request is not read meanwhile), but not for ever.
    server, port = small_server
    async with connect(port, receive_buffer=4096) as (stuck, stuck_writer):
        stuck_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_answer(stuck)).status == 200
        (conn,) = server.front
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        stuck_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 3000)
        await eventually(lambda: conn._write_waiters is not None, seconds=3)
        await eventually(lambda: not server.front, seconds=1 + http1.SWEEP_INTERVAL + 1.5)
        assert conn.state == http1.CLOSED


@asynccontextmanager
async def connect_raw(port: int, receive_buffer: int = 0) -> AsyncIterator[socket.socket]:
    """A raw TCP connection that reads only when told to (a StreamReader reads ahead on its own)."""
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), WAIT)
        yield sock
    finally:
        sock.close()


async def read_until_closed(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything the server sent until it ended the connection, and whether it ended it with a reset."""
    loop = asyncio.get_running_loop()
    data = b""
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), WAIT)
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, False
        data += chunk


@pytest.mark.gen_test(timeout=30)
async def test_a_client_that_never_reads_a_few_answers_is_cut_off_after_the_idle_timeout(
    ctx: AppContext, seed: dict[str, Any]
) -> None:
    # Answers that fill the socket's buffers and leave less than a write buffer's worth (64 KiB) waiting in the
    # server: every request is read and answered, the connection goes idle, and its close must not wait for a
    # client that never takes the rest.
    small = start_small_server(ctx, send_buffer=4096)
    count = 150
    health = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    loop = asyncio.get_running_loop()
    try:
        async with connect_raw(small.port, receive_buffer=4096) as stuck:
            await loop.sock_sendall(stuck, health * count)
            # The idle timeout (1 s), then the deadline of the close (the idle timeout again), each seen by a sweep.
            await asyncio.sleep(2 * (1 + http1.SWEEP_INTERVAL) + 0.5)
            async with connect(small.port) as (reader, writer):  # meanwhile others are served
                writer.write(health)
                assert (await read_answer(reader)).status == 200
            data, reset = await read_until_closed(stuck)
        answered = data.count(b"HTTP/1.1 200 OK\r\n")
        assert 0 < answered < count, (answered, reset)
    finally:
        await stop_small_server(small)


@pytest.mark.gen_test
async def test_close_all_connections_closes_silent_served_and_parked_connections(
    small_server: SmallServer, ctx: AppContext, seed: dict[str, Any]
) -> None:
    server, port = small_server
    token = ctx.service.tokens.issue(seed["bob"].user_id)
    cursor = ctx.broadcaster.cursor()
    async with connect(port) as (silent, _), connect(port) as (served, served_writer), \
            connect(port) as (parked, parked_writer):
        served_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_answer(served)).status == 200
        parked_writer.write(request("GET", f"/api/poll?cursor={cursor}&timeout=30", token=token))
        await eventually(lambda: ctx.metrics.parked_polls == 1)
        assert len(server.front) == 3
        await asyncio.wait_for(server.close_all_connections(), WAIT)
        assert not server.front
        for reader in (silent, served, parked):
            await assert_eof(reader, 1)
        assert ctx.metrics.parked_polls == 0 and not ctx.connections
        assert ctx.broadcaster.subscriber_count() == 0


@pytest.mark.gen_test
async def test_close_all_connections_is_not_held_up_by_a_client_that_reads_nothing(
    small_server: SmallServer,
) -> None:
    server, port = small_server
    async with connect(port) as (idle, idle_writer), connect(port, receive_buffer=4096) as (stuck, stuck_writer):
        idle_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_answer(idle)).status == 200
        stuck_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_answer(stuck)).status == 200
        for conn in server.front:
            conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        # Answers the client never takes: they fill both sockets, then the server's own buffer.
        stuck_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 3000)
        await eventually(lambda: any(c.transport.get_write_buffer_size() for c in server.front))
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(server.close_all_connections(), http1.LINGER + 2)
        assert not server.front
        assert loop.time() - started < http1.LINGER + 1
        await assert_eof(idle, 1)


# -- hand-over to Tornado --------------------------------------------------------------------------------------


def websocket_upgrade(token: str, key: str) -> bytes:
    return (
        f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""
    first, second = await asyncio.wait_for(reader.readexactly(2), WAIT)
    assert not second & 0x80, "a server frame is never masked"
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), WAIT))
    elif length == 127:
        (length,) = struct.unpack("!Q", await asyncio.wait_for(reader.readexactly(8), WAIT))
    return first & 0x0F, await asyncio.wait_for(reader.readexactly(length), WAIT)


def client_text_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def assert_websocket_opens(reader: asyncio.StreamReader, key: str, client: Client) -> None:
    start, headers = await read_head(reader)
    assert start.code == 101, start
    assert headers["Upgrade"].lower() == "websocket"
    expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()  # noqa: S324
    assert headers["Sec-WebSocket-Accept"] == expected
    opcode, payload = await read_frame(reader)
    assert opcode == 0x1
    ready = jsonutil.loads(payload)
    assert ready["type"] == "ready" and ready["data"]["userId"] == client.user_id


@pytest.mark.gen_test
async def test_websocket_upgrade_after_a_rest_request_on_the_same_connection(
    alice: Client, base_url: str, dialog_id: str
) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    async with connect(port_of(base_url)) as (reader, writer):
        writer.write(request("GET", "/api/me", token=alice.token))
        assert_me(await read_answer(reader), alice)
        writer.write(websocket_upgrade(alice.token, key))
        await assert_websocket_opens(reader, key, alice)
        # Both ways: a frame from the client is answered, an event reaches the socket.
        writer.write(client_text_frame(b'{"type": "ping"}'))
        assert jsonutil.loads((await read_frame(reader))[1]) == {"type": "pong"}
        sent = await alice.post_message(dialog_id, "to the handed-over socket")
        event = jsonutil.loads((await read_frame(reader))[1])
        assert event["type"] == "message:new" and event["data"]["messageId"] == sent["messageId"]
    await eventually(lambda: not alice.ctx.connections)


@pytest.mark.gen_test
async def test_a_connection_opening_with_a_websocket_upgrade_is_tornados_before_a_byte_is_read(
    http_server: Any, alice: Client, base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A peek at the first bytes sends it straight to Tornado: no asyncio transport built and dropped for it.
    taken: list[Any] = []
    take = http_server._take
    monkeypatch.setattr(http_server, "_take", lambda conn, address, *rest: (taken.append(address),
                                                                            take(conn, address, *rest)))
    key = base64.b64encode(os.urandom(16)).decode()
    async with connect(port_of(base_url)) as (reader, writer):
        await eventually(lambda: len(http_server._unread) == 1)  # accepted; nothing said yet
        writer.write(websocket_upgrade(alice.token, key))
        await assert_websocket_opens(reader, key, alice)
        assert taken == [] and not http_server.front and not http_server._unread
    async with connect(port_of(base_url)) as (reader, writer):
        writer.write(request("GET", "/api/me", token=alice.token))
        assert_me(await read_answer(reader), alice)
        assert len(taken) == 1 and len(http_server.front) == 1  # any other first request is this layer's
    await eventually(lambda: not alice.ctx.connections)


@pytest.mark.gen_test
async def test_websocket_upgrade_pipelined_behind_a_rest_request_keeps_both_answers(
    alice: Client, base_url: str
) -> None:
    # The upgrade is already read (by this layer) when the connection goes to Tornado: those bytes go with it.
    key = base64.b64encode(os.urandom(16)).decode()
    async with connect(port_of(base_url)) as (reader, writer):
        writer.write(request("GET", "/api/me", token=alice.token) + websocket_upgrade(alice.token, key))
        assert_me(await read_answer(reader), alice)
        await assert_websocket_opens(reader, key, alice)
    await eventually(lambda: not alice.ctx.connections)


@pytest.mark.gen_test
async def test_sse_stream_after_a_rest_request_on_the_same_connection(
    http_server: Any, alice: Client, base_url: str, dialog_id: str
) -> None:
    async with connect(port_of(base_url)) as (reader, writer):
        writer.write(request("GET", "/api/me", token=alice.token))
        assert_me(await read_answer(reader), alice)
        writer.write(request("GET", "/api/events", token=alice.token))
        start, headers = await read_head(reader)
        assert start.code == 200
        assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert headers["Transfer-Encoding"] == "chunked"
        assert not http_server.front  # the connection is Tornado's now
        stream = b""
        while b'"ready"' not in stream:
            stream += await asyncio.wait_for(reader.read(65536), WAIT)
        assert b"retry: 1000\n" in stream
        sent = await alice.post_message(dialog_id, "to the handed-over stream")
        while sent["messageId"].encode() not in stream:
            stream += await asyncio.wait_for(reader.read(65536), WAIT)
        assert b'"message:new"' in stream
    await eventually(lambda: not alice.ctx.connections)


@pytest.mark.gen_test
async def test_a_chunked_body_is_read_by_tornado_and_answered(alice: Client, base_url: str, dialog_id: str) -> None:
    body = jsonutil.dumps_bytes({"content": "sent in chunks"})
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:])) + b"0\r\n\r\n"
    async with connect(port_of(base_url)) as (reader, writer):
        writer.write(request("GET", "/api/me", token=alice.token))
        assert_me(await read_answer(reader), alice)
        writer.write(request("POST", f"/api/messages/dialog/{dialog_id}", token=alice.token,
                             Transfer_Encoding="chunked") + chunks)
        answer = await read_answer(reader)
        assert answer.status == 201, answer
        assert answer.json()["data"]["content"] == "sent in chunks"
        # Tornado now serves the connection, kept alive as before.
        writer.write(request("GET", "/api/me", token=alice.token))
        assert_me(await read_answer(reader), alice)


# -- a client that goes away -----------------------------------------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("extra", [{}, {"If-None-Match": '"not-this"'}], ids=["lean-path", "poll-handler"])
async def test_a_parked_poll_whose_client_closes_is_dropped_at_once(
    bob: Client, base_url: str, extra: dict[str, str]
) -> None:
    ctx = bob.ctx
    cursor = await cursor_of(bob)
    async with connect(port_of(base_url)) as (_, writer):
        writer.write(request("GET", f"/api/poll?cursor={cursor}&timeout=50", token=bob.token, **extra))
        await eventually(lambda: ctx.metrics.parked_polls == 1)
        assert len(ctx.connections) == 1 and ctx.broadcaster.subscriber_count() == 1
    await eventually(lambda: ctx.metrics.parked_polls == 0, seconds=1)
    assert not ctx.connections and not ctx.requests
    assert ctx.broadcaster.subscriber_count() == 0


# -- request heads (transport/heads.py, httptools) ---------------------------------------------------------------

VALID_BLOCKS = [
    "\r\n",
    "Host: example.com\r\n\r\n",
    "Host: example.com\r\nAuthorization: Bearer abc.def\r\nAccept: */*\r\n\r\n",
    "X-Many: one\r\nx-many: two\r\nX-MANY:three\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n",
    "Spaces:   padded value \t \r\nEmpty:\r\nTab:\tt\r\nInner: a  b\tc\r\n\r\n",
    "Latin: caf\xe9 \xff\r\nOdd-Name_!#$%&'*+.^`|~: ok\r\nColons: a:b:c\r\n\r\n",
]

INVALID_BLOCKS = [
    "X-A: 1\r\n folded\r\n\r\n",
    "X-A: 1\r\n\tfolded\r\n\r\n",
    "no colon here\r\n\r\n",
    "Bad Name: x\r\n\r\n",
    "Bad\tName: x\r\n\r\n",
    ": no name\r\n\r\n",
    "Bad(Name): x\r\n\r\n",
    "Nul: a\x00b\r\n\r\n",
    "Bell: \x07\r\n\r\n",
    "Del: a\x7fb\r\n\r\n",
    "Cr: a\rb\r\n\r\n",
    "Name\xe9: x\r\n\r\n",
    "Lf-Only: yes\nAnd: this\n\n",
    "Mixed: a\nEnds: b\r\n\r\n",
    "Content-Length: 5\r\nCONTENT-LENGTH: 5\r\n\r\n",
    "Content-Length: 5, 5\r\n\r\n",
    "Content-Length: +5\r\n\r\n",
]


def parse_head(text: str) -> heads.Head:
    return heads.HeadParser().parse(text.encode("latin1"))


@pytest.mark.parametrize("block", VALID_BLOCKS)
def test_head_parser_gives_the_fields_tornado_would(block: str) -> None:
    head = parse_head("GET /x HTTP/1.1\r\n" + block)
    theirs = tornado.httputil.HTTPHeaders.parse(block)
    assert list(head.headers.get_all()) == list(theirs.get_all())
    assert dict(head.headers) == dict(theirs)
    for name in theirs:
        assert head.headers.get_list(name) == theirs.get_list(name)
        assert head.headers[name.lower()] == theirs[name]


@pytest.mark.parametrize("block", INVALID_BLOCKS)
def test_head_parser_refuses_a_malformed_header_block(block: str) -> None:
    with pytest.raises(heads.MalformedHead) as refused:
        parse_head("POST /x HTTP/1.1\r\n" + block)
    assert refused.value.status == 400 and str(refused.value).startswith("malformed HTTP request: ")


def test_head_parser_result_is_a_usable_httpheaders() -> None:
    headers = parse_head("GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\na: 3\r\n\r\n").headers
    assert isinstance(headers, tornado.httputil.HTTPHeaders)
    assert headers["A"] == "1,3" and headers.get_list("a") == ["1", "3"]
    assert "b" in headers and "C" not in headers and headers.get("C") is None
    headers.add("C", "4")
    assert list(headers.get_all()) == [("A", "1"), ("A", "3"), ("B", "2"), ("C", "4")]


REQUEST_LINES = [
    "GET /api/poll?cursor=a.1&timeout=30 HTTP/1.1",
    "POST /api/messages/dialog/dlg_1 HTTP/1.0",
    "OPTIONS * HTTP/1.1",
    "GET /a%20b?q=%00 HTTP/1.1",
    "GET http://example.com/x?y HTTP/1.1",
]
# (Two spaces after the method are read as one, as RFC 9112 3 lets a recipient: llhttp does.)
BAD_REQUEST_LINES = [
    ("GET /x HTTP/1.1 extra", 400),
    ("GET /x\x01y HTTP/1.1", 400),
    ("GET /x\x7f HTTP/1.1", 400),
    ("G(T /x HTTP/1.1", 400),
    ("BREW /pot HTTP/1.1", 400),  # a method llhttp does not know
    ("get /x HTTP/1.1", 400),
    ("GET /caf\xe9 HTTP/1.1", 400),  # a byte beyond ASCII in the target
    ("GET", 400),
    ("GET /x", 400),  # no version: llhttp reads HTTP/0.9, which RFC 9112 3 has no request line for
    ("GET /x http/1.1", 400),
    ("GET /x HTTP/2.0", 505),
    ("GET /x HTTP/0.9", 505),
]


@pytest.mark.parametrize("line", REQUEST_LINES)
def test_head_parser_reads_the_request_line_as_tornado_does(line: str) -> None:
    assert parse_head(line + "\r\nHost: x\r\n\r\n").start_line == tornado.httputil.parse_request_start_line(line)


@pytest.mark.parametrize(("line", "status"), BAD_REQUEST_LINES)
def test_head_parser_refuses_a_malformed_request_line(line: str, status: int) -> None:
    with pytest.raises(heads.MalformedHead) as refused:
        parse_head(line + "\r\nHost: x\r\n\r\n")
    assert refused.value.status == status


def test_one_head_parser_reads_every_kind_of_head_in_turn() -> None:
    # Each head leaves the parser at rest for the next, or has it replaced: a body expected, the connection's end
    # asked, HTTP/1.0, an upgrade, a refusal.
    parser = heads.HeadParser()
    sequence = [
        (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n", "/a", False),
        (b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "/b", False),
        (b"GET /c HTTP/1.0\r\n\r\n", "/c", False),
        (b"GET /d HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", "/d", True),
        (b"POST /e HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", "/e", False),
        (b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n", "/f", False),
        (b"GET /g HTTP/1.1\r\nHost: x\r\n\r\n", "/g", False),
    ]
    for _ in range(2):
        for data, path, upgrade in sequence:
            head = parser.parse(data)
            assert (head.start_line.path, head.upgrade) == (path, upgrade)
        with pytest.raises(heads.MalformedHead):
            parser.parse(b"GET /x HTTP/1.1\r\nBad Name: y\r\n\r\n")


_HEAD_END = re.compile(rb"\r?\n\r?\n")  # the oracle: the first empty line, whatever the line ends


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\n\nrest\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\n\r\nrest\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\nrest\r\n\r\n",
    b"GET / HTTP/1.1\nX: 1\r\n\r\n",
    b"\r\n\r\n",
    b"\n\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n",
    b"",
])
def test_head_end_is_the_first_empty_line(data: bytes) -> None:
    match = _HEAD_END.search(data)
    assert heads.head_end(bytearray(data)) == (-1 if match is None else match.end())
