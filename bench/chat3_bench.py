"""Chat3 throughput: events consumed from RabbitMQ, stored and broadcast per second, with WebSocket clients on.

    python bench/chat3_bench.py [--events 2000] [--clients 100] [--amqp-url URL]

Starts a real server (`python run.py`, its own SQLite file, its own exchange and queue on the broker), connects
`--clients` WebSocket clients (users of one dialog), publishes `--events` `message.created` events to the real
broker as Chat3 would, and waits until every client has received every event. Prints the events per second
(consumed, validated, stored, published, acked), the deliveries per second at the clients, and the server's CPU
time over the run. This process (publisher and clients) runs on the same machine and takes CPU of its own.
Every wait is bounded. Not a test: it prints figures and asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pika
import tornado.httpclient
import tornado.websocket

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatserver import jsonutil, queries  # noqa: E402
from chatserver.auth import TokenSigner, hash_password  # noqa: E402
from chatserver.backends import open_store  # noqa: E402
from chatserver.models import Dialog, User, new_id, now_iso  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
SECRET = "bench-secret-" + uuid.uuid4().hex


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def seed(db: Path, clients: int) -> tuple[list[str], str]:
    store = open_store(str(db))
    await store.start()
    try:
        password = hash_password("bench")
        users = [
            await store.write(queries.create_user, User(new_id("usr"), f"user {n}", f"7900{n:07d}"), password)
            for n in range(clients)
        ]
        stamp = now_iso()
        dialog = Dialog(new_id("dlg"), "bench", tuple(u.user_id for u in users), stamp, stamp)
        await store.write(queries.save_dialog, dialog)
        return [u.user_id for u in users], dialog.dialog_id
    finally:
        await store.close()


def publish(url: str, exchange: str, bodies: list[bytes]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for body in bodies:
            channel.basic_publish(exchange, "chat3.message", body, pika.BasicProperties(delivery_mode=2))
    finally:
        connection.close()


def delete_topology(url: str, exchange: str, queue: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.queue_delete(queue)
        channel.exchange_delete(exchange)
    finally:
        connection.close()


class Receiver:
    """One WebSocket client that counts the distinct messages it gets."""

    def __init__(self, conn: tornado.websocket.WebSocketClientConnection, expected: int, done: asyncio.Event):
        self.conn = conn
        self.seen: set[str] = set()
        self.frames = 0
        self.expected = expected
        self.done = done
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            raw = await self.conn.read_message()
            if raw is None:
                return
            frame = jsonutil.loads(raw)
            if frame.get("type") == "message:new":
                self.frames += 1
                self.seen.add(frame["data"]["messageId"])
                if len(self.seen) == self.expected:
                    self.done.set()
                    return


async def time_all_acked(base: str, events: int, started: float) -> float:
    """Seconds from `started` until the server's metrics count every event as accepted (polled every 50ms)."""
    http = tornado.httpclient.AsyncHTTPClient()
    prefix = 'chatserver_chat3_events_total{outcome="accepted"}'
    while True:
        text = (await http.fetch(base + "/metrics", request_timeout=5)).body.decode()
        if any(line.startswith(prefix) and float(line.split()[-1]) >= events for line in text.splitlines()):
            return time.perf_counter() - started
        await asyncio.sleep(0.05)


async def wait_ready(url: str, process: asyncio.subprocess.Process) -> None:
    http = tornado.httpclient.AsyncHTTPClient()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            response = await http.fetch(url + "/readyz", raise_error=False, request_timeout=2)
            if response.code == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit("the server did not get ready in 20s")


async def main(args: argparse.Namespace) -> None:
    tag = uuid.uuid4().hex[:10]
    exchange, queue = f"bench.chat3.{tag}", f"bench.chatserver.{tag}"
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        users, dialog_id = await seed(db, args.clients)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATSERVER_", "NOTIFY_SOCKET", "LISTEN_"))}
        env.update(
            CHATSERVER_STATE_DIR=tmp,
            CHATSERVER_SECRET=SECRET,
            CHATSERVER_AMQP_URL=args.amqp_url,
            CHATSERVER_CHAT3_EXCHANGE=exchange,
            CHATSERVER_CHAT3_QUEUE=queue,
            CHATSERVER_LOG_LEVEL="warning",
        )
        server = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "run.py"), "--port", str(port), "--db", str(db), cwd=str(ROOT), env=env
        )
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_ready(base, server)
            signer = TokenSigner(SECRET, 3600)
            done_events = [asyncio.Event() for _ in users]
            receivers = []
            for user_id, done in zip(users, done_events, strict=True):
                conn = await tornado.websocket.websocket_connect(
                    f"ws://127.0.0.1:{port}/ws?token={signer.issue(user_id)}", max_message_size=1 << 20
                )
                raw = await conn.read_message()
                assert raw is not None, "the server closed a WebSocket before its ready frame"
                ready = jsonutil.loads(raw)
                assert ready["type"] == "ready", ready
                receivers.append(Receiver(conn, args.events, done))
            bodies = [
                jsonutil.dumps_bytes(
                    {
                        "event": "message.created",
                        "data": {
                            "messageId": new_id("msg"),
                            "dialogId": dialog_id,
                            "senderId": users[n % len(users)],
                            "content": f"benchmark message {n} " + "x" * 100,
                            "type": "text",
                            "meta": {},
                            "createdAt": now_iso(),
                        },
                    }
                )
                for n in range(args.events)
            ]
            loop = asyncio.get_running_loop()
            cpu_before, own_before, started = cpu_seconds(server.pid), time.process_time(), time.perf_counter()
            acked = asyncio.ensure_future(time_all_acked(base, args.events, started))
            await loop.run_in_executor(None, publish, args.amqp_url, exchange, bodies)
            published = time.perf_counter() - started
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(d.wait() for d in done_events)), args.timeout)
            elapsed = time.perf_counter() - started
            cpu = cpu_seconds(server.pid) - cpu_before
            own_cpu = time.process_time() - own_before
            acked_after = await asyncio.wait_for(acked, args.timeout)
            got = [len(r.seen) for r in receivers]
            frames = sum(r.frames for r in receivers)
            complete = all(g == args.events for g in got)
            print(
                f"chat3 bench: {args.events} message.created events, {args.clients} WebSocket clients, "
                f"one dialog of {args.clients} members, prefetch 64 (default)"
            )
            print(f"  published to the broker in {published:.2f}s")
            print(
                f"  all delivered: {complete} (min {min(got)}, max {max(got)} distinct per client; "
                f"{frames - sum(got)} duplicate frames)"
            )
            print(
                f"  server: all {args.events} consumed, stored, broadcast and acked after {acked_after:.2f}s: "
                f"{args.events / acked_after:,.0f} events/s"
            )
            print(
                f"  clients: last delivery after {elapsed:.2f}s: {sum(got) / len(got) / elapsed:,.0f} events/s, "
                f"{sum(got) / elapsed:,.0f} deliveries/s"
            )
            print(
                f"  server CPU: {cpu:.2f}s ({100 * cpu / elapsed:.0f}% of one core over the run; "
                f"{1000 * cpu / max(1, args.events):.2f} ms per event); this process (publisher, clients): "
                f"{own_cpu:.2f}s"
            )
            for r in receivers:
                r.conn.close()
        finally:
            if server.returncode is None:
                server.terminate()
                await asyncio.wait_for(server.wait(), 15)
            delete_topology(args.amqp_url, exchange, queue)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--timeout", type=float, default=120.0)
    asyncio.run(main(parser.parse_args()))
