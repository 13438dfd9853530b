"""transport/compat.py: each private Tornado name it uses still exists and behaves as it assumes, on real sockets.

A Tornado upgrade that renames or changes one of them fails here, by name, before anything else breaks.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.httputil
import tornado.iostream
import tornado.testing
import tornado.web
import tornado.websocket

from transport import compat

ROOT = Path(__file__).resolve().parent.parent


def test_the_installed_tornado_is_a_supported_one_and_another_is_refused_at_import() -> None:
    assert tornado.version_info[:2] in compat.SUPPORTED
    probe = "import tornado; tornado.version_info = (6, 7, 0, 0); tornado.version = '6.7.0'; import transport.compat"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode != 0
    assert "ImportError: Tornado 6.7.0 is not among the versions" in result.stderr


def test_normalize_header_is_tornados_normalization() -> None:
    assert compat.normalize_header("content-LENGTH") == "Content-Length"
    assert compat.normalize_header("x-forwarded-for") == "X-Forwarded-For"


def test_emptied_headers_are_empty_and_usable() -> None:
    headers = tornado.httputil.HTTPHeaders.parse("Host: a\r\nX-Twice: 1\r\nX-Twice: 2\r\n\r\n")
    assert headers["X-Twice"] == "1,2"  # fills the combined cache too
    compat.empty_headers(headers)
    assert dict(headers) == {} and "Host" not in headers and list(headers.get_all()) == []
    headers.add("Host", "b")
    assert headers["host"] == "b"


def test_headers_from_fields_behave_as_parsed_headers() -> None:
    block = "Host: a.example\r\nX-Twice: 1\r\nx-twice: 2\r\nAuthorization: Bearer t\r\n\r\n"
    parsed = tornado.httputil.HTTPHeaders.parse(block)
    built = compat.headers_from_fields({"Host": ["a.example"], "X-Twice": ["1", "2"], "Authorization": ["Bearer t"]})
    assert compat.header_fields(parsed) == {"Host": ["a.example"], "X-Twice": ["1", "2"],
                                            "Authorization": ["Bearer t"]}
    expected = list(parsed.get_all())
    for headers in (parsed, built):
        assert headers["x-twice"] == "1,2" and headers.get_list("X-Twice") == ["1", "2"]
        assert "host" in headers and "Missing" not in headers
        assert list(headers.get_all()) == expected
        headers["Content-Length"] = "5"
        assert headers.get("content-length") == "5"
        assert compat.header_fields(headers)["Content-Length"] == ["5"]
        assert dict(tornado.httputil.HTTPHeaders(headers)) == dict(headers)


@pytest.mark.gen_test
async def test_unread_bytes_come_first_in_what_the_stream_reads() -> None:
    ours, theirs = socket.socketpair()
    stream = tornado.iostream.IOStream(ours)
    try:
        compat.unread(stream, b"GET / ")
        theirs.sendall(b"HTTP/1.1\r\n")
        assert await asyncio.wait_for(stream.read_until(b"\r\n"), 5) == b"GET / HTTP/1.1\r\n"
    finally:
        stream.close()
        theirs.close()


class _Finishing(tornado.web.RequestHandler):
    def get(self) -> None:
        before = compat.handler_finished(self)
        self.set_header("X-Kept", "no")
        compat.drop_response_headers(self)
        self.set_header("X-Seen", str(before))
        self.finish("done")
        self.application.settings["after"].append(compat.status_reason(self))
        self.application.settings["after"].append(compat.handler_finished(self))


class _Reason(tornado.web.RequestHandler):
    def get(self) -> None:
        raise tornado.web.HTTPError(418, reason="I'm a Teapot")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish(compat.status_reason(self))


class _Plain(tornado.websocket.WebSocketHandler):
    def open(self) -> None:
        self.application.settings["detached"].append(set(vars(self)))


class _Lean(compat.LeanDetach):
    def open(self) -> None:
        refused = []
        for name in compat.DETACHED_METHODS:
            try:
                getattr(self, name)()
            except RuntimeError as exc:
                refused.append(str(exc))
        self.application.settings["lean"].append((self.upgraded, set(vars(self)), refused))


compat.refuse_after_upgrade(_Lean)


class _Recorded(compat.FrameReader):
    """Tornado's reader, recording the state of a fragmented message after each frame."""

    async def receive_frame(self) -> None:
        await self.tornado_receive_frame()
        fragments = self.fragments
        self.handler.application.settings["frames"].append(
            (None if fragments is None else bytes(fragments), self.fragments_opcode if fragments else None,
             self.decompressing))


