"""Worker processes on one host (`workers = 2`), proven on real processes: the supervisor `python run.py` and the
workers it starts, one listening socket, one SQLite file or PostgreSQL database, real clients.

Which worker serves a connection is the kernel's choice. A test learns it from `/metrics`, which every worker
answers for all of them with a `worker` label: it opens one connection at a time and sees whose gauge
(`chatserver_connections`, `chatserver_polls_waiting`) rose. Nothing else tells a client which worker it is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import tornado.httpclient
import tornado.iostream
from prometheus_client.parser import text_string_to_metric_families

from chatserver import jsonutil, systemd
from chatserver.broadcaster import Broadcaster
from chatserver.errors import Forbidden, NotFound
from chatserver.feed import LogFeed, Membership
from chatserver.forwarding import FORWARD_TIMEOUT, decode_error, encode_error, message_from
from chatserver.models import Message
from chatserver.siblings import decode_events, encode_events
from chatserver.store import Store, StoreUnavailable
from chatserver.supervisor import RESTART_CAP, RESTART_FIRST, STOP_MARGIN, StopRequest, Supervisor, restart_delay
from tests import pg, storekit
from tests.conftest import RECEIPT, Client, Socket, require_service
from tests.process import ALICE_PHONE, BOB_PHONE, ROOT, ServerProcess, listening_socket
from tests.test_chat3 import AMQP_URL, Broker, broker, message_event
from tests.test_cluster import positions
from tests.test_realtime import SseReader, eventually
from tests.test_systemd import notification, notification_with, notify_socket

__all__ = ["broker", "notify_socket"]  # fixtures used here

GRACE = 5.0
T = TypeVar("T")


@contextlib.asynccontextmanager
async def workers(
    tmp_path: Path, store: str = "sqlite", *args: str, env: dict[str, str] | None = None, **options: Any
) -> AsyncIterator[ServerProcess]:
    """The supervisor with two workers and the demo users, on a SQLite file or a PostgreSQL database of its own."""
    name = ""
    environment = {"CHATSERVER_WORKERS": "2", "CHATSERVER_MESSAGE_RATE": "0",
                   "CHATSERVER_SHUTDOWN_GRACE": str(GRACE), **(env or {})}
    if store == "postgres":
        require_service("PostgreSQL", pg.reachable())
        name = f"chatserver_test_{uuid.uuid4().hex[:12]}"
        pg.create_database(name)
        environment["CHATSERVER_DB"] = pg.url(name)
    try:
        async with await ServerProcess.start(tmp_path, "--demo", *args, env=environment, **options) as server:
            try:
                yield server
            finally:
                # Stopped as systemd would: a SIGKILL would leave the workers to stop by themselves, later.
                if server.proc.returncode is None:
                    server.signal(signal.SIGTERM)
                    with contextlib.suppress(TimeoutError):
                        await server.exit_code(GRACE + STOP_MARGIN + 2)
    finally:
        if name:
            pg.drop_database(name)


async def user(server: ServerProcess, phone: str) -> Client:
    token = await server.login(phone)
    status, me = await server.call("GET", "/api/me", token=token)
    assert status == 200, me
    return Client(server.url, None, me["data"]["userId"], token=token)  # type: ignore[arg-type]


async def dialog_of(client: Client) -> str:
    status, body = await client.call("GET", "/api/dialogs")
    assert status == 200, body
    return str(body["data"][0]["dialogId"])


async def samples(server: ServerProcess, name: str, **labels: str) -> dict[str, float]:
    """Each worker's value of one metric (the sample `name` with these labels), by worker number."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(await server.metrics()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found[sample.labels["worker"]] = found.get(sample.labels["worker"], 0.0) + sample.value
    return found


