"""The real-time transports over real sockets: the seed's bug and its harder cases.

A message written over REST reaches every member on WebSocket, long-poll and SSE, once; a client that drops
resumes from its cursor on any transport and loses and repeats nothing; bad clients get clear answers and
never slow the others down.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import os
import socket
from typing import Any
from urllib.parse import urlparse

import pytest
import tornado.httpclient
import tornado.testing
import tornado.websocket

import run
from chatserver import jsonutil
from handlers.app import make_app
from handlers.base import AppContext
from run import build_context, close_context, make_http_server
from tests.conftest import Client
from tests.test_ops import scrape


async def eventually(condition: Any, seconds: float = 5.0) -> None:
    """Wait, with a bound, until `condition()` is true."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class SseReader:
    """A streaming SSE client: collects (id, event) pairs and comment lines as they arrive."""

    def __init__(
        self, client: Client, cursor: str | None = None, last_event_id: str | None = None, typing: str | None = None,
        ticket: str | None = None,
    ) -> None:
        params = [f"ticket={ticket}" if ticket else f"token={client.token}"]
        if cursor:
            params.append(f"cursor={cursor}")
        if typing:
            params.append(f"typing={typing}")
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        self.events: list[tuple[str | None, dict[str, Any]]] = []
        self.comments: list[str] = []
        self.headers: dict[str, str] = {}
        self._buffer = b""
        self._changed = asyncio.Event()
        request = tornado.httpclient.HTTPRequest(
            f"{client.base_url}/api/events?{'&'.join(params)}",
            headers=headers,
            request_timeout=60,
            streaming_callback=self._on_chunk,
            header_callback=self._on_header,
        )
        self.fetch = asyncio.ensure_future(tornado.httpclient.AsyncHTTPClient().fetch(request, raise_error=False))

    def _on_header(self, line: str) -> None:
        name, _, value = line.partition(":")
        if value:
            self.headers[name.strip().lower()] = value.strip()

    def _on_chunk(self, chunk: bytes) -> None:
        self._buffer += chunk
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            event_id, data = None, None
            for line in block.decode().split("\n"):
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("data: "):
                    data = jsonutil.loads(line[6:])
                elif line.startswith(":"):
                    self.comments.append(line)
            if data is not None:
                self.events.append((event_id, data))
        self._changed.set()

    async def wait_for(self, count: int, seconds: float = 5.0) -> list[dict[str, Any]]:
        await eventually(lambda: len(self.events) >= count, seconds)
        return [event for _, event in self.events]

    def close(self) -> None:
        self.fetch.cancel()


