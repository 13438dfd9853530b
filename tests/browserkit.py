"""What the browser tests (and docs/screenshot.png) need: a real server process, Debian's Chromium, a logged-in page.

Synchronous on purpose: Playwright's sync API drives the browser from plain pytest tests, and the server runs
as a `python run.py --demo` subprocess that a test can kill and start again on the same port and database.
Every wait is bounded.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, BrowserContext, Page, Playwright, expect

ROOT = Path(__file__).resolve().parent.parent
ALICE_PHONE, BOB_PHONE, DEMO_PASSWORD = "79111111111", "79777777777", "demo"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT = 15.0


def chromium_path() -> str | None:
    """Debian's Chromium (the `chromium` package); Playwright's own browser download is never used."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def launch_chromium(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`python run.py --demo` on a fixed port and database, restartable; its stderr goes to `log_path`. `env`:
    settings of its own (`CHATSERVER_*`)."""

    def __init__(self, state_dir: Path, env: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.env = env or {}
        self.db = state_dir / "chat.db"
        self.log_path = state_dir / "server.log"
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATSERVER_", "NOTIFY_SOCKET", "LISTEN_"))}
        env["CHATSERVER_STATE_DIR"] = str(self.state_dir)
        env.update(self.env)
        argv = [sys.executable, str(ROOT / "run.py"), "--demo", "--port", str(self.port), "--db", str(self.db)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)  # polling for readiness, bounded by the deadline
        self.stop()
        raise AssertionError(f"the server did not answer /healthz within {START_TIMEOUT}s:\n{self.log()}")

    def stop(self) -> None:
        """Kill the process (SIGKILL: a crash, not a clean shutdown) and wait for it to be gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            headers = {"Content-Type": "application/json"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            conn.request(method, path, None if body is None else json.dumps(body), headers)
            response = conn.getresponse()
            raw = response.read()
            kind = response.getheader("Content-Type", "")
            payload = json.loads(raw) if raw and kind.startswith("application/json") else raw
            return response.status, payload, {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        status, payload, _ = self.request(method, path, body, token)
        assert 200 <= status < 300, (status, payload)
        return payload["data"] if isinstance(payload, dict) else None

    def login(self, phone: str) -> dict[str, Any]:
        return dict(self.api("POST", "/api/auth/login", {"phone": phone, "password": DEMO_PASSWORD}))


class ChatPage:
    """One user's tab: a browser context of its own, logged in through the login form."""

    def __init__(self, context: BrowserContext, base_url: str) -> None:
        self.context = context
        self.page: Page = context.new_page()
        self.console: list[str] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("dialog", self._on_dialog)
        self.page.goto(base_url + "/")

    def _on_dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def login(self, phone: str, password: str = DEMO_PASSWORD) -> ChatPage:
        self.page.fill("#login-phone", phone)
        self.page.fill("#login-password", password)
        self.page.click("#login-submit")
        expect(self.page.locator("#chat-view")).to_be_visible(timeout=5000)
        return self

    def dialog_row(self, title: str) -> Any:
        return self.page.locator("#dialogs .dialog", has=self.page.locator(".dialog-name", has_text=title))

    def open_dialog(self, title: str) -> None:
        self.dialog_row(title).click()
        expect(self.page.locator("#dialog-title")).to_have_text(title, timeout=5000)
        expect(self.page.locator("#history-status")).not_to_have_text("Loading…", timeout=5000)

    def send(self, text: str) -> None:
        self.page.fill("#composer-input", text)
        self.page.press("#composer-input", "Enter")

    def messages_with(self, text: str) -> Any:
        """Message nodes whose text is exactly `text`."""
        return self.page.locator("#messages .message .text", has_text=re.compile(f"^{re.escape(text)}$"))

    def message_node(self, text: str) -> Any:
        """The message (<li>) whose text is exactly `text`."""
        exact = self.page.locator(".text", has_text=re.compile(f"^{re.escape(text)}$"))
        return self.page.locator("#messages .message").filter(has=exact)

    def message_texts(self) -> list[str]:
        return list(self.page.locator("#messages .message .text").all_text_contents())

    def connection(self) -> Any:
        return self.page.locator("#connection")

    def csp_violations(self) -> list[str]:
        return [line for line in self.console if "Content Security Policy" in line]
