"""The server's Prometheus metrics, in a registry of its own (never the global one).

One `Metrics` object is built at start and passed to whoever counts; tests build their own, so two servers in
one process never share counters. `/metrics` renders `registry`. What the broadcaster already counts (events
published, duplicates dropped, history) is read from it at each scrape (`observe_broadcaster`), not counted twice.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chatserver.broadcaster import Broadcaster


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "chatserver_connections", "Open real-time connections", ["transport"], registry=r
        )
        self.polls_waiting = Gauge("chatserver_polls_waiting", "Long-poll requests parked now", registry=r)
        # Parked polls, counted by the poll paths as a plain number (a poll parks and unparks once per event it
        # waits for: two locked gauge updates each time were a few percent of a poll), read at each scrape.
        self.parked_polls = 0
        self.polls_waiting.set_function(lambda: self.parked_polls)
        # Set to a function of the open requests where the server is assembled (handlers.app.build_context).
        self.requests_in_flight = Gauge(
            "chatserver_requests_in_flight", "HTTP requests being handled now (parked polls included)", registry=r
        )
        self.events_delivered = Counter(
            "chatserver_events_delivered", "Events handed to a connection", ["transport"], registry=r
        )
        self.resets = Counter("chatserver_resets", "Resets sent to resuming clients", ["reason"], registry=r)
        self.slow_clients_closed = Counter(
            "chatserver_slow_clients_closed", "Connections cut off for not reading their events", registry=r
        )
        self.chat3_events = Counter(
            "chatserver_chat3_events", "Chat3 events by outcome", ["outcome"], registry=r
        )
        self.chat3_connected = Gauge(
            "chatserver_chat3_connected", "1 while the Chat3 listener is consuming", registry=r
        )
        self.chat3_retries = Counter(
            "chatserver_chat3_retries", "Chat3 deliveries retried or requeued because the store failed", registry=r
        )
        self.cluster_events = Counter(
            "chatserver_cluster_events", "Events relayed between server processes by outcome", ["outcome"],
            registry=r,
        )
        self.request_latency = Histogram(
            "chatserver_request_seconds", "HTTP request latency", ["method", "handler"], registry=r
        )
        for transport in ("websocket", "longpoll", "sse"):
            self.connections.labels(transport)
            self.events_delivered.labels(transport)
        self.connections.labels("longpoll").set_function(lambda: self.parked_polls)  # a parked poll is one
        for reason in ("restarted", "expired"):
            self.resets.labels(reason)
        for outcome in ("accepted", "duplicate", "rejected"):
            self.chat3_events.labels(outcome)
        for outcome in ("sent", "received", "dropped", "invalid"):
            self.cluster_events.labels(outcome)

    def observe_broadcaster(self, broadcaster: Broadcaster) -> None:
        """Export the broadcaster's own counts (`chatserver_events_published_total` and the rest)."""
        self.registry.register(_BroadcasterCollector(broadcaster))


class _BroadcasterCollector(Collector):
    """Reads the broadcaster's counters and sizes at scrape time: the domain counts once, in one place."""

    def __init__(self, broadcaster: Broadcaster) -> None:
        self._broadcaster = broadcaster

    def collect(self) -> Iterator[Metric]:
        b = self._broadcaster
        yield CounterMetricFamily(
            "chatserver_events_published", "Events published to the broadcaster (logged, with a cursor)",
            value=b.published,
        )
        yield CounterMetricFamily(
            "chatserver_events_duplicates_dropped", "Events dropped as already published (same messageId)",
            value=b.duplicates_dropped,
        )
        yield GaugeMetricFamily("chatserver_history_events", "Events held for resume", value=b.history_length)
        yield GaugeMetricFamily("chatserver_history_bytes", "Bytes of events held for resume", value=b.history_bytes)
