"""Receipts (PROTOCOL section 11) over real connections, on both stores: every way a client acknowledges (a
WebSocket `ack` frame, `POST /api/ack`, the next long-poll on either poll path, a WebSocket or SSE resume) moves
the member's delivered position, a read moves the read position, each move reaches every member as a
`dialog:receipt` of the log, coalesced to at most one a second, and `GET /api/dialogs/{id}` tells where every
other member stands. Non-members move nothing; a server started afresh on the same database (a restart, another
process) holds the same receipts and replays their events. Last, the domain on a store of its own: positions never
move back, what waits for a write is bounded, and a write that fails keeps it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chatserver import jsonutil, queries
from chatserver.config import Config
from chatserver.receipts import Receipts
from handlers.base import AppContext
from run import build_context, close_context
from tests import storekit
from tests.conftest import RECEIPT, Client, Socket
from tests.test_realtime import SseReader, eventually
from tests.test_rest import assert_error, assert_ok


def receipt(user_id: str, delivered: str | None, read: str | None) -> dict[str, Any]:
    return {"userId": user_id, "deliveredMessageId": delivered, "readMessageId": read}


async def receipts_within(sock: Socket, seconds: float) -> list[dict[str, Any]]:
    """Every receipt the socket gets within `seconds`."""
    found = []
    deadline = asyncio.get_running_loop().time() + seconds
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        try:
            found.append(await sock.next_of(RECEIPT, timeout=left))
        except TimeoutError:
            break
    return found


async def dialog_of(creator: Client, *others: Client) -> str:
    body = {"title": "Trio", "memberIds": [other.user_id for other in others]}
    return str(assert_ok(*await creator.call("POST", "/api/dialogs", body), 201)["dialogId"])


async def stands(client: Client, dialog_id: str) -> list[dict[str, Any]]:
    data = assert_ok(*await client.call("GET", f"/api/dialogs/{dialog_id}"))
    return list(data["receipts"])


@pytest.mark.gen_test(timeout=30)
async def test_a_websocket_ack_moves_delivered_and_every_member_gets_the_receipt(
    alice: Client, bob: Client, dialog_id: str
) -> None:
    assert await stands(alice, dialog_id) == [receipt(bob.user_id, None, None)]
    alice_ws, bob_ws = await alice.websocket(), await bob.websocket()
    sent = await alice.post_message(dialog_id, "hello")
    event = await bob_ws.next_of("message:new")
    bob_ws.send({"type": "ack", "cursor": event["cursor"]})
    expected = receipt(bob.user_id, sent["messageId"], None)
    for sock in (alice_ws, bob_ws):  # the member's own connections too
        got = await sock.next_of(RECEIPT)
        assert got["data"] == {"dialogId": dialog_id, **expected, "receipts": [expected]}
        assert got["cursor"]
    assert await stands(alice, dialog_id) == [expected]
    assert await stands(bob, dialog_id) == [receipt(alice.user_id, None, None)]


@pytest.mark.gen_test(timeout=30)
async def test_a_senders_own_messages_never_move_their_delivered_position(
    alice: Client, bob: Client, dialog_id: str
) -> None:
    bob_ws, alice_ws = await bob.websocket(), await alice.websocket()
    await alice.post_message(dialog_id, "mine")
    event = await alice_ws.next_of("message:new")
    alice_ws.send({"type": "ack", "cursor": event["cursor"]})
    assert await receipts_within(bob_ws, 1.5) == []
    assert await stands(bob, dialog_id) == [receipt(alice.user_id, None, None)]


@pytest.mark.gen_test(timeout=30)
async def test_post_ack_moves_delivered_and_refuses_what_is_no_cursor(
    alice: Client, bob: Client, carol: Client, dialog_id: str, ctx: AppContext
) -> None:
    alice_ws = await alice.websocket()
    sent = await alice.post_message(dialog_id, "hello")
    cursor = (await alice_ws.next_of("message:new"))["cursor"]
    assert assert_ok(*await bob.call("POST", "/api/ack", {"cursor": cursor})) == {"acknowledged": True}
    got = await alice_ws.next_of(RECEIPT)
    assert got["data"]["receipts"] == [receipt(bob.user_id, sent["messageId"], None)]
    # A cursor of another log (a replaced database) acknowledges nothing, and says so.
    assert assert_ok(*await bob.call("POST", "/api/ack", {"cursor": "0123456789abcdef.1"})) == {"acknowledged": False}
    log_id, _, position = cursor.rpartition(".")
    for bad in ("", "nope", f"{log_id}.²", f"{log_id}.{int(position) + 1000}", 7, None):
        assert_error(*await bob.call("POST", "/api/ack", {"cursor": bad}), 400, "cursor")
    assert_error(*await bob.call("POST", "/api/ack", raw=b"{"), 400)
    assert_error(*await bob.call("POST", "/api/ack", {"cursor": cursor}, token="bad"), 401)
    # A non-member's acknowledgement is accepted (the cursor is the log's) and moves nothing of the dialog.
    assert assert_ok(*await carol.call("POST", "/api/ack", {"cursor": cursor})) == {"acknowledged": True}
    assert await receipts_within(alice_ws, 1.5) == []
    assert await stands(alice, dialog_id) == [receipt(bob.user_id, sent["messageId"], None)]


@pytest.mark.gen_test(timeout=30)
async def test_a_bad_ack_frame_gets_an_error_frame_and_the_socket_stays_open(bob: Client) -> None:
    bob_ws = await bob.websocket()
    for frame in ({"type": "ack"}, {"type": "ack", "cursor": 5}, {"type": "ack", "cursor": "x"}):
        bob_ws.send(frame)
        error = await bob_ws.next_of("error")
        assert error["data"]["code"] == "bad_request" and "cursor" in error["data"]["message"]
    bob_ws.send({"type": "ping"})
    assert (await bob_ws.next_of("pong"))["type"] == "pong"


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("path", ["lean", "handler"])
async def test_the_next_long_poll_acknowledges_its_cursor(
    alice: Client, bob: Client, dialog_id: str, path: str
) -> None:
    """The lean poll path (a bearer header, no typing) and PollHandler's (typing dialogs named) alike."""
    extra = {} if path == "lean" else {"typing": dialog_id}
    alice_ws = await alice.websocket()
    status, body = await bob.poll(**extra)
    handshake = body["data"]["cursor"]
    sent = await alice.post_message(dialog_id, "hello")
    status, body = await bob.poll(handshake, timeout="5", **extra)
    assert status == 200 and [e["type"] for e in body["data"]["events"]] == ["message:new"]
    assert await receipts_within(alice_ws, 1.2) == []  # having it is not yet acknowledging it
    status, body = await bob.poll(body["data"]["cursor"], timeout="0", **extra)
    got = await alice_ws.next_of(RECEIPT)
    assert got["data"]["receipts"] == [receipt(bob.user_id, sent["messageId"], None)]


