"""A worker's side of chatserver/supervisor.py: its channel to the supervisor, and what it shares with its siblings.

`WorkerLink` owns, in a worker process:

- the channel the supervisor passed (a SOCK_SEQPACKET socket): the worker's systemd `Notifier` (READY, STATUS,
  WATCHDOG, STOPPING go to the supervisor, which speaks to systemd for all); what the workers tell each other,
  each message passed on by the supervisor to every other worker: the events of each commit (`EVENTS=<JSON>`,
  published by the others as they are, chatserver.feed.LogFeed.offered, with no read of the log; `WAKE`, read
  the log, where they would not fit in one message) and the hints of `chatserver.cluster.Peers` (`HINT=`:
  typing); and the supervisor's life: when the channel ends the worker stops;
- `/metrics` for the whole group: each worker serves its own exposition on a Unix socket of the abstract
  namespace named after the group and its number, and the worker that answers a scrape reads every sibling's
  (within SCRAPE_TIMEOUT) and labels each sample with its `worker`. Both ends check that the other is a process
  of the same user (SO_PEERCRED), so no other local user can read or stand in for a worker.

These are hints: one that cannot be sent at once (a sibling restarting, a full buffer) is dropped, and the log
poll catches up (chatserver/feed.py); events that come out of order wait for the log to be read for what comes
before them. Only the supervisor's channel carries events: nothing another host or user can send is published
as an event. Nothing here is HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable

from prometheus_client import generate_latest

from chatserver import jsonutil, systemd
from chatserver.cluster import Peers
from chatserver.errors import ChatError
from chatserver.forwarding import RESULT, WRITE, WRITER, WriteForwarding
from chatserver.metrics import Metrics, labelled_exposition
from chatserver.store import LogEvent
from chatserver.supervisor import DOWN, GONE, UP, WorkerHandoff, life

log = logging.getLogger(__name__)

HINT = b"HINT="
EVENTS = b"EVENTS="
WAKE = b"WAKE"
# The largest message of events: a commit whose events take more is announced with WAKE instead.
EVENTS_LIMIT = 60_000
CHANNEL_MESSAGE = 65536
CHANNEL_BATCH = 64
SCRAPE_TIMEOUT = 2.0
# The most bytes of one sibling's exposition read for a scrape.
SCRAPE_LIMIT = 8 * 1024 * 1024
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def metrics_address(group: str, index: int) -> str:
    """The abstract Unix socket of a worker's own metrics."""
    return f"\0chatserver-{group}-{index}-metrics"


def encode_events(events: list[LogEvent]) -> bytes:
    return jsonutil.dumps_bytes([[e.position, e.type, e.dialog_id, e.data, e.members_version, e.user_id, e.change,
                                  e.source, e.extra] for e in events])


def decode_events(payload: bytes) -> list[LogEvent]:
    """The events of an `EVENTS=` message; ValueError where it is not what `encode_events` writes."""
    try:
        rows = jsonutil.loads(payload)
    except ChatError:
        raise ValueError("not JSON") from None
    if not isinstance(rows, list):
        raise ValueError("not a list of events")
    events = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 9):
            raise ValueError("an event is not a list of 9 fields")
        position, kind, dialog_id, data, version, user_id, change, source, extra = row
        if not (isinstance(position, int) and isinstance(version, int) and isinstance(change, bool)
                and all(isinstance(v, str) for v in (kind, dialog_id, data, source))
                and all(v is None or isinstance(v, str) for v in (user_id, extra))):
            raise ValueError("an event's field has the wrong type")
        events.append(LogEvent(position, kind, dialog_id, data, version, user_id, change, source, extra))
    return events


def same_user(sock: socket.socket) -> bool:
    """True when the process at the other end of this Unix socket runs as this process's user."""
    try:
        _, uid, _ = _CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
    except OSError:
        return False
    return bool(uid == os.getuid())


