"""The load generator: one process, apart from the server, that runs one workload against one system.

    python bench/loadgen.py < spec.json

It reads a JSON spec on stdin (system, address, server pid, workload and its sizes), connects its clients with
the raw protocols of `bench/wire.py`, publishes events over HTTP from separate publisher connections, counts
every delivery per client, and prints `RESULT <json>` as its last line. For the resume storm it prints
`RESTART` and waits for `RESTARTED <pid> ...` on stdin (bench/run.py restarts the servers). Every wait is
bounded: a run that stalls ends with its losses counted, never hangs.

Several server processes on one database (bench/durable.py): `ports` spreads the subscribers over them (client
i on `ports[i % len(ports)]`), `publish_port` sends the publishers to one of them, and `pids` names every
process whose CPU counts.

Server CPU is read from /proc/<pid>/stat (utime+stime of the server's process tree: nginx's master and
worker, Python's threads) and the generator's own from getrusage, over the same measured window.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from wire import (
    MARKER,
    HttpConnection,
    WebSocketClient,
    eio_packets,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
CONNECT_CONCURRENCY = 100
EVENT_BYTES = 365
WARM = b"~WRM"


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the server's process tree ------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    pids = [root]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == root:
            pids.append(int(proc.name))
    return pids


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """User and system CPU-seconds of `pids`: the system part is mostly the sockets' kernel work."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])  # utime, stime: fields 14 and 15 of stat
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def write_calls(pids: list[int]) -> int:
    """/proc/<pid>/io's syscw of `pids` so far: the write(2) family (files, pipes such as the loop's wake-up, and
    sockets written with write/writev, as nginx does); a socket's send/sendto/sendmsg is not counted there."""
    return proc_total(pids, "io", "syscw:")


def server_pids(roots: list[int]) -> list[int]:
    return [pid for root in roots for pid in process_tree(root)]


def rss_kb(pids: list[int]) -> int:
    return proc_total(pids, "status", "VmRSS:")