class _OwnReader(compat.FrameReader):
    """A reader of small masked frames of its own, through read_bytes and handle_message."""

    async def receive_frame(self) -> None:
        head = await self.read_bytes(2)
        mask = await self.read_bytes(4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(await self.read_bytes(head[1] & 0x7F)))
        handled = self.handle_message(head[0] & 0x0F, payload)
        if handled is not None:
            await handled


class _Frames(tornado.websocket.WebSocketHandler):
    reader: type[compat.FrameReader] = _Recorded

    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol | None:
        protocol = super().get_websocket_protocol()
        assert isinstance(protocol, tornado.websocket.WebSocketProtocol13)
        return self.reader(protocol.handler, protocol.mask_outgoing, protocol.params)

    def on_message(self, message: str | bytes) -> None:
        self.application.settings["messages"].append(message)


class _OwnFrames(_Frames):
    reader = _OwnReader


@pytest.fixture
def served(io_loop: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    settings: dict[str, Any] = {"after": [], "detached": [], "lean": [], "frames": [], "messages": []}
    app = tornado.web.Application([("/finish", _Finishing), ("/reason", _Reason), ("/plain", _Plain), ("/lean", _Lean),
                                   ("/frames", _Frames), ("/own", _OwnFrames)], **settings)
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets([sock])
    yield f"127.0.0.1:{port}", app.settings
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=10)


async def eventually(condition: Any) -> None:
    for _ in range(250):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.mark.gen_test
async def test_handler_finished_and_dropped_response_headers(served: tuple[str, dict[str, Any]]) -> None:
    address, settings = served
    response = await tornado.httpclient.AsyncHTTPClient().fetch(f"http://{address}/finish")
    assert response.body == b"done"
    assert response.headers["X-Seen"] == "False" and "X-Kept" not in response.headers
    assert settings["after"] == ["OK", True]

    settings["after"].clear()
    response = await tornado.httpclient.AsyncHTTPClient().fetch(f"http://{address}/reason", raise_error=False)
    assert response.code == 418 and response.body == b"I'm a Teapot"



@pytest.mark.gen_test
async def test_tornados_detach_sets_the_methods_lean_detach_refuses_from_the_class(
        served: tuple[str, dict[str, Any]]) -> None:
    address, settings = served
    plain = await tornado.websocket.websocket_connect(f"ws://{address}/plain")
    lean = await tornado.websocket.websocket_connect(f"ws://{address}/lean")
    await eventually(lambda: settings["detached"] and settings["lean"])
    assert set(compat.DETACHED_METHODS) <= settings["detached"][0]  # what Tornado's _detach_stream sets
    upgraded, attributes, refused = settings["lean"][0]
    assert upgraded and not set(compat.DETACHED_METHODS) & attributes
    # Tornado still sets the names LeanDetach keeps in slots (else the slots hold nothing), and none of them,
    # nor `upgraded`, is in the upgraded handler's own dict.
    assert set(compat.LATE_ATTRIBUTES) <= settings["detached"][0]
    assert not (set(compat.LATE_ATTRIBUTES) | {"upgraded"}) & attributes
    assert refused == ["Method not supported for Web Sockets"] * len(compat.DETACHED_METHODS)
    plain.close()
    lean.close()


def _masked(opcode: int, payload: bytes, final: bool = True) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", (0x80 if final else 0) | opcode, 0x80 | len(payload)) + mask + body


async def _upgraded(address: str, path: str) -> socket.socket:
    host, port = address.split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += await asyncio.get_running_loop().run_in_executor(None, sock.recv, 4096)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return sock


@pytest.mark.gen_test
async def test_frame_reader_sees_tornados_fragment_state(served: tuple[str, dict[str, Any]]) -> None:
    address, settings = served
    sock = await _upgraded(address, "/frames")
    try:
        sock.sendall(_masked(0x1, b"he", final=False))
        await eventually(lambda: len(settings["frames"]) == 1)
        sock.sendall(_masked(0x0, b"llo"))
        await eventually(lambda: settings["messages"])
        assert settings["frames"] == [(b"he", 0x1, False), (None, None, False)]
        assert settings["messages"] == ["hello"]
    finally:
        sock.close()


@pytest.mark.gen_test
async def test_frame_reader_reads_and_hands_over_messages_of_its_own(served: tuple[str, dict[str, Any]]) -> None:
    address, settings = served
    sock = await _upgraded(address, "/own")
    try:
        sock.sendall(_masked(0x1, b"hi") + _masked(0x2, b"\x00\x01"))
        await eventually(lambda: len(settings["messages"]) == 2)
        assert settings["messages"] == ["hi", b"\x00\x01"]
    finally:
        sock.close()