async def raw_websocket(client: Client, receive_buffer: int = 4096) -> socket.socket:
    """A WebSocket that completes the handshake and then never reads: the slow or dead client."""
    url = urlparse(client.base_url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (url.hostname or "127.0.0.1", url.port or 80))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws?token={client.token} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await asyncio.wait_for(loop.sock_recv(sock, 1), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def message_ids(events: list[dict[str, Any]]) -> list[str]:
    return [e["data"]["messageId"] for e in events if e["type"] == "message:new"]


# -- the seed's scenario 1, on every transport --------------------------------------------------------------


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
    await bob_ws.nothing_within(0.1)


@pytest.mark.gen_test
async def test_long_poller_is_released_by_message_posted_over_rest(alice: Client, bob: Client, dialog_id: str) -> None:
    status, hello = await bob.poll()
    assert status == 200 and hello["data"]["events"] == []
    parked = asyncio.ensure_future(bob.poll(hello["data"]["cursor"], timeout="20"))
    await eventually(lambda: alice.ctx.metrics.parked_polls == 1)
    assert not parked.done()
    sent = await alice.post_message(dialog_id, "over long-poll")
    status, body = await asyncio.wait_for(parked, 5)
    assert status == 200
    assert [e["data"] for e in body["data"]["events"]] == [sent]
    assert body["data"]["cursor"] == body["data"]["events"][-1]["cursor"]


@pytest.mark.gen_test
async def test_sse_reader_gets_message_posted_over_rest(alice: Client, bob: Client, dialog_id: str) -> None:
    reader = SseReader(bob)
    (ready,) = await reader.wait_for(1)
    assert ready["type"] == "ready" and ready["data"]["userId"] == bob.user_id
    assert reader.headers["content-type"].startswith("text/event-stream")
    assert reader.headers["x-accel-buffering"] == "no"
    sent = await alice.post_message(dialog_id, "over SSE")
    events = await reader.wait_for(2)
    assert events[1]["type"] == "message:new" and events[1]["data"] == sent
    assert reader.events[1][0] == events[1]["cursor"]  # the SSE id is the cursor
    reader.close()


@pytest.mark.gen_test
async def test_sender_gets_own_message_once_on_every_transport(alice: Client, dialog_id: str) -> None:
    ws = await alice.websocket()
    reader = SseReader(alice)
    await reader.wait_for(1)
    _, hello = await alice.poll()
    sent = await alice.post_message(dialog_id, "mine")
    assert (await ws.next_of("message:new"))["data"]["messageId"] == sent["messageId"]
    status, body = await alice.poll(hello["data"]["cursor"], timeout="0")
    assert status == 200 and message_ids(body["data"]["events"]) == [sent["messageId"]]
    events = await reader.wait_for(2)
    await asyncio.sleep(0.2)
    assert message_ids(events[1:]) == [sent["messageId"]] and len(reader.events) == 2
    await ws.nothing_within(0.2)
    reader.close()


# -- the seed's scenario 2, harder: resume --------------------------------------------------------------------


@pytest.mark.gen_test
async def test_reconnect_with_cursor_gets_exactly_the_missed_messages_in_order(
    alice: Client, bob: Client, dialog_id: str
) -> None:
    ws = await bob.websocket()
    first = await alice.post_message(dialog_id, "before the drop")
    seen = await ws.next_of("message:new")
    assert seen["data"]["messageId"] == first["messageId"]
    ws.close()
    sent = [await alice.post_message(dialog_id, f"missed {i}") for i in range(5)]
    again = await bob.websocket(cursor=seen["cursor"])
    assert again.ready["data"]["cursor"] == seen["cursor"]
    replayed = [await again.next_of("message:new") for _ in range(5)]
    assert [e["data"]["messageId"] for e in replayed] == [m["messageId"] for m in sent]
    await again.nothing_within(0.3)
    live = await alice.post_message(dialog_id, "live again")
    assert (await again.next_of("message:new"))["data"]["messageId"] == live["messageId"]


@pytest.mark.gen_test
async def test_switching_transports_mid_stream_loses_and_repeats_nothing(
    alice: Client, bob: Client, dialog_id: str
) -> None:
    sent: list[str] = []
    received: list[str] = []

    async def send(n: int) -> None:
        for _ in range(n):
            sent.append((await alice.post_message(dialog_id, f"m{len(sent)}"))["messageId"])

    # 1. WebSocket
    ws = await bob.websocket()
    await send(3)
    for _ in range(3):
        event = await ws.next_of("message:new")
        received.append(event["data"]["messageId"])
    cursor = event["cursor"]
    ws.close()
    await send(2)
    # 2. long-poll, resuming from the WebSocket's cursor
    status, body = await bob.poll(cursor, timeout="5")
    assert status == 200
    received += message_ids(body["data"]["events"])
    cursor = body["data"]["cursor"]
    await send(2)
    # 3. SSE, resuming from the poll's cursor with Last-Event-ID
    reader = SseReader(bob, last_event_id=cursor)
    events = await reader.wait_for(3)
    received += message_ids(events[1:])
    cursor = reader.events[-1][0] or ""
    reader.close()
    await send(2)
    # 4. WebSocket again, from the SSE id
    ws = await bob.websocket(cursor=cursor)
    for _ in range(2):
        received.append((await ws.next_of("message:new"))["data"]["messageId"])
    await ws.nothing_within(0.3)
    assert received == sent


@pytest.mark.gen_test
async def test_cursor_resumes_on_another_server_of_the_same_database_without_a_reset(
    alice: Client, bob: Client, dialog_id: str, ctx: AppContext, config: Any
) -> None:
    ws = await bob.websocket()
    await alice.post_message(dialog_id, "before")
    old_cursor = (await ws.next_of("message:new"))["cursor"]
    missed = [await alice.post_message(dialog_id, f"missed {i}") for i in range(3)]
    ws.close()
    # A second server on the same database (a restart, or another process): the cursor is the log's, not the
    # process's, so the client resumes there with exactly what it missed, on every transport.
    other_ctx = await build_context(config)
    server = make_http_server(make_app(other_ctx), config)
    sock, port = tornado.testing.bind_unused_port()
    server.add_socket(sock)
    try:
        other = Client(f"http://127.0.0.1:{port}", other_ctx, bob.user_id)
        other.sockets = bob.sockets
        again = await other.websocket(cursor=old_cursor)
        assert again.ready["data"]["cursor"] == old_cursor
        got = [await again.next_of("message:new") for _ in missed]
        assert [e["data"]["messageId"] for e in got] == [m["messageId"] for m in missed]
        status, body = await other.poll(old_cursor, timeout="0")
        assert status == 200
        assert [e["data"]["messageId"] for e in body["data"]["events"]] == [m["messageId"] for m in missed]
        assert body["data"]["cursor"] == got[-1]["cursor"]
        # Live events written on either server reach the client on the other.
        await alice.post_message(dialog_id, "after")
        assert (await again.next_of("message:new"))["data"]["content"] == "after"
        await Client(other.base_url, other_ctx, alice.user_id).post_message(dialog_id, "written on the other")
        again_here = await bob.websocket(cursor=got[-1]["cursor"])
        contents = [(await again_here.next_of("message:new"))["data"]["content"] for _ in range(2)]
        assert contents == ["after", "written on the other"]
        again.close()
    finally:
        server.stop()
        await server.close_all_connections()
        await close_context(other_ctx)


@pytest.mark.gen_test
@pytest.mark.parametrize("settings", [{"history_size": 3}])
async def test_cursor_older_than_memory_is_answered_from_the_log(alice: Client, bob: Client, dialog_id: str) -> None:
    _, hello = await bob.poll()
    sent = [await alice.post_message(dialog_id, f"m{i}") for i in range(8)]
    status, body = await bob.poll(hello["data"]["cursor"], timeout="0")
    assert status == 200
    assert [e["data"]["messageId"] for e in body["data"]["events"]] == [m["messageId"] for m in sent]
    ws = await bob.websocket(cursor=hello["data"]["cursor"])
    assert [(await ws.next())["data"]["messageId"] for _ in sent] == [m["messageId"] for m in sent]


@pytest.mark.gen_test
@pytest.mark.parametrize("settings", [{"history_size": 3, "event_retention": 4, "poll_max_events": 3}])
async def test_cursor_older_than_the_retention_gets_reset_expired(
    alice: Client, bob: Client, dialog_id: str, ctx: AppContext
) -> None:
    _, hello = await bob.poll()
    for i in range(8):
        await alice.post_message(dialog_id, f"m{i}")
    assert await ctx.service.feed.prune() > 0
    status, body = await bob.poll(hello["data"]["cursor"], timeout="0")
    assert status == 200
    (reset,) = body["data"]["events"]
    assert reset["type"] == "reset" and reset["data"]["reason"] == "expired"
    assert reset["cursor"] == body["data"]["cursor"] == ctx.broadcaster.cursor()
    ws = await bob.websocket(cursor=hello["data"]["cursor"])
    assert (await ws.next())["data"]["reason"] == "expired"
    # What the log still keeps resumes: the last `poll_max_events` of the four kept, then `more`.
    last_four = ctx.broadcaster.cursor(ctx.broadcaster.last_position - 4)
    status, body = await bob.poll(last_four, timeout="0")
    assert [e["data"]["content"] for e in body["data"]["events"]] == ["m4", "m5", "m6"]
    assert body["data"]["more"] is True


@pytest.mark.gen_test
async def test_a_cursor_of_another_log_gets_reset_restarted(bob: Client, ctx: AppContext) -> None:
    # A cursor of another database's log (this one replaced by a restored backup, say).
    other_log = "0123456789abcdef.5"
    status, body = await bob.poll(other_log, timeout="0")
    (reset,) = body["data"]["events"]
    assert status == 200 and reset["type"] == "reset" and reset["data"]["reason"] == "restarted"
    ws = await bob.websocket(cursor=other_log)
    assert (await ws.next())["data"]["reason"] == "restarted"


@pytest.mark.gen_test
async def test_unparseable_or_future_cursor_is_refused(bob: Client) -> None:
    for bad in ("garbage", f"{bob.ctx.broadcaster.log_id}.999"):
        status, body = await bob.poll(bad)
        assert status == 400 and "cursor" in body["error"]
        with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
            await bob.websocket(cursor=bad)
        assert refused.value.code == 400


# -- order, membership, typing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{"message_rate": 0.0}])  # a burst far over any user's limit (test_throttle.py)
@pytest.mark.gen_test(timeout=60)
async def test_order_is_kept_under_a_burst_of_hundreds_of_messages(alice: Client, bob: Client, dialog_id: str) -> None:
    ws = await bob.websocket()
    answers = await asyncio.gather(*(alice.post_message(dialog_id, f"burst {i}") for i in range(300)))
    received = [await ws.next_of("message:new") for _ in range(300)]
    status, history = await bob.call("GET", f"/api/messages/dialog/{dialog_id}?limit=200")
    status2, older = await bob.call(
        "GET", f"/api/messages/dialog/{dialog_id}?limit=200&before={history['data'][0]['messageId']}"
    )
    assert status == status2 == 200
    stored_order = [m["messageId"] for m in older["data"] + history["data"]]
    assert [e["data"]["messageId"] for e in received] == stored_order
    assert sorted(stored_order) == sorted(m["messageId"] for m in answers)
    seqs = [int(e["cursor"].rsplit(".", 1)[1]) for e in received]
    assert seqs == sorted(seqs)


@pytest.mark.gen_test
async def test_non_member_receives_nothing_and_is_refused_join_and_typing(
    alice: Client, carol: Client, dialog_id: str
) -> None:
    ws = await carol.websocket()
    _, hello = await carol.poll()
    await alice.post_message(dialog_id, "members only")
    await ws.nothing_within(0.3)
    status, body = await carol.poll(hello["data"]["cursor"], timeout="0")
    assert body["data"]["events"] == []
    ws.send({"type": "dialog:join", "dialogId": dialog_id})
    error = await ws.next()
    assert error == {
        "type": "error",
        "data": {"code": "forbidden", "message": error["data"]["message"], "dialogId": dialog_id},
    }
    ws.send({"type": "typing:start", "dialogId": dialog_id})
    assert (await ws.next())["data"]["code"] == "forbidden"
    status, body = await carol.poll(hello["data"]["cursor"], typing=dialog_id, timeout="0")
    assert status == 403
    status, _ = await carol.call("POST", f"/api/dialogs/{dialog_id}/typing", {"typing": True})
    assert status == 403


@pytest.mark.gen_test
async def test_typing_reaches_joined_connections_of_other_members_only(
    alice: Client, bob: Client, dialog_id: str
) -> None:
    joined, not_joined, own = await bob.websocket(), await bob.websocket(), await alice.websocket()
    joined.send({"type": "dialog:join", "dialogId": dialog_id})
    assert await joined.next() == {"type": "dialog:joined", "data": {"dialogId": dialog_id}}
    own.send({"type": "dialog:join", "dialogId": dialog_id})
    await own.next()
    _, hello = await bob.poll()
    parked = asyncio.ensure_future(bob.poll(hello["data"]["cursor"], typing=dialog_id, timeout="10"))
    await eventually(lambda: alice.ctx.metrics.parked_polls == 1)
    own.send({"type": "typing:start", "dialogId": dialog_id})
    expected = {"type": "typing:start", "data": {"dialogId": dialog_id, "userId": alice.user_id}}
    assert await joined.next() == expected
    status, body = await asyncio.wait_for(parked, 5)
    assert body["data"]["events"] == [expected]
    assert body["data"]["cursor"] == hello["data"]["cursor"]  # typing carries no cursor and moves none
    status, _ = await alice.call("POST", f"/api/dialogs/{dialog_id}/typing", {"typing": False})
    assert status == 204
    assert (await joined.next())["type"] == "typing:stop"
    await not_joined.nothing_within(0.2)
    await own.nothing_within(0.1)
    joined.send({"type": "dialog:leave", "dialogId": dialog_id})
    assert await joined.next() == {"type": "dialog:left", "data": {"dialogId": dialog_id}}
    own.send({"type": "typing:start", "dialogId": dialog_id})
    await joined.nothing_within(0.3)


@pytest.mark.gen_test
async def test_a_burst_of_the_same_typing_state_reaches_others_once(alice: Client, bob: Client, dialog_id: str) -> None:
    # A client spamming typing:start must not make the server fan out every repeat to every member.
    joined, own = await bob.websocket(), await alice.websocket()
    joined.send({"type": "dialog:join", "dialogId": dialog_id})
    await joined.next_of("dialog:joined")
    for _ in range(50):
        own.send({"type": "typing:start", "dialogId": dialog_id})
    own.send({"type": "typing:stop", "dialogId": dialog_id})
    own.send({"type": "ping"})
    await own.next_of("pong")
    assert (await joined.next())["type"] == "typing:start"
    assert (await joined.next())["type"] == "typing:stop"  # a change of state always goes through
    await joined.nothing_within(0.2)


# -- bad clients -----------------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_malformed_frames_get_error_frames_and_the_socket_stays_open(bob: Client, dialog_id: str) -> None:
    ws = await bob.websocket()
    cases: list[tuple[str, str]] = [
        ("not json", "bad_request"),
        ("[1, 2]", "bad_request"),
        ('{"no": "type"}', "bad_request"),
        ('{"type": "explode"}', "bad_request"),
        ('{"type": "dialog:join", "dialogId": 42}', "bad_request"),
        ('{"type": "dialog:join", "dialogId": "dlg_unknown"}', "not_found"),
        ('{"type": "typing:start", "dialogId": "\\ud800"}', "bad_request"),
    ]
    for raw, code in cases:
        ws.conn.write_message(raw)
        frame = await ws.next()
        assert frame["type"] == "error" and frame["data"]["code"] == code, (raw, frame)
        assert isinstance(frame["data"]["message"], str) and frame["data"]["message"]
    ws.send({"type": "ping"})
    assert await ws.next() == {"type": "pong"}


@pytest.mark.gen_test
@pytest.mark.parametrize("settings", [{"max_body_size": 1024}])
async def test_frame_over_the_size_limit_closes_with_1009(bob: Client) -> None:
    ws = await bob.websocket()
    ws.conn.write_message("x" * 2048)
    assert await asyncio.wait_for(ws.conn.read_message(), 5) is None
    assert ws.conn.close_code == 1009


@pytest.mark.gen_test
async def test_bad_token_is_refused_before_the_upgrade(bob: Client) -> None:
    for token in ("", "nonsense", bob.token[:-2] + "xx"):
        with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
            conn = await tornado.websocket.websocket_connect(f"{bob.ws_url}/ws?token={token}")
            conn.close()
        assert refused.value.code == 401


@pytest.mark.gen_test
@pytest.mark.parametrize("settings", [{"trusted_origins": "https://chat.example.com, https://other.example"}])
async def test_cross_origin_upgrade_is_refused_unless_trusted(bob: Client) -> None:
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await bob.websocket(Origin="https://evil.example")
    assert refused.value.code == 403
    trusted = await bob.websocket(Origin="https://chat.example.com")
    assert trusted.ready["type"] == "ready"


@pytest.mark.gen_test
async def test_refused_upgrades_answer_a_json_error(bob: Client) -> None:
    # A browser's `Origin: null` (a sandboxed frame, a file: page), a foreign origin, a plain GET, a key that is not
    # RFC 6455's (16 bytes in base64), or a WebSocket version the server does not speak: each refused with the JSON
    # envelope like any other error, not Tornado's bare text or an empty body.
    plain = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
             "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    cases = [
        ({"Origin": "null"}, 403),
        ({"Origin": "https://evil.example"}, 403),
        ({"Origin": ""}, 403),
        ({"Upgrade": ""}, 400),
        ({"Connection": "keep-alive"}, 400),
        ({"Sec-WebSocket-Key": ""}, 400),
        ({"Sec-WebSocket-Key": "c2hvcnQ="}, 400),
        ({"Sec-WebSocket-Key": "not base64 at all, really"}, 400),
        ({"Sec-WebSocket-Version": "8"}, 426),
        ({"Sec-WebSocket-Version": ""}, 426),
    ]
    for change, status in cases:
        response = await bob.http.fetch(f"{bob.base_url}/ws?token={bob.token}", headers={**plain, **change},
                                        raise_error=False, request_timeout=5)
        assert response.code == status, (change, response.code, response.body)
        assert response.headers["Content-Type"].startswith("application/json"), change
        body = jsonutil.loads(response.body)
        assert body["success"] is False and body["error"], body
        if status == 426:  # RFC 6455 4.4: the answer names the version the server speaks
            assert response.headers["Sec-WebSocket-Version"] == "13"
    for same_origin in ({"Origin": bob.base_url}, {"Origin": "https://evil.example", "Sec-Fetch-Site": "same-origin"}):
        assert (await bob.websocket(**same_origin)).ready["type"] == "ready"


