"""The broadcaster as a plain object, without an event loop: sequence, history, dedupe, resume and fan-out."""

from __future__ import annotations

from typing import Any

import pytest

from chatserver import jsonutil
from chatserver.broadcaster import Broadcaster, EventRecord
from chatserver.errors import BadRequest


class Recorder:
    def __init__(self, user_id: str, joined: tuple[str, ...] = ()) -> None:
        self.user_id = user_id
        self.joined = set(joined)
        self.records: list[EventRecord] = []

    def deliver(self, record: EventRecord) -> None:
        self.records.append(record)

    def wants_typing(self, dialog_id: str) -> bool:
        return dialog_id in self.joined

    def events(self) -> list[dict[str, Any]]:
        return [jsonutil.loads(r.payload) for r in self.records]


class Exploding(Recorder):
    def deliver(self, record: EventRecord) -> None:
        raise RuntimeError("a broken connection")


def message(message_id: str, updated_at: str = "2025-11-05T10:00:00.000Z") -> dict[str, Any]:
    return {"messageId": message_id, "dialogId": "dlg_1", "content": "x", "updatedAt": updated_at}


def test_each_event_is_encoded_once_and_the_same_bytes_reach_every_recipient() -> None:
    hub = Broadcaster(100)
    subs = [Recorder("usr_a"), Recorder("usr_a"), Recorder("usr_b")]
    for sub in subs:
        hub.subscribe(sub)
    record = hub.publish("message:new", message("msg_1"), {"usr_a", "usr_b"})
    assert record is not None
    assert all(sub.records == [record] for sub in subs)
    assert all(sub.records[0].payload is record.payload for sub in subs)
    event = jsonutil.loads(record.payload)
    assert event == {"type": "message:new", "data": message("msg_1"), "cursor": hub.cursor(record.seq)}


def test_only_recipients_receive_an_event() -> None:
    hub = Broadcaster(100)
    member, stranger = Recorder("usr_a"), Recorder("usr_z")
    hub.subscribe(member)
    hub.subscribe(stranger)
    hub.publish("message:new", message("msg_1"), {"usr_a"})
    assert len(member.records) == 1
    assert stranger.records == []


def test_second_message_new_for_same_message_is_dropped() -> None:
    hub = Broadcaster(100)
    sub = Recorder("usr_a")
    hub.subscribe(sub)
    assert hub.publish("message:new", message("msg_1"), {"usr_a"}) is not None
    assert hub.publish("message:new", message("msg_1"), {"usr_a"}) is None
    assert len(sub.records) == 1
    assert hub.duplicates_dropped == 1


def test_update_not_newer_than_the_last_is_dropped() -> None:
    hub = Broadcaster(100)
    sub = Recorder("usr_a")
    hub.subscribe(sub)
    hub.publish("message:new", message("msg_1", "2025-11-05T10:00:00.000Z"), {"usr_a"})
    assert hub.publish("message:update", message("msg_1", "2025-11-05T10:00:01.000Z"), {"usr_a"}) is not None
    assert hub.publish("message:update", message("msg_1", "2025-11-05T10:00:01.000Z"), {"usr_a"}) is None
    assert hub.publish("message:update", message("msg_1", "2025-11-05T10:00:00.500Z"), {"usr_a"}) is None
    assert [e["type"] for e in sub.events()] == ["message:new", "message:update"]


def test_typing_reaches_only_joined_connections_of_other_members_and_is_not_logged() -> None:
    hub = Broadcaster(100)
    joined, not_joined, typist = Recorder("usr_b", ("dlg_1",)), Recorder("usr_b"), Recorder("usr_a", ("dlg_1",))
    for sub in (joined, not_joined, typist):
        hub.subscribe(sub)
    before = hub.cursor()
    hub.publish_typing("dlg_1", "usr_a", True, {"usr_a", "usr_b"})
    assert joined.events() == [{"type": "typing:start", "data": {"dialogId": "dlg_1", "userId": "usr_a"}}]
    assert not_joined.records == [] and typist.records == []
    assert hub.cursor() == before
    assert hub.events_after("usr_b", before).events == []


