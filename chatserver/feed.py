"""The log's follower: every event of the store's log into the broadcaster, once each, in position order.

`LogFeed` is the broadcaster's only publisher. Events reach it two ways: this process's own commits, handed over
by the store right after each commit (`committed`: published at once when they are next in line), and the
commits of every other process on the database, which it reads from the log (`catch_up`) when woken: by
PostgreSQL's NOTIFY, by the cluster bus, or by its own poll every `poll_interval` seconds, which also covers a
wake-up that was lost (a listener reconnecting, a broker down). A process cut off from the others for a while
reads what it missed when it is back: its clients get those events, not a reset.

For each event it works out who receives it, from the log alone (`chatserver.eventlog`): the reader of a read
mark; the members of a dialog change (in its data) and those it removed; for anything else the members of the
dialog's member list version the event names, from `Membership`, which caches each version (a version never
changes) and what each dialog's current members are, for authorization. A dialog change also updates that cache
as it is published, so a member removed on any process loses access here as soon as the change is followed.

It also prunes the log beyond `event_retention`, in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from chatserver import eventlog, jsonutil
from chatserver.broadcaster import Broadcaster, EventRecord, event_payload
from chatserver.errors import NotFound
from chatserver.lru import LRU
from chatserver.store import LogEvent, Store, StoreError

log = logging.getLogger(__name__)

CATCH_UP_BATCH = 1000
RETRY_PAUSE = 1.0
# Read failures are logged at most this often, a failure that comes and goes included; the end of a failure
# whose start was logged is logged once.
PROBLEM_LOG_EVERY = 60.0


class Membership:
    """Who is in which dialog: each member list version (immutable, cached) and each dialog's current one."""

    def __init__(self, store: Store, size: int = 10000) -> None:
        self.store = store
        self._versions: LRU[tuple[str, int], frozenset[str]] = LRU(size)
        self._current: LRU[str, tuple[int, frozenset[str]]] = LRU(size)

    def at(self, dialog_id: str, version: int) -> frozenset[str] | None:
        return self._versions.get((dialog_id, version))

    async def load_at(self, dialog_id: str, version: int) -> frozenset[str]:
        members = self._versions.get((dialog_id, version))
        if members is None:
            members = await self.store.read(eventlog.members_at, dialog_id, version)
            self._versions.put((dialog_id, version), members)
        return members

    def observe(self, dialog_id: str, version: int, members: frozenset[str]) -> None:
        """A version learnt from the log or a write: cached, and current if it is the newest seen."""
        self._versions.put((dialog_id, version), members)
        current = self._current.get(dialog_id)
        if current is None or current[0] < version:
            self._current.put(dialog_id, (version, members))

    def cached_current(self, dialog_id: str) -> frozenset[str] | None:
        current = self._current.get(dialog_id)
        return None if current is None else current[1]

    async def current(self, dialog_id: str, *, fresh: bool = False) -> frozenset[str]:
        """The dialog's members as this process knows them (or, `fresh`, as committed now); NotFound if none."""
        if not fresh:
            cached = self._current.get(dialog_id)
            if cached is not None:
                return cached[1]
        found = await self.store.read(eventlog.current_members, dialog_id)
        if found is None:
            raise NotFound(f"dialog {dialog_id} not found", dialog_id=dialog_id)
        self.observe(dialog_id, *found)
        current = self._current.get(dialog_id)
        assert current is not None
        return current[1]


def records_for(event: LogEvent, cursor: str, members: frozenset[str] | None) -> list[EventRecord]:
    """The records of a logged event: one, or one per distinct unread count for a dialog change (each member
    gets their own count). `members`: the recipients of an event that goes to a member list version."""
    data = event.data.encode()
    if event.user_id is not None:
        return [EventRecord(event.position, event.type, frozenset((event.user_id,)),
                            event_payload(event.type, data, cursor), event.dialog_id)]
    if not event.change:
        assert members is not None
        return [EventRecord(event.position, event.type, members, event_payload(event.type, data, cursor),
                            event.dialog_id)]
    after, extra = change_members(event)
    unread: dict[str, int] = extra.get("unread", {})
    groups: dict[int, set[str]] = {}
    for user_id in after | frozenset(extra.get("removed", ())):
        groups.setdefault(unread.get(user_id, 0), set()).add(user_id)
    return [
        EventRecord(event.position, event.type, frozenset(users),
                    event_payload(event.type, personal(data, count), cursor), event.dialog_id)
        for count, users in sorted(groups.items())
    ]


def record_for_user(event: LogEvent, cursor: str, user_id: str) -> EventRecord:
    """The record of a logged event as one of its recipients gets it (replay from the store)."""
    data = event.data.encode()
    if event.change:
        extra: dict[str, Any] = jsonutil.loads(event.extra or "{}")
        data = personal(data, extra.get("unread", {}).get(user_id, 0))
    return EventRecord(event.position, event.type, frozenset((user_id,)), event_payload(event.type, data, cursor),
                       event.dialog_id)


def change_members(event: LogEvent) -> tuple[frozenset[str], dict[str, Any]]:
    """A dialog change's members after it (from its data) and its `extra`."""
    data = jsonutil.loads(event.data)
    return frozenset(data["memberIds"]), jsonutil.loads(event.extra or "{}")


def personal(data: bytes, unread: int) -> bytes:
    """A dialog's JSON with `unreadCount` added as its last field (the data is a JSON object)."""
    return data[:-1] + b',"unreadCount":' + str(unread).encode() + b"}"