def proc_total(pids: list[int], name: str, key: str) -> int:
    """The sum over `pids` of the number after `key` in /proc/<pid>/<name> (a process gone meanwhile counts 0)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                if line.startswith(key):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """CPU of the server and of the generator, and the wall clock, over one measured window."""

    def __init__(self, pids: list[int], helpers: list[int] | None = None) -> None:
        self.pids = pids
        self.helpers = helpers or []  # the generator's own helper processes (the C receivers)

    def _gen_cpu(self) -> float:
        return own_cpu() + sum(cpu_seconds(self.helpers))

    def start(self) -> None:
        self.t0, self.s0, self.g0 = time.perf_counter(), cpu_seconds(self.pids), self._gen_cpu()
        self.w0 = write_calls(self.pids)

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        user, system = cpu_seconds(self.pids)
        user, system = user - self.s0[0], system - self.s0[1]
        gen = self._gen_cpu() - self.g0
        writes = write_calls(self.pids) - self.w0
        return {"wall": wall, "server_cpu": user + system, "server_user": user, "server_sys": system, "gen_cpu": gen,
                "server_write_calls": writes}


# -- the systems --------------------------------------------------------------------------------------


class Target:
    """How one system is spoken to: its subscribe paths, its publish call, its long-poll loop."""

    name = ""
    # Subscribed once the upgrade is answered (Nchan); else at the message `ws_ready` accepts.
    ready_at_upgrade = False

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.host = f"{spec['host']}:{spec['port']}"

    def ws_path(self, i: int, cursor: str | None = None) -> str:
        raise NotImplementedError

    def ws_ready(self, payload: bytes) -> bool:
        raise NotImplementedError

    def ws_control(self, client: WebSocketClient, payload: bytes) -> None:
        """Protocol-level messages (engine.io open and ping); events are counted elsewhere."""

    def publish_request(self, content: str) -> tuple[str, str, dict[str, str], bytes]:
        raise NotImplementedError

    async def poll_loop(self, gen: Generator, conn: HttpConnection, i: int) -> None:
        raise NotImplementedError

    def content(self, idx: int, marker: bytes = MARKER) -> str:
        head = f"{marker.decode()}{idx:08d} T{time.time():.6f} "
        return head + "x" * max(0, self.content_size - len(head))

    content_size = 65


class Ours(Target):
    name = "ours"

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        from chatserver.auth import TokenSigner

        signer = TokenSigner(spec["secret"], 7 * 24 * 3600)
        self.tokens = [signer.issue(user_id) for user_id in spec["users"]]
        self.publisher_token = signer.issue(spec["publisher"])
        self.dialog = spec["dialog"]
        # message:new around an empty content is 300 bytes: 65 characters of content make the 365-byte event.
        self.content_size = spec.get("content_size", 65)

    def ws_path(self, i: int, cursor: str | None = None) -> str:
        path = f"/ws?token={self.tokens[i]}"
        return path + f"&cursor={quote(cursor)}" if cursor else path

    def ws_ready(self, payload: bytes) -> bool:
        return payload.startswith(b'{"type":"ready"') or payload.startswith(b'{"type":"reset"')

    def publish_request(self, content: str) -> tuple[str, str, dict[str, str], bytes]:
        body = json.dumps({"content": content, "type": "text"}).encode()
        headers = {"Authorization": f"Bearer {self.publisher_token}", "Content-Type": "application/json"}
        return "POST", f"/api/messages/dialog/{self.dialog}", headers, body

    async def poll_loop(self, gen: Generator, conn: HttpConnection, i: int) -> None:
        headers = {"Authorization": f"Bearer {self.tokens[i]}"}
        answer = await conn.request("GET", "/api/poll", headers)
        cursor = json.loads(answer.body)["data"]["cursor"]
        timeout = gen.spec.get("poll_timeout", 55)
        while gen.running:
            answer = await conn.request("GET", f"/api/poll?timeout={timeout}&cursor={quote(cursor)}", headers)
            if answer.status != 200:
                gen.errors.append(f"poll answered {answer.status}: {answer.body[:200]!r}")
                return
            body = answer.body
            at = body.rfind(b'"cursor":"')
            cursor = body[at + 10 : body.index(b'"', at + 10)].decode()
            gen.poll_answer(conn, body)


class SocketIO(Target):
    name = "sio"
    # 42["message",{...}] around a content: the frame matches ours in size.
    content_size = EVENT_BYTES - 46

    def ws_path(self, i: int, cursor: str | None = None) -> str:
        return "/socket.io/?EIO=4&transport=websocket"

    def ws_ready(self, payload: bytes) -> bool:
        return payload.startswith(b"40")

    def ws_control(self, client: WebSocketClient, payload: bytes) -> None:
        if payload == b"2":
            client.send_text(b"3")
        elif payload.startswith(b"0{"):
            client.send_text(b"40")

    def publish_request(self, content: str) -> tuple[str, str, dict[str, str], bytes]:
        body = json.dumps({"type": "message:new", "content": content}).encode()
        return "POST", "/publish", {"Content-Type": "application/json"}, body

    async def poll_loop(self, gen: Generator, conn: HttpConnection, i: int) -> None:
        base = "/socket.io/?EIO=4&transport=polling"
        answer = await conn.request("GET", base)
        sid = json.loads(answer.body[1:])["sid"]
        path = f"{base}&sid={sid}"
        await self._post(gen, path, b"40")
        while gen.running:
            answer = await conn.request("GET", path)
            if answer.status != 200:
                gen.errors.append(f"engine.io poll answered {answer.status}: {answer.body[:200]!r}")
                return
            gen.poll_answer(conn, answer.body)
            for packet in eio_packets(answer.body):
                if packet == b"2":
                    await self._post(gen, path, b"3")
                elif packet.startswith(b"40"):
                    conn.extra["ready"] = True

    async def _post(self, gen: Generator, path: str, body: bytes) -> None:
        # A second connection for the client's own packets, as a browser does: the first one is parked.
        conn = await gen.open_http()
        try:
            await conn.request("POST", path, {"Content-Type": "text/plain;charset=UTF-8"}, body)
        finally:
            conn.close()


class Nchan(Target):
    name = "nchan"
    content_size = EVENT_BYTES - 44

    def ws_path(self, i: int, cursor: str | None = None) -> str:
        return "/sub/bench"

    ready_at_upgrade = True

    def publish_request(self, content: str) -> tuple[str, str, dict[str, str], bytes]:
        body = json.dumps({"type": "message:new", "content": content}).encode()
        return "POST", "/pub/bench", {"Content-Type": "application/json", "Accept": "text/json"}, body

    async def poll_loop(self, gen: Generator, conn: HttpConnection, i: int) -> None:
        headers: dict[str, str] = {}
        while gen.running:
            answer = await conn.request("GET", "/sub/bench", headers)
            if answer.status == 304 or answer.status == 408:
                continue
            if answer.status != 200:
                gen.errors.append(f"nchan poll answered {answer.status}: {answer.body[:200]!r}")
                return
            headers = {
                "If-Modified-Since": answer.headers.get("last-modified", ""),
                "If-None-Match": answer.headers.get("etag", ""),
            }
            gen.poll_answer(conn, answer.body)


TARGETS: dict[str, type[Target]] = {"ours": Ours, "sio": SocketIO, "nchan": Nchan}


# -- the generator ------------------------------------------------------------------------------------


class Generator:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.target = TARGETS[spec["system"]](spec)
        self.ports: list[int] = spec.get("ports") or [spec["port"]]
        self.publish_port: int = spec.get("publish_port") or self.ports[0]
        self.pids = server_pids(spec.get("pids") or [spec["pid"]])
        self.loop = asyncio.get_running_loop()
        self.running = True
        self.errors: list[str] = []
        self.ws_clients: list[WebSocketClient] = []
        self.pollers: list[HttpConnection] = []
        self.poll_tasks: list[asyncio.Task[None]] = []
        self.events = 0  # events per measured run
        self.expected = 0  # receivers per event
        self.per_event = bytearray()
        self.per_event_counts: list[int] = []
        self.completed = 0
        self.delivered = 0
        self.duplicates = 0
        self.warmed = 0
        self.answers = 0
        self.answer_sizes: collections.Counter[int] = collections.Counter()  # events per poll answer -> answers
        self.progress = asyncio.Event()
        self.track_latency = False
        self.latencies: list[float] = []
        self.ws_latencies: list[float] = []
        self.poll_latencies: list[float] = []
        self.track_cursor = False
        self.event_bytes = 0
        self._connect_gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    # -- counting --------------------------------------------------------------------------------------

    def arm(self, events: int, receivers: list[Any]) -> None:
        self.events = events
        self.expected = len(receivers)
        self.per_event_counts = [0] * events
        self.completed = 0
        self.delivered = 0
        self.duplicates = 0
        for client in receivers:
            client.counts = bytearray(events)

    def record(self, client: Any, payload: bytes, at: int) -> None:
        idx = int(payload[at + 4 : at + 12])
        counts = client.counts
        if counts is None or idx >= len(counts):
            self.errors.append(f"event {idx} outside the run")
            return
        if counts[idx]:
            self.duplicates += 1
            counts[idx] = 2
            return
        counts[idx] = 1
        if client.extra.get("stalled"):
            return  # the stalled reader of the slow-consumer run: checked on its own
        self.delivered += 1
        if self.track_latency:
            sent = float(payload[at + 14 : at + 31])
            late = time.time() - sent
            self.latencies.append(late)
            (self.poll_latencies if isinstance(client, HttpConnection) else self.ws_latencies).append(late)
        n = self.per_event_counts[idx] + 1
        self.per_event_counts[idx] = n
        if n == self.expected:
            self.completed += 1
            self.progress.set()

    def on_ws_message(self, client: WebSocketClient, payload: bytes) -> None:
        at = payload.find(MARKER)
        if at >= 0:
            if not self.event_bytes:
                self.event_bytes = len(payload)
            self.record(client, payload, at)
            if self.track_cursor:
                self._take_cursor(client, payload)
            return
        if WARM in payload:
            if not client.extra.get("warm"):
                client.extra["warm"] = True
                self.warmed += 1
            if self.track_cursor:
                self._take_cursor(client, payload)
            return
        self.target.ws_control(client, payload)
        if payload.startswith(b'{"type":"reset"'):
            client.extra["reset"] = payload

    @staticmethod
    def _take_cursor(client: WebSocketClient, payload: bytes) -> None:
        at = payload.rfind(b'"cursor":"')
        if at >= 0:
            client.cursor = payload[at + 10 : payload.index(b'"', at + 10)].decode()

    def poll_answer(self, conn: HttpConnection, body: bytes) -> None:
        self.answers += 1
        conn.extra["answers"] = conn.extra.get("answers", 0) + 1
        events = 0
        at = body.find(MARKER)
        while at >= 0:
            self.record(conn, body, at)
            events += 1
            at = body.find(MARKER, at + 12)
        if events:
            self.answer_sizes[events] += 1
        if WARM in body and not conn.extra.get("warm"):
            conn.extra["warm"] = True
            self.warmed += 1

    # -- connecting ------------------------------------------------------------------------------------

    async def open_http(self, port: int | None = None) -> HttpConnection:
        """A keep-alive HTTP connection: to the publishers' server unless `port` says which."""
        _, conn = await self.loop.create_connection(
            lambda: HttpConnection(self.target.host), self.spec["host"], port or self.publish_port
        )
        return conn

    async def open_ws(
        self,
        i: int,
        cursor: str | None = None,
        rcvbuf: int = 0,
        ready: Callable[[bytes], bool] | None = None,
        counts: bytearray | None = None,
    ) -> WebSocketClient:
        """Client `i`, ready by `ready` (or the target's rule), counting its events in `counts` from the start."""
        spec = self.spec
        port = self.ports[i % len(self.ports)]
        async with self._connect_gate:
            sock = None
            if rcvbuf:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                sock.setblocking(False)
                await self.loop.sock_connect(sock, (spec["host"], port))

            def factory() -> WebSocketClient:
                client = WebSocketClient(
                    self.target.host,
                    self.target.ws_path(i, cursor),
                    self.on_ws_message,
                    ready or (None if self.target.ready_at_upgrade else self.target.ws_ready),
                    i,
                )
                client.counts = counts
                return client

            if sock is not None:
                _, client = await self.loop.create_connection(factory, sock=sock)
            else:
                _, client = await self.loop.create_connection(factory, spec["host"], port)
            await asyncio.wait_for(client.ready, 30)
        return client

    async def connect_ws(self, count: int, first: int = 0) -> list[WebSocketClient]:
        clients = await asyncio.gather(*(self.open_ws(first + i) for i in range(count)))
        self.ws_clients.extend(clients)
        return list(clients)

    async def start_pollers(self, count: int, first: int = 0) -> list[HttpConnection]:
        async def one(i: int) -> HttpConnection:
            async with self._connect_gate:
                conn = await self.open_http(self.ports[i % len(self.ports)])
            self.poll_tasks.append(self.loop.create_task(self._poll_guard(conn, i)))
            return conn

        pollers = await asyncio.gather(*(one(first + i) for i in range(count)))
        self.pollers.extend(pollers)
        return list(pollers)

    async def _poll_guard(self, conn: HttpConnection, i: int) -> None:
        try:
            await self.target.poll_loop(self, conn, i)
        except (ConnectionError, OSError) as exc:
            if self.running:
                self.errors.append(f"poller {i}: {exc!r}")
        except asyncio.CancelledError:
            pass

    # -- publishing ------------------------------------------------------------------------------------

    async def publishers(self, count: int) -> list[HttpConnection]:
        return [await self.open_http() for _ in range(count)]

    async def publish(self, conn: HttpConnection, content: str) -> None:
        method, path, headers, body = self.target.publish_request(content)
        answer = await conn.request(method, path, headers, body)
        if answer.status >= 300:
            self.errors.append(f"publish answered {answer.status}: {answer.body[:200]!r}")

    async def warm_up(self, pub: HttpConnection, receivers: int, limit: float = 60.0) -> None:
        """Publish warm-up events until every receiver has one: then every subscription is in place."""
        deadline = time.perf_counter() + limit
        n = 0
        while self.warmed < receivers:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"only {self.warmed} of {receivers} clients subscribed after {limit:.0f}s")
            await self.publish(pub, self.target.content(n, WARM))
            n += 1
            for _ in range(20):
                if self.warmed >= receivers:
                    break
                await asyncio.sleep(0.05)

    async def publish_window(self, pubs: list[HttpConnection], events: int, window: int, limit: float) -> bool:
        """Publish `events` events, at most `window` of them not yet delivered to everyone; True if all were."""
        next_idx = 0

        async def worker(conn: HttpConnection) -> None:
            nonlocal next_idx
            while True:
                while next_idx < events and next_idx - self.completed >= window:
                    self.progress.clear()
                    await self.progress.wait()
                if next_idx >= events:
                    return
                idx = next_idx
                next_idx += 1
                await self.publish(conn, self.target.content(idx))

        async def all_done() -> None:
            while self.completed < events:
                self.progress.clear()
                await self.progress.wait()

        try:
            await asyncio.wait_for(asyncio.gather(*(worker(c) for c in pubs), all_done()), limit)
            return True
        except TimeoutError:
            return False

    async def publish_paced(self, pubs: list[HttpConnection], events: int, rate: float) -> None:
        start = time.perf_counter()
        queue: asyncio.Queue[HttpConnection] = asyncio.Queue()
        for conn in pubs:
            queue.put_nowait(conn)
        tasks = []

        async def one(idx: int) -> None:
            conn = await queue.get()
            try:
                await self.publish(conn, self.target.content(idx))
            finally:
                queue.put_nowait(conn)

        for idx in range(events):
            delay = start + idx / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(self.loop.create_task(one(idx)))
        await asyncio.gather(*tasks)

    async def wait_complete(self, limit: float) -> bool:
        deadline = time.perf_counter() + limit
        while self.completed < self.events:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return False
            self.progress.clear()
            try:
                await asyncio.wait_for(self.progress.wait(), remaining)
            except TimeoutError:
                return False
        return True

    # -- checking --------------------------------------------------------------------------------------

    def losses(self, receivers: list[Any]) -> int:
        return sum(c.counts.count(0) for c in receivers if c.counts is not None)

    async def shutdown(self) -> None:
        self.running = False
        for task in self.poll_tasks:
            task.cancel()
        for client in self.ws_clients:
            client.close()
        for conn in self.pollers:
            conn.close()
        await asyncio.sleep(0.2)


