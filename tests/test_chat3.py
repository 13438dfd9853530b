"""Chat3 events on the real RabbitMQ (PROTOCOL section 6), and cluster mode across real server processes.

Chat3 is played by publishing to the broker with a plain pika BlockingConnection (off the loop); everything
else is the real server: the listener on the server's loop, the store, the broadcaster, real sockets. Every
test has exchanges and queues of its own (uuid names), deleted at teardown, so tests never see each other's
events.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pika
import pytest

from chatserver import jsonutil
from chatserver.chat3 import IN_PLACE_RETRIES, Amqp, start_amqp
from chatserver.config import ConfigError, load_config
from chatserver.metrics import Metrics
from chatserver.models import new_id, now_iso
from chatserver.sqlite import SQLiteStore
from handlers.base import AppContext
from run import build_context, close_context
from tests.conftest import Client, Socket, require_service

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
ROOT = Path(__file__).resolve().parent.parent


def broker_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1.0):
            return True
    except OSError:
        return False


# -- Chat3, played over the real broker -------------------------------------------------------------------


@attrs.define
class Broker:
    """This test's names on the broker, and Chat3's side of it: declare, publish, read the dead letters."""

    tag: str = attrs.Factory(lambda: uuid.uuid4().hex[:12])

    @property
    def exchange(self) -> str:
        return f"test.chat3.{self.tag}"

    @property
    def queue(self) -> str:
        return f"test.chatserver.{self.tag}"

    @property
    def dead_letter_exchange(self) -> str:
        return f"test.chat3.dlx.{self.tag}"

    @property
    def dead_letter_queue(self) -> str:
        return f"test.chat3.dead.{self.tag}"

    @property
    def cluster_exchange(self) -> str:
        return f"test.cluster.{self.tag}"

    def _run(self, work: Callable[[Any], Any]) -> Any:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            return work(connection.channel())
        finally:
            connection.close()

    def declare_dead_letters(self) -> None:
        """What the owner of the dead-letter exchange does (the server never declares it): exchange, queue."""

        def work(channel: Any) -> None:
            channel.exchange_declare(self.dead_letter_exchange, "fanout", durable=True)
            channel.queue_declare(self.dead_letter_queue, durable=True)
            channel.queue_bind(self.dead_letter_queue, self.dead_letter_exchange)

        self._run(work)

    def declare_chat3_queue(self) -> None:
        """The listener's own topology, declared before the listener ever ran (exactly as it declares it)."""

        def work(channel: Any) -> None:
            channel.exchange_declare(self.exchange, "topic", durable=True)
            channel.queue_declare(
                self.queue, durable=True, arguments={"x-dead-letter-exchange": self.dead_letter_exchange}
            )
            channel.queue_bind(self.queue, self.exchange, "#")

        self._run(work)

    def publish_sync(self, bodies: list[bytes]) -> None:
        def work(channel: Any) -> None:
            channel.confirm_delivery()
            for body in bodies:
                channel.basic_publish(
                    self.exchange, "chat3.event", body, pika.BasicProperties(delivery_mode=2), mandatory=True
                )

        self._run(work)

    async def publish(self, *events: dict[str, Any] | bytes) -> None:
        """Publish as Chat3 does, with publisher confirms: when this returns, the broker holds every event."""
        bodies = [e if isinstance(e, bytes) else jsonutil.dumps_bytes(e) for e in events]
        await asyncio.get_running_loop().run_in_executor(None, self.publish_sync, bodies)

    def dead_letters_sync(self) -> list[tuple[bytes, Any]]:
        def work(channel: Any) -> list[tuple[bytes, Any]]:
            got = []
            while True:
                method, properties, body = channel.basic_get(self.dead_letter_queue, auto_ack=True)
                if method is None:
                    return got
                got.append((body, properties.headers))

        return self._run(work)

    def ready_count_sync(self) -> int:
        return self._run(lambda channel: channel.queue_declare(self.queue, passive=True).method.message_count)

    def delete(self) -> None:
        def work(channel: Any) -> None:
            for queue in (self.queue, self.dead_letter_queue):
                channel.queue_delete(queue)
            for exchange in (self.exchange, self.dead_letter_exchange, self.cluster_exchange):
                channel.exchange_delete(exchange)

        self._run(work)


