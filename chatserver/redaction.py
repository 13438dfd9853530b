"""Log redaction: a log line never holds a credential (a token, a ticket, a password, an auth header's value).

Used wherever a line about a request is written: the access log, the HTTP layer's refusals, and run.py's log
formatter over every line. Pure text in, text out: no HTTP here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote, unquote_plus

from chatserver.auth import token_spans

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
    parts: list[str] = []
    end = 0
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