# -- receivers in C -----------------------------------------------------------------------------------

RECEIVERS_SOURCE = Path(__file__).resolve().parent / "receivers.c"
RECEIVERS_BINARY = Path(__file__).resolve().parent / "build" / "receivers"


def build_receivers() -> Path:
    """bench/receivers.c compiled into bench/build/ (again when the source is newer)."""
    binary = RECEIVERS_BINARY
    if not binary.exists() or binary.stat().st_mtime < RECEIVERS_SOURCE.stat().st_mtime:
        binary.parent.mkdir(exist_ok=True)
        import subprocess

        subprocess.run(["cc", "-O2", "-o", str(binary), str(RECEIVERS_SOURCE)], check=True, timeout=120)
    return binary


class CReceivers:
    """`ws` WebSocket subscribers and `polls` long-pollers in bench/receivers.c's process: the same counting as
    the Python receivers (every event per client, duplicates, warm-up, each event's completion) at a fraction of
    their CPU, so that on a machine the generator shares with the server the server sets the rate. Ours and
    Nchan only (socket.io's framing is the Python receivers')."""

    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.proc: asyncio.subprocess.Process | None = None
        self.result: list[int] = []
        self.result_errors: list[str] = []
        self._done = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def lines(self, ws: int, polls: int) -> list[str]:
        gen, target = self.gen, self.gen.target
        out = []
        for i in range(ws):
            port = gen.ports[i % len(gen.ports)]
            out.append(f"ws {port} {0 if target.ready_at_upgrade else 1} {target.ws_path(i)}")
        for i in range(ws, ws + polls):
            port = gen.ports[i % len(gen.ports)]
            if isinstance(target, Ours):
                out.append(f"poll {port} ours /api/poll {target.tokens[i]}")
            elif isinstance(target, Nchan):
                out.append(f"poll {port} nchan /sub/bench -")
            else:
                raise ValueError(f"the C receivers do not speak {target.name}'s protocol")
        return out

    async def start(self, ws: int, polls: int) -> None:
        binary = await asyncio.to_thread(build_receivers)
        self.proc = await asyncio.create_subprocess_exec(
            str(binary), str(self.gen.spec.get("receiver_pause_us", 0)), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, preexec_fn=raise_nofile)
        self._reader = self.gen.loop.create_task(self._read())
        self.send([*self.lines(ws, polls), "go"])

    def send(self, lines: list[str]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(("\n".join(lines) + "\n").encode())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        gen = self.gen
        async for raw in self.proc.stdout:
            word, _, rest = raw.decode().strip().partition(" ")
            if word == "done":
                gen.completed = int(rest)
                gen.progress.set()
            elif word == "warmed":
                gen.warmed = int(rest)
            elif word == "result":
                self.result = [int(n) for n in rest.split()]
            elif word == "error":
                self.result_errors.append(rest)
        self._done.set()

    def arm(self, events: int, receivers: int) -> None:
        gen = self.gen
        gen.events, gen.expected, gen.completed = events, receivers, 0
        self.send([f"arm {events}"])

    async def finish(self) -> dict[str, int]:
        """Stop counting and take the counts: delivered, duplicated, lost, errors, poll answers."""
        self.send(["end"])
        try:
            await asyncio.wait_for(self._done.wait(), 30)
        except TimeoutError:
            self.gen.errors.append("the C receivers printed no result")
        if self.proc is not None:
            if self.proc.returncode is None and not self._done.is_set():
                self.proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)
        if len(self.result) != 5:
            return {"delivered": 0, "duplicated": 0, "lost": -1, "errors": 1, "answers": 0}
        self.gen.errors.extend(f"C receivers: {e}" for e in self.result_errors)
        return dict(zip(("delivered", "duplicated", "lost", "errors", "answers"), self.result, strict=True))


