"""The broadcaster as a plain object, without an event loop: the log's tail in memory and the per-user fan-out.

It publishes what `LogFeed` hands it, in position order (refusing anything else), each event encoded once; it
answers a resume from memory where it holds every event after the cursor, and says so (None) where it does not,
so that the store answers; another log's cursor gets a reset. Deduplication is the store's (tests/test_store.py),
and who receives an event is the log's (tests/test_eventlog.py): here, how `chatserver.feed` turns a logged event
into records, each recipient's own.
"""

from __future__ import annotations

from typing import Any

import pytest

from chatserver import jsonutil
from chatserver.broadcaster import Broadcaster, EventRecord, event_payload
from chatserver.errors import BadRequest
from chatserver.feed import change_members, personal, record_for_user, records_for
from chatserver.store import LogEvent

LOG = "a1b2c3d4e5f60718"
OTHER_LOG = "0f1e2d3c4b5a6978"


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


def hub_of(history_size: int = 100, **kwargs: Any) -> Broadcaster:
    return Broadcaster(history_size, log_id=LOG, **kwargs)


def message(message_id: str) -> dict[str, Any]:
    return {"messageId": message_id, "dialogId": "dlg_1", "content": "x", "updatedAt": "2025-11-05T10:00:00.000Z"}


def record(hub: Broadcaster, recipients: set[str], data: dict[str, Any] | None = None,
           position: int | None = None) -> EventRecord:
    """A `message:new` record for the next position (or `position`), as `chatserver.feed` builds one."""
    at = hub.last_position + 1 if position is None else position
    body = jsonutil.dumps_bytes(data or message(f"msg_{at}"))
    return EventRecord(at, "message:new", frozenset(recipients), event_payload("message:new", body, hub.cursor(at)),
                       "dlg_1")


def publish(hub: Broadcaster, recipients: set[str], data: dict[str, Any] | None = None) -> EventRecord:
    one = record(hub, recipients, data)
    hub.publish(one.position, [one])
    return one


def ids(records: list[EventRecord]) -> list[str]:
    return [jsonutil.loads(r.payload)["data"]["messageId"] for r in records]


# -- publishing -----------------------------------------------------------------------------------------------


def test_each_event_is_encoded_once_and_the_same_bytes_reach_every_recipient() -> None:
    hub = hub_of()
    subs = [Recorder("usr_a"), Recorder("usr_a"), Recorder("usr_b")]
    for sub in subs:
        hub.subscribe(sub)
    sent = publish(hub, {"usr_a", "usr_b"})
    assert all(sub.records == [sent] for sub in subs)
    assert all(sub.records[0].payload is sent.payload for sub in subs)
    event = jsonutil.loads(sent.payload)
    assert event == {"type": "message:new", "data": message("msg_1"), "cursor": f"{LOG}.1"}
    assert hub.events_after("usr_b", f"{LOG}.0") == hub.events_after("usr_b", f"{LOG}.0")
    (held,) = hub.events_after("usr_b", f"{LOG}.0").events  # type: ignore[union-attr]
    assert held is sent  # resume sends the bytes the live path sent


def test_only_recipients_receive_an_event() -> None:
    hub = hub_of()
    member, stranger = Recorder("usr_a"), Recorder("usr_z")
    hub.subscribe(member)
    hub.subscribe(stranger)
    publish(hub, {"usr_a"})
    assert len(member.records) == 1
    assert stranger.records == []
    assert hub.events_after("usr_z", f"{LOG}.0") == hub.events_after("usr_z", hub.cursor())


@pytest.mark.parametrize("position", [0, 1, 3, -1])
def test_positions_are_published_in_order_once_each_or_refused(position: int) -> None:
    hub = hub_of()
    sub = Recorder("usr_a")
    hub.subscribe(sub)
    publish(hub, {"usr_a"})
    cursor, length = hub.cursor(), hub.history_length
    with pytest.raises(ValueError):
        hub.publish(position, [record(hub, {"usr_a"}, position=position)])
    assert (hub.last_position, hub.cursor(), hub.history_length, len(sub.records)) == (1, cursor, length, 1)
    assert hub.published == 1
    publish(hub, {"usr_a"})
    assert [r.position for r in sub.records] == [1, 2]