class WorkerLink:
    """This worker's channel to its supervisor and its siblings; see the module docstring."""

    def __init__(self, handoff: WorkerHandoff) -> None:
        self.handoff = handoff
        self.channel, self.sockets = handoff.open()
        self.notifier = systemd.Notifier.over(self.channel)
        self._peers: Peers | None = None
        self._metrics: Metrics | None = None
        self._server: asyncio.AbstractServer | None = None
        self._on_gone: Callable[[], None] | None = None
        self._gone = False
        self.forwarding: WriteForwarding | None = None

    @property
    def name(self) -> str:
        return f"worker {self.handoff.index}"

    async def start(self, peers: Peers, metrics: Metrics, on_gone: Callable[[], None]) -> None:
        """Take hints from the siblings and send them this worker's; serve and gather metrics; call `on_gone`
        when the supervisor is gone."""
        self._peers, self._metrics, self._on_gone = peers, metrics, on_gone
        peers.channels.append(self._send_hint)
        peers.feed.event_hooks.append(self._send_events)
        self.forwarding = WriteForwarding(self.handoff.index, peers.feed, self._send_or_raise)
        self.forwarding.start()
        forwarding = self.forwarding
        metrics.observe_forwarding(lambda: forwarding.forwarded, lambda: forwarding.committed_for_others)
        asyncio.get_running_loop().add_reader(self.channel.fileno(), self._on_channel)
        self._server = await asyncio.start_unix_server(
            self._serve_metrics, path=metrics_address(self.handoff.group, self.handoff.index)
        )
        metrics.gather = self.scrape

    async def close(self) -> None:
        if self.forwarding is not None:
            self.forwarding.stop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._peers is not None and self._send_hint in self._peers.channels:
            self._peers.channels.remove(self._send_hint)
            self._peers.feed.event_hooks.remove(self._send_events)

    def close_channel(self) -> None:
        """Last, as the process exits: the supervisor sees the channel end."""
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
        self.notifier.close()

    # -- hints --------------------------------------------------------------------------------------------

    def _send_hint(self, payload: bytes) -> None:
        self._send(HINT + payload)

    def _send_events(self, events: list[LogEvent]) -> None:
        payload = encode_events(events)
        self._send(EVENTS + payload if len(payload) <= EVENTS_LIMIT else WAKE)

    def _send_or_raise(self, message: bytes) -> None:
        """A message that must not be lost unnoticed: OSError (BlockingIOError where the channel is full)."""
        self.channel.send(message)

    def _send(self, message: bytes) -> None:
        try:
            self.channel.send(message)
        except (BlockingIOError, InterruptedError):
            log.debug("a message to the other workers was dropped: the channel is full")
        except OSError:
            pass  # the supervisor is gone: _on_channel stops this worker

    def _on_channel(self) -> None:
        for _ in range(CHANNEL_BATCH):
            try:
                data = self.channel.recv(CHANNEL_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._supervisor_gone()
                return
            if self._peers is not None:
                self._received(self._peers, data)

    def _received(self, peers: Peers, data: bytes) -> None:
        if data.startswith(EVENTS):
            try:
                events = decode_events(data[len(EVENTS):])
            except ValueError as exc:
                log.warning("ignored a malformed message of events from another worker: %s", exc)
                peers.feed.wake()
                return
            peers.feed.offered(events)
        elif data == WAKE:
            peers.feed.wake()
        elif data.startswith(HINT):
            peers.received(data[len(HINT):])
        elif self.forwarding is not None:
            self._forwarding_message(self.forwarding, data)

    @staticmethod
    def _forwarding_message(forwarding: WriteForwarding, data: bytes) -> None:
        if data.startswith(WRITE):
            forwarding.asked(data[len(WRITE):])
        elif data.startswith(RESULT):
            forwarding.answered(data[len(RESULT):])
        else:
            for kind in (UP, DOWN, GONE):
                if data == life(kind, WRITER):
                    forwarding.writer_changed(up=kind == UP, gone=kind == GONE)

    def _supervisor_gone(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
        if not self._gone and self._on_gone is not None:
            self._gone = True
            log.warning("the supervisor is gone; stopping")
            self._on_gone()

    # -- metrics ------------------------------------------------------------------------------------------

    async def _serve_metrics(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._metrics is not None and same_user(writer.get_extra_info("socket")):
                writer.write(generate_latest(self._metrics.registry))
                await asyncio.wait_for(writer.drain(), SCRAPE_TIMEOUT)
        except (OSError, TimeoutError):
            pass  # the asking sibling went away or stopped reading
        finally:
            writer.close()

    async def scrape(self) -> bytes:
        """Every worker's metrics in one exposition, labelled by worker; a sibling that does not answer within
        SCRAPE_TIMEOUT is missing from it (`chatserver_worker_scraped` 0)."""
        assert self._metrics is not None
        own = self.handoff.index
        others = [i for i in range(1, self.handoff.count + 1) if i != own]
        answers = await asyncio.gather(*(self._scrape_sibling(i) for i in others))
        texts: dict[str, str | None] = {str(own): generate_latest(self._metrics.registry).decode()}
        texts.update({str(i): text for i, text in zip(others, answers, strict=True)})
        return labelled_exposition(dict(sorted(texts.items(), key=lambda item: int(item[0]))))

    async def _scrape_sibling(self, index: int) -> str | None:
        try:
            return await asyncio.wait_for(self._read_sibling(index), SCRAPE_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as exc:
            log.debug("worker %d's metrics are not in this scrape: %r", index, exc)
            return None

    async def _read_sibling(self, index: int) -> str:
        reader, writer = await asyncio.open_unix_connection(metrics_address(self.handoff.group, index))
        try:
            if not same_user(writer.get_extra_info("socket")):
                raise ValueError("the socket is held by another user")
            chunks, size = [], 0
            while chunk := await reader.read(65536):
                size += len(chunk)
                if size > SCRAPE_LIMIT:
                    raise ValueError("the exposition is too large")
                chunks.append(chunk)
            return b"".join(chunks).decode()
        finally:
            writer.close()
