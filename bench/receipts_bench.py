"""Receipts in a big dialog: what a message that every member reads costs in receipt frames and server CPU.

    python bench/receipts_bench.py                       # 1,000 members, 3 messages 3 s apart
    python bench/receipts_bench.py --members 200 --messages 5

A real server process (`python run.py`, SQLite in a temporary state folder) and one dialog of `--members` users,
written straight into its store before it starts (setup, not measured). Every member holds a WebSocket; one of
them posts `--messages` messages, `--gap` seconds apart. Every other member, on each `message:new`, acknowledges
it on its WebSocket (`{"type": "ack", "cursor"}`) and marks it read (`POST /api/dialogs/{id}/read`), as a page
that shows the dialog does. Every `dialog:receipt` frame each connection gets is counted.

It prints the receipt frames per connected member per second over the run (PROTOCOL section 11's bound: at most
one), the receipts the server logged a second (one event is one frame to each connection), what the receipts said
at the end (every reader delivered and read up to the last message), and the server's CPU seconds (user + system,
from /proc) over the run. Nothing here asserts a time: it prints figures. (When a frame arrives is not measured on
the client: with a thousand sockets in one client process, frames wait in its buffers and arrive in bunches.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tornado.httpclient
import tornado.websocket

from chatserver import jsonutil, queries
from chatserver.auth import TokenSigner, load_or_create_secret
from chatserver.backends import open_store
from chatserver.models import Dialog, User, new_id, now_iso
from tests.process import ServerProcess

RECEIPT = "dialog:receipt"
CONNECT_AT_ONCE = 50
READS_AT_ONCE = 50
SETTLE = 3.0  # seconds after the last read for the last receipts


async def seed(state: Path, members: int) -> tuple[list[str], str, str]:
    """(user ids, dialog id, secret): the users and their dialog, straight into the store the server will open."""
    store = open_store(str(state / "chatserver.db"))
    await store.start()
    try:
        users = [User(new_id("usr"), f"member {n}", f"7{n:010d}") for n in range(members)]
        for user in users:
            await store.write(queries.create_user, user, "not a password hash: nobody logs in")
        stamp = now_iso()
        dialog = Dialog(new_id("dlg"), "Everyone", tuple(u.user_id for u in users), stamp, stamp)
        await store.write(queries.save_dialog, dialog)
    finally:
        await store.close()
    return [u.user_id for u in users], dialog.dialog_id, load_or_create_secret(state)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Member:
    """One member's WebSocket: acknowledges and reads every message of another, counts receipt frames."""

    def __init__(self, bench: Bench, user_id: str, token: str) -> None:
        self.bench = bench
        self.user_id = user_id
        self.token = token
        self.receipts: list[float] = []
        self.last_receipt: dict[str, Any] | None = None
        self.conn: tornado.websocket.WebSocketClientConnection | None = None

    async def connect(self) -> None:
        self.conn = await tornado.websocket.websocket_connect(f"{self.bench.ws_url}/ws?token={self.token}")
        ready = jsonutil.loads(await self.conn.read_message())  # type: ignore[arg-type]
        assert ready["type"] == "ready", ready

    async def listen(self) -> None:
        assert self.conn is not None
        while (raw := await self.conn.read_message()) is not None:
            event = jsonutil.loads(raw)
            if event["type"] == RECEIPT:
                self.receipts.append(time.monotonic())
                self.last_receipt = event["data"]
            elif event["type"] == "message:new" and event["data"]["senderId"] != self.user_id:
                self.conn.write_message(jsonutil.dumps({"type": "ack", "cursor": event["cursor"]}))
                self.bench.read_later(self, event["data"]["messageId"])