def test_a_broadcaster_starts_at_the_logs_head_with_nothing_in_memory() -> None:
    hub = hub_of(position=100)
    assert hub.cursor() == f"{LOG}.100" and hub.first_position == 101 and hub.history_length == 0
    assert hub.events_after("usr_a", f"{LOG}.100") == hub.events_after("usr_a", hub.cursor())
    assert hub.events_after("usr_a", f"{LOG}.100").events == []  # type: ignore[union-attr]
    assert hub.events_after("usr_a", f"{LOG}.99") is None  # before memory: the store answers
    with pytest.raises(ValueError):
        hub.publish(1, [record(hub, {"usr_a"}, position=1)])
    sent = publish(hub, {"usr_a"})
    assert sent.position == 101 and hub.events_after("usr_a", f"{LOG}.100").events == [sent]  # type: ignore[union-attr]


def dialog_change(hub: Broadcaster) -> list[EventRecord]:
    """A dialog change at the next position: one record per unread count, each member in one of them."""
    at = hub.last_position + 1
    event = LogEvent(at, "dialog:update", "dlg_1", jsonutil.dumps({"dialogId": "dlg_1", "memberIds": ["usr_a"]}),
                     2, change=True, extra=jsonutil.dumps({"removed": ["usr_b"], "unread": {"usr_a": 4}}))
    return records_for(event, hub.cursor(at), None)


def test_a_position_of_several_records_gives_each_recipient_its_own_and_counts_once() -> None:
    hub = hub_of()
    a, b = Recorder("usr_a"), Recorder("usr_b")
    hub.subscribe(a)
    hub.subscribe(b)
    records = dialog_change(hub)
    assert len(records) == 2
    hub.publish(1, records)
    assert [e["data"]["unreadCount"] for e in a.events()] == [4]
    assert [e["data"]["unreadCount"] for e in b.events()] == [0]
    assert a.events()[0]["cursor"] == b.events()[0]["cursor"] == f"{LOG}.1"
    assert hub.history_length == 1 and hub.published == 1
    assert hub.events_after("usr_a", f"{LOG}.0").events == a.records  # type: ignore[union-attr]
    assert hub.events_after("usr_b", f"{LOG}.0").events == b.records  # type: ignore[union-attr]


def test_typing_reaches_only_joined_connections_of_other_members_and_is_not_logged() -> None:
    hub = hub_of()
    joined, not_joined, typist = Recorder("usr_b", ("dlg_1",)), Recorder("usr_b"), Recorder("usr_a", ("dlg_1",))
    stranger = Recorder("usr_z", ("dlg_1",))
    for sub in (joined, not_joined, typist, stranger):
        hub.subscribe(sub)
    before = hub.cursor()
    hub.publish_typing("dlg_1", "usr_a", True, {"usr_a", "usr_b"})
    hub.publish_typing("dlg_1", "usr_a", False, {"usr_a", "usr_b"})
    assert joined.events() == [
        {"type": "typing:start", "data": {"dialogId": "dlg_1", "userId": "usr_a"}},
        {"type": "typing:stop", "data": {"dialogId": "dlg_1", "userId": "usr_a"}},
    ]
    assert all(r.ephemeral for r in joined.records)
    assert not_joined.records == [] and typist.records == [] and stranger.records == []
    assert hub.cursor() == before and hub.history_length == 0 and hub.published == 0
    assert hub.events_after("usr_b", before).events == []  # type: ignore[union-attr]


def test_a_failing_connection_does_not_stop_delivery_to_others() -> None:
    hub = hub_of()
    good = Recorder("usr_a", ("dlg_1",))
    hub.subscribe(Exploding("usr_a", ("dlg_1",)))
    hub.subscribe(good)
    hub.subscribe(Exploding("usr_b", ("dlg_1",)))
    other = Recorder("usr_b", ("dlg_1",))
    hub.subscribe(other)
    publish(hub, {"usr_a", "usr_b"})
    hub.publish_typing("dlg_1", "usr_c", True, {"usr_a", "usr_b", "usr_c"})
    assert [r.type for r in good.records] == [r.type for r in other.records] == ["message:new", "typing:start"]
    assert hub.last_position == 1


def test_unsubscribed_connection_gets_nothing_more_and_leaves_no_entry() -> None:
    hub = hub_of()
    sub = Recorder("usr_a")
    hub.subscribe(sub)
    hub.unsubscribe(sub)
    publish(hub, {"usr_a"})
    assert sub.records == [] and hub.subscriber_count() == 0


