"""The long-poll contract of PROTOCOL section 5, shared by its two paths: the lean one (transport/fastpoll.py) and
handlers/realtime.py's PollHandler.

What both answer the same: the timeout's reading, and the answer's body.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

from chatserver.broadcaster import Broadcaster, EventRecord
from chatserver.config import Config
from chatserver.metrics import Metrics
from chatserver.service import ChatService
from transport.outbox import TurnBatcher

POLL_DEFAULT_TIMEOUT = 25.0
POLL_MAX_TIMEOUT = 60.0


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