@pytest.mark.gen_test
async def test_an_http10_upgrade_without_a_host_is_refused_with_a_json_error(bob: Client) -> None:
    # HTTP/1.0 lets a request omit Host, which RFC 6455 4.1 requires of an upgrade: refused as JSON, like every refusal.
    url = urlparse(bob.base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(
        f"GET /ws?token={bob.token} HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), raw
    assert b"Content-Type: application/json" in head, raw
    assert jsonutil.loads(body)["success"] is False


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("settings", [{"client_buffer_limit": 64 * 1024, "message_rate": 0.0}])
async def test_client_that_stops_reading_is_cut_off_while_others_keep_receiving(
    alice: Client, bob: Client, dialog_id: str, ctx: AppContext
) -> None:
    stalled = await raw_websocket(bob)
    try:
        healthy = await bob.websocket()
        big = "x" * 9000
        for i in range(400):
            await alice.post_message(dialog_id, f"{i} {big}")
            assert (await healthy.next_of("message:new"))["data"]["content"].startswith(f"{i} ")
            if ctx.metrics.slow_clients_closed._value.get() >= 1:
                break
        else:
            raise AssertionError("the stalled client was never cut off")
        # The server closed it (4008) and forgot it at once; the healthy client still receives.
        assert ctx.broadcaster.subscriber_count() == 1
        sent = await alice.post_message(dialog_id, "still flowing")
        assert (await healthy.next_of("message:new"))["data"]["messageId"] == sent["messageId"]
        # The stalled connection itself is ended within the close timeout, not kept open, and its writer with it.
        await eventually(lambda: len(ctx.connections) == 1, 10)
        await eventually(lambda: not writers_pending(), 10)
    finally:
        stalled.close()


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("settings", [
    {"client_buffer_limit": 64 * 1024, "message_rate": 0.0},  # the missed events are in memory
    {"client_buffer_limit": 64 * 1024, "message_rate": 0.0, "history_size": 5},  # in the store alone
], ids=["memory", "store"])
async def test_client_behind_by_more_than_its_buffer_resumes_on_websocket_and_sse(
    alice: Client, bob: Client, dialog_id: str, ctx: AppContext
) -> None:
    # A reader that keeps up, coming back after 40 events of 10 kB each: six times its connection's bound. The
    # replay is paced by what it reads (never queued past the bound), so it is served, not cut off as slow.
    _, hello = await bob.poll()
    cursor = hello["data"]["cursor"]
    sent = [(await alice.post_message(dialog_id, f"{i} " + "ж" * 5000))["messageId"] for i in range(40)]
    ws = await bob.websocket(cursor)
    assert [(await ws.next_of("message:new"))["data"]["messageId"] for _ in sent] == sent
    sse = SseReader(bob, cursor=cursor)
    try:
        assert message_ids(await sse.wait_for(len(sent) + 1)) == sent
        # Both subscribed after their replay: a new event comes live, once.
        live = await alice.post_message(dialog_id, "live")
        assert (await ws.next_of("message:new"))["data"]["messageId"] == live["messageId"]
        assert message_ids(await sse.wait_for(len(sent) + 2)) == [*sent, live["messageId"]]
    finally:
        sse.close()
    assert ctx.metrics.slow_clients_closed._value.get() == 0


def writers_pending() -> list[asyncio.Task[Any]]:
    """The outboxes' writer tasks still running on this loop."""
    return [t for t in asyncio.all_tasks() if not t.done() and "Outbox._drain" in repr(t.get_coro())]


async def raw_event_stream(client: Client, receive_buffer: int = 4096) -> socket.socket:
    """An SSE stream whose answer's head is read and then nothing more: the slow or dead SSE client."""
    url = urlparse(client.base_url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (url.hostname or "127.0.0.1", url.port or 80))
    await loop.sock_sendall(sock, f"GET /api/events?token={client.token} HTTP/1.1\r\nHost: {url.netloc}\r\n\r\n"
                            .encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await asyncio.wait_for(loop.sock_recv(sock, 1), 5)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


async def read_until_closed(sock: socket.socket, seconds: float = 5.0) -> bytes:
    """What the peer sends until it ends the connection (an EOF or a reset); each read waits at most `seconds`."""
    loop = asyncio.get_running_loop()
    data = b""
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), seconds)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("settings", [{"client_buffer_limit": 64 * 1024, "message_rate": 0.0}])
async def test_sse_client_that_stops_reading_is_cut_off_while_others_keep_receiving(
    alice: Client, bob: Client, dialog_id: str, ctx: AppContext
) -> None:
    stalled = await raw_event_stream(bob)
    healthy = SseReader(bob)
    try:
        await healthy.wait_for(1)  # ready
        big = "x" * 9000
        for i in range(400):
            sent = await alice.post_message(dialog_id, f"{i} {big}")
            assert message_ids(await healthy.wait_for(i + 2))[-1] == sent["messageId"]
            if (await scrape(bob)).text.count("chatserver_slow_clients_closed_total 1.0"):
                break
        else:
            raise AssertionError("the stalled SSE client was never cut off")
        await eventually(lambda: len(ctx.connections) == 1)  # forgotten: the healthy stream is left
        sent = await alice.post_message(dialog_id, "still flowing")
        assert message_ids(await healthy.wait_for(i + 3))[-1] == sent["messageId"]
        # Its connection is ended, not left open with what it did not read: reading now finds the end.
        data = await read_until_closed(stalled)
        assert b"still flowing" not in data
        # And its writer, whose last send the cut left unfinished, is gone with it (not left pending for ever).
        await eventually(lambda: not writers_pending())
    finally:
        stalled.close()
        healthy.close()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("settings", [{"ws_ping_interval": 0.3, "ws_ping_timeout": 0.6}])
async def test_dead_peer_is_found_by_server_pings_and_dropped(bob: Client, ctx: AppContext) -> None:
    dead = await raw_websocket(bob, receive_buffer=65536)
    await eventually(lambda: ctx.broadcaster.subscriber_count() == 1)
    await eventually(lambda: ctx.broadcaster.subscriber_count() == 0, seconds=10)
    dead.close()


@pytest.mark.gen_test
async def test_disconnected_long_poller_leaves_no_waiter_behind(bob: Client, ctx: AppContext) -> None:
    _, hello = await bob.poll()
    url = urlparse(bob.base_url)
    _, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(
        f"GET /api/poll?cursor={hello['data']['cursor']}&timeout=50 HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {bob.token}\r\n\r\n".encode()
    )
    await writer.drain()
    await eventually(lambda: ctx.metrics.parked_polls == 1)
    assert ctx.broadcaster.subscriber_count() == 1
    writer.close()
    await eventually(lambda: ctx.metrics.parked_polls == 0, seconds=3)
    assert ctx.broadcaster.subscriber_count() == 0
    assert not ctx.connections


# -- long-poll details -----------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_poll_answers_no_store_and_validates_timeout(bob: Client) -> None:
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        f"{bob.base_url}/api/poll", headers={"Authorization": f"Bearer {bob.token}"}
    )
    assert response.headers["Cache-Control"] == "no-store"
    cursor = jsonutil.loads(response.body)["data"]["cursor"]
    for bad in ("soon", "nan", "1e999x"):
        status, body = await bob.poll(cursor, timeout=bad)
        assert status == 400 and "timeout" in body["error"], bad
    started = asyncio.get_running_loop().time()
    status, body = await bob.poll(cursor, timeout="-5")  # clamped to 0: answers at once
    assert status == 200 and body["data"] == {"events": [], "cursor": cursor}
    assert asyncio.get_running_loop().time() - started < 2
    status, body = await bob.poll(cursor, timeout="0.2")
    assert status == 200 and body["data"]["events"] == []
    status, _ = await bob.call("GET", "/api/poll", token="")
    assert status == 401