class CutsItselfOff(Recorder):
    """A connection that the delivery cuts off (its buffer overflowed): it unsubscribes while being delivered to."""

    def __init__(self, user_id: str, hub: Broadcaster) -> None:
        super().__init__(user_id)
        self.hub = hub

    def deliver(self, record: EventRecord) -> None:
        super().deliver(record)
        self.hub.unsubscribe(self)


def test_a_connection_cut_off_during_a_fan_out_does_not_cost_the_users_others_their_event() -> None:
    hub = hub_of()
    first, second = Recorder("usr_a"), Recorder("usr_a")
    cut = CutsItselfOff("usr_a", hub)
    for sub in (first, cut, second):
        hub.subscribe(sub)
    hub.subscribe(first)  # twice is once
    publish(hub, {"usr_a"})
    publish(hub, {"usr_a"})
    assert [len(s.records) for s in (first, cut, second)] == [2, 1, 2]
    assert hub.subscriber_count() == 2
    hub.unsubscribe(first)
    hub.unsubscribe(first)  # twice is once
    hub.unsubscribe(second)
    assert hub.subscriber_count() == 0


# -- resume from memory -----------------------------------------------------------------------------------


def test_resume_returns_exactly_the_users_events_after_the_cursor_in_order() -> None:
    hub = hub_of()
    publish(hub, {"usr_a"}, message("msg_0"))
    cursor = hub.cursor()
    for i in range(1, 6):
        publish(hub, {"usr_a", "usr_b"}, message(f"msg_{i}"))
        publish(hub, {"usr_c"}, message(f"msg_other_{i}"))
    replay = hub.events_after("usr_b", cursor)
    assert replay is not None
    assert ids(replay.events) == [f"msg_{i}" for i in range(1, 6)]
    assert replay.cursor == hub.cursor() and not replay.more and replay.reset is None
    assert hub.events_after("usr_b", replay.cursor).events == []  # type: ignore[union-attr]


def test_resume_is_capped_with_more_and_the_cursor_of_the_last_included_event() -> None:
    hub = hub_of()
    start = hub.cursor()
    for _ in range(5):
        publish(hub, {"usr_a"})
        publish(hub, {"usr_b"})
    first = hub.events_after("usr_a", start, limit=3)
    assert first is not None and first.more and len(first.events) == 3
    assert first.cursor == hub.cursor(first.events[-1].position) == f"{LOG}.5"
    rest = hub.events_after("usr_a", first.cursor, limit=3)
    assert rest is not None and not rest.more and [r.position for r in rest.events] == [7, 9]
    assert rest.cursor == hub.cursor()
    exact = hub.events_after("usr_b", start, limit=5)
    assert exact is not None and not exact.more and len(exact.events) == 5 and exact.cursor == hub.cursor()


def test_memory_answers_nothing_it_does_not_hold_older_or_ahead() -> None:
    hub = hub_of(3)
    for _ in range(5):
        publish(hub, {"usr_a"})
    assert hub.first_position == 3 and hub.history_length == 3
    assert hub.events_after("usr_a", f"{LOG}.1") is None  # position 2 is gone from memory: the store answers
    assert hub.events_after("usr_a", f"{LOG}.0") is None
    kept = hub.events_after("usr_a", f"{LOG}.2")  # just before the oldest held
    assert kept is not None and [r.position for r in kept.events] == [3, 4, 5]
    # Ahead of what this process published (another process may be ahead): not memory's to judge either.
    assert hub.events_after("usr_a", f"{LOG}.6") is None
    assert hub.events_after("usr_a", f"{LOG}.{'9' * 18}") is None


@pytest.mark.parametrize("cursor", [f"{OTHER_LOG}.1", f"{OTHER_LOG}.0", f"{OTHER_LOG}.999", "3f2a9c.12"])
def test_a_cursor_of_another_log_gets_reset_restarted(cursor: str) -> None:
    hub = hub_of()
    publish(hub, {"usr_a"})
    replay = hub.events_after("usr_a", cursor)
    assert replay is not None and replay.reset == "restarted" and replay.cursor == hub.cursor()
    (reset,) = replay.events
    assert reset.recipients == frozenset()  # handed to the one resuming, never fanned out
    event = jsonutil.loads(reset.payload)
    assert event == {"type": "reset", "data": {"reason": "restarted", "cursor": hub.cursor()}, "cursor": hub.cursor()}
    assert hub.parse_cursor(cursor) is None


