"""The server as a systemd service, proven on real processes: sd_notify (READY, STATUS, WATCHDOG, STOPPING),
graceful shutdown on SIGTERM (PROTOCOL section 7), and socket activation.

The test plays the service manager: it binds its own datagram socket as NOTIFY_SOCKET, passes a listening
socket as fd 3 with LISTEN_FDS/LISTEN_PID, and sends the signals.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import tornado.websocket

from chatserver import jsonutil, systemd
from tests.process import ServerProcess, listening_socket

GRACE = 5.0


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.setblocking(False)
    yield sock, path
    sock.close()


async def notification(sock: socket.socket, timeout: float = 5) -> dict[str, str]:
    """The next datagram the server sent, as its KEY=value fields."""
    data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), timeout)
    return dict(field.split("=", 1) for field in data.decode().split("\n"))


async def notification_with(sock: socket.socket, key: str, timeout: float = 5) -> dict[str, str]:
    async def find() -> dict[str, str]:
        while key not in (fields := await notification(sock)):
            pass
        return fields

    return await asyncio.wait_for(find(), timeout)


@pytest.mark.gen_test(timeout=30)
async def test_server_notifies_ready_status_watchdog_and_stopping(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}
    async with await ServerProcess.start(tmp_path, "--demo", env=env) as server:
        ready = await notification(sock)
        assert ready["READY"] == "1"
        assert ready["STATUS"] == f"serving {server.url}: 0 websocket, 0 sse, 0 polls parked; 0 requests in flight"
        # The watchdog is pinged from the loop at half of WATCHDOG_USEC (1s here): two pings within 5s.
        first = await notification_with(sock, "WATCHDOG")
        second = await notification_with(sock, "WATCHDOG")
        assert first["WATCHDOG"] == second["WATCHDOG"] == "1"
        # The status line follows the connections (checked at every tick, sent when it changes).
        token = await server.login()
        ws = await tornado.websocket.websocket_connect(f"{server.url.replace('http', 'ws')}/ws?token={token}")
        assert jsonutil.loads(await asyncio.wait_for(ws.read_message(), 5))["type"] == "ready"
        expected = f"serving {server.url}: 1 websocket, 0 sse, 0 polls parked; 0 requests in flight"

        async def status_becomes_expected() -> None:
            while (await notification_with(sock, "STATUS"))["STATUS"] != expected:
                pass

        await asyncio.wait_for(status_becomes_expected(), 5)

        server.signal(signal.SIGTERM)
        stopping = await notification_with(sock, "STOPPING")
        assert stopping["STOPPING"] == "1"
        assert stopping["STATUS"].startswith("stopping: 1 websocket")
        assert await server.exit_code(GRACE + 5) == 0
        assert await asyncio.wait_for(ws.read_message(), 5) is None
        ws.close()
    assert "Traceback" not in server.stderr


@pytest.mark.gen_test(timeout=30)
async def test_sigterm_answers_parked_poll_closes_websocket_with_1001_and_finishes_request_in_flight(
    tmp_path: Path,
) -> None:
    # No NOTIFY_SOCKET here: outside systemd the notify code is a no-op, and shutdown is the same.
    env = {"CHATSERVER_SHUTDOWN_GRACE": str(GRACE)}
    async with await ServerProcess.start(tmp_path, "--demo", env=env) as server:
        token = await server.login()
        ws = await tornado.websocket.websocket_connect(f"{server.url.replace('http', 'ws')}/ws?token={token}")
        assert jsonutil.loads(await asyncio.wait_for(ws.read_message(), 5))["type"] == "ready"
        status, hello = await server.call("GET", "/api/poll", token=token)
        cursor = hello["data"]["cursor"]
        parked = asyncio.ensure_future(server.call("GET", f"/api/poll?cursor={cursor}&timeout=30", token=token))
        await server.wait_for_metric("chatserver_polls_waiting 1.0")
        dialog_id = (await server.call("GET", "/api/dialogs", token=token))[1]["data"][0]["dialogId"]

        # A POST whose body is still on its way when SIGTERM arrives: a request in flight.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        body = jsonutil.dumps_bytes({"content": "sent across the shutdown"})
        writer.write(
            f"POST /api/messages/dialog/{dialog_id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[:5]
        )
        await writer.drain()
        # In flight: the parked poll, the POST, and the /metrics request that looks.
        await server.wait_for_metric("chatserver_requests_in_flight 3.0")

        server.signal(signal.SIGTERM)
        status, answer = await asyncio.wait_for(parked, 5)
        assert status == 200
        assert answer["data"] == {"events": [], "cursor": cursor}
        assert await asyncio.wait_for(ws.read_message(), 5) is None
        assert ws.close_code == 1001
        ws.close()  # already closed by the server; this tells the client object so
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", server.port)
        # More signals while it drains are not a crash, and do not cut the drain short.
        server.signal(signal.SIGTERM)
        server.signal(signal.SIGINT)
        assert server.proc.returncode is None

        writer.write(body[5:])
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert response.startswith(b"HTTP/1.1 201 "), response
        assert b"sent across the shutdown" in response
        assert await server.exit_code(GRACE) == 0
    assert "Traceback" not in server.stderr
    assert "SIGTERM: shutting down (1 websocket, 0 sse, 1 polls parked; 2 requests in flight)" in server.stderr
    assert "while shutting down" in server.stderr


@pytest.mark.gen_test(timeout=30)
async def test_request_whose_client_went_away_mid_body_does_not_hold_up_shutdown(tmp_path: Path) -> None:
    env = {"CHATSERVER_SHUTDOWN_GRACE": str(GRACE)}
    async with await ServerProcess.start(tmp_path, "--demo", env=env) as server:
        token = await server.login()
        dialog_id = (await server.call("GET", "/api/dialogs", token=token))[1]["data"][0]["dialogId"]
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            f"POST /api/messages/dialog/{dialog_id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: 100\r\n\r\n{{".encode()
        )
        await writer.drain()
        await server.wait_for_metric("chatserver_requests_in_flight 2.0")  # the POST, and /metrics itself
        writer.close()
        await server.wait_for_metric("chatserver_requests_in_flight 1.0")
        server.signal(signal.SIGTERM)
        assert await server.exit_code(GRACE + 5) == 0
    assert "0 requests in flight" in server.stderr
    assert "still open after" not in server.stderr


@pytest.mark.gen_test(timeout=30)
async def test_server_adopts_socket_passed_by_systemd_and_notifies_an_abstract_socket(tmp_path: Path) -> None:
    listener = listening_socket()
    port = listener.getsockname()[1]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"chatserver-test-{secrets.token_hex(6)}"
    notify.bind("\0" + name)
    notify.setblocking(False)
    fd = listener.fileno()
    try:
        # As systemd does: the socket as fd 3, LISTEN_FDS=1, LISTEN_PID the server's own pid. The server is
        # told to listen on that very port: binding it itself would fail, so only adoption can serve.
        async with await ServerProcess.start(
            tmp_path,
            "--port",
            str(port),
            env={"NOTIFY_SOCKET": "@" + name},
            pass_fds=[fd],
            shell_prefix=f"exec 3<&{fd} {fd}<&-; LISTEN_FDS=1 LISTEN_PID=$$ ",
        ) as server:
            assert server.url == f"http://127.0.0.1:{port}"
            listener.close()  # the server holds its own copy now, as under systemd
            assert (await notification(notify))["READY"] == "1"
            status, body = await server.call("GET", "/healthz")
            assert status == 200 and body == {"success": True, "data": {"status": "ok"}}
            server.signal(signal.SIGTERM)
            assert await server.exit_code(GRACE + 5) == 0
    finally:
        listener.close()
        notify.close()


def test_sockets_meant_for_another_process_are_not_adopted() -> None:
    environ = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1)}
    assert systemd.inherited_sockets(environ, os.getpid()) == []
    assert systemd.inherited_sockets({}, os.getpid()) == []


def test_watchdog_interval_comes_from_watchdog_usec_for_this_process_only() -> None:
    pid = os.getpid()
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid) == 30.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid)}, pid) == 30.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid + 1)}, pid) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}, pid) is None
    assert systemd.watchdog_interval({}, pid) is None


@pytest.mark.parametrize("digits", ["3²", "①", "٣", "３"])
def test_numbers_in_systemd_variables_are_ascii_digits_only(digits: str) -> None:
    pid = os.getpid()
    assert systemd.watchdog_interval({"WATCHDOG_USEC": digits}, pid) is None
    assert systemd.inherited_sockets({"LISTEN_FDS": digits, "LISTEN_PID": str(pid)}, pid) == []
    assert systemd.is_journal_stream({"JOURNAL_STREAM": f"{digits}:{digits}"}, 2) is False


def test_notifier_without_notify_socket_sends_nothing() -> None:
    notifier = systemd.Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.send("READY=1", "STATUS=serving") is False
    assert notifier.stopping("stopping") is False
