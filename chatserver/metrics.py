"""The server's Prometheus metrics, in a registry of its own (never the global one).

One `Metrics` object is built at start and passed to whoever counts; tests build their own, so two servers in
one process never share counters. `/metrics` renders `registry`. What the broadcaster already counts (events
published, the log position, history) is read from it at each scrape (`observe_broadcaster`), not counted twice.

The two metrics counted on every delivery and every request (`events_delivered`, `request_latency`) are
`LoopCounter` and `LoopHistogram`: plain numbers owned by the event loop's thread and read at each scrape.
prometheus_client's own take a lock and make three calls per count, on every delivery of a fan-out
(docs/benchmarks.md has what that cost).
"""

from __future__ import annotations

import bisect
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Generic, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString as _untyped_float_to_go_string

from chatserver.broadcaster import Broadcaster
from chatserver.receipts import Receipts
from chatserver.store import Store
from chatserver.throttle import Throttle

# Prometheus's own formatting of a bucket bound (`+Inf`, `0.5`), which its package leaves untyped.
_float_to_go_string = cast(Callable[[float], str], _untyped_float_to_go_string)


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
        # Set to a function of the open requests where the server is assembled (run.build_context).
        self.requests_in_flight = Gauge(
            "chatserver_requests_in_flight", "HTTP requests being handled now (parked polls included)", registry=r
        )
        self.events_delivered = LoopCounter(
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
        self.chat3_outbound_published = Counter(
            "chatserver_chat3_outbound_published", "Messages published to Chat3 and confirmed by the broker", registry=r
        )
        self.chat3_outbound_pending = Gauge(
            "chatserver_chat3_outbound_pending", "Messages of this server's log waiting to be published to Chat3",
            registry=r,
        )
        self.cluster_events = Counter(
            "chatserver_cluster_events", "Events relayed between server processes by outcome", ["outcome"],
            registry=r,
        )
        self.connections_open = Gauge(
            "chatserver_connections_open",
            "Client connections open now, of every kind (what max_connections bounds)", registry=r,
        )
        self.connections_refused = Counter(
            "chatserver_connections_refused",
            "Connections refused at max_connections (limit); accepting paused for want of a file descriptor "
            "(emfile) or for another failure of the listener (error)", ["reason"], registry=r,
        )
        self.request_latency = LoopHistogram(
            "chatserver_request_seconds", "HTTP request latency", ["method", "handler"], registry=r
        )
        for transport in ("websocket", "longpoll", "sse"):
            self.connections.labels(transport)
            self.events_delivered.labels(transport)
        self.connections.labels("longpoll").set_function(lambda: self.parked_polls)  # a parked poll is one
        for reason in ("restarted", "expired"):
            self.resets.labels(reason)
        for reason in ("limit", "emfile", "error"):
            self.connections_refused.labels(reason)
        for outcome in ("accepted", "duplicate", "rejected"):
            self.chat3_events.labels(outcome)
        for outcome in ("sent", "received", "dropped", "invalid"):
            self.cluster_events.labels(outcome)

        # Under a supervisor, what /metrics answers: every worker's metrics (chatserver/siblings.py).
        self.gather: Callable[[], Awaitable[bytes]] | None = None

    async def exposition(self) -> bytes:
        """What `/metrics` answers: this process's metrics, or under a supervisor every worker's, labelled."""
        if self.gather is not None:
            return await self.gather()
        return generate_latest(self.registry)

    def count_refused_connection(self, reason: str) -> None:
        """A connection refused, or accepting paused ("limit", "emfile", "error"): for the HTTP listener."""
        self.connections_refused.labels(reason).inc()

    def observe_broadcaster(self, broadcaster: Broadcaster) -> None:
        """Export the broadcaster's own counts (`chatserver_events_published_total` and the rest)."""
        b = broadcaster
        self.registry.register(_ValuesCollector([
            (CounterMetricFamily, "chatserver_events_published",
             "Events of the log published to this process's connections", lambda: b.published),
            (GaugeMetricFamily, "chatserver_log_position",
             "The last position of the event log published by this process", lambda: b.last_position),
            (GaugeMetricFamily, "chatserver_history_events", "Events held for resume", lambda: b.history_length),
            (GaugeMetricFamily, "chatserver_history_bytes", "Bytes of events held for resume",
             lambda: b.history_bytes),
        ]))

    def observe_store(self, store: Store) -> None:
        """Export the store writer's transactions and writes (`chatserver_store_commits_total`, `..._writes_total`)."""
        self.registry.register(_ValuesCollector([
            (CounterMetricFamily, "chatserver_store_commits",
             "Write transactions the store's writer began (each a group of writes)", lambda: store.commits),
            (CounterMetricFamily, "chatserver_store_writes", "Writes the store's writer ran in those transactions",
             lambda: store.writes),
        ]))

    def observe_forwarding(self, forwarded: Callable[[], float], for_siblings: Callable[[], float]) -> None:
        """Export the writes forwarded between workers (chatserver/forwarding.py)."""
        self.registry.register(_ValuesCollector([
            (CounterMetricFamily, "chatserver_forwarded_writes",
             "Writes of this worker's clients that a sibling worker committed", forwarded),
            (CounterMetricFamily, "chatserver_sibling_writes",
             "Writes this worker committed for its sibling workers", for_siblings),
        ]))

    def observe_throttle(self, throttle: Throttle) -> None:
        """Export the throttle's refusals as `chatserver_throttled_total{what}`."""
        self.registry.register(_ThrottleCollector(throttle))

    def observe_receipts(self, receipts: Receipts) -> None:
        """Export the receipts' counts (`chatserver_receipts_logged_total` and the rest)."""
        r = receipts
        self.registry.register(_ValuesCollector([
            (CounterMetricFamily, "chatserver_receipts_logged", "dialog:receipt events this process wrote to the log",
             lambda: r.logged),
            (GaugeMetricFamily, "chatserver_receipts_pending",
             "Acknowledgements and read marks waiting for the next write of receipts", lambda: r.pending),
            (CounterMetricFamily, "chatserver_receipts_dropped",
             "Acknowledgements dropped while too many users waited for a write", lambda: r.dropped),
        ]))


Value = tuple[type[CounterMetricFamily] | type[GaugeMetricFamily], str, str, Callable[[], float]]


class _ValuesCollector(Collector):
    """Plain numbers a domain object keeps, read at scrape time: the domain counts once, in one place."""

    def __init__(self, values: list[Value]) -> None:
        self._values = values

    def collect(self) -> Iterator[Metric]:
        for family, name, documentation, value in self._values:
            yield family(name, documentation, value=value())


class _ThrottleCollector(Collector):
    """Reads the refusals the throttle counts (chatserver.throttle.REFUSALS) at scrape time."""

    def __init__(self, throttle: Throttle) -> None:
        self._throttle = throttle

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "chatserver_throttled", "Requests refused by a limit (429), or typing events dropped", labels=["what"]
        )
        for what, count in list(self._throttle.refused.items()):
            family.add_metric([what], count)
        yield family


