"""Worker processes on one host: the supervisor that starts them, watches them, restarts them and stops them.

With `workers` above 1, run.py's main process is this supervisor, and serves no client itself. It owns:

- the listening sockets, bound once (or adopted from systemd's `.socket` unit) and inherited by every worker,
  each of which accepts from them. One shared queue rather than one SO_REUSEPORT socket per worker: a worker
  that dies leaves the new connections to the others at once (a SO_REUSEPORT socket's waiting connections are
  reset when it closes, and the kernel goes on hashing clients to it until it does), nothing is bound again
  on a restart, and socket activation works unchanged;
- the workers, each `python run.py ... --worker SPEC` started afresh (never a fork of a process that runs a
  loop and threads), with the sockets and a channel of its own passed as descriptors (`WorkerHandoff`);
- the conversation with systemd on behalf of all of them. Over its channel each worker sends what it would
  send systemd (READY, STATUS, WATCHDOG, STOPPING); the supervisor sends READY once every worker serves,
  WATCHDOG only while every one serves and pings, a STATUS line naming each, and STOPPING on SIGTERM, which
  it passes on to every worker, waiting for them within `shutdown_grace` (and STOP_MARGIN) before it kills
  what is left.

A worker that exits, misses its watchdog, or does not serve within START_TIMEOUT of its start, is started again
after a backoff that doubles from RESTART_FIRST up to RESTART_CAP (reset once it has served for STABLE_AFTER
seconds). A worker whose channel ends (its supervisor gone, even by SIGKILL) stops by itself
(chatserver/siblings.py). This module never serves a client and imports nothing HTTP: the worker's command line
is handed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
from collections.abc import Callable, Mapping, Sequence

import attrs

from chatserver import systemd
from chatserver.numbers import is_ascii_decimal

log = logging.getLogger(__name__)

RESTART_FIRST = 0.5
RESTART_CAP = 10.0
STABLE_AFTER = 30.0
# Beyond shutdown_grace: a worker's own shutdown ends within the grace, then it closes its store and exits.
STOP_MARGIN = 3.0
KILL_WAIT = 5.0
# How often the workers' watchdogs and start-ups are looked at, at most.
CHECK_INTERVAL = 1.0
# A worker that does not serve within this many seconds of its start is killed (and started again).
START_TIMEOUT = 60.0
CHANNEL_MESSAGE = 65536
# The messages of a worker that are for its siblings, not for systemd: passed on as they are
# (chatserver/siblings.py: events of a commit, a wake-up, a hint).
RELAYED = (b"EVENTS=", b"WAKE", b"HINT=")
# A message for one sibling: `TO=<index>\n` and what that worker gets (chatserver/siblings.py: a forwarded write
# and its outcome).
ADDRESSED = b"TO="
# What the supervisor tells the workers of each other: a worker serves (UP), stops taking work (DOWN), is gone
# (GONE); each followed by its index.
UP, DOWN, GONE = b"UP=", b"DOWN=", b"GONE="


def life(kind: bytes, index: int) -> bytes:
    """UP, DOWN or GONE of worker `index`, as the workers get it."""
    return kind + str(index).encode()
# Datagrams read from one worker's channel per turn of the loop.
CHANNEL_BATCH = 64


@attrs.frozen
class WorkerHandoff:
    """What the supervisor tells a worker it starts: its number (1..count), the group's name (for the siblings'
    channels), and the descriptors it inherits: its channel to the supervisor and the listening sockets."""

    index: int
    count: int
    group: str
    channel: int
    listeners: tuple[int, ...]

    def to_arg(self) -> str:
        return f"{self.index}:{self.count}:{self.group}:{self.channel}:{','.join(map(str, self.listeners))}"

    @classmethod
    def parse(cls, text: str) -> WorkerHandoff:
        """The `--worker` argument; ValueError where it is not one the supervisor would write."""
        parts = text.split(":")
        if len(parts) != 5:
            raise ValueError("--worker must be INDEX:COUNT:GROUP:CHANNEL:LISTENERS")
        index, count, group, channel, listeners = parts
        numbers = [index, count, channel, *listeners.split(",")]
        if not all(is_ascii_decimal(n) for n in numbers) or not (group.isascii() and group.isalnum()):
            raise ValueError("--worker holds something other than numbers and a group name")
        handoff = cls(int(index), int(count), group, int(channel), tuple(int(fd) for fd in listeners.split(",")))
        if not 1 <= handoff.index <= handoff.count:
            raise ValueError("--worker's index is not between 1 and its count")
        return handoff

    def open(self) -> tuple[socket.socket, list[socket.socket]]:
        """The channel and the listening sockets, as this process's own (no child of it inherits them)."""
        sockets = []
        for fd in (self.channel, *self.listeners):
            os.set_inheritable(fd, False)
            sockets.append(socket.socket(fileno=fd))
        for sock in sockets:
            sock.setblocking(False)
        return sockets[0], sockets[1:]


