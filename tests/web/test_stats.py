"""GET /stats (operators: every study and the presence:admin scope) and GET /presence/{id}/stats
(study grants) on a node in process: who may read them, and what they count, live."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import fakeredis
import jwt
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from presence_svc.auth import ADMIN_SCOPE, ALL_STUDIES, Principal, TokenVerifier, issue_token
from presence_svc.redis.keys import Keys
from tests.support.app import app_client, node_of, unreachable_redis
from tests.support.auth import SECRET, admin, auth, bearer
from tests.support.waiting import eventually

FAST: dict[str, Any] = {"stats_interval": 0.1, "require_study_grant": True}


@pytest.fixture
def client() -> Iterator[TestClient]:
    with app_client(**FAST) as tc:
        yield tc


def member(user: str) -> dict[str, str]:
    """A user's token granting every study (grants are required here)."""
    return auth(user, studies=ALL_STUDIES)


def stats(client: TestClient) -> dict[str, Any]:
    response = client.get("/stats", headers=admin())
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def study_stats(client: TestClient, study: str) -> dict[str, Any]:
    response = client.get(f"/presence/{study}/stats", headers=auth(studies=[study]))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@contextlib.contextmanager
def watching(client: TestClient, study: str, user: str) -> Iterator[Any]:
    """A WebSocket watching `study`, past its snapshot (so its subscription is confirmed)."""
    with client.websocket_connect(f"/ws/presence?study_id={study}", headers=member(user)) as ws:
        assert ws.receive_json()["type"] == "connected"
        assert ws.receive_json()["type"] == "presence.snapshot"
        yield ws


# --- who may read ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer nope"}, 401),
        (auth(studies=ALL_STUDIES), 403),  # every study, no admin scope
        (auth(studies=["s1"], scope=ADMIN_SCOPE), 403),  # the scope, not every study
        (auth(studies=ALL_STUDIES, scope="presence:read"), 403),
        (auth(studies=ALL_STUDIES, scope="presence:adminx"), 403),
        (auth(studies=ALL_STUDIES, scope=f"openid {ADMIN_SCOPE} profile"), 200),
    ],
)
def test_stats_needs_an_operators_token(
    client: TestClient, headers: dict[str, str], status: int
) -> None:
    response = client.get("/stats", headers=headers)
    assert response.status_code == status, response.text
    if status == 403:
        assert response.json()["error"] == "forbidden"
        assert ADMIN_SCOPE in response.json()["detail"]


def test_a_scope_claim_that_is_not_a_string_is_refused(client: TestClient) -> None:
    claims = {"sub": "op", "exp": 4_000_000_000, "studies": "*", "scope": [ADMIN_SCOPE]}
    signed = jwt.encode(claims, SECRET, algorithm="HS256")
    response = client.get("/stats", headers=bearer(signed))
    assert response.status_code == 401
    assert '"scope"' in response.json()["detail"]


def test_the_verifier_gives_the_principal_its_scopes() -> None:
    verifier = TokenVerifier(SECRET)
    signed = issue_token("op", SECRET, studies="*", scope=["a", ADMIN_SCOPE])
    principal = verifier.principal(signed)
    assert principal.scopes == frozenset({"a", ADMIN_SCOPE})
    assert principal.is_admin
    assert not verifier.principal(issue_token("u", SECRET, studies="*")).is_admin
    assert not Principal("u", frozenset({"s1"}), 0.0, frozenset({ADMIN_SCOPE})).is_admin


def test_study_stats_follow_the_study_grant(client: TestClient) -> None:
    assert client.get("/presence/s1/stats").status_code == 401
    refused = client.get("/presence/s1/stats", headers=auth(studies=["s2"]))
    assert refused.status_code == 403
    assert refused.json()["error"] == "forbidden"
    invalid = client.get("/presence/-bad/stats", headers=auth(studies=ALL_STUDIES))
    assert invalid.status_code == 422
    assert invalid.json()["detail"][0]["loc"] == ["path", "study_id"]
    assert client.get("/presence/s1/stats", headers=auth(studies=["s1"])).status_code == 200


