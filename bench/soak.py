"""The chaos soak: many clients on every transport, through restarts of the server and of RabbitMQ, lose nothing.

    python bench/soak.py --messages 100000 --clients 200 --dialogs 40 --duration 600 [--store sqlite|postgres]

One real server process (`run.py`) on a fresh database (a SQLite file, or a PostgreSQL database made for the run
and dropped after it), with a Chat3 queue of the run's own on the real RabbitMQ. Users and dialogs are seeded
through the store (`chatserver.backends.open_store`, `chatserver.queries`); tokens are minted with the server's
secret. Then, for `--duration` seconds:

- posters send the messages over REST, each with a `clientMessageId`, retrying on connection errors, timeouts
  and 503 with the same one (a few are sent twice on purpose: the second answer must name the same message);
- a Chat3 task publishes a share of the messages as `message.created` events to the run's exchange, with
  publisher confirms, republishing the same events when the broker was away;
- each client (one user, member of a few dialogs) follows its events in sessions: each session picks a
  transport (WebSocket, SSE or long-poll), resumes with the client's cursor, reads for a while, sometimes
  stalls reading (its socket buffers are small, so the server cuts it off as too slow), and disconnects;
- a chaos task stops the server with SIGTERM and with kill -9 and starts it again on the same port and
  database, and restarts RabbitMQ (`rabbitmqctl stop_app` / `start_app`), in turn, every `--chaos-interval`.

At the end every client catches up, and what it holds is compared with the truth, each dialog's history over
REST: every message exactly once, in order, and nothing of a dialog it is not in. The log is durable, so a
reset is expected only as `expired`; a client that gets one reloads the history and goes on (counted). Every
acknowledged (201) message and every confirmed Chat3 event must be in the history, and a `clientMessageId`
must be stored once. The counts are printed (and written as JSON with `--report`); any loss, duplicate, order
violation, unexpected reset or unacknowledged failure is a non-zero exit.

Every wait is bounded. The clients are raw asyncio sockets (HTTP/1.1, RFC 6455 frames, text/event-stream), so
that their receive buffers can be made small enough for a stall to matter.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatserver import jsonutil, queries  # noqa: E402
from chatserver.auth import DUMMY_HASH, TokenSigner  # noqa: E402
from chatserver.backends import open_store  # noqa: E402
from chatserver.models import Dialog, User, new_id, now_iso  # noqa: E402

SECRET = "soak-secret-not-for-production"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
POSTGRES_ADMIN = os.environ.get("CHATSERVER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
TRANSPORTS = ("ws", "sse", "poll")
CHAOS_KINDS = ("sigterm", "kill", "broker")
# A client's receive buffer: small, so that a client that stops reading fills it (and the server's bound) soon.
CLIENT_RCVBUF = 1024
READER_LIMIT = 1024
CLIENT_SEGMENT = 1400
CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 15.0
POLL_TIMEOUT = 5  # seconds a poll parks on the server
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
BROKER_TIMEOUT = 90.0
CATCH_UP_TIMEOUT = 120.0
POST_GIVE_UP = 120.0  # seconds of failed attempts after which one message counts as failed
HISTORY_PAGE = 200
PROGRESS_EVERY = 10.0


class ProtocolFault(Exception):
    """The server answered something a client of the protocol must never see (a 4xx for a valid request...)."""


# -- HTTP/1.1 and RFC 6455 over raw sockets ---------------------------------------------------------------------


async def connect(port: int, *, small: bool = False) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if small:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
        # Loopback's segments are 64 kB, and the server's send buffer is sized from them (about a megabyte,
        # which would hold minutes of a stalled client's events): a small segment makes it an ordinary one.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, CLIENT_SEGMENT)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), CONNECT_TIMEOUT)
        return await asyncio.open_connection(sock=sock, limit=READER_LIMIT if small else 2**16)
    except BaseException:
        sock.close()
        raise


def request_head(method: str, path: str, token: str, *, body: bytes | None = None, extra: str = "") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {token}"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode() + (body or b"")


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ", 2)[1]), headers


async def body_chunks(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The body, as it arrives: by Content-Length, chunked, or to the end of the connection."""
    if "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    else:
        while chunk := await reader.read(65536):
            yield chunk