async def parked_poll_of(alice: Client, bob: Client, dialog_id: str, extra: dict[str, str], when: str) -> tuple[
        asyncio.Task[tuple[int, Any]], Socket, dict[str, Any]]:
    """Alice's poll with the cursor of her message, and Bob's acknowledgement of it logged as a receipt (seen on
    his WebSocket), the poll parked before it or arriving after it (`when`): the poll, his socket and the
    message."""
    bob_ws = await bob.websocket()
    handshake = (await alice.poll(**extra))[1]["data"]["cursor"]
    sent = await alice.post_message(dialog_id, "hello")
    status, body = await alice.poll(handshake, timeout="0", **extra)
    assert status == 200 and [e["type"] for e in body["data"]["events"]] == ["message:new"]
    cursor = body["data"]["cursor"]
    if when == "parked":
        poll = asyncio.ensure_future(alice.poll(cursor, timeout="20", **extra))
    bob_ws.send({"type": "ack", "cursor": (await bob_ws.next_of("message:new"))["cursor"]})
    await bob_ws.next_of(RECEIPT)
    if when == "arriving":
        poll = asyncio.ensure_future(alice.poll(cursor, timeout="20", **extra))
    return poll, bob_ws, sent


@pytest.mark.gen_test(timeout=40)
@pytest.mark.parametrize("settings", [{"poll_receipt_linger": 8.0}])
@pytest.mark.parametrize("when", ["parked", "arriving"])
@pytest.mark.parametrize("path", ["lean", "handler"])
async def test_a_poll_woken_only_by_a_receipt_lingers_and_answers_it_with_the_next_message(
    alice: Client, bob: Client, dialog_id: str, ctx: AppContext, path: str, when: str
) -> None:
    """Parked when the receipt comes, or finding only the receipt when it comes: it waits for company."""
    extra = {} if path == "lean" else {"typing": dialog_id}
    poll, bob_ws, sent = await parked_poll_of(alice, bob, dialog_id, extra, when)
    await asyncio.sleep(0.3)
    assert not poll.done()  # the receipt alone did not answer it
    # Bob's acknowledgement of the log's head (the receipt, after the last message) moves nothing and waits for no
    # write (once Alice's own, of her message, is written).
    await eventually(lambda: ctx.service.receipts.idle)
    status, body = await bob.poll(timeout="0")
    assert_ok(*await bob.call("POST", "/api/ack", {"cursor": body["data"]["cursor"]}))
    assert ctx.service.receipts.idle
    reply = await bob.post_message(dialog_id, "hi")
    status, body = await poll
    events = body["data"]["events"]
    assert status == 200 and [e["type"] for e in events] == [RECEIPT, "message:new"]
    assert events[0]["data"]["receipts"] == [receipt(bob.user_id, sent["messageId"], None)]
    assert events[1]["data"]["messageId"] == reply["messageId"] and body["data"]["cursor"] == events[1]["cursor"]
    # Alice's next poll acknowledges Bob's reply: a real move, and its receipt follows.
    await alice.poll(body["data"]["cursor"], timeout="0", **extra)
    got = await bob_ws.next_of(RECEIPT)
    assert got["data"]["receipts"] == [receipt(alice.user_id, reply["messageId"], None)]


