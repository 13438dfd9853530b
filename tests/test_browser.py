"""The web client in real Chromium (Debian's, through Playwright) against a real `python run.py --demo` process.

One browser and one server per module; each test opens its own browser contexts (separate sessions, as two
people on two machines) and uses texts of its own, so that the tests do not see each other's messages. The
server is killed and started again by the restart test, on the same port and database, as a deploy would.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Route, WebSocketRoute, expect, sync_playwright

from tests.browserkit import (
    ACK_SPY,
    ALICE_PHONE,
    BOB_PHONE,
    SET_VISIBILITY,
    ChatPage,
    ServerProcess,
    ack_gaps,
    chromium_path,
    demo_dialog,
    exchange_typing_and_messages,
    fill_dialog,
    launch_chromium,
    unique,
    wait_until,
)
from tests.conftest import require_service

XSS = "<img src=x onerror=alert(1)>"
ALICE_NAME, BOB_NAME = "Александр Петров", "Мария Иванова"  # the demo users of run.py --demo
OpenPage = Callable[..., ChatPage]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    require_service("Debian's chromium", chromium_path() is not None)
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # No message rate: the archive test posts 120 messages as fast as it can (the page against the limit is the
    # last test here, on a server of its own).
    process = ServerProcess(Path(tmp_path_factory.mktemp("browser-server")), {"CHATSERVER_MESSAGE_RATE": "0"})
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def open_page(browser: Browser, server: ServerProcess) -> Iterator[OpenPage]:
    """Opens logged-in pages; at the end checks that none of them broke the CSP, threw, showed a dialog, or put
    its token in a URL it requested or on the console."""
    pages: list[ChatPage] = []

    def open_(
        phone: str,
        *,
        block_websocket: list[str] | None = None,
        block_sse: list[str] | None = None,
        init_script: str = "",
        permissions: tuple[str, ...] = (),
    ) -> ChatPage:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        if init_script:
            context.add_init_script(init_script)
        if permissions:
            context.grant_permissions(list(permissions), origin=server.base_url)
        if block_websocket is not None:
            # The corporate proxy: the upgrade never reaches the server; the page sees its socket close at once.
            def refuse(ws: WebSocketRoute) -> None:
                block_websocket.append(ws.url)
                ws.close()

            context.route_web_socket(re.compile(r"/ws(\?|$)"), refuse)
        if block_sse is not None:
            # A stricter proxy: streamed responses do not get through either; the EventSource fails at once.
            def drop(route: Route) -> None:
                block_sse.append(route.request.url)
                route.abort()

            context.route(re.compile(r"/api/events(\?|$)"), drop)
        page = ChatPage(context, server.base_url).login(phone)
        pages.append(page)
        return page

    yield open_
    for page in pages:
        page.context.close()
    for page in pages:
        assert page.urls, "no request was recorded"
        assert not page.leaks(), page.leaks()  # the token is in no URL (tickets are) and not on the console
        assert not page.errors, page.errors
        assert not page.dialogs, page.dialogs
        assert not page.csp_violations(), page.csp_violations()


def test_receiver_sees_message_without_reload_and_sender_sees_it_once(open_page: OpenPage) -> None:
    alice, bob = open_page(ALICE_PHONE), open_page(BOB_PHONE)
    for page in (alice, bob):
        page.open_dialog("Demo")
        expect(page.connection()).to_have_attribute("data-state", "websocket", timeout=5000)

    alice.page.fill("#composer-input", "typing…")
    alice.page.type("#composer-input", "!")
    expect(bob.page.locator("#typing")).to_have_text("typing…", timeout=2000)

    text = unique("hello Maria")
    alice.send(text)
    expect(bob.messages_with(text)).to_have_count(1, timeout=1000)
    expect(bob.page.locator("#typing")).to_have_text("", timeout=2000)
    expect(alice.messages_with(text)).to_have_count(1)
    expect(alice.page.locator("#messages .message.pending")).to_have_count(0, timeout=2000)
    # Confirmed by the POST answer or the event, whichever came first; the other one changed nothing.
    alice.page.wait_for_timeout(300)
    expect(alice.messages_with(text)).to_have_count(1)
    expect(bob.messages_with(text)).to_have_count(1)


def test_blocked_websocket_and_sse_fall_back_to_long_poll(open_page: OpenPage, server: ServerProcess) -> None:
    bob = open_page(BOB_PHONE)
    bob.open_dialog("Demo")
    expect(bob.connection()).to_have_attribute("data-state", "websocket", timeout=5000)
    upgrades_before = server.log().count("GET /ws")

    attempts: list[str] = []
    streams: list[str] = []
    alice = open_page(ALICE_PHONE, block_websocket=attempts, block_sse=streams)
    alice.open_dialog("Demo")
    expect(alice.connection()).to_have_attribute("data-state", "long-poll", timeout=5000)
    assert streams, "the page went to long-poll without trying SSE first"
    expect(alice.page.locator("#connection-label")).to_have_text("Long-poll")
    # WebSocket failed where plain HTTP gets through: the page says so, and does not try it again for a long while.
    expect(alice.connection()).to_have_attribute("title", re.compile("WebSocket is blocked on this network"))

    # Typing both ways (over REST from the long-poll page, to it through its poll's `typing=`), then messages.
    exchange_typing_and_messages(alice, bob)

    expect(alice.connection()).to_have_attribute("data-state", "long-poll")
    assert server.log().count("GET /ws") == upgrades_before, (
        "a WebSocket upgrade of the blocked page reached the server"
    )
    assert len(attempts) == 1, attempts


def test_blocked_websocket_falls_back_to_sse(open_page: OpenPage, server: ServerProcess) -> None:
    bob = open_page(BOB_PHONE)
    bob.open_dialog("Demo")
    expect(bob.connection()).to_have_attribute("data-state", "websocket", timeout=5000)
    polls_before = server.log().count("GET /api/poll?cursor")

    attempts: list[str] = []
    alice = open_page(ALICE_PHONE, block_websocket=attempts)
    alice.open_dialog("Demo")
    expect(alice.connection()).to_have_attribute("data-state", "sse", timeout=5000)
    expect(alice.page.locator("#connection-label")).to_have_text("SSE")
    expect(alice.connection()).to_have_attribute("title", re.compile("WebSocket is blocked on this network"))

    # Typing both ways (over REST from the SSE page, to it through its stream's `typing=`), then messages.
    exchange_typing_and_messages(alice, bob)

    expect(alice.connection()).to_have_attribute("data-state", "sse")
    assert len(attempts) == 1, attempts  # not tried again while the network is known to refuse it
    # The SSE page never polled with a cursor (its one handshake poll has none).
    assert server.log().count("GET /api/poll?cursor") == polls_before, "the SSE page long-polled"


def test_sse_survives_reopening_and_hands_over_to_websocket_without_loss(
    browser: Browser, server: ServerProcess
) -> None:
    """The library alone: WebSocket refused, so SSE carries the stream; the stream is reopened on every quiet
    spell (`sseSilence`) and when the open dialog changes; WebSocket takes over once it works. Every event
    arrives once, in order, across all of it."""
    refusing = [True]
    streams: list[str] = []

    def through_proxy(ws: WebSocketRoute) -> None:
        if refusing[0]:
            ws.close()
        else:
            ws.connect_to_server()

    context = browser.new_context()
    try:
        context.route_web_socket(re.compile(r"/ws(\?|$)"), through_proxy)
        page = context.new_page()
        page.on("request", lambda request: "/api/events" in request.url and streams.append(request.url))
        page.goto(server.base_url + "/")
        alice, bob = server.login(ALICE_PHONE), server.login(BOB_PHONE)
        dialog_id = demo_dialog(server, bob["token"])
        page.evaluate(
            """async ({ token, userId }) => {
                const { ChatClient } = await import("/static/chatclient.js");
                const client = new ChatClient({ token, userId, sseSilence: 400, connectTimeout: 2000,
                                                backoffBase: 300, backoffCap: 1500, webSocketRetry: 1500 });
                window.received = [];
                client.on("message:new", (message) => window.received.push(message.content));
                window.client = client;
                await client.start();
            }""",
            {"token": alice["token"], "userId": alice["user"]["userId"]},
        )
        page.wait_for_function("() => window.client.state === 'sse'", timeout=5000)

        def post(text: str) -> str:
            server.api("POST", f"/api/messages/dialog/{dialog_id}", {"content": text}, bob["token"])
            return text

        sent = [post(unique("over SSE"))]
        page.wait_for_function("() => window.received.length === 1", timeout=3000)
        opened = len(streams)
        wait_until(page, lambda: len(streams) >= opened + 2, 5)  # quiet: reopened from the cursor, twice
        sent.append(post(unique("after the stream was reopened")))
        page.wait_for_function("() => window.received.length === 2", timeout=3000)

        page.evaluate("(dialogId) => window.client.setOpenDialog(dialogId)", dialog_id)
        wait_until(page, lambda: any(f"typing={dialog_id}" in url for url in streams), 3)
        page.wait_for_function("() => window.client.state === 'sse'", timeout=3000)
        server.api("POST", f"/api/dialogs/{dialog_id}/typing", {"typing": True}, bob["token"])
        page.wait_for_function(f"() => window.client.typingIn('{dialog_id}').length === 1", timeout=3000)
        sent.append(post(unique("with the dialog open")))
        page.wait_for_function("() => window.received.length === 3", timeout=3000)

        refusing[0] = False
        page.wait_for_function("() => window.client.state === 'websocket'", timeout=10000)
        sent.append(post(unique("over WebSocket")))
        page.wait_for_function("() => window.received.length === 4", timeout=3000)
        page.wait_for_timeout(300)
        assert page.evaluate("window.received") == sent
        assert page.evaluate("window.client.transport") == "websocket"
    finally:
        context.close()


def test_silent_websocket_is_dropped_for_long_poll_and_taken_back_without_loss(
    browser: Browser, server: ServerProcess
) -> None:
    """The library alone, with short heartbeats: a socket that stops carrying frames is given up for long-poll,
    WebSocket is taken back once it works, and every event arrives once, in order, across the switches."""
    silent = [False]
    upgrades: list[str] = []

    def through_flaky_proxy(ws: WebSocketRoute) -> None:
        upgrades.append(ws.url)
        upstream = ws.connect_to_server()
        ws.on_message(lambda message: None if silent[0] else upstream.send(message))
        upstream.on_message(lambda message: None if silent[0] else ws.send(message))

    context = browser.new_context()
    try:
        context.route_web_socket(re.compile(r"/ws(\?|$)"), through_flaky_proxy)
        page = context.new_page()
        page.goto(server.base_url + "/")
        alice, bob = server.login(ALICE_PHONE), server.login(BOB_PHONE)
        page.evaluate(
            """async ({ token, userId }) => {
                const { ChatClient } = await import("/static/chatclient.js");
                const client = new ChatClient({ token, userId, heartbeatInterval: 300, heartbeatTimeout: 300,
                                                connectTimeout: 600, backoffBase: 200, backoffCap: 1000,
                                                webSocketRetry: 1000,
                                                transports: ["websocket", "longpoll"] });
                window.received = [];
                client.on("message:new", (message) => window.received.push(message.content));
                window.client = client;
                await client.start();
            }""",
            {"token": alice["token"], "userId": alice["user"]["userId"]},
        )
        page.wait_for_function("() => window.client.state === 'websocket'", timeout=5000)
        dialog_id = demo_dialog(server, bob["token"])

        def post(text: str) -> str:
            server.api("POST", f"/api/messages/dialog/{dialog_id}", {"content": text}, bob["token"])
            return text

        silent[0] = True
        sent = [post(unique("while the socket is silent"))]
        page.wait_for_function("() => window.client.state === 'long-poll'", timeout=5000)
        page.wait_for_function("() => window.received.length === 1", timeout=3000)
        sent.append(post(unique("over long-poll")))
        page.wait_for_function("() => window.received.length === 2", timeout=3000)
        # Background attempts go on, and fail: the proxy still swallows their frames.
        tried = len(upgrades)
        wait_until(page, lambda: len(upgrades) > tried, 10)
        assert page.evaluate("window.client.state") == "long-poll"

        silent[0] = False
        page.wait_for_function("() => window.client.state === 'websocket'", timeout=15000)
        sent.append(post(unique("over WebSocket again")))
        page.wait_for_function("() => window.received.length === 3", timeout=3000)

        # And the socket taken back is watched like the first one: silent again, long-poll again.
        silent[0] = True
        sent.append(post(unique("silent once more")))
        page.wait_for_function("() => window.client.state === 'long-poll'", timeout=5000)
        page.wait_for_function("() => window.received.length === 4", timeout=3000)
        page.wait_for_timeout(300)
        assert page.evaluate("window.received") == sent
    finally:
        context.close()


def test_a_buffered_sse_stream_means_long_poll(browser: Browser, server: ServerProcess) -> None:
    """A proxy that holds a streamed response back until it ends: no `ready` arrives within `connectTimeout`, so
    the library polls instead (and WebSocket, refused, is still tried in the background)."""
    held: list[Route] = []
    upgrades: list[str] = []

    def refuse(ws: WebSocketRoute) -> None:
        upgrades.append(ws.url)
        ws.close()

    context = browser.new_context()
    try:
        context.route_web_socket(re.compile(r"/ws(\?|$)"), refuse)
        context.route(re.compile(r"/api/events(\?|$)"), lambda route: held.append(route))  # never answered
        page = context.new_page()
        page.goto(server.base_url + "/")
        alice, bob = server.login(ALICE_PHONE), server.login(BOB_PHONE)
        page.evaluate(
            """async ({ token, userId }) => {
                const { ChatClient } = await import("/static/chatclient.js");
                const client = new ChatClient({ token, userId, connectTimeout: 800, backoffBase: 200,
                                                backoffCap: 1000, webSocketRetry: 1000 });
                window.received = [];
                window.states = [];
                client.on("state", ({ state }) => window.states.push(state));
                client.on("message:new", (message) => window.received.push(message.content));
                window.client = client;
                await client.start();
            }""",
            {"token": alice["token"], "userId": alice["user"]["userId"]},
        )
        page.wait_for_function("() => window.client.state === 'long-poll'", timeout=5000)
        assert len(held) == 1 and "sse" not in page.evaluate("window.states")
        text = unique("past the buffering proxy")
        dialog_id = demo_dialog(server, bob["token"])
        server.api("POST", f"/api/messages/dialog/{dialog_id}", {"content": text}, bob["token"])
        page.wait_for_function("() => window.received.length === 1", timeout=3000)
        assert page.evaluate("window.received") == [text]
        wait_until(page, lambda: len(upgrades) >= 2, 5)
        assert page.evaluate("window.client.transport") == "longpoll"
    finally:
        context.close()


def test_sse_comes_back_after_an_outage_that_sent_it_to_long_poll(browser: Browser, server: ServerProcess) -> None:
    """`transports: ["sse", "longpoll"]` (no WebSocket at all): the server goes out of reach, so the stream fails
    (found by reopening it after a quiet spell) and so do the polls; once polls get through again, SSE is given
    another chance and carries on, nothing lost."""
    outage = [False]
    sockets: list[str] = []

    def gate(route: Route) -> None:
        if outage[0]:
            route.abort()
        else:
            route.continue_()

    context = browser.new_context()
    try:
        context.route(re.compile(r"/api/(events|poll)(\?|$)"), gate)
        page = context.new_page()
        page.on("websocket", lambda ws: sockets.append(ws.url))
        page.goto(server.base_url + "/")
        alice, bob = server.login(ALICE_PHONE), server.login(BOB_PHONE)
        dialog_id = demo_dialog(server, bob["token"])
        page.evaluate(
            """async ({ token, userId }) => {
                const { ChatClient } = await import("/static/chatclient.js");
                const client = new ChatClient({ token, userId, transports: ["sse", "longpoll"],
                                                sseSilence: 500, backoffBase: 200, backoffCap: 1000 });
                window.received = [];
                window.states = [];
                client.on("state", ({ state }) => window.states.push(state));
                client.on("message:new", (message) => window.received.push(message.content));
                window.client = client;
                await client.start();
            }""",
            {"token": alice["token"], "userId": alice["user"]["userId"]},
        )
        page.wait_for_function("() => window.client.state === 'sse'", timeout=5000)

        def post(text: str) -> str:
            server.api("POST", f"/api/messages/dialog/{dialog_id}", {"content": text}, bob["token"])
            return text

        outage[0] = True
        page.evaluate("() => { window.states = []; }")
        page.wait_for_function("() => window.client.state === 'offline'", timeout=5000)
        sent = [post(unique("during the outage"))]
        outage[0] = False
        page.wait_for_function("() => window.received.length === 1", timeout=5000)
        page.wait_for_function("() => window.client.state === 'sse'", timeout=5000)
        assert "long-poll" in page.evaluate("window.states"), page.evaluate("window.states")
        sent.append(post(unique("over SSE again")))
        page.wait_for_function("() => window.received.length === 2", timeout=3000)
        page.wait_for_timeout(300)
        assert page.evaluate("window.received") == sent
        assert page.evaluate("window.client.transport") == "sse"
        assert not sockets, sockets
    finally:
        context.close()


def test_sender_edits_own_message_and_receiver_sees_the_edit(open_page: OpenPage) -> None:
    alice, bob = open_page(ALICE_PHONE), open_page(BOB_PHONE)
    for page in (alice, bob):
        page.open_dialog("Demo")
    text, edited = unique("a typo"), unique("no typo")
    alice.send(text)
    expect(bob.messages_with(text)).to_have_count(1, timeout=2000)
    mine = alice.message_node(text)
    expect(mine).not_to_have_class(re.compile("pending"), timeout=2000)
    mine.hover()
    mine.locator(".edit-button").click()
    expect(alice.page.locator("#edit-banner")).to_be_visible()
    alice.send(edited)
    expect(bob.messages_with(edited)).to_have_count(1, timeout=2000)
    expect(bob.messages_with(text)).to_have_count(0)
    theirs = bob.message_node(edited)
    expect(theirs.locator(".edited")).to_be_visible()
    expect(alice.messages_with(edited)).to_have_count(1)
    expect(bob.page.locator("#messages .message.mine .edit-button")).to_have_count(
        bob.page.locator("#messages .message.mine").count()
    )


def pair_with(server: ServerProcess, creator: ChatPage, *others: str) -> str:
    """A dialog of the creator's page with these users (ids), made over REST; the page lists it. Its title."""
    title = unique("Receipts")
    server.api("POST", "/api/dialogs", {"title": title, "memberIds": list(others)}, creator.token)
    expect(creator.dialog_row(title)).to_have_count(1, timeout=3000)
    return title


