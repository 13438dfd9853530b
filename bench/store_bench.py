"""The store at a million messages: how long a history page, a POST and a dialog list take at that size.

    python bench/store_bench.py                      # 1,000,000 messages in 1,000 dialogs, in a temp folder
    python bench/store_bench.py --path /tmp/big.db   # keep (and reuse) the filled file
    python bench/store_bench.py --messages 100000    # a quicker run

The fill goes straight into the store's own schema (made, and so migrated, by the store's `start`) with
executemany in big transactions: it is setup, not what is measured. The messages get their positions as a
database migrated to the durable log has them (the log starts after the last message, `log_meta.head`). Every
figure is then taken on the product path, the store's `read`/`write` of `chatserver.queries` with its own
connection settings (WAL, synchronous=FULL), one call at a time, and printed as p50/p99 over a few hundred
calls. Nothing here asserts a time: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatserver import queries
from chatserver.backends import open_store
from chatserver.models import Message, User, new_id, now_iso
from chatserver.store import Store

BATCH = 100_000
OTHER_USERS = 200


def fill(path: Path, messages: int, dialogs: int) -> tuple[str, list[str]]:
    """A store with `messages` messages spread over `dialogs` dialogs; returns (the hub user, the dialog ids).

    The hub user is a member of every dialog (the "member of many dialogs"); each dialog has two more members
    from a pool of others. Messages go to dialogs round-robin, so that a dialog's history is spread over the
    whole table as it is in life, and the hub has read about half of each dialog.
    """
    asyncio.run(_schema(path))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")  # the fill only; measurements use the store's own settings
    hub = "usr_" + "0" * 16
    users = [hub] + [f"usr_{i:016x}" for i in range(1, OTHER_USERS + 1)]
    stamp = "2025-01-01T00:00:00.000Z"
    dialog_ids = [f"dlg_{i:016x}" for i in range(dialogs)]
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO users (user_id, phone, name, password_hash, created_at) VALUES (?, ?, ?, 'x', ?)",
        [(u, f"7{i:010d}", f"user {i}", stamp) for i, u in enumerate(users)],
    )
    conn.executemany(
        "INSERT INTO dialogs (dialog_id, title, created_at, updated_at, activity_at) VALUES (?, ?, ?, ?, ?)",
        [(d, f"dialog {i}", stamp, stamp, stamp) for i, d in enumerate(dialog_ids)],
    )
    members = []
    for i, dialog_id in enumerate(dialog_ids):
        a, b = users[1 + (2 * i) % OTHER_USERS], users[1 + (2 * i + 1) % OTHER_USERS]
        members += [(dialog_id, hub, 0), (dialog_id, a, 1), (dialog_id, b, 2)]
    conn.executemany("INSERT INTO dialog_members (dialog_id, user_id, position) VALUES (?, ?, ?)", members)
    conn.executemany("INSERT INTO membership (dialog_id, user_id, from_version) VALUES (?, ?, 1)",
                     [(d, u) for d, u, _ in members])
    conn.execute("COMMIT")

    base = 1_735_689_600_000  # 2025-01-01 in ms; one message per ms
    started = time.perf_counter()
    for start in range(0, messages, BATCH):
        rows = []
        for n in range(start, min(start + BATCH, messages)):
            dialog_index = n % dialogs
            sender = hub if n % 3 == 0 else users[1 + (2 * dialog_index) % OTHER_USERS]
            created = _iso(base + n)
            rows.append(
                (
                    n + 1,
                    f"msg_{n:016x}",
                    dialog_ids[dialog_index],
                    sender,
                    f"message number {n} " + "lorem ipsum " * 4,
                    "text",
                    "{}",
                    created,
                    created,
                    f"c{n}" if n % 2 else None,
                )
            )
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO messages (seq, message_id, dialog_id, sender_id, content, type, meta, created_at, updated_at, "
            "client_message_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute("COMMIT")
        done = min(start + BATCH, messages)
        print(f"  filled {done:>9,} messages ({time.perf_counter() - started:5.1f}s)", flush=True)
    conn.execute("BEGIN")
    conn.execute(
        "UPDATE dialogs SET last_seq = (SELECT max(seq) FROM messages m WHERE m.dialog_id = dialogs.dialog_id), "
        "activity_at = coalesce((SELECT max(created_at) FROM messages m WHERE m.dialog_id = dialogs.dialog_id), "
        "activity_at)"
    )
    # The log starts after the messages, as in a database migrated to it (schema step 3).
    conn.execute("UPDATE log_meta SET head = ?, floor = ?", (messages, messages))
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()
    return hub, dialog_ids


async def _schema(path: Path) -> None:
    store = open_store(str(path))
    await store.start()
    await store.close()


def existing(path: Path) -> tuple[str, list[str]]:
    conn = sqlite3.connect(path)
    dialog_ids = [row[0] for row in conn.execute("SELECT dialog_id FROM dialogs ORDER BY dialog_id")]
    conn.close()
    return "usr_" + "0" * 16, dialog_ids


def _iso(millis: int) -> str:
    seconds, rest = divmod(millis, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest:03d}Z"


async def measure(label: str, calls: int, func: Callable[[int], Awaitable[Any]]) -> None:
    await func(0)  # warm the statement cache and the connection
    times = []
    for i in range(calls):
        started = time.perf_counter()
        await func(i)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    p50 = statistics.median(times)
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    print(f"  {label:<58} p50 {p50:8.3f} ms   p99 {p99:8.3f} ms   ({calls} calls)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", help="SQLite file to fill (reused if it already holds the messages)")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--dialogs", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=300, help="calls per read figure")
    args = parser.parse_args(argv)

    scratch = None
    if args.path:
        path = Path(args.path)
    else:
        scratch = tempfile.TemporaryDirectory(prefix="chatserver-bench-")
        path = Path(scratch.name) / "bench.db"
    try:
        reuse = path.exists() and _count(path) >= args.messages
        print(
            f"store: {path} ({'reused' if reuse else 'filling'}: {args.messages:,} messages, {args.dialogs:,} dialogs)"
        )
        started = time.perf_counter()
        hub, dialog_ids = existing(path) if reuse else fill(path, args.messages, args.dialogs)
        if not reuse:
            print(f"  fill took {time.perf_counter() - started:.1f}s; file {path.stat().st_size / 2**20:,.0f} MiB")
        asyncio.run(run(path, hub, dialog_ids, args.calls))
    finally:
        if scratch is not None:
            scratch.cleanup()
    return 0


def _count(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def half_read(path: Path, hub: str) -> None:
    """The hub has read about half of every dialog (again, on a reused file that a previous run marked read)."""
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "UPDATE dialog_members SET last_read_seq = (SELECT max(seq) / 2 FROM messages) WHERE user_id = ?", (hub,)
        )
    conn.close()


async def run(path: Path, hub: str, dialog_ids: list[str], calls: int) -> None:
    half_read(path, hub)
    store = open_store(str(path))
    await store.start()
    try:
        await measure_all(store, path, hub, dialog_ids, calls)
    finally:
        await store.close()


async def measure_all(store: Store, path: Path, hub: str, dialog_ids: list[str], calls: int) -> None:
    rng = random.Random(7)
    total = _count(path)
    per_dialog = total // len(dialog_ids)
    print(f"\nStore at {total:,} messages ({per_dialog:,} per dialog), SQLite {sqlite3.sqlite_version}:")

    picks = [rng.choice(dialog_ids) for _ in range(calls + 1)]
    await measure("history, newest page (limit 50)", calls,
                  lambda i: store.read(queries.list_messages, picks[i], limit=50))

    # A `before` deep in history: the message a tenth of the way into its dialog (fill: message n is in
    # dialog n % dialogs, and its id is msg_<n in hex>).
    index = {dialog_id: i for i, dialog_id in enumerate(dialog_ids)}
    deep = [(d, f"msg_{(per_dialog // 10) * len(dialog_ids) + index[d]:016x}") for d in picks]
    await measure(
        "history, `before` page deep in history (limit 50)",
        calls,
        lambda i: store.read(queries.list_messages, deep[i][0], limit=50, before=deep[i][1]),
    )
    await measure(
        "history, `after` page deep in history (limit 200)",
        calls,
        lambda i: store.read(queries.list_messages, deep[i][0], limit=200, after=deep[i][1]),
    )

    sender = User(hub, "hub", "70000000000")

    def post(i: int, client_id: bool = False) -> Awaitable[tuple[Message, bool]]:
        stamp = now_iso()
        message = Message(
            new_id("msg"),
            picks[i],
            sender.user_id,
            f"bench post {i}",
            "text",
            {},
            stamp,
            stamp,
            new_id("cid") if client_id else None,
        )
        return store.write(queries.insert_message, message)

    await measure("POST: insert_message and its log event (one transaction)", calls, post)
    await measure("POST with clientMessageId: insert_message", calls, lambda i: post(i, True))
    retries = [(await store.read(queries.list_messages, d, limit=1))[0] for d in picks]
    await measure("POST retry (same messageId): insert_message", calls,
                  lambda i: store.write(queries.insert_message, retries[i]))

    list_calls = max(10, calls // 15)
    await measure(
        f"dialog list of a member of {len(dialog_ids):,} dialogs, half unread",
        list_calls,
        lambda i: store.read(queries.dialog_views, hub),
    )
    for dialog_id in dialog_ids:  # the same member, once every dialog is read up to its last message
        last = (await store.read(queries.list_messages, dialog_id, limit=1))[0]
        await store.write(queries.mark_read, dialog_id, hub, last.message_id)
    await measure(
        f"dialog list of a member of {len(dialog_ids):,} dialogs, all read",
        list_calls,
        lambda i: store.read(queries.dialog_views, hub),
    )
    other = "usr_" + f"{1:016x}"
    await measure("dialog list of a member of a few dialogs", calls, lambda i: store.read(queries.dialog_views, other))
    await measure("one dialog as a member sees it (dialog_view)", calls,
                  lambda i: store.read(queries.dialog_view, picks[i], hub))
    await measure("unread counts of every member of a dialog", calls,
                  lambda i: store.read(queries.unread_counts, picks[i]))


if __name__ == "__main__":
    sys.exit(main())