@pytest.mark.gen_test(timeout=40)
@pytest.mark.parametrize("settings", [{"poll_receipt_linger": 0.5}])
@pytest.mark.parametrize("when", ["parked", "arriving"])
@pytest.mark.parametrize("path", ["lean", "handler"])
async def test_a_lingering_poll_answers_with_the_receipt_within_the_linger(
    alice: Client, bob: Client, dialog_id: str, path: str, when: str
) -> None:
    extra = {} if path == "lean" else {"typing": dialog_id}
    poll, _, sent = await parked_poll_of(alice, bob, dialog_id, extra, when)
    status, body = await asyncio.wait_for(poll, 10)  # well before the poll's own 20 s
    events = body["data"]["events"]
    assert status == 200 and [e["type"] for e in events] == [RECEIPT]
    assert events[0]["data"]["receipts"] == [receipt(bob.user_id, sent["messageId"], None)]
    assert body["data"]["cursor"] == events[0]["cursor"]


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_resume_acknowledges_its_cursor(alice: Client, bob: Client, dialog_id: str, transport: str) -> None:
    alice_ws = await alice.websocket()
    first = await alice.post_message(dialog_id, "one")
    cursor = (await alice_ws.next_of("message:new"))["cursor"]
    await alice.post_message(dialog_id, "two")
    if transport == "websocket":
        bob_ws = await bob.websocket(cursor)
        assert (await bob_ws.next_of("message:new"))["data"]["content"] == "two"
    else:
        reader = SseReader(bob, cursor=cursor)
        await reader.wait_for(2)
    got = await alice_ws.next_of(RECEIPT)
    assert got["data"]["receipts"] == [receipt(bob.user_id, first["messageId"], None)]
    if transport == "sse":
        # Bob's own stream gets the receipt too.
        await eventually(lambda: any(e["type"] == RECEIPT for _, e in reader.events))
        reader.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_read_moves_read_and_delivered_and_only_forward(alice: Client, bob: Client, dialog_id: str) -> None:
    alice_ws = await alice.websocket()
    first = await alice.post_message(dialog_id, "one")
    second = await alice.post_message(dialog_id, "two")
    assert_ok(*await bob.call("POST", f"/api/dialogs/{dialog_id}/read", {"messageId": second["messageId"]}))
    expected = receipt(bob.user_id, second["messageId"], second["messageId"])
    assert (await alice_ws.next_of(RECEIPT))["data"]["receipts"] == [expected]
    # Reading an older message, or acknowledging an older cursor, moves nothing back and tells nobody.
    assert_ok(*await bob.call("POST", f"/api/dialogs/{dialog_id}/read", {"messageId": first["messageId"]}))
    assert await receipts_within(alice_ws, 1.5) == []
    assert await stands(alice, dialog_id) == [expected]


