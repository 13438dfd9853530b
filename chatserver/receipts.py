"""Receipts (PROTOCOL section 11): acknowledgements and read marks gathered in memory, and written to the log at
most once a second.

`Receipts` owns what clients acknowledged (a log position per user: a resume, the next long-poll, a WebSocket
`ack` frame, `POST /api/ack`) and which read marks moved, since its last write. It writes them through the store
in one transaction per flush (`queries.record_receipts`): delivered positions move there, and one
`dialog:receipt` is logged per dialog in which any member moved, carrying every member that moved. The log's
follower publishes those events like any other; nothing here touches the broadcaster.

Flushes on one process are at least `interval` seconds apart (from one's commit to the next one's start), so a
member's advances in a dialog make at most one receipt a second there, and a dialog at most one receipt frame a
second per connection however many of its members moved. Memory is bounded: at most MAX_PENDING users wait for a
flush (an acknowledgement beyond is dropped and counted; the client's next one carries it), and the last position
written per user is kept in an LRU so that a repeated acknowledgement (a poll woken by typing asks again with the
same cursor) costs nothing.

A flush that fails (the database away) keeps what it held for the next one. What waits in memory when the process
dies is lost: delivered positions move at the client's next acknowledgement, and read marks are already stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from chatserver import queries
from chatserver.lru import LRU
from chatserver.store import Store

log = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between two flushes of one process, at least
GATHER = 0.05  # seconds a first acknowledgement waits for those that come with it (a fan-out's)
MAX_PENDING = 100_000
REMEMBERED = 100_000
STOP_WAIT = 5.0  # seconds the last flush may take at shutdown


class Receipts:
    """See the module docstring. Single-threaded: call it from the IOLoop only."""

    def __init__(
        self,
        store: Store,
        *,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.store = store
        self.interval = interval
        self._clock = clock
        self._max_pending = max_pending
        self._acks: dict[str, int] = {}
        self._reads: dict[tuple[str, str], None] = {}  # (dialog, user), in the order they came
        self._written: LRU[str, int] = LRU(REMEMBERED)  # user -> the last position flushed for them
        self._last_flush = -interval
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[int] | None = None
        self._stopped = False
        self.logged = 0  # dialog:receipt events written (chatserver_receipts_logged_total)
        self.dropped = 0  # acknowledgements dropped for want of room

    @property
    def pending(self) -> int:
        return len(self._acks) + len(self._reads)

    @property
    def idle(self) -> bool:
        """Nothing waits and nothing is being written: every receipt owed so far is in the log."""
        return not self.pending and self._timer is None and self._flushing is None

    def acknowledge(self, user_id: str, position: int) -> None:
        """The user's client has every event up to `position` (of this log, at most its head): delivered."""
        if position <= (self._written.get(user_id) or 0) or position <= self._acks.get(user_id, 0):
            return
        if user_id not in self._acks and len(self._acks) >= self._max_pending:
            self.dropped += 1
            return
        self._acks[user_id] = position
        self._schedule()

    def read(self, dialog_id: str, user_id: str) -> None:
        """The user's read mark in the dialog moved (it is stored): its receipt goes with the next flush."""
        if len(self._reads) < self._max_pending:
            self._reads[(dialog_id, user_id)] = None
            self._schedule()
        else:
            self.dropped += 1

    def _schedule(self) -> None:
        if self._timer is not None or self._flushing is not None or self._stopped:
            return
        delay = max(GATHER, self._last_flush + self.interval - self._clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._start_flush)

    def _start_flush(self) -> None:
        self._timer = None
        task = self._flushing = asyncio.get_running_loop().create_task(self.flush())
        task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[int]) -> None:
        self._flushing = None
        if not task.cancelled() and task.exception() is not None:
            log.error("writing receipts failed", exc_info=task.exception())
        if self.pending:
            self._schedule()

    async def flush(self) -> int:
        """Write what waits now, in one transaction; the number of receipts logged."""
        acks, self._acks = self._acks, {}
        reads, self._reads = self._reads, {}
        if not acks and not reads:
            return 0
        try:
            events = await self.store.write(queries.record_receipts, acks, list(reads))
        except Exception as exc:
            self._keep(acks, reads)
            log.warning("receipts not written, kept for the next try: %s", exc)
            return 0
        finally:
            # From the commit: the next write's receipts reach a connection at least `interval` after these.
            self._last_flush = self._clock()
        for user_id, position in acks.items():
            self._written.put(user_id, max(position, self._written.get(user_id) or 0))
        self.logged += len(events)
        return len(events)

    def _keep(self, acks: dict[str, int], reads: dict[tuple[str, str], None]) -> None:
        """Put back what a failed flush held, before what came meanwhile (and never beyond the bound)."""
        for user_id, position in acks.items():
            if position > self._acks.get(user_id, 0) and (user_id in self._acks or len(self._acks) < self._max_pending):
                self._acks[user_id] = position
        self._reads = {**reads, **self._reads}

    async def stop(self) -> None:
        """Stop scheduling, and write what waits (bounded by STOP_WAIT) before the store closes."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with contextlib.suppress(Exception):
            if self._flushing is not None:
                await asyncio.wait_for(asyncio.shield(self._flushing), STOP_WAIT)
            await asyncio.wait_for(self.flush(), STOP_WAIT)
