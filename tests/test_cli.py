"""The command line of PROTOCOL section 1, as an operator meets it: `python run.py ...` in a fresh folder.

Every failure the operator can cause is one clear line on stderr and a non-zero exit, never a traceback. Every
wait on a process is bounded, and a server started here is killed at the end of its test whatever happens.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = str(ROOT / "run.py")
TIMEOUT = 30


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATSERVER_", "STATE_DIRECTORY", "NOTIFY_"))}
    env.update(extra)
    return env


def run(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, RUN, *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """Non-zero, nothing on stdout, and exactly one line on stderr that names the problem."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == "", result.stdout
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def one_json_line(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    value = json.loads(lines[0])
    assert isinstance(value, dict)
    return value


class Server:
    """`python run.py ...` as a subprocess, with its stderr read line by line on a thread."""

    def __init__(self, cwd: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, RUN, *args],
            cwd=cwd,
            env=env or clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} within {timeout}s: {self.lines}") from None
            if line is None:
                raise AssertionError(f"the process ended before {text!r}: {self.lines}")
            self.lines.append(line)
            if text in line:
                return line

    def url(self) -> str:
        line = self.wait_for("listening on")
        return line.split("listening on ", 1)[1].strip()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=TIMEOUT)

    def close(self) -> None:
        """Kill it if it still runs, and release its pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)
        self._reader.join(timeout=TIMEOUT)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Every server a test starts, killed at its end."""
    started: list[Server] = []
    yield started
    for server in started:
        server.close()


def http(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def login(url: str, phone: str, password: str) -> str:
    status, body = http("POST", f"{url}/api/auth/login", {"phone": phone, "password": password})
    assert status == 200, body
    return str(body["data"]["token"])


# -- users and dialogs --------------------------------------------------------------------------------------


def test_users_add_prints_the_user_as_one_json_line(tmp_path: Path) -> None:
    result = run(
        tmp_path, "users", "add", "--phone", "70000000001", "--name", "Анна", "--password", "pw", "--db", "x.db"
    )
    user = one_json_line(result)
    assert user["userId"].startswith("usr_") and user["name"] == "Анна" and user["phone"] == "70000000001"
    assert set(user) == {"userId", "name", "phone"}
    assert (tmp_path / "x.db").is_file() and not (tmp_path / "var" / "chatserver.db").exists()


def test_db_flag_works_before_the_subcommand_too(tmp_path: Path) -> None:
    one_json_line(run(tmp_path, "--db", "early.db", "users", "add", "--phone", "1", "--name", "a", "--password", "p"))
    assert (tmp_path / "early.db").is_file() and not (tmp_path / "var" / "chatserver.db").exists()


def test_duplicate_phone_is_one_clear_line_and_non_zero(tmp_path: Path) -> None:
    args = ("users", "add", "--phone", "70000000001", "--name", "A", "--password", "pw")
    one_json_line(run(tmp_path, *args))
    assert_one_line_failure(run(tmp_path, *args), "70000000001", "already exists")


def test_users_add_with_empty_name_is_one_clear_line(tmp_path: Path) -> None:
    result = run(tmp_path, "users", "add", "--phone", "70000000001", "--name", " ", "--password", "pw")
    assert_one_line_failure(result, "name")


def test_dialogs_add_prints_the_dialog_as_one_json_line(tmp_path: Path) -> None:
    ann = one_json_line(run(tmp_path, "users", "add", "--phone", "701", "--name", "Ann", "--password", "pw"))
    ben = one_json_line(run(tmp_path, "users", "add", "--phone", "702", "--name", "Ben", "--password", "pw"))
    dialog = one_json_line(run(tmp_path, "dialogs", "add", "--title", "Pair", "--member", "701", "--member", "702"))
    assert dialog["dialogId"].startswith("dlg_") and dialog["title"] == "Pair"
    assert dialog["memberIds"] == [ann["userId"], ben["userId"]]
    assert dialog["lastMessage"] is None and dialog["unreadCount"] == 0


def test_dialogs_add_with_an_unknown_member_is_one_clear_line(tmp_path: Path) -> None:
    one_json_line(run(tmp_path, "users", "add", "--phone", "701", "--name", "Ann", "--password", "pw"))
    result = run(tmp_path, "dialogs", "add", "--title", "T", "--member", "701", "--member", "799")
    assert_one_line_failure(result, "799")
    with sqlite3.connect(tmp_path / "var" / "chatserver.db") as conn:
        assert conn.execute("SELECT count(*) FROM dialogs").fetchone()[0] == 0


# -- the server ---------------------------------------------------------------------------------------------


def test_server_logs_one_line_naming_its_address(tmp_path: Path, servers: list[Server]) -> None:
    server = Server(tmp_path, "--port", "0")
    servers.append(server)
    url = server.url()
    assert url.startswith("http://127.0.0.1:") and int(url.rsplit(":", 1)[1]) > 0
    assert sum("listening on" in line for line in server.lines) == 1
    status, body = http("GET", f"{url}/healthz")
    assert status == 200 and body["success"] is True
    assert server.stop() == 0


def test_demo_twice_creates_nothing_twice(tmp_path: Path, servers: list[Server]) -> None:
    for _ in range(2):
        server = Server(tmp_path, "--demo", "--port", "0")
        servers.append(server)
        url = server.url()
        token = login(url, "79111111111", "demo")
        status, body = http("GET", f"{url}/api/dialogs", token=token)
        assert status == 200 and [d["title"] for d in body["data"]] == ["Demo"]
        login(url, "79777777777", "demo")
        assert server.stop() == 0
    with sqlite3.connect(tmp_path / "var" / "chatserver.db") as conn:
        users = conn.execute("SELECT phone, name FROM users ORDER BY phone").fetchall()
        assert users == [("79111111111", "Александр Петров"), ("79777777777", "Мария Иванова")]
        assert conn.execute("SELECT count(*) FROM dialogs").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM dialog_members").fetchone()[0] == 2


def test_taken_port_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert_one_line_failure(run(tmp_path, "--port", port), port, "in use")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("prot = 8888\n", ("unknown setting", "prot")),
        ('port = "8888"\n', ("port",)),
        ("max_body_size = -1\n", ("max_body_size",)),
        ("port = \n", ("not valid TOML",)),
        (None, ("cannot read",)),
    ],
)
def test_invalid_config_file_is_one_clear_line(tmp_path: Path, text: str | None, words: tuple[str, ...]) -> None:
    path = tmp_path / "chatserver.toml"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    assert_one_line_failure(run(tmp_path, "--config", str(path)), *words)
    assert_one_line_failure(
        run(tmp_path, "users", "add", "--phone", "1", "--name", "a", "--password", "p", "--config", str(path)), *words
    )
    assert_one_line_failure(run(tmp_path, env=clean_env(CHATSERVER_CONFIG=str(path))), *words)