# -- workloads ----------------------------------------------------------------------------------------


def fanout_result(gen: Generator, meter: dict[str, float], receivers: list[Any], complete: bool) -> dict[str, Any]:
    lost = gen.losses(receivers)
    deliveries = gen.delivered
    result: dict[str, Any] = {
        **meter,
        "deliveries": deliveries,
        "lost": lost,
        "duplicated": gen.duplicates,
        "complete": complete,
        "event_bytes": gen.event_bytes,
    }
    result.update(per_delivery(meter, deliveries))
    return result


def per_delivery(meter: dict[str, float], deliveries: int) -> dict[str, Any]:
    """The figures of a measured window per delivery, and whether the generator limited them."""
    figures: dict[str, Any] = {}
    if deliveries:
        figures["cpu_per_10k"] = meter["server_cpu"] / deliveries * 10_000
        figures["gen_cpu_per_10k"] = meter["gen_cpu"] / deliveries * 10_000
        figures["deliveries_per_s"] = deliveries / meter["wall"] if meter["wall"] else 0.0
        figures["write_calls_per_delivery"] = meter["server_write_calls"] / deliveries
    # The generator limits the figure when it was busy for nearly the whole window.
    figures["gen_bound"] = meter["gen_cpu"] > 0.85 * meter["wall"]
    return figures


