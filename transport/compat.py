"""Every name Tornado keeps private that this server uses, in one place, for the Tornado versions it was checked on.

Importing this module fails on a Tornado outside `SUPPORTED` (requirements.txt pins one inside it): a private
name may change meaning in any release, so an upgrade is a change here first, and tests/test_compat.py checks
that each name below still exists and behaves as this module assumes. Nothing else in the project names a
private attribute of a Tornado object.

What is used, and why:
- `HTTPHeaders._as_list` (a normalized name to its field values in order): the HTTP/1.1 layer fills headers that
  httptools has already checked without `HTTPHeaders.add`'s regular expressions per field, and reads whether a
  field is present without normalizing its name again. `_normalize_header` is Tornado's cached normalization.
- `IOStream._read_buffer` and `_read_buffer_size`: a connection handed to Tornado's server carries the bytes
  already read; IOStream has no public way to put bytes back.
- `WebSocketHandler._detach_stream`: Tornado's version sets seven attributes on each upgraded handler;
  `LeanDetach` refuses the same methods from the class instead. `RequestHandler._transforms`: one of the names
  Tornado sets after `__init__`, which `LeanDetach` keeps in slots.
- `RequestHandler._finished`, `_reason` and `_headers`: whether an answer is finished (a streamed body's chunks
  after a refusal are dropped), the reason phrase an error's JSON body carries, and the response headers an
  upgraded WebSocket no longer needs.
- `WebSocketProtocol13._receive_frame`, `_read_bytes`, `_handle_message`, `_decompressor` and the fragmented
  message's state: `FrameReader` exposes them under public names to transport/wsframes.py's RFC 6455 reader.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import tornado
import tornado.httputil
import tornado.iostream
import tornado.web
import tornado.websocket

# The (major, minor) versions this module was checked against. Tornado 6.7 drops bare-LF parsing of requests.
SUPPORTED = ((6, 6),)

if tornado.version_info[:2] not in SUPPORTED:
    raise ImportError(
        f"Tornado {tornado.version} is not among the versions transport/compat.py was checked on "
        f"({', '.join(f'{a}.{b}' for a, b in SUPPORTED)}): check each private name it uses, then add the version"
    )

normalize_header: Callable[[str], str] = tornado.httputil._normalize_header


def headers_from_fields(fields: dict[str, list[str]]) -> tornado.httputil.HTTPHeaders:
    """HTTPHeaders holding `fields` (normalized names to their values in order, already validated), made without
    the constructor's generic `update()` and `add()`'s per-field checks."""
    headers = tornado.httputil.HTTPHeaders.__new__(tornado.httputil.HTTPHeaders)
    headers._as_list = fields
    headers._combined_cache = {}
    return headers


def empty_headers(headers: tornado.httputil.HTTPHeaders) -> None:
    """Empty the headers in place, their tables freed (`clear()` would keep the emptied tables allocated)."""
    headers._as_list = {}
    headers._combined_cache = {}


def header_fields(headers: tornado.httputil.HTTPHeaders) -> dict[str, list[str]]:
    """The headers' own map of normalized names to their values: read it, never change it."""
    fields: dict[str, list[str]] = headers._as_list
    return fields


def unread(stream: tornado.iostream.IOStream, data: bytes) -> None:
    """Put bytes already read from the stream's socket back in front of what it reads next."""
    stream._read_buffer += data
    stream._read_buffer_size += len(data)


def handler_finished(handler: tornado.web.RequestHandler) -> bool:
    """Whether the handler's answer is finished (RequestHandler keeps no public flag)."""
    return bool(handler._finished)


def status_reason(handler: tornado.web.RequestHandler) -> str:
    """The reason phrase of the handler's status: what `send_error` set before `write_error` is called."""
    reason: str = handler._reason
    return reason


def drop_response_headers(handler: tornado.web.RequestHandler) -> None:
    """Let go of an upgraded WebSocket handler's HTTP response headers (nothing writes them after the 101)."""
    handler._headers = tornado.httputil.HTTPHeaders()