@pytest.mark.gen_test(timeout=30)
async def test_receipts_are_coalesced_to_one_a_second(alice: Client, bob: Client, dialog_id: str) -> None:
    alice_ws, bob_ws = await alice.websocket(), await bob.websocket()
    sent = []
    for n in range(6):
        sent.append(await alice.post_message(dialog_id, f"m{n}"))
        event = await bob_ws.next_of("message:new")
        bob_ws.send({"type": "ack", "cursor": event["cursor"]})
        assert_ok(*await bob.call("POST", f"/api/dialogs/{dialog_id}/read", {"messageId": sent[-1]["messageId"]}))
    got = await receipts_within(alice_ws, 2.5)
    # Twelve moves within well under a second: at most one receipt now and one a second later.
    assert 1 <= len(got) <= 3
    last = sent[-1]["messageId"]
    assert got[-1]["data"]["receipts"] == [receipt(bob.user_id, last, last)]
    assert await stands(alice, dialog_id) == [receipt(bob.user_id, last, last)]


@pytest.mark.gen_test(timeout=30)
async def test_a_receipt_carries_every_member_that_moved_in_one_event(
    alice: Client, bob: Client, carol: Client, dialog_id: str
) -> None:
    trio = await dialog_of(alice, bob, carol)
    alice_ws = await alice.websocket()
    sent = await alice.post_message(trio, "all of you")
    cursor = (await alice_ws.next_of("message:new"))["cursor"]
    for one in (bob, carol):
        assert_ok(*await one.call("POST", "/api/ack", {"cursor": cursor}))
    got = await receipts_within(alice_ws, 1.5)
    movers = {entry["userId"]: entry for event in got for entry in event["data"]["receipts"]}
    assert movers == {one.user_id: receipt(one.user_id, sent["messageId"], None) for one in (bob, carol)}
    assert len(got) <= 2  # one event for both, unless the second came after the first flush
    assert all(event["data"]["dialogId"] == trio for event in got)
    assert sorted(map(str, await stands(alice, trio))) == sorted(map(str, movers.values()))


@pytest.mark.gen_test(timeout=30)
async def test_a_dialog_above_the_live_receipts_bound_records_receipts_without_logging_them(
    alice: Client, bob: Client, carol: Client, dialog_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queries, "RECEIPT_EVENT_MEMBERS", 2)  # the server runs in this process
    trio = await dialog_of(alice, bob, carol)
    alice_ws = await alice.websocket()
    in_trio = await alice.post_message(trio, "all of you")
    in_pair = await alice.post_message(dialog_id, "just you")
    cursor = (await alice_ws.next_of("message:new"))["cursor"]
    cursor = (await alice_ws.next_of("message:new"))["cursor"]
    for one in (bob, carol):
        assert_ok(*await one.call("POST", "/api/ack", {"cursor": cursor}))
    got = await receipts_within(alice_ws, 1.5)
    # The pair's receipt is live; the trio's (three members, above the bound of two) is only recorded.
    assert [event["data"]["dialogId"] for event in got] == [dialog_id]
    assert await stands(alice, dialog_id) == [receipt(bob.user_id, in_pair["messageId"], None)]
    assert sorted(map(str, await stands(alice, trio))) == sorted(
        str(receipt(one.user_id, in_trio["messageId"], None)) for one in (bob, carol)
    )


@pytest.mark.gen_test(timeout=30)
async def test_a_removed_member_neither_moves_nor_gets_receipts(
    alice: Client, bob: Client, carol: Client, dialog_id: str
) -> None:
    trio = await dialog_of(alice, bob, carol)
    assert_ok(*await alice.call("PATCH", f"/api/dialogs/{trio}", {"removeMemberIds": [carol.user_id]}))
    carol_ws, alice_ws = await carol.websocket(), await alice.websocket()
    sent = await alice.post_message(trio, "without carol")
    cursor = (await alice_ws.next_of("message:new"))["cursor"]
    assert_ok(*await carol.call("POST", "/api/ack", {"cursor": cursor}))
    assert_ok(*await bob.call("POST", "/api/ack", {"cursor": cursor}))
    assert (await alice_ws.next_of(RECEIPT))["data"]["receipts"] == [receipt(bob.user_id, sent["messageId"], None)]
    assert await receipts_within(carol_ws, 1.2) == []
    assert_error(*await carol.call("GET", f"/api/dialogs/{trio}"), 403)
    assert await stands(alice, trio) == [receipt(bob.user_id, sent["messageId"], None)]