async def run_fanout(gen: Generator, ws: int, polls: int) -> dict[str, Any]:
    spec = gen.spec
    if spec.get("receivers") == "c":
        return await run_fanout_c(gen, ws, polls)
    pubs = await gen.publishers(spec.get("publishers", 4))
    clients: list[Any] = await gen.connect_ws(ws)
    clients += await gen.start_pollers(polls, first=ws)
    await gen.warm_up(pubs[0], len(clients))
    gen.arm(spec["events"], clients)
    answers0 = gen.answers
    sizes0 = collections.Counter(gen.answer_sizes)
    gc.collect()
    meter = Meter(gen.pids)
    meter.start()
    complete = await gen.publish_window(pubs, spec["events"], spec.get("window", 8), spec.get("limit", 120))
    measured = meter.stop()
    if not complete:
        await gen.wait_complete(3)
    result = fanout_result(gen, measured, clients, complete)
    if polls:
        answers = gen.answers - answers0
        poll_deliveries = sum(c.counts.count(1) for c in clients[ws:] if c.counts is not None)
        result["poll_answers"] = answers
        result["events_per_answer"] = poll_deliveries / answers if answers else 0.0
        # Batching: how many answers carried several events, and the most one carried (counted events only).
        sizes = gen.answer_sizes - sizes0
        carrying = sum(sizes.values())
        result["answers_with_several"] = sum(n for k, n in sizes.items() if k > 1) / carrying if carrying else 0.0
        result["max_events_per_answer"] = max(sizes, default=0)
    return result