class Bench:
    def __init__(self, server: ServerProcess, dialog_id: str) -> None:
        self.server = server
        self.ws_url = server.url.replace("http://", "ws://")
        self.dialog_id = dialog_id
        self.http = tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=READS_AT_ONCE)
        self.reads: set[asyncio.Task[None]] = set()
        self.read_failures = 0

    def read_later(self, member: Member, message_id: str) -> None:
        task = asyncio.ensure_future(self._read(member, message_id))
        self.reads.add(task)
        task.add_done_callback(self.reads.discard)

    async def _read(self, member: Member, message_id: str) -> None:
        response = await self.http.fetch(
            f"{self.server.url}/api/dialogs/{self.dialog_id}/read", method="POST",
            body=jsonutil.dumps_bytes({"messageId": message_id}), headers={"Authorization": f"Bearer {member.token}"},
            raise_error=False, request_timeout=120, connect_timeout=120,
        )
        if response.code != 200:
            self.read_failures += 1


async def run(members: int, messages: int, gap: float) -> None:
    with tempfile.TemporaryDirectory(prefix="receipts-bench-") as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        print(f"seeding {members} members in one dialog ...", flush=True)
        user_ids, dialog_id, secret = await seed(state, members)
        tokens = TokenSigner(secret, 3600)
        server = await ServerProcess.start(Path(tmp))
        try:
            bench = Bench(server, dialog_id)
            crowd = [Member(bench, user_id, tokens.issue(user_id)) for user_id in user_ids]
            print(f"connecting {members} WebSockets ...", flush=True)
            for start in range(0, members, CONNECT_AT_ONCE):
                await asyncio.gather(*(m.connect() for m in crowd[start : start + CONNECT_AT_ONCE]))
            listeners = [asyncio.ensure_future(m.listen()) for m in crowd]
            sender, readers = crowd[0], crowd[1:]
            pid = server.proc.pid
            cpu_before, started = cpu_seconds(pid), time.monotonic()
            last_id = ""
            for n in range(messages):
                status, body = await server.call("POST", f"/api/messages/dialog/{dialog_id}",
                                                 {"content": f"message {n}"}, token=sender.token, timeout=60)
                assert status == 201, body
                last_id = body["data"]["messageId"]
                await asyncio.sleep(gap)
            while bench.reads:  # reads may still be started by messages on their way
                await asyncio.gather(*list(bench.reads))
            await asyncio.sleep(SETTLE)
            elapsed, cpu = time.monotonic() - started, cpu_seconds(pid) - cpu_before
            metrics = await server.metrics()
            logged = next(line.split()[-1] for line in metrics.splitlines()
                          if line.startswith("chatserver_receipts_logged_total"))
            for listener in listeners:
                listener.cancel()
            frames = sum(len(m.receipts) for m in crowd)
            _, detail = await server.call("GET", f"/api/dialogs/{dialog_id}", token=sender.token)
            done = sum(1 for r in detail["data"]["receipts"]
                       if r["deliveredMessageId"] == last_id and r["readMessageId"] == last_id)
            print(f"members {members}, messages {messages} ({gap:g} s apart), run {elapsed:.1f} s")
            print(f"reads: {messages * len(readers)} POSTs ({bench.read_failures} failed), "
                  f"{messages * len(readers)} ack frames")
            print(f"dialog:receipt events logged: {float(logged):.0f} ({float(logged) / elapsed:.2f} a second); "
                  f"frames received: {frames} ({frames / members:.2f} per member)")
            print(f"receipt frames per connected member per second: {frames / members / elapsed:.3f} (bound: 1)")
            print(f"members delivered and read up to the last message (GET /api/dialogs/{{id}}): "
                  f"{done} of {len(readers)}")
            print(f"server CPU: {cpu:.2f} s over the run ({cpu / messages:.2f} s per message, reads included)")
            for m in crowd:
                if m.conn is not None:
                    m.conn.close()
        finally:
            await server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=3)
    parser.add_argument("--gap", type=float, default=3.0, help="seconds between two messages")
    args = parser.parse_args()
    asyncio.run(run(args.members, args.messages, args.gap))


if __name__ == "__main__":
    main()