C = TypeVar("C")


class Count:
    """One label set's count of a `LoopCounter`."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class _LoopFamily(Collector, Generic[C]):
    """A labelled metric of the event loop's thread: a plain child object per label set, read at each scrape."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry,
                 child: Callable[[], C]) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, tuple(labelnames)
        self._child = child
        self._children: dict[tuple[str, ...], C] = {}
        registry.register(self)

    def labels(self, *values: str) -> C:
        """The child of these label values (look it up once and keep it where counting is frequent)."""
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}")
            child = self._children[values] = self._child()
        return child


class LoopCounter(_LoopFamily[Count]):
    """A labelled counter counted by the event loop's thread only: a plain int per label set."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        super().__init__(name, documentation, labelnames, registry, Count)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value)
        yield family


class Observations:
    """One label set's histogram of a `LoopHistogram`: a count per bucket and the sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self._bounds, value)] += 1  # Prometheus buckets: value <= bound
        self.sum += value


class LoopHistogram(_LoopFamily[Observations]):
    """A labelled histogram observed by the event loop's thread only, with Prometheus' default buckets."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry,
        buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS,
    ) -> None:
        bounds = tuple(float(b) for b in buckets)
        self._bounds = bounds if bounds[-1] == float("inf") else (*bounds, float("inf"))
        super().__init__(name, documentation, labelnames, registry, lambda: Observations(self._bounds))

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(self._bounds, list(child.counts), strict=True):
                cumulative += count
                buckets.append((_float_to_go_string(bound), cumulative))
            family.add_metric(values, buckets, child.sum)
        yield family


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def labelled_exposition(texts: Mapping[str, str | None]) -> bytes:
    """The expositions of several workers as one: each metric once, each sample labelled with its `worker`; and
    `chatserver_worker_scraped{worker}`, 1 for a worker that answered, 0 for one that did not (None)."""
    scraped = GaugeMetricFamily(
        "chatserver_worker_scraped", "1 where the worker's metrics are in this answer, 0 where it did not answer",
        labels=["worker"],
    )
    families: dict[str, Metric] = {}
    for worker, text in texts.items():
        scraped.add_metric([worker], 0 if text is None else 1)
        for family in text_string_to_metric_families(text or ""):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(
                Sample(s.name, {"worker": worker, **s.labels}, s.value, s.timestamp, s.exemplar) for s in family.samples
            )
    return generate_latest(_Families([scraped, *families.values()]))
