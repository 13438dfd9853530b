"""The seed's bug and its harder cases, over real sockets: REST writes reach every transport, once."""

from __future__ import annotations

import pytest

from tests.conftest import Client


@pytest.mark.gen_test
async def test_receiver_websocket_gets_message_posted_over_rest(alice: Client, bob: Client, dialog_id: str) -> None:
    bob_ws = await bob.websocket()
    alice_ws = await alice.websocket()
    sent = await alice.post_message(dialog_id, "hello Bob")
    got = await bob_ws.next_of("message:new")
    assert got["data"] == sent
    assert got["cursor"]
    own = await alice_ws.next_of("message:new")
    assert own["data"]["messageId"] == sent["messageId"]
    await alice_ws.nothing_within(0.3)


@pytest.mark.gen_test
async def test_long_poller_is_released_by_message_posted_over_rest(alice: Client, bob: Client, dialog_id: str) -> None:
    status, hello = await bob.poll()
    assert status == 200 and hello["data"]["events"] == []
    import asyncio

    parked = asyncio.ensure_future(bob.poll(hello["data"]["cursor"], timeout="20"))
    await asyncio.sleep(0.2)
    assert not parked.done()
    sent = await alice.post_message(dialog_id, "over long-poll")
    status, body = await asyncio.wait_for(parked, 5)
    assert status == 200
    assert [e["data"]["messageId"] for e in body["data"]["events"]] == [sent["messageId"]]
