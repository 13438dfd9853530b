"""Operations (PROTOCOL section 7) over real sockets: /healthz, /readyz, /metrics counting what happened, and
the logs a real server process writes (one line per record, journald priorities, never a token).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.websocket
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from chatserver import systemd
from chatserver.metrics import LoopCounter, LoopHistogram
from run import log_formatter
from tests.conftest import Client
from tests.process import ServerProcess

TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")
JOURNAL_LINE = re.compile(r"^<[0-7]>\S+: ")


@pytest.fixture
def settings() -> dict[str, Any]:
    # Small enough that a replay of three messages overflows a connection's buffer (a slow client), large
    # enough for any single frame.
    return {"client_buffer_limit": 500}


class Samples:
    """The samples of one /metrics exposition, by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self._values[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        assert key in self._values, f"{name}{labels} is not in /metrics:\n{self.text}"
        return self._values[key]


async def scrape(client: Client) -> Samples:
    response = await client.http.fetch(client.base_url + "/metrics", request_timeout=5)
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return Samples(response.body.decode())


async def scrape_until(client: Client, name: str, value: float, **labels: str) -> Samples:
    async def look() -> Samples:
        while True:  # the poll is parked by another request: look until the server shows it
            samples = await scrape(client)
            if samples(name, **labels) == value:
                return samples
            await asyncio.sleep(0.02)

    return await asyncio.wait_for(look(), 5)


@pytest.mark.gen_test
async def test_healthz_answers_while_the_loop_runs(alice: Client) -> None:
    status, body = await alice.call("GET", "/healthz", token="")
    assert status == 200
    assert body == {"success": True, "data": {"status": "ok"}}


@pytest.mark.gen_test
async def test_readyz_is_200_with_a_usable_store_and_503_naming_it_when_closed(alice: Client) -> None:
    status, body = await alice.call("GET", "/readyz", token="")
    assert (status, body) == (200, {"success": True, "data": {"status": "ready"}})

    await alice.ctx.service.store.close()
    status, body = await alice.call("GET", "/readyz", token="")
    assert status == 503
    assert body["success"] is False
    assert "store" in body["data"]
    assert body["error"].startswith("not ready: store: not usable")


@pytest.mark.gen_test
async def test_readyz_is_503_while_shutting_down(alice: Client) -> None:
    alice.ctx.shutting_down = True
    status, body = await alice.call("GET", "/readyz", token="")
    assert status == 503
    assert body["data"] == {"server": "shutting down"}


@pytest.mark.gen_test
async def test_an_upgrade_refused_while_shutting_down_is_a_json_503_without_a_traceback(
    alice: Client, caplog: pytest.LogCaptureFixture
) -> None:
    # A planned refusal, not a failure of the server: its access line says 503, and nothing logs a traceback.
    alice.ctx.shutting_down = True
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await tornado.websocket.websocket_connect(f"{alice.ws_url}/ws?token={alice.token}")
    assert refused.value.code == 503
    assert refused.value.response is not None and refused.value.response.body.startswith(b'{"success":false')
    assert not [record for record in caplog.records if record.exc_info], caplog.text


@pytest.mark.gen_test
async def test_metrics_count_the_store_writers_transactions_and_writes(alice: Client, dialog_id: str) -> None:
    before = await scrape(alice)
    for n in range(3):  # one after another: each write finds the writer idle and commits alone
        await alice.post_message(dialog_id, f"m{n}")
    after = await scrape(alice)

    assert after("chatserver_store_writes_total") - before("chatserver_store_writes_total") == 3
    assert after("chatserver_store_commits_total") - before("chatserver_store_commits_total") == 3
    assert before("chatserver_store_writes_total") >= 4  # the seed: three users and a dialog


@pytest.mark.gen_test
async def test_metrics_count_connections_polls_events_resets_and_slow_clients(
    alice: Client, bob: Client, dialog_id: str
) -> None:
    before = await scrape(alice)
    published = before("chatserver_events_published_total")  # the seed's dialog
    assert published == 1
    assert before("chatserver_connections", transport="websocket") == 0

    alice_ws = await alice.websocket()
    _, hello = await bob.poll()
    parked = asyncio.ensure_future(bob.poll(hello["data"]["cursor"], timeout="20"))
    waiting = await scrape_until(alice, "chatserver_polls_waiting", 1)
    assert waiting("chatserver_connections", transport="websocket") == 1
    assert waiting("chatserver_connections", transport="longpoll") == 1  # the parked poll
    ws_delivered = waiting("chatserver_events_delivered_total", transport="websocket")
    assert ws_delivered == 0  # a ready frame is not an event

    sent = await alice.post_message(dialog_id, "counted")
    assert (await alice_ws.next_of("message:new"))["data"]["messageId"] == sent["messageId"]
    status, answer = await asyncio.wait_for(parked, 5)
    assert status == 200
    assert [e["data"]["messageId"] for e in answer["data"]["events"]] == [sent["messageId"]]
    # The same message again (a client retry) is stored once and published once.
    await alice.post_message(dialog_id, "counted twice", clientMessageId="retry-1")
    await alice.post_message(dialog_id, "counted twice", clientMessageId="retry-1")

    # A cursor of another log (a database restored from a backup) gets a reset, on any transport.
    restarted_ws = await bob.websocket(cursor="abcdef.1")
    assert (await restarted_ws.next_of("reset"))["data"]["reason"] == "restarted"
    _, polled = await bob.poll("abcdef.1")
    assert polled["data"]["events"][0]["type"] == "reset"

    # A client that resumes behind more than its buffer holds is served as fast as it reads, never cut off as
    # slow (the cut-off of a reader that stalls is counted in tests/test_realtime.py).
    resumed = await bob.websocket(cursor=hello["data"]["cursor"])
    assert (await resumed.next_of("message:new"))["data"]["messageId"] == sent["messageId"]
    assert (await resumed.next_of("message:new"))["data"]["content"] == "counted twice"

    # alice's, the restarted one's and the resumed one's.
    after = await scrape_until(alice, "chatserver_connections", 3, transport="websocket")
    assert after("chatserver_events_published_total") == published + 2
    assert after("chatserver_events_delivered_total", transport="websocket") >= ws_delivered + 1
    assert after("chatserver_events_delivered_total", transport="longpoll") == 2  # the message, then the reset
    assert after("chatserver_polls_waiting") == 0
    assert after("chatserver_connections", transport="longpoll") == 0
    assert after("chatserver_resets_total", reason="restarted") == 2
    assert after("chatserver_resets_total", reason="expired") == 0
    assert after("chatserver_slow_clients_closed_total") == 0
    for outcome in ("accepted", "duplicate", "rejected"):
        assert after("chatserver_chat3_events_total", outcome=outcome) == 0
    assert after("chatserver_chat3_connected") == 0
    assert after("chatserver_request_seconds_count", method="POST", handler="DialogMessagesHandler") == 3
    assert after("chatserver_request_seconds_count", method="GET", handler="PollHandler") == 3


# -- logs of a real process ---------------------------------------------------------------------------------


async def use_every_transport_with_token_in_url(server: ServerProcess, token: str) -> None:
    """A WebSocket, an SSE stream and polls, each carrying `?token=` (accepted or refused) in its URL."""
    ws = await tornado.websocket.websocket_connect(f"{server.url.replace('http', 'ws')}/ws?token={token}")
    assert await asyncio.wait_for(ws.read_message(), 5) is not None
    ws.close()
    with pytest.raises(tornado.httpclient.HTTPClientError, match="401"):
        await tornado.websocket.websocket_connect(f"{server.url.replace('http', 'ws')}/ws?token={token}x")
    status, _ = await server.call("GET", f"/api/poll?token={token}")
    assert status == 401  # long-poll takes the header only: refused, and still logged without the token
    status, _ = await server.call("GET", f"/api/poll?cursor=&token={token}", token=token)
    assert status == 200
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(f"GET /api/events?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await asyncio.wait_for(reader.readuntil(b'"type":"ready"'), 5)
    writer.close()


@pytest.mark.gen_test(timeout=30)
async def test_log_has_one_timestamped_line_per_record_and_never_a_token(tmp_path: Path) -> None:
    async with await ServerProcess.start(tmp_path, "--demo") as server:
        token = await server.login()
        await use_every_transport_with_token_in_url(server, token)
        server.signal(signal.SIGTERM)
        assert await server.exit_code(15) == 0
    assert token not in server.stderr
    assert token[:12] not in server.stderr
    for path in ("/ws?token=[redacted]", "/api/poll?token=[redacted]", "/api/events?token=[redacted]"):
        assert path in server.stderr, server.stderr
    assert all(TIMESTAMPED.match(line) for line in server.lines), server.stderr


@pytest.mark.gen_test(timeout=30)
async def test_log_under_journald_has_priorities_and_no_timestamps(tmp_path: Path) -> None:
    async with await ServerProcess.start(tmp_path, "--demo", journal=True) as server:
        token = await server.login()
        await use_every_transport_with_token_in_url(server, token)
        server.signal(signal.SIGTERM)
        assert await server.exit_code(15) == 0
    assert token not in server.stderr
    assert all(JOURNAL_LINE.match(line) for line in server.lines), server.stderr
    assert not any(TIMESTAMPED.match(line[3:]) or re.search(r"\d\d:\d\d:\d\d", line) for line in server.lines)
    assert any(line.startswith("<6>chatserver: listening on ") for line in server.lines)
    assert any(line.startswith("<4>chatserver.access: 401 GET /api/poll?token=[redacted]") for line in server.lines)


def test_a_record_with_newlines_and_a_traceback_is_one_line() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = logging.LogRecord(
            "chatserver.http",
            logging.ERROR,
            __file__,
            1,
            "failed on GET /ws?token=%s\nsecond line",
            ("s3cr3t",),
            sys.exc_info(),
        )
    journal = log_formatter(journal=True).format(record)
    assert "\n" not in journal
    assert journal.startswith("<3>chatserver.http: failed on GET /ws?token=[redacted] | second line | Traceback")
    assert "ValueError: bad | value" in journal
    plain = log_formatter(journal=False).format(record)
    assert "\n" not in plain and "s3cr3t" not in plain
    assert TIMESTAMPED.match(plain)


def test_journald_is_recognised_only_on_the_stream_it_names() -> None:
    read_end, write_end = os.pipe()
    try:
        stat = os.fstat(write_end)
        named = {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
        assert systemd.is_journal_stream(named, write_end)
        assert not systemd.is_journal_stream(named, read_end + 1000)
        assert not systemd.is_journal_stream({"JOURNAL_STREAM": "1:1"}, write_end)
        assert not systemd.is_journal_stream({}, write_end)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_loop_counters_and_histograms_expose_what_prometheus_client_would() -> None:
    # The hot-path metrics are plain numbers of our own: their exposition must still be Prometheus' own shape
    # (a `_total` counter; cumulative `le` buckets, inclusive bounds, +Inf equal to the count, and the sum).
    registry = CollectorRegistry()
    counter = LoopCounter("t_events", "events", ["transport"], registry=registry)
    histogram = LoopHistogram("t_seconds", "latency", ["handler"], registry=registry, buckets=(0.1, 1.0))
    counter.labels("ws").inc()
    counter.labels("ws").inc(4)
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.labels("H").observe(value)
    with pytest.raises(ValueError):
        counter.labels("ws", "extra")

    samples = Samples(generate_latest(registry).decode())

    assert samples("t_events_total", transport="ws") == 5
    assert samples("t_seconds_bucket", handler="H", le="0.1") == 2
    assert samples("t_seconds_bucket", handler="H", le="1.0") == 3
    assert samples("t_seconds_bucket", handler="H", le="+Inf") == 4
    assert samples("t_seconds_count", handler="H") == 4
    assert samples("t_seconds_sum", handler="H") == pytest.approx(3.65)