def test_resume_returns_exactly_the_users_events_after_the_cursor_in_order() -> None:
    hub = Broadcaster(100)
    hub.publish("message:new", message("msg_0"), {"usr_a"})
    cursor = hub.cursor()
    for i in range(1, 6):
        hub.publish("message:new", message(f"msg_{i}"), {"usr_a", "usr_b"})
        hub.publish("message:new", message(f"msg_other_{i}"), {"usr_c"})
    replay = hub.events_after("usr_b", cursor)
    ids = [jsonutil.loads(r.payload)["data"]["messageId"] for r in replay.events]
    assert ids == [f"msg_{i}" for i in range(1, 6)]
    assert replay.cursor == hub.cursor() and not replay.more and replay.reset is None
    assert hub.events_after("usr_b", replay.cursor).events == []


def test_resume_is_capped_with_more_and_the_cursor_of_the_last_included_event() -> None:
    hub = Broadcaster(100)
    start = hub.cursor()
    for i in range(5):
        hub.publish("message:new", message(f"msg_{i}"), {"usr_a"})
    first = hub.events_after("usr_a", start, limit=3)
    assert first.more and len(first.events) == 3
    assert first.cursor == hub.cursor(first.events[-1].seq)
    rest = hub.events_after("usr_a", first.cursor, limit=3)
    assert not rest.more and len(rest.events) == 2


def test_cursor_of_another_epoch_gets_reset_restarted() -> None:
    old, new = Broadcaster(100), Broadcaster(100)
    old.publish("message:new", message("msg_1"), {"usr_a"})
    replay = new.events_after("usr_a", old.cursor())
    assert replay.reset == "restarted"
    event = jsonutil.loads(replay.events[0].payload)
    assert event == {"type": "reset", "data": {"reason": "restarted", "cursor": new.cursor()}, "cursor": new.cursor()}


def test_cursor_older_than_the_history_gets_reset_expired() -> None:
    hub = Broadcaster(3)
    start = hub.cursor()
    for i in range(4):
        hub.publish("message:new", message(f"msg_{i}"), {"usr_a"})
    assert hub.events_after("usr_a", start).reset == "expired"
    # One event was evicted: a cursor just before the oldest kept one still resumes.
    assert hub.events_after("usr_a", hub.cursor(1)).reset is None
    assert len(hub.events_after("usr_a", hub.cursor(1)).events) == 3


def test_history_is_bounded_in_bytes_too() -> None:
    hub = Broadcaster(1000, history_max_bytes=2000)
    for i in range(100):
        hub.publish("message:new", message(f"msg_{i}"), {"usr_a"})
    assert hub.history_bytes <= 2000
    assert hub.history_length < 100


@pytest.mark.parametrize("cursor", ["", "nonsense", "abc.", ".5", "abc.-1", "abc.1e3", "a b.1", "x" * 40 + ".9" * 20])
def test_unparseable_cursor_is_refused(cursor: str) -> None:
    with pytest.raises(BadRequest):
        Broadcaster(10).events_after("usr_a", cursor)


def test_cursor_ahead_of_any_issued_is_refused() -> None:
    hub = Broadcaster(10)
    hub.publish("message:new", message("msg_1"), {"usr_a"})
    with pytest.raises(BadRequest):
        hub.events_after("usr_a", hub.cursor(2))


def test_cursors_are_not_clock_derived() -> None:
    hub = Broadcaster(10, epoch="e1")
    assert hub.cursor() == "e1.0"
    hub.publish("message:new", message("msg_1"), {"usr_a"})
    assert hub.cursor() == "e1.1"


def test_a_failing_connection_does_not_stop_delivery_to_others() -> None:
    hub = Broadcaster(10)
    good = Recorder("usr_a")
    hub.subscribe(Exploding("usr_a"))
    hub.subscribe(good)
    hub.publish("message:new", message("msg_1"), {"usr_a"})
    assert len(good.records) == 1


