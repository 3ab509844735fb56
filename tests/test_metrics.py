"""Prometheus metrics: what a node counts, read through GET /metrics."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

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
