"""The server's Prometheus metrics, in a registry of its own (never the global one).

One `Metrics` object is built at start and passed to whoever counts; tests build their own, so two servers in
one process never share counters. `/metrics` renders `registry`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "chatserver_connections", "Open real-time connections", ["transport"], registry=r
        )
        self.polls_waiting = Gauge("chatserver_polls_waiting", "Long-poll requests parked now", registry=r)
        self.events_published = Counter(
            "chatserver_events_published", "Events published to the broadcaster", registry=r
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
        for reason in ("restarted", "expired"):
            self.resets.labels(reason)
        for outcome in ("accepted", "duplicate", "rejected"):
            self.chat3_events.labels(outcome)
        for outcome in ("sent", "received", "dropped", "invalid"):
            self.cluster_events.labels(outcome)
