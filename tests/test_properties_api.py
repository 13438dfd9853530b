"""Property tests over real sockets against a live server process: whatever a client sends as a JSON body or as a
cursor, the answer is a success or a 4xx with the JSON error envelope, as docs/openapi.json declares it; never a
500, never a connection dropped without an answer; and the server keeps serving and logs no traceback.

Bodies: any JSON value, objects shaped like each endpoint's with any values in their fields, keys repeated, lone
surrogates (escaped, or raw in invalid UTF-8), bytes that are not UTF-8, nesting far past any limit, numbers past
any float, NaN and Infinity; sent with a length or chunked. Cursors: any text (raw in the URL, invalid UTF-8
included), and near misses of a real cursor (this epoch with digits of every script, other epochs) on the
long-poll (both of its paths), the SSE stream (as `?cursor=` and as `Last-Event-ID`) and the WebSocket upgrade.

Runs are derandomized and bounded (a few hundred requests each), so CI sees the same examples every time.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import Live
from tests.test_openapi import Answer, check

PROPERTY_SETTINGS = settings(
    max_examples=150, derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@attrs.frozen
class Endpoint:
    method: str
    path: str  # the documented template
    fields: tuple[str, ...]
    token: bool = True


ENDPOINTS = (
    Endpoint("POST", "/api/auth/login", ("phone", "password"), token=False),
    Endpoint("POST", "/api/dialogs", ("title", "memberIds")),
    Endpoint("POST", "/api/messages/dialog/{dialogId}", ("content", "type", "meta", "clientMessageId")),
    Endpoint("PATCH", "/api/messages/{messageId}", ("content",)),
    Endpoint("POST", "/api/dialogs/{dialogId}/typing", ("typing",)),
    Endpoint("POST", "/api/dialogs/{dialogId}/read", ("messageId",)),
)


@attrs.frozen
class Pairs:
    """A JSON object as its written pairs: a key may come more than once."""

    items: tuple[tuple[str, Any], ...]


def encode(value: Any) -> str:
    """JSON text as a sloppy client might write it: NaN, Infinity, integers of any size, repeated keys."""
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{json.dumps(key)}:{encode(item)}" for key, item in value.items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(item) for item in value) + "]"
    return json.dumps(value)  # floats: NaN and Infinity as such; strings: lone surrogates as \ud800 escapes


text = st.text(st.characters() | st.integers(0xD800, 0xDFFF).map(chr), max_size=30)
scalars = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300, max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([math.nan, math.inf, -math.inf, 1e308])
    | text
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.lists(st.tuples(text, inner), max_size=4).map(tuple).map(Pairs),
    max_leaves=12,
)


@st.composite
def bodies(draw: st.DrawFn, endpoint: Endpoint, message_id: str) -> bytes:
    """A request body for this endpoint: mostly its own shape with odd values, sometimes anything at all."""
    kind = draw(st.sampled_from(["shaped", "shaped", "shaped", "value", "bytes", "deep", "huge", "repeated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "deep":
        depth = draw(st.sampled_from([63, 64, 65, 1000, 100_000]))
        return ("[" * depth + "]" * depth).encode()
    if kind == "huge":
        zeros = "0" * draw(st.integers(300, 5000))
        return f'{{"{endpoint.fields[0]}": 1{zeros}}}'.encode()
    if kind == "repeated":
        first, second = draw(values), draw(values)
        return f'{{"{endpoint.fields[0]}": {encode(first)}, "{endpoint.fields[0]}": {encode(second)}}}'.encode()
    if kind == "value":
        value = draw(values)
    else:
        good: dict[str, Any] = {
            "phone": "79111111111", "password": "demo", "title": "t", "memberIds": [], "content": "hi",
            "type": "text", "meta": {}, "clientMessageId": None, "typing": True, "messageId": message_id,
        }
        names = draw(st.lists(st.sampled_from(endpoint.fields), unique=True))
        value = Pairs(tuple(
            (name, draw(values) if name in names else good[name]) for name in endpoint.fields
        ) + tuple(draw(st.lists(st.tuples(text, values), max_size=2))))
    raw = encode(value)
    # A lone surrogate reaches the server escaped (`\ud800`, valid JSON text) or raw (invalid UTF-8).
    return raw.encode("utf-8", "surrogatepass") if draw(st.booleans()) else raw.encode("ascii", "backslashreplace")


@pytest.fixture(scope="module")
def session(live: Live) -> Iterator[requests.Session]:
    with requests.Session() as http:
        yield http
    # Whatever was sent, the server still serves, and nothing it did was an uncaught failure.
    assert requests.get(live.url + "/healthz", timeout=5).status_code == 200
    assert live.call("GET", "/api/me")["userId"]
    stderr = live.server.process.stderr
    assert "Traceback" not in stderr and " ERROR " not in stderr, stderr[-5000:]


def answered(response: requests.Response, method: str, path: str) -> Answer:
    """The answer, checked against the document: a declared status (never a 5xx), its headers, its schema."""
    assert response.status_code < 500, (response.status_code, response.text[:300])
    answer = Answer(method, path, response.status_code, response.headers, response.content)
    check(answer)
    event(f"{method} {path}: {answer.status}")  # the spread of answers, with --hypothesis-show-statistics
    return answer


@PROPERTY_SETTINGS
@given(data=st.data())
def test_any_json_body_gets_a_success_or_a_json_4xx(live: Live, session: requests.Session, data: st.DataObject) -> None:
    endpoint = data.draw(st.sampled_from(ENDPOINTS))
    body = data.draw(bodies(endpoint, live.message_id))
    url = endpoint.path.format(dialogId=live.dialog_id, messageId=live.message_id)
    headers = {"Content-Type": "application/json"}
    if endpoint.token:
        headers["Authorization"] = f"Bearer {live.token}"
    # A chunked body goes to Tornado's own HTTP/1.1 server; one with a length is read by transport/http1.py.
    sent: Any = iter([body]) if data.draw(st.booleans()) else body
    response = session.request(endpoint.method, live.url + url, data=sent, headers=headers, timeout=10)
    answered(response, endpoint.method, endpoint.path)


def cursors(epoch: str) -> st.SearchStrategy[str]:
    digits = st.text(st.sampled_from("0123456789²³¹①٠١٩０９߀৩〇"), min_size=1, max_size=20)
    return st.one_of(
        text,
        digits.map(lambda seq: f"{epoch}.{seq}"),
        st.tuples(st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=12), digits).map(".".join),
        st.sampled_from([f"{epoch}.0", f"{epoch}.{10**18}", f"{epoch}.-1", f"{epoch}.+1", f"{epoch}. 1", ".1",
                         f"{epoch}.", "0000000000.1", f"{epoch}.1.1", f"{epoch}.²", f"{epoch}.٠", f"{epoch}.０"]),
    )


def query(value: str) -> str:
    return urllib.parse.quote(value.encode("utf-8", "surrogatepass"), safe="")


@PROPERTY_SETTINGS
@given(data=st.data())
def test_any_cursor_gets_a_valid_answer_or_a_json_400_on_every_transport(
    live: Live, session: requests.Session, data: st.DataObject
) -> None:
    epoch = live.call("GET", "/api/poll")["cursor"].rsplit(".", 1)[0]
    cursor = data.draw(cursors(epoch))
    auth = {"Authorization": f"Bearer {live.token}"}
    # The lean path answers a plain poll; a conditional header sends it to PollHandler. Both must agree.
    statuses = set()
    for extra in ({}, {"If-None-Match": '"x"'}):
        response = session.get(f"{live.url}/api/poll?cursor={query(cursor)}&timeout=0", headers={**auth, **extra},
                               timeout=10)
        statuses.add(answered(response, "GET", "/api/poll").status)
    assert len(statuses) == 1, (cursor, statuses)
    assert statuses <= {200, 400}
    stream = session.get(f"{live.url}/api/events?cursor={query(cursor)}", headers=auth, stream=True, timeout=10)
    check_stream(stream)
    # What a header can carry: requests refuses a value that starts with whitespace (HTTP would strip it).
    if cursor.isascii() and cursor.isprintable() and not cursor.startswith((" ", "\t")):
        stream = session.get(f"{live.url}/api/events", headers={**auth, "Last-Event-ID": cursor}, stream=True,
                             timeout=10)
        check_stream(stream)
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
               "Sec-WebSocket-Version": "13"}
    with requests.get(f"{live.url}/ws?cursor={query(cursor)}", headers={**auth, **upgrade}, stream=True,
                      timeout=10) as response:
        assert response.status_code in (101, 400), (cursor, response.status_code)
        if response.status_code == 400:
            answered(response, "GET", "/ws")


def check_stream(response: requests.Response) -> None:
    """An SSE answer: a JSON 400, or the stream, whose first event is checked and which is then closed."""
    with response:
        assert response.status_code in (200, 400), response.status_code
        if response.status_code == 400:
            answered(response, "GET", "/api/events")
            return
        head = b""
        for chunk in response.iter_content(chunk_size=None):
            head += chunk
            if b"\n\n" in head:
                break
        block = head.split(b"\n\n", 1)[0].decode()
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != ":")
        event = {name: fields[name] for name in ("id", "data") if name in fields}
        check(Answer("GET", "/api/events", 200, response.headers, b"", (event,)))
