"""What the browser tests (and docs/screenshot.png) need: a real server process, Debian's Chromium, a logged-in page.

Synchronous on purpose: Playwright's sync API drives the browser from plain pytest tests, and the server runs
as a `python run.py --demo` subprocess that a test can kill and start again on the same port and database.
Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

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
# page.evaluate(SET_VISIBILITY, hidden): what the browser does when the tab goes to the background or comes back
# (headless Chromium shows every page, so its visibility is set by hand).
SET_VISIBILITY = """(hidden) => {
    Object.defineProperty(document, "visibilityState", { value: hidden ? "hidden" : "visible", configurable: true });
    Object.defineProperty(document, "hidden", { value: hidden, configurable: true });
    document.dispatchEvent(new Event("visibilitychange"));
}"""
# An init script that records, in `window.__acks`, every acknowledgement the page sends (`{via, at}`: a WebSocket
# `ack` frame or a `POST /api/ack`, at performance.now()), by wrapping the browser's own WebSocket.send and fetch.
ACK_SPY = """(() => {
    window.__acks = [];
    const send = WebSocket.prototype.send;
    WebSocket.prototype.send = function (data) {
        if (typeof data === "string" && JSON.parse(data).type === "ack") {
            window.__acks.push({ via: "websocket", at: performance.now() });
        }
        return send.call(this, data);
    };
    const fetch = window.fetch;
    window.fetch = function (input, init) {
        if (new URL(String(input), location.href).pathname === "/api/ack") {
            window.__acks.push({ via: "post", at: performance.now() });
        }
        return fetch.call(this, input, init);
    };
})();"""


def chromium_path() -> str | None:
    """Debian's Chromium (the `chromium` package); Playwright's own browser download is never used."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def launch_chromium(playwright: Playwright, proxy_port: int | None = None) -> Browser:
    """Headless Chromium; with `proxy_port`, every request goes through that HTTP proxy, loopback included."""
    args = list(CHROMIUM_ARGS)
    if proxy_port is not None:
        # Chromium never proxies loopback unless told to with `<-loopback>`.
        args += [f"--proxy-server=http://127.0.0.1:{proxy_port}", "--proxy-bypass-list=<-loopback>"]
    return playwright.chromium.launch(executable_path=chromium_path(), args=args, headless=True)


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

    def add_user(self, name: str) -> dict[str, Any]:
        """A new user with the demo password and a phone of its own, made by the command line on this server's
        database while it runs (as an operator would): `{userId, name, phone}`."""
        phone = f"7{secrets.randbelow(10**10):010d}"
        argv = [sys.executable, str(ROOT / "run.py"), "users", "add", "--db", str(self.db), "--phone", phone,
                "--name", name, "--password", DEMO_PASSWORD]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSERVER_")}
        env["CHATSERVER_STATE_DIR"] = str(self.state_dir)
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=START_TIMEOUT,
                              check=False)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))


class ChatPage:
    """One user's tab: a browser context of its own, logged in through the login form."""

    def __init__(
        self, context: BrowserContext, base_url: str, wait_until: Literal["commit", "load"] = "load"
    ) -> None:
        self.context = context
        self.page: Page = context.new_page()
        self.console: list[str] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.urls: list[str] = []  # every URL the page requested, WebSocket URLs included
        self.token = ""
        self.page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("dialog", self._on_dialog)
        self.page.on("request", lambda request: self.urls.append(request.url))
        self.page.on("websocket", lambda socket: self.urls.append(socket.url))
        self.page.goto(base_url + "/", wait_until=wait_until)

    def _on_dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def login(self, phone: str, password: str = DEMO_PASSWORD) -> ChatPage:
        self.page.fill("#login-phone", phone)
        self.page.fill("#login-password", password)
        self.page.click("#login-submit")
        expect(self.page.locator("#chat-view")).to_be_visible(timeout=5000)
        self.token = self.session_token()
        return self

    def session_token(self) -> str:
        """The long-lived token the page keeps (what must never be in a URL or on the console)."""
        return str(self.page.evaluate("JSON.parse(localStorage.getItem('chatserver.session')).token"))

    def session_user(self) -> str:
        return str(self.page.evaluate("JSON.parse(localStorage.getItem('chatserver.session')).user.userId"))

    def leaks(self) -> list[str]:
        """URLs the page requested and console lines that hold its token (there must be none)."""
        assert self.token, "the page has not logged in"
        return [line for line in self.urls + self.console if self.token in line]

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