def test_the_sender_sees_sent_then_delivered_then_read_in_a_dialog_of_two(
    open_page: OpenPage, server: ServerProcess
) -> None:
    alice = open_page(ALICE_PHONE)
    title = pair_with(server, alice, server.login(BOB_PHONE)["user"]["userId"])
    alice.open_dialog(title)
    first = unique("while Bob is away")
    alice.send(first)
    status = alice.message_node(first).locator(".status")
    expect(status).to_have_text("Sent", timeout=3000)
    alice.page.wait_for_timeout(1500)  # receipts are written within about a second: none, for nobody has it
    expect(status).to_have_text("Sent")

    # Bob comes online: his stream starts from a position after the message, which acknowledges it.
    bob = open_page(BOB_PHONE, init_script=ACK_SPY)
    expect(status).to_have_text("Delivered", timeout=5000)
    # A message that reaches his page while he looks at another dialog: his page acknowledges it on its socket.
    second = unique("while Bob looks elsewhere")
    alice.send(second)
    expect(bob.dialog_row(title).locator(".preview")).to_have_text(second, timeout=3000)
    expect(alice.message_node(second).locator(".status")).to_have_text("Delivered", timeout=5000)
    assert {ack["via"] for ack in bob.page.evaluate("window.__acks")} == {"websocket"}
    expect(status).to_have_attribute("data-receipt", "delivered")

    bob.open_dialog(title)
    for text in (first, second):
        expect(alice.message_node(text).locator(".status")).to_have_text("Read", timeout=5000)
    expect(status).to_have_attribute("data-receipt", "read")
    expect(bob.message_node(first).locator(".status")).to_have_text("")  # others' messages carry no status
    # And the other way: Alice has the dialog open, so Bob's reply is read at once.
    reply = unique("seen it")
    bob.send(reply)
    expect(bob.message_node(reply).locator(".status")).to_have_text("Read", timeout=5000)


