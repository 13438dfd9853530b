"""The load generator's wire: raw asyncio protocols for HTTP/1.1, WebSocket and engine.io v4, nothing more.

Client libraries cost more CPU per received frame than the servers they measure, so the generator speaks the
protocols itself: a WebSocket handshake and frame parser (server frames are unmasked, client frames masked),
a keep-alive HTTP/1.1 request/response connection (Content-Length and chunked bodies), and the engine.io v4
packet framing that socket.io rides on. Each received event is counted by the marker `~EVT<8 digits>` in its
content, so counting costs one `bytes.find` per frame.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable
from typing import Any

MARKER = b"~EVT"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client-to-server frame (RFC 6455 section 5.3)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    if not n:
        return head + mask
    key = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + body


class WebSocketClient(asyncio.Protocol):
    """One WebSocket connection; `on_message(client, payload)` is called for every text or binary message.

    `ready` resolves when the caller's `is_ready(payload)` accepts a message (or at the 101 when it is None).
    Pings are answered with pongs; a close frame records its code and closes the socket.
    """

    def __init__(
        self,
        host: str,
        path: str,
        on_message: Callable[[WebSocketClient, bytes], None],
        is_ready: Callable[[bytes], bool] | None,
        index: int = 0,
    ) -> None:
        self.host = host
        self.path = path
        self.on_message = on_message
        self.is_ready = is_ready
        self.index = index
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.status = 0
        self._buf = b""
        self._fragments: list[bytes] = []
        # Per-client state for the workloads (counts, cursors), kept here so there is one object per client.
        self.counts: bytearray | None = None
        self.cursor: str | None = None
        self.extra: dict[str, Any] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if not self.upgraded:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._buf = data
                return
            status_line = data[: data.find(b"\r\n")]
            self.status = int(status_line.split(b" ", 2)[1])
            if self.status != 101:
                self._fail(f"upgrade refused: {status_line.decode(errors='replace')}")
                return
            self.upgraded = True
            data = data[end + 4 :]
            if self.is_ready is None and not self.ready.done():
                self.ready.set_result(None)
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        pos = 0
        n = len(data)
        while n - pos >= 2:
            b0 = data[pos]
            length = data[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            end = pos + head + length
            if end > n:
                break
            payload = data[pos + head : end]
            pos = end
            opcode = b0 & 0x0F
            if opcode in (OP_TEXT, OP_BINARY, OP_CONT):
                if not b0 & 0x80:
                    self._fragments.append(payload)
                    continue
                if self._fragments:
                    payload = b"".join((*self._fragments, payload))
                    self._fragments = []
                self._message(payload)
            elif opcode == OP_PING:
                self.send_frame(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.send_frame(OP_CLOSE, payload[:2])
                if self.transport is not None:
                    self.transport.close()
                return
        if pos < n:
            self._buf = data[pos:]

    def _message(self, payload: bytes) -> None:
        if not self.ready.done() and self.is_ready is not None and self.is_ready(payload):
            self.ready.set_result(None)
        self.on_message(self, payload)

    def send_frame(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(opcode, payload))

    def send_text(self, payload: bytes) -> None:
        self.send_frame(OP_TEXT, payload)

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost before ready: {exc!r}"))
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class HttpResponse:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class HttpConnection(asyncio.Protocol):
    """A keep-alive HTTP/1.1 connection with one request in flight at a time."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._waiter: asyncio.Future[HttpResponse] | None = None
        self._head: tuple[int, dict[str, str]] | None = None
        self._lost = False
        # Per-client state for the workloads, as on WebSocketClient.
        self.counts: bytearray | None = None
        self.extra: dict[str, Any] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> asyncio.Future[HttpResponse]:
        if self._lost or self.transport is None:
            raise ConnectionError("connection closed")
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else data
        while self._try_response():
            pass

    def _try_response(self) -> bool:
        buf = self._buf
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            lines = buf[:end].decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self._head = (status, headers)
            buf = self._buf = buf[end + 4 :]
        status, headers = self._head
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body, rest = _dechunk(buf)
            if body is None:
                return False
        else:
            length = int(headers.get("content-length", "0"))
            if len(buf) < length:
                return False
            body, rest = buf[:length], buf[length:]
        self._buf = rest
        self._head = None
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(HttpResponse(status, headers, body))
        return bool(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _dechunk(buf: bytes) -> tuple[bytes | None, bytes]:
    parts: list[bytes] = []
    pos = 0
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None, buf
        size = int(buf[pos:line_end].split(b";")[0], 16)
        start = line_end + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n", start)
            if trailer_end < 0:
                return None, buf
            return b"".join(parts), buf[trailer_end + 2 :]
        if len(buf) < start + size + 2:
            return None, buf
        parts.append(buf[start : start + size])
        pos = start + size + 2


# -- engine.io v4 ---------------------------------------------------------------------------------------
# Packets: "0" open (JSON), "2" ping, "3" pong, "4" message; socket.io rides in messages: "40" connect,
# "42[event, data]" event. Over polling, packets in one body are separated by the record separator 0x1e.

EIO_SEPARATOR = b"\x1e"


def eio_packets(body: bytes) -> list[bytes]:
    return body.split(EIO_SEPARATOR) if body else []
