"""Stream tickets (PROTOCOL section 12): the domain's StreamTickets without a loop, then `POST /api/stream-ticket`,
`/ws?ticket=` and `/api/events?ticket=` over real sockets, and a ticket issued by one server process redeemed by
another on the same database and secret."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.websocket

from chatserver import jsonutil
from chatserver.auth import TokenSigner, load_or_create_secret
from chatserver.errors import Unauthorized
from chatserver.tickets import TICKET_TTL, StreamTickets
from handlers.base import AppContext
from tests.conftest import Client
from tests.process import BOB_PHONE, ServerProcess

# -- the domain -------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_ticket_names_its_user_once() -> None:
    tickets = StreamTickets("secret", clock=Clock())
    ticket = tickets.issue("usr_alice")
    assert tickets.redeem(ticket) == "usr_alice"
    with pytest.raises(Unauthorized, match="already used"):
        tickets.redeem(ticket)
    assert tickets.redeem(tickets.issue("usr_alice")) == "usr_alice"  # a new ticket is a new use


def test_a_ticket_expires_after_thirty_seconds() -> None:
    clock = Clock()
    tickets = StreamTickets("secret", clock=clock)
    assert tickets.ttl == TICKET_TTL == 30
    fresh, stale = tickets.issue("usr_a"), tickets.issue("usr_a")
    clock.now += 29.5
    assert tickets.redeem(fresh) == "usr_a"
    clock.now += 0.5
    with pytest.raises(Unauthorized, match="expired"):
        tickets.redeem(stale)


def test_forged_malformed_and_foreign_tickets_are_refused() -> None:
    clock = Clock()
    tickets = StreamTickets("secret", clock=clock)
    ticket = tickets.issue("usr_alice")
    body, _, signature = ticket.partition(".")
    other = StreamTickets("another secret", clock=clock).issue("usr_alice")
    token = TokenSigner("secret", 3600, clock=clock).issue("usr_alice")
    tampered = signature[:-1] + ("B" if signature.endswith("A") else "A")
    for bad in ("", "x", ".", body, f"{body}.", f"{body}.{tampered}", other, token, "é" * 10, "a" * 600,
                f"{body}.{signature}?"):
        with pytest.raises(Unauthorized):
            tickets.redeem(bad)
    # And the other way: a ticket does not pass for a bearer token.
    with pytest.raises(Unauthorized):
        TokenSigner("secret", 3600, clock=clock).verify(ticket)
    assert tickets.redeem(ticket) == "usr_alice"  # none of the refusals used it up


def test_another_process_with_the_same_secret_accepts_a_ticket_once() -> None:
    clock = Clock()
    issuer, redeemer = StreamTickets("secret", clock=clock), StreamTickets("secret", clock=clock)
    ticket = issuer.issue("usr_alice")
    assert redeemer.redeem(ticket) == "usr_alice"
    with pytest.raises(Unauthorized, match="already used"):
        redeemer.redeem(ticket)


def test_redeemed_nonces_are_forgotten_as_they_expire_and_never_exceed_the_bound() -> None:
    clock = Clock()
    tickets = StreamTickets("secret", clock=clock, max_redeemed=3)
    for _ in range(3):
        tickets.redeem(tickets.issue("usr_a"))
    assert tickets.remembered == 3
    with pytest.raises(Unauthorized, match="too many"):
        tickets.redeem(tickets.issue("usr_a"))  # refused rather than forget a nonce that could be replayed
    clock.now += TICKET_TTL
    assert tickets.redeem(tickets.issue("usr_a")) == "usr_a"
    assert tickets.remembered == 1


# -- over real sockets ------------------------------------------------------------------------------------------


async def ask_ticket(client: Client) -> str:
    status, body = await client.call("POST", "/api/stream-ticket")
    assert status == 201, body
    assert body["data"]["expiresIn"] == 30 and set(body["data"]) == {"ticket", "expiresIn"}
    return str(body["data"]["ticket"])


async def upgrade_status(url: str) -> int:
    try:
        conn = await tornado.websocket.websocket_connect(url)
    except tornado.httpclient.HTTPClientError as refused:
        return refused.code
    conn.close()
    return 101


async def open_websocket(url: str) -> tuple[tornado.websocket.WebSocketClientConnection, dict[str, Any]]:
    conn = await tornado.websocket.websocket_connect(url)
    ready = jsonutil.loads(await asyncio.wait_for(conn.read_message(), 5))
    return conn, ready


@pytest.mark.gen_test
async def test_a_ticket_opens_one_websocket_for_its_user_and_then_is_refused(
    bob: Client, alice: Client, dialog_id: str
) -> None:
    ticket = await ask_ticket(bob)
    conn, ready = await open_websocket(f"{bob.ws_url}/ws?ticket={ticket}")
    assert ready["type"] == "ready" and ready["data"]["userId"] == bob.user_id
    sent = await alice.post_message(dialog_id, "over a ticketed socket")
    event = jsonutil.loads(await asyncio.wait_for(conn.read_message(), 5))
    assert event["data"] == sent
    conn.close()
    assert await upgrade_status(f"{bob.ws_url}/ws?ticket={ticket}") == 401  # used
    assert await upgrade_status(f"{bob.ws_url}/ws?ticket=nonsense") == 401  # unknown


@pytest.mark.gen_test
async def test_a_ticket_opens_one_event_stream_and_then_is_refused(bob: Client) -> None:
    ticket = await ask_ticket(bob)
    seen: list[bytes] = []
    got_ready = asyncio.Event()

    def on_chunk(chunk: bytes) -> None:
        seen.append(chunk)
        if b'"ready"' in b"".join(seen):
            got_ready.set()

    request = tornado.httpclient.HTTPRequest(
        f"{bob.base_url}/api/events?ticket={ticket}", request_timeout=30, streaming_callback=on_chunk
    )
    stream = asyncio.ensure_future(tornado.httpclient.AsyncHTTPClient().fetch(request, raise_error=False))
    await asyncio.wait_for(got_ready.wait(), 5)
    assert f'"userId":"{bob.user_id}"'.encode() in b"".join(seen)
    status, body = await bob.call("GET", f"/api/events?ticket={ticket}", token="")
    assert status == 401 and body == {"success": False, "error": "stream ticket already used: ask for a new one"}
    stream.cancel()


@pytest.mark.gen_test
async def test_expired_foreign_and_misused_tickets_get_401(bob: Client, ctx: AppContext) -> None:
    secret = load_or_create_secret(ctx.config.state_path)
    expired = StreamTickets(secret, clock=lambda: 1_000_000.0).issue(bob.user_id)
    foreign = StreamTickets("another secret").issue(bob.user_id)
    for ticket in (expired, foreign, bob.token):
        assert await upgrade_status(f"{bob.ws_url}/ws?ticket={ticket}") == 401
        status, body = await bob.call("GET", f"/api/events?ticket={ticket}", token="")
        assert status == 401 and body["success"] is False
    # A ticket is no bearer token, and a ticket is only handed to a bearer.
    ticket = await ask_ticket(bob)
    status, _ = await bob.call("GET", "/api/me", token=ticket)
    assert status == 401
    status, body = await bob.call("POST", "/api/stream-ticket", token="")
    assert status == 401 and body["success"] is False
    status, _ = await bob.call("POST", "/api/stream-ticket", token=ticket)
    assert status == 401
    status, body = await bob.call("GET", "/api/stream-ticket")
    assert status == 405


@pytest.mark.gen_test
async def test_a_ticket_never_reaches_the_log(bob: Client, caplog: pytest.LogCaptureFixture) -> None:
    ticket = await ask_ticket(bob)
    with caplog.at_level(logging.INFO, logger="chatserver.access"):
        conn, _ = await open_websocket(f"{bob.ws_url}/ws?ticket={ticket}")
        conn.close()
        assert await upgrade_status(f"{bob.ws_url}/ws?ticket={ticket}") == 401
    assert ticket not in caplog.text
    assert "/ws?ticket=[redacted]" in caplog.text


@pytest.mark.gen_test(timeout=60)
async def test_a_ticket_issued_by_one_process_is_redeemed_by_another_once(tmp_path: Path) -> None:
    first = await ServerProcess.start(tmp_path, "--demo")
    second = await ServerProcess.start(tmp_path)  # the same state folder: the same database and secret
    async with first, second:
        token = await first.login(BOB_PHONE)
        status, body = await first.call("POST", "/api/stream-ticket", {}, token=token)
        assert status == 201
        ticket = body["data"]["ticket"]
        ws_url = second.url.replace("http://", "ws://")
        conn, ready = await open_websocket(f"{ws_url}/ws?ticket={ticket}")
        assert ready["type"] == "ready"
        conn.close()
        assert await upgrade_status(f"{ws_url}/ws?ticket={ticket}") == 401
