"""Several real server processes on one database (PROTOCOL sections 9 and 10), with no broker and no further setting.

Each test starts real `python run.py` processes on one PostgreSQL database (made for the test) or one SQLite
file, sharing only the database and the token secret. Clients of any process get every event of any other once,
in log order, within a second; a cursor is valid on every process and across restarts (no reset); a process
killed with SIGKILL loses nothing it acknowledged; membership changes reach every process, also one whose
wake-up was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient

from chatserver import queries
from chatserver.admin import add_dialog, add_user
from chatserver.auth import TokenSigner
from chatserver.backends import open_store
from tests import pg
from tests.conftest import ALICE_PHONE, BOB_PHONE, CAROL_PHONE, PASSWORD, RECEIPT, Client, require_service
from tests.process import ROOT, ServerProcess
from tests.test_realtime import SseReader, eventually

SECRET = "cluster-test-secret-" + uuid.uuid4().hex


class Cluster:
    """Server processes on one database, and what a test needs to talk to them as Alice, Bob and Carol."""

    def __init__(self, tmp_path: Path, database: str, people: dict[str, str], dialog_id: str) -> None:
        self.tmp_path = tmp_path
        self.database = database
        self.people = people  # name -> user id
        self.dialog_id = dialog_id
        self.signer = TokenSigner(SECRET, 3600)
        self.servers: list[ServerProcess] = []
        self.clients: list[Client] = []

    async def start(self, *args: str, env: dict[str, str] | None = None, index: int | None = None) -> ServerProcess:
        folder = self.tmp_path / f"server{len(self.servers) if index is None else index}"
        environment = {"CHATSERVER_SECRET": SECRET,
                       "CHATSERVER_MESSAGE_RATE": "0", **(env or {})}
        server = await ServerProcess.start(folder, "--db", self.database, *args, env=environment)
        if index is None:
            self.servers.append(server)
        else:
            self.servers[index] = server
        return server

    def client(self, server: ServerProcess, name: str) -> Client:
        user_id = self.people[name]
        client = Client(server.url, None, user_id, token=self.signer.issue(user_id))  # type: ignore[arg-type]
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            client.close()
        for server in self.servers:
            await server.close()


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, store_kind: str) -> AsyncIterator[Cluster]:
    """A database with Alice and Bob in "Demo" (Carol in no dialog), and no server yet."""
    if store_kind == "postgres":
        require_service("PostgreSQL", pg.reachable())
        name = f"chatserver_test_{uuid.uuid4().hex[:12]}"
        pg.create_database(name)
        database = pg.url(name)
    else:
        name, database = "", str(tmp_path / "shared.db")
    store = open_store(database)
    await store.start()
    try:
        people = {
            "alice": (await add_user(store, ALICE_PHONE, "Alice", PASSWORD)).user_id,
            "bob": (await add_user(store, BOB_PHONE, "Bob", PASSWORD)).user_id,
            "carol": (await add_user(store, CAROL_PHONE, "Carol", PASSWORD)).user_id,
        }
        dialog = await add_dialog(store, "Demo", [ALICE_PHONE, BOB_PHONE])
    finally:
        await store.close()
    group = Cluster(tmp_path, database, people, dialog.dialog_id)
    try:
        yield group
    finally:
        await group.close()
        if name:
            pg.drop_database(name)


async def messages_of(ws: Any, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    return [await ws.next_of("message:new", timeout=timeout) for _ in range(count)]


def positions(events: list[dict[str, Any]]) -> list[int]:
    return [int(e["cursor"].rsplit(".", 1)[1]) for e in events]


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
@pytest.mark.gen_test(timeout=90)
async def test_processes_deliver_each_others_events_within_a_second_with_no_broker(
    tmp_path: Path, kind: str
) -> None:
    async with cluster(tmp_path, kind) as group:
        a, b = await group.start(), await group.start()
        alice_a, bob_b = group.client(a, "alice"), group.client(b, "bob")
        sockets = [await alice_a.websocket(), await bob_b.websocket(), await group.client(a, "bob").websocket()]
        loop = asyncio.get_running_loop()
        for sender in (alice_a, bob_b):
            started = loop.time()
            sent = await sender.post_message(group.dialog_id, f"from {sender.base_url}")
            for ws in sockets:
                assert (await ws.next_of("message:new", timeout=1.0))["data"] == sent
            assert loop.time() - started < 1.0 + 0.5  # the 201, then every client on either process
        # Typing crosses processes too, where a channel exists (PostgreSQL's NOTIFY; SQLite files need a broker).
        if kind == "postgres":
            sockets[0].send({"type": "dialog:join", "dialogId": group.dialog_id})
            await sockets[0].next_of("dialog:joined")
            status, _ = await bob_b.call("POST", f"/api/dialogs/{group.dialog_id}/typing", {"typing": True})
            assert status == 204
            assert (await sockets[0].next_of("typing:start", timeout=1.0))["data"]["userId"] == group.people["bob"]
        for ws in sockets:
            await ws.nothing_within(0.3)


@pytest.mark.gen_test(timeout=90)
async def test_a_cursor_from_one_process_resumes_on_another_over_every_transport(tmp_path: Path) -> None:
    async with cluster(tmp_path, "postgres") as group:
        a, b = await group.start(), await group.start()
        bob_a, bob_b, alice_a = group.client(a, "bob"), group.client(b, "bob"), group.client(a, "alice")
        ws = await bob_a.websocket()
        first = await alice_a.post_message(group.dialog_id, "seen on A")
        cursor = (await ws.next_of("message:new"))["cursor"]
        ws.close()
        missed = [await alice_a.post_message(group.dialog_id, f"missed {i}") for i in range(3)]
        expected = [m["messageId"] for m in missed]
        # WebSocket on B.
        again = await bob_b.websocket(cursor=cursor)
        assert again.ready["data"]["cursor"] == cursor
        assert [e["data"]["messageId"] for e in await messages_of(again, 3)] == expected
        # Long-poll on B.
        status, body = await bob_b.poll(cursor, timeout="0")
        assert status == 200 and [e["data"]["messageId"] for e in body["data"]["events"]] == expected
        # SSE on B, by Last-Event-ID as a browser resumes.
        reader = SseReader(bob_b, last_event_id=cursor)
        try:
            events = await reader.wait_for(4)
            assert events[0]["type"] == "ready"
            assert [e["data"]["messageId"] for e in events[1:]] == expected
        finally:
            reader.close()
        assert first["messageId"] not in expected
        # A cursor that only A has issued yet is not "ahead" on B: B reads the log first.
        fresh = await bob_a.websocket()
        await alice_a.post_message(group.dialog_id, "newest")
        newest_cursor = (await fresh.next_of("message:new"))["cursor"]
        status, body = await bob_b.poll(newest_cursor, timeout="0")
        assert status == 200 and body["data"]["events"] == []
        status, body = await bob_b.poll(newest_cursor.rsplit(".", 1)[0] + ".999999", timeout="0")
        assert status == 400 and "ahead" in body["error"]


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
@pytest.mark.gen_test(timeout=90)
async def test_a_restart_of_every_process_resumes_every_cursor_exactly_once_with_no_reset(
    tmp_path: Path, kind: str
) -> None:
    async with cluster(tmp_path, kind) as group:
        a = await group.start()
        alice, bob = group.client(a, "alice"), group.client(a, "bob")
        ws = await bob.websocket()
        await alice.post_message(group.dialog_id, "before the restart")
        cursor = (await ws.next_of("message:new"))["cursor"]
        missed = [await alice.post_message(group.dialog_id, f"missed {i}") for i in range(2)]
        ws.close()
        a.signal(signal.SIGTERM)
        assert await a.exit_code(20) == 0
        a = await group.start(index=0)
        bob = group.client(a, "bob")
        again = await bob.websocket(cursor=cursor)
        got = await messages_of(again, 2)
        assert [e["data"]["messageId"] for e in got] == [m["messageId"] for m in missed]
        await again.nothing_within(0.3)
        status, body = await bob.poll(cursor, timeout="0")
        # The resume acknowledged its cursor: Bob's receipt of the first message may follow (PROTOCOL section 11).
        kinds = [e["type"] for e in body["data"]["events"] if e["type"] != RECEIPT]
        assert status == 200 and kinds == ["message:new", "message:new"]


@pytest.mark.gen_test(timeout=120)
async def test_concurrent_writers_on_three_processes_give_gap_free_positions_seen_once_in_log_order(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path, "postgres") as group:
        servers = [await group.start() for _ in range(3)]
        watchers = [await group.client(server, "bob").websocket() for server in servers]
        writers = [group.client(server, name) for server in servers for name in ("alice", "bob")]
        per_writer = 15

        async def write(client: Client, n: int) -> list[str]:
            return [(await client.post_message(group.dialog_id, f"{client.base_url} {n} {i}"))["messageId"]
                    for i in range(per_writer)]

        sent = await asyncio.gather(*(write(client, n) for n, client in enumerate(writers)))
        total = per_writer * len(writers)
        seen = [await messages_of(ws, total, timeout=10) for ws in watchers]
        first = seen[0]
        # Every watcher, on whichever process, saw the same events in the same order: the log's.
        for other in seen[1:]:
            assert [e["cursor"] for e in other] == [e["cursor"] for e in first]
        numbers = positions(first)
        assert numbers == list(range(numbers[0], numbers[0] + total))  # gap-free, in order
        assert sorted(e["data"]["messageId"] for e in first) == sorted(i for ids in sent for i in ids)
        # Each writer's own messages appear in the order it wrote them (each waited for its 201).
        order = {e["data"]["messageId"]: k for k, e in enumerate(first)}
        for ids in sent:
            assert [order[i] for i in ids] == sorted(order[i] for i in ids)
        # History, read on any process, is the same order.
        history = await writers[0].call("GET", f"/api/messages/dialog/{group.dialog_id}?limit=200")
        assert [m["messageId"] for m in history[1]["data"]] == [e["data"]["messageId"] for e in first]
        for ws in watchers:
            await ws.nothing_within(0.3)


@pytest.mark.gen_test(timeout=120)
async def test_kill_9_mid_burst_loses_nothing_acknowledged_and_doubles_nothing(tmp_path: Path) -> None:
    async with cluster(tmp_path, "postgres") as group:
        a, b = await group.start(), await group.start()
        watcher = await group.client(b, "bob").websocket()
        alice = group.client(a, "alice")
        acknowledged: list[str] = []

        async def burst(n: int) -> None:
            for i in range(200):
                try:
                    status, body = await alice.call("POST", f"/api/messages/dialog/{group.dialog_id}",
                                                    {"content": f"burst {n} {i}", "clientMessageId": f"b{n}-{i}"})
                except (OSError, tornado.httpclient.HTTPClientError):  # the connection died with the process
                    return
                if status != 201:  # the process died under it: not acknowledged, so the client may not count on it
                    return
                acknowledged.append(body["data"]["messageId"])

        tasks = [asyncio.ensure_future(burst(n)) for n in range(4)]
        await eventually(lambda: len(acknowledged) >= 40, 20)
        os.kill(a.proc.pid, signal.SIGKILL)
        await asyncio.gather(*tasks)
        await a.proc.wait()
        # B's client gets each stored message once, in log order; every acknowledged one is among them.
        reader = group.client(b, "alice")
        _, page = await reader.call("GET", f"/api/messages/dialog/{group.dialog_id}?limit=200")
        stored = [m["messageId"] for m in page["data"]]
        while len(page["data"]) == 200:
            _, page = await reader.call("GET", f"/api/messages/dialog/{group.dialog_id}?limit=200&after={stored[-1]}")
            stored += [m["messageId"] for m in page["data"]]
        assert len(stored) == len(set(stored))
        assert set(acknowledged) <= set(stored)
        got = await messages_of(watcher, len(stored), timeout=10)
        assert [e["data"]["messageId"] for e in got] == stored
        numbers = positions(got)
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
        await watcher.nothing_within(0.3)
        # A retry of an acknowledged send (a client that never saw its 201) is the same message, stored once.
        retried = await group.client(b, "alice").post_message(group.dialog_id, "burst 0 0", clientMessageId="b0-0")
        assert retried["messageId"] == acknowledged[0] or retried["messageId"] in stored
        await watcher.nothing_within(0.3)


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
@pytest.mark.gen_test(timeout=90)
async def test_a_removed_member_loses_access_on_every_process_within_a_second_even_without_a_wake_up(
    tmp_path: Path, kind: str
) -> None:
    async with cluster(tmp_path, kind) as group:
        a, b = await group.start(), await group.start()
        bob_b = group.client(b, "bob")
        ws = await bob_b.websocket()
        alice_a = group.client(a, "alice")
        status, body = await alice_a.call("POST", "/api/dialogs", {"title": "Team", "memberIds": [group.people["bob"]]})
        assert status == 201, body
        team = body["data"]["dialogId"]
        await ws.next_of("dialog:update", timeout=1.5)
        assert (await bob_b.call("GET", f"/api/messages/dialog/{team}"))[0] == 200
        if kind == "postgres":
            # B's LISTEN connection is cut just before the change: B misses its NOTIFY and must not miss the change.
            name = group.database.rsplit("/", 1)[1]
            pg.execute(name, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE application_name = 'chatserver-listen' AND datname = current_database()")
        loop = asyncio.get_running_loop()
        removed_at = loop.time()
        status, body = await alice_a.call("PATCH", f"/api/dialogs/{team}", {"removeMemberIds": [group.people["bob"]]})
        assert status == 200, body
        update = await ws.next_of("dialog:update", timeout=1.5)
        assert group.people["bob"] not in update["data"]["memberIds"]

        async def refused() -> bool:
            status, _ = await bob_b.call("GET", f"/api/messages/dialog/{team}")
            return status == 403

        while not await refused():
            assert loop.time() - removed_at < 1.0, "B still let the removed member in after a second"
            await asyncio.sleep(0.05)
        await alice_a.post_message(team, "after bob was removed")
        await ws.nothing_within(0.5)


@pytest.mark.gen_test(timeout=90)
async def test_a_process_cut_off_from_the_database_catches_up_from_the_log_without_a_reset(tmp_path: Path) -> None:
    async with cluster(tmp_path, "postgres") as group:
        a, b = await group.start(), await group.start()
        ws = await group.client(b, "bob").websocket()
        name = group.database.rsplit("/", 1)[1]
        # Every connection of every server process is cut (B's included), and A writes on.
        pg.execute(name, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE application_name LIKE 'chatserver-%' AND datname = current_database()")
        alice = group.client(a, "alice")
        sent = []
        for i in range(5):
            for _ in range(50):  # A's own connections come back with its next write
                status, body = await alice.call("POST", f"/api/messages/dialog/{group.dialog_id}",
                                                {"content": f"while cut {i}", "clientMessageId": f"cut-{i}"})
                if status == 201:
                    sent.append(body["data"]["messageId"])
                    break
                await asyncio.sleep(0.1)
        assert len(sent) == 5
        got = await messages_of(ws, 5, timeout=10)
        assert [e["data"]["messageId"] for e in got] == sent
        await ws.nothing_within(0.3)


@pytest.mark.gen_test(timeout=60)
async def test_the_cli_changes_membership_and_every_running_process_follows(tmp_path: Path) -> None:
    async with cluster(tmp_path, "postgres") as group:
        a = await group.start()
        carol = group.client(a, "carol")
        ws = await carol.websocket()
        proc = await asyncio.create_subprocess_exec(
            "python3", "run.py", "dialogs", "members", "--dialog", group.dialog_id, "--add", CAROL_PHONE,
            "--db", group.database, cwd=str(ROOT),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "CHATSERVER_STATE_DIR": str(tmp_path / "cli")},
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err
        assert group.people["carol"] in out.decode()
        update = await ws.next_of("dialog:update", timeout=2)
        assert group.people["carol"] in update["data"]["memberIds"]
        sent = await group.client(a, "alice").post_message(group.dialog_id, "welcome carol")
        assert (await ws.next_of("message:new"))["data"] == sent
        store = open_store(group.database)
        await store.start()
        try:
            dialog = await store.read(queries.get_dialog, group.dialog_id)
            assert dialog is not None and group.people["carol"] in dialog.member_ids
        finally:
            await store.close()


@contextlib.asynccontextmanager
async def database_away(group: Cluster, client: Client) -> AsyncIterator[None]:
    """While inside, the group's PostgreSQL database accepts no new connection and every open one is cut; on
    leaving, it is back, and `client`'s REST calls are answered again (bounded wait)."""
    name = group.database.rsplit("/", 1)[1]
    pg.execute("postgres", f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    pg.execute("postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
    try:
        yield
    finally:
        pg.execute("postgres", f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    for _ in range(100):
        status, _ = await client.call("GET", "/api/dialogs")
        if status == 200:
            return
        await asyncio.sleep(0.1)


@pytest.mark.gen_test(timeout=120)
async def test_a_resume_the_database_cannot_serve_ends_the_stream_for_a_retry(tmp_path: Path) -> None:
    # Memory holds one event: a resume from before three messages is read from the database, which is away after
    # the stream's head went out. The stream ends as one the client retries (the WebSocket with 1013, "try again
    # later"; the SSE answer finished), with no error logged as a fault of the server; once the database is
    # back, the same cursor gets the three messages.
    async with cluster(tmp_path, "postgres") as group:
        a = await group.start(env={"CHATSERVER_HISTORY_SIZE": "1"})
        alice, bob = group.client(a, "alice"), group.client(a, "bob")
        live = await bob.websocket()  # Bob is known to the process from now on: no store call to authenticate him
        cursor = live.ready["data"]["cursor"]
        sent = [(await alice.post_message(group.dialog_id, f"m{n}"))["messageId"] for n in range(3)]
        assert [(await live.next_of("message:new"))["data"]["messageId"] for _ in sent] == sent
        async with database_away(group, alice):
            ws = await bob.websocket(cursor)
            assert await asyncio.wait_for(ws.conn.read_message(), 30) is None
            assert ws.conn.close_code == 1013, (ws.conn.close_code, a.stderr[-3000:])
            sse = SseReader(bob, cursor=cursor)
            response = await asyncio.wait_for(sse.fetch, 30)
            assert response.code == 200 and [e["type"] for _, e in sse.events] == ["ready"], sse.events
        ws = await bob.websocket(cursor)
        assert [(await ws.next_of("message:new", timeout=10))["data"]["messageId"] for _ in sent] == sent
        sse = SseReader(bob, cursor=cursor)
        try:
            assert [e["data"]["messageId"] for e in (await sse.wait_for(4, 10))[1:]] == sent
        finally:
            sse.close()
        faults = [line for line in a.lines if "Traceback" in line or "Cannot send error" in line]
        assert not faults, a.stderr[-3000:]


@pytest.mark.gen_test(timeout=90)
async def test_a_database_that_goes_away_is_503_and_then_everything_resumes(tmp_path: Path) -> None:
    async with cluster(tmp_path, "postgres") as group:
        a = await group.start()
        alice, bob = group.client(a, "alice"), group.client(a, "bob")
        ws = await bob.websocket()
        async with database_away(group, alice):
            for method, path, body in (("GET", "/api/dialogs", None),
                                       ("POST", f"/api/messages/dialog/{group.dialog_id}", {"content": "lost?"})):
                status, answer = await alice.call(method, path, body, timeout=30)
                assert status == 503, (status, answer, a.stderr[-3000:])
                assert answer["success"] is False and "unavailable" in answer["error"].lower()
            status, ready = await alice.call("GET", "/readyz", token="")
            assert status == 503 and "store" in ready["data"], ready
        # Back: writes are accepted again and reach the open WebSocket, which never got a reset.
        sent = await alice.post_message(group.dialog_id, "after the outage")
        got = await ws.next_of("message:new", "reset", timeout=5)
        assert got["type"] == "message:new" and got["data"] == sent
        assert all("Traceback" not in line for line in a.lines), a.stderr
