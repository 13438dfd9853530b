"""docs/openapi.json against the server: the document is valid OpenAPI 3.1, it is served, it names every route with
its methods and nothing that is not routed, and every answer it declares is given by a real call over a real
socket and matches the declared status, headers and schema.

A route added to `make_app` without its operations in the document fails here; so does a field added to an answer
without its schema (the document's objects allow no undeclared properties), and a status or a header the server
gives that the document does not declare.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import Any

import attrs
import jsonschema
import pytest
import tornado.httpclient
import tornado.web
import tornado.websocket
from openapi_spec_validator import validate as validate_openapi

from chatserver import jsonutil
from handlers.app import OPENAPI_DOCUMENT
from handlers.base import AppContext, implemented_methods
from tests.conftest import Client
from tests.test_realtime import SseReader, eventually

DOCUMENT: dict[str, Any] = jsonutil.loads(OPENAPI_DOCUMENT.read_bytes())
METHODS = ("get", "head", "post", "put", "patch", "delete", "options", "trace")
_PARAMETER = re.compile(r"\{[^/}]+\}")


def documented_operations() -> dict[tuple[str, str], dict[str, Any]]:
    """(METHOD, path template) -> the operation object."""
    return {
        (method.upper(), path): operation
        for path, item in DOCUMENT["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }


def resolve(node: Any) -> Any:
    """What a `$ref` of the document names (followed as often as it chains), or the node itself."""
    while isinstance(node, dict) and "$ref" in node:
        target: Any = DOCUMENT
        for part in str(node["$ref"]).removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def validate(instance: Any, schema: Mapping[str, Any]) -> None:
    """JSON Schema 2020-12 validation, with the document's components there for `$ref`s to reach."""
    jsonschema.Draft202012Validator({**schema, "components": DOCUMENT["components"]}).validate(instance)


# -- the document ----------------------------------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1() -> None:
    validate_openapi(DOCUMENT)
    assert DOCUMENT["openapi"].startswith("3.1.")


def test_every_operation_declares_its_answers_and_every_schema_is_used() -> None:
    for (method, path), operation in documented_operations().items():
        assert operation.get("operationId"), (method, path)
        assert any(status.startswith("2") or status == "101" for status in operation["responses"]), (method, path)
        if operation.get("security", DOCUMENT["security"]) != []:
            assert "401" in operation["responses"], (method, path, "a secured operation answers 401")
    text = OPENAPI_DOCUMENT.read_text()
    for kind in ("schemas", "responses", "parameters", "headers"):
        for name in DOCUMENT["components"][kind]:
            assert f'"#/components/{kind}/{name}"' in text, f"components/{kind}/{name} is never used"


@pytest.mark.gen_test
async def test_the_document_is_served_as_it_is_without_a_token(alice: Client) -> None:
    response = await alice.http.fetch(alice.base_url + "/api/openapi.json")
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.body == OPENAPI_DOCUMENT.read_bytes()


def test_every_route_is_documented_with_its_methods_and_every_documented_path_is_routed(app: Any) -> None:
    # Tornado routes a path to the first rule whose pattern matches it: each documented path, with a sample value
    # in each parameter, must reach a rule, and each rule must be reached by exactly one documented path.
    rules = list(app.wildcard_router.rules)
    reached: dict[int, str] = {}
    for path, item in DOCUMENT["paths"].items():
        sample = _PARAMETER.sub("sample", path)
        index = next((i for i, rule in enumerate(rules) if rule.matcher.regex.match(sample)), None)
        assert index is not None, f"{path} is documented but no route serves it"
        assert index not in reached, f"{path} and {reached.get(index)} are one route"
        reached[index] = path
        handler = rules[index].target
        methods = implemented_methods(handler)
        if issubclass(handler, tornado.web.StaticFileHandler):
            methods = ("GET", "HEAD")
        documented = tuple(method.upper() for method in item if method in METHODS)
        assert sorted(documented) == sorted(methods), (path, handler.__name__, documented, methods)
    for index, rule in enumerate(rules):
        assert index in reached, f"the route {rule.matcher.regex.pattern} ({rule.target.__name__}) is not documented"


# -- every declared answer, given by a real call ---------------------------------------------------------------