async def on_which_worker(
    server: ServerProcess, open_one: Callable[[], Awaitable[T]], metric: str, **labels: str
) -> tuple[T, str]:
    """Open one connection, and the worker whose `metric` rose by it."""
    before = await samples(server, metric, **labels)
    opened = await open_one()
    risen: list[str] = []

    async def rose() -> None:
        while True:
            now = await samples(server, metric, **labels)
            risen[:] = [w for w in now if now[w] > before.get(w, 0.0)]
            if risen:
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(rose(), 5)
    assert len(risen) == 1, risen
    return opened, risen[0]


async def on_every_worker(
    server: ServerProcess, open_one: Callable[[], Awaitable[T]], metric: str, **labels: str
) -> list[tuple[T, str]]:
    """Connections opened one at a time until each worker holds at least one (at most 40)."""
    opened: list[tuple[T, str]] = []
    for _ in range(40):
        opened.append(await on_which_worker(server, open_one, metric, **labels))
        if {worker for _, worker in opened} == {"1", "2"}:
            return opened
    raise AssertionError(f"40 connections all landed on worker {opened[0][1]}")


def worker_pids(server: ServerProcess) -> dict[str, int]:
    """The latest pid of each worker, from the supervisor's log."""
    pids = {}
    for line in server.lines:
        found = re.search(r"worker (\d+) started \(pid (\d+)\)", line)
        if found:
            pids[found.group(1)] = int(found.group(2))
    return pids