class LogFeed:
    """See the module docstring."""

    def __init__(
        self,
        store: Store,
        broadcaster: Broadcaster,
        membership: Membership,
        *,
        poll_interval: float = 0.5,
        retention: int = 1_000_000,
        prune_interval: float = 60.0,
        on_published: Callable[[LogEvent], None] | None = None,
    ) -> None:
        self.store = store
        self.broadcaster = broadcaster
        self.membership = membership
        self.poll_interval = poll_interval
        self.retention = retention
        self.prune_interval = prune_interval
        self.on_published = on_published
        self._pending: dict[int, LogEvent] = {}
        self._wanted = asyncio.Event()
        self._waiters: list[asyncio.Future[None]] = []  # `catch_up` callers, answered after the next full read
        self._tasks: list[asyncio.Task[None]] = []
        self.head_seen = broadcaster.last_position  # the newest head the store reported
        # Told the last position of each of this process's commits (the cluster bus wakes the others with it).
        self.commit_hooks: list[Callable[[int], None]] = []
        # Told the events of each of this process's commits (sibling workers get them without reading the log).
        self.event_hooks: list[Callable[[list[LogEvent]], None]] = []
        self.problem = ""  # for /readyz: "" while the log is followed
        self._problem_logged = -PROBLEM_LOG_EVERY  # monotonic time of the last warning of a read failure
        self._problem_announced = False  # the current failure's warning was logged: its end will be too

    def start(self) -> None:
        """Follow the log, from the broadcaster's position (the store's head at start), in the background."""
        self.store.on_commit = self.committed
        self.store.on_wakeup = self.wake
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow()), loop.create_task(self._poll()),
                       loop.create_task(self._prune())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks = []

    # -- what comes in ---------------------------------------------------------------------------------

    def committed(self, events: list[LogEvent]) -> None:
        """This process's commit: its events are published now where they are next in line, else soon."""
        self.offered(events)
        if events:
            for hook in self.commit_hooks:
                hook(events[-1].position)
            for events_hook in self.event_hooks:
                events_hook(events)

    def offered(self, events: list[LogEvent]) -> None:
        """Committed events of the log handed over as they are (this process's own, or a sibling worker's:
        chatserver/siblings.py): published now where they are next in line; where one is not, the log is read
        for what comes before it."""
        last = self.broadcaster.last_position
        for event in events:
            if event.position > last:
                self._pending[event.position] = event
        self._publish_ready()
        if self._pending:
            self.wake()

    def wake(self) -> None:
        """Another process may have committed events: read the log."""
        self._wanted.set()

    async def catch_up(self) -> None:
        """Return once everything the store had committed when called is published here."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.wake()
        await asyncio.shield(waiter)

    # -- publishing ------------------------------------------------------------------------------------

    def _publish_ready(self) -> None:
        """Publish every pending event that is next in line and whose recipients are known, in order."""
        broadcaster = self.broadcaster
        pending = self._pending
        while True:
            event = pending.get(broadcaster.last_position + 1)
            if event is None:
                return
            records = self._records(event)
            if records is None:
                return  # its member list must be read first: `_follow` does, then comes back here
            del pending[event.position]
            broadcaster.publish(event.position, records)
            if self.on_published is not None:
                self.on_published(event)

    def _records(self, event: LogEvent) -> list[EventRecord] | None:
        cursor = self.broadcaster.cursor(event.position)
        if event.change:
            members, _ = change_members(event)
            self.membership.observe(event.dialog_id, event.members_version, members)
            return records_for(event, cursor, None)
        if event.user_id is not None:
            return records_for(event, cursor, None)
        known = self.membership.at(event.dialog_id, event.members_version)
        if known is None:
            return None
        return records_for(event, cursor, known)

    async def _follow(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            # Who waits now is answered after this read, which starts after they asked; later ones, after the next.
            waiters, self._waiters = self._waiters, []
            try:
                await self._read_log()
            except Exception as exc:
                if isinstance(exc, StoreError | OSError):
                    now = time.monotonic()
                    if now - self._problem_logged >= PROBLEM_LOG_EVERY:
                        log.warning("cannot read the event log: %s; retrying every %.1fs", exc, RETRY_PAUSE)
                        self._problem_logged = now
                        self._problem_announced = True
                    self.problem = f"cannot read the event log: {exc}"
                else:
                    log.exception("following the event log failed; retrying")
                self._waiters[:0] = waiters  # still owed an answer
                await asyncio.sleep(RETRY_PAUSE)
                self.wake()
                continue
            if self._problem_announced:
                log.warning("the event log is read again")
            self._problem_announced = False
            self.problem = ""
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _read_log(self) -> None:
        broadcaster = self.broadcaster
        while True:
            self._publish_ready()
            nxt = broadcaster.last_position + 1
            event = self._pending.get(nxt)
            if event is not None:  # next in line, its member list not cached yet
                await self.membership.load_at(event.dialog_id, event.members_version)
                continue
            head, events = await self.store.read(eventlog.events_after, broadcaster.last_position, CATCH_UP_BATCH)
            self.head_seen = max(self.head_seen, head)
            fresh = [e for e in events if e.position > broadcaster.last_position]
            if not fresh:
                self._drop_published()
                return
            for e in fresh:
                self._pending.setdefault(e.position, e)

    def _drop_published(self) -> None:
        last = self.broadcaster.last_position
        for position in [p for p in self._pending if p <= last]:
            del self._pending[position]

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self.wake()

    async def prune(self) -> int:
        """Delete what is beyond the retention now, a batch per write (each a short hold of the log's lock)."""
        total = 0
        pruned = await self.store.write(eventlog.prune, self.retention, int(time.time() * 1000))
        while pruned:
            total += pruned
            pruned = await self.store.write(eventlog.prune, self.retention, int(time.time() * 1000))
        return total

    async def _prune(self) -> None:
        while True:
            await asyncio.sleep(self.prune_interval)
            try:
                await self.prune()
            except Exception as exc:
                log.warning("pruning the event log failed: %s", exc)