def test_unreadable_config_file_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "binary.toml").write_bytes(b"port = 1\n\xff = 2\n")
    assert_one_line_failure(run(tmp_path, "--config", "binary.toml"), "binary.toml")
    assert_one_line_failure(run(tmp_path, "--config", str(tmp_path)), str(tmp_path))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CHATSERVER_PORT", "http"),
        ("CHATSERVER_PORT", "99999"),
        ("CHATSERVER_SHUTDOWN_GRACE", "soon"),
        ("CHATSERVER_LOG_LEVEL", "chatty"),
    ],
)
def test_invalid_environment_setting_is_one_clear_line(tmp_path: Path, name: str, value: str) -> None:
    setting = name.removeprefix("CHATSERVER_").lower()
    assert_one_line_failure(run(tmp_path, env=clean_env(**{name: value})), setting)


def test_invalid_port_flag_is_one_clear_line(tmp_path: Path) -> None:
    assert_one_line_failure(run(tmp_path, "--port", "eighty"), "port")


def _random_bytes_db(tmp_path: Path) -> Path:
    path = tmp_path / "random.db"
    path.write_bytes(os.urandom(8192))
    return path


def _newer_schema_db(tmp_path: Path) -> Path:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 999")
    return path


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "plain").write_text("not a folder")
    return tmp_path / "plain" / "chatserver.db"


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (_random_bytes_db, ("not a database",)),
        (lambda tmp: tmp, ("unable to open",)),
        (_newer_schema_db, ("schema version 999",)),
        (_under_a_file, ("plain",)),
    ],
    ids=["random-bytes", "a-directory", "newer-schema", "under-a-file"],
)
def test_unusable_database_is_one_clear_line(tmp_path: Path, make: Any, words: tuple[str, ...]) -> None:
    db = str(make(tmp_path))
    assert_one_line_failure(run(tmp_path, "--port", "0", "--db", db), *words)
    assert_one_line_failure(run(tmp_path, "--demo", "--port", "0", "--db", db), *words)
    assert_one_line_failure(
        run(tmp_path, "users", "add", "--phone", "1", "--name", "a", "--password", "p", "--db", db), *words
    )