def gone(pid: int) -> bool:
    """The process has exited (it may linger as a zombie where nothing reaps the orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


async def parked_poll(client: Client, cursor: str) -> asyncio.Future[tuple[int, Any]]:
    return asyncio.ensure_future(client.poll(cursor, timeout="30"))


async def next_messages(ws: Socket, count: int, timeout: float = 5) -> list[dict[str, Any]]:
    got = []
    while len(got) < count:
        frame = await ws.next(timeout)
        assert frame["type"] != "reset", frame
        if frame["type"] == "message:new":
            got.append(frame)
    return got


# -- serving -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
@pytest.mark.gen_test(timeout=120)
async def test_two_workers_serve_rest_websocket_sse_and_long_poll_with_events_crossing_workers(
    tmp_path: Path, store: str
) -> None:
    async with workers(tmp_path, store) as server:
        alice, bob = await user(server, ALICE_PHONE), await user(server, BOB_PHONE)
        dialog_id = await dialog_of(alice)
        sockets = await on_every_worker(server, bob.websocket, "chatserver_connections", transport="websocket")
        streams = await on_every_worker(
            server, lambda: _sse(bob), "chatserver_connections", transport="sse"
        )
        status, hello = await bob.poll(timeout="0")
        assert status == 200, hello
        cursor = hello["data"]["cursor"]
        polls = await on_every_worker(server, lambda: parked_poll(bob, cursor), "chatserver_polls_waiting")

        # Alice posts until both workers have taken one of her posts (each is a new connection).
        posts: list[dict[str, Any]] = []
        before = await samples(server, "chatserver_request_seconds_count", method="POST")
        for _ in range(40):
            posts.append(await alice.post_message(dialog_id, f"post {len(posts)}"))
            after = await samples(server, "chatserver_request_seconds_count", method="POST")
            took = {w: after.get(w, 0) - before.get(w, 0) for w in ("1", "2")}
            if len(posts) >= 2 and all(took[w] >= 1 for w in ("1", "2")):
                break
        else:
            raise AssertionError("40 posts all landed on one worker")
        expected = [p["messageId"] for p in posts]
        # On SQLite worker 1 commits the messages that worker 2 took (chatserver/forwarding.py); on PostgreSQL
        # each worker commits its own.
        forwarded = await samples(server, "chatserver_forwarded_writes_total")
        for_siblings = await samples(server, "chatserver_sibling_writes_total")
        if store == "sqlite":
            assert forwarded == {"1": 0.0, "2": took["2"]} and for_siblings == {"1": took["2"], "2": 0.0}
        else:
            assert forwarded == {"1": 0.0, "2": 0.0} and for_siblings == {"1": 0.0, "2": 0.0}

        # Every client, on either worker, gets every post once, in order, whichever worker took it.
        for ws, _ in sockets:
            assert [f["data"]["messageId"] for f in await next_messages(ws, len(posts))] == expected
            await ws.nothing_within(0.2)
        for reader, _ in streams:
            events = await reader.wait_for(1 + len(posts))
            assert [e["type"] for e in events] == ["ready"] + ["message:new"] * len(posts)
            assert [e["data"]["messageId"] for e in events[1:]] == expected
            reader.close()
        for poll, _ in polls:
            status, body = await asyncio.wait_for(poll, 5)
            assert status == 200 and body["data"]["events"][0]["data"]["messageId"] == expected[0]
            # The rest, on whichever worker the next poll lands: the cursor is valid on every one.
            got = [e["data"]["messageId"] for e in body["data"]["events"]]
            while len(got) < len(expected):
                status, body = await bob.poll(body["data"]["cursor"], timeout="5")
                assert status == 200, body
                # A poll acknowledges its cursor: Bob's receipts come among the messages (PROTOCOL section 11).
                events = [e for e in body["data"]["events"] if e["type"] != RECEIPT]
                assert all(e["type"] == "message:new" for e in events), body
                got += [e["data"]["messageId"] for e in events]
            assert got == expected

        # Typing, which is not in the log, crosses workers too (through the supervisor, with no broker).
        for ws, _ in sockets:
            ws.send({"type": "dialog:join", "dialogId": dialog_id})
            await ws.next_of("dialog:joined")
        status, _ = await alice.call("POST", f"/api/dialogs/{dialog_id}/typing", {"typing": True})
        assert status == 204
        for ws, _ in sockets:
            typing = await ws.next_of("typing:start")
            assert typing["data"] == {"dialogId": dialog_id, "userId": alice.user_id}

        # REST reads are the same on either worker; /metrics names both workers whichever answers.
        status, page = await bob.call("GET", f"/api/messages/dialog/{dialog_id}")
        assert status == 200 and [m["messageId"] for m in page["data"]][-len(expected):] == expected
        assert await samples(server, "chatserver_worker_scraped") == {"1": 1.0, "2": 1.0}
        bob.close()
    assert "Traceback" not in server.stderr


def _sse(client: Client) -> Awaitable[SseReader]:
    async def open_reader() -> SseReader:
        reader = SseReader(client)
        await reader.wait_for(1)
        return reader

    return open_reader()


# -- a worker dies -------------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_a_killed_worker_is_restarted_and_its_clients_resume_elsewhere_without_a_reset(tmp_path: Path) -> None:
    async with workers(tmp_path) as server:
        alice, bob = await user(server, ALICE_PHONE), await user(server, BOB_PHONE)
        dialog_id = await dialog_of(alice)
        sockets = await on_every_worker(server, bob.websocket, "chatserver_connections", transport="websocket")
        first = await alice.post_message(dialog_id, "before the kill")
        cursors = {}
        for ws, _ in sockets:
            cursors[id(ws)] = (await next_messages(ws, 1))[0]["cursor"]
        # Bob acknowledges it now, so that its receipt (PROTOCOL section 11) does not wake the poll parked below.
        status, _ = await bob.call("POST", "/api/ack", {"cursor": cursors[id(sockets[0][0])]})
        assert status == 200
        for ws, _ in sockets:
            await ws.next_of(RECEIPT)
        status, hello = await bob.poll(timeout="0")
        cursor = hello["data"]["cursor"]
        poll, poll_worker = await on_which_worker(server, lambda: parked_poll(bob, cursor), "chatserver_polls_waiting")

        victim = sockets[0][1]
        old_pid = worker_pids(server)[victim]
        os.kill(old_pid, signal.SIGKILL)
        # Its clients' connections end; the others' stay.
        for ws, worker in sockets:
            if worker == victim:
                assert await asyncio.wait_for(ws.conn.read_message(), 5) is None
        # Until it is back (after RESTART_FIRST at least), /metrics answers without it, and says so.
        scraped = await samples(server, "chatserver_worker_scraped")
        assert scraped[victim] == 0.0 and sum(scraped.values()) == 1.0
        # While it is down (and after), posts are taken by the worker left.
        missed = [await alice.post_message(dialog_id, f"while worker {victim} is down {i}") for i in range(3)]
        expected = [m["messageId"] for m in missed]
        for ws, worker in sockets:
            if worker == victim:
                again = await bob.websocket(cursor=cursors[id(ws)])
                assert again.ready["data"]["cursor"] == cursors[id(ws)]
                got = await next_messages(again, 3)
            else:
                got = await next_messages(ws, 3)
            assert [f["data"]["messageId"] for f in got] == expected
        # The parked poll: cut with its worker (the client sees the connection end), else answered; either way
        # its cursor gets every event after it from the worker that answers next.
        if poll_worker == victim:
            with pytest.raises(tornado.httpclient.HTTPClientError, match="Stream closed"):
                await asyncio.wait_for(poll, 5)
        else:
            status, body = await asyncio.wait_for(poll, 5)
            assert status == 200 and body["data"]["events"][0]["data"]["messageId"] == expected[0]
        status, body = await bob.poll(cursor, timeout="0")
        # The resumes acknowledged their cursors: Bob's receipt may come among the messages.
        messages = [e["data"]["messageId"] for e in body["data"]["events"] if e["type"] != RECEIPT]
        assert status == 200 and messages == expected

        # The supervisor starts it again, and /metrics names it once more, with a new pid.
        await eventually(lambda: worker_pids(server)[victim] != old_pid, RESTART_FIRST + 10)
        assert f"worker {victim} (pid {old_pid}) killed by SIGKILL; starting it again" in server.stderr
        await eventually(lambda: f"worker {victim} (pid {worker_pids(server)[victim]}) serving" in server.stderr, 15)
        assert await samples(server, "chatserver_worker_scraped") == {"1": 1.0, "2": 1.0}
        assert first["messageId"] not in expected
        bob.close()
    assert "Traceback" not in server.stderr


@pytest.mark.gen_test(timeout=120)
async def test_messages_in_flight_to_the_writing_worker_when_it_is_killed_get_an_answer_and_are_stored_once(
    tmp_path: Path,
) -> None:
    # Worker 2 forwards its clients' messages to worker 1 (chatserver/forwarding.py). Worker 1 is killed while
    # eight senders post: each post gets 201, or 503 (it may have been stored) or its connection cut, never a
    # hang; sent again with the same clientMessageId until 201, each is stored once and delivered once. While
    # worker 1 is down, worker 2 commits its messages itself; once worker 1 serves again, it forwards again.
    async with workers(tmp_path) as server:
        alice, bob = await user(server, ALICE_PHONE), await user(server, BOB_PHONE)
        dialog_id = await dialog_of(alice)
        ws = await bob.websocket()
        path = f"/api/messages/dialog/{dialog_id}"
        statuses: list[int] = []
        stored: dict[str, str] = {}

        async def send(sender: int, count: int) -> None:
            for n in range(count):
                client_id = f"s{sender}-{n}"
                for _ in range(100):
                    try:
                        status, body = await alice.call("POST", path, {"content": client_id,
                                                                       "clientMessageId": client_id},
                                                        timeout=FORWARD_TIMEOUT + 5)
                    except (ConnectionError, tornado.iostream.StreamClosedError) as exc:  # its worker was killed
                        status, body = 599, repr(exc)
                    statuses.append(status)
                    if status == 201:
                        stored[client_id] = body["data"]["messageId"]
                        break
                    assert status in (503, 599), (status, body)  # 599: the connection was cut with its worker
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"{client_id} was never stored")

        senders = asyncio.gather(*(send(i, 15) for i in range(8)))
        await eventually(lambda: len(stored) >= 10, 20)
        forwarded_before = (await samples(server, "chatserver_forwarded_writes_total"))["2"]
        assert forwarded_before > 0
        old_pid = worker_pids(server)["1"]
        os.kill(old_pid, signal.SIGKILL)
        await asyncio.wait_for(senders, 90)
        assert len(stored) == 8 * 15 and len(set(stored.values())) == 8 * 15

        # Stored once each, and delivered once each to Bob (whose connection may have been on worker 1).
        status, page = await bob.call("GET", f"{path}?limit=200")
        assert status == 200
        contents = [m["content"] for m in page["data"] if m["content"].startswith("s")]
        assert sorted(contents) == sorted(stored)
        cursor = ws.ready["data"]["cursor"]
        got: list[str] = []
        while len(got) < len(stored):
            status, body = await bob.poll(cursor, timeout="5")
            assert status == 200, body
            got += [e["data"]["messageId"] for e in body["data"]["events"] if e["type"] == "message:new"]
            cursor = body["data"]["cursor"]
        assert sorted(got) == sorted(stored.values())

        # Worker 1 is back: worker 2 forwards to it again.
        await eventually(lambda: f"worker 1 (pid {worker_pids(server)['1']}) serving" in server.stderr
                         and worker_pids(server)["1"] != old_pid, RESTART_FIRST + 15)
        forwarded = (await samples(server, "chatserver_forwarded_writes_total"))["2"]
        for n in range(40):
            await alice.post_message(dialog_id, f"after {n}")
            if (await samples(server, "chatserver_forwarded_writes_total"))["2"] > forwarded:
                break
        else:
            raise AssertionError("worker 2 did not forward a message to worker 1 after its restart")
        bob.close()
    assert "Traceback" not in server.stderr


def test_a_forwarded_message_and_its_errors_cross_as_they_are_and_a_malformed_one_is_refused() -> None:
    message = Message("msg_1", "dlg_1", "usr_1", "hi", "text", {"k": [1, "x"]}, "2026-12-03T00:00:00.000Z",
                      "2026-12-03T00:00:00.000Z", "c1")
    assert message_from(jsonutil.loads(jsonutil.dumps_bytes(attrs.asdict(message)))) == message
    for error in (Forbidden("not a member", dialog_id="dlg_1"), NotFound("no such message", field="messageId"),
                  StoreUnavailable("database error: locked")):
        back = decode_error(jsonutil.loads(jsonutil.dumps_bytes(encode_error(error))))
        assert type(back) is type(error) and str(back) == str(error)
        assert (getattr(back, "field", None), getattr(back, "dialog_id", None)) == (error.field, error.dialog_id)
    assert isinstance(decode_error(encode_error(KeyError("x"))), RuntimeError)  # a bug stays a 500
    good = attrs.asdict(message)
    for bad in ({**good, "extra": 1}, {k: v for k, v in good.items() if k != "content"}, {**good, "content": 5},
                {**good, "meta": []}, {**good, "client_message_id": 3}, [good]):
        with pytest.raises(ValueError):
            message_from(bad)


def lone_supervisor(code: str, **options: Any) -> Supervisor:
    """The supervisor alone, of one worker whose command is `python -c <code>` (a real process each time)."""
    return Supervisor(
        count=1, command=lambda handoff: [sys.executable, "-c", code], sockets=[listening_socket()],
        notifier=systemd.Notifier(None), watchdog=None, grace=1.0, url="http://127.0.0.1:1", environ=dict(os.environ),
        **options,
    )


@pytest.mark.gen_test(timeout=60)
async def test_a_worker_that_keeps_failing_is_started_again_after_a_doubling_capped_backoff() -> None:
    stop = Stop()
    supervisor = lone_supervisor("raise SystemExit(3)")
    running = asyncio.ensure_future(supervisor.run(stop))
    worker = supervisor.workers[0]
    delays: list[float] = []
    while len(delays) < 4:
        await eventually(lambda: worker.failures > len(delays), 15)
        delays.append(worker.delay)
    assert delays == [RESTART_FIRST, 2 * RESTART_FIRST, 4 * RESTART_FIRST, 8 * RESTART_FIRST]
    assert worker.last_exit == "exited with 3"
    assert supervisor.status().startswith("serving http://127.0.0.1:1 with 1 workers: #1")
    assert [restart_delay(n) for n in (5, 6, 100)] == [min(16 * RESTART_FIRST, RESTART_CAP), RESTART_CAP, RESTART_CAP]
    stop.set("SIGTERM")
    assert await asyncio.wait_for(running, 10) == 0  # nothing was running to stop
    assert worker.restart is None  # no restart after the stop


@pytest.mark.gen_test(timeout=60)
async def test_a_worker_that_does_not_serve_in_time_is_killed_and_started_again() -> None:
    stop = Stop()
    supervisor = lone_supervisor("import time; time.sleep(60)", start_timeout=1.0)
    running = asyncio.ensure_future(supervisor.run(stop))
    worker = supervisor.workers[0]
    await eventually(lambda: worker.failures >= 1, 15)
    assert worker.last_exit == "killed by SIGKILL"
    await eventually(lambda: worker.pid is not None, 15)  # started again
    stop.set("SIGTERM")
    assert await asyncio.wait_for(running, 10) == 0  # the one still starting stopped by SIGTERM


class Stop(StopRequest):
    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.name = ""

    def set(self, name: str) -> None:
        self.name = name
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


# -- events handed from worker to worker ----------------------------------------------------------------------


@pytest.fixture
def store(database: str, io_loop: Any) -> Iterator[Store]:
    yield from storekit.running(database, io_loop)


@pytest.mark.gen_test(timeout=30)
async def test_a_siblings_events_are_published_as_handed_over_in_log_order_once_reading_the_log_for_a_gap(
    store: Store, database: str
) -> None:
    """A worker's feed given another's commits as the supervisor passes them (EVENTS= messages), out of order and
    twice: each is published once, in position order, the gap before one filled from the log."""
    ann, bob = await storekit.user(store, "79000000001"), await storekit.user(store, "79000000002")
    talk = await storekit.dialog(store, ann, bob)
    log_id, start = store.log_id, await storekit.head(store)
    for n in range(3):
        await storekit.post(store, storekit.message(talk.dialog_id, ann, f"from the other worker {n}"))
    events = await storekit.logged(store, start)
    assert [e.type for e in events] == ["message:new"] * 3
    assert [e.position for e in events] == list(range(start + 1, start + 4))
    assert decode_events(encode_events(events)) == events
    for bad in (b"{}", b"[[1, 2]]", b'[[1, "message:new", "d", "{}", "one", null, false, "local", null]]', b"\xff"):
        with pytest.raises(ValueError):
            decode_events(bad)

    async with storekit.started(database) as own:  # this worker's own store: another process, as the database sees it
        hub = Broadcaster(10, log_id=log_id, position=start)
        feed = LogFeed(own, hub, Membership(own))
        feed.start()
        try:
            feed.offered(events[2:])  # the last first: it waits for the log to be read for the two before it
            await eventually(lambda: hub.last_position == events[-1].position, 5)
            feed.offered(events)  # again, as a hint that came twice: nothing is published twice
            await feed.catch_up()
            assert hub.published == 3
        finally:
            await feed.stop()


# -- stopping ------------------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_sigterm_stops_every_worker_gracefully_and_the_supervisor_exits_0(tmp_path: Path) -> None:
    async with workers(tmp_path) as server:
        bob = await user(server, BOB_PHONE)
        sockets = await on_every_worker(server, bob.websocket, "chatserver_connections", transport="websocket")
        status, hello = await bob.poll(timeout="0")
        cursor = hello["data"]["cursor"]
        polls = await on_every_worker(server, lambda: parked_poll(bob, cursor), "chatserver_polls_waiting")
        pids = worker_pids(server)

        server.signal(signal.SIGTERM)
        for ws, _ in sockets:
            assert await asyncio.wait_for(ws.conn.read_message(), GRACE) is None
            assert ws.conn.close_code == 1001
        for poll, _ in polls:
            status, body = await asyncio.wait_for(poll, GRACE)
            assert status == 200 and body["data"] == {"events": [], "cursor": cursor}
        assert await server.exit_code(GRACE + STOP_MARGIN + 5) == 0
        assert all(gone(pid) for pid in pids.values())
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", server.port)
        bob.close()
    assert "SIGTERM: stopping 2 workers" in server.stderr
    assert "all workers stopped" in server.stderr
    assert "Traceback" not in server.stderr


@pytest.mark.gen_test(timeout=60)
async def test_workers_stop_by_themselves_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    async with workers(tmp_path) as server:
        pids = worker_pids(server)
        server.signal(signal.SIGKILL)
        await server.exit_code(5)
        await eventually(lambda: all(gone(pid) for pid in pids.values()), GRACE + 5)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", server.port)
    assert server.stderr.count("the supervisor is gone; stopping") == 2


# -- systemd -------------------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=90)
async def test_notify_ready_once_all_serve_watchdog_only_while_all_are_alive_and_stopping(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}
    async with workers(tmp_path, env=env) as server:
        first = await notification(sock)
        assert first == {"STATUS": "starting 2 workers"}
        ready = await notification_with(sock, "READY")
        pids = worker_pids(server)
        # READY comes once both serve, and its status line names each worker by number and pid.
        assert ready["READY"] == "1" and ready["WATCHDOG"] == "1"
        assert ready["STATUS"] == (
            f"serving {server.url} with 2 workers: "
            f"#1 pid {pids['1']}: 0 websocket, 0 sse, 0 polls parked; 0 requests in flight | "
            f"#2 pid {pids['2']}: 0 websocket, 0 sse, 0 polls parked; 0 requests in flight"
        )
        await notification_with(sock, "WATCHDOG")

        # A worker whose loop stops (SIGSTOP) misses its own watchdog: the supervisor withholds WATCHDOG while
        # not every worker serves, kills the stuck one, starts it again, and pings once all serve again.
        stuck = pids["2"]
        os.kill(stuck, signal.SIGSTOP)
        status = ready["STATUS"]
        saw_restart = False

        async def until_both_serve_again() -> None:
            nonlocal status, saw_restart
            while True:
                fields = await notification(sock, 10)
                status = fields.get("STATUS", status)
                serving = status.count(": 0 websocket") == 2 and f"pid {stuck}" not in status
                if "starting" in status or "restarting" in status:
                    saw_restart = True
                if "WATCHDOG" in fields and saw_restart:
                    assert serving, f"WATCHDOG=1 while not every worker serves: {status}"
                    return

        await asyncio.wait_for(until_both_serve_again(), 30)
        assert f"worker 2 (pid {stuck}) missed its watchdog" in server.stderr
        assert "READY" not in (await notification_with(sock, "WATCHDOG"))  # READY was sent once

        server.signal(signal.SIGTERM)
        stopping = await notification_with(sock, "STOPPING")
        assert stopping["STOPPING"] == "1"
        assert stopping["STATUS"].startswith("stopping: #1 pid")
        assert await server.exit_code(GRACE + STOP_MARGIN + 5) == 0
    assert "Traceback" not in server.stderr


@pytest.mark.gen_test(timeout=60)
async def test_workers_share_a_socket_passed_by_systemd(tmp_path: Path) -> None:
    listener = listening_socket()
    port = listener.getsockname()[1]
    fd = listener.fileno()
    try:
        # Told to listen on that very port, binding would fail: only the adopted socket can serve.
        async with workers(
            tmp_path, "sqlite", "--port", str(port), pass_fds=[fd],
            shell_prefix=f"exec 3<&{fd} {fd}<&-; LISTEN_FDS=1 LISTEN_PID=$$ ",
        ) as server:
            listener.close()
            assert server.url == f"http://127.0.0.1:{port}"
            bob = await user(server, BOB_PHONE)
            sockets = await on_every_worker(server, bob.websocket, "chatserver_connections", transport="websocket")
            assert {worker for _, worker in sockets} == {"1", "2"}
            bob.close()
            server.signal(signal.SIGTERM)
            assert await server.exit_code(GRACE + STOP_MARGIN + 5) == 0
    finally:
        listener.close()


def test_a_worker_argument_the_supervisor_would_not_write_is_refused_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSERVER_")}
    env["CHATSERVER_STATE_DIR"] = str(tmp_path)
    for spec in ("1:2:group", "3:2:group:5:6", "1:2:gr/oup:5:6", "1:2:group:5:²"):
        done = subprocess.run([sys.executable, str(ROOT / "run.py"), "--worker", spec], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("chatserver: --worker"), done.stderr


# -- Chat3 ---------------------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_chat3_events_compete_across_workers_and_a_worker_killed_mid_event_loses_and_doubles_nothing(
    tmp_path: Path, broker: Broker
) -> None:
    env = {"CHATSERVER_AMQP_URL": AMQP_URL, "CHATSERVER_CHAT3_EXCHANGE": broker.exchange,
           "CHATSERVER_CHAT3_QUEUE": broker.queue, "CHATSERVER_CHAT3_DEAD_LETTER_EXCHANGE": broker.dead_letter_exchange,
           "CHATSERVER_AMQP_PREFETCH": "4"}
    broker.declare_dead_letters()
    async with workers(tmp_path, env=env) as server:

        async def both_consume() -> None:
            while True:
                if await samples(server, "chatserver_chat3_connected") == {"1": 1.0, "2": 1.0}:
                    return
                await asyncio.sleep(0.05)

        await asyncio.wait_for(both_consume(), 15)
        alice, bob = await user(server, ALICE_PHONE), await user(server, BOB_PHONE)
        dialog_id = await dialog_of(alice)
        # A watcher on worker 2, the one left: it sees every event of either worker through the log.
        sockets = await on_every_worker(server, bob.websocket, "chatserver_connections", transport="websocket")
        watcher = next(ws for ws, worker in sockets if worker == "2")
        events = [message_event(dialog_id, alice.user_id, f"chat3 {i}") for i in range(300)]
        await broker.publish(*events)

        async def both_took_some() -> None:
            while True:
                accepted = await samples(server, "chatserver_chat3_events_total", outcome="accepted")
                if all(accepted.get(w, 0) >= 1 for w in ("1", "2")):
                    return
                await asyncio.sleep(0.02)

        await asyncio.wait_for(both_took_some(), 15)
        os.kill(worker_pids(server)["1"], signal.SIGKILL)  # deliveries in hand, unacked: the broker moves them

        # Every event stored once, each delivered once to the watcher, in the log's order; none dead-lettered.
        expected = sorted(e["data"]["messageId"] for e in events)
        got = await next_messages(watcher, len(events), timeout=15)
        ids = [f["data"]["messageId"] for f in got]
        assert len(ids) == len(set(ids)), "an event was delivered twice"
        assert sorted(ids) == expected
        numbers = positions(got)
        assert numbers == sorted(numbers)
        await watcher.nothing_within(0.5)
        stored: list[str] = []
        while True:  # history pages, newest first
            before = f"&before={stored[0]}" if stored else ""
            status, page = await bob.call("GET", f"/api/messages/dialog/{dialog_id}?limit=200{before}")
            assert status == 200, page
            stored[:0] = [m["messageId"] for m in page["data"]]
            if len(page["data"]) < 200:
                break
        assert sorted(stored) == expected
        assert broker.ready_count_sync() == 0
        assert broker.dead_letters_sync() == []
        bob.close()
    assert "Traceback" not in server.stderr