def test_a_dialog_of_three_tells_how_many_have_read_a_message(open_page: OpenPage, server: ServerProcess) -> None:
    carol = server.add_user("Carol")
    alice = open_page(ALICE_PHONE)
    title = pair_with(server, alice, server.login(BOB_PHONE)["user"]["userId"], carol["userId"])
    alice.open_dialog(title)
    text = unique("to both")
    alice.send(text)
    status = alice.message_node(text).locator(".status")
    expect(status).to_have_text("Sent", timeout=3000)

    bob = open_page(BOB_PHONE)
    bob.open_dialog(title)
    expect(status).to_have_text("Read by 1 of 2", timeout=5000)
    carol_page = open_page(carol["phone"])
    expect(carol_page.dialog_row(title)).to_have_count(1, timeout=3000)
    alice.page.wait_for_timeout(1500)  # Carol has it now, unread: still one reader
    expect(status).to_have_text("Read by 1 of 2")
    carol_page.open_dialog(title)
    expect(status).to_have_text("Read by 2 of 2", timeout=5000)
    expect(status).to_have_attribute("data-receipt", "read")


def test_a_page_acknowledges_at_most_once_a_second_while_messages_arrive(
    open_page: OpenPage, server: ServerProcess
) -> None:
    bob = open_page(BOB_PHONE, init_script=ACK_SPY)
    expect(bob.connection()).to_have_attribute("data-state", "websocket", timeout=5000)
    alice = server.login(ALICE_PHONE)
    dialog_id = demo_dialog(server, alice["token"])
    started = time.monotonic()
    sent = []
    for n in range(24):  # eight a second for three seconds
        sent.append(server.api("POST", f"/api/messages/dialog/{dialog_id}", {"content": unique(f"burst {n}")},
                               alice["token"]))
        bob.page.wait_for_timeout(125)

    def bob_has_the_last() -> bool:
        receipts = server.api("GET", f"/api/dialogs/{dialog_id}", token=alice["token"])["receipts"]
        return any(r["deliveredMessageId"] == sent[-1]["messageId"] for r in receipts)

    wait_until(bob.page, bob_has_the_last, 5)
    acks = bob.page.evaluate("window.__acks")
    assert {ack["via"] for ack in acks} == {"websocket"}, acks
    # Acknowledged while the messages came (not once at the end), never two within a second (timer granularity).
    assert 3 <= len(acks) <= time.monotonic() - started + 2, acks  # one a second, and one more after
    assert min(ack_gaps(bob.page)) >= 995, acks


