"""The web client in real Chromium (Debian's, through Playwright) against a real `python run.py --demo` process.

One browser and one server per module; each test opens its own browser contexts (separate sessions, as two
people on two machines) and uses texts of its own, so that the tests do not see each other's messages. The
server is killed and started again by the restart test, on the same port and database, as a deploy would.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, WebSocketRoute, expect, sync_playwright

from tests.browserkit import ALICE_PHONE, BOB_PHONE, ChatPage, ServerProcess, chromium_path, launch_chromium
from tests.conftest import require_service

XSS = "<img src=x onerror=alert(1)>"
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
    process = ServerProcess(Path(tmp_path_factory.mktemp("browser-server")))
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def open_page(browser: Browser, server: ServerProcess) -> Iterator[OpenPage]:
    """Opens logged-in pages; at the end checks that none of them broke the CSP, threw, or showed a dialog."""
    pages: list[ChatPage] = []

    def open_(phone: str, *, block_websocket: list[str] | None = None) -> ChatPage:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        if block_websocket is not None:
            # The corporate proxy: the upgrade never reaches the server; the page sees its socket close at once.
            def refuse(ws: WebSocketRoute) -> None:
                block_websocket.append(ws.url)
                ws.close()

            context.route_web_socket(re.compile(r"/ws(\?|$)"), refuse)
        page = ChatPage(context, server.base_url).login(phone)
        pages.append(page)
        return page

    yield open_
    for page in pages:
        page.context.close()
    for page in pages:
        assert not page.errors, page.errors
        assert not page.dialogs, page.dialogs
        assert not page.csp_violations(), page.csp_violations()


def unique(label: str) -> str:
    return f"{label} {secrets.token_hex(3)}"


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


def test_blocked_websocket_falls_back_to_long_poll(open_page: OpenPage, server: ServerProcess) -> None:
    attempts: list[str] = []
    upgrades_before = server.log().count("GET /ws")
    alice = open_page(ALICE_PHONE, block_websocket=attempts)
    alice.open_dialog("Demo")
    expect(alice.connection()).to_have_attribute("data-state", "long-poll", timeout=5000)
    expect(alice.page.locator("#connection-label")).to_have_text("Long-poll")

    # It keeps trying WebSocket in the background (and the proxy keeps refusing it).
    deadline = time.monotonic() + 10
    while len(attempts) < 2 and time.monotonic() < deadline:
        alice.page.wait_for_timeout(100)
    assert len(attempts) >= 2, attempts

    bob = server.login(BOB_PHONE)
    dialog_id = next(
        d["dialogId"] for d in server.api("GET", "/api/dialogs", token=bob["token"]) if d["title"] == "Demo"
    )
    server.api("POST", f"/api/dialogs/{dialog_id}/typing", {"typing": True}, token=bob["token"])
    expect(alice.page.locator("#typing")).to_have_text("typing…", timeout=2000)

    incoming = unique("through the proxy")
    server.api("POST", f"/api/messages/dialog/{dialog_id}", {"content": incoming}, token=bob["token"])
    expect(alice.messages_with(incoming)).to_have_count(1, timeout=2000)

    outgoing = unique("and back")
    alice.send(outgoing)
    expect(alice.page.locator("#messages .message.pending")).to_have_count(0, timeout=3000)
    expect(alice.messages_with(outgoing)).to_have_count(1)
    seen_by_bob = server.api("GET", f"/api/messages/dialog/{dialog_id}?limit=5", token=bob["token"])
    assert [m["content"] for m in seen_by_bob].count(outgoing) == 1

    expect(alice.connection()).to_have_attribute("data-state", "long-poll")
    assert server.log().count("GET /ws") == upgrades_before, "a WebSocket upgrade reached the server"


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
        assert any("reset the event stream (restarted)" in line for line in page.console), page.console
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

    bob_page.open_dialog(title)
    expect(row.locator(".unread")).to_be_hidden(timeout=2000)
    views = server.api("GET", "/api/dialogs", token=bob["token"])
    assert next(v for v in views if v["dialogId"] == team["dialogId"])["unreadCount"] == 0


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