# -- PostgreSQL URLs and membership (PROTOCOL sections 10 and 13) ---------------------------------------------


@pytest.mark.parametrize("value", ["postgresql:/x", "postgres:relative", "mysql://h/d", "postgresql://h:port/d"])
def test_a_db_that_is_neither_a_path_nor_a_usable_postgresql_url_is_one_clear_line(tmp_path: Path, value: str) -> None:
    for args in (("--port", "0"), ("users", "add", "--phone", "1", "--name", "a", "--password", "p")):
        assert_one_line_failure(run(tmp_path, *args, "--db", value), "db")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder named "postgresql:" or any other


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_postgresql_server_is_one_clear_line_without_the_password(tmp_path: Path) -> None:
    port = free_port()
    line = assert_one_line_failure(
        run(tmp_path, "users", "add", "--phone", "1", "--name", "a", "--password", "p",
            "--db", f"postgresql://chat:s3cret@127.0.0.1:{port}/chat"), "PostgreSQL", str(port))
    assert "s3cret" not in line


@pytest.fixture
def pg_database() -> Iterator[str]:
    from tests import pg
    from tests.conftest import require_service

    require_service("PostgreSQL", pg.reachable())
    name = f"chatserver_cli_{os.getpid()}_{time.monotonic_ns()}"
    pg.create_database(name)
    yield pg.url(name)
    pg.drop_database(name)


def test_the_cli_takes_a_postgresql_url_and_changes_members(tmp_path: Path, pg_database: str) -> None:
    db = ("--db", pg_database)
    ann = one_json_line(run(tmp_path, "users", "add", "--phone", "701", "--name", "Ann", "--password", "pw", *db))
    ben = one_json_line(run(tmp_path, "users", "add", "--phone", "702", "--name", "Ben", "--password", "pw", *db))
    cy = one_json_line(run(tmp_path, "users", "add", "--phone", "703", "--name", "Cy", "--password", "pw", *db))
    assert_one_line_failure(run(tmp_path, "users", "add", "--phone", "701", "--name", "A", "--password", "p", *db),
                            "701")
    dialog = one_json_line(run(tmp_path, "dialogs", "add", "--title", "Pair", "--member", "701", "--member", "702",
                               *db))
    assert dialog["createdBy"] is None
    changed = one_json_line(run(tmp_path, "dialogs", "members", "--dialog", dialog["dialogId"], "--add", "703",
                                "--remove", "701", *db))
    assert changed["memberIds"] == [ben["userId"], cy["userId"]]
    assert ann["userId"] not in changed["memberIds"]
    assert_one_line_failure(run(tmp_path, "dialogs", "members", "--dialog", dialog["dialogId"], "--add", "799", *db),
                            "799")
    assert_one_line_failure(run(tmp_path, "dialogs", "members", "--dialog", "dlg_0000000000000000", "--add", "701",
                                *db), "not found")
    assert not (tmp_path / "var" / "chatserver.db").exists()  # the URL was used, not a file beside it


def test_dialogs_members_on_sqlite(tmp_path: Path) -> None:
    for phone in ("701", "702"):
        one_json_line(run(tmp_path, "users", "add", "--phone", phone, "--name", "P" + phone, "--password", "pw"))
    dialog = one_json_line(run(tmp_path, "dialogs", "add", "--title", "Pair", "--member", "701"))
    changed = one_json_line(run(tmp_path, "dialogs", "members", "--dialog", dialog["dialogId"], "--add", "702"))
    assert len(changed["memberIds"]) == 2


@pytest.mark.parametrize("phone", ["", " ", "x" * 65])
def test_the_cli_refuses_a_phone_that_login_would_refuse(tmp_path: Path, phone: str) -> None:
    assert_one_line_failure(run(tmp_path, "users", "add", "--phone", phone, "--name", "n", "--password", "p"), "phone")