def test_older_pages_load_on_scroll_up_and_nothing_is_rebuilt(open_page: OpenPage, server: ServerProcess) -> None:
    alice = server.login(ALICE_PHONE)
    bob = server.login(BOB_PHONE)
    title = unique("Archive")
    dialog = server.api("POST", "/api/dialogs", {"title": title, "memberIds": [bob["user"]["userId"]]}, alice["token"])
    texts = [f"{title} #{n:03d}" for n in range(120)]
    for text in texts:
        server.api("POST", f"/api/messages/dialog/{dialog['dialogId']}", {"content": text}, alice["token"])

    page = open_page(BOB_PHONE)
    page.open_dialog(title)
    nodes = page.page.locator("#messages .message")
    expect(nodes).to_have_count(50)
    assert page.message_texts() == texts[-50:]
    # Mark the newest node: if anything re-rendered the list, the mark would be gone.
    page.page.locator("#messages .message").last.evaluate("node => { node.marked = true; }")
    scroller = page.page.locator("#message-scroll")
    for shown in (100, 120):
        scroller.evaluate("node => { node.scrollTop = 0; }")
        expect(nodes).to_have_count(shown, timeout=3000)
    expect(page.page.locator("#history-status")).to_have_text("This is the beginning of the conversation.")
    assert page.message_texts() == texts

    latest = unique("one more")
    server.api("POST", f"/api/messages/dialog/{dialog['dialogId']}", {"content": latest}, alice["token"])
    expect(page.messages_with(latest)).to_have_count(1, timeout=2000)
    assert page.message_texts() == [*texts, latest]
    marked = page.page.locator("#messages .message").nth(119)
    assert marked.evaluate("node => node.marked === true")


