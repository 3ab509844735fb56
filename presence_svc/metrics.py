"""Prometheus metrics of one node, served at `GET /metrics`.

Counts the node already keeps (sockets, studies, leases, reconnects, ...) are read when
Prometheus scrapes, so the hot paths pay nothing for them; only heartbeats, deliveries, the
delivery latency, the sweep and signals are recorded as they happen.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from presence_svc.codec import Outgoing
from presence_svc.signals import Outcome

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Reading = Callable[[], float]


class _Readings(Collector):
    """Gauges and counters whose values the node keeps anyway, read at scrape time."""

    def __init__(self) -> None:
        self.gauges: list[tuple[str, str, Reading]] = []
        self.counters: list[tuple[str, str, Reading]] = []

    def collect(self) -> Iterator[Metric]:
        for name, documentation, read in self.gauges:
            yield GaugeMetricFamily(name, documentation, value=read())
        for name, documentation, read in self.counters:
            yield CounterMetricFamily(name, documentation, value=read())


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_LE = (*(repr(bound) for bound in LATENCY_BUCKETS), "+Inf")  # as prometheus_client writes them


class _Deliveries(Collector):
    """Events handed to sockets and their delivery latency, as plain counts read at scrape
    time: recorded once per received event, where prometheus_client's Counter.inc and
    Histogram.observe (locks, label checks) cost about 8 us of a node's CPU per event
    (docs/performance.md, "Receive path"). Exposed exactly as that Counter and Histogram were.
    """

    def __init__(self) -> None:
        self.created = time.time()
        self.events = 0
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, the last one +Inf
        self.latency_sum = 0.0

    def collect(self) -> Iterator[Metric]:
        delivered = CounterMetricFamily(
            "presence_events_delivered",
            "Events handed to local WebSockets (one per event and socket).",
        )
        delivered.add_metric([], self.events, created=self.created)
        yield delivered
        cumulative, buckets = 0, []
        for le, count in zip(_LE, self.latency, strict=True):
            cumulative += count
            buckets.append((le, cumulative))
        name = "presence_event_delivery_latency_seconds"
        latency = HistogramMetricFamily(
            name, "From an event's publication to its hand-over to this node's sockets."
        )
        latency.add_metric([], buckets, self.latency_sum)
        latency.samples.append(Sample(f"{name}_created", {}, self.created))
        yield latency


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._readings = _Readings()
        self.registry.register(self._readings)
        self.heartbeats = Counter(
            "presence_heartbeats",
            "Heartbeats received, by transport (rest, websocket) and outcome.",
            ["transport", "outcome"],
            registry=self.registry,
        )
        self.deliveries = _Deliveries()
        self.registry.register(self.deliveries)
        self.sweep_duration = Histogram(
            "presence_sweep_duration_seconds",
            "Wall time of one sweep tick.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.sweep_transitions = Counter(
            "presence_sweep_transitions",
            "Idle, away and leave transitions applied by this node's sweeps.",
            registry=self.registry,
        )
        self.protocol_closes = Counter(
            "presence_ws_protocol_closes",
            "WebSocket connections closed by the protocol layer, by reason (outgoing_buffer, "
            "invalid_utf8, bad_handshake).",
            ["reason"],
            registry=self.registry,
        )
        self.signals = Counter(
            "presence_signals",
            "Signals received from WebSockets, by outcome (sent, held, superseded, dropped, "
            "too_large, invalid).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in Outcome:
            # Every outcome from the start, so a rate over it is 0 rather than no data.
            self.signals.labels(outcome.value)

    def gauge(self, name: str, documentation: str, read: Reading) -> None:
        self._readings.gauges.append((name, documentation, read))

    def counter(self, name: str, documentation: str, read: Reading) -> None:
        """A counter the node keeps itself; `name` without the `_total` suffix."""
        self._readings.counters.append((name, documentation, read))

    def delivered(self, event: Outgoing, sockets: int) -> None:
        """Called once per event and node (not per socket)."""
        deliveries = self.deliveries
        deliveries.events += sockets
        if event.published_ms is not None:
            seconds = time.time() - event.published_ms / 1000
            if seconds < 0:
                seconds = 0.0
            # The first bucket whose bound is >= seconds: Prometheus' `le`.
            deliveries.latency[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            deliveries.latency_sum += seconds

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data