@pytest.fixture
def broker() -> Iterator[Broker]:
    require_service("RabbitMQ at 127.0.0.1:5672", broker_reachable())
    names = Broker()
    yield names
    names.delete()


@pytest.fixture
def with_cluster() -> bool:
    """Whether the in-process server also runs the cluster bus (a test parametrizes this to True)."""
    return False


@pytest.fixture
def settings(broker: Broker, with_cluster: bool) -> dict[str, Any]:
    return {
        "amqp_url": AMQP_URL,
        "chat3_exchange": broker.exchange,
        "chat3_queue": broker.queue,
        "chat3_dead_letter_exchange": broker.dead_letter_exchange,
        "cluster_exchange": broker.cluster_exchange if with_cluster else "",
    }


def message_event(
    dialog_id: str,
    sender_id: str,
    content: str,
    *,
    event: str = "message.created",
    created_at: str | None = None,
) -> dict[str, Any]:
    created_at = created_at or now_iso()
    data = {
        "messageId": new_id("msg"),
        "dialogId": dialog_id,
        "senderId": sender_id,
        "content": content,
        "type": "text",
        "meta": {},
        "createdAt": created_at,
        "updatedAt": created_at,
        "clientMessageId": None,
    }
    return {"event": event, "data": data}


def dialog_event(dialog_id: str, title: str, member_ids: list[str]) -> dict[str, Any]:
    stamp = now_iso()
    data = {"dialogId": dialog_id, "title": title, "memberIds": member_ids, "createdAt": stamp, "updatedAt": stamp}
    return {"event": "dialog.updated", "data": data}