def test_reset_expired_names_the_cursor_of_now() -> None:
    hub = hub_of(position=41)
    replay = hub.reset("expired")
    assert replay.reset == "expired" and replay.cursor == f"{LOG}.41" and not replay.more
    assert jsonutil.loads(replay.events[0].payload) == {
        "type": "reset", "data": {"reason": "expired", "cursor": f"{LOG}.41"}, "cursor": f"{LOG}.41"
    }


@pytest.mark.parametrize("history_size, max_bytes", [(4, 10**9), (10**6, 1500)])
def test_history_is_bounded_in_positions_and_bytes_and_evicts_whole_positions(
    history_size: int, max_bytes: int
) -> None:
    hub = hub_of(history_size, history_max_bytes=max_bytes)
    for _ in range(60):
        hub.publish(hub.last_position + 1, dialog_change(hub))  # two records a position
        assert hub.history_length <= history_size and hub.history_bytes <= max_bytes
        first = hub.first_position
        assert hub.history_length == hub.last_position - first + 1
        # Every position held is held whole: each recipient has its record of each.
        for user_id in ("usr_a", "usr_b"):
            replay = hub.events_after(user_id, hub.cursor(first - 1))
            assert replay is not None
            assert [r.position for r in replay.events] == list(range(first, hub.last_position + 1))
        if first > 1:
            assert hub.events_after("usr_a", hub.cursor(first - 2)) is None
    assert hub.history_length < 60 and hub.first_position > 1
    assert hub.history_bytes == sum(
        len(r.payload) for user_id in ("usr_a", "usr_b")
        for r in hub.events_after(user_id, hub.cursor(hub.first_position - 1)).events  # type: ignore[union-attr]
    )


BAD_CURSORS = [
    "", "nonsense", "abc.", ".5", "abc.-1", "abc.+1", "abc. 1", "abc.1 ", "abc.1e3", "abc.0x1", "abc.1_000", "a b.1",
    "ab-c.1", "abc.1.2", "абв.1", f"{LOG}.²", f"{LOG}.①", f"{LOG}.٠", f"{LOG}.０", f"{LOG}.1²", f"{LOG}.{'1' * 19}",
    "x" * 40 + ".9" * 20, f"{LOG}.1\n", f"{LOG}\x00.1",
]


@pytest.mark.parametrize("cursor", BAD_CURSORS)
def test_a_text_that_is_not_a_cursor_is_refused(cursor: str) -> None:
    hub = hub_of()
    publish(hub, {"usr_a"})
    with pytest.raises(BadRequest) as caught:
        hub.events_after("usr_a", cursor)
    assert caught.value.field == "cursor"
    with pytest.raises(BadRequest):
        hub.parse_cursor(cursor)
    assert not hub.is_current(cursor)


def test_cursors_name_the_log_and_a_position_never_a_clock() -> None:
    hub = Broadcaster(10, log_id="e1")
    assert hub.cursor() == "e1.0" and hub.parse_cursor("e1.0") == 0
    publish(hub, {"usr_a"})
    assert hub.cursor() == "e1.1" and hub.cursor(7) == "e1.7"
    assert hub.parse_cursor(f"e1.{'9' * 18}") == int("9" * 18)


def test_is_current_names_only_the_cursor_of_now() -> None:
    hub = hub_of()
    first = hub.cursor()
    assert hub.is_current(first)
    publish(hub, {"usr_a"})
    assert not hub.is_current(first)
    assert hub.is_current(hub.cursor()) and hub.current_cursor() == hub.cursor()
    assert hub.events_after("usr_a", hub.cursor()).events == []  # type: ignore[union-attr] # what it stands in for
    assert not hub.is_current(f"{OTHER_LOG}.1") and not hub.is_current("") and not hub.is_current("nonsense")


def test_resume_of_the_same_cursor_by_different_users_gives_each_only_their_events() -> None:
    # events_after keeps its last scan for the next caller with the same cursor: never another user's events,
    # and never a scan older than the last event.
    hub = hub_of()
    start = hub.cursor()
    first = publish(hub, {"usr_a"})
    second = publish(hub, {"usr_a", "usr_b"})

    def after(user_id: str, limit: int | None = None) -> list[EventRecord]:
        replay = hub.events_after(user_id, start, limit)
        assert replay is not None
        return replay.events

    assert after("usr_a") == [first, second]
    assert after("usr_b") == [second]
    assert after("usr_c") == []
    assert after("usr_a", 1) == [first]
    third = publish(hub, {"usr_b"})
    assert after("usr_b") == [second, third]
    assert hub.events_after("usr_b", start).cursor == hub.cursor()  # type: ignore[union-attr]


# -- records of logged events (chatserver.feed) --------------------------------------------------------------


DIALOG = {"dialogId": "dlg_1", "title": "T", "memberIds": ["usr_a", "usr_b", "usr_c"], "lastMessage": None}


def change(unread: dict[str, int], removed: list[str]) -> LogEvent:
    return LogEvent(7, "dialog:update", "dlg_1", jsonutil.dumps(DIALOG), 3, change=True,
                    extra=jsonutil.dumps({"removed": removed, "unread": unread}))


def test_a_dialog_change_gives_each_member_and_each_removed_one_their_own_unread_count() -> None:
    event = change({"usr_b": 2, "usr_c": 2, "usr_a": 5}, ["usr_d"])
    records = records_for(event, f"{LOG}.7", None)
    # One record per distinct count, each recipient in exactly one of them; the bytes are spliced, not re-encoded.
    assert [sorted(r.recipients) for r in records] == [["usr_d"], ["usr_b", "usr_c"], ["usr_a"]]
    for r in records:
        parsed = jsonutil.loads(r.payload)
        count = {"usr_d": 0, "usr_b": 2, "usr_a": 5}[min(r.recipients)]
        assert parsed == {"type": "dialog:update", "data": {**DIALOG, "unreadCount": count}, "cursor": f"{LOG}.7"}
        assert (r.position, r.type, r.dialog_id) == (7, "dialog:update", "dlg_1")
        # Replayed from the store to one of them: the same bytes.
        for user_id in r.recipients:
            assert record_for_user(event, f"{LOG}.7", user_id).payload == r.payload
    members, extra = change_members(event)
    assert members == {"usr_a", "usr_b", "usr_c"} and extra["removed"] == ["usr_d"]


def test_a_dialog_change_with_no_counts_is_one_record_for_all() -> None:
    (only,) = records_for(change({}, []), f"{LOG}.7", None)
    assert only.recipients == frozenset(DIALOG["memberIds"])
    assert jsonutil.loads(only.payload)["data"]["unreadCount"] == 0


def test_a_read_mark_goes_to_its_reader_and_a_message_to_the_members_of_its_version() -> None:
    read = LogEvent(8, "dialog:update", "dlg_1", jsonutil.dumps({**DIALOG, "unreadCount": 0}), 3, user_id="usr_b")
    (mine,) = records_for(read, f"{LOG}.8", frozenset({"usr_a", "usr_b"}))
    assert mine.recipients == {"usr_b"}
    assert jsonutil.loads(mine.payload)["data"]["unreadCount"] == 0
    assert record_for_user(read, f"{LOG}.8", "usr_b").payload == mine.payload
    new = LogEvent(9, "message:new", "dlg_1", jsonutil.dumps(message("msg_9")), 3)
    (sent,) = records_for(new, f"{LOG}.9", frozenset({"usr_a", "usr_c"}))
    assert sent.recipients == {"usr_a", "usr_c"}
    assert jsonutil.loads(sent.payload) == {"type": "message:new", "data": message("msg_9"), "cursor": f"{LOG}.9"}
    assert record_for_user(new, f"{LOG}.9", "usr_c").payload == sent.payload


@pytest.mark.parametrize("count", [0, 7, 123456])
def test_personal_adds_the_unread_count_as_the_last_field(count: int) -> None:
    data = jsonutil.dumps_bytes({"dialogId": "dlg_1", "title": "with } and \" inside"})
    spliced = personal(data, count)
    assert spliced.startswith(data[:-1])
    assert jsonutil.loads(spliced) == {"dialogId": "dlg_1", "title": "with } and \" inside", "unreadCount": count}