def test_page_offline_shows_it_queues_sends_and_catches_up_when_back(open_page: OpenPage) -> None:
    alice, bob = open_page(ALICE_PHONE), open_page(BOB_PHONE)
    for page in (alice, bob):
        page.open_dialog("Demo")
        expect(page.connection()).to_have_attribute("data-state", "websocket", timeout=5000)

    alice.context.set_offline(True)
    expect(alice.connection()).to_have_attribute("data-state", "offline", timeout=2000)
    expect(alice.page.locator("#connection-label")).to_have_text("Offline")
    written, missed = unique("written offline"), unique("sent while Alice was offline")
    alice.send(written)
    expect(alice.message_node(written)).to_have_class(re.compile("pending"))
    bob.send(missed)
    expect(bob.messages_with(missed)).to_have_count(1, timeout=2000)

    alice.context.set_offline(False)
    expect(alice.connection()).to_have_attribute("data-state", "websocket", timeout=5000)
    expect(alice.messages_with(missed)).to_have_count(1, timeout=2000)
    expect(bob.messages_with(written)).to_have_count(1, timeout=2000)
    expect(alice.message_node(written)).not_to_have_class(re.compile("pending"), timeout=2000)
    for page in (alice, bob):
        for text in (written, missed):
            expect(page.messages_with(text)).to_have_count(1)


