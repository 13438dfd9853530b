"""A worker's side of chatserver/supervisor.py: its channel to the supervisor, and what it shares with its siblings.

`WorkerLink` owns, in a worker process:

- the channel the supervisor passed (a SOCK_SEQPACKET socket): the worker's systemd `Notifier` (READY, STATUS,
  WATCHDOG, STOPPING go to the supervisor, which speaks to systemd for all), the way the other workers' hints
  come in (wake-ups and typing, `chatserver.cluster.Peers`: a message `HINT=<payload>` that the supervisor
  passes on to every other worker), and the supervisor's life: when the channel ends the worker stops;
- `/metrics` for the whole group: each worker serves its own exposition on a Unix socket of the abstract
  namespace named after the group and its number, and the worker that answers a scrape reads every sibling's
  (within SCRAPE_TIMEOUT) and labels each sample with its `worker`. Both ends check that the other is a process
  of the same user (SO_PEERCRED), so no other local user can read or stand in for a worker.

Hints are hints: one that cannot be sent at once (a sibling restarting, a full buffer) is dropped, and the log
poll catches up (chatserver/feed.py). Nothing here is HTTP.
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

from chatserver import systemd
from chatserver.cluster import Peers
from chatserver.metrics import Metrics, labelled_exposition
from chatserver.supervisor import WorkerHandoff

log = logging.getLogger(__name__)

HINT = b"HINT="
CHANNEL_MESSAGE = 65536
CHANNEL_BATCH = 64
SCRAPE_TIMEOUT = 2.0
# The most bytes of one sibling's exposition read for a scrape.
SCRAPE_LIMIT = 8 * 1024 * 1024
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def metrics_address(group: str, index: int) -> str:
    """The abstract Unix socket of a worker's own metrics."""
    return f"\0chatserver-{group}-{index}-metrics"


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

    @property
    def name(self) -> str:
        return f"worker {self.handoff.index}"

    async def start(self, peers: Peers, metrics: Metrics, on_gone: Callable[[], None]) -> None:
        """Take hints from the siblings and send them this worker's; serve and gather metrics; call `on_gone`
        when the supervisor is gone."""
        self._peers, self._metrics, self._on_gone = peers, metrics, on_gone
        peers.channels.append(self._send_hint)
        if peers.send_head not in peers.feed.commit_hooks:
            peers.feed.commit_hooks.append(peers.send_head)
        asyncio.get_running_loop().add_reader(self.channel.fileno(), self._on_channel)
        self._server = await asyncio.start_unix_server(
            self._serve_metrics, path=metrics_address(self.handoff.group, self.handoff.index)
        )
        metrics.gather = self.scrape

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._peers is not None and self._send_hint in self._peers.channels:
            self._peers.channels.remove(self._send_hint)

    def close_channel(self) -> None:
        """Last, as the process exits: the supervisor sees the channel end."""
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
        self.notifier.close()

    # -- hints --------------------------------------------------------------------------------------------

    def _send_hint(self, payload: bytes) -> None:
        try:
            self.channel.send(HINT + payload)
        except (BlockingIOError, InterruptedError):
            log.debug("a hint to the other workers was dropped: the channel is full")
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
            if data.startswith(HINT) and self._peers is not None:
                self._peers.received(data[len(HINT):])

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