# The methods Tornado's `_detach_stream` makes refuse once a WebSocket is upgraded.
DETACHED_METHODS = ("write", "redirect", "set_header", "set_cookie", "set_status", "flush", "finish")


# What Tornado sets on a handler after its `__init__`: `_execute` the transforms and the path's arguments, a
# WebSocketHandler's `get()` the arguments it passes to `open()`.
LATE_ATTRIBUTES = ("_transforms", "path_args", "path_kwargs", "open_args", "open_kwargs")


class LeanDetach(tornado.websocket.WebSocketHandler):
    """A WebSocketHandler whose upgrade refuses the HTTP methods from the class, not with seven attributes set on
    each instance as Tornado's `_detach_stream` does. A subclass calls `refuse_after_upgrade(cls)` once.

    The attributes set after `__init__` live in slots: CPython keeps a class's attribute names in one table its
    instances share, which stops taking names once a few instances exist; a name set later than that gives the
    instance a whole dict of its own, held for the socket's life. The names set in `__init__` are in the table
    from the first instance on.
    """

    __slots__ = ("upgraded", *LATE_ATTRIBUTES)

    def __init__(self, application: tornado.web.Application, request: tornado.httputil.HTTPServerRequest,
                 **kwargs: Any) -> None:
        self.upgraded = False
        super().__init__(application, request, **kwargs)

    def _detach_stream(self) -> tornado.iostream.IOStream:
        self.upgraded = True
        return self.detach()


def refuse_after_upgrade(cls: type[LeanDetach]) -> None:
    """Make `DETACHED_METHODS` of `cls` raise as Tornado's do, once an instance is upgraded."""
    for name in DETACHED_METHODS:
        setattr(cls, name, _refused_after_upgrade(getattr(cls, name)))


def _refused_after_upgrade(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def guarded(self: LeanDetach, *args: Any, **kwargs: Any) -> Any:
        if self.upgraded:
            raise RuntimeError("Method not supported for Web Sockets")  # Tornado's words
        return method(self, *args, **kwargs)

    return guarded


class FrameReader(tornado.websocket.WebSocketProtocol13):
    """Tornado's RFC 6455 protocol with its frame reader replaceable: a subclass defines `receive_frame`, reading
    with `read_bytes` and handing each whole message to `handle_message`, as Tornado's own reader does."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The subclass's reader is what Tornado's frame loop calls: put in its place, not awaited from a wrapper
        # (a coroutine more per socket, suspended for the socket's life).
        super().__init_subclass__(**kwargs)
        if "receive_frame" in cls.__dict__:
            cls._receive_frame = cls.__dict__["receive_frame"]  # type: ignore[method-assign]

    async def receive_frame(self) -> None:
        await tornado.websocket.WebSocketProtocol13._receive_frame(self)

    async def tornado_receive_frame(self) -> None:
        """Tornado's own reader, for what a subclass leaves to it (an extension it does not know)."""
        await tornado.websocket.WebSocketProtocol13._receive_frame(self)

    # Tornado's `_read_bytes(n)` (the stream's `read_bytes` and the count of bytes in), under a public name.
    read_bytes = tornado.websocket.WebSocketProtocol13._read_bytes

    def handle_message(self, opcode: int, data: bytes) -> Any:
        return self._handle_message(opcode, data)

    @property
    def decompressing(self) -> bool:
        """Whether an extension (permessage-deflate) was negotiated: its frames are Tornado's to read."""
        return self._decompressor is not None

    @property
    def fragments(self) -> bytearray | None:
        """The fragments of the message being received, or None between messages."""
        pending: bytearray | None = self._fragmented_message_buffer
        return pending

    @fragments.setter
    def fragments(self, value: bytearray | None) -> None:
        self._fragmented_message_buffer = value

    @property
    def fragments_opcode(self) -> int:
        """The opcode of the message whose fragments are being received."""
        opcode: int = self._fragmented_message_opcode  # type: ignore[assignment]  # declared None, set to an int
        return opcode

    @fragments_opcode.setter
    def fragments_opcode(self, value: int) -> None:
        self._fragmented_message_opcode = value  # type: ignore[assignment]
