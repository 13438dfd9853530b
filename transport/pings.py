"""Keep-alive for every open WebSocket and SSE stream, from one timer per kind rather than a task per connection.

Tornado's `websocket_ping_interval` runs a task per connection (a coroutine, a sleep future and a timer each),
about a kilobyte per idle WebSocket held for its whole life. `PingSweep` does the same job for all of them
with one timer: every `interval` seconds it pings each open socket, and `timeout` seconds later closes the
ones that have not answered with a pong, as Tornado would ("ping timed out", code 1000): how the server finds
dead peers. `HeartbeatSweep` sends every open SSE stream its keep-alive comment every `interval` seconds, so
that proxies and clients can tell a quiet stream from a dead one. Each timer runs only while it has
connections.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

log = logging.getLogger(__name__)


class Pingable(Protocol):
    def send_ping(self) -> bool: ...

    def ping_timed_out(self) -> None: ...


class Beating(Protocol):
    def send_heartbeat(self) -> None: ...


class PingSweep:
    """Pings `add`ed sockets every `interval` s; those without a pong (`answered`) `timeout` s later are closed."""

    def __init__(self, interval: float, timeout: float) -> None:
        self.interval = interval
        # As Tornado: a timeout longer than the interval is the interval (one ping outstanding at a time).
        self.timeout = min(timeout, interval)
        self._sockets: set[Pingable] = set()
        self._waiting: set[Pingable] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, socket: Pingable) -> None:
        self._sockets.add(socket)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._ping)

    def discard(self, socket: Pingable) -> None:
        self._sockets.discard(socket)
        self._waiting.discard(socket)
        if not self._sockets and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def answered(self, socket: Pingable) -> None:
        """A pong came from `socket`."""
        self._waiting.discard(socket)

    def __len__(self) -> int:
        return len(self._sockets)

    def _ping(self) -> None:
        # Sockets opened after this sweep wait for the next one, as each of Tornado's did a full interval.
        self._waiting = {socket for socket in tuple(self._sockets) if socket.send_ping()}
        self._timer = asyncio.get_running_loop().call_later(self.timeout, self._check)

    def _check(self) -> None:
        waiting, self._waiting = self._waiting, set()
        for socket in waiting:
            if socket in self._sockets:
                try:
                    socket.ping_timed_out()
                except Exception:  # one failing close must not stop the sweep
                    log.exception("closing a WebSocket that did not answer its ping failed")
        self._timer = None
        if self._sockets:
            # The next ping one interval after this one was sent.
            self._timer = asyncio.get_running_loop().call_later(self.interval - self.timeout, self._ping)


class HeartbeatSweep:
    """Calls `send_heartbeat` of every `add`ed stream every `interval` s."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._streams: set[Beating] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, stream: Beating) -> None:
        self._streams.add(stream)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._beat)

    def discard(self, stream: Beating) -> None:
        self._streams.discard(stream)
        if not self._streams and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __len__(self) -> int:
        return len(self._streams)

    def _beat(self) -> None:
        for stream in tuple(self._streams):
            try:
                stream.send_heartbeat()
            except Exception:  # one failing stream must not stop the sweep
                log.exception("sending an SSE heartbeat failed")
        self._timer = asyncio.get_running_loop().call_later(self.interval, self._beat) if self._streams else None
