"""The SQLite store on real files: schema and migrations, WAL, durability, idempotent writes, reads.

No loop here: the store is synchronous (the server reaches it through AsyncStore's threads).
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from chatserver.errors import BadRequest, Conflict, NotFound
from chatserver.models import Dialog, Message, User, new_id, now_iso
from chatserver.store import MIGRATIONS, SCHEMA_VERSION, AsyncStore, SQLiteStore, StoreError
from tests.test_cli import Server, http, login


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "chat.db"


@pytest.fixture
def store(path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(path)
    yield opened
    opened.close()


def user(store: SQLiteStore, phone: str) -> User:
    return store.create_user(User(new_id("usr"), f"name {phone}", phone), "hash")


def dialog(store: SQLiteStore, *members: User, title: str = "D") -> Dialog:
    stamp = now_iso()
    return store.save_dialog(Dialog(new_id("dlg"), title, tuple(m.user_id for m in members), stamp, stamp))[1]


def message(dialog_id: str, sender: User, content: str = "hi", client_id: str | None = None) -> Message:
    stamp = now_iso()
    return Message(new_id("msg"), dialog_id, sender.user_id, content, "text", {"k": [1]}, stamp, stamp, client_id)


@pytest.fixture
def pair(store: SQLiteStore) -> tuple[User, User, Dialog]:
    ann, ben = user(store, "701"), user(store, "702")
    return ann, ben, dialog(store, ann, ben)


# -- schema -------------------------------------------------------------------------------------------------


def test_schema_is_migrated_at_open_and_wal_is_on(store: SQLiteStore, path: Path) -> None:
    assert store.schema_version() == SCHEMA_VERSION
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"users", "dialogs", "dialog_members", "messages"} <= tables
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"messages_by_dialog_sender", "messages_by_client_id", "dialog_members_by_user"} <= indexes


def test_history_page_query_uses_the_dialog_index(store: SQLiteStore, path: Path) -> None:
    with sqlite3.connect(path) as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM messages WHERE dialog_id = ? AND seq < ? ORDER BY seq DESC LIMIT 50",
            ("dlg_x", 10),
        ).fetchall()
    text = " ".join(str(row[-1]) for row in plan)
    assert "messages_by_dialog_sender" in text and "TEMP B-TREE" not in text, text


def test_unread_count_reads_the_index_alone(store: SQLiteStore, path: Path) -> None:
    with sqlite3.connect(path) as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT count(*) FROM messages WHERE dialog_id = ? AND sender_id != ? AND seq > ?",
            ("dlg_x", "usr_x", 10),
        ).fetchall()
    text = " ".join(str(row[-1]) for row in plan)
    assert "COVERING INDEX messages_by_dialog_sender" in text, text


def test_a_version_1_database_is_migrated_at_open_keeping_its_data(path: Path) -> None:
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as conn:
        conn.executescript(MIGRATIONS[0])
        conn.execute("PRAGMA user_version = 1")
        conn.execute("INSERT INTO users VALUES ('usr_a', '701', 'Ann', 'hash', '2025-01-01T00:00:00.000Z')")
        conn.execute(
            "INSERT INTO dialogs (dialog_id, title, created_at, updated_at, activity_at) "
            "VALUES ('dlg_a', 'Old', '2025-01-01T00:00:00.000Z', '2025-01-01T00:00:00.000Z', "
            "'2025-01-01T00:00:00.000Z')"
        )
        conn.execute("INSERT INTO dialog_members (dialog_id, user_id, position) VALUES ('dlg_a', 'usr_a', 0)")
    migrated = SQLiteStore(path)
    assert migrated.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)
    assert migrated.get_user("usr_a") == User("usr_a", "Ann", "701")
    sent, created = migrated.insert_message(message("dlg_a", User("usr_a", "Ann", "701")))
    assert created and migrated.list_messages("dlg_a", limit=5) == [sent]
    migrated.close()
    with sqlite3.connect(path) as conn:
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "messages_by_dialog_sender" in indexes and "messages_by_dialog" not in indexes


def test_an_empty_file_is_migrated_and_reopening_migrates_nothing(path: Path) -> None:
    path.parent.mkdir(parents=True)
    sqlite3.connect(path).close()
    first = SQLiteStore(path)
    ann = user(first, "701")
    first.close()
    again = SQLiteStore(path)
    assert again.schema_version() == SCHEMA_VERSION
    assert again.get_user(ann.user_id) == ann
    again.close()


def test_reopening_keeps_every_kind_of_data(path: Path) -> None:
    first = SQLiteStore(path)
    ann, ben = user(first, "701"), user(first, "702")
    talk = dialog(first, ann, ben, title="Talk")
    sent, _ = first.insert_message(message(talk.dialog_id, ann, "kept \u0000 verbatim <b>", client_id="c1"))
    first.mark_read(talk.dialog_id, ben.user_id, sent.message_id)
    first.close()

    second = SQLiteStore(path)
    assert second.user_by_phone("702") == ben
    assert second.get_dialog(talk.dialog_id) == talk
    assert second.get_message(sent.message_id) == sent
    view = second.dialog_view(talk.dialog_id, ben.user_id)
    assert view is not None and view.last_message == sent and view.unread_count == 0
    second.close()


def test_a_newer_schema_refuses_to_open(path: Path) -> None:
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError) as caught:
        SQLiteStore(path)
    text = str(caught.value)
    assert str(path) in text and f"schema version {SCHEMA_VERSION + 1}" in text and "upgrade" in text
    with sqlite3.connect(path) as conn:  # untouched
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1


@pytest.mark.parametrize("kind", ["random-bytes", "directory", "under-a-file"])
def test_an_unusable_file_is_a_store_error(tmp_path: Path, kind: str) -> None:
    if kind == "random-bytes":
        target = tmp_path / "random.db"
        target.write_bytes(bytes(range(256)) * 64)
    elif kind == "directory":
        target = tmp_path
    else:
        (tmp_path / "plain").write_text("x")
        target = tmp_path / "plain" / "chat.db"
    with pytest.raises(StoreError) as caught:
        SQLiteStore(target)
    assert str(target) in str(caught.value) and "\n" not in str(caught.value)


# -- users and dialogs --------------------------------------------------------------------------------------


def test_a_duplicate_phone_is_a_conflict(store: SQLiteStore) -> None:
    user(store, "701")
    with pytest.raises(Conflict):
        user(store, "701")


def test_save_dialog_updates_title_and_members(store: SQLiteStore) -> None:
    ann, ben, cid = user(store, "701"), user(store, "702"), user(store, "703")
    talk = dialog(store, ann, ben)
    changed = attrs.evolve(talk, title="Renamed", member_ids=(ann.user_id, cid.user_id), updated_at=now_iso())
    before, after = store.save_dialog(changed)
    assert before == talk
    assert after.title == "Renamed" and after.member_ids == (ann.user_id, cid.user_id)
    assert [v.dialog.dialog_id for v in store.dialog_views(ben.user_id)] == []
    assert store.unknown_users([ann.user_id, "usr_nobody"]) == ["usr_nobody"]


# -- messages -----------------------------------------------------------------------------------------------


def test_insert_is_idempotent_by_message_id(store: SQLiteStore, pair: tuple[User, User, Dialog]) -> None:
    ann, _, talk = pair
    sent = message(talk.dialog_id, ann)
    assert store.insert_message(sent) == (sent, True)
    again = attrs.evolve(sent, content="a redelivery that differs")
    assert store.insert_message(again) == (sent, False)
    assert store.list_messages(talk.dialog_id, limit=10) == [sent]


def test_insert_is_idempotent_by_client_message_id_per_sender_and_dialog(
    store: SQLiteStore, pair: tuple[User, User, Dialog]
) -> None:
    ann, ben, talk = pair
    other = dialog(store, ann, ben)
    first, created = store.insert_message(message(talk.dialog_id, ann, "one", client_id="c1"))
    assert created
    retry, created = store.insert_message(message(talk.dialog_id, ann, "one again", client_id="c1"))
    assert (retry, created) == (first, False)
    assert store.insert_message(message(talk.dialog_id, ben, "bob's", client_id="c1"))[1]
    assert store.insert_message(message(other.dialog_id, ann, "elsewhere", client_id="c1"))[1]
    assert store.insert_message(message(talk.dialog_id, ann, "no id"))[1]
    assert store.insert_message(message(talk.dialog_id, ann, "no id either"))[1]
    assert len(store.list_messages(talk.dialog_id, limit=200)) == 4


def test_concurrent_inserts_of_one_client_message_id_store_one(
    store: SQLiteStore, pair: tuple[User, User, Dialog]
) -> None:
    ann, _, talk = pair
    results: list[tuple[Message, bool]] = []
    barrier = threading.Barrier(6)

    def send() -> None:
        barrier.wait(timeout=10)
        results.append(store.insert_message(message(talk.dialog_id, ann, "race", client_id="r1")))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 6
    assert sum(created for _, created in results) == 1
    assert len({stored.message_id for stored, _ in results}) == 1


def test_apply_update_applies_only_newer_versions(store: SQLiteStore, pair: tuple[User, User, Dialog]) -> None:
    ann, ben, talk = pair
    sent, _ = store.insert_message(message(talk.dialog_id, ann, "v1"))
    older = attrs.evolve(sent, content="older", updated_at="2000-01-01T00:00:00.000Z")
    assert store.apply_update(older) == (sent, False)
    same = attrs.evolve(sent, content="same stamp")
    assert store.apply_update(same) == (sent, False)
    newer = attrs.evolve(sent, content="v2", updated_at="2999-01-01T00:00:00.000Z", meta={"edited": True})
    stored, applied = store.apply_update(newer)
    assert applied and stored == newer and store.get_message(sent.message_id) == newer
    # An update never moves a message to another dialog or sender.
    hijack = attrs.evolve(newer, sender_id=ben.user_id, dialog_id="dlg_other", updated_at="2999-01-02T00:00:00.000Z")
    stored, applied = store.apply_update(hijack)
    assert applied and stored.sender_id == ann.user_id and stored.dialog_id == talk.dialog_id
    assert store.apply_update(newer) == (stored, False)


def test_apply_update_of_an_unseen_message_stores_it(store: SQLiteStore, pair: tuple[User, User, Dialog]) -> None:
    ann, _, talk = pair
    unseen = message(talk.dialog_id, ann, "first seen as an update")
    assert store.apply_update(unseen) == (unseen, True)
    assert store.list_messages(talk.dialog_id, limit=5) == [unseen]
    view = store.dialog_view(talk.dialog_id, ann.user_id)
    assert view is not None and view.last_message == unseen


def test_unread_counts_follow_messages_of_others_and_read_marks(
    store: SQLiteStore, pair: tuple[User, User, Dialog]
) -> None:
    ann, ben, talk = pair
    sent = [store.insert_message(message(talk.dialog_id, ann, f"a{i}"))[0] for i in range(3)]
    store.insert_message(message(talk.dialog_id, ben, "b"))
    assert store.unread_counts(talk.dialog_id) == {ann.user_id: 1, ben.user_id: 3}
    view = store.mark_read(talk.dialog_id, ben.user_id, sent[1].message_id)
    assert view.unread_count == 1
    assert store.mark_read(talk.dialog_id, ben.user_id, sent[0].message_id).unread_count == 1  # never backwards
    assert store.unread_counts(talk.dialog_id) == {ann.user_id: 1, ben.user_id: 1}
    assert store.mark_read(talk.dialog_id, ben.user_id, sent[2].message_id).unread_count == 0
    with pytest.raises(NotFound):
        store.mark_read(talk.dialog_id, ben.user_id, "msg_missing")
    other = dialog(store, ann, ben)
    elsewhere, _ = store.insert_message(message(other.dialog_id, ann))
    with pytest.raises(BadRequest):
        store.mark_read(talk.dialog_id, ben.user_id, elsewhere.message_id)


def test_dialog_views_are_most_recently_active_first(store: SQLiteStore) -> None:
    ann, ben = user(store, "701"), user(store, "702")
    first, second, third = dialog(store, ann, ben), dialog(store, ann, ben), dialog(store, ann)
    store.insert_message(message(first.dialog_id, ben))
    store.insert_message(message(second.dialog_id, ben))
    store.insert_message(message(first.dialog_id, ben, "latest"))
    views = store.dialog_views(ann.user_id)
    assert [v.dialog.dialog_id for v in views][:2] == [first.dialog_id, second.dialog_id]
    assert {v.dialog.dialog_id for v in views} == {first.dialog_id, second.dialog_id, third.dialog_id}
    assert views[0].last_message is not None and views[0].last_message.content == "latest"
    assert [v.unread_count for v in views[:2]] == [2, 1]
    assert [v.dialog.dialog_id for v in store.dialog_views(ben.user_id)] == [first.dialog_id, second.dialog_id]


def test_list_messages_pages(store: SQLiteStore, pair: tuple[User, User, Dialog]) -> None:
    ann, _, talk = pair
    ids = [store.insert_message(message(talk.dialog_id, ann, f"m{i}"))[0].message_id for i in range(10)]

    def page(**kwargs: object) -> list[str]:
        return [m.message_id for m in store.list_messages(talk.dialog_id, **kwargs)]  # type: ignore[arg-type]

    assert page(limit=4) == ids[6:]
    assert page(limit=100) == ids
    assert page(limit=4, before=ids[6]) == ids[2:6]
    assert page(limit=4, before=ids[2]) == ids[:2]
    assert page(limit=4, after=ids[2]) == ids[3:7]
    assert page(limit=4, after=ids[8]) == ids[9:]
    assert page(limit=100, after=ids[1], before=ids[5]) == ids[2:5]
    assert page(limit=2, after=ids[1], before=ids[5]) == ids[2:4]
    assert page(limit=5, after=ids[9]) == []
    empty = dialog(store, ann)
    assert store.list_messages(empty.dialog_id, limit=50) == []
    for field in ("before", "after"):
        with pytest.raises(BadRequest) as caught:
            store.list_messages(empty.dialog_id, limit=5, **{field: ids[0]})
        assert caught.value.field == field


# -- restart ------------------------------------------------------------------------------------------------


def test_a_restarted_server_on_the_same_db_serves_what_it_stored(tmp_path: Path) -> None:
    """A real `python run.py` stopped with SIGTERM and started again on the same --db: the message is there."""
    servers: list[Server] = []
    try:
        _restart_round_trip(tmp_path, servers)
    finally:
        for server in servers:
            server.close()


def _restart_round_trip(tmp_path: Path, servers: list[Server]) -> None:
    db = str(tmp_path / "keep.db")
    first = Server(tmp_path, "--demo", "--port", "0", "--db", db)
    servers.append(first)
    url = first.url()
    token = login(url, "79111111111", "demo")
    dialog_id = http("GET", f"{url}/api/dialogs", token=token)[1]["data"][0]["dialogId"]
    status, sent = http("POST", f"{url}/api/messages/dialog/{dialog_id}", {"content": "kept"}, token)
    assert status == 201
    assert first.stop() == 0

    second = Server(tmp_path, "--port", "0", "--db", db)
    servers.append(second)
    url = second.url()
    # The secret lives in the state folder: a token from before the restart still works.
    status, body = http("GET", f"{url}/api/messages/dialog/{dialog_id}", token=token)
    assert status == 200 and body["data"] == [sent["data"]]
    bob = login(url, "79777777777", "demo")
    status, body = http("GET", f"{url}/api/dialogs", token=bob)
    assert body["data"][0]["lastMessage"] == sent["data"] and body["data"][0]["unreadCount"] == 1
    assert second.stop() == 0


# -- group commit ----------------------------------------------------------------------------------------------


async def _while_the_writer_is_busy(db: AsyncStore, *writes: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Submit `writes` while the writer thread is held by another write: they wait, and go as one group."""
    held, release = threading.Event(), threading.Event()

    def hold(_: SQLiteStore) -> None:
        held.set()
        release.wait(10)

    blocker = asyncio.ensure_future(db.write(hold))
    await asyncio.get_running_loop().run_in_executor(None, held.wait, 10)
    tasks = [asyncio.ensure_future(write()) for write in writes]
    await asyncio.sleep(0.05)  # every task has submitted its write to the writer's queue
    release.set()
    await blocker
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_writes_waiting_behind_a_commit_share_the_next_one_and_keep_their_order(
    store: SQLiteStore, pair: tuple[User, User, Dialog]
) -> None:
    ann, _, talk = pair
    db = AsyncStore(store)
    sent = [message(talk.dialog_id, ann, f"m{n}") for n in range(20)]
    resumed: list[str] = []

    async def post(msg: Message) -> tuple[Message, bool]:
        stored = await db.write(SQLiteStore.insert_message, msg)
        resumed.append(msg.message_id)
        return stored

    async def scenario() -> list[Any]:
        return await _while_the_writer_is_busy(db, *(functools.partial(post, m) for m in sent))

    commits = store.commits
    results = asyncio.run(scenario())
    db.close()

    assert all(created for _, created in results)
    assert store.commits == commits + 1  # the held write committed nothing; the twenty, one commit
    assert resumed == [m.message_id for m in sent]  # awaiters resume in the order the writes were stored
    reopened = SQLiteStore(store.path)
    stored = reopened.list_messages(talk.dialog_id, limit=50)
    assert [m.message_id for m in stored][-20:] == [m.message_id for m in sent]
    reopened.close()


