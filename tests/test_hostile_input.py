"""Hostile input across endpoints, over real sockets: every refusal is a clear JSON 4xx, never a 500 or an HTML page.

The per-area cases live with their area (test_rest, test_realtime, test_users, test_chat3); what is here cuts
across routes: a token for a user this database does not hold, the page's static files, refused upgrades.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import tornado.httpclient
import tornado.websocket

from chatserver import jsonutil
from tests.conftest import Client
from tests.process import ServerProcess


async def fetch(client: Client, method: str, path: str, body: bytes | None = None, **headers: str) -> Any:
    if body is None and method in ("POST", "PATCH", "PUT"):
        body = b""
    return await client.http.fetch(
        client.base_url + path,
        method=method,
        body=body,
        headers=headers,
        raise_error=False,
        request_timeout=10,
        allow_nonstandard_methods=True,
    )


def assert_json_error(response: Any, expected: int) -> str:
    """The answer is `expected`, as JSON, with the error envelope."""
    assert response.code == expected, (response.code, response.body[:200])
    assert response.headers["Content-Type"].startswith("application/json"), response.headers["Content-Type"]
    body = jsonutil.loads(response.body)
    assert body["success"] is False and isinstance(body["error"], str) and body["error"], body
    return str(body["error"])


@pytest.fixture
def store_kind() -> str:
    """The HTTP layer's tests run on one store: what they prove does not depend on it."""
    return "sqlite"


@pytest.mark.gen_test
async def test_a_validly_signed_token_for_a_user_this_database_lacks_is_401_everywhere(
    alice: Client, dialog_id: str
) -> None:
    # Signed with the right secret, so only the store can tell: a database restored from backup, or another
    # database sharing the secret. It must authenticate nobody, on every endpoint and transport.
    ghost = alice.ctx.service.tokens.issue("usr_nobody")
    sent = await alice.post_message(dialog_id, "x")
    cursor = alice.ctx.broadcaster.cursor()
    requests = [
        ("GET", "/api/me", None),
        ("GET", f"/api/users?ids={alice.user_id}", None),
        ("GET", "/api/dialogs", None),
        ("POST", "/api/dialogs", b'{"title": "t"}'),
        ("GET", f"/api/dialogs/{dialog_id}", None),
        ("GET", f"/api/messages/dialog/{dialog_id}", None),
        ("POST", f"/api/messages/dialog/{dialog_id}", b'{"content": "x"}'),
        ("POST", f"/api/dialogs/{dialog_id}/typing", b'{"typing": true}'),
        ("POST", f"/api/dialogs/{dialog_id}/read", jsonutil.dumps_bytes({"messageId": sent["messageId"]})),
        ("PATCH", f"/api/messages/{sent['messageId']}", b'{"content": "x"}'),
        ("GET", "/api/poll", None),
        ("GET", f"/api/poll?cursor={cursor}&timeout=0", None),
        ("GET", "/api/events", None),
    ]
    for method, path, body in requests:
        response = await fetch(alice, method, path, body, Authorization=f"Bearer {ghost}")
        assert_json_error(response, 401)
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await tornado.websocket.websocket_connect(f"{alice.ws_url}/ws?token={ghost}")
    assert refused.value.code == 401
    # The real user's token still works, on the lean poll path too.
    assert (
        await fetch(alice, "GET", f"/api/poll?cursor={cursor}&timeout=0", Authorization=f"Bearer {alice.token}")
    ).code == 200


@pytest.mark.gen_test
async def test_the_pages_files_refuse_bad_paths_and_methods_with_json_and_keep_their_policy(alice: Client) -> None:
    refusals = [
        ("GET", "/static/app.js%00.html", 404),  # a NUL byte in the path was a 500
        ("GET", "/static/%00", 404),
        ("GET", "/static/nope.js", 404),
        ("GET", "/static/%2e%2e/run.py", 403),
        ("GET", "/static/..%2f..%2fetc%2fpasswd", 403),
        ("GET", "/static/", 403),
        ("PUT", "/", 405),
        ("DELETE", "/static/app.js", 405),
        ("OPTIONS", "/static/app.js", 405),
    ]
    for method, path, status in refusals:
        response = await fetch(alice, method, path)
        assert_json_error(response, status)
        assert "script-src 'self'" in response.headers["Content-Security-Policy"], path
    page = await fetch(alice, "GET", "/static/app.js")
    assert page.code == 200 and page.headers["Content-Type"].startswith("text/javascript")


