"""Limits on what one client may do: REST heartbeat rate, WebSocket message rate, sockets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from tests.support.app import app_client, node_of
from tests.support.auth import auth, token
from tests.support.waiting import eventually


@pytest.fixture
def client(key_prefix: str) -> Iterator[TestClient]:
    with app_client(
        key_prefix=key_prefix,
        rest_heartbeat_rate=1,
        rest_heartbeat_burst=2,
        ws_message_rate=5,
        ws_message_burst=5,
        max_sockets_per_user=2,
    ) as test_client:
        yield test_client


def socket(client: TestClient, user: str) -> Any:
    return client.websocket_connect(f"/ws/presence?study_id=s1&token={token(user)}")


def test_rest_heartbeats_beyond_the_rate_get_429(client: TestClient) -> None:
    body = {"study_id": "s1"}
    codes = [client.post("/presence/heartbeat", json=body, headers=auth("alice")).status_code]
    codes.append(client.post("/presence/heartbeat", json=body, headers=auth("alice")).status_code)
    limited = client.post("/presence/heartbeat", json=body, headers=auth("alice"))
    assert codes == [200, 200]
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "1"
    assert limited.json() == {"error": "rate_limited", "detail": "more than 1 heartbeats a second"}
    # Another user is not affected, and reads are not limited.
    assert client.post("/presence/heartbeat", json=body, headers=auth("bob")).status_code == 200
    assert client.get("/presence/s1", headers=auth("alice")).status_code == 200


def test_a_socket_flooding_messages_is_closed_with_1008(client: TestClient) -> None:
    with socket(client, "alice") as flooder, socket(client, "bob") as bystander:
        for ws in (flooder, bystander):
            ws.receive_json()
            ws.receive_json()
        for _ in range(20):
            flooder.send_json({"type": "ping"})
        with pytest.raises(WebSocketDisconnect) as closed:
            while True:
                flooder.receive_json()
        assert closed.value.code == 1008
        bystander.send_json({"type": "ping"})
        assert bystander.receive_json()["type"] == "pong"


def test_a_user_may_hold_only_so_many_sockets_per_node(client: TestClient) -> None:
    with socket(client, "alice") as first, socket(client, "alice") as second:
        first.receive_json()
        second.receive_json()
        with socket(client, "alice") as third, pytest.raises(WebSocketDisconnect) as refused:
            third.receive_json()
        assert refused.value.code == 4429
        with socket(client, "bob") as other:
            assert other.receive_json()["type"] == "connected"
    node = node_of(client)
    # The server finishes closing them after the client's side has gone.
    eventually(lambda: not node.sockets_by_user.get("alice"), what="alice's sockets closed")
    with socket(client, "alice") as again:
        assert again.receive_json()["type"] == "connected"