def test_pages_recover_from_server_restart_without_reload(open_page: OpenPage, server: ServerProcess) -> None:
    alice, bob = open_page(ALICE_PHONE), open_page(BOB_PHONE)
    for page in (alice, bob):
        page.open_dialog("Demo")
        expect(page.connection()).to_have_attribute("data-state", "websocket", timeout=5000)
        page.page.evaluate("window.__notReloaded = true")
    before = unique("before the restart")
    alice.send(before)
    expect(bob.messages_with(before)).to_have_count(1, timeout=2000)
    shown = {id(page): len(page.message_texts()) for page in (alice, bob)}

    server.stop()
    expect(alice.connection()).not_to_have_attribute("data-state", "websocket", timeout=5000)
    during = unique("sent while the server is down")
    alice.send(during)
    expect(alice.page.locator("#messages .message.pending")).to_have_count(1)
    server.start()

    expect(bob.messages_with(during)).to_have_count(1, timeout=15000)
    expect(alice.page.locator("#messages .message.pending")).to_have_count(0, timeout=15000)
    after = unique("after the restart")
    bob.send(after)
    expect(alice.messages_with(after)).to_have_count(1, timeout=5000)

    for page in (alice, bob):
        for text in (before, during, after):
            expect(page.messages_with(text)).to_have_count(1)
        assert len(page.message_texts()) == shown[id(page)] + 2, page.message_texts()
        assert page.page.evaluate("window.__notReloaded") is True
        # The log is in the database: the pages resumed from their cursors, with no reset to reload for.
        assert not any("reset the event stream" in line for line in page.console), page.console
        # And back to WebSocket once the server takes upgrades again.
        expect(page.connection()).to_have_attribute("data-state", "websocket", timeout=20000)


def test_dialog_that_is_not_open_gets_unread_count_and_preview_live(open_page: OpenPage, server: ServerProcess) -> None:
    bob_page = open_page(BOB_PHONE)
    bob_page.open_dialog("Demo")
    alice = server.login(ALICE_PHONE)
    bob = server.login(BOB_PHONE)
    title = unique("Team")
    team = server.api("POST", "/api/dialogs", {"title": title, "memberIds": [bob["user"]["userId"]]}, alice["token"])
    row = bob_page.dialog_row(title)
    expect(row).to_have_count(1, timeout=2000)  # a new dialog arrives as dialog:update

    for n, text in enumerate((unique("first"), unique("second")), start=1):
        server.api("POST", f"/api/messages/dialog/{team['dialogId']}", {"content": text}, alice["token"])
        expect(row.locator(".unread")).to_have_text(str(n), timeout=2000)
        expect(row.locator(".preview")).to_have_text(text)
    expect(bob_page.page.locator("#dialogs .dialog").first).to_have_attribute("data-dialog-id", team["dialogId"])
    expect(bob_page.page.locator("#dialog-title")).to_have_text("Demo")  # the open dialog did not change

    with bob_page.page.expect_response(lambda r: r.url.endswith("/read") and r.request.method == "POST") as read:
        bob_page.open_dialog(title)
    assert read.value.status == 200
    expect(row.locator(".unread")).to_be_hidden(timeout=2000)
    views = server.api("GET", "/api/dialogs", token=bob["token"])
    assert next(v for v in views if v["dialogId"] == team["dialogId"])["unreadCount"] == 0


def test_sender_names_show_and_a_dialog_started_by_phone_reaches_the_other_user_live(
    open_page: OpenPage, server: ServerProcess
) -> None:
    name_calls = server.log().count("GET /api/users?ids=")
    alice, bob = open_page(ALICE_PHONE), open_page(BOB_PHONE)
    for page in (alice, bob):
        page.open_dialog("Demo")
    text = unique("from Maria")
    bob.send(text)
    expect(alice.message_node(text).locator(".sender")).to_have_text(BOB_NAME, timeout=2000)
    expect(bob.message_node(text).locator(".sender")).to_have_count(0)  # one's own messages carry no name

    lookups: list[str] = []
    alice.page.on("request", lambda r: "/api/users?" in r.url and lookups.append(r.url))
    alice.page.click("#new-dialog-button")
    alice.page.fill("#new-dialog-title", "Nobody's")
    alice.page.fill("#new-dialog-phones", "70000000009")
    alice.page.click("#new-dialog-submit")
    expect(alice.page.locator("#new-dialog-error")).to_contain_text("70000000009", timeout=2000)

    title = unique("Planning")
    alice.page.fill("#new-dialog-title", title)
    alice.page.fill("#new-dialog-phones", BOB_PHONE)
    alice.page.click("#new-dialog-submit")
    expect(alice.page.locator("#dialog-title")).to_have_text(title, timeout=3000)
    expect(alice.page.locator("#new-dialog-form")).to_be_hidden()
    assert any(f"phone={BOB_PHONE}" in url for url in lookups), lookups
    row = bob.dialog_row(title)
    expect(row).to_have_count(1, timeout=2000)  # live, by dialog:update
    expect(bob.page.locator("#dialog-title")).to_have_text("Demo")

    first = unique("first words in the new dialog")
    alice.send(first)
    expect(row.locator(".preview")).to_have_text(first, timeout=2000)
    expect(row.locator(".unread")).to_have_text("1")
    bob.open_dialog(title)
    expect(bob.messages_with(first)).to_have_count(1)
    expect(bob.message_node(first).locator(".sender")).to_have_text(ALICE_NAME, timeout=2000)
    bob_token = server.login(BOB_PHONE)["token"]
    dialog = next(d for d in server.api("GET", "/api/dialogs", token=bob_token) if d["title"] == title)
    assert len(dialog["memberIds"]) == 2
    # Names are asked for in one batch per page (the open dialog's members and senders), then cached.
    assert server.log().count("GET /api/users?ids=") - name_calls == 2, server.log()[-3000:]


