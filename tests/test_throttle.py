"""Throttling over real sockets: logins per (phone, address), per phone and per address; messages, edits,
typing and stream tickets per user. Each refusal is a 429 with an integer `Retry-After` and the JSON error
envelope; what is refused is never hashed, stored or published; /metrics counts every refusal.

Logins come from several real source addresses (127.0.0.2, 127.0.0.3, ...: the whole of 127/8 is loopback), so
the server sees each as its own client. The windows are configured short: recovery is waited for in seconds.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import tornado.httpclient

from chatserver import jsonutil, service
from tests.conftest import ALICE_PHONE, BOB_PHONE, PASSWORD, Client

# Two failures per (phone, address), four per phone, six per address, each draining over a minute (a test that
# waits for recovery sets a window of seconds); 3 writes at once, then one a second.
SETTINGS = {
    "login_failures": 2,
    "login_phone_failures": 4,
    "login_address_failures": 6,
    "login_window": 60.0,
    "message_rate": 1.0,
    "message_burst": 3,
}


@pytest.fixture
def settings() -> dict[str, Any]:
    return dict(SETTINGS)


async def request(
    port: int, method: str, path: str, body: Any = None, *, token: str = "", address: str = "127.0.0.1"
) -> tornado.httpclient.HTTPResponse:
    """One request from `address` (the source address of the connection the server sees)."""
    return await tornado.httpclient.AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}{path}",
        method=method,
        body=None if body is None else jsonutil.dumps_bytes(body),
        headers={"Authorization": f"Bearer {token}"} if token else None,
        network_interface=address,
        raise_error=False,
        request_timeout=10,
    )


async def login(
    port: int, phone: str, password: str, address: str, forwarded_for: str | None = None
) -> tornado.httpclient.HTTPResponse:
    return await tornado.httpclient.AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}/api/auth/login",
        method="POST",
        body=jsonutil.dumps_bytes({"phone": phone, "password": password}),
        headers={"X-Forwarded-For": forwarded_for} if forwarded_for is not None else None,
        network_interface=address,
        raise_error=False,
        request_timeout=10,
    )


async def fail_twice(port: int, phone: str, address: str, forwarded_for: str | None = None) -> None:
    """Two wrong passwords, each answered 401: as many as login_failures allows a (phone, address)."""
    for n in range(2):
        assert (await login(port, phone, f"guess {n}", address, forwarded_for)).code == 401


def assert_throttled(response: tornado.httpclient.HTTPResponse) -> int:
    """A 429 with the JSON error envelope; returns its Retry-After, whole seconds."""
    assert response.code == 429, (response.code, response.body)
    assert response.headers["Content-Type"].startswith("application/json")
    body = jsonutil.loads(response.body)
    assert body["success"] is False and "try again" in body["error"], body
    retry_after = response.headers["Retry-After"]
    assert retry_after.isascii() and retry_after.isdecimal(), retry_after
    assert int(retry_after) >= 1
    return int(retry_after)


async def throttled_count(port: int, what: str) -> float:
    metrics = (await request(port, "GET", "/metrics")).body.decode()
    for line in metrics.splitlines():
        if line.startswith(f'chatserver_throttled_total{{what="{what}"}} '):
            return float(line.split()[-1])
    raise AssertionError(f"no chatserver_throttled_total for {what}:\n{metrics}")


# -- logins --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{**SETTINGS, "login_window": 4.0}])
@pytest.mark.gen_test(timeout=30)
async def test_failed_logins_from_one_address_get_429_with_retry_after_then_recover_and_success_resets(
    seed: dict[str, Any], http_server: Any, http_port: int
) -> None:
    attacker = "127.0.0.2"
    await fail_twice(http_port, ALICE_PHONE, attacker)
    # Throttled: even the right password is not tried from there now.
    wait = assert_throttled(await login(http_port, ALICE_PHONE, PASSWORD, attacker))
    assert wait <= 2  # a window of 4 s for two failures: one drains every 2 s
    assert await throttled_count(http_port, "login_pair") == 1

    await asyncio.sleep(wait)
    assert (await login(http_port, ALICE_PHONE, PASSWORD, attacker)).code == 200
    # The success forgot the pair's failures: two more are allowed again before the next 429.
    await fail_twice(http_port, ALICE_PHONE, attacker)
    assert_throttled(await login(http_port, ALICE_PHONE, "guess", attacker))
    assert await throttled_count(http_port, "login_pair") == 2


@pytest.mark.gen_test(timeout=30)
async def test_an_address_that_is_throttled_does_not_lock_the_user_out_from_another(
    seed: dict[str, Any], http_server: Any, http_port: int
) -> None:
    await fail_twice(http_port, ALICE_PHONE, "127.0.0.2")
    assert_throttled(await login(http_port, ALICE_PHONE, PASSWORD, "127.0.0.2"))
    answer = await login(http_port, ALICE_PHONE, PASSWORD, "127.0.0.3")
    assert answer.code == 200
    assert jsonutil.loads(answer.body)["data"]["user"]["phone"] == ALICE_PHONE
    # Still throttled where the guessing was.
    assert_throttled(await login(http_port, ALICE_PHONE, PASSWORD, "127.0.0.2"))


@pytest.mark.gen_test(timeout=30)
async def test_a_refused_login_never_hashes_its_password(
    seed: dict[str, Any], http_server: Any, http_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[str] = []
    verify = service.verify_password

    def counting(password: str, stored: str) -> bool:
        hashed.append(password)
        return verify(password, stored)

    monkeypatch.setattr(service, "verify_password", counting)
    await fail_twice(http_port, ALICE_PHONE, "127.0.0.2")
    assert len(hashed) == 2
    refused = await asyncio.gather(*(login(http_port, ALICE_PHONE, f"guess {n}", "127.0.0.2") for n in range(5)))
    for response in refused:
        assert_throttled(response)
    assert len(hashed) == 2


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_guesses_are_counted_before_any_is_hashed(
    seed: dict[str, Any], http_server: Any, http_port: int
) -> None:
    # Fired together, they all arrive before the first scrypt ends: only two are let through to be hashed.
    answers = await asyncio.gather(*(login(http_port, ALICE_PHONE, f"guess {n}", "127.0.0.2") for n in range(8)))
    assert sorted(a.code for a in answers) == [401, 401] + [429] * 6


@pytest.mark.gen_test(timeout=30)
async def test_many_addresses_against_one_phone_hit_the_phone_limit_but_a_known_address_still_gets_in(
    seed: dict[str, Any], http_server: Any, http_port: int
) -> None:
    # Alice logged in from home once; then four addresses guess one password each.
    assert (await login(http_port, ALICE_PHONE, PASSWORD, "127.0.0.9")).code == 200
    for n in range(10, 14):
        assert (await login(http_port, ALICE_PHONE, "guess", f"127.0.0.{n}")).code == 401
    # The phone has had its four failures: a fifth address waits, right password or not ...
    assert_throttled(await login(http_port, ALICE_PHONE, PASSWORD, "127.0.0.14"))
    assert_throttled(await login(http_port, ALICE_PHONE, "guess", "127.0.0.15"))
    assert await throttled_count(http_port, "login_phone") == 2
    # ... but Alice, from where she logged in before, gets in; and Bob from anywhere.
    assert (await login(http_port, ALICE_PHONE, PASSWORD, "127.0.0.9")).code == 200
    assert (await login(http_port, BOB_PHONE, PASSWORD, "127.0.0.14")).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_one_address_trying_many_phones_hits_the_address_limit(
    seed: dict[str, Any], http_server: Any, http_port: int
) -> None:
    # Unknown phones count like known ones (a 429 says nothing about whether a phone exists).
    for n in range(6):
        assert (await login(http_port, f"7900000000{n}", "guess", "127.0.0.20")).code == 401
    assert_throttled(await login(http_port, BOB_PHONE, PASSWORD, "127.0.0.20"))
    assert_throttled(await login(http_port, "79000000009", "guess", "127.0.0.20"))
    assert await throttled_count(http_port, "login_address") == 2
    assert (await login(http_port, BOB_PHONE, PASSWORD, "127.0.0.21")).code == 200


@pytest.mark.parametrize("settings", [{**SETTINGS, "trusted_proxies": "127.0.0.1, 10.0.0.0/8"}])
@pytest.mark.gen_test(timeout=30)
async def test_behind_a_trusted_proxy_the_client_is_the_address_it_forwards_and_nobody_else_can_say_so(
    seed: dict[str, Any], http_server: Any, http_port: int
) -> None:
    proxy = "127.0.0.1"
    # Through the proxy, each client is the address it appended: one guesser there does not hold up the others.
    await fail_twice(http_port, ALICE_PHONE, proxy, "203.0.113.7")
    assert_throttled(await login(http_port, ALICE_PHONE, PASSWORD, proxy, "203.0.113.7"))
    assert (await login(http_port, ALICE_PHONE, PASSWORD, proxy, "203.0.113.8")).code == 200
    # What the client wrote itself comes before what the proxies appended, and is not believed; nor is a hop of
    # a trusted network taken for the client.
    assert_throttled(await login(http_port, ALICE_PHONE, PASSWORD, proxy, "198.51.100.1, 203.0.113.7"))
    assert_throttled(await login(http_port, ALICE_PHONE, PASSWORD, proxy, "198.51.100.1, 203.0.113.7, 10.1.2.3"))
    # A client that is not a trusted proxy is its own address, whatever X-Forwarded-For it sends.
    await fail_twice(http_port, BOB_PHONE, "127.0.0.2", "198.51.100.1")
    assert_throttled(await login(http_port, BOB_PHONE, PASSWORD, "127.0.0.2", "198.51.100.9"))


# -- writes --------------------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_a_burst_over_the_message_rate_gets_429_and_nothing_refused_is_stored_or_published(
    alice: Client, bob: Client, dialog_id: str, http_port: int
) -> None:
    ws = await bob.websocket()
    path = f"/api/messages/dialog/{dialog_id}"
    sends = [{"content": f"burst {n}", "clientMessageId": f"burst-{n}"} for n in range(6)]
    answers = await asyncio.gather(*(request(http_port, "POST", path, body, token=alice.token) for body in sends))
    accepted = [jsonutil.loads(a.body)["data"] for a in answers if a.code == 201]
    refused = [body for body, a in zip(sends, answers, strict=True) if a.code != 201]
    assert len(accepted) == 3 and len(refused) == 3, [a.code for a in answers]
    waits = [assert_throttled(a) for a in answers if a.code != 201]

    published = [(await ws.next_of("message:new"))["data"]["messageId"] for _ in range(3)]
    assert sorted(published) == sorted(m["messageId"] for m in accepted)
    await ws.nothing_within(0.3)
    status, history = await bob.call("GET", path)
    assert status == 200
    assert sorted(m["content"] for m in history["data"]) == sorted(m["content"] for m in accepted)
    assert await throttled_count(http_port, "message") == 3

    # Once Retry-After has passed, the refused send is taken, the same clientMessageId, once.
    await asyncio.sleep(min(waits))
    retried = await request(http_port, "POST", path, refused[0], token=alice.token)
    assert retried.code == 201
    assert (await ws.next_of("message:new"))["data"]["clientMessageId"] == refused[0]["clientMessageId"]


@pytest.mark.gen_test(timeout=30)
async def test_edits_count_with_messages_and_a_refused_edit_changes_nothing(
    alice: Client, bob: Client, dialog_id: str, http_port: int
) -> None:
    sent = await alice.post_message(dialog_id, "first")  # one of the three
    ws = await bob.websocket()
    path = f"/api/messages/{sent['messageId']}"
    for n in range(2):
        assert (await request(http_port, "PATCH", path, {"content": f"edit {n}"}, token=alice.token)).code == 200
    assert_throttled(await request(http_port, "PATCH", path, {"content": "too many"}, token=alice.token))
    assert_throttled(
        await request(http_port, "POST", f"/api/messages/dialog/{dialog_id}", {"content": "x"}, token=alice.token)
    )
    updates = [(await ws.next_of("message:update"))["data"]["content"] for _ in range(2)]
    assert updates == ["edit 0", "edit 1"]
    await ws.nothing_within(0.3)
    status, history = await bob.call("GET", f"/api/messages/dialog/{dialog_id}")
    assert status == 200 and [m["content"] for m in history["data"]] == ["edit 1"]
    # Another user's rate is their own.
    assert (await bob.call("POST", f"/api/messages/dialog/{dialog_id}", {"content": "bob"}))[0] == 201


@pytest.mark.parametrize("settings", [{**SETTINGS, "message_rate": 0.1}])
@pytest.mark.gen_test(timeout=30)
async def test_typing_over_the_rate_is_dropped_on_every_transport_not_fanned_out(
    alice: Client, bob: Client, dialog_id: str, http_port: int
) -> None:
    watcher = await bob.websocket()
    watcher.send({"type": "dialog:join", "dialogId": dialog_id})
    assert (await watcher.next_of("dialog:joined"))["data"]["dialogId"] == dialog_id
    typist = await alice.websocket()
    # Each a change of state (no repeat to deduplicate): two over REST, then four over the WebSocket.
    for typing in (True, False):
        status, _ = await alice.call("POST", f"/api/dialogs/{dialog_id}/typing", {"typing": typing})
        assert status == 204
    for n in range(4):
        typist.send({"type": "typing:start" if n % 2 == 0 else "typing:stop", "dialogId": dialog_id})
    kinds = [(await watcher.next_of("typing:start", "typing:stop"))["type"] for _ in range(3)]
    assert kinds == ["typing:start", "typing:stop", "typing:start"]
    await watcher.nothing_within(0.3)
    await typist.nothing_within(0.1)  # dropped quietly: no error frame
    # The first stop over the rate is dropped and not remembered as said, so the start after it repeats the last
    # start announced (deduplicated, not throttled); the last stop is throttled too.
    assert await throttled_count(http_port, "typing") == 2
    # Messages have a bucket of their own: typing did not use it up.
    for n in range(3):
        await alice.post_message(dialog_id, f"after typing {n}")


# -- stream tickets ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{**SETTINGS, "ticket_burst": 3, "ticket_rate": 1.0}])
@pytest.mark.gen_test(timeout=30)
async def test_stream_tickets_over_the_rate_get_429_and_another_users_are_their_own(
    alice: Client, bob: Client, http_port: int
) -> None:
    for _ in range(3):
        assert (await request(http_port, "POST", "/api/stream-ticket", {}, token=alice.token)).code == 201
    wait = assert_throttled(await request(http_port, "POST", "/api/stream-ticket", {}, token=alice.token))
    assert await throttled_count(http_port, "ticket") == 1
    assert (await request(http_port, "POST", "/api/stream-ticket", {}, token=bob.token)).code == 201
    await asyncio.sleep(wait)
    answer = await request(http_port, "POST", "/api/stream-ticket", {}, token=alice.token)
    assert answer.code == 201
    assert jsonutil.loads(answer.body)["data"]["expiresIn"] == 30