def test_unsubscribed_connection_gets_nothing_more_and_leaves_no_entry() -> None:
    hub = Broadcaster(10)
    sub = Recorder("usr_a")
    hub.subscribe(sub)
    hub.unsubscribe(sub)
    hub.publish("message:new", message("msg_1"), {"usr_a"})
    assert sub.records == [] and hub.subscriber_count() == 0


def test_dedupe_memory_is_bounded() -> None:
    hub = Broadcaster(10, dedupe_size=5)
    for i in range(50):
        hub.publish("message:new", message(f"msg_{i}"), {"usr_a"})
    assert len(hub._latest) == 5


def test_a_new_epoch_resets_every_live_connection_and_every_old_cursor() -> None:
    hub = Broadcaster(10)
    first, second = Recorder("usr_a"), Recorder("usr_b")
    hub.subscribe(first)
    hub.subscribe(second)
    hub.publish("message:new", message("msg_1"), {"usr_a"})
    old_cursor = hub.cursor()
    assert hub.start_new_epoch() == 2
    expected = {"type": "reset", "data": {"reason": "restarted", "cursor": hub.cursor()}, "cursor": hub.cursor()}
    assert first.events()[-1] == expected and second.events() == [expected]
    assert hub.events_after("usr_a", old_cursor).reset == "restarted"
    assert hub.history_length == 0
    # Messages already published are still not published twice.
    assert hub.publish("message:new", message("msg_1"), {"usr_a"}) is None


def test_is_current_names_only_the_cursor_of_now() -> None:
    hub = Broadcaster(100)
    first = hub.cursor()
    assert hub.is_current(first)
    hub.publish("message:new", message("msg_1"), {"usr_a"})
    assert not hub.is_current(first)
    assert hub.is_current(hub.cursor())
    assert hub.events_after("usr_a", hub.cursor()).events == []  # what is_current stands in for
    now = hub.cursor()
    hub.start_new_epoch()
    assert not hub.is_current(now) and hub.is_current(hub.cursor())
    assert not hub.is_current("") and not hub.is_current("nonsense")


class CutsItselfOff(Recorder):
    """A connection that the delivery cuts off (its buffer overflowed): it unsubscribes while being delivered to."""

    def __init__(self, user_id: str, hub: Broadcaster) -> None:
        super().__init__(user_id)
        self.hub = hub

    def deliver(self, record: EventRecord) -> None:
        super().deliver(record)
        self.hub.unsubscribe(self)


def test_a_connection_cut_off_during_a_fan_out_does_not_cost_the_users_others_their_event() -> None:
    hub = Broadcaster(100)
    first, second = Recorder("usr_a"), Recorder("usr_a")
    cut = CutsItselfOff("usr_a", hub)
    for sub in (first, cut, second):
        hub.subscribe(sub)
    hub.subscribe(first)  # twice is once
    hub.publish("message:new", message("msg_1"), {"usr_a"})
    hub.publish("message:new", message("msg_2"), {"usr_a"})
    assert [len(s.records) for s in (first, cut, second)] == [2, 1, 2]
    assert hub.subscriber_count() == 2
    hub.unsubscribe(first)
    hub.unsubscribe(first)  # twice is once
    hub.unsubscribe(second)
    assert hub.subscriber_count() == 0


def test_resume_of_the_same_cursor_by_different_users_gives_each_only_their_events() -> None:
    # events_after keeps its last scan for the next caller with the same cursor: never another user's events,
    # and never a scan older than the last event.
    hub = Broadcaster(100)
    start = hub.cursor()
    first = hub.publish("message:new", message("msg_1"), {"usr_a"})
    second = hub.publish("message:new", message("msg_2"), {"usr_a", "usr_b"})
    assert hub.events_after("usr_a", start).events == [first, second]
    assert hub.events_after("usr_b", start).events == [second]
    assert hub.events_after("usr_c", start).events == []
    third = hub.publish("message:new", message("msg_3"), {"usr_b"})
    assert hub.events_after("usr_b", start).events == [second, third]
    assert hub.events_after("usr_b", start).cursor == hub.cursor()
    hub.start_new_epoch()
    assert hub.events_after("usr_b", start).reset == "restarted"
