"""The lean long-poll path (transport/fastpoll.py) answers exactly as the full PollHandler does.

A poll with `If-None-Match` is one the lean path leaves to PollHandler, so the same poll asked both ways must
get the same status, body and headers (but Date, which names the second, and Server, which Tornado's
RequestHandler adds and the lean path does not claim).
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any
from urllib.parse import urlparse

import pytest
import tornado.httpclient

from chatserver import jsonutil
from chatserver.auth import TokenSigner
from chatserver.errors import Unauthorized
from tests.conftest import Client
from transport.fastpoll import LeanPoll


@pytest.fixture
def http_engine() -> str:
    """The lean poll exists only in the lean engine (the Tornado engine answers every poll with PollHandler)."""
    return "lean"


async def fetch_poll(client: Client, query: str, **headers: str) -> tornado.httpclient.HTTPResponse:
    return await client.http.fetch(
        f"{client.base_url}/api/poll?{query}",
        headers={"Authorization": f"Bearer {client.token}", **headers},
        raise_error=False,
        request_timeout=10,
    )


async def first_cursor(client: Client) -> str:
    """The cursor of the poll handshake (a poll without one): where the client stands now."""
    _, hello = await client.poll()
    return str(hello["data"]["cursor"])


def comparable(response: tornado.httpclient.HTTPResponse) -> dict[str, Any]:
    headers = {k: v for k, v in response.headers.get_all() if k not in ("Date", "Server")}
    return {"code": response.code, "body": response.body, "headers": headers}


@pytest.mark.gen_test
async def test_lean_poll_answer_is_the_full_handlers_answer(alice: Client, bob: Client, dialog_id: str) -> None:
    cursor = await first_cursor(bob)
    sent = await alice.post_message(dialog_id, "same either way")

    lean = await fetch_poll(bob, f"cursor={cursor}")
    full = await fetch_poll(bob, f"cursor={cursor}", **{"If-None-Match": '"not-this"'})

    assert comparable(lean) == comparable(full)
    assert "Server" not in lean.headers and full.headers["Server"].startswith("TornadoServer/")
    assert lean.code == 200
    events = jsonutil.loads(lean.body)["data"]["events"]
    assert [e["data"]["messageId"] for e in events] == [sent["messageId"]]
    assert lean.headers["Cache-Control"] == "no-store"


@pytest.mark.gen_test
async def test_parked_polls_of_both_paths_answer_alike_at_an_event_and_at_their_timeout(
    alice: Client, bob: Client, dialog_id: str
) -> None:
    # Both paths park in the same registry (transport/poll.py): one event wakes both, and a later pair answers
    # alike whether its timeout or an event (the receipt the first pair's acknowledgement makes) ends it.
    cursor = await first_cursor(bob)
    lean = asyncio.ensure_future(fetch_poll(bob, f"cursor={cursor}&timeout=20"))
    full = asyncio.ensure_future(fetch_poll(bob, f"cursor={cursor}&timeout=20", **{"If-None-Match": '"x"'}))
    for _ in range(200):
        if bob.ctx.metrics.parked_polls == 2:
            break
        await asyncio.sleep(0.01)
    assert bob.ctx.metrics.parked_polls == 2
    assert sum(isinstance(c, LeanPoll) for c in bob.ctx.connections) == 1
    await alice.post_message(dialog_id, "wakes both")
    woken = await asyncio.wait_for(asyncio.gather(lean, full), 5)
    assert comparable(woken[0]) == comparable(woken[1])
    assert len(jsonutil.loads(woken[0].body)["data"]["events"]) == 1

    cursor = jsonutil.loads(woken[0].body)["data"]["cursor"]
    timed_out = await asyncio.wait_for(asyncio.gather(
        fetch_poll(bob, f"cursor={cursor}&timeout=0.5"),
        fetch_poll(bob, f"cursor={cursor}&timeout=0.5", **{"If-None-Match": '"x"'})), 5)
    assert comparable(timed_out[0]) == comparable(timed_out[1]) and timed_out[0].code == 200
    assert bob.ctx.metrics.parked_polls == 0 and not bob.ctx.connections


@pytest.mark.gen_test
async def test_lean_parked_poll_is_released_by_an_event_and_leaves_no_waiter(
    alice: Client, bob: Client, dialog_id: str
) -> None:
    _, hello = await bob.poll()
    parked = asyncio.ensure_future(fetch_poll(bob, f"cursor={hello['data']['cursor']}&timeout=20"))
    ctx = bob.ctx
    for _ in range(200):
        if any(isinstance(c, LeanPoll) for c in ctx.connections):
            break
        await asyncio.sleep(0.01)
    assert any(isinstance(c, LeanPoll) for c in ctx.connections), "the poll was not parked on the lean path"

    sent = await alice.post_message(dialog_id, "wake up")
    answer = await asyncio.wait_for(parked, 5)

    assert answer.code == 200
    assert [e["data"]["messageId"] for e in jsonutil.loads(answer.body)["data"]["events"]] == [sent["messageId"]]
    assert not ctx.connections
    assert not any(isinstance(r, LeanPoll) for r in ctx.requests)
    assert ctx.broadcaster.subscriber_count() == 0


@pytest.mark.gen_test
async def test_answered_polls_are_freed_at_once_not_left_to_the_cyclic_collector(
    alice: Client, bob: Client, dialog_id: str
) -> None:
    # A poll and its exchange pointed at each other: every answered poll was cyclic garbage, and the collector
    # then spent a tenth of a busy server's time freeing them (blocking the loop for ~80 ms each time).
    cursor = await first_cursor(bob)
    gc.collect()
    gc.disable()
    try:
        for n in range(5):
            await alice.post_message(dialog_id, f"event {n}")
            answer = await fetch_poll(bob, f"cursor={cursor}&timeout=0")
            assert answer.code == 200
            cursor = jsonutil.loads(answer.body)["data"]["cursor"]
        left = [o for o in gc.get_objects() if isinstance(o, LeanPoll)]
    finally:
        gc.enable()
    assert left == []


@pytest.mark.gen_test
async def test_a_poll_with_a_host_tornado_refuses_is_refused_as_before(bob: Client) -> None:
    # The lean path parses the query and Host itself: what HTTPServerRequest refuses must still be a 400.
    _, hello = await bob.poll()
    url = urlparse(bob.base_url)
    for host in ("a b", "one,two", "x/y"):
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(
            f"GET /api/poll?cursor={hello['data']['cursor']}&timeout=0 HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {bob.token}\r\n\r\n".encode()
        )
        status = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert status.startswith(b"HTTP/1.1 400 "), (host, status)
    # ... and a plain one is answered (by the lean path) as always.
    status, body = await bob.poll(hello["data"]["cursor"], timeout="0")
    assert status == 200 and body["data"]["cursor"] == hello["data"]["cursor"]


def test_lean_paths_token_cache_still_checks_expiry_and_never_remembers_a_bad_token() -> None:
    # The lean poll path verifies tokens with TokenSigner.verify_cached: the signature once per token, the
    # expiry on every call, and a bounded number of tokens remembered.
    now = [1_000_000.0]
    signer = TokenSigner("secret", 60, clock=lambda: now[0], cache_size=2)
    token = signer.issue("usr_a")
    assert signer.verify_cached(token) == "usr_a"
    assert signer.verify_cached(token) == "usr_a"
    now[0] += 61
    with pytest.raises(Unauthorized, match="expired"):
        signer.verify_cached(token)
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for _ in range(2):
        with pytest.raises(Unauthorized, match="invalid"):
            signer.verify_cached(forged)
    others = [signer.issue(f"usr_{n}") for n in range(3)]
    assert [signer.verify_cached(t) for t in others] == ["usr_0", "usr_1", "usr_2"]
    assert len(signer._verified) == 2 and forged not in signer._verified


@pytest.mark.gen_test
async def test_a_poll_answer_has_no_etag_and_is_never_a_304(alice: Client, bob: Client, dialog_id: str) -> None:
    # A poll is not a cacheable resource: `If-None-Match: *` (which matches any Etag) must not turn it into a 304.
    cursor = await first_cursor(bob)
    await alice.post_message(dialog_id, "fresh")
    for headers in ({}, {"If-None-Match": "*"}):
        answer = await fetch_poll(bob, f"cursor={cursor}&timeout=0", **headers)
        assert answer.code == 200
        assert "Etag" not in answer.headers
        assert len(jsonutil.loads(answer.body)["data"]["events"]) == 1