@pytest.mark.gen_test
async def test_a_token_under_a_percent_encoded_parameter_name_is_never_logged(
    alice: Client, dialog_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Tornado decodes parameter names, so `?%74oken=` is `?token=` to the server: the log must redact it too.
    caplog.set_level(logging.INFO)
    for name in ("%74oken", "T%4fKEN", "%74%6f%6b%65%6e", "access%5Ftoken", "%70assword"):
        response = await fetch(alice, "GET", f"/api/events?{name}={alice.token}&typing={dialog_id}x")
        assert response.code in (401, 404), response.code
        response = await fetch(alice, "GET", f"/static/nope.js?{name}={alice.token}")
        assert response.code == 404
    assert "%74oken=[redacted]" in caplog.text
    for part in alice.token.split("."):
        assert part not in caplog.text


@pytest.mark.gen_test(timeout=30)
async def test_a_token_in_a_header_tornado_refuses_is_not_logged(tmp_path: Path) -> None:
    # Tornado logs the value of a header it cannot accept (a NUL byte in it) before any handler runs.
    async with await ServerProcess.start(tmp_path, "--demo") as server:
        token = await server.login()
        for header in (f"Authorization: Bearer {token}\x00", f"Authorization:  bearer\t{token}\x01"):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"GET /api/me HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n".encode())
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 400")
            writer.close()
        server.signal(signal.SIGTERM)
        assert await server.exit_code(15) == 0
    assert "Invalid header value" in server.stderr
    for part in token.split("."):
        assert part not in server.stderr


# A digit to str.isdigit() but not an ASCII one: superscript two, circled one, Arabic-Indic zero, fullwidth zero.
NON_ASCII_DIGITS = ["\u00b2", "\u2460", "\u0660", "\uff10"]


@pytest.mark.gen_test
@pytest.mark.parametrize("digit", NON_ASCII_DIGITS, ids=["superscript", "circled", "arabic-indic", "fullwidth"])
async def test_a_cursor_with_a_non_ascii_digit_is_400_on_every_transport(
    alice: Client, digit: str, caplog: pytest.LogCaptureFixture
) -> None:
    cursor = quote(f"{alice.ctx.broadcaster.log_id}.{digit}")
    bearer = f"Bearer {alice.token}"
    answers = [
        # The common poll (a bearer header, nothing else) and one the full handler takes (a conditional header).
        await fetch(alice, "GET", f"/api/poll?cursor={cursor}&timeout=0", Authorization=bearer),
        await fetch(alice, "GET", f"/api/poll?cursor={cursor}&timeout=0",
                    **{"Authorization": bearer, "If-None-Match": '"x"'}),
        await fetch(alice, "GET", f"/api/events?cursor={cursor}", Authorization=bearer),
        await fetch(alice, "GET", "/api/events",
                    # A header is latin-1: of these digits, only the superscript two can be sent as itself.
                    **{"Authorization": bearer, "Last-Event-ID": f"{alice.ctx.broadcaster.log_id}.\u00b2"}),
    ]
    for response in answers:
        assert "cursor" in assert_json_error(response, 400)
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await tornado.websocket.websocket_connect(f"{alice.ws_url}/ws?token={alice.token}&cursor={cursor}")
    assert refused.value.code == 400
    assert "cursor" in jsonutil.loads(refused.value.response.body)["error"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    # The same connection pool keeps being served.
    assert (await fetch(alice, "GET", "/api/me", Authorization=bearer)).code == 200


@pytest.mark.gen_test
async def test_a_method_a_route_lacks_is_405_with_allow_naming_the_methods_it_has(
    alice: Client, dialog_id: str
) -> None:
    # RFC 9110 15.5.6: a 405 must carry Allow.
    sent = await alice.post_message(dialog_id, "x")
    wrong = [
        ("GET", "/api/auth/login", "POST"),
        ("TRACE", "/api/auth/login", "POST"),
        ("DELETE", "/api/me", "GET"),
        ("PUT", "/api/dialogs", "GET, POST"),
        ("DELETE", f"/api/dialogs/{dialog_id}", "GET, PATCH"),
        ("PUT", f"/api/messages/dialog/{dialog_id}", "GET, POST"),
        ("GET", f"/api/messages/{sent['messageId']}", "PATCH"),
        ("OPTIONS", f"/api/dialogs/{dialog_id}/read", "POST"),
        ("POST", "/api/poll", "GET"),
        ("POST", "/ws", "GET"),
        ("POST", "/healthz", "GET, HEAD"),
        ("PUT", "/", "GET, HEAD"),
        ("DELETE", "/static/app.js", "GET, HEAD"),
    ]
    for method, path, allowed in wrong:
        body = b"{}" if method in ("POST", "PUT") else None
        response = await fetch(alice, method, path, body, Authorization=f"Bearer {alice.token}")
        assert_json_error(response, 405)
        assert response.headers.get("Allow") == allowed, (method, path, response.headers.get("Allow"))