def ack_gaps(page: Page) -> list[float]:
    """Milliseconds between the acknowledgements the page sent (ACK_SPY)."""
    times = [ack["at"] for ack in page.evaluate("window.__acks")]
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def unique(label: str) -> str:
    return f"{label} {secrets.token_hex(3)}"


def wait_until(page: Page, condition: Callable[[], bool], timeout: float) -> None:
    """Wait for something the test sees from Python (a route handler ran), keeping Playwright's events flowing."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not reached within {timeout}s"
        page.wait_for_timeout(50)


def demo_dialog(server: ServerProcess, token: str) -> str:
    return str(next(d["dialogId"] for d in server.api("GET", "/api/dialogs", token=token) if d["title"] == "Demo"))


def exchange_typing_and_messages(alice: ChatPage, bob: ChatPage) -> None:
    """Typing both ways, then a message each way: each shows once on the other page, none left pending."""
    alice.page.fill("#composer-input", "…")
    expect(bob.page.locator("#typing")).to_have_text("typing…", timeout=2000)
    alice.page.fill("#composer-input", "")
    expect(bob.page.locator("#typing")).to_have_text("", timeout=2000)
    bob.page.fill("#composer-input", "…")
    expect(alice.page.locator("#typing")).to_have_text("typing…", timeout=2000)
    bob.page.fill("#composer-input", "")

    incoming = unique("to the page behind the proxy")
    bob.send(incoming)
    expect(alice.messages_with(incoming)).to_have_count(1, timeout=2000)
    outgoing = unique("and back")
    alice.send(outgoing)
    expect(bob.messages_with(outgoing)).to_have_count(1, timeout=2000)
    expect(alice.page.locator("#messages .message.pending")).to_have_count(0, timeout=2000)
    expect(alice.messages_with(outgoing)).to_have_count(1)


def fill_dialog(db: Path, dialog_id: str, sender_id: str, count: int, label: str) -> list[str]:
    """`count` messages from `sender_id` in a dialog the server knows, written straight into its SQLite file in the
    store's own schema (as bench/store_bench.py fills one): thousands in a second, where POSTs would take minutes.
    The server reads them back as history: they were never live events, so they take places in the history below
    every position of the event log (negative, before any message written since), and the log is left alone.
    Returns their texts, oldest first."""
    base = int(time.time() * 1000) - 3_600_000  # an hour ago, one message per millisecond
    texts = [f"{label} #{n:05d}" for n in range(count)]
    rows = []
    for n, text in enumerate(texts):
        millis = base + n
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(millis // 1000)) + f".{millis % 1000:03d}Z"
        rows.append((f"msg_{secrets.token_hex(8)}", dialog_id, sender_id, text, "text", "{}", stamp, stamp, None))
    with contextlib.closing(sqlite3.connect(db, timeout=10, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        first = min(0, conn.execute("SELECT coalesce(min(seq), 0) FROM messages").fetchone()[0]) - count
        conn.executemany(
            "INSERT INTO messages (seq, message_id, dialog_id, sender_id, content, type, meta, created_at, updated_at, "
            "client_message_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(first + n, *row) for n, row in enumerate(rows)],
        )
        conn.execute(
            "UPDATE dialogs SET last_seq = (SELECT max(seq) FROM messages WHERE dialog_id = ?), "
            "activity_at = max(activity_at, ?) WHERE dialog_id = ?",
            (dialog_id, rows[-1][6], dialog_id),
        )
        conn.execute("COMMIT")
    return texts


class StockSquid:
    """Debian's squid with the configuration Debian ships, as a corporate proxy in front of the browser.

    The configuration is /etc/squid/squid.conf as installed, ACLs untouched: `http_access deny CONNECT
    !SSL_ports` refuses a tunnel to any port but 443, so a browser's ws:// WebSocket (a CONNECT through the proxy)
    is refused with 403, while plain HTTP requests and streamed responses pass; `http_access allow localhost`
    lets 127.0.0.1 in, and `http_access deny to_localhost` is commented out in Debian's file, so loopback
    destinations are reachable with no change. What the fixture changes, and nothing else:

    - `http_port 3128` becomes `http_port 127.0.0.1:<free port>`;
    - `coredump_dir /var/spool/squid` becomes `coredump_dir <temp>/spool`;
    - appended: `pid_filename <temp>/squid.pid`, `cache_log stdio:<temp>/cache.log`,
      `access_log stdio:<temp>/access.log squid` (the stock paths under /var are the system squid's).

    The stock file has no `cache_dir` (memory only). The temp folder is made under /tmp and given to user `proxy`,
    whom squid runs as. Squid runs in the foreground (`-N`) in a process group of its own, which `stop()` kills
    (its pinger helper included). Needs root (to become `proxy`) and /usr/sbin/squid.
    """

    STOCK_CONFIG = Path("/etc/squid/squid.conf")

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="chatserver-squid-"))
        self.port = free_port()
        self.access_log = self.dir / "access.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("squid") is not None and StockSquid.STOCK_CONFIG.exists() and os.geteuid() == 0

    def config(self) -> str:
        stock = self.STOCK_CONFIG.read_text()
        changed, ports = re.subn(r"(?m)^http_port 3128$", f"http_port 127.0.0.1:{self.port}", stock)
        changed, dumps = re.subn(r"(?m)^coredump_dir /var/spool/squid$", f"coredump_dir {self.dir}/spool", changed)
        assert ports == 1 and dumps == 1, "Debian's squid.conf is not the one this fixture knows"
        return changed + (
            f"\npid_filename {self.dir}/squid.pid\n"
            f"cache_log stdio:{self.dir}/cache.log\n"
            f"access_log stdio:{self.access_log} squid\n"
        )

    def start(self) -> None:
        (self.dir / "spool").mkdir()
        (self.dir / "squid.conf").write_text(self.config())
        proxy = pwd.getpwnam("proxy")
        for path in (self.dir, self.dir / "spool", self.dir / "squid.conf"):
            os.chown(path, proxy.pw_uid, proxy.pw_gid)
        self.proc = subprocess.Popen(
            ["squid", "-N", "-f", str(self.dir / "squid.conf")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"squid exited with {self.proc.returncode}:\n{self.cache_log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)  # polling for the listener, bounded by the deadline
        self.stop()
        raise AssertionError(f"squid did not listen within {START_TIMEOUT}s:\n{self.cache_log()}")

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # squid's own shutdown waits 30 s for its clients
            self.proc.wait(timeout=10)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def cache_log(self) -> str:
        path = self.dir / "cache.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_lines(self) -> list[str]:
        """access.log so far: `time elapsed client code/status bytes method URL ...`, one line per transaction,
        written when the transaction ends (a stream still open is not there yet); squid strips query strings."""
        return self.access_log.read_text(errors="replace").splitlines() if self.access_log.exists() else []

    def refused_connects(self, port: int) -> list[float]:
        """When squid refused a CONNECT to 127.0.0.1:<port> (a WebSocket attempt), as Unix times."""
        found = []
        for line in self.log_lines():
            fields = line.split()
            if len(fields) >= 7 and fields[3] == "TCP_DENIED/403" and fields[5] == "CONNECT" \
                    and fields[6] == f"127.0.0.1:{port}":
                found.append(float(fields[0]))
        return found

    def passed(self, port: int, path: str) -> int:
        """How many requests for http://127.0.0.1:<port><path>... squid carried (any status it did not make up)."""
        prefix = f"http://127.0.0.1:{port}{path}"
        return sum(
            1 for line in self.log_lines()
            if len(line.split()) >= 7 and line.split()[6].startswith(prefix) and "HIER_DIRECT" in line
        )