async def run_fanout_c(gen: Generator, ws: int, polls: int) -> dict[str, Any]:
    """run_fanout with the receivers of bench/receivers.c: the same window, counts and figures."""
    spec = gen.spec
    pubs = await gen.publishers(spec.get("publishers", 4))
    receivers = CReceivers(gen)
    await receivers.start(ws, polls)
    try:
        await gen.warm_up(pubs[0], ws + polls)
        receivers.arm(spec["events"], ws + polls)
        gc.collect()
        meter = Meter(gen.pids, [receivers.pid])
        meter.start()
        c0 = sum(cpu_seconds([receivers.pid]))
        if spec.get("rate"):  # a fixed offered load (events per second) rather than as fast as they are taken
            await gen.publish_paced(pubs, spec["events"], spec["rate"])
            complete = await gen.wait_complete(spec.get("limit", 120))
        else:
            complete = await gen.publish_window(pubs, spec["events"], spec.get("window", 8), spec.get("limit", 120))
        measured = meter.stop()
        measured["receivers_cpu"] = sum(cpu_seconds([receivers.pid])) - c0
        if not complete:
            await gen.wait_complete(3)
    finally:
        counts = await receivers.finish()
    deliveries = counts["delivered"]
    result: dict[str, Any] = {
        **measured,
        "receivers": "c",
        "deliveries": deliveries,
        "lost": counts["lost"],
        "duplicated": counts["duplicated"],
        "complete": complete,
    }
    if counts["errors"] and not gen.errors:
        gen.errors.append(f"the C receivers counted {counts['errors']} errors")
    result.update(per_delivery(measured, deliveries))
    if polls:
        answers = counts["answers"]  # since arm
        result["poll_answers"] = answers
        result["events_per_answer"] = deliveries / answers if answers else 0.0
    for conn in pubs:
        conn.close()
    return result


async def run_idle(gen: Generator) -> dict[str, Any]:
    n = gen.spec["clients"]
    await asyncio.sleep(0.5)
    base = rss_kb(gen.pids)
    await gen.connect_ws(n)
    await asyncio.sleep(2.0)
    after_ws = rss_kb(gen.pids)
    await gen.start_pollers(n, first=0)
    await asyncio.sleep(3.0)
    after_polls = rss_kb(gen.pids)
    alive_ws = sum(1 for c in gen.ws_clients if not c.closed.done())
    alive_polls = sum(1 for t in gen.poll_tasks if not t.done())
    return {
        "rss_base_kb": base,
        "rss_ws_kb": after_ws,
        "rss_all_kb": after_polls,
        "kb_per_ws": (after_ws - base) / n,
        "kb_per_poll": (after_polls - after_ws) / n,
        "concurrent": alive_ws + alive_polls,
        "wanted": 2 * n,
        "lost": 0,
        "duplicated": 0,
    }


