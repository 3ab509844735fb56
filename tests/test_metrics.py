"""Prometheus metrics: what a node counts, read through GET /metrics."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from presence_svc import metrics
from presence_svc.codec import Outgoing
from tests.support.app import app_client
from tests.support.auth import auth, token
from tests.support.waiting import eventually


@pytest.fixture
def client(key_prefix: str) -> Iterator[TestClient]:
    with app_client(
        key_prefix=key_prefix,
        idle_after=0.2,
        away_after=0.4,
        expire_after=30,
        sweep_interval=0.05,
        rest_heartbeat_rate=1,
        rest_heartbeat_burst=1,
    ) as test_client:
        yield test_client


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(client: TestClient, name: str, **labels: str) -> float:
    return samples(client).get((name, tuple(sorted(labels.items()))), 0.0)


def test_heartbeats_by_transport_and_outcome(client: TestClient) -> None:
    body = {"study_id": "s1"}
    client.post("/presence/heartbeat", json=body, headers=auth("alice"))
    client.post("/presence/heartbeat", json=body, headers=auth("alice"))  # rate limited
    client.post("/presence/heartbeat", json={"study_id": "-"}, headers=auth("bob"))
    with client.websocket_connect(f"/ws/presence?study_id=s1&token={token('c')}") as ws:
        ws.receive_json()
        ws.receive_json()
        ws.send_json({"type": "heartbeat"})
        assert ws.receive_json()["type"] == "presence.user_joined"
    assert value(client, "presence_heartbeats_total", transport="rest", outcome="ok") == 1
    assert value(client, "presence_heartbeats_total", transport="rest", outcome="rate_limited") == 1
    assert (
        value(client, "presence_heartbeats_total", transport="rest", outcome="validation_error")
        == 1
    )
    assert value(client, "presence_heartbeats_total", transport="websocket", outcome="ok") == 1
    assert value(client, "presence_events_published_total") == 2


def test_deliveries_latency_gauges_and_sweeps(client: TestClient) -> None:
    viewer = token("viewer")
    with (
        client.websocket_connect(f"/ws/presence?study_id=s1&token={viewer}") as first,
        client.websocket_connect(f"/ws/presence?study_id=s1&token={viewer}") as second,
    ):
        for ws in (first, second):
            ws.receive_json()
            ws.receive_json()
        assert value(client, "presence_websocket_connections") == 2
        assert value(client, "presence_subscribed_studies") == 1
        assert value(client, "presence_pubsub_links") == 1
        client.post("/presence/heartbeat", json={"study_id": "s1"}, headers=auth("alice"))
        for ws in (first, second):
            assert ws.receive_json()["type"] == "presence.user_joined"
            assert ws.receive_json()["type"] == "presence.user_idle"  # by a sweep
        assert value(client, "presence_events_delivered_total") >= 4
        assert value(client, "presence_event_delivery_latency_seconds_count") >= 2
        assert value(client, "presence_sweep_transitions_total") >= 1
        assert value(client, "presence_sweep_duration_seconds_count") >= 1
    eventually(lambda: value(client, "presence_websocket_connections") == 0, what="sockets gone")
    assert value(client, "presence_subscribed_studies") == 0
    assert value(client, "presence_pubsub_connected") == 1


def test_deliveries_read_as_prometheus_client_would_write_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The delivery count and latency are plain counts the node keeps (metrics._Deliveries);
    /metrics shows them exactly as a prometheus_client Counter and Histogram fed alike."""
    clock = [1_900_000_000.0]
    monkeypatch.setattr(metrics.time, "time", lambda: clock[0])
    ours = metrics.Metrics()
    registry = CollectorRegistry(auto_describe=True)
    counter = Counter(
        "presence_events_delivered",
        "Events handed to local WebSockets (one per event and socket).",
        registry=registry,
    )
    histogram = Histogram(
        "presence_event_delivery_latency_seconds",
        "From an event's publication to its hand-over to this node's sockets.",
        buckets=metrics.LATENCY_BUCKETS,
        registry=registry,
    )
    # Bounds themselves, between them, past the last one, and a publisher's clock ahead.
    for age_ms, sockets in [
        (0, 3),
        (1, 1),
        (2, 0),
        (10, 5),
        (300, 2),
        (2_500, 1),
        (9_000, 1),
        (-50, 1),
    ]:
        published_ms = int(clock[0] * 1000) - age_ms
        ours.delivered(Outgoing(None, "{}", published_ms=published_ms), sockets)
        counter.inc(sockets)
        histogram.observe(max(0.0, clock[0] - published_ms / 1000))  # what the node did
    ours.delivered(Outgoing(None, "{}"), 4)  # no publication time: counted, not timed
    counter.inc(4)

    def written(text: bytes) -> list[str]:
        wanted = ("presence_events_delivered", "presence_event_delivery_latency_seconds")
        # _created is the moment each was made: the same for both but for that.
        return [
            line.split(" ")[0] if "_created " in line else line
            for line in text.decode().splitlines()
            if any(name in line for name in wanted)
        ]

    assert written(ours.render()) == written(generate_latest(registry))
    assert ours.deliveries.created == clock[0]