def test_a_failing_write_in_a_group_is_undone_alone(store: SQLiteStore) -> None:
    db = AsyncStore(store)
    taken = user(store, "700")

    def create(phone: str) -> Callable[[], Awaitable[Any]]:
        return functools.partial(db.write, SQLiteStore.create_user, User(new_id("usr"), "n", phone), "hash")

    results = asyncio.run(_while_the_writer_is_busy(db, create("801"), create(taken.phone), create("802")))
    db.close()

    assert isinstance(results[1], Conflict)
    assert [r.phone for r in (results[0], results[2])] == ["801", "802"]
    reopened = SQLiteStore(store.path)
    assert reopened.user_by_phone("801") is not None and reopened.user_by_phone("802") is not None
    reopened.close()


def test_a_group_whose_commit_fails_fails_every_write_of_it(
    store: SQLiteStore, pair: tuple[User, User, Dialog]
) -> None:
    # A foreign key checked at COMMIT (deferred) makes SQLite refuse the commit itself, as a full disk would:
    # nothing of the group is stored, and every awaiter hears of it.
    ann, _, talk = pair
    db = AsyncStore(store)
    good = message(talk.dialog_id, ann, "would have been fine")
    orphan = message("dlg_missing", ann, "no such dialog")

    def deferred_orphan(s: SQLiteStore) -> Any:
        s._connect().execute("PRAGMA defer_foreign_keys=ON")
        return s.insert_message(orphan)

    results = asyncio.run(_while_the_writer_is_busy(
        db, functools.partial(db.write, SQLiteStore.insert_message, good), functools.partial(db.write, deferred_orphan)
    ))
    after = asyncio.run(db.write(SQLiteStore.insert_message, good))  # the writer goes on after a failed group
    db.close()

    assert after[1] is True
    assert all(isinstance(r, sqlite3.IntegrityError) for r in results), results
    reopened = SQLiteStore(store.path)
    assert reopened.get_message(orphan.message_id) is None
    reopened.close()


def test_a_write_after_close_is_refused_not_left_hanging(store: SQLiteStore) -> None:
    db = AsyncStore(store)
    db.close()
    with pytest.raises(RuntimeError):
        asyncio.run(db.write(SQLiteStore.create_user, User(new_id("usr"), "n", "900"), "hash"))