class Http:
    """One kept-alive HTTP/1.1 connection for request/response calls; reopened when the server closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def call(self, method: str, path: str, token: str, body: Any = None,
                   timeout: float = REQUEST_TIMEOUT) -> tuple[int, Any]:
        """(status, decoded body). Raises OSError, asyncio.TimeoutError or IncompleteReadError when the
        connection fails; the connection is then dropped."""
        try:
            return await asyncio.wait_for(self._call(method, path, token, body), timeout)
        except BaseException:
            self.close()
            raise

    async def _call(self, method: str, path: str, token: str, body: Any) -> tuple[int, Any]:
        if self._conn is None:
            self._conn = await connect(self.port)
        reader, writer = self._conn
        writer.write(request_head(method, path, token, body=jsonutil.dumps_bytes(body) if body is not None else None))
        status, headers = await read_head(reader)
        raw = b"".join([chunk async for chunk in body_chunks(reader, headers)])
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, jsonutil.loads(raw) if raw else None

    def close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None


def ws_frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    head = bytes([0x80 | opcode])
    if len(payload) < 126:
        head += bytes([0x80 | len(payload)])
    elif len(payload) < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", len(payload))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def ws_messages(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> AsyncIterator[bytes]:
    """The server's messages; pings answered; ends at its Close (raising ConnectionClosed with its code)."""
    parts: list[bytes] = []
    while True:
        first, second = await reader.readexactly(2)
        opcode, length = first & 0x0F, second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await reader.readexactly(8))
        payload = await reader.readexactly(length)
        if opcode == 0x8:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            with contextlib.suppress(OSError):
                writer.write(ws_frame(0x8, payload[:2]))
            raise ConnectionClosed(code)
        if opcode == 0x9:
            writer.write(ws_frame(0xA, payload))
        elif opcode in (0x0, 0x1, 0x2):
            parts.append(payload)
            if first & 0x80:
                yield b"".join(parts)
                parts = []


class ConnectionClosed(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"closed with {code}")
        self.code = code


# -- what the run counts ----------------------------------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += n


