"""The reading of a client's WebSocket frames, held to RFC 6455, in place of Tornado's `WebSocketProtocol13` reader
(through transport/compat.py's `FrameReader`, which names the reader's private parts).

Tornado's own reader accepts a client frame that is not masked (RFC 6455 5.1: the server MUST close the
connection), echoes any close code a client sends (1005 or 999 included, which must never be sent), and on
every other violation drops the TCP connection without a Close frame, so the client cannot tell why.
`StrictProtocol` reads the same frames and answers each violation as the RFC has it (7.1.7, 7.4.1): a Close frame
with 1002 (protocol error), 1007 (a text message or close reason that is not UTF-8) or 1009 (a message over
`max_message_size`), then what the client still sends is read and dropped until it closes, or until the wait
Tornado's own close() allows (5 s), after which the connection is aborted. Nothing after the violation is handled
as a message. Every valid frame is handed to Tornado's own handling (`handle_message`) as its reader would.

With permessage-deflate negotiated (never on /ws, which offers no extension), frames are read by Tornado's own
reader.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

import tornado.websocket

from transport import compat

log = logging.getLogger(__name__)

PROTOCOL_ERROR, INVALID_DATA, TOO_BIG = 1002, 1007, 1009
_DATA, _CONTROL = frozenset((0x0, 0x1, 0x2)), frozenset((0x8, 0x9, 0xA))


def valid_close_code(code: int) -> bool:
    """A code a Close frame may carry (RFC 6455 7.4; 1012-1014 as IANA registered them since)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def unmask(mask: bytes, data: bytes) -> bytes:
    """A masked payload's bytes (RFC 6455 5.3), by whole-number XOR."""
    n = len(data)
    if not n:
        return data
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


class StrictProtocol(compat.FrameReader):
    """Tornado's RFC 6455 protocol with a frame reader that fails a connection breaking the RFC with a Close code."""

    async def receive_frame(self) -> None:
        if self.decompressing:
            await self.tornado_receive_frame()  # an extension this reader does not know: Tornado's
            return
        head = await self.read_bytes(2)
        first, second = head[0], head[1]
        final, opcode, length = bool(first & self.FIN), first & self.OPCODE_MASK, second & 0x7F
        if first & self.RSV_MASK:
            await self._fail(PROTOCOL_ERROR, "reserved bits set, and no extension was negotiated")
            return
        if opcode not in _DATA and opcode not in _CONTROL:
            await self._fail(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
            return
        if not second & 0x80:
            await self._fail(PROTOCOL_ERROR, "a client's frames must be masked")
            return
        control = opcode in _CONTROL
        if control and (length > 125 or not final):
            await self._fail(PROTOCOL_ERROR, "a control frame must be whole and at most 125 bytes")
            return
        if length == 126:
            length = struct.unpack("!H", await self.read_bytes(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", await self.read_bytes(8))[0]
        pending = self.fragments
        if opcode == 0x0 and pending is None:
            await self._fail(PROTOCOL_ERROR, "a continuation frame with no message to continue")
            return
        if opcode in (0x1, 0x2) and pending is not None:
            await self._fail(PROTOCOL_ERROR, "a new message before the end of the last one")
            return
        if not control and length + (len(pending) if pending is not None else 0) > self.params.max_message_size:
            await self._fail(TOO_BIG, "message too big")
            return
        mask = await self.read_bytes(4)
        payload = unmask(mask, await self.read_bytes(length))
        if opcode == 0x8:
            problem = _close_problem(payload)
            if problem is not None:
                await self._fail(*problem)
                return
        elif not control:
            if opcode == 0x0:
                assert pending is not None
                pending.extend(payload)
                if not final:
                    return
                opcode, payload = self.fragments_opcode, bytes(pending)
                self.fragments = None
            elif not final:
                self.fragments_opcode = opcode
                self.fragments = bytearray(payload)
                return
            if opcode == 0x1 and not _is_utf8(payload):
                await self._fail(INVALID_DATA, "a text message that is not UTF-8")
                return
        handled = self.handle_message(opcode, payload)
        if handled is not None:
            await handled

    async def _fail(self, code: int, reason: str) -> None:
        """RFC 6455 7.1.7: a Close frame with `code`; then what the client sends is read and dropped (no longer
        handled) until it closes, or until close()'s own wait for it runs out and aborts the connection."""
        log.info("closing a WebSocket that broke the protocol (%d): %s", code, reason)
        self.close(code, reason)
        while True:  # ends with StreamClosedError, which the frame loop takes as the end of the connection
            await self.stream.read_bytes(65536, partial=True)


def _close_problem(payload: bytes) -> tuple[int, str] | None:
    """What is wrong with a client's Close frame, as (code, reason); None if nothing."""
    if len(payload) == 1:
        return PROTOCOL_ERROR, "a close frame's code takes two bytes"
    if len(payload) >= 2:
        if not valid_close_code(struct.unpack("!H", payload[:2])[0]):
            return PROTOCOL_ERROR, "a close code no endpoint may send"
        if not _is_utf8(payload[2:]):
            return INVALID_DATA, "a close reason that is not UTF-8"
    return None


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def strict(protocol: Any) -> Any:
    """The protocol a WebSocketHandler's `get_websocket_protocol` made, with the strict reader where it applies."""
    if type(protocol) is not tornado.websocket.WebSocketProtocol13:
        return protocol
    return StrictProtocol(protocol.handler, protocol.mask_outgoing, protocol.params)

