"""The long-poll contract of PROTOCOL section 5, shared by its two paths: the lean one (transport/fastpoll.py) and
handlers/realtime.py's PollHandler.

What both answer the same: the timeout's reading, the answer's body, and which events wake a parked poll at once.

A parked poll woken only by `dialog:receipt` events, or a poll that finds only those waiting, lingers up to
`config.poll_receipt_linger` seconds (never past its own timeout) before it answers, and answers at once when any
other event comes meanwhile: receipts ride along with the next message's answer instead of costing every member's
poller an answer and a new poll of its own (PROTOCOL section 11 coalesces them to one a second per dialog; a
long-poller may see one up to that much later). WebSocket and SSE connections get them as they come.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

from chatserver.broadcaster import Broadcaster, EventRecord
from chatserver.config import Config
from chatserver.metrics import Metrics
from chatserver.queries import DIALOG_RECEIPT
from chatserver.service import ChatService
from transport.outbox import TurnBatcher

POLL_DEFAULT_TIMEOUT = 25.0
POLL_MAX_TIMEOUT = 60.0


def lingers(record: EventRecord) -> bool:
    """Whether this event alone lets a parked poll linger (`poll_receipt_linger`) rather than answer at once."""
    return record.type == DIALOG_RECEIPT


def only_lingering(events: list[EventRecord]) -> bool:
    """Whether a poll that finds these events waiting may park and linger rather than answer at once: receipts
    alone, as for a parked poll a receipt wakes."""
    return bool(events) and all(lingers(record) for record in events)


class PollContext(Protocol):
    """What a poll needs of the application's context (handlers/base.py's AppContext is one)."""

    service: ChatService
    broadcaster: Broadcaster
    config: Config
    metrics: Metrics
    connections: set[Any]
    requests: weakref.WeakSet[Any]
    batcher: TurnBatcher
    background: set[Any]
    shutting_down: bool


def poll_body(events: list[EventRecord], cursor: str, more: bool) -> bytes:
    """A poll's answer. The events are spliced in as the bytes they were encoded to once: no re-encoding. The
    cursor is one this server issued (letters, digits, a dot): nothing in it to escape."""
    tail = b',"more":true' if more else b""
    events_json = b",".join(record.payload for record in events)
    return b"".join((b'{"success":true,"data":{"events":[', events_json, b'],"cursor":"', cursor.encode(),
                     b'"', tail, b"}}"))