class SoakClient:
    """One user following its dialogs in sessions of random transports, with its cursor across all of them."""

    def __init__(self, soak: Soak, index: int, user_id: str, token: str, dialogs: list[str]) -> None:
        self.soak = soak
        self.index = index
        self.user_id = user_id
        self.token = token
        self.dialogs = set(dialogs)
        self.rng = random.Random(soak.seed * 1_000_003 + index)
        self._cursor: str | None = None
        self.got: dict[str, list[str]] = {d: [] for d in dialogs}
        self.seen: dict[str, set[str]] = {d: set() for d in dialogs}
        self.reloaded: dict[str, set[str]] = {d: set() for d in dialogs}
        self.transport = ""
        self.stalled = False
        self.connected = False  # this session got its handshake's answer
        self.http = Http(soak.port)

    @property
    def tally(self) -> Tally:
        return self.soak.tally

    @property
    def cursor(self) -> str | None:
        return self._cursor

    @cursor.setter
    def cursor(self, value: str) -> None:
        if self._cursor is None:
            self.soak.took_first_cursor()
        self._cursor = value

    # -- events ----------------------------------------------------------------------------------------------

    async def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "ready":
            if self.cursor is None:
                self.cursor = event["data"]["cursor"]
            elif event["data"]["cursor"] != self.cursor:
                self.tally.add("ready_cursor_mismatch")
            return
        if kind == "reset":
            await self.reset(event)
            return
        if kind == "message:new":
            message = event["data"]
            dialog_id = message["dialogId"]
            self.tally.add("deliveries")
            if dialog_id not in self.dialogs:
                self.tally.add("foreign_deliveries")
            elif message["messageId"] in self.reloaded[dialog_id]:
                self.reloaded[dialog_id].discard(message["messageId"])
            else:
                if message["messageId"] in self.seen[dialog_id]:
                    self.tally.add("duplicates_seen")
                self.seen[dialog_id].add(message["messageId"])
                self.got[dialog_id].append(message["messageId"])
        elif kind != "pong":
            self.tally.add(f"events_{kind}")
        if event.get("cursor"):
            self.cursor = event["cursor"]

    async def reset(self, event: dict[str, Any]) -> None:
        """The protocol's reset: take the cursor first, reload every dialog over REST, go on from the cursor."""
        reason = event["data"]["reason"]
        self.tally.add(f"resets_{reason}")
        self.cursor = event["data"]["cursor"]
        for dialog_id in self.dialogs:
            history = await self.soak.history(self.http, self.token, dialog_id)
            already = set(self.got[dialog_id])
            self.got[dialog_id] = history
            self.seen[dialog_id] = set(history)
            # Events after the reset's cursor may repeat what the reload already holds: removed by messageId.
            self.reloaded[dialog_id] = set(history) - already

    # -- sessions --------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            transport = self.rng.choice(TRANSPORTS)
            if self.transport and transport != self.transport:
                self.tally.add(f"switches_to_{transport}")
            self.transport = transport
            length = self.rng.uniform(0.5, self.soak.session_max)
            stall = self.rng.uniform(0.5, self.soak.stall_max) if self.rng.random() < self.soak.stall_share else 0.0
            await self.session(transport, length, stall, stop)

    async def session(self, transport: str, length: float, stall: float, stop: asyncio.Event | None) -> None:
        """Follow the events for `length` seconds (stalling `stall` of them, at a random point), then hang up."""
        self.tally.add(f"sessions_{transport}")
        started = time.monotonic()
        try:
            if transport == "poll":
                await asyncio.wait_for(self.polls(length, stall, stop), length + stall + REQUEST_TIMEOUT)
            else:
                await asyncio.wait_for(self.stream(transport, length, stall), length + stall + REQUEST_TIMEOUT)
            self.tally.add("disconnects")
        except ConnectionClosed as closed:
            self.tally.add(f"closed_{closed.code}")
        except (TimeoutError, OSError, EOFError, asyncio.IncompleteReadError):
            # The server went away (a restart) or cut the connection (a stall): resume after a moment.
            if not self.connected:
                self.tally.add("connects_refused")
            else:
                self.tally.add("dropped_after_stall" if self.stalled else "dropped")
        except ProtocolFault:
            self.tally.add("protocol_faults")
        finally:
            self.stalled = self.connected = False
        if time.monotonic() - started < 0.2:
            await asyncio.sleep(self.rng.uniform(0.2, 0.6))  # refused: the server is restarting

    async def stream(self, transport: str, length: float, stall: float) -> None:
        reader, writer = await connect(self.soak.port, small=True)
        try:
            query = f"?cursor={quote(self.cursor)}" if self.cursor else ""
            if transport == "ws":
                key = base64.b64encode(os.urandom(16)).decode()
                extra = (f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                         "Sec-WebSocket-Version: 13\r\n")
                writer.write(request_head("GET", "/ws" + query, self.token, extra=extra))
                status, _ = await asyncio.wait_for(read_head(reader), REQUEST_TIMEOUT)
                self.check_status(status, 101)
                source = ws_messages(reader, writer)
            else:
                writer.write(request_head("GET", "/api/events" + query, self.token))
                status, headers = await asyncio.wait_for(read_head(reader), REQUEST_TIMEOUT)
                self.check_status(status, 200)
                source = sse_events(body_chunks(reader, headers))
            await self.follow(source, length, stall)
            if transport == "ws":
                writer.write(ws_frame(0x8, struct.pack("!H", 1000)))
        finally:
            writer.close()

    def check_status(self, status: int, expected: int) -> None:
        self.connected = True
        if status == 503:
            raise ConnectionResetError("503: shutting down")
        if status != expected:
            self.tally.add(f"refused_{status}")
            raise ProtocolFault(f"client {self.index} got {status}")

    async def follow(self, source: AsyncIterator[bytes], length: float, stall: float) -> None:
        """Apply the stream's events for `length` seconds; a stall holds the next one unread for `stall` seconds
        (and so everything behind it: the socket's buffers fill, then the server's bound)."""
        gate = asyncio.Event()
        gate.set()

        async def pump() -> None:
            async for raw in source:
                await gate.wait()
                await self.apply(jsonutil.loads(raw))
            raise EOFError("the stream ended")

        task = asyncio.ensure_future(pump())
        try:
            stall_at = self.rng.uniform(0, length) if stall else length
            await self.running(task, stall_at)
            if stall:
                self.tally.add("stalls")
                self.stalled = True
                gate.clear()
                await self.running(task, stall)
                gate.set()
                await self.running(task, length - stall_at)
        finally:
            task.cancel()
            await asyncio.wait({task})  # its end, without its error; a cancellation of this one still stops it

    @staticmethod
    async def running(task: asyncio.Future[None], seconds: float) -> None:
        """Wait `seconds`, or less if the task ends first (then with its exception)."""
        done, _ = await asyncio.wait({task}, timeout=max(seconds, 0))
        if done:
            task.result()
            raise EOFError("the stream ended")

    async def polls(self, length: float, stall: float, stop: asyncio.Event | None) -> None:
        deadline = time.monotonic() + length
        stall_at = time.monotonic() + self.rng.uniform(0, length) if stall else None
        while time.monotonic() < deadline:
            if stall_at is not None and time.monotonic() >= stall_at:
                self.tally.add("stalls")  # the cursor is the acknowledgement: a stall is a poll not sent
                self.stalled = True
                await asyncio.sleep(stall)
                stall_at = None
            if self.cursor is None:
                path = "/api/poll"
            else:
                wait = max(0, min(POLL_TIMEOUT, int(deadline - time.monotonic())))
                path = f"/api/poll?cursor={quote(self.cursor)}&timeout={wait}"
            status, body = await self.http.call("GET", path, self.token, timeout=POLL_TIMEOUT + REQUEST_TIMEOUT)
            if status == 503:
                raise ConnectionResetError("503")
            self.check_status(status, 200)
            data = body["data"]
            for event in data["events"]:
                await self.apply(event)
            self.cursor = data["cursor"]
        self.http.close()

    async def catch_up(self, truth: dict[str, list[str]], limit: float) -> bool:
        """Sessions without stalls until this client holds at least as many messages as the truth."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if all(len(set(self.got[d])) >= len(truth[d]) for d in self.dialogs):
                return True
            transport = self.rng.choice(TRANSPORTS)
            await self.session(transport, min(3.0, max(0.5, deadline - time.monotonic())), 0.0, None)
        return all(len(set(self.got[d])) >= len(truth[d]) for d in self.dialogs)


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The `data:` of each event of a text/event-stream."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            data = [line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
            if data:
                yield b"\n".join(data)


# -- the server, the broker and the database -------------------------------------------------------------------


class Server:
    """`python run.py` on a fixed port and database, stopped and started again at will."""

    def __init__(self, port: int, database: str, state: Path, env: dict[str, str]) -> None:
        self.port = port
        self.database = database
        self.state = state
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.log = state / "server.log"
        # The server's code as it was when the run began: every restart runs the same code, whatever changes in
        # the working tree meanwhile.
        self.code = state / "code"
        shutil.copytree(ROOT, self.code, ignore=shutil.ignore_patterns(
            ".git", "var", "__pycache__", "*.pyc", "bench", "tests", "node_modules", ".ruff_cache", ".pytest_cache"))

    async def start(self) -> None:
        log = self.log.open("ab")  # a local file, opened once per start: nothing to wait for
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(self.code / "run.py"), "--port", str(self.port), "--db", self.database,
                cwd=str(self.code), env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.tail()}")
            try:
                _, writer = await connect(self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError(f"the server did not listen within {START_TIMEOUT:.0f} s: {self.tail()}")

    async def stop(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            code = await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 10)
            raise RuntimeError(f"the server did not exit within {STOP_TIMEOUT:.0f} s of {sig.name}") from None
        return code

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def rabbitmqctl(command: str) -> None:
    subprocess.run(["rabbitmqctl", command], check=True, capture_output=True, timeout=BROKER_TIMEOUT)


class Chat3:
    """Chat3's side of the run's exchange: publish with confirms, again after the broker was away."""

    def __init__(self, tag: str) -> None:
        self.exchange = f"soak.chat3.{tag}"
        self.queue = f"soak.chatserver.{tag}"
        self._connection: Any = None
        self._channel: Any = None

    def publish_sync(self, bodies: list[bytes]) -> None:
        import pika

        if self._channel is None or self._channel.is_closed:
            self.close_sync()
            params = pika.URLParameters(AMQP_URL)
            params.socket_timeout = 5
            params.blocked_connection_timeout = 10
            self._connection = pika.BlockingConnection(params)
            self._channel = self._connection.channel()
            self._channel.exchange_declare(self.exchange, "topic", durable=True)
            self._channel.confirm_delivery()
        for body in bodies:
            self._channel.basic_publish(self.exchange, "message.created", body,
                                        pika.BasicProperties(delivery_mode=2), mandatory=True)

    def close_sync(self) -> None:
        with contextlib.suppress(Exception):
            if self._connection is not None and self._connection.is_open:
                self._connection.close()
        self._connection = self._channel = None

    def delete_sync(self) -> None:
        import pika

        self.close_sync()
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            channel = connection.channel()
            channel.queue_delete(self.queue)
            channel.exchange_delete(self.exchange)
        finally:
            connection.close()


async def make_database(store: str, tmp: Path, tag: str) -> tuple[str, Callable[[], Awaitable[None]]]:
    """The run's database (a path or a URL), and how to drop it."""
    if store == "sqlite":
        async def nothing() -> None:
            return None

        return str(tmp / "soak.db"), nothing
    import asyncpg

    name = f"soak_{tag}"
    admin = await asyncpg.connect(POSTGRES_ADMIN, timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()

    async def drop() -> None:
        conn = await asyncpg.connect(POSTGRES_ADMIN, timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    return urlunsplit(urlsplit(POSTGRES_ADMIN)._replace(path="/" + name)), drop


# -- the run ----------------------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, port: int, tag: str) -> None:
        self.args = args
        self.seed = args.seed
        self.port = port
        self.rng = random.Random(args.seed)
        self.tally = Tally()
        self.session_max = args.session_max
        self.stall_max = args.stall_max
        self.stall_share = args.stall_share
        self.tokens: dict[str, str] = {}
        self.members: dict[str, list[str]] = {}
        self.clients: list[SoakClient] = []
        self.acked: dict[str, str] = {}  # clientMessageId -> messageId answered 201
        self.chat3_ids: set[str] = set()
        self.failed_posts: list[str] = []
        self.chat3 = Chat3(tag)
        self.with_cursor = 0
        self.tasks: list[asyncio.Future[None]] = []
        self.cursors_taken = asyncio.Event()
        self.chat3_thread = ThreadPoolExecutor(1)  # one BlockingConnection, used from one thread
        self.chat3_lock = asyncio.Lock()

    async def seed_data(self, database: str) -> None:
        """Users and dialogs, straight through the store (no scrypt per user: a dummy hash; nobody logs in)."""
        args = self.args
        store = open_store(database)
        await store.start()
        try:
            users = [User(new_id("usr"), f"soak {n}", f"7{n:010d}") for n in range(args.clients)]
            await asyncio.gather(*(store.write(queries.create_user, u, DUMMY_HASH) for u in users))
            per_client = min(args.dialogs_per_client, args.dialogs)
            membership: dict[int, set[int]] = defaultdict(set)
            for n in range(args.clients):
                # Every dialog gets members, and every client its share of dialogs.
                membership[n % args.dialogs].add(n)
                for d in self.rng.sample(range(args.dialogs), per_client - 1):
                    membership[d].add(n)
            stamp = now_iso()
            dialogs = [Dialog(new_id("dlg"), f"soak {d}", tuple(users[n].user_id for n in sorted(membership[d])),
                              stamp, stamp) for d in range(args.dialogs)]
            await asyncio.gather(*(store.write(queries.save_dialog, dialog) for dialog in dialogs))
        finally:
            await store.close()
        signer = TokenSigner(SECRET, 7 * 24 * 3600)
        self.tokens = {u.user_id: signer.issue(u.user_id) for u in users}
        self.members = {dialog.dialog_id: list(dialog.member_ids) for dialog in dialogs}
        of_user: dict[str, list[str]] = defaultdict(list)
        for dialog_id, member_ids in self.members.items():
            for user_id in member_ids:
                of_user[user_id].append(dialog_id)
        self.clients = [SoakClient(self, n, u.user_id, self.tokens[u.user_id], of_user[u.user_id])
                        for n, u in enumerate(users)]

    def spawn(self, *work: Coroutine[Any, Any, None]) -> list[asyncio.Future[None]]:
        """Tasks of the run, cancelled at its end however it ends."""
        tasks = [asyncio.ensure_future(one) for one in work]
        self.tasks += tasks
        return tasks

    def took_first_cursor(self) -> None:
        self.with_cursor += 1
        if self.with_cursor == len(self.clients):
            self.cursors_taken.set()

    async def history(self, http: Http, token: str, dialog_id: str) -> list[str]:
        """Every message id of the dialog over REST, oldest first (the truth of its order): pages from the newest
        back, each the one before the oldest of the last."""
        ids: list[str] = []
        before = ""
        for _ in range(100_000):
            path = f"/api/messages/dialog/{dialog_id}?limit={HISTORY_PAGE}" + (f"&before={before}" if before else "")
            status, body = await self.retrying(lambda p=path: http.call("GET", p, token))
            if status != 200:
                raise ProtocolFault(f"history of {dialog_id}: {status} {body}")
            page = [m["messageId"] for m in body["data"]]
            ids[:0] = page
            if len(page) < HISTORY_PAGE:
                return ids
            before = page[0]
        raise ProtocolFault("history without an end")

    async def retrying(self, call: Callable[[], Awaitable[tuple[int, Any]]]) -> tuple[int, Any]:
        """A call retried while the server is away (connection errors, timeouts, 503), for at most POST_GIVE_UP."""
        deadline = time.monotonic() + POST_GIVE_UP
        while True:
            try:
                status, body = await call()
                if status != 503:
                    return status, body
            except (TimeoutError, OSError, EOFError, asyncio.IncompleteReadError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not answer in time")
            self.tally.add("request_retries")
            await asyncio.sleep(0.2)

    # -- writers ---------------------------------------------------------------------------------------------

    def plan(self) -> list[tuple[str, str, str]]:
        """(dialogId, senderId, kind) of each message, in the order they are sent."""
        dialog_ids = list(self.members)
        return [(d, self.rng.choice(self.members[d]), "chat3" if self.rng.random() < self.args.chat3_share else "rest")
                for d in (self.rng.choice(dialog_ids) for _ in range(self.args.messages))]

    def content(self, n: int) -> str:
        words = ("soak", "сообщение", "🙂", "chaos", "ἀλήθεια", "x" * 40)
        return f"#{n} " + " ".join(self.rng.choice(words) for _ in range(self.rng.randint(3, self.args.words)))

    async def post_all(self, plan: list[tuple[str, str, str]], started: float) -> None:
        rate = len(plan) / self.args.duration
        queue: asyncio.Queue[tuple[int, str, str] | None] = asyncio.Queue(maxsize=1000)

        async def feed() -> None:
            chat3_batch: list[tuple[int, str, str]] = []
            for n, (dialog_id, sender, kind) in enumerate(plan):
                due = started + n / rate
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
                if kind == "rest":
                    await queue.put((n, dialog_id, sender))
                else:
                    chat3_batch.append((n, dialog_id, sender))
                    if len(chat3_batch) >= 20:
                        chat3_tasks.append(asyncio.ensure_future(self.publish_chat3(chat3_batch)))
                        chat3_batch = []
            if chat3_batch:
                chat3_tasks.append(asyncio.ensure_future(self.publish_chat3(chat3_batch)))
            for _ in posters:
                await queue.put(None)

        chat3_tasks: list[asyncio.Future[None]] = []
        posters = [asyncio.ensure_future(self.poster(queue)) for _ in range(self.args.posters)]
        await feed()
        await asyncio.gather(*posters)
        await asyncio.gather(*chat3_tasks)

    async def poster(self, queue: asyncio.Queue[tuple[int, str, str] | None]) -> None:
        http = Http(self.port)
        try:
            while (item := await queue.get()) is not None:
                n, dialog_id, sender = item
                client_id = f"soak-{n}"
                body = {"content": self.content(n), "clientMessageId": client_id}
                message_id = await self.post(http, dialog_id, sender, body)
                if message_id is None:
                    self.failed_posts.append(client_id)
                    continue
                self.acked[client_id] = message_id
                if self.rng.random() < self.args.resend_share:
                    # A retry of a send that was answered: the same message, and nothing new published.
                    self.tally.add("deliberate_resends")
                    again = await self.post(http, dialog_id, sender, body)
                    if again != message_id:
                        self.tally.add("idempotency_violations")
        finally:
            http.close()

    async def post(self, http: Http, dialog_id: str, sender: str, body: dict[str, Any]) -> str | None:
        path = f"/api/messages/dialog/{dialog_id}"
        deadline = time.monotonic() + POST_GIVE_UP
        attempt = 0
        while time.monotonic() < deadline:
            attempt += 1
            if attempt > 1:
                self.tally.add("post_retries")
                await asyncio.sleep(0.1 + 0.1 * min(attempt, 5))
            try:
                status, answer = await http.call("POST", path, self.tokens[sender], body)
            except (TimeoutError, OSError, EOFError, asyncio.IncompleteReadError):
                continue
            if status == 201:
                self.tally.add("posts_acknowledged")
                return str(answer["data"]["messageId"])
            if status in (503, 429):
                continue
            self.tally.add(f"posts_refused_{status}")
            return None
        return None

    async def publish_chat3(self, batch: list[tuple[int, str, str]]) -> None:
        bodies, ids = [], []
        for n, dialog_id, sender in batch:
            stamp = now_iso()
            message_id = new_id("msg")
            ids.append(message_id)
            bodies.append(jsonutil.dumps_bytes({"event": "message.created", "data": {
                "messageId": message_id, "dialogId": dialog_id, "senderId": sender, "content": self.content(n),
                "type": "text", "meta": {"chat3": n}, "createdAt": stamp, "updatedAt": stamp,
                "clientMessageId": None}}))
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + POST_GIVE_UP
        async with self.chat3_lock:
            while True:
                try:
                    await asyncio.wait_for(loop.run_in_executor(self.chat3_thread, self.chat3.publish_sync, bodies), 30)
                    break
                except Exception:
                    # The broker went away before it confirmed them all: publish the same events again (the server
                    # stores each once, by messageId).
                    await loop.run_in_executor(self.chat3_thread, self.chat3.close_sync)
                    self.tally.add("chat3_republished_batches")
                    if time.monotonic() > deadline:
                        self.tally.add("chat3_failed", len(ids))
                        return
                    await asyncio.sleep(0.5)
        self.chat3_ids.update(ids)
        self.tally.add("chat3_events_confirmed", len(ids))

    # -- chaos -----------------------------------------------------------------------------------------------

    async def chaos(self, server: Server, stop: asyncio.Event) -> None:
        kinds = [k for k in CHAOS_KINDS if k != "broker" or not self.args.no_broker_restart]
        turn = 0
        while True:
            # Every kind at least once, however short the run; then until the writers are done.
            if turn >= len(kinds) and stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.args.chaos_interval)
            kind = kinds[turn % len(kinds)]
            turn += 1
            if kind == "broker":
                loop = asyncio.get_running_loop()
                try:
                    await loop.run_in_executor(None, rabbitmqctl, "stop_app")
                    await asyncio.sleep(self.rng.uniform(1.0, 3.0))
                finally:
                    await loop.run_in_executor(None, rabbitmqctl, "start_app")
            else:
                sig = signal.SIGTERM if kind == "sigterm" else signal.SIGKILL
                await self.count_cut_offs()
                code = await server.stop(sig)
                if sig is signal.SIGTERM and code != 0:
                    self.tally.add("sigterm_exit_nonzero")
                await asyncio.sleep(self.rng.uniform(0.2, 1.0))
                await server.start()
            self.tally.add(f"restarts_{kind}")

    async def progress(self, started: float) -> None:
        """A line on stderr every PROGRESS_EVERY seconds: where a long run stands."""
        names = ("posts_acknowledged", "chat3_events_confirmed", "deliveries", "restarts_sigterm", "restarts_kill",
                 "restarts_broker", "stalls")
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            counts = ", ".join(f"{name} {self.tally.counts[name]}" for name in names)
            print(f"[{time.monotonic() - started:6.0f} s] {counts}", file=sys.stderr, flush=True)

    async def count_cut_offs(self) -> None:
        """Add the server's count of clients it cut off as too slow (its metrics start afresh at each start)."""
        try:
            reader, writer = await connect(self.port)
            try:
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                _, headers = await asyncio.wait_for(read_head(reader), 5)
                text = b"".join([c async for c in body_chunks(reader, headers)]).decode()
            finally:
                writer.close()
        except (TimeoutError, OSError, EOFError, asyncio.IncompleteReadError):
            self.tally.add("metrics_unread")
            return
        for line in text.splitlines():
            if line.startswith("chatserver_slow_clients_closed_total "):
                self.tally.add("cut_off_as_slow", int(float(line.split()[1])))

    # -- the check -------------------------------------------------------------------------------------------

    async def truth(self) -> dict[str, list[str]]:
        """Each dialog's history over REST, once every acknowledged message and confirmed Chat3 event is in it."""
        http = Http(self.port)
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        try:
            while True:
                truth = {}
                for dialog_id, member_ids in self.members.items():
                    truth[dialog_id] = await self.history(http, self.tokens[member_ids[0]], dialog_id)
                stored = {m for ids in truth.values() for m in ids}
                missing = (set(self.acked.values()) | self.chat3_ids) - stored
                if not missing or time.monotonic() > deadline:
                    self.tally.add("acknowledged_lost", len(set(self.acked.values()) - stored))
                    self.tally.add("chat3_lost", len(self.chat3_ids - stored))
                    return truth
                await asyncio.sleep(1.0)  # Chat3 events still queued on the broker
        finally:
            http.close()

    def compare(self, truth: dict[str, list[str]]) -> None:
        for client in self.clients:
            for dialog_id in client.dialogs:
                expected = truth[dialog_id]
                got = client.got[dialog_id]
                where = {m: i for i, m in enumerate(expected)}
                self.tally.add("expected_deliveries", len(expected))
                self.tally.add("losses", len(set(expected) - set(got)))
                self.tally.add("duplicates", len(got) - len(set(got)))
                self.tally.add("unknown_messages", len(set(got) - set(expected)))
                order = [where[m] for m in dict.fromkeys(got) if m in where]
                self.tally.add("order_violations", sum(1 for a, b in itertools.pairwise(order) if b < a))
        stored = Counter(m for ids in truth.values() for m in ids)
        self.tally.add("messages_stored", len(stored))
        # Exactly what was sent is stored: each acknowledged send once, each confirmed Chat3 event once.
        self.tally.add("stored_not_sent", abs(len(stored) - len(set(self.acked.values()) | self.chat3_ids)))
        self.tally.add("stored_twice", sum(n - 1 for n in stored.values() if n > 1))
        by_client_id = Counter(self.acked.values())
        self.tally.add("acked_ids_shared", sum(n - 1 for n in by_client_id.values() if n > 1))


FAILURES = ("losses", "duplicates", "order_violations", "unknown_messages", "foreign_deliveries", "acknowledged_lost",
            "chat3_lost", "chat3_failed", "stored_twice", "acked_ids_shared", "idempotency_violations",
            "resets_restarted", "posts_failed", "protocol_faults", "ready_cursor_mismatch", "clients_behind",
            "sigterm_exit_nonzero", "timed_out", "stored_not_sent")


async def exercise(soak: Soak, server: Server, database: str, started_at: float) -> None:
    """The run itself: seed, start, write through the chaos, stop it, catch every client up, compare."""
    await soak.seed_data(database)
    await server.start()
    stop_clients, stop_chaos = asyncio.Event(), asyncio.Event()
    clients = soak.spawn(*(c.run(stop_clients) for c in soak.clients))
    # Every client holds its first cursor before the first message: from then on it misses nothing.
    await asyncio.wait_for(soak.cursors_taken.wait(), START_TIMEOUT)
    [chaos, progress] = soak.spawn(soak.chaos(server, stop_chaos), soak.progress(started_at))
    await soak.post_all(soak.plan(), time.monotonic())
    stop_chaos.set()
    await chaos
    stop_clients.set()
    await asyncio.gather(*clients)
    soak.tally.add("posts_failed", len(soak.failed_posts))
    truth = await soak.truth()
    behind = await asyncio.gather(*(c.catch_up(truth, CATCH_UP_TIMEOUT) for c in soak.clients))
    soak.tally.add("clients_behind", behind.count(False))
    soak.compare(truth)
    progress.cancel()
    await soak.count_cut_offs()
    if await server.stop(signal.SIGTERM) != 0:
        soak.tally.add("sigterm_exit_nonzero")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tag = f"{os.getpid()}_{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    port = args.port or free_port()
    database, drop_database = await make_database(args.store, tmp, tag)
    soak = Soak(args, port, tag)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSERVER_")}
    env.update(
        CHATSERVER_STATE_DIR=str(tmp / "state"),
        CHATSERVER_SECRET=SECRET,
        CHATSERVER_LOG_LEVEL="warning",
        CHATSERVER_SHUTDOWN_GRACE="3",
        CHATSERVER_MESSAGE_RATE="0",
        CHATSERVER_CLIENT_BUFFER_LIMIT=str(args.client_buffer_limit),
        CHATSERVER_AMQP_URL=AMQP_URL,
        CHATSERVER_CHAT3_EXCHANGE=soak.chat3.exchange,
        CHATSERVER_CHAT3_QUEUE=soak.chat3.queue,
    )
    server = Server(port, database, tmp, env)
    started_at = time.monotonic()
    try:
        await asyncio.wait_for(exercise(soak, server, database, started_at), args.timeout)
    except TimeoutError:
        soak.tally.add("timed_out")
    finally:
        for task in soak.tasks:
            task.cancel()  # what an early end left running
        await asyncio.gather(*soak.tasks, return_exceptions=True)
        await server.close()
        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(None, soak.chat3.delete_sync)
        soak.chat3_thread.shutdown(wait=False)
        await drop_database()
        if server.log.exists() and args.server_log:
            shutil.copy(server.log, args.server_log)
        elif server.log.exists() and args.report and any(soak.tally.counts.get(name) for name in FAILURES):
            shutil.copy(server.log, args.report + ".server.log")
        shutil.rmtree(tmp, ignore_errors=True)
    counts = dict(sorted(soak.tally.counts.items()))
    failures = {name: counts[name] for name in FAILURES if counts.get(name)}
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "store": args.store,
        "messages": args.messages,
        "clients": args.clients,
        "dialogs": args.dialogs,
        "seconds": round(time.monotonic() - started_at, 1),
        "counts": counts,
        "failures": failures,
    }


async def interruptible(work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """`work`, cancelled by SIGTERM or SIGINT: its cleanup (the server, the broker's names, the database) runs."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    return await task


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000, help="messages sent, over REST and Chat3")
    parser.add_argument("--clients", type=int, default=200, help="clients, one user each")
    parser.add_argument("--dialogs", type=int, default=40)
    parser.add_argument("--dialogs-per-client", type=int, default=3)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds the messages are spread over")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--report", help="write the counts as JSON to this file")
    parser.add_argument("--timeout", type=float, default=0.0,
                        help="seconds the whole run may take (default: three times --duration, plus ten minutes)")
    parser.add_argument("--server-log", help="keep the server's log (every start of it) in this file")
    parser.add_argument("--port", type=int, default=0, help="the server's port (default: a free one)")
    parser.add_argument("--posters", type=int, default=8, help="REST senders at once")
    parser.add_argument("--chat3-share", type=float, default=0.1, help="share of the messages sent as Chat3 events")
    parser.add_argument("--resend-share", type=float, default=0.01, help="share of sends repeated once answered")
    parser.add_argument("--chaos-interval", type=float, default=20.0, help="seconds between chaos events")
    parser.add_argument("--no-broker-restart", action="store_true", help="restart only the server")
    parser.add_argument("--session-max", type=float, default=6.0, help="longest client session, seconds")
    parser.add_argument("--stall-share", type=float, default=0.3, help="share of sessions that stall reading")
    parser.add_argument("--stall-max", type=float, default=6.0, help="longest stall, seconds")
    # Small, so that a client that stalls for a few seconds is cut off as slow, and resumes far behind.
    parser.add_argument("--client-buffer-limit", type=int, default=4096,
                        help="the server's client_buffer_limit (bytes)")
    parser.add_argument("--words", type=int, default=60, help="most words in one message")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.timeout = args.timeout or args.duration * 3 + 600
    try:
        report = asyncio.run(interruptible(run(args)))
    except asyncio.CancelledError:  # SIGTERM or SIGINT: the cleanup in `run` has run
        print("interrupted: the server, the broker's names and the database were cleaned up", file=sys.stderr)
        return 130
    width = max(len(name) for name in report["counts"]) if report["counts"] else 0
    print(f"{report['command']}: {report['seconds']} s, store {report['store']}")
    for name, value in report["counts"].items():
        print(f"  {name:<{width}}  {value:>10,}")
    if args.report:
        Path(args.report).write_text(jsonutil.dumps(report) + "\n")
    if report["failures"]:
        print("FAILED: " + ", ".join(f"{k}={v}" for k, v in report["failures"].items()), file=sys.stderr)
        if args.report:
            print(f"the server's log: {args.report}.server.log", file=sys.stderr)
        return 1
    print("ok: every client holds every message of its dialogs exactly once, in order")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