@attrs.frozen
class Answer:
    method: str
    path: str  # the documented template
    status: int
    headers: Mapping[str, str]
    body: bytes
    events: tuple[dict[str, Any], ...] = ()  # a stream's events, as their fields (`data`, `id`)


def check(answer: Answer) -> None:
    """The answer is one the document declares for this operation: status, required headers, media type, schema."""
    operation = documented_operations()[(answer.method, answer.path)]
    where = (answer.method, answer.path, answer.status, answer.body[:300])
    assert str(answer.status) in operation["responses"], ("undeclared status", *where)
    declared = resolve(operation["responses"][str(answer.status)])
    for name, header in declared.get("headers", {}).items():
        header = resolve(header)
        if header.get("required"):
            assert name in answer.headers, (f"no {name} header", *where)
        if name in answer.headers:
            value: Any = answer.headers[name]
            if header["schema"].get("type") == "integer":
                assert value.isascii() and value.isdecimal(), (name, value, *where)
                value = int(value)
            validate(value, header["schema"])
    content = declared.get("content")
    if not content:
        assert answer.body == b"", ("a body", *where)
        return
    media = answer.headers["Content-Type"].split(";")[0].strip()
    schema = content.get(media, content.get("*/*"))
    assert schema is not None, (f"undeclared media type {media}", *where)
    schema = schema["schema"]
    if media == "application/json":
        validate(jsonutil.loads(answer.body), schema)
    elif media == "text/event-stream":
        assert answer.events, where
        item = resolve(schema)
        for event in answer.events:
            validate(event, schema)
            validate(jsonutil.loads(event["data"]), item["properties"]["data"]["contentSchema"])


class Caller:
    """Makes the calls, checks each answer against the document, and remembers which declared answers it saw."""

    def __init__(self, client: Client, seen: set[tuple[str, str, int]]) -> None:
        self.client = client
        self.seen = seen

    async def call(
        self, method: str, path: str, url: str | None = None, *, body: Any = None, raw: bytes | None = None,
        token: str | None = None, headers: dict[str, str] | None = None, expect: int,
    ) -> Answer:
        """`path` is the documented template; `url` the path called, where it has parameters filled in."""
        all_headers = {} if token == "" else {"Authorization": f"Bearer {token or self.client.token}"}
        all_headers.update(headers or {})
        data = raw if raw is not None else None if body is None else jsonutil.dumps_bytes(body)
        if data is None and method in ("POST", "PATCH"):
            data = b""
        response = await self.client.http.fetch(
            self.client.base_url + (url or path), method=method, body=data, headers=all_headers,
            raise_error=False, request_timeout=10, allow_nonstandard_methods=True,
        )
        return self.record(Answer(method, path, response.code, response.headers, response.body or b""), expect)

    def record(self, answer: Answer, expect: int) -> Answer:
        assert answer.status == expect, (answer.method, answer.path, answer.status, answer.body[:300])
        check(answer)
        self.seen.add((answer.method, answer.path, answer.status))
        return answer

    async def stream(self, query: str, expect: int = 200, *, ticket: str | None = None) -> Answer:
        """`GET /api/events` (with the token in the query, or `ticket`): its head and first events, then the stream
        is closed."""
        reader = SseReader(self.client, cursor=query or None, ticket=ticket)
        try:
            await reader.wait_for(2 if query else 1)
            await asyncio.sleep(0.05)
            events = tuple({"data": jsonutil.dumps(event), **({"id": id_} if id_ else {})}
                           for id_, event in reader.events)
            headers = {name.title(): value for name, value in reader.headers.items()}
        finally:
            reader.close()
        return self.record(Answer("GET", "/api/events", 200, headers, b"", events), expect)

    async def upgrade(self, query: str, expect: int, **headers: str) -> Answer:
        request = tornado.httpclient.HTTPRequest(f"{self.client.ws_url}/ws?{query}", headers=headers or None)
        try:
            conn = await tornado.websocket.websocket_connect(request)
        except tornado.httpclient.HTTPClientError as refused:
            assert refused.response is not None
            response = refused.response
            return self.record(Answer("GET", "/ws", refused.code, response.headers, response.body or b""), expect)
        try:
            ready = jsonutil.loads(await asyncio.wait_for(conn.read_message(), 5))  # type: ignore[arg-type]
            validate(ready, {"$ref": "#/components/schemas/StreamEvent"})
            return self.record(Answer("GET", "/ws", 101, conn.headers, b""), expect)
        finally:
            conn.close()


