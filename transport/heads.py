"""A request's head (its request line and header fields), parsed by httptools (llhttp, as uvicorn and Node.js use).

The parser decides what is well formed: the method, the target's characters, the version, header names and
values, Content-Length (digits only, never twice) and Transfer-Encoding, and whether the request asks for an
upgrade. This module only finds where a head ends in the bytes read so far, feeds that head to the parser, and
hands back what the connection layer needs, in Tornado's types. Every line ends in CRLF: a bare LF is refused
(llhttp's strict mode; RFC 9112 2.2 lets a server accept one, and Tornado 6.7 stops accepting it too).

One parser serves a whole server: each head is fed whole and at once, and a parser that is left expecting a body
(or that refused something) is replaced, so the next head always starts on a parser at rest.
"""

from __future__ import annotations

from typing import NamedTuple

import httptools
import tornado.httputil

from transport import compat

_VERSIONS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}
_METHODS = {name.encode(): name for name in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")}


class MalformedHead(Exception):
    """A head the parser refuses; the message is the parser's own fixed words (never a byte of the request), and
    `status` the answer's (400; 505 for a version other than HTTP/1.0 and 1.1)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Head(NamedTuple):
    start_line: tornado.httputil.RequestStartLine
    headers: tornado.httputil.HTTPHeaders
    fields: dict[str, list[str]]  # the headers' own map: normalized name -> its values in order
    upgrade: bool  # the parser saw an upgrade (`Connection: upgrade` with `Upgrade`, or CONNECT)


def head_end(buffer: bytearray) -> int:
    """Where the head in `buffer` ends (after its empty line), or -1 while it has not all arrived. The first empty
    line ends it, whatever its line ends: a head with a bare LF is found too, for the parser to refuse."""
    end = buffer.find(b"\r\n\r\n")
    if end >= 0 and buffer.find(b"\n\n", 0, end + 2) < 0 and buffer.find(b"\n\r\n", 0, end + 2) < 0:
        return end + 4  # the usual head: CRLF line ends only
    bound = len(buffer) if end < 0 else end + 2
    lf = buffer.find(b"\n\n", 0, bound)
    lf_crlf = buffer.find(b"\n\r\n", 0, bound)
    ends = [at for at in (end + 4 if end >= 0 else -1, lf + 2 if lf >= 0 else -1, lf_crlf + 3 if lf_crlf >= 0 else -1)
            if at >= 0]
    return min(ends) if ends else -1


class HeadParser:
    """Parses one head at a time into a `Head` (the callbacks of httptools' parser land here)."""

    __slots__ = ("_complete", "_fields", "_parser", "_url")

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._fields: dict[str, list[str]] = {}
        self._complete = False

    def parse(self, head: bytes) -> Head:
        """The head (all of it, the empty line included), or MalformedHead."""
        self._url = b""
        fields: dict[str, list[str]] = {}
        self._fields = fields
        self._complete = False
        parser = self._parser
        upgrade = False
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            upgrade = True
        except httptools.HttpParserError as exc:
            self._parser = httptools.HttpRequestParser(self)
            raise MalformedHead(f"malformed HTTP request: {exc}") from None
        version = _VERSIONS.get(parser.get_http_version())
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("ascii")
        if upgrade or not self._complete or version != "HTTP/1.1" or (
                "Connection" in fields and any("close" in value.lower() for value in fields["Connection"])):
            # Not at rest for another head: a body is expected, or the connection may end or change protocol.
            self._parser = httptools.HttpRequestParser(self)
        if version is None:
            if b" HTTP/" not in head[: head.find(b"\n")]:
                # llhttp reads a request line with no version as HTTP/0.9; RFC 9112 section 3 requires one.
                raise MalformedHead("malformed HTTP request: the request line has no HTTP version")
            raise MalformedHead("HTTP Version Not Supported: this server speaks HTTP/1.1 and HTTP/1.0", 505)
        start_line = tornado.httputil.RequestStartLine(method, self._url.decode("latin1"), version)
        return Head(start_line, compat.headers_from_fields(fields), fields, upgrade)

    # -- httptools' callbacks --------------------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        normalized = _NORMALIZED.get(name)
        if normalized is None:
            normalized = compat.normalize_header(name.decode("latin1"))
            if len(_NORMALIZED) < 1000:  # the names clients send are few; a bound for those who invent more
                _NORMALIZED[name] = normalized
        field = value.decode("latin1").strip(" \t")  # llhttp drops the whitespace before a value, not after it
        values = self._fields.get(normalized)
        if values is None:
            self._fields[normalized] = [field]
        else:
            values.append(field)  # a repeated field: a list, as HTTPHeaders.parse makes it

    def on_message_complete(self) -> None:
        self._complete = True


_NORMALIZED: dict[bytes, str] = {}