def test_message_text_is_shown_as_text_and_runs_nothing(open_page: OpenPage) -> None:
    alice, bob = open_page(ALICE_PHONE), open_page(BOB_PHONE)
    for page in (alice, bob):
        page.open_dialog("Demo")
    alice.send(XSS)
    for page in (alice, bob):
        expect(page.messages_with(XSS)).to_have_count(1, timeout=2000)
        assert page.messages_with(XSS).text_content() == XSS
        assert page.page.locator("#messages img, #dialogs img").count() == 0
        expect(page.dialog_row("Demo").locator(".preview")).to_contain_text(XSS)
    alice.page.wait_for_timeout(300)  # an onerror handler, had one been created, fires after the image fails
    for page in (alice, bob):
        assert not page.dialogs, page.dialogs  # no alert()


def test_page_is_served_with_a_strict_content_security_policy(open_page: OpenPage, server: ServerProcess) -> None:
    for path in ("/", "/static/chatclient.js", "/static/app.js", "/static/style.css"):
        status, _, headers = server.request("GET", path)
        assert status == 200, path
        policy = dict(part.strip().split(" ", 1) for part in headers["content-security-policy"].split(";"))
        assert policy["script-src"] == "'self'", policy
        assert "'unsafe-inline'" not in headers["content-security-policy"]
        assert policy["object-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
    assert server.request("GET", "/static/chatclient.js")[2]["content-type"].startswith("text/javascript")
    _, html, _ = server.request("GET", "/")
    assert not re.search(rb"<script(?![^>]*\bsrc=)[^>]*>", html), "an inline script in index.html"
    assert b" style=" not in html and b"<style" not in html

    # The browser enforces it: a script injected into the page is refused, and says so.
    chat = open_page(ALICE_PHONE)
    chat.page.evaluate(
        """() => { const s = document.createElement("script"); s.textContent = "window.__inline = 1";
                   document.body.appendChild(s); }"""
    )
    expect(chat.page.locator("#chat-view")).to_be_visible()
    assert chat.page.evaluate("window.__inline") is None
    assert len(chat.csp_violations()) == 1, chat.console
    chat.console.clear()  # the one violation this test caused on purpose


# -- the message rate ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def throttled_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # One message at once, then one every two seconds: the second of a quick pair is refused for 2 s.
    limits = {"CHATSERVER_MESSAGE_BURST": "1", "CHATSERVER_MESSAGE_RATE": "0.5"}
    process = ServerProcess(Path(tmp_path_factory.mktemp("throttled-server")), limits)
    process.start()
    try:
        yield process
    finally:
        process.stop()


# How far apart two of Playwright's request timings may be for the same instant (wall clock against monotonic).
TIMING_SKEW_MS = 25


def test_sends_refused_for_the_rate_are_sent_again_after_retry_after_and_arrive_once_in_order(
    browser: Browser, throttled_server: ServerProcess
) -> None:
    # Sends refused with 429 stay pending and are sent again (same clientMessageId) no sooner than Retry-After.
    server = throttled_server
    alice = ChatPage(browser.new_context(), server.base_url).login(ALICE_PHONE)
    bob = ChatPage(browser.new_context(), server.base_url).login(BOB_PHONE)
    posts: list[Any] = []
    alice.page.on("requestfinished", lambda request: posts.append(request) if "/api/messages/dialog/" in request.url
                  and request.method == "POST" else None)
    try:
        for page in (alice, bob):
            page.open_dialog("Demo")
        texts = [f"quick {n} {secrets.token_hex(3)}" for n in range(3)]
        for text in texts:
            alice.send(text)
        for text in texts:
            expect(bob.messages_with(text)).to_have_count(1, timeout=15000)
        expect(alice.page.locator("#messages .message.pending")).to_have_count(0, timeout=5000)
        assert bob.message_texts()[-3:] == texts
        assert alice.message_texts()[-3:] == texts

        attempts: dict[str, list[tuple[float, float, int, int]]] = {}
        for request in posts:
            response = request.response()
            timing = request.timing
            sent_at = timing["startTime"]
            answered_at = sent_at + timing["responseEnd"]
            retry_after = int(response.headers.get("retry-after", "0"))
            key = json.loads(request.post_data)["clientMessageId"]
            attempts.setdefault(key, []).append((sent_at, answered_at, response.status, retry_after))
        statuses = [status for tries in attempts.values() for _, _, status, _ in tries]
        assert statuses.count(201) == 3 and statuses.count(429) >= 2, attempts
        for tries in attempts.values():
            tries.sort()
            for (_, answered_at, status, retry_after), (next_sent_at, *_) in itertools.pairwise(tries):
                assert status == 429 and retry_after >= 1, tries
                # Playwright's startTime is wall-clock and responseEnd a monotonic offset from it: a few ms of skew.
                assert next_sent_at - answered_at >= retry_after * 1000 - TIMING_SKEW_MS, \
                    f"sent again before Retry-After: {tries}"
        for page in (alice, bob):
            assert not page.errors and not page.dialogs and not page.csp_violations(), (page.errors, page.dialogs)
    finally:
        alice.context.close()
        bob.context.close()


def test_a_dialog_of_10000_messages_keeps_the_message_list_bounded(open_page: OpenPage, server: ServerProcess) -> None:
    alice, bob = server.login(ALICE_PHONE), server.login(BOB_PHONE)
    title = unique("Ten thousand")
    dialog = server.api("POST", "/api/dialogs", {"title": title, "memberIds": [bob["user"]["userId"]]}, alice["token"])
    texts = fill_dialog(server.db, dialog["dialogId"], alice["user"]["userId"], 10_000, title)
    page = open_page(BOB_PHONE)
    page.open_dialog(title)
    nodes = page.page.locator("#messages .message")
    expect(nodes).to_have_count(50)
    assert page.message_texts() == texts[-50:]
    scroller = page.page.locator("#message-scroll")
    first_text = page.page.locator("#messages .message .text").first
    last_text = page.page.locator("#messages .message .text").last

    def shown_is_one_stretch() -> list[str]:
        shown = page.message_texts()
        start = texts.index(shown[0])
        assert shown == texts[start:start + len(shown)], "the list has a gap or a duplicate"
        return shown

    # Up through 1,000 messages: older pages come in, the newest go out; never more than 200 nodes.
    most = 0
    for _ in range(20):
        oldest = first_text.text_content()
        scroller.evaluate("node => { node.scrollTop = 0; }")
        expect(first_text).not_to_have_text(str(oldest), timeout=3000)
        most = max(most, nodes.count())
        shown_is_one_stretch()
    assert most == 200, most
    shown = shown_is_one_stretch()
    assert texts.index(shown[0]) == 10_000 - 50 - 20 * 50
    assert page.page.evaluate("document.querySelectorAll('#messages li').length") <= 200

    # And back down: the newer pages come back in order, up to the newest; still never more than 200.
    for _ in range(40):
        if last_text.text_content() == texts[-1]:
            break
        newest = last_text.text_content()
        scroller.evaluate("node => { node.scrollTop = node.scrollHeight; }")
        expect(last_text).not_to_have_text(str(newest), timeout=3000)
        assert nodes.count() <= 200
        shown_is_one_stretch()
    assert page.message_texts()[-1] == texts[-1]

    # At the newest again, the list is live: a new message arrives at the end, and the list stays bounded.
    scroller.evaluate("node => { node.scrollTop = node.scrollHeight; }")
    latest = unique("after ten thousand")
    server.api("POST", f"/api/messages/dialog/{dialog['dialogId']}", {"content": latest}, alice["token"])
    expect(page.messages_with(latest)).to_have_count(1, timeout=3000)
    assert page.message_texts()[-1] == latest
    assert nodes.count() <= 200


NOTIFICATION_SPY = """
    // Records the notifications the page raises (headless Chromium shows none).
    window.__notifications = [];
    const Real = window.Notification;
    window.Notification = class extends Real {
        constructor(title, options) {
            super(title, options);
            window.__notifications.push({ title, body: options && options.body });
        }
    };
"""


def test_a_hidden_tab_notifies_of_new_messages_and_counts_unread_in_its_title(
    open_page: OpenPage, server: ServerProcess
) -> None:
    page = open_page(BOB_PHONE, init_script=NOTIFICATION_SPY, permissions=("notifications",))
    page.open_dialog("Demo")
    alice = server.login(ALICE_PHONE)
    dialog_id = demo_dialog(server, alice["token"])
    other = server.api("POST", "/api/dialogs", {"title": unique("Side"), "memberIds": [page.session_user()]},
                       alice["token"])
    expect(page.dialog_row(other["title"])).to_have_count(1, timeout=3000)
    # Other tests leave messages unread in other dialogs: the count starts from theirs.
    base = sum(d["unreadCount"] for d in server.api("GET", "/api/dialogs", token=page.token))

    def titled(unread: int) -> str:
        return f"({unread}) chatserver" if unread else "chatserver"

    expect(page.page).to_have_title(titled(base))

    seen = unique("while Bob looks")
    server.api("POST", f"/api/messages/dialog/{dialog_id}", {"content": seen}, alice["token"])
    expect(page.messages_with(seen)).to_have_count(1, timeout=3000)

    page.page.evaluate(SET_VISIBILITY, True)
    texts = [unique("in the open dialog"), unique("in another dialog")]
    server.api("POST", f"/api/messages/dialog/{dialog_id}", {"content": texts[0]}, alice["token"])
    expect(page.page).to_have_title(titled(base + 1), timeout=3000)
    server.api("POST", f"/api/messages/dialog/{other['dialogId']}", {"content": texts[1]}, alice["token"])
    expect(page.page).to_have_title(titled(base + 2), timeout=3000)
    page.page.wait_for_function("() => window.__notifications.length === 2", timeout=3000)
    raised = page.page.evaluate("window.__notifications")
    assert raised == [{"title": "Demo", "body": texts[0]}, {"title": other["title"], "body": texts[1]}], raised

    page.page.evaluate(SET_VISIBILITY, False)  # back: the open dialog is read, the other one still counts
    expect(page.page).to_have_title(titled(base + 1), timeout=3000)
    server.api("POST", f"/api/messages/dialog/{dialog_id}", {"content": unique("seen again")}, alice["token"])
    page.page.wait_for_timeout(500)
    assert page.page.evaluate("window.__notifications.length") == 2  # nothing raised while the tab is looked at
