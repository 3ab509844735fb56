"""Prometheus metrics of one node, served at `GET /metrics`.

Counts the node already keeps (sockets, studies, leases, reconnects, ...) are read when
Prometheus scrapes, so the hot paths pay nothing for them; only heartbeats, deliveries, the
delivery latency, the sweep and signals are recorded as they happen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
        self.events_delivered = Counter(
            "presence_events_delivered",
            "Events handed to local WebSockets (one per event and socket).",
            registry=self.registry,
        )
        self.delivery_latency = Histogram(
            "presence_event_delivery_latency_seconds",
            "From an event's publication to its hand-over to this node's sockets.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
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
        if sockets:
            self.events_delivered.inc(sockets)
        if event.published_ms is not None:
            self.delivery_latency.observe(max(0.0, time.time() - event.published_ms / 1000))

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data