@pytest.mark.gen_test(timeout=60)
# Next to nothing drains from a write bucket during the test: the answer past the burst is 429 however slow the run.
@pytest.mark.parametrize("settings", [{"message_rate": 0.001, "ticket_rate": 0.001, "ticket_burst": 3}])
async def test_every_declared_answer_is_given_by_a_real_call_and_matches_the_document(
    alice: Client, bob: Client, carol: Client, dialog_id: str, ctx: AppContext
) -> None:
    seen: set[tuple[str, str, int]] = set()
    a, b, c = Caller(alice, seen), Caller(bob, seen), Caller(carol, seen)
    big = b'{"content": "' + b"x" * (ctx.config.max_body_size + 1) + b'"}'
    nobody = "dlg_0000000000000000"
    cursor = ctx.broadcaster.cursor()

    # auth and users
    await a.call("POST", "/api/auth/login", body={"phone": "79111111111", "password": "demo-password"}, token="",
                 expect=200)
    await a.call("POST", "/api/auth/login", body={"phone": "79111111111"}, token="", expect=400)
    await a.call("POST", "/api/auth/login", body={"phone": "79111111111", "password": "no"}, token="", expect=401)
    await a.call("POST", "/api/auth/login", raw=big, token="", expect=413)
    await a.call("GET", "/api/me", expect=200)
    await a.call("GET", "/api/me", token="forged", expect=401)
    await a.call("GET", "/api/users", f"/api/users?ids={bob.user_id}", expect=200)
    await a.call("GET", "/api/users", expect=400)
    await a.call("GET", "/api/users", f"/api/users?phone={bob.user_id}", token="", expect=401)

    # dialogs
    await a.call("GET", "/api/dialogs", expect=200)
    await a.call("GET", "/api/dialogs", token="", expect=401)
    other = (await a.call("POST", "/api/dialogs", body={"title": "Other", "memberIds": [bob.user_id]}, expect=201))
    other_id = jsonutil.loads(other.body)["data"]["dialogId"]
    await a.call("POST", "/api/dialogs", body={"title": 5}, expect=400)
    await a.call("POST", "/api/dialogs", body={"title": "x"}, token="", expect=401)
    await a.call("POST", "/api/dialogs", raw=big, expect=413)
    one = "/api/dialogs/{dialogId}"
    await a.call("GET", one, f"/api/dialogs/{dialog_id}", expect=200)
    await a.call("GET", one, f"/api/dialogs/{dialog_id}", token="", expect=401)
    await c.call("GET", one, f"/api/dialogs/{dialog_id}", expect=403)
    await a.call("GET", one, f"/api/dialogs/{nobody}", expect=404)
    await b.call("PATCH", one, f"/api/dialogs/{other_id}", body={"title": "Renamed"}, expect=200)
    await a.call("PATCH", one, f"/api/dialogs/{other_id}", body={"addMemberIds": ["usr_0000000000000000"]},
                 expect=400)
    await a.call("PATCH", one, f"/api/dialogs/{other_id}", body={"title": "x"}, token="", expect=401)
    await b.call("PATCH", one, f"/api/dialogs/{dialog_id}", body={"removeMemberIds": [alice.user_id]}, expect=403)
    await a.call("PATCH", one, f"/api/dialogs/{nobody}", body={"title": "x"}, expect=404)
    await a.call("PATCH", one, f"/api/dialogs/{other_id}", raw=big, expect=413)

    # messages
    history, post = "/api/messages/dialog/{dialogId}", f"/api/messages/dialog/{dialog_id}"
    sent = jsonutil.loads((await a.call("POST", history, post, body={"content": "hi", "clientMessageId": "c-1"},
                                        expect=201)).body)["data"]
    elsewhere = jsonutil.loads((await a.call("POST", history, f"/api/messages/dialog/{other_id}",
                                             body={"content": "there"}, expect=201)).body)["data"]
    await a.call("POST", history, post, body={"content": " "}, expect=400)
    await a.call("POST", history, post, body={"content": "x"}, token="", expect=401)
    await c.call("POST", history, post, body={"content": "x"}, expect=403)
    await a.call("POST", history, f"/api/messages/dialog/{nobody}", body={"content": "x"}, expect=404)
    await a.call("POST", history, post, raw=big, expect=413)
    await a.call("GET", history, f"{post}?limit=10&before=", expect=200)
    await a.call("GET", history, f"{post}?limit=0", expect=400)
    await a.call("GET", history, post, token="", expect=401)
    await c.call("GET", history, post, expect=403)
    await a.call("GET", history, f"/api/messages/dialog/{nobody}", expect=404)
    edit, edit_url = "/api/messages/{messageId}", f"/api/messages/{sent['messageId']}"
    await a.call("PATCH", edit, edit_url, body={"content": "hi!"}, expect=200)
    await a.call("PATCH", edit, edit_url, body={"content": 1}, expect=400)
    await a.call("PATCH", edit, edit_url, body={"content": "x"}, token="", expect=401)
    await b.call("PATCH", edit, edit_url, body={"content": "x"}, expect=403)
    await a.call("PATCH", edit, "/api/messages/msg_0000000000000000", body={"content": "x"}, expect=404)
    await a.call("PATCH", edit, edit_url, raw=big, expect=413)

    # typing and read marks
    typing, typing_url = "/api/dialogs/{dialogId}/typing", f"/api/dialogs/{dialog_id}/typing"
    await a.call("POST", typing, typing_url, body={"typing": True}, expect=204)
    await a.call("POST", typing, typing_url, body={"typing": "yes"}, expect=400)
    await a.call("POST", typing, typing_url, body={"typing": True}, token="", expect=401)
    await c.call("POST", typing, typing_url, body={"typing": True}, expect=403)
    await a.call("POST", typing, f"/api/dialogs/{nobody}/typing", body={"typing": True}, expect=404)
    await a.call("POST", typing, typing_url, raw=big, expect=413)
    read, read_url = "/api/dialogs/{dialogId}/read", f"/api/dialogs/{dialog_id}/read"
    await a.call("POST", read, read_url, body={"messageId": sent["messageId"]}, expect=200)
    await a.call("POST", read, read_url, body={"messageId": elsewhere["messageId"]}, expect=400)
    await a.call("POST", read, read_url, body={"messageId": sent["messageId"]}, token="", expect=401)
    await c.call("POST", read, read_url, body={"messageId": sent["messageId"]}, expect=403)
    await a.call("POST", read, read_url, body={"messageId": "msg_0000000000000000"}, expect=404)
    await a.call("POST", read, read_url, raw=big, expect=413)

    # acknowledgements (receipts), and a receipt among the events below
    ack = "/api/ack"
    await b.call("POST", ack, body={"cursor": ctx.broadcaster.cursor()}, expect=200)
    await b.call("POST", ack, body={"cursor": "not-a-cursor"}, expect=400)
    await b.call("POST", ack, body={"cursor": cursor}, token="", expect=401)
    await b.call("POST", ack, raw=big, expect=413)
    await eventually(lambda: ctx.service.receipts.logged > 0 and ctx.service.receipts.idle)

    # long-poll: every kind of event in one answer or another, each checked against its schema
    poll = "/api/poll"
    await a.call("GET", poll, expect=200)
    answer = await a.call("GET", poll, f"/api/poll?cursor={cursor}&timeout=0", expect=200)
    kinds = {event["type"] for event in jsonutil.loads(answer.body)["data"]["events"]}
    assert kinds >= {"message:new", "message:update", "dialog:update", "dialog:receipt"}, kinds
    parked = asyncio.ensure_future(
        a.call("GET", poll, f"/api/poll?cursor={ctx.broadcaster.cursor()}&typing={dialog_id}&timeout=10", expect=200)
    )
    await asyncio.sleep(0.2)
    await b.call("POST", typing, typing_url, body={"typing": True}, expect=204)
    assert jsonutil.loads((await parked).body)["data"]["events"][0]["type"] == "typing:start"
    reset = await a.call("GET", poll, "/api/poll?cursor=0000000000.1&timeout=0", expect=200)
    assert jsonutil.loads(reset.body)["data"]["events"][0]["type"] == "reset"
    await a.call("GET", poll, "/api/poll?timeout=soon", expect=400)
    await a.call("GET", poll, token="", expect=401)
    await c.call("GET", poll, f"/api/poll?typing={dialog_id}", expect=403)
    await a.call("GET", poll, f"/api/poll?typing={nobody}", expect=404)

    # Server-Sent Events: the ready event, and a replay after a cursor
    await a.stream("")
    await a.stream(cursor)
    events = "/api/events"
    await a.call("GET", events, "/api/events?cursor=not-a-cursor", expect=400)
    await a.call("GET", events, token="", expect=401)
    await c.call("GET", events, f"/api/events?typing={dialog_id}", expect=403)
    await a.call("GET", events, f"/api/events?typing={nobody}", expect=404)

    # the WebSocket handshake
    token = f"token={alice.token}"
    await a.upgrade(token, 101)
    await a.upgrade(f"{token}&cursor=not-a-cursor", 400)
    await a.upgrade("token=forged", 401)
    await a.upgrade(token, 403, Origin="https://elsewhere.example")
    handshake = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                 "Sec-WebSocket-Version": "8"}  # websocket_connect would send 13 whatever it is told
    await a.call("GET", "/ws", f"/ws?{token}", token="", headers=handshake, expect=426)
    ctx.shutting_down = True
    try:
        await a.upgrade(token, 503)
    finally:
        ctx.shutting_down = False

    # stream tickets: one opens a WebSocket, another an event stream; each is refused once used, and is no token
    stream_ticket = "/api/stream-ticket"
    ticket = jsonutil.loads((await a.call("POST", stream_ticket, expect=201)).body)["data"]["ticket"]
    await a.upgrade(f"ticket={ticket}", 101)
    await a.upgrade(f"ticket={ticket}", 401)
    ticket = jsonutil.loads((await a.call("POST", stream_ticket, expect=201)).body)["data"]["ticket"]
    await a.stream("", ticket=ticket)
    await a.call("GET", events, f"/api/events?ticket={ticket}", token="", expect=401)
    await a.call("POST", stream_ticket, token=ticket, expect=401)
    await a.call("POST", stream_ticket, token="", expect=401)
    await a.call("POST", stream_ticket, raw=big, expect=413)
    await a.call("POST", stream_ticket, expect=201)
    await a.call("POST", stream_ticket, expect=429)

    # throttling: failed logins from one address for one phone, then Bob's writes past his burst
    for _ in range(ctx.config.login_failures):
        await a.call("POST", "/api/auth/login", body={"phone": "79000000000", "password": "guess"}, token="",
                     expect=401)
    await a.call("POST", "/api/auth/login", body={"phone": "79000000000", "password": "guess"}, token="", expect=429)
    own = jsonutil.loads((await b.call("POST", history, post, body={"content": "mine"}, expect=201)).body)["data"]
    for _ in range(ctx.config.message_burst - 1):
        await b.call("POST", history, post, body={"content": "more"}, expect=201)
    await b.call("POST", history, post, body={"content": "one too many"}, expect=429)
    await b.call("PATCH", edit, f"/api/messages/{own['messageId']}", body={"content": "too"}, expect=429)

    # operations, the document, the page
    for path in ("/healthz", "/readyz", "/metrics", "/api/openapi.json"):
        await a.call("GET", path, token="", expect=200)
    await a.call("HEAD", "/healthz", token="", expect=200)
    ctx.readiness["chat3"] = lambda: "the broker is not reachable"
    try:
        await a.call("GET", "/readyz", token="", expect=503)
    finally:
        del ctx.readiness["chat3"]
    for method in ("GET", "HEAD"):
        page = await a.call(method, "/", token="", expect=200)
        await a.call(method, "/", token="", headers={"If-None-Match": page.headers["Etag"]}, expect=304)
        static, url = "/static/{file}", "/static/chatclient.js"
        script = await a.call(method, static, url, token="", expect=200)
        await a.call(method, static, url, token="", headers={"If-None-Match": script.headers["Etag"]}, expect=304)
        await a.call(method, static, "/static/%2e%2e/run.py", token="", expect=403)
        await a.call(method, static, "/static/nothing.js", token="", expect=404)

    declared = {
        (method, path, int(status))
        for (method, path), operation in documented_operations().items()
        for status in operation["responses"]
    }
    assert declared - seen == set()