@attrs.define(eq=False)
class Worker:
    """One worker as the supervisor sees it."""

    index: int
    process: asyncio.subprocess.Process | None = None
    channel: socket.socket | None = None
    ready: bool = False
    ready_at: float = 0.0
    started_at: float = 0.0
    pinged: float = 0.0
    status: str = ""
    failures: int = 0
    restart: asyncio.TimerHandle | None = None
    restart_at: float = 0.0
    delay: float = 0.0
    last_exit: str = ""
    watcher: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.returncode is None else None


class StopRequest:
    """What the supervisor waits on to stop (run.py's SIGTERM/SIGINT handler): awaitable, with the signal's name."""

    name: str

    async def wait(self) -> None:
        raise NotImplementedError


def restart_delay(failures: int) -> float:
    """Seconds before a worker that failed `failures` times in a row is started again."""
    return min(RESTART_CAP, RESTART_FIRST * 2.0 ** min(failures - 1, 32))


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with {code}"


class Supervisor:
    """Starts `count` workers and keeps them running until `stop` completes; see the module docstring."""

    def __init__(
        self,
        *,
        count: int,
        command: Callable[[WorkerHandoff], Sequence[str]],
        sockets: Sequence[socket.socket],
        notifier: systemd.Notifier,
        watchdog: float | None,
        grace: float,
        url: str,
        environ: Mapping[str, str],
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.count = count
        self.start_timeout = start_timeout
        self.command = command
        self.sockets = list(sockets)
        self.notifier = notifier
        self.watchdog = watchdog
        # A worker pings at half its own interval; half of systemd's, so that a stuck worker is found and
        # replaced before systemd gives up on the whole service.
        self.worker_watchdog = watchdog / 2 if watchdog else None
        self.grace = grace
        self.url = url
        self.group = f"{os.getpid()}x{secrets.token_hex(8)}"
        self.environ = self._worker_environ(environ)
        self.workers = [Worker(index) for index in range(1, count + 1)]
        self.stopping = False
        self._announced = False
        self._heartbeat = systemd.Heartbeat(notifier, self.status, watchdog, healthy=self.all_serving)
        self._checker: asyncio.TimerHandle | None = None
        self._spawning: set[asyncio.Task[None]] = set()

    def _worker_environ(self, environ: Mapping[str, str]) -> dict[str, str]:
        # systemd's variables are the supervisor's: a worker speaks to it only through its channel.
        private = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
        env = {k: v for k, v in environ.items() if k not in private}
        if self.worker_watchdog:
            env["WATCHDOG_USEC"] = str(int(self.worker_watchdog * 1_000_000))
        return env

    # -- running -------------------------------------------------------------------------------------------

    async def run(self, stop: StopRequest) -> int:
        """Start every worker, keep them running until `stop`, then stop them all; the exit code (0: every
        worker stopped by itself within the grace)."""
        loop = asyncio.get_running_loop()
        self.notifier.send(systemd.status_field(f"starting {self.count} workers"))
        for worker in self.workers:
            self._spawn(worker)
        self._checker = loop.call_later(CHECK_INTERVAL, self._check_workers)
        await stop.wait()
        return await self._stop_all(stop.name)

    def _spawn(self, worker: Worker) -> None:
        worker.restart = None
        task = asyncio.get_running_loop().create_task(self._start(worker))
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)

    async def _start(self, worker: Worker) -> None:
        if self.stopping:
            return
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        handoff = WorkerHandoff(worker.index, self.count, self.group, child.fileno(),
                                tuple(sock.fileno() for sock in self.sockets))
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command(handoff),
                stdin=asyncio.subprocess.DEVNULL,
                env=self.environ,
                pass_fds=(child.fileno(), *handoff.listeners),
            )
        except OSError as exc:
            parent.close()
            log.error("cannot start worker %d: %s", worker.index, exc.strerror or exc)
            self._schedule_restart(worker, f"failed to start ({exc.strerror or exc})")
            return
        finally:
            child.close()
        parent.setblocking(False)
        worker.process, worker.channel = process, parent
        worker.ready, worker.status, worker.pinged, worker.started_at = False, "", loop.time(), loop.time()
        loop.add_reader(parent.fileno(), self._on_channel, worker)
        worker.watcher = loop.create_task(self._watch(worker, process))
        log.info("worker %d started (pid %d)", worker.index, process.pid)
        if self.stopping:  # SIGTERM came while it was being started
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)

    async def _watch(self, worker: Worker, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        self._close_channel(worker)
        worker.ready = False
        self._relay(worker, life(GONE, worker.index))
        worker.last_exit = describe_exit(code)
        if self.stopping:
            log.info("worker %d (pid %d) %s", worker.index, process.pid, worker.last_exit)
            return
        log.warning("worker %d (pid %d) %s; starting it again", worker.index, process.pid, worker.last_exit)
        self._schedule_restart(worker, worker.last_exit)

    def _schedule_restart(self, worker: Worker, why: str) -> None:
        if self.stopping:
            return
        loop = asyncio.get_running_loop()
        served = loop.time() - worker.ready_at if worker.ready_at else 0.0
        worker.failures = 1 if served >= STABLE_AFTER else worker.failures + 1
        worker.ready_at = 0.0
        delay = worker.delay = restart_delay(worker.failures)
        worker.last_exit = why
        worker.restart_at = loop.time() + delay
        worker.restart = loop.call_later(delay, self._spawn, worker)
        self._refresh_status()

    def _close_channel(self, worker: Worker) -> None:
        if worker.channel is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(worker.channel.fileno())
            worker.channel.close()
            worker.channel = None

    # -- what workers say ----------------------------------------------------------------------------------

    def _on_channel(self, worker: Worker) -> None:
        channel = worker.channel
        if channel is None:
            return
        for _ in range(CHANNEL_BATCH):
            try:
                data = channel.recv(CHANNEL_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # the worker closed its end: it is exiting, and _watch sees it go
                self._close_channel(worker)
                return
            self._on_message(worker, data)

    def _on_message(self, worker: Worker, data: bytes) -> None:
        if data.startswith(RELAYED):
            self._relay(worker, data)
            return
        if data.startswith(ADDRESSED):
            self._send_to(data)
            return
        fields = dict(line.split("=", 1) for line in data.decode(errors="replace").split("\n") if "=" in line)
        now = asyncio.get_running_loop().time()
        if "STATUS" in fields:
            worker.status = fields["STATUS"]
        if fields.get("WATCHDOG") == "1" or fields.get("READY") == "1":
            worker.pinged = now
        if fields.get("READY") == "1" and not worker.ready:
            worker.ready, worker.ready_at = True, now
            log.info("worker %d (pid %s) serving", worker.index, worker.pid)
            self._relay(worker, life(UP, worker.index))
            for other in self.workers:  # and the newcomer hears of those that already serve
                if other is not worker and other.ready and worker.channel is not None:
                    with contextlib.suppress(OSError):
                        worker.channel.send(life(UP, other.index))
            self._on_worker_ready()
        if fields.get("STOPPING") == "1":
            worker.ready = False
            self._relay(worker, life(DOWN, worker.index))
        self._refresh_status()

    def _send_to(self, data: bytes) -> None:
        """An addressed message to its worker, without its address; dropped where that worker has no channel
        (the sender hears GONE, or its wait ends)."""
        address, _, message = data[len(ADDRESSED):].partition(b"\n")
        text = address.decode("ascii", errors="replace")
        if not is_ascii_decimal(text):
            log.warning("dropped a message with a malformed address from a worker")
            return
        index = int(text)
        for worker in self.workers:
            if worker.index == index and worker.channel is not None:
                with contextlib.suppress(OSError):
                    worker.channel.send(message)

    def _relay(self, sender: Worker, data: bytes) -> None:
        for worker in self.workers:
            if worker is not sender and worker.channel is not None:
                # A worker that is exiting, or whose channel is full, misses the hint: hints may be lost.
                with contextlib.suppress(OSError):
                    worker.channel.send(data)

    def _on_worker_ready(self) -> None:
        if self._announced or not all(w.ready for w in self.workers):
            return
        self._announced = True
        log.info("listening on %s with %d workers", self.url, self.count)
        self._heartbeat.start(asyncio.get_running_loop(), "READY=1")

    def _refresh_status(self) -> None:
        if self._announced and not self.stopping:
            # Sent now, not at the next tick: a worker's restart should show in `systemctl status` at once.
            self.notifier.send(systemd.status_field(self.status()))

    def all_serving(self) -> bool:
        """Every worker serves, and (under a watchdog) pinged within its interval."""
        now = asyncio.get_running_loop().time()
        return all(
            w.ready and (self.worker_watchdog is None or now - w.pinged <= self.worker_watchdog)
            for w in self.workers
        )

    def _check_workers(self) -> None:
        """Kill a worker that is stuck: serving but past its watchdog, or not serving yet past START_TIMEOUT."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for worker in self.workers:
            process = worker.process
            if process is None or process.returncode is not None:
                continue
            if worker.ready and self.worker_watchdog and now - worker.pinged > self.worker_watchdog:
                why = f"missed its watchdog ({self.worker_watchdog:.1f}s)"
            elif not worker.ready and now - worker.started_at > self.start_timeout:
                why = f"did not serve within {self.start_timeout:.1f}s"
            else:
                continue
            log.error("worker %d (pid %d) %s; killing it", worker.index, process.pid, why)
            worker.ready = False
            worker.started_at = now  # killed once: its exit, not this check, starts it again
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        interval = min(CHECK_INTERVAL, self.worker_watchdog / 2) if self.worker_watchdog else CHECK_INTERVAL
        self._checker = loop.call_later(interval, self._check_workers)

    def status(self) -> str:
        """The STATUS line: the address, and each worker by number and pid with its own status."""
        now = asyncio.get_running_loop().time()
        parts = []
        for w in self.workers:
            if w.ready:
                parts.append(f"#{w.index} pid {w.pid}: {w.status}")
            elif w.pid is not None:
                parts.append(f"#{w.index} pid {w.pid}: starting")
            elif w.restart is not None:
                parts.append(f"#{w.index}: {w.last_exit}, restarting in {max(w.restart_at - now, 0):.1f}s")
            else:
                parts.append(f"#{w.index}: {w.last_exit or 'not started'}")
        return f"serving {self.url} with {self.count} workers: " + " | ".join(parts)

    # -- stopping ------------------------------------------------------------------------------------------

    async def _stop_all(self, why: str) -> int:
        self.stopping = True
        self._heartbeat.stop()
        if self._checker is not None:
            self._checker.cancel()
        log.info("%s: stopping %d workers", why, self.count)
        self.notifier.stopping(f"stopping: {self.status().split(': ', 1)[1]}")
        for worker in self.workers:
            if worker.restart is not None:
                worker.restart.cancel()
                worker.restart = None
        if self._spawning:
            await asyncio.wait(list(self._spawning), timeout=KILL_WAIT)
        live = [w for w in self.workers if w.pid is not None]
        for worker in live:
            with contextlib.suppress(ProcessLookupError):
                assert worker.process is not None
                worker.process.send_signal(signal.SIGTERM)
        watchers = [w.watcher for w in live if w.watcher is not None]
        clean = True
        if watchers:
            _, pending = await asyncio.wait(watchers, timeout=self.grace + STOP_MARGIN)
            if pending:
                clean = False
                for worker in live:
                    if worker.pid is not None and worker.process is not None:
                        log.warning("worker %d (pid %d) still running %.1fs after SIGTERM; killing it",
                                    worker.index, worker.pid, self.grace + STOP_MARGIN)
                        with contextlib.suppress(ProcessLookupError):
                            worker.process.kill()
                await asyncio.wait(pending, timeout=KILL_WAIT)
        codes = [w.process.returncode for w in live if w.process is not None]
        clean = clean and all(code in (0, -signal.SIGTERM) for code in codes)
        for sock in self.sockets:
            sock.close()
        if clean:
            log.info("all workers stopped")
        else:
            log.warning("workers stopped, not all cleanly: %s",
                        ", ".join(describe_exit(c) if c is not None else "still running" for c in codes))
        return 0 if clean else 1

