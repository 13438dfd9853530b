"""The server's bound on connections, over real sockets: `max_connections` refused with a clear answer, and a
process out of file descriptors that pauses accepting (no busy loop, no flood of log lines) and serves again
once descriptors are free.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Client
from tests.process import ServerProcess
from tests.test_http1 import assert_eof, connect, port_of, read_answer, request
from tests.test_ops import scrape

WAIT = 5.0


async def refused_at_the_limit(port: int) -> None:
    """A new connection is answered at once with the 503 of the limit, and closed."""
    async with connect(port) as (reader, _):
        answer = await read_answer(reader)
        assert answer.status == 503, answer
        assert answer.headers["Content-Type"] == "application/json; charset=utf-8"
        assert answer.headers["Connection"] == "close" and answer.headers["Retry-After"] == "1"
        assert answer.json() == {"success": False, "error": "the server is at its connection limit; retry later"}
        await assert_eof(reader)


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("settings", [{"max_connections": 3}])
async def test_connections_beyond_max_connections_get_a_503_and_the_others_are_served(
    bob: Client, base_url: str
) -> None:
    port = port_of(base_url)
    # Every kind of connection counts: one that has said nothing yet, a kept-alive one, a WebSocket.
    async with connect(port) as (_, silent), connect(port) as (kept, kept_writer):
        kept_writer.write(request("GET", "/healthz"))
        assert (await read_answer(kept)).status == 200
        socket_ = await bob.websocket()
        await refused_at_the_limit(port)
        await refused_at_the_limit(port)
        kept_writer.write(request("GET", "/healthz"))  # those it holds are served as before
        assert (await read_answer(kept)).status == 200
        socket_.send({"type": "ping"})
        assert (await socket_.next())["type"] == "pong"
        silent.close()
        # A connection that ends makes room for the next one.
        for _ in range(50):  # the server sees the end of `silent` on its next turns
            async with connect(port) as (reader, writer):
                writer.write(request("GET", "/healthz"))
                answer = await read_answer(reader)
            if answer.status == 200:
                break
            await asyncio.sleep(0.05)
        assert answer.status == 200, answer
    socket_.close()
    samples = await scrape_when_room(bob)
    assert samples("chatserver_connections_refused_total", reason="limit") >= 2


async def scrape_when_room(client: Client) -> Any:
    """/metrics, once a connection for it is let in (the test's own connections are closing meanwhile)."""
    for _ in range(100):
        try:
            return await scrape(client)
        except Exception:  # refused at the limit: the connections above are still being closed
            await asyncio.sleep(0.05)
    return await scrape(client)


def cpu_seconds(pid: int) -> float:
    """The user and system CPU time a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.gen_test(timeout=60)
async def test_out_of_file_descriptors_the_server_pauses_accepting_quietly_and_serves_again(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    # 64 descriptors: about 50 for connections once the server has started.
    async with await ServerProcess.start(tmp_path, "--demo", shell_prefix="ulimit -n 64;") as server:
        started = server.stderr
        assert "max_connections is 10000 but this process may open only 64 files" in started, started
        clients: list[socket.socket] = []
        try:
            logged = len(server.lines)
            for _ in range(90):  # more than it can take: the rest wait in the listen backlog
                sock = socket.socket()
                sock.setblocking(False)
                await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", server.port)), WAIT)
                clients.append(sock)
            await asyncio.sleep(1.0)
            used = cpu_seconds(server.proc.pid)
            await asyncio.sleep(3.0)
            used = cpu_seconds(server.proc.pid) - used
            # Paused between attempts, not retrying in a busy loop (which would use about 3 s here).
            assert used < 0.75, used
            lines = server.lines[logged:]
            accepting = [line for line in lines if " chatserver.http: " in line]
            assert len(accepting) == 1, "\n".join(lines[:5])
            assert "out of file descriptors" in accepting[0], accepting[0]
            # Whatever else ran short of descriptors (the event log's reader opening a connection) says so once,
            # and once more when it works again, however often it fails and recovers meanwhile.
            others = [line for line in lines if line not in accepting]
            assert len(others) <= 2, "\n".join(others[:5])
        finally:
            for sock in clients:
                sock.close()
        # The descriptors are free again: the server accepts and serves.
        status, body = await server.call("GET", "/healthz", timeout=15)
        assert (status, body) == (200, {"success": True, "data": {"status": "ok"}})
        metrics = await server.metrics()
        refused = [line for line in metrics.splitlines()
                   if line.startswith('chatserver_connections_refused_total{reason="emfile"}')]
        assert refused and float(refused[0].split()[-1]) >= 1, metrics