async def run_latency(gen: Generator) -> dict[str, Any]:
    spec = gen.spec
    n, polls = spec["clients"], spec.get("polls", 0)
    rate = spec["rate"] / (n + polls)  # events per second for `rate` deliveries per second
    events = max(1, int(rate * spec["duration"]))
    pubs = await gen.publishers(4)
    clients: list[Any] = await gen.connect_ws(n)
    clients += await gen.start_pollers(polls, first=n)
    await gen.warm_up(pubs[0], n + polls)
    gen.arm(events, clients)
    gen.track_latency = True
    meter = Meter(gen.pids)
    meter.start()
    await gen.publish_paced(pubs, events, rate)
    complete = await gen.wait_complete(30)
    measured = meter.stop()
    result = fanout_result(gen, measured, clients, complete)
    groups = {"": gen.latencies}
    if polls:
        # Split by transport: the same events, received over WebSocket and over long-poll.
        groups.update(ws_=gen.ws_latencies, poll_=gen.poll_latencies)
    for prefix, values in groups.items():
        lat = sorted(values)
        if lat:
            result[f"{prefix}p50_ms"] = 1000 * lat[len(lat) // 2]
            result[f"{prefix}p99_ms"] = 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            result[f"{prefix}max_ms"] = 1000 * lat[-1]
            result[f"{prefix}mean_ms"] = 1000 * statistics.fmean(lat)
    result["event_rate"] = rate
    result["gen_bound"] = measured["gen_cpu"] > 0.85 * measured["wall"]
    return result


async def run_slow(gen: Generator) -> dict[str, Any]:
    spec = gen.spec
    n = spec["clients"]
    gen.target.content_size = spec.get("slow_content", 8000)
    pubs = await gen.publishers(2)
    fast = await gen.connect_ws(n)
    slow = await gen.open_ws(n, rcvbuf=4096)
    gen.ws_clients.append(slow)
    await gen.warm_up(pubs[0], n + 1)
    slow.transport.pause_reading()  # type: ignore[union-attr]
    gen.arm(spec["events"], fast)
    slow.counts = bytearray(spec["events"])
    slow.extra["stalled"] = True
    base = rss_kb(gen.pids)
    peak = base
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, rss_kb(gen.pids))
            await asyncio.sleep(0.1)

    sampler = gen.loop.create_task(sample())
    meter = Meter(gen.pids)
    meter.start()
    complete = await gen.publish_window(pubs, spec["events"], spec.get("window", 8), spec.get("limit", 120))
    measured = meter.stop()
    await asyncio.sleep(1.0)
    sampling = False
    await sampler
    after = rss_kb(gen.pids)
    cut_off_while_paused = slow.closed.done()
    slow.transport.resume_reading()  # type: ignore[union-attr]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(slow.closed), 15)
    result = fanout_result(gen, measured, fast, complete)
    if spec["system"] == "ours":
        result.update(await ours_metrics(gen, ("chatserver_history_bytes", "chatserver_slow_clients_closed_total")))
    result.update(
        rss_base_kb=base,
        rss_peak_kb=peak,
        rss_after_kb=after,
        rss_growth_kb=peak - base,
        slow_received=slow.counts.count(1),
        slow_closed=slow.closed.done(),
        slow_close_code=slow.close_code,
        slow_cut_while_paused=cut_off_while_paused,
        event_bytes_total=spec["events"] * (gen.event_bytes or 0),
    )
    return result


async def ours_metrics(gen: Generator, names: tuple[str, ...]) -> dict[str, float]:
    """Some of our server's own figures from /metrics (how much of its memory is the resume history)."""
    conn = await gen.open_http()
    try:
        answer = await asyncio.wait_for(conn.request("GET", "/metrics"), 10)
    finally:
        conn.close()
    found = {}
    for line in answer.body.decode().splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            found[name.removeprefix("chatserver_")] = float(value)
    return found