@pytest.mark.gen_test(timeout=60)
async def test_receipts_are_kept_and_replayed_by_a_server_started_afresh(
    alice: Client, bob: Client, dialog_id: str, config: Config
) -> None:
    alice_ws = await alice.websocket()
    before = alice_ws.ready["data"]["cursor"]
    sent = await alice.post_message(dialog_id, "hello")
    assert_ok(*await bob.call("POST", f"/api/dialogs/{dialog_id}/read", {"messageId": sent["messageId"]}))
    live = await alice_ws.next_of(RECEIPT)
    expected = receipt(bob.user_id, sent["messageId"], sent["messageId"])
    again = await build_context(config)  # the same database, nothing in memory: a restart, or another process
    try:
        view = await again.service.get_dialog(alice.user_id, dialog_id)
        assert [r.to_json() for r in view.receipts or ()] == [expected]
        replay = await again.service.replay(alice.user_id, before)
        assert replay.reset is None
        assert [r.type for r in replay.events] == ["message:new", RECEIPT]
        assert jsonutil.loads(replay.events[-1].payload) == live
    finally:
        await close_context(again)


@pytest.mark.gen_test(timeout=60)
async def test_an_acknowledgement_on_another_process_reaches_this_ones_connections(
    alice: Client, bob: Client, dialog_id: str, config: Config
) -> None:
    """Another server on the same database (a process of its own, as the store sees it) takes Bob's
    acknowledgement; its receipt reaches Alice's WebSocket here through the log."""
    alice_ws = await alice.websocket()
    sent = await alice.post_message(dialog_id, "hello")
    cursor = (await alice_ws.next_of("message:new"))["cursor"]
    other = await build_context(config)
    try:
        assert await other.service.acknowledge(bob.user_id, cursor)
        got = await alice_ws.next_of(RECEIPT)
        assert got["data"]["receipts"] == [receipt(bob.user_id, sent["messageId"], None)]
    finally:
        await close_context(other)


# -- the domain, on a store of its own ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_positions_never_move_back_waiting_acknowledgements_are_bounded_and_a_failed_write_keeps_them(
    database: str,
) -> None:
    async with storekit.started(database) as store:
        ann, ben, cid = [await storekit.user(store, phone) for phone in ("701", "702", "703")]
        talk = await storekit.dialog(store, ann, ben, cid)
        first = await storekit.post(store, storekit.message(talk.dialog_id, ann, "one"))
        early = await storekit.head(store)
        second = await storekit.post(store, storekit.message(talk.dialog_id, ann, "two"))
        late = await storekit.head(store)
        logged = await store.write(queries.record_receipts, {ben.user_id: late}, [])
        assert [jsonutil.loads(e.data)["receipts"] for e in logged] == [
            [receipt(ben.user_id, second.message_id, None)]]
        # An older position, acknowledged afterwards (another tab, another process), moves nothing and logs nothing.
        assert await store.write(queries.record_receipts, {ben.user_id: early}, []) == []
        view = await store.read(queries.dialog_detail, talk.dialog_id, ann.user_id)
        assert view is not None and [r.to_json() for r in view.receipts or ()] == [
            receipt(ben.user_id, second.message_id, None), receipt(cid.user_id, None, None)]
        assert first.message_id != second.message_id

        await store.close()  # from here every write fails (the database is away)
        receipts = Receipts(store, max_pending=2)
        for user in (ben, cid, ann):
            receipts.acknowledge(user.user_id, late)
        assert (receipts.pending, receipts.dropped) == (2, 1)
        receipts.acknowledge(ben.user_id, late)  # the same again: it waits once
        assert receipts.pending == 2
        assert await receipts.flush() == 0  # not written: what waited is kept for the next try
        assert (receipts.pending, receipts.logged) == (2, 0)
        await receipts.stop()
