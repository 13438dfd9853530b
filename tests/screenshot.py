"""Take docs/screenshot.png: the chat page in use, at 1280x800, in Debian's Chromium against a fresh demo server.

    python -m tests.screenshot [output.png]

Not a test (pytest does not collect it); it shares the browser tests' server and page helpers.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from tests.browserkit import ALICE_PHONE, BOB_PHONE, ROOT, ChatPage, ServerProcess, launch_chromium


def take(output: Path) -> None:
    with tempfile.TemporaryDirectory() as state:
        server = ServerProcess(Path(state))
        server.start()
        try:
            alice, bob = server.login(ALICE_PHONE), server.login(BOB_PHONE)
            team = server.api(
                "POST", "/api/dialogs", {"title": "Release 1.5", "memberIds": [alice["user"]["userId"]]}, bob["token"]
            )
            with sync_playwright() as playwright:
                browser = launch_chromium(playwright)
                pages = [
                    ChatPage(browser.new_context(viewport={"width": 1280, "height": 800}), server.base_url).login(phone)
                    for phone in (ALICE_PHONE, BOB_PHONE)
                ]
                for page in pages:
                    page.open_dialog("Demo")
                    expect(page.connection()).to_have_attribute("data-state", "websocket", timeout=5000)
                first, second = pages
                greeting = "Привет, Мария! The new gateway is live: messages arrive without a reload."
                first.send(greeting)
                expect(second.messages_with(greeting))
                reply = "Works here too, even behind the office proxy (it falls back to SSE or long-poll)."
                second.send(reply)
                expect(first.messages_with(reply))
                # Both have the dialog open: each sees the other has read their message.
                expect(first.message_node(greeting).locator(".status")).to_have_text("Read", timeout=5000)
                expect(second.message_node(reply).locator(".status")).to_have_text("Read", timeout=5000)
                for text in ("Build 1.5.0 is on staging.", "Can you check the release notes?"):
                    server.api("POST", f"/api/messages/dialog/{team['dialogId']}", {"content": text}, bob["token"])
                expect(first.dialog_row("Release 1.5").locator(".unread")).to_have_text("2", timeout=3000)
                second.page.fill("#composer-input", "Sure")
                expect(first.page.locator("#typing")).to_have_text("typing…", timeout=3000)
                first.page.mouse.move(0, 0)
                first.page.screenshot(path=str(output))
                browser.close()
        finally:
            server.stop()


if __name__ == "__main__":
    take(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "screenshot.png")
