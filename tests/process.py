"""A real server process (`python run.py`) for what only a process has: signals, systemd, socket activation, logs.

`ServerProcess.start` runs run.py with a fresh state folder and a clean environment (no inherited
CHATSERVER_*, NOTIFY_SOCKET, WATCHDOG_*, LISTEN_* or JOURNAL_STREAM), collects every line it writes to stderr,
and returns once it logs the address it listens on. Every wait is bounded; a process still running at the end
of a test is killed. `ThreadedServer` drives one from a loop in a thread of its own, for synchronous clients.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import socket
import sys
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import tornado.httpclient

from chatserver import jsonutil

ROOT = Path(__file__).resolve().parent.parent
ALICE_PHONE, BOB_PHONE, DEMO_PASSWORD = "79111111111", "79777777777", "demo"
START_TIMEOUT = 15.0
_ISOLATED = ("CHATSERVER_", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_", "JOURNAL_STREAM")


class ServerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, reader: asyncio.StreamReader) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.url = ""
        self._reader = reader
        self._listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._collector = asyncio.ensure_future(self._collect())
        self.http = tornado.httpclient.AsyncHTTPClient()

    @classmethod
    async def start(
        cls,
        tmp_path: Path,
        *args: str,
        env: dict[str, str] | None = None,
        journal: bool = False,
        pass_fds: Sequence[int] = (),
        shell_prefix: str = "",
    ) -> ServerProcess:
        """Start `run.py --port 0 *args`. `journal`: stderr is announced as journald's stream (JOURNAL_STREAM).

        `shell_prefix`, where given, runs the server through `bash -c '<prefix> exec python run.py ...'`, so that
        the prefix can set up descriptors and variables that need the server's own pid (`$$`).
        """
        environment = {k: v for k, v in os.environ.items() if not k.startswith(_ISOLATED)}
        environment["CHATSERVER_STATE_DIR"] = str(tmp_path / "state")
        environment.update(env or {})
        read_end, write_end = os.pipe()
        if journal:
            stat = os.fstat(write_end)
            environment["JOURNAL_STREAM"] = f"{stat.st_dev}:{stat.st_ino}"
        argv = [sys.executable, str(ROOT / "run.py"), "--port", "0", *args]
        if shell_prefix:
            argv = ["/bin/bash", "-c", f"{shell_prefix} exec {shlex.join(argv)}"]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=write_end,
                env=environment,
                cwd=str(ROOT),
                pass_fds=tuple(pass_fds),
            )
        finally:
            os.close(write_end)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb", 0))
        server = cls(proc, reader)
        try:
            server.url = await asyncio.wait_for(asyncio.shield(server._listening), START_TIMEOUT)
        except BaseException:
            await server.close()
            raise
        return server

    async def _collect(self) -> None:
        while line := await self._reader.readline():
            text = line.decode(errors="replace").rstrip("\n")
            self.lines.append(text)
            found = re.search(r"listening on (http://\S+)", text)
            if found and not self._listening.done():
                self._listening.set_result(found.group(1))
        if not self._listening.done():
            self._listening.set_exception(AssertionError("the server exited before listening:\n" + self.stderr))

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def signal(self, signum: signal.Signals) -> None:
        os.kill(self.proc.pid, signum)

    async def exit_code(self, timeout: float) -> int:
        """Wait (at most `timeout` seconds) for the process to exit and its stderr to be read to the end."""
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._collector, 5)
        return code

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 10)
        await asyncio.wait_for(self._collector, 5)

    async def __aenter__(self) -> ServerProcess:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- clients --------------------------------------------------------------------------------------------

    async def call(
        self, method: str, path: str, body: Any = None, *, token: str = "", timeout: float = 10
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await self.http.fetch(
            self.url + path,
            method=method,
            body=jsonutil.dumps_bytes(body) if body is not None else None,
            headers=headers,
            raise_error=False,
            request_timeout=timeout,
        )
        return response.code, jsonutil.loads(response.body) if response.body else None

    async def login(self, phone: str = ALICE_PHONE) -> str:
        status, body = await self.call("POST", "/api/auth/login", {"phone": phone, "password": DEMO_PASSWORD})
        assert status == 200, body
        return str(body["data"]["token"])

    async def metrics(self) -> str:
        response = await self.http.fetch(self.url + "/metrics", request_timeout=5)
        return response.body.decode()

    async def wait_for_metric(self, line: str, timeout: float = 10) -> None:
        """Wait until `/metrics` holds this exact line (a sample and its value)."""

        async def seen() -> None:
            while True:  # the server has no push channel for its metrics: look again until seen
                if line in (await self.metrics()).splitlines():
                    return
                await asyncio.sleep(0.05)

        await asyncio.wait_for(seen(), timeout)


class ThreadedServer:
    """A ServerProcess for synchronous clients (requests, schemathesis, Hypothesis): its loop runs in a thread of its
    own, and every call into it waits with a bound."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="server-process", daemon=True)
        self._thread.start()
        try:
            self.process: ServerProcess = self.run(ServerProcess.start(tmp_path, *args, env=env), START_TIMEOUT + 5)
        except BaseException:
            self._stop_loop()
            raise
        self.url = self.process.url

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM, and the exit code once the process is gone and its stderr read to the end."""
        self.process.signal(signal.SIGTERM)
        return int(self.run(self.process.exit_code(timeout), timeout + 10))

    def close(self) -> None:
        try:
            self.run(self.process.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def listening_socket() -> socket.socket:
    """A TCP socket listening on an ephemeral port of 127.0.0.1, as a systemd `.socket` unit would pass it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock
