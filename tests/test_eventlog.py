"""The durable log (`chatserver.eventlog`) on both stores: positions, transactions, recipients, retention.

Positions are gap-free in commit order, within a process and across several (separate stores on one database, as
separate processes are); a reader never sees a position before the ones below it. Each event is written in the
transaction of its change. Who receives an event is a fact of the log: replay from the store (`events_for_user`)
gives a user exactly the events they had as a member at their moment, the same ones (and the same bytes) the live
path (`chatserver.feed.records_for`) hands out. `prune` keeps `event_retention` events and moves the floor.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import attrs
import pytest

from chatserver import eventlog, jsonutil, queries
from chatserver.broadcaster import Broadcaster
from chatserver.errors import NotFound
from chatserver.feed import LogFeed, Membership, record_for_user, records_for
from chatserver.models import Dialog, Message, User, new_id, now_iso
from chatserver.store import LogEvent, Store, Tx
from tests.storekit import dialog, head, logged, message, post, rows, running, started, user

WRITERS = 3  # stores on one database, as separate processes are
WRITES_EACH = 40


@pytest.fixture
def store(database: str, io_loop: Any) -> Iterator[Store]:
    yield from running(database, io_loop)


async def insert_then_fail(tx: Tx, msg: Message) -> None:
    await queries.insert_message(tx, msg)
    raise RuntimeError("failed after logging")


async def reading_prefixes(store: Store, stop: asyncio.Event) -> int:
    """Read the whole log again and again until `stop`: every read must be positions 1..head, no gap. Returns how
    many reads were made."""
    reads = 0
    while not stop.is_set() or reads == 0:
        top, events = await store.read(eventlog.events_after, 0, 100_000)
        assert [e.position for e in events] == list(range(1, top + 1)), "a position seen before one below it"
        reads += 1
        await asyncio.sleep(0)
    return reads


def message_ids(events: list[LogEvent]) -> list[str]:
    return [jsonutil.loads(e.data)["messageId"] for e in events if e.type.startswith("message:")]


# -- positions ----------------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_positions_are_gap_free_and_in_commit_order_under_concurrent_writes(store: Store) -> None:
    ann, ben = await user(store, "701"), await user(store, "702")
    talks = [await dialog(store, ann, ben, title=f"T{n}") for n in range(3)]
    handed: list[list[LogEvent]] = []
    store.on_commit = handed.append
    top = await head(store)
    sent = [message(talks[n % 3].dialog_id, (ann, ben)[n % 2], f"m{n}") for n in range(120)]
    failed = [message(talks[0].dialog_id, ann, f"failed {n}") for n in range(5)]
    stop = asyncio.Event()
    reader = asyncio.ensure_future(reading_prefixes(store, stop))
    writes = [post(store, m) for m in sent] + [store.write(insert_then_fail, m) for m in failed]
    writes[60:60] = [store.write(queries.mark_read, talks[0].dialog_id, ben.user_id, sent[0].message_id)]
    results = await asyncio.gather(*writes, return_exceptions=True)
    stop.set()
    assert await reader > 0
    assert sum(isinstance(r, RuntimeError) for r in results) == len(failed)

    events = [event for group in handed for event in group]
    assert [e.position for e in events] == list(range(top + 1, top + len(sent) + 2))
    assert await logged(store, top) == events
    assert sorted(message_ids(events)) == sorted(m.message_id for m in sent)
    # Each dialog's history is in the order of the log.
    for talk in talks:
        history = await store.read(queries.list_messages, talk.dialog_id, limit=200)
        in_log = [i for i in message_ids(events) if i in {m.message_id for m in history}]
        assert [m.message_id for m in history] == in_log


@pytest.mark.gen_test(timeout=90)
async def test_writers_on_several_stores_of_one_database_give_gap_free_positions_each_seeing_its_own_in_order(
    store: Store, database: str
) -> None:
    ann, ben = await user(store, "701"), await user(store, "702")
    talk = await dialog(store, ann, ben)
    top = await head(store)
    async with started(database) as reader_store, started(database) as second, started(database) as third:
        writers = [store, second, third]
        handed: list[list[LogEvent]] = [[] for _ in writers]
        for n, one in enumerate(writers):
            one.on_commit = handed[n].extend
        sent = [[message(talk.dialog_id, (ann, ben)[k % 2], f"store {n} message {k}") for k in range(WRITES_EACH)]
                for n in range(WRITERS)]
        stop = asyncio.Event()
        reader = asyncio.ensure_future(reading_prefixes(reader_store, stop))
        await asyncio.gather(*(post(one, mine[k]) for k in range(WRITES_EACH)
                               for one, mine in zip(writers, sent, strict=True)))
        stop.set()
        assert await reader > 0

    every = sorted((e for mine in handed for e in mine), key=lambda e: e.position)
    assert [e.position for e in every] == list(range(top + 1, top + WRITERS * WRITES_EACH + 1))
    assert await logged(store, top) == every
    for mine, own in zip(handed, sent, strict=True):
        positions = [e.position for e in mine]
        assert positions == sorted(positions)  # in order
        assert message_ids(mine) == [m.message_id for m in own]  # its own events, all of them, in its order
    history = await store.read(queries.list_messages, talk.dialog_id, limit=200)
    assert [m.message_id for m in history] == message_ids(every)


# -- one transaction ----------------------------------------------------------------------------------------


async def change_then_fail(tx: Tx, changed: Dialog) -> None:
    await queries.save_dialog(tx, changed)
    raise RuntimeError("failed after the change was logged")


@pytest.mark.gen_test(timeout=30)
async def test_each_event_is_written_with_its_change_and_a_failed_write_leaves_neither(store: Store) -> None:
    ann, ben, cid = await user(store, "701"), await user(store, "702"), await user(store, "703")
    talk = await dialog(store, ann, ben)
    top = await head(store)
    before = await rows(store, "SELECT dialog_id, user_id, from_version, to_version FROM membership ORDER BY user_id")

    with pytest.raises(RuntimeError):
        await store.write(insert_then_fail, message(talk.dialog_id, ann, "never"))
    with pytest.raises(RuntimeError):
        await store.write(change_then_fail, talk.changed("Renamed", (ann.user_id, cid.user_id)))
    assert await head(store) == top and await logged(store, top) == []
    assert await store.read(queries.list_messages, talk.dialog_id, limit=5) == []
    assert await store.read(queries.get_dialog, talk.dialog_id) == talk
    assert await store.read(eventlog.current_members, talk.dialog_id) == (1, frozenset(talk.member_ids))
    assert await rows(store, "SELECT dialog_id, user_id, from_version, to_version FROM membership "
                             "ORDER BY user_id") == before

    sent = await post(store, message(talk.dialog_id, ann, "stored"))
    assert await store.write(queries.insert_message, sent) == (sent, False)  # a duplicate logs nothing
    chat3 = await post_from_chat3(store, message(talk.dialog_id, ben, "from Chat3"))
    events = await logged(store, top)
    assert [(e.position, e.type, e.source) for e in events] == [
        (top + 1, "message:new", "local"), (top + 2, "message:new", "chat3")
    ]
    # A message's place in its dialog's history is its position in the log.
    assert await rows(store, "SELECT message_id, seq FROM messages ORDER BY seq") == [
        (sent.message_id, top + 1), (chat3.message_id, top + 2)
    ]


async def post_from_chat3(store: Store, msg: Message) -> Message:
    stored, created = await store.write(queries.insert_message, msg, source="chat3")
    assert created
    return stored


# -- recipients ---------------------------------------------------------------------------------------------


@attrs.frozen
class Story:
    """A dialog's life on the log: who was in it when, and the position of each thing that happened."""

    people: dict[str, User]
    talk: str
    other: str
    at: dict[str, int]


async def live_story(store: Store) -> Story:
    people = {name: await user(store, phone) for name, phone in
              (("ann", "701"), ("ben", "702"), ("cid", "703"), ("dan", "704"), ("eve", "705"))}
    ann, ben, cid, dan = people["ann"], people["ben"], people["cid"], people["dan"]
    at: dict[str, int] = {}

    async def step(name: str, write: Any) -> Any:
        result = await write
        at[name] = await head(store)
        return result

    stamp = now_iso()
    talk = Dialog(new_id("dlg"), "X", (ann.user_id, ben.user_id), stamp, stamp)
    await step("created", store.write(queries.save_dialog, talk))
    m1 = await step("m1", post(store, message(talk.dialog_id, ann, "m1")))
    await step("cid added", store.write(queries.patch_dialog, talk.dialog_id, title=None, add=[cid.user_id],
                                        remove=[], actor=ann.user_id))
    await step("m2", post(store, message(talk.dialog_id, ben, "m2")))
    await step("ben removed", store.write(queries.patch_dialog, talk.dialog_id, title=None, add=[],
                                          remove=[ben.user_id], actor=None))
    m3 = await step("m3", post(store, message(talk.dialog_id, ann, "m3")))
    await step("m3 edited", store.write(queries.apply_update, m3.edited("m3, edited")))
    await step("ben added again", store.write(queries.patch_dialog, talk.dialog_id, title="X again",
                                              add=[ben.user_id], remove=[], actor=cid.user_id))
    m4 = await step("m4", post(store, message(talk.dialog_id, cid, "m4")))
    await step("ben read", store.write(queries.mark_read, talk.dialog_id, ben.user_id, m4.message_id))
    await step("ann read", store.write(queries.mark_read, talk.dialog_id, ann.user_id, m1.message_id))
    stamp = now_iso()
    other = Dialog(new_id("dlg"), "Y", (cid.user_id, dan.user_id), stamp, stamp)
    await step("other created", store.write(queries.save_dialog, other))
    await step("m5", post(store, message(other.dialog_id, dan, "m5")))
    # A late Chat3 update of X (older than what is held) changes nothing and logs nothing.
    late = attrs.evolve(talk, title="late", updated_at="2000-01-01T00:00:00.000Z")
    assert (await store.write(queries.save_dialog, late)).event is None
    assert await head(store) == at["m5"]
    return Story(people, talk.dialog_id, other.dialog_id, at)


@pytest.fixture
def story(store: Store, io_loop: Any) -> Story:
    return io_loop.run_sync(lambda: live_story(store))  # type: ignore[no-any-return]


EVERYTHING_IN_X = ["created", "m1", "cid added", "m2", "ben removed", "m3", "m3 edited", "ben added again", "m4"]
HAD = {
    "ann": [*EVERYTHING_IN_X, "ann read"],
    # Removed: that dialog:update and nothing later; added again: from that dialog:update on.
    "ben": ["created", "m1", "cid added", "m2", "ben removed", "ben added again", "m4", "ben read"],
    # Added later: nothing from before.
    "cid": ["cid added", "m2", "ben removed", "m3", "m3 edited", "ben added again", "m4", "other created", "m5"],
    "dan": ["other created", "m5"],
    "eve": [],
}


@pytest.mark.gen_test(timeout=30)
async def test_replay_from_the_store_gives_each_user_exactly_the_events_they_had_as_a_member(
    store: Store, story: Story
) -> None:
    for name, had in HAD.items():
        floor, events = await store.read(eventlog.events_for_user, story.people[name].user_id, 0, 10**9, 1000)
        assert floor == 0
        assert [e.position for e in events] == [story.at[step] for step in had], name


@pytest.mark.gen_test(timeout=30)
async def test_live_recipients_and_bytes_are_the_same_as_replay_from_the_store(store: Store, story: Story) -> None:
    hub = Broadcaster(10, log_id=store.log_id)
    live: dict[str, list[int]] = {name: [] for name in HAD}
    names = {person.user_id: name for name, person in story.people.items()}
    for event in await logged(store):
        cursor = hub.cursor(event.position)
        members = None
        if event.user_id is None and not event.change:
            members = await store.read(eventlog.members_at, event.dialog_id, event.members_version)
        records = records_for(event, cursor, members)
        reached = [r.recipients for r in records]
        assert sum(len(r) for r in reached) == len(frozenset().union(*reached))  # each recipient in one record
        for record in records:
            for user_id in record.recipients:
                live[names[user_id]].append(event.position)
                assert record_for_user(event, cursor, user_id).payload == record.payload
    assert live == {name: [story.at[step] for step in had] for name, had in HAD.items()}


@pytest.mark.gen_test(timeout=30)
async def test_a_removal_reaches_the_removed_member_and_each_member_with_their_own_count(
    store: Store, story: Story
) -> None:
    ben, ann = story.people["ben"].user_id, story.people["ann"].user_id
    _, events = await store.read(eventlog.events_after, story.at["ben removed"] - 1, 1)
    removal = events[0]
    assert removal.change and removal.type == "dialog:update"
    seen = {user_id: jsonutil.loads(record_for_user(removal, "c", user_id).payload)["data"] for user_id in (ben, ann)}
    assert ben not in seen[ben]["memberIds"] and seen[ben]["memberIds"] == seen[ann]["memberIds"]
    assert seen[ann]["unreadCount"] == 1  # m2, Ben's
    assert isinstance(seen[ben]["unreadCount"], int)


@pytest.mark.gen_test(timeout=30)
async def test_a_read_mark_event_is_its_readers_alone(store: Store, story: Story) -> None:
    for reader, step in (("ben", "ben read"), ("ann", "ann read")):
        _, events = await store.read(eventlog.events_after, story.at[step] - 1, 1)
        event = events[0]
        assert (event.type, event.user_id, event.change) == ("dialog:update", story.people[reader].user_id, False)
        (record,) = records_for(event, "c", None)
        assert record.recipients == {story.people[reader].user_id}
        for other in set(story.people) - {reader}:
            _, theirs = await store.read(eventlog.events_for_user, story.people[other].user_id, 0, 10**9, 1000)
            assert event.position not in [e.position for e in theirs]


@pytest.mark.gen_test(timeout=30)
async def test_events_for_user_pages_within_its_bounds(store: Store, story: Story) -> None:
    ben = story.people["ben"].user_id
    every = [story.at[step] for step in HAD["ben"]]

    async def page(after: int, upto: int, limit: int) -> list[int]:
        return [e.position for e in (await store.read(eventlog.events_for_user, ben, after, upto, limit))[1]]

    assert await page(0, 10**9, 3) == every[:3]
    assert await page(every[2], 10**9, 3) == every[3:6]
    assert await page(every[5], 10**9, 3) == every[6:]
    assert await page(story.at["m2"], story.at["m4"], 100) == [story.at["ben removed"], story.at["ben added again"],
                                                                 story.at["m4"]]
    assert await page(story.at["m5"], 10**9, 100) == []


@pytest.mark.gen_test(timeout=30)
async def test_members_at_names_each_version_and_the_cache_follows_them(store: Store, story: Story) -> None:
    ann, ben, cid, dan = (story.people[n].user_id for n in ("ann", "ben", "cid", "dan"))
    versions = {1: {ann, ben}, 2: {ann, ben, cid}, 3: {ann, cid}, 4: {ann, ben, cid}}
    for version, members in versions.items():
        assert await store.read(eventlog.members_at, story.talk, version) == members
    assert await store.read(eventlog.current_members, story.talk) == (4, frozenset(versions[4]))
    assert await store.read(eventlog.current_members, story.other) == (1, frozenset({cid, dan}))
    assert await store.read(eventlog.current_members, "dlg_missing") is None
    # Every event names the version it went to.
    assert [e.members_version for e in await logged(store) if e.dialog_id == story.talk] == [
        1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 4
    ]

    membership = Membership(store)
    assert membership.at(story.talk, 3) is None
    assert await membership.load_at(story.talk, 3) == versions[3]
    assert membership.at(story.talk, 3) == versions[3]
    assert await membership.current(story.talk) == versions[4]
    membership.observe(story.talk, 2, frozenset(versions[2]))  # an older version: never current again
    assert membership.cached_current(story.talk) == versions[4]
    # A change committed since: the cache answers as this process followed; a fresh read as committed, and that
    # is what the cache answers from then on.
    await store.write(queries.patch_dialog, story.talk, title=None, add=[], remove=[cid], actor=None)
    assert await membership.current(story.talk) == versions[4]
    assert await membership.current(story.talk, fresh=True) == {ann, ben}
    assert await membership.current(story.talk) == {ann, ben} == membership.at(story.talk, 5)
    with pytest.raises(NotFound):
        await membership.current("dlg_missing")


# -- retention ----------------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_prune_keeps_the_retention_and_moves_the_floor(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    ann = await user(store, "701")
    talk = await dialog(store, ann)
    for n in range(29):
        await post(store, message(talk.dialog_id, ann, f"m{n}"))
    log_id, top, _ = await store.read(eventlog.meta)
    assert top == 30
    monkeypatch.setattr(eventlog, "PRUNE_BATCH", 7)  # several batches, each a write of its own
    feed = LogFeed(store, Broadcaster(10, log_id=log_id, position=top), Membership(store), retention=10)

    assert await feed.prune() == 20
    assert await store.read(eventlog.meta) == (log_id, 30, 20)
    assert [e.position for e in await logged(store)] == list(range(21, 31))
    floor, events = await store.read(eventlog.events_for_user, ann.user_id, 5, 30, 100)
    assert floor == 20 and [e.position for e in events] == list(range(21, 31))  # the caller sees it is expired
    assert await feed.prune() == 0
    # The log goes on after the floor; the history is all still there.
    await post(store, message(talk.dialog_id, ann, "after pruning"))
    assert await store.read(eventlog.meta) == (log_id, 31, 20)
    assert len(await store.read(queries.list_messages, talk.dialog_id, limit=100)) == 30
    now = int(time.time() * 1000)
    assert await store.write(eventlog.prune, 10, now) == 1
    assert await store.write(eventlog.prune, 10**6, now) == 0


@pytest.mark.gen_test(timeout=30)
async def test_prune_keeps_what_chat3_outbound_has_yet_to_publish_while_it_is_in_use(store: Store) -> None:
    ann = await user(store, "701")
    talk = await dialog(store, ann)
    for n in range(4):
        await post(store, message(talk.dialog_id, ann, f"m{n}"))
    now = int(time.time() * 1000)
    assert await store.write(eventlog.claim_outbound, "process-1", now, 30_000) == 5  # from the head it found
    for n in range(25):
        await post(store, message(talk.dialog_id, ann, f"later {n}"))

    assert await store.write(eventlog.prune, 10, now) == 5  # only what outbound has published
    assert await store.write(eventlog.advance_outbound, "process-1", 15)
    assert await store.write(eventlog.prune, 10, now) == 10
    assert await store.write(eventlog.prune, 10, now) == 0
    assert (await store.read(eventlog.meta))[2] == 15
    # A lease that ran out a day ago: outbound is not in use, and the retention alone counts.
    stale = now + 30_000 + eventlog.OUTBOUND_IN_USE_MS
    assert await store.write(eventlog.prune, 10, stale - 1) == 0
    assert await store.write(eventlog.prune, 10, stale) == 5
    assert (await store.read(eventlog.meta))[2] == 20


@pytest.mark.gen_test(timeout=30)
async def test_outbound_opened_before_the_first_message_publishes_one_committed_before_the_first_claim(
    store: Store,
) -> None:
    ann = await user(store, "701")
    talk = await dialog(store, ann)
    now = int(time.time() * 1000)
    await store.write(eventlog.open_outbound, now)
    head = (await store.read(eventlog.meta))[1]
    await post(store, message(talk.dialog_id, ann, "taken before the first claim"))
    assert await store.write(eventlog.claim_outbound, "process-1", now, 30_000) == head  # not after the message
    await store.write(eventlog.open_outbound, now + 1)  # a restart: outbound has started, and stays where it is
    assert await store.write(eventlog.claim_outbound, "process-1", now + 2, 30_000) == head


@pytest.mark.gen_test(timeout=30)
async def test_a_released_outbound_lease_still_keeps_what_was_not_published(store: Store) -> None:
    ann = await user(store, "701")
    talk = await dialog(store, ann)
    now = int(time.time() * 1000)
    start = await store.write(eventlog.claim_outbound, "process-1", now, 30_000)
    assert start is not None
    for n in range(20):
        await post(store, message(talk.dialog_id, ann, f"m{n}"))
    # The process stops (its lease given up at once): another may claim it now, and nothing unpublished goes.
    await store.write(eventlog.release_outbound, "process-1", now)
    assert await store.write(eventlog.claim_outbound, "process-2", now + 1, 30_000) == start
    await store.write(eventlog.release_outbound, "process-2", now + 2)
    while await store.write(eventlog.prune, 5, now + 3):
        pass
    assert (await store.read(eventlog.meta))[2] == start  # pruned up to where outbound had published, not beyond