async def run_storm(gen: Generator) -> dict[str, Any]:
    """Every server restarted under connected clients, who all reconnect at once.

    Ours resumes: each client comes back with its cursor, and `missed` events were published after the clients
    left and before the restart, so each is caught up only once the store has replayed those to it (a reset
    instead is a failure: the log outlives a restart). The peers have no resume: theirs are ready when connected.
    """
    spec = gen.spec
    n = spec["clients"]
    ours = spec["system"] == "ours"
    live = spec.get("events", 3)
    missed = spec.get("missed", 0) if ours else 0
    gen.track_cursor = True
    pubs = await gen.publishers(1)
    clients = await gen.connect_ws(n)
    await gen.warm_up(pubs[0], n)
    gen.arm(live + missed, clients)
    await gen.publish_window(pubs, live, 8, 30)
    cursors = [c.cursor for c in clients]
    for client in clients:
        client.close()
    gen.ws_clients.clear()
    for idx in range(live, live + missed):
        await gen.publish(pubs[0], gen.target.content(idx))
    for conn in pubs:
        conn.close()
    print("RESTART", flush=True)
    line = await gen.loop.run_in_executor(None, sys.stdin.readline)
    if not line.startswith("RESTARTED"):
        raise RuntimeError(f"the runner answered {line!r} to RESTART")
    gen.pids = server_pids([int(pid) for pid in line.split()[1:]])
    meter = Meter(gen.pids)
    meter.start()
    fresh = await asyncio.gather(
        *(gen.open_ws(i, cursors[i] if ours else None, counts=clients[i].counts) for i in range(n)),
        return_exceptions=True,
    )
    ready_s = time.perf_counter() - meter.t0
    ok = [c for c in fresh if isinstance(c, WebSocketClient)]
    gen.ws_clients.extend(ok)
    caught_up = await gen.wait_complete(60) if missed else True
    measured = meter.stop()
    failures = [repr(c) for c in fresh if not isinstance(c, WebSocketClient)]
    resets = sum(1 for c in ok if c.extra.get("reset"))
    lost = gen.losses(clients) + resets if ours else 0
    return {
        **measured,
        "time_to_all_ready_s": measured["wall"],
        "time_to_connected_s": ready_s,
        "missed": missed,
        "caught_up": caught_up,
        "ready": len(ok),
        "resets": resets,
        "failed": len(failures),
        "first_failure": failures[0] if failures else None,
        "lost": lost + len(failures),
        "duplicated": gen.duplicates,
    }


async def run_post(gen: Generator) -> dict[str, Any]:
    """`posters` connections POST one after another for `duration` seconds, nobody subscribed: what the
    publishing side takes (ours: each POST stored with its log event, committed, published). Ours also reports
    the writes per commit its store's writer saw over the window (the group-commit size)."""
    spec = gen.spec
    ours = spec["system"] == "ours"
    counted = ("chatserver_store_commits_total", "chatserver_store_writes_total")
    pubs = await gen.publishers(spec["posters"])
    for n, conn in enumerate(pubs):  # a first POST on every connection: each is open and warm
        await gen.publish(conn, gen.target.content(n, WARM))
    latencies: list[float] = []
    before = await ours_metrics(gen, counted) if ours else {}
    meter = Meter(gen.pids)
    meter.start()
    deadline = time.perf_counter() + spec["duration"]

    async def poster(conn: HttpConnection) -> None:
        idx = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await gen.publish(conn, gen.target.content(idx))
            latencies.append(time.perf_counter() - started)
            idx += 1

    await asyncio.wait_for(asyncio.gather(*(poster(c) for c in pubs)), spec["duration"] + 30)
    measured = meter.stop()
    result: dict[str, Any] = {**measured, "posts": len(latencies), "lost": 0, "duplicated": 0}
    lat = sorted(latencies)
    if lat:
        result.update(
            posts_per_s=len(lat) / measured["wall"],
            p50_ms=1000 * lat[len(lat) // 2],
            p99_ms=1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            cpu_per_post_ms=1000 * measured["server_cpu"] / len(lat),
        )
    if ours:
        after = await ours_metrics(gen, counted)
        commits = after["store_commits_total"] - before["store_commits_total"]
        writes = after["store_writes_total"] - before["store_writes_total"]
        result.update(commits=commits, writes=writes, writes_per_commit=writes / commits if commits else 0.0)
    for conn in pubs:
        conn.close()
    return result


WORKLOADS: dict[str, Callable[[Generator], Coroutine[Any, Any, dict[str, Any]]]] = {
    "ws": lambda g: run_fanout(g, g.spec["clients"], 0),
    "poll": lambda g: run_fanout(g, 0, g.spec["clients"]),
    "mixed": lambda g: run_fanout(
        g,
        int(g.spec["clients"] * g.spec.get("ws_fraction", 0.8)),
        g.spec["clients"] - int(g.spec["clients"] * g.spec.get("ws_fraction", 0.8)),
    ),
    "idle": run_idle,
    "latency": run_latency,
    "slow": run_slow,
    "storm": run_storm,
    "post": run_post,
}


async def main() -> None:
    raise_nofile()
    spec = json.loads(sys.stdin.readline())
    gen = Generator(spec)
    try:
        result = await asyncio.wait_for(WORKLOADS[spec["workload"]](gen), spec.get("deadline", 600))
    except Exception as exc:  # the run failed: report it as a failed run, never a traceback-only exit
        result = {"failed_run": f"{type(exc).__name__}: {exc}", "lost": -1, "duplicated": 0}
    await gen.shutdown()
    result["errors"] = gen.errors[:10]
    result["error_count"] = len(gen.errors)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
