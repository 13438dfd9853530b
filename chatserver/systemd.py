"""systemd integration with the standard library only: the notify protocol, the watchdog, socket activation.

It owns the conversation with the service manager and nothing else: `Notifier` sends `READY=1`, `STATUS=`,
`WATCHDOG=1` and `STOPPING=1` datagrams to `$NOTIFY_SOCKET` (and is a no-op where that is unset, so the server
runs the same outside systemd); `Heartbeat` pings the watchdog and refreshes the status line from the event
loop itself, so a blocked loop misses its pings and systemd restarts the service; `inherited_sockets` adopts
the listening sockets of a `.socket` unit (`$LISTEN_FDS`); `is_journal_stream` tells whether stderr goes to
journald. It never imports anything HTTP: what the status line says is handed in as a callable.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

from chatserver.numbers import is_ascii_decimal

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
STATUS_INTERVAL = 5.0


class Notifier:
    """The sender side of sd_notify(3): one datagram per call to the socket systemd named, or nothing."""

    def __init__(self, address: str | None) -> None:
        self._address: str | bytes | None = None
        self._socket: socket.socket | None = None
        self._failed = False
        if not address:
            return
        if address.startswith("@"):
            # An abstract-namespace socket: the leading '@' stands for a NUL byte.
            self._address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._address = address
        else:
            log.warning("NOTIFY_SOCKET=%r is not a path or an abstract socket; not notifying systemd", address)
            return
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Never block the event loop on the manager: a datagram that does not fit now is dropped.
        self._socket.setblocking(False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET"))

    @classmethod
    def over(cls, sock: socket.socket) -> Notifier:
        """A notifier that sends on a connected socket: a worker's channel to its supervisor, which listens as
        systemd would (chatserver/supervisor.py)."""
        notifier = cls(None)
        sock.setblocking(False)
        notifier._socket = sock
        return notifier

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` fields in one datagram; True if it was sent. Never raises."""
        if self._socket is None:
            return False
        data = "\n".join(fields).encode()
        try:
            if self._address is None:
                self._socket.send(data)
            else:
                self._socket.sendto(data, self._address)
        except OSError as exc:
            if not self._failed:  # once, not at every watchdog tick
                log.warning("cannot notify systemd at NOTIFY_SOCKET: %s", exc.strerror or exc)
                self._failed = True
            return False
        self._failed = False
        return True

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", status_field(status))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def status_field(text: str) -> str:
    """The `STATUS=` field of a notification."""
    # A field ends at a newline: the status line must be one line.
    return "STATUS=" + " ".join(text.split("\n"))


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds within which systemd expects `WATCHDOG=1` from this process, or None when it expects none.

    `$WATCHDOG_PID`, where set, names the process the watchdog is meant for: any other process ignores it.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not is_ascii_decimal(usec) or int(usec) == 0:
        return None
    target = environ.get("WATCHDOG_PID", "")
    if target and target != str(pid):
        return None
    return int(usec) / 1_000_000


class Heartbeat:
    """From the event loop: `WATCHDOG=1` at least every half watchdog interval, `STATUS=` whenever it changes.

    Each tick is a `loop.call_later` callback: when something blocks the loop, no tick runs, no ping is sent,
    and systemd (after `WatchdogSec`) kills and restarts the service. `healthy`, where given, is asked at each
    tick: while it answers False no ping is sent either (a supervisor one of whose workers is down).
    """

    def __init__(
        self,
        notifier: Notifier,
        status: Callable[[], str],
        watchdog: float | None,
        *,
        status_interval: float = STATUS_INTERVAL,
        healthy: Callable[[], bool] | None = None,
    ) -> None:
        self._notifier = notifier
        self._healthy = healthy
        self._status = status
        self._watchdog = watchdog
        self._period = min(watchdog / 2, status_interval) if watchdog else status_interval
        self._last_status = ""
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop, *first: str) -> None:
        """Tick now (sending the `first` fields too, such as `READY=1`), then every half watchdog interval
        (every `status_interval` seconds at most)."""
        if not self._notifier.enabled:
            return
        self._loop = loop
        self._tick(*first)

    def _tick(self, *first: str) -> None:
        fields = [*first, "WATCHDOG=1"] if self._watchdog and self._is_healthy() else list(first)
        try:
            status = self._status()
        except Exception:  # a broken status line must never stop the watchdog
            log.exception("cannot describe the server's status")
            status = self._last_status
        if status != self._last_status:
            fields.append(status_field(status))
            self._last_status = status
        if fields:
            self._notifier.send(*fields)
        if self._loop is not None:
            self._timer = self._loop.call_later(self._period, self._tick)

    def _is_healthy(self) -> bool:
        if self._healthy is None:
            return True
        try:
            return self._healthy()
        except Exception:  # as a broken status line: logged, and no ping while it is not known to be healthy
            log.exception("cannot tell whether the server is healthy")
            return False

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None


def is_journal_stream(environ: Mapping[str, str], fd: int) -> bool:
    """True when `fd` is the journald stream systemd connected (`$JOURNAL_STREAM` is its `device:inode`).

    Comparing the two, rather than only looking for the variable, keeps a process whose output was redirected
    elsewhere (to a file, a pipe) from writing journald's priority prefixes there.
    """
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not is_ascii_decimal(device) or not is_ascii_decimal(inode):
        return False
    try:
        stat = os.fstat(fd)
    except OSError:
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


def inherited_sockets(environ: Mapping[str, str], pid: int) -> list[socket.socket]:
    """The listening sockets systemd passed to this process (sd_listen_fds(3)), non-blocking; [] when none.

    `$LISTEN_PID` must name this process: a variable inherited by some other process is not meant for it.
    Raises ValueError for a passed descriptor that is not a listening stream socket.
    """
    count = environ.get("LISTEN_FDS", "")
    if environ.get("LISTEN_PID", "") != str(pid) or not is_ascii_decimal(count):
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        # Ours alone from now on: a child process must not inherit the listener.
        os.set_inheritable(fd, False)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ValueError(f"file descriptor {fd} passed by systemd is not a socket: {exc.strerror}") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise ValueError(f"file descriptor {fd} passed by systemd is not a listening stream socket")
        sock.setblocking(False)
        sockets.append(sock)
    return sockets