@pytest.mark.gen_test
@pytest.mark.parametrize("settings", [{"poll_max_events": 2}])
async def test_poll_caps_its_answer_and_says_more(alice: Client, bob: Client, dialog_id: str) -> None:
    _, hello = await bob.poll()
    sent = [(await alice.post_message(dialog_id, f"m{i}"))["messageId"] for i in range(5)]
    got: list[str] = []
    cursor = hello["data"]["cursor"]
    answers = []
    while len(got) < 5:
        status, body = await bob.poll(cursor, timeout="0")
        assert status == 200
        answers.append(body["data"])
        got += message_ids(body["data"]["events"])
        cursor = body["data"]["cursor"]
    assert got == sent
    assert [a.get("more", False) for a in answers] == [True, True, False]
    assert answers[0]["cursor"] == answers[0]["events"][-1]["cursor"]


@pytest.mark.gen_test
@pytest.mark.parametrize("settings", [{"sse_heartbeat": 0.2}])
async def test_sse_sends_heartbeat_comments(bob: Client) -> None:
    reader = SseReader(bob)
    await eventually(lambda: len(reader.comments) >= 2)
    assert reader.comments[0] == ": keepalive"
    reader.close()


@pytest.mark.gen_test
@pytest.mark.parametrize("settings", [{"sse_heartbeat": 0.2}])
async def test_every_open_sse_stream_gets_heartbeats_and_a_closed_one_leaves_no_trace(
    bob: Client, ctx: AppContext, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    streams = [await raw_event_stream(bob, receive_buffer=65536) for _ in range(3)]
    received = [b""] * len(streams)

    async def heartbeats(index: int, count: int) -> None:
        while received[index].count(b": keepalive\n\n") < count:
            received[index] += await asyncio.wait_for(loop.sock_recv(streams[index], 4096), 5)

    try:
        await asyncio.gather(*(heartbeats(i, 2) for i in range(3)))
        streams[0].close()
        await eventually(lambda: len(ctx.connections) == 2)
        await asyncio.gather(*(heartbeats(i, 4) for i in (1, 2)))
    finally:
        for sock in streams:
            sock.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.gen_test
async def test_sse_refuses_bad_token_and_foreign_typing_dialog(carol: Client, dialog_id: str) -> None:
    status, body = await carol.call("GET", "/api/events", token="bad")
    assert status == 401 and body["success"] is False
    status, body = await carol.call("GET", f"/api/events?typing={dialog_id}")
    assert status == 403


@pytest.mark.gen_test
async def test_a_new_dialog_reaches_every_member_live_and_then_carries_messages(
    alice: Client, bob: Client, carol: Client
) -> None:
    alice_ws, carol_ws, bob_ws = await alice.websocket(), await carol.websocket(), await bob.websocket()
    status, created = await alice.call("POST", "/api/dialogs", {"title": "Fresh", "memberIds": [carol.user_id]})
    assert status == 201
    for sock in (alice_ws, carol_ws):
        update = await sock.next_of("dialog:update")
        assert update["data"] == created["data"] and update["cursor"]
    dialog_id = created["data"]["dialogId"]
    sent = await alice.post_message(dialog_id, "first words")
    # Carol joined nothing: delivery is per user, and the dialog born after she connected is hers too.
    assert (await carol_ws.next_of("message:new"))["data"] == sent
    await bob_ws.nothing_within(0.3)


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("path", ["/api/poll?cursor={cursor}&timeout=0", "/api/events?cursor={cursor}"])
async def test_a_request_whose_client_leaves_before_its_body_is_no_longer_in_flight(
    bob: Client, ctx: AppContext, path: str
) -> None:
    # Headers that promise a body, then the end of the connection: the handler is started and never finished.
    url = urlparse(bob.base_url)
    target = path.format(cursor=ctx.broadcaster.cursor())
    for _ in range(20):
        _, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bob.token}\r\nContent-Length: 2\r\n\r\n"
            .encode()
        )
        await eventually(lambda: len(ctx.requests) == 1)
        writer.close()
        await eventually(lambda: not ctx.requests)
    gc.collect()
    assert not ctx.requests and not ctx.connections
    # Shutdown has nothing to wait for.
    loop = asyncio.get_running_loop()
    assert await run.finish_in_flight(ctx, loop.time() + 1)