# --- what they count ------------------------------------------------------------------------


def test_stats_count_users_and_the_sockets_watching_live(client: TestClient) -> None:
    for user in ("alice", "bob"):
        beat = client.post("/presence/heartbeat", json={"study_id": "s1"}, headers=member(user))
        assert beat.status_code == 200
    with watching(client, "s1", "carol"):
        with watching(client, "s1", "dave"):
            eventually(lambda: study_stats(client, "s1")["watching"] == 2, what="two watchers")
            check_counts(client)
        eventually(lambda: study_stats(client, "s1")["watching"] == 1, what="one watcher left")
    eventually(lambda: study_stats(client, "s1")["watching"] == 0, what="no watcher left")


def check_counts(client: TestClient) -> None:
    """Two users (by REST), two sockets watching s1 (carol's and dave's)."""
    counted = study_stats(client, "s1")
    assert counted["users"] == {"active": 2, "idle": 0, "away": 0, "total": 2}
    assert counted["seq"] == 2  # two joins; the sockets only watch
    eventually(lambda: stats(client)["sockets"] == 2, what="the node reports its sockets")
    overview = stats(client)
    (me,) = overview["nodes"]
    assert me["node_id"] == overview["node_id"] == node_of(client).leases.node_id
    assert (me["sockets"], me["studies"]) == (2, 1)
    assert overview["top_studies"] == [
        {"study_id": "s1", "users": {"active": 2, "idle": 0, "away": 0, "total": 2}}
    ]
    assert overview["events_per_second"] > 0  # the two joins, within the rate window


def metric(client: TestClient, name: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} is not served")


def watchers_everywhere(client: TestClient) -> tuple[int, int, int, float]:
    """s1's watchers, the overview's, this node's in it, and this node's gauge."""
    overview = stats(client)
    (me,) = overview["nodes"]
    gauge = metric(client, "presence_websocket_watchers")
    return study_stats(client, "s1")["watchers"], overview["watchers"], me["watchers"], gauge


def test_a_socket_is_a_watcher_until_its_first_heartbeat(client: TestClient) -> None:
    fanout = node_of(client).fanout
    with watching(client, "s1", "carol") as carol, watching(client, "s1", "dave") as dave:
        eventually(lambda: watchers_everywhere(client) == (2, 2, 2, 2), what="two watchers")
        assert study_stats(client, "s1")["watching"] == 2
        carol.send_json({"type": "heartbeat"})
        assert carol.receive_json()["type"] == "presence.user_joined"
        assert dave.receive_json()["type"] == "presence.user_joined"
        eventually(lambda: watchers_everywhere(client) == (1, 1, 1, 1), what="carol is present")
        dave.send_json({"type": "ping"})  # any other message leaves a watcher one
        assert dave.receive_json()["type"] == "pong"
        assert client.portal.call(fanout.watchers) == {"s1": 1}
        counted = study_stats(client, "s1")
        assert (counted["watching"], counted["watchers"]) == (2, 1)
        assert stats(client)["sockets"] == 2
    eventually(lambda: watchers_everywhere(client) == (0, 0, 0, 0), what="both sockets closed")
    assert study_stats(client, "s1")["watching"] == 0


def test_a_stopped_node_deletes_its_report(key_prefix: str) -> None:
    server = fakeredis.FakeServer()
    keys = Keys(key_prefix)
    with app_client(key_prefix=key_prefix, redis=fakeredis.FakeAsyncRedis(server=server)) as tc:
        node_id = node_of(tc).leases.node_id
        look = fakeredis.FakeRedis(server=server)
        eventually(lambda: look.exists(keys.node_stats(node_id)), what="a first report")
    assert not look.exists(keys.node_stats(node_id))
    look.close()


def test_stats_answer_503_while_redis_is_down() -> None:
    with app_client(redis=unreachable_redis()) as tc:
        for url, headers in (("/stats", admin()), ("/presence/s1/stats", auth())):
            response = tc.get(url, headers=headers)
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"] == "unavailable"
