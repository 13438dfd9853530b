"""Chat3 outbound (PROTOCOL section 14) on the real broker: what users write here reaches Chat3, from the log.

Chat3 is played by a durable queue bound to the outbound exchange, read with a blocking pika client. The server
publishes every message created or edited through it (persistent, with publisher confirms, routing key the event
name) and never one that came from Chat3; a broker that is away, or a server killed with SIGKILL between its
commit and the broker's confirm, loses nothing: every message is published once, or again with the same
`messageId`.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from chatserver import jsonutil
from tests.conftest import Client, require_service
from tests.test_chat3 import AMQP_URL, Broker, broker_reachable, listening, message_event
from tests.test_cluster import cluster
from tests.test_realtime import eventually


class Chat3Side:
    """Chat3's end of the outbound exchange: a durable queue bound to it, read as Chat3 would."""

    def __init__(self, broker: Broker) -> None:
        self.exchange = f"test.chat3.out.{broker.tag}"
        self.queue = f"test.chat3.inbox.{broker.tag}"

    def _run(self, work: Callable[[Any], Any]) -> Any:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            return work(connection.channel())
        finally:
            connection.close()

    def bind(self) -> None:
        """Chat3's queue, bound before the server publishes (the exchange as the server declares it)."""

        def work(channel: Any) -> None:
            channel.exchange_declare(self.exchange, "topic", durable=True)
            channel.queue_declare(self.queue, durable=True)
            channel.queue_bind(self.queue, self.exchange, "message.*")

        self._run(work)

    def take_sync(self) -> list[tuple[str, dict[str, Any], Any]]:
        def work(channel: Any) -> list[tuple[str, dict[str, Any], Any]]:
            got = []
            while True:
                method, properties, body = channel.basic_get(self.queue, auto_ack=True)
                if method is None:
                    return got
                got.append((method.routing_key, jsonutil.loads(body), properties))

        return self._run(work)  # type: ignore[no-any-return]

    async def take(self) -> list[tuple[str, dict[str, Any], Any]]:
        return await asyncio.get_running_loop().run_in_executor(None, self.take_sync)

    async def collect_until(self, done: Callable[[list[tuple[str, dict[str, Any], Any]]], bool],
                            seconds: float = 20) -> list[tuple[str, dict[str, Any], Any]]:
        got: list[tuple[str, dict[str, Any], Any]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not done(got):
            assert loop.time() < deadline, f"Chat3 did not get what was expected in time: {got!r}"
            got += await self.take()
            await asyncio.sleep(0.05)
        return got


    def delete(self) -> None:
        def work(channel: Any) -> None:
            channel.queue_delete(self.queue)
            channel.exchange_delete(self.exchange)

        self._run(work)


@pytest.fixture
def broker() -> Iterator[Broker]:
    require_service("RabbitMQ at 127.0.0.1:5672", broker_reachable())
    names = Broker()
    yield names
    names.delete()


@pytest.fixture
def chat3(broker: Broker) -> Iterator[Chat3Side]:
    side = Chat3Side(broker)
    side.bind()
    yield side
    side.delete()


@pytest.fixture
def settings(broker: Broker, chat3: Chat3Side) -> dict[str, Any]:
    return {
        "amqp_url": AMQP_URL,
        "chat3_exchange": broker.exchange,
        "chat3_queue": broker.queue,
        "chat3_outbound_exchange": chat3.exchange,
    }


def ids(got: list[tuple[str, dict[str, Any], Any]], event: str = "message.created") -> list[str]:
    return [body["data"]["messageId"] for key, body, _ in got if key == event]


@pytest.mark.gen_test(timeout=60)
async def test_messages_written_here_reach_chat3_once_and_what_chat3_sent_never_goes_back(
    ctx: Any, alice: Client, bob: Client, dialog_id: str, broker: Broker, chat3: Chat3Side
) -> None:
    async with listening(ctx):
        sent = [await alice.post_message(dialog_id, f"to chat3 {i}") for i in range(3)]
        status, edited = await alice.call("PATCH", f"/api/messages/{sent[0]['messageId']}", {"content": "edited"})
        assert status == 200
        bob_ws = await bob.websocket()
        from_chat3 = message_event(dialog_id, bob.user_id, "from chat3")
        await broker.publish(from_chat3)
        # Chat3's message is stored (and would be published by now if it were to be).
        assert (await bob_ws.next_of("message:new"))["data"] == from_chat3["data"]
        got = await chat3.collect_until(lambda g: len(ids(g)) >= 3 and ids(g, "message.updated"))
        await asyncio.sleep(1.5)
        got += await chat3.take()
    assert ids(got) == [m["messageId"] for m in sent]  # in order, each once
    (update,) = [body for key, body, _ in got if key == "message.updated"]
    assert update == {"event": "message.updated", "data": edited["data"]}
    created = [body for key, body, _ in got if key == "message.created"]
    assert created[0] == {"event": "message.created", "data": sent[0]}
    assert from_chat3["data"]["messageId"] not in ids(got)
    for _, _, properties in got:
        assert properties.delivery_mode == 2 and properties.content_type == "application/json"
        assert properties.message_id.startswith("msg_")
    samples = ctx.metrics.registry.get_sample_value
    assert samples("chatserver_chat3_outbound_published_total") == 4
    await eventually(lambda: samples("chatserver_chat3_outbound_pending") == 0)


@pytest.mark.gen_test(timeout=90)
async def test_a_broker_away_for_a_while_delays_outbound_and_loses_nothing(
    ctx: Any, alice: Client, dialog_id: str, chat3: Chat3Side
) -> None:
    require_service("rabbitmqctl", shutil.which("rabbitmqctl") is not None)
    loop = asyncio.get_running_loop()
    async with listening(ctx):
        first = await alice.post_message(dialog_id, "before the broker stops")
        await chat3.collect_until(lambda g: ids(g) == [first["messageId"]])
        restored = False
        try:
            await loop.run_in_executor(None, _rabbitmqctl, "stop_app")
            during = [await alice.post_message(dialog_id, f"while the broker is away {i}") for i in range(3)]
            await loop.run_in_executor(None, _rabbitmqctl, "start_app")
            restored = True
        finally:
            if not restored:
                _rabbitmqctl("start_app")
        got = await chat3.collect_until(lambda g: set(ids(g)) >= {m["messageId"] for m in during}, 40)
        await asyncio.sleep(1)
        got += await chat3.take()
    assert sorted(ids(got)) == sorted(m["messageId"] for m in during)  # each once: none was confirmed before


def _rabbitmqctl(command: str) -> None:
    subprocess.run(["rabbitmqctl", command], check=True, capture_output=True, timeout=60)


@pytest.mark.gen_test(timeout=120)
async def test_a_server_killed_between_commit_and_confirm_publishes_on_restart_with_the_same_ids(
    tmp_path: Path, broker: Broker, chat3: Chat3Side
) -> None:
    env = {"CHATSERVER_AMQP_URL": AMQP_URL, "CHATSERVER_CHAT3_EXCHANGE": broker.exchange,
           "CHATSERVER_CHAT3_QUEUE": broker.queue, "CHATSERVER_CHAT3_OUTBOUND_EXCHANGE": chat3.exchange}
    async with cluster(tmp_path, "postgres") as group:
        server = await group.start(env=env)
        alice = group.client(server, "alice")
        first = await alice.post_message(group.dialog_id, "published before the kill")
        await chat3.collect_until(lambda g: ids(g) == [first["messageId"]])
        # A burst, and the process killed in the middle of it: what was acknowledged (201) was committed, and
        # some of it was published and not yet confirmed, or not published at all.
        acknowledged: list[str] = []

        async def burst() -> None:
            for i in range(300):
                try:
                    status, body = await alice.call("POST", f"/api/messages/dialog/{group.dialog_id}",
                                                    {"content": f"burst {i}", "clientMessageId": f"k{i}"})
                except Exception:
                    return
                if status != 201:
                    return
                acknowledged.append(body["data"]["messageId"])

        task = asyncio.ensure_future(burst())
        await eventually(lambda: len(acknowledged) >= 30, 20)
        server.signal(signal.SIGKILL)
        await task
        await server.proc.wait()
        restarted = await group.start(env=env, index=0)
        assert restarted.url
        got = await chat3.collect_until(lambda g: set(ids(g)) >= set(acknowledged), 40)
        await asyncio.sleep(1.5)
        got += await chat3.take()
    published = ids(got)
    assert set(acknowledged) <= set(published)
    # More than once only ever with the same messageId: every body of an id is the same message.
    bodies: dict[str, dict[str, Any]] = {}
    for key, body, _ in got:
        assert key == "message.created"
        assert bodies.setdefault(body["data"]["messageId"], body) == body
    assert first["messageId"] not in published  # confirmed before the kill: never again


@pytest.mark.gen_test
async def test_outbound_without_a_broker_is_a_config_error(tmp_path: Path) -> None:
    from chatserver.chat3 import start_amqp
    from chatserver.config import ConfigError, load_config
    from chatserver.metrics import Metrics
    from run import build_context, close_context

    ctx = await build_context(load_config({"state_dir": str(tmp_path), "chat3_outbound_exchange": "out"}, {}))
    try:
        with pytest.raises(ConfigError, match="chat3_outbound_exchange"):
            start_amqp(ctx.service, ctx.peers, ctx.config, Metrics(), ctx.readiness)
    finally:
        await close_context(ctx)