async def eventually(condition: Callable[[], Any], what: str, seconds: float = 10.0) -> None:
    """Wait, with a bound, until `condition()` is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def listening(ctx: AppContext) -> AsyncIterator[Amqp]:
    """The listener as run.py starts it, consuming; stopped (in-flight work acked) on the way out."""
    amqp = start_amqp(ctx.service, ctx.peers, ctx.config, ctx.metrics, ctx.readiness)
    assert amqp is not None
    try:
        await eventually(lambda: amqp.listener.problem() == "", "the listener to consume")
        yield amqp
    finally:
        await amqp.stop()


def chat3_count(ctx: AppContext, outcome: str) -> float:
    value = ctx.metrics.registry.get_sample_value("chatserver_chat3_events_total", {"outcome": outcome})
    return value or 0.0


async def message_ids(sock: Socket, count: int, *types: str) -> list[str]:
    return [(await sock.next_of(*types))["data"]["messageId"] for _ in range(count)]


# -- the listener ----------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_chat3_message_reaches_websocket_and_long_poll_once_and_is_in_history(
    ctx: AppContext, alice: Client, bob: Client, dialog_id: str, broker: Broker
) -> None:
    async with listening(ctx):
        bob_ws = await bob.websocket()
        status, hello = await alice.poll()
        assert status == 200
        parked = asyncio.ensure_future(alice.poll(hello["data"]["cursor"], timeout="10"))
        event = message_event(dialog_id, alice.user_id, "from Chat3 ✓")
        await broker.publish(event)

        got = await bob_ws.next_of("message:new")
        assert got["data"] == event["data"]
        status, body = await asyncio.wait_for(parked, 5)
        assert status == 200
        assert [e["data"] for e in body["data"]["events"]] == [event["data"]]
        status, history = await bob.call("GET", f"/api/messages/dialog/{dialog_id}")
        assert status == 200 and history["data"][-1] == event["data"]
        await bob_ws.nothing_within(0.3)
        assert chat3_count(ctx, "accepted") == 1


@pytest.mark.gen_test
async def test_same_chat3_message_published_twice_is_delivered_once(
    ctx: AppContext, alice: Client, bob: Client, dialog_id: str, broker: Broker
) -> None:
    async with listening(ctx):
        bob_ws = await bob.websocket()
        event = message_event(dialog_id, alice.user_id, "twice")
        marker = message_event(dialog_id, alice.user_id, "after")
        await broker.publish(event, event, marker)
        # Deliveries are handled in queue order: the copy is handled before the marker arrives.
        assert await message_ids(bob_ws, 2, "message:new") == [event["data"]["messageId"], marker["data"]["messageId"]]
        assert chat3_count(ctx, "duplicate") == 1


@pytest.mark.gen_test
async def test_message_posted_over_rest_then_echoed_by_chat3_is_delivered_once(
    ctx: AppContext, alice: Client, bob: Client, dialog_id: str, broker: Broker
) -> None:
    async with listening(ctx):
        bob_ws = await bob.websocket()
        sent = await alice.post_message(dialog_id, "over REST first")
        assert (await bob_ws.next_of("message:new"))["data"] == sent
        marker = message_event(dialog_id, alice.user_id, "after the echo")
        await broker.publish({"event": "message.created", "data": sent}, marker)
        assert await message_ids(bob_ws, 1, "message:new") == [marker["data"]["messageId"]]
        assert chat3_count(ctx, "duplicate") == 1


@pytest.mark.gen_test
async def test_message_updated_becomes_one_update_and_a_stale_update_is_dropped(
    ctx: AppContext, alice: Client, bob: Client, dialog_id: str, broker: Broker
) -> None:
    async with listening(ctx):
        bob_ws = await bob.websocket()
        created = message_event(dialog_id, alice.user_id, "v1", created_at="2025-11-05T10:00:00.000Z")
        message_id = created["data"]["messageId"]
        update = dict(created, event="message.updated")
        update["data"] = dict(created["data"], content="v3", updatedAt="2025-11-05T10:00:03.000Z")
        stale = dict(created, event="message.updated")
        stale["data"] = dict(created["data"], content="v2", updatedAt="2025-11-05T10:00:02.000Z")
        marker = message_event(dialog_id, alice.user_id, "marker")
        await broker.publish(created, update, stale, update, marker)

        assert (await bob_ws.next_of("message:new", "message:update"))["data"] == created["data"]
        got = await bob_ws.next_of("message:new", "message:update")
        assert got["type"] == "message:update" and got["data"] == update["data"]
        got = await bob_ws.next_of("message:new", "message:update")
        assert got["type"] == "message:new" and got["data"]["messageId"] == marker["data"]["messageId"]
        status, history = await bob.call("GET", f"/api/messages/dialog/{dialog_id}")
        assert status == 200
        assert [m["content"] for m in history["data"] if m["messageId"] == message_id] == ["v3"]
        assert chat3_count(ctx, "duplicate") == 2


@pytest.mark.gen_test
async def test_update_of_a_message_never_seen_is_stored_and_sent_as_update(
    ctx: AppContext, alice: Client, bob: Client, dialog_id: str, broker: Broker
) -> None:
    async with listening(ctx):
        bob_ws = await bob.websocket()
        event = message_event(dialog_id, alice.user_id, "edited elsewhere", event="message.updated")
        await broker.publish(event)
        got = await bob_ws.next_of("message:new", "message:update")
        assert got["type"] == "message:update" and got["data"] == event["data"]
        status, history = await bob.call("GET", f"/api/messages/dialog/{dialog_id}")
        assert status == 200 and history["data"][-1] == event["data"]


@pytest.mark.gen_test
async def test_poison_of_each_kind_is_dead_lettered_once_and_the_next_event_arrives(
    ctx: AppContext, alice: Client, bob: Client, carol: Client, dialog_id: str, broker: Broker
) -> None:
    broker.declare_dead_letters()
    loop = asyncio.get_running_loop()
    async with listening(ctx):
        bob_ws = await bob.websocket()
        good = message_event(dialog_id, alice.user_id, "still consuming")
        no_content = message_event(dialog_id, alice.user_id, "x")
        del no_content["data"]["content"]
        wrong_type = message_event(dialog_id, alice.user_id, "x")
        wrong_type["data"]["senderId"] = 42
        stranger_dialog = new_id("dlg")
        poison: list[dict[str, Any] | bytes] = [
            b"{not json",
            b"\xff\xfe\x00",
            b'["an", "array"]',
            {"event": "message.deleted", "data": good["data"]},
            {"data": good["data"]},
            no_content,
            wrong_type,
            {"event": "message.created", "data": "not an object"},
            message_event(new_id("dlg"), alice.user_id, "to a dialog nobody knows"),
            dialog_event(stranger_dialog, "strangers", [carol.user_id, new_id("usr")]),
        ]
        await broker.publish(*poison, good)

        assert (await bob_ws.next_of("message:new"))["data"] == good["data"]
        dead: list[tuple[bytes, Any]] = []

        async def collect() -> bool:
            dead.extend(await loop.run_in_executor(None, broker.dead_letters_sync))
            return len(dead) >= len(poison)

        deadline = loop.time() + 10
        while not await collect():
            assert loop.time() < deadline, f"only {len(dead)} of {len(poison)} poison events were dead-lettered"
            await asyncio.sleep(0.05)
        expected = [p if isinstance(p, bytes) else jsonutil.dumps_bytes(p) for p in poison]
        assert [body for body, _ in dead] == expected
        for _, headers in dead:
            (death,) = headers["x-death"]
            assert death["reason"] == "rejected" and death["count"] == 1
        assert await loop.run_in_executor(None, broker.dead_letters_sync) == []
        assert await loop.run_in_executor(None, broker.ready_count_sync) == 0
        assert chat3_count(ctx, "rejected") == len(poison)
        assert chat3_count(ctx, "accepted") == 1
        status, _ = await carol.call("GET", f"/api/dialogs/{stranger_dialog}")
        assert status == 404
        await bob_ws.nothing_within(0.2)


@pytest.mark.gen_test
async def test_dialog_announced_by_chat3_reaches_its_members_and_then_carries_messages(
    ctx: AppContext, alice: Client, bob: Client, carol: Client, broker: Broker
) -> None:
    async with listening(ctx):
        carol_ws = await carol.websocket()
        bob_ws = await bob.websocket()
        new_dialog = new_id("dlg")
        await broker.publish(dialog_event(new_dialog, "Born in Chat3", [alice.user_id, carol.user_id]))
        announced = await carol_ws.next_of("dialog:update")
        assert announced["data"]["dialogId"] == new_dialog
        assert announced["data"]["memberIds"] == [alice.user_id, carol.user_id]
        message = message_event(new_dialog, alice.user_id, "first words")
        await broker.publish(message)
        assert (await carol_ws.next_of("message:new"))["data"] == message["data"]
        status, dialogs = await carol.call("GET", "/api/dialogs")
        assert status == 200
        assert [d["dialogId"] for d in dialogs["data"]] == [new_dialog]
        assert dialogs["data"][0]["lastMessage"] == message["data"]
        await bob_ws.nothing_within(0.2)


@pytest.mark.gen_test
async def test_a_removed_member_gets_the_last_dialog_update_and_nothing_after_on_any_transport(
    ctx: AppContext, alice: Client, bob: Client, carol: Client, broker: Broker
) -> None:
    # Chat3 is the source of truth for its messages: one whose sender is not (or no longer) a member is stored
    # and reaches the members, never the sender for having sent it; dead-lettering it would lose real history.
    async with listening(ctx):
        carol_ws = await carol.websocket()
        alice_ws = await alice.websocket()
        _, hello = await carol.poll()
        dialog = new_id("dlg")
        trio = dialog_event(dialog, "Trio", [alice.user_id, bob.user_id, carol.user_id])
        duo = dialog_event(dialog, "Duo", [alice.user_id, bob.user_id])
        duo["data"]["createdAt"] = trio["data"]["createdAt"]
        await broker.publish(trio, duo)
        assert (await carol_ws.next_of("dialog:update"))["data"]["title"] == "Trio"
        last = await carol_ws.next_of("dialog:update")
        assert last["data"]["memberIds"] == [alice.user_id, bob.user_id]
        from_bob = message_event(dialog, bob.user_id, "after carol left")
        from_carol = message_event(dialog, carol.user_id, "sent by carol in Chat3 after she left")
        await broker.publish(from_bob, from_carol)
        assert (await alice_ws.next_of("message:new"))["data"] == from_bob["data"]
        assert (await alice_ws.next_of("message:new"))["data"] == from_carol["data"]
        await carol_ws.nothing_within(0.3)
        status, polled = await carol.poll(hello["data"]["cursor"], timeout="0")
        assert status == 200
        assert [(e["type"], e["data"]["title"]) for e in polled["data"]["events"]] == [
            ("dialog:update", "Trio"),
            ("dialog:update", "Duo"),
        ]
        for path in (f"/api/messages/dialog/{dialog}", f"/api/dialogs/{dialog}"):
            assert (await carol.call("GET", path))[0] == 403
        assert chat3_count(ctx, "rejected") == 0


@pytest.mark.gen_test
async def test_a_stale_dialog_update_never_brings_a_removed_member_back(
    ctx: AppContext, alice: Client, carol: Client, broker: Broker
) -> None:
    # A redelivery, or an event requeued while the store failed, can arrive after a newer one: the older
    # membership must not come back (and give a removed member the dialog's history again).
    async with listening(ctx):
        carol_ws = await carol.websocket()
        dialog = new_id("dlg")
        trio = dialog_event(dialog, "Trio", [alice.user_id, carol.user_id])
        trio["data"]["updatedAt"] = "2026-01-01T00:00:01.000Z"
        trio["data"]["createdAt"] = "2026-01-01T00:00:00.000Z"
        duo = {
            "event": "dialog.updated",
            "data": {
                **trio["data"],
                "title": "Duo",
                "memberIds": [alice.user_id],
                "updatedAt": "2026-01-01T00:00:02.000Z",
            },
        }
        await broker.publish(trio, duo, trio)
        await carol_ws.next_of("dialog:update")
        assert (await carol_ws.next_of("dialog:update"))["data"]["title"] == "Duo"
        await eventually(lambda: chat3_count(ctx, "accepted") + chat3_count(ctx, "duplicate") >= 3, "the stale update")
        await carol_ws.nothing_within(0.3)
        assert (await carol.call("GET", f"/api/messages/dialog/{dialog}"))[0] == 403
        assert (await alice.call("GET", f"/api/dialogs/{dialog}"))[1]["data"]["title"] == "Duo"


@pytest.mark.gen_test
async def test_events_queued_while_the_server_was_stopped_arrive_after_it_starts(
    ctx: AppContext, alice: Client, bob: Client, dialog_id: str, broker: Broker
) -> None:
    broker.declare_chat3_queue()
    events = [message_event(dialog_id, alice.user_id, f"queued {n}") for n in range(3)]
    await broker.publish(*events)
    bob_ws = await bob.websocket()
    async with listening(ctx):
        got = await message_ids(bob_ws, 3, "message:new")
        assert got == [e["data"]["messageId"] for e in events]
        await bob_ws.nothing_within(0.3)


@pytest.mark.gen_test
async def test_listener_declares_its_queue_again_when_it_is_deleted_under_it(
    ctx: AppContext, alice: Client, bob: Client, dialog_id: str, broker: Broker
) -> None:
    loop = asyncio.get_running_loop()
    async with listening(ctx) as amqp:
        bob_ws = await bob.websocket()
        await loop.run_in_executor(None, broker.delete)
        # The broker cancels the consumer; the listener starts over and declares exchange, queue and binding.
        await eventually(lambda: amqp.listener.problem() != "", "the listener to notice the cancel", 5)
        await eventually(lambda: amqp.listener.problem() == "", "the listener to consume again")
        event = message_event(dialog_id, alice.user_id, "into the new queue")
        await broker.publish(event)
        assert (await bob_ws.next_of("message:new"))["data"] == event["data"]


@pytest.mark.gen_test
async def test_a_queue_declared_with_other_arguments_is_named_by_readyz(
    ctx: AppContext, alice: Client, broker: Broker
) -> None:
    # Someone declared the queue without the dead-letter exchange this server is configured with.
    broker._run(lambda channel: channel.queue_declare(broker.queue, durable=True))
    amqp = start_amqp(ctx.service, ctx.peers, ctx.config, ctx.metrics, ctx.readiness)
    assert amqp is not None
    try:
        await eventually(lambda: "PRECONDITION_FAILED" in amqp.listener.problem(), "the refused declare")
        status, body = await alice.call("GET", "/readyz")
        assert status == 503
        assert "x-dead-letter-exchange" in body["data"]["broker"], body
    finally:
        await amqp.stop()


async def cap_pages(tx: Any, store: SQLiteStore, cap: bool) -> None:
    """Stop the database from growing (SQLite then fails every write that needs a new page with "database or
    disk is full", as on a full disk), or lift that cap again: on every connection the store has opened (run as
    a write, on the store's writer thread, so that its connection is one of them)."""
    with store._lock:
        connections = list(store._connections)
    for conn in connections:
        pages = conn.execute("PRAGMA page_count").fetchone()[0] if cap else 1073741823
        conn.execute(f"PRAGMA max_page_count = {int(pages)}")


@pytest.mark.parametrize("store_kind", ["sqlite"])
@pytest.mark.gen_test(timeout=30)
async def test_a_store_failing_for_a_while_delays_events_in_order_and_never_dead_letters_them(
    ctx: AppContext, alice: Client, bob: Client, dialog_id: str, broker: Broker
) -> None:
    broker.declare_dead_letters()
    loop = asyncio.get_running_loop()

    def retries() -> float:
        return ctx.metrics.registry.get_sample_value("chatserver_chat3_retries_total") or 0.0

    async with listening(ctx):
        bob_ws = await bob.websocket()
        store = ctx.service.store
        assert isinstance(store, SQLiteStore)
        await store.write(cap_pages, store, True)
        big = message_event(dialog_id, alice.user_id, "needs new pages " * 600)
        behind = message_event(dialog_id, alice.user_id, "queued behind it")
        await broker.publish(big, behind)
        # Retried in place, then requeued, then redelivered and failing again: still not dead-lettered.
        await eventually(lambda: retries() >= IN_PLACE_RETRIES + 2, "the event to be requeued and fail again")
        await bob_ws.nothing_within(0.05)
        await store.write(cap_pages, store, False)

        got = await message_ids(bob_ws, 2, "message:new")
        assert got == [big["data"]["messageId"], behind["data"]["messageId"]]
        assert await loop.run_in_executor(None, broker.dead_letters_sync) == []
        assert chat3_count(ctx, "rejected") == 0
        assert chat3_count(ctx, "accepted") == 2


@pytest.mark.gen_test(timeout=30)
async def test_stopping_the_listener_acks_what_it_handled_and_hands_back_the_rest(
    ctx: AppContext, alice: Client, bob: Client, dialog_id: str, broker: Broker
) -> None:
    loop = asyncio.get_running_loop()
    events = [message_event(dialog_id, alice.user_id, f"event {n}") for n in range(40)]
    bob_ws = await bob.websocket()
    async with listening(ctx):
        await broker.publish(*events)
        first = await bob_ws.next_of("message:new")
    # Stopped in the middle: what it handled was acked, the rest went back to the queue.
    handled = chat3_count(ctx, "accepted")
    assert handled + await loop.run_in_executor(None, broker.ready_count_sync) == len(events)
    async with listening(ctx):
        got = [first["data"]["messageId"], *await message_ids(bob_ws, len(events) - 1, "message:new")]
        assert got == [e["data"]["messageId"] for e in events]
        await bob_ws.nothing_within(0.2)
    assert chat3_count(ctx, "duplicate") == 0


def rabbitmqctl(command: str) -> None:
    subprocess.run(["rabbitmqctl", command], check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize("with_cluster", [True])
@pytest.mark.gen_test(timeout=60)
async def test_listener_reconnects_after_the_broker_restarts_and_loses_nothing(
    ctx: AppContext, alice: Client, bob: Client, dialog_id: str, broker: Broker
) -> None:
    require_service("rabbitmqctl", shutil.which("rabbitmqctl") is not None)
    loop = asyncio.get_running_loop()
    async with listening(ctx) as amqp:
        bob_ws = await bob.websocket()
        before = message_event(dialog_id, alice.user_id, "before the restart")
        await broker.publish(before)
        assert (await bob_ws.next_of("message:new"))["data"] == before["data"]

        during = [message_event(dialog_id, alice.user_id, f"after start_app {n}") for n in range(3)]
        assert amqp.bus is not None
        links = (amqp.listener, amqp.bus)
        await eventually(lambda: amqp.bus is not None and amqp.bus.problem() == "", "the cluster bus to consume")
        restored = False
        try:
            await loop.run_in_executor(None, rabbitmqctl, "stop_app")
            await eventually(lambda: all(link.problem().startswith("disconnected") for link in links), "the cut")
            status, ready = await alice.call("GET", "/readyz")
            assert status == 503 and {"broker", "cluster"} <= set(ready["data"]), ready
            assert ctx.metrics.registry.get_sample_value("chatserver_chat3_connected") == 0
            # The broker is away; REST and WebSocket are not (the hints for other processes are dropped, counted).
            sent = await alice.post_message(dialog_id, "while the broker is down")
            assert (await bob_ws.next_of("message:new"))["data"] == sent
            dropped = {"outcome": "dropped"}
            assert ctx.metrics.registry.get_sample_value("chatserver_cluster_events_total", dropped) >= 1
            await loop.run_in_executor(None, rabbitmqctl, "start_app")
            restored = True
        finally:
            if not restored:
                rabbitmqctl("start_app")
        await broker.publish(*during)

        # The cluster link was down: hints from the other processes were lost, never the events, which the log
        # holds. This process's clients get every event, in order, and no reset.
        got = [await bob_ws.next_of("message:new", "reset", timeout=15) for _ in during]
        assert [e["type"] for e in got] == ["message:new"] * len(during)
        assert [e["data"]["messageId"] for e in got] == [e["data"]["messageId"] for e in during]
        await eventually(lambda: all(link.problem() == "" for link in links), "both links to consume again")
        status, _ = await alice.call("GET", "/readyz")
        assert status == 200
        await bob_ws.nothing_within(0.3)


# -- without a broker ------------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_no_amqp_url_means_no_listener_and_nothing_to_wait_for(tmp_path: Path) -> None:
    ctx = await build_context(load_config({"state_dir": str(tmp_path)}, {}))
    try:
        assert start_amqp(ctx.service, ctx.peers, ctx.config, Metrics(), ctx.readiness) is None
        assert set(ctx.readiness) == {"log"}
    finally:
        await close_context(ctx)


@pytest.mark.gen_test
async def test_cluster_mode_without_a_broker_is_a_config_error(tmp_path: Path) -> None:
    ctx = await build_context(load_config({"state_dir": str(tmp_path), "cluster_exchange": "cluster"}, {}))
    try:
        with pytest.raises(ConfigError, match="cluster_exchange"):
            start_amqp(ctx.service, ctx.peers, ctx.config, Metrics(), ctx.readiness)
    finally:
        await close_context(ctx)


@pytest.mark.gen_test
@pytest.mark.parametrize("url", ["not a url", "http://127.0.0.1/", "amqp://guest:secret@127.0.0.1:port/"])
async def test_an_unusable_amqp_url_is_a_config_error_that_does_not_show_the_password(tmp_path: Path, url: str) -> None:
    ctx = await build_context(load_config({"state_dir": str(tmp_path), "amqp_url": url}, {}))
    try:
        with pytest.raises(ConfigError, match="amqp_url") as raised:
            start_amqp(ctx.service, ctx.peers, ctx.config, Metrics(), ctx.readiness)
        assert "secret" not in str(raised.value)
        assert set(ctx.readiness) == {"log"}
    finally:
        await close_context(ctx)


# -- cluster mode: two real server processes -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def server_processes(ctx: AppContext, broker: Broker, count: int) -> AsyncIterator[list[str]]:
    """`count` real `python run.py` processes on one database and one broker, in cluster mode."""
    inherited = ("CHATSERVER_", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_", "JOURNAL_STREAM")
    env = dict(
        {k: v for k, v in os.environ.items() if not k.startswith(inherited)},
        CHATSERVER_STATE_DIR=str(ctx.config.state_path),
        CHATSERVER_AMQP_URL=AMQP_URL,
        CHATSERVER_CHAT3_EXCHANGE=broker.exchange,
        CHATSERVER_CHAT3_QUEUE=broker.queue,
        CHATSERVER_CHAT3_DEAD_LETTER_EXCHANGE=broker.dead_letter_exchange,
        CHATSERVER_CLUSTER_EXCHANGE=broker.cluster_exchange,
        CHATSERVER_LOG_LEVEL="warning",
    )
    ports = [free_port() for _ in range(count)]
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "run.py", "--port", str(port), "--db", ctx.config.database, cwd=ROOT, env=env
        )
        for port in ports
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    probe = Client(urls[0], ctx, "usr_probe")
    loop = asyncio.get_running_loop()
    try:
        for url, process in zip(urls, processes, strict=True):
            probe.base_url = url
            deadline = loop.time() + 20
            while True:
                assert process.returncode is None, f"the server at {url} exited with {process.returncode}"
                with contextlib.suppress(OSError):
                    status, _ = await probe.call("GET", "/readyz", timeout=2)
                    if status == 200:
                        break
                assert loop.time() < deadline, f"the server at {url} did not get ready"
                await asyncio.sleep(0.1)
        yield urls
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            code = await asyncio.wait_for(process.wait(), 15)
            assert code == 0, f"a server exited with {code} on SIGTERM"
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await asyncio.wait_for(process.wait(), 5)


@pytest.mark.gen_test(timeout=60)
async def test_two_processes_deliver_each_others_events_once(
    ctx: AppContext, seed: dict[str, Any], dialog_id: str, broker: Broker
) -> None:
    alice_id, bob_id = seed["alice"].user_id, seed["bob"].user_id
    async with server_processes(ctx, broker, 2) as (url_a, url_b):
        alice_a, bob_a = Client(url_a, ctx, alice_id), Client(url_a, ctx, bob_id)
        alice_b, bob_b = Client(url_b, ctx, alice_id), Client(url_b, ctx, bob_id)
        sockets = [
            await alice_a.websocket(),
            await bob_a.websocket(),
            await alice_b.websocket(),
            await bob_b.websocket(),
        ]
        try:
            # A POST to A reaches B's clients within a second, once; and A's own, once.
            sent = await alice_a.post_message(dialog_id, "posted to A")
            for sock in sockets:
                got = await sock.next_of("message:new", timeout=1.0)
                assert got["data"] == sent
            # And the other way round.
            sent = await bob_b.post_message(dialog_id, "posted to B")
            for sock in sockets:
                assert (await sock.next_of("message:new", timeout=1.0))["data"] == sent
            # A Chat3 event is consumed by one of the two (they compete for the queue), stored once, and reaches
            # the other's clients through the log.
            event = message_event(dialog_id, alice_id, "from Chat3 to the cluster")
            await broker.publish(event, event)
            for sock in sockets:
                assert (await sock.next_of("message:new"))["data"] == event["data"]
            # Typing crosses too (to a client that joined the dialog), and read marks reach the reader elsewhere.
            sockets[0].send({"type": "dialog:join", "dialogId": dialog_id})
            await sockets[0].next_of("dialog:joined")
            status, _ = await bob_b.call("POST", f"/api/dialogs/{dialog_id}/typing", {"typing": True})
            assert status == 204
            typing = await sockets[0].next_of("typing:start")
            assert typing["data"] == {"dialogId": dialog_id, "userId": bob_id}
            status, _ = await bob_a.call("POST", f"/api/dialogs/{dialog_id}/read", {"messageId": sent["messageId"]})
            assert status == 200
            for sock in (sockets[1], sockets[3]):
                read = await sock.next_of("dialog:update")
                assert read["data"]["dialogId"] == dialog_id and read["data"]["unreadCount"] == 1
            for sock in sockets:
                await sock.nothing_within(0.3)
        finally:
            for sock in sockets:
                sock.close()
