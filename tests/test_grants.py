"""Per-study authorization: the `studies` claim, PRESENCE_REQUIRE_STUDY_GRANT, 403 and 4403."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from presence_svc.auth import ALL_STUDIES, AuthError, TokenVerifier, issue_token
from presence_svc.cli import main
from presence_svc.settings import DEV_JWT_SECRET, load_settings
from tests.support.app import app_client, node_of
from tests.support.auth import SECRET, auth, token
from tests.support.clock import MovableClock


def claims_token(**claims: Any) -> str:
    return jwt.encode({"sub": "alice", "exp": 4_000_000_000, **claims}, SECRET, "HS256")


@pytest.mark.parametrize(
    ("claim", "granted"),
    [
        ({}, frozenset()),
        ({"studies": "*"}, frozenset({ALL_STUDIES})),
        ({"studies": ["s1", "s2"]}, frozenset({"s1", "s2"})),
        ({"studies": []}, frozenset()),
        ({"studies": ["*"]}, frozenset({ALL_STUDIES})),
    ],
)
def test_the_studies_claim(claim: dict[str, Any], granted: frozenset[str]) -> None:
    principal = TokenVerifier(SECRET).principal(claims_token(**claim))
    assert principal.studies == granted
    assert principal.may_access("s1") == (ALL_STUDIES in granted or "s1" in granted)


@pytest.mark.parametrize("claim", [5, "s1", ["bad id"], [1], {"s1": True}, ["s1", None]])
def test_a_malformed_studies_claim_is_refused(claim: object) -> None:
    with pytest.raises(AuthError, match="studies"):
        TokenVerifier(SECRET).principal(claims_token(studies=claim))


def test_issue_token_grants() -> None:
    # issue_token itself is under test here, so it is called directly, not through the toolkit.
    verifier = TokenVerifier(SECRET)
    assert verifier.principal(issue_token("a", SECRET, studies=["s2", "s1"])).studies == {
        "s1",
        "s2",
    }
    assert verifier.principal(issue_token("a", SECRET, studies="*")).studies == {"*"}
    with pytest.raises(ValueError, match="studies"):
        issue_token("a", SECRET, studies=["no spaces"])


def test_grants_are_required_by_default_only_with_a_real_redis() -> None:
    assert load_settings().study_grant_required is False
    real = load_settings(redis_url="redis://127.0.0.1:1/0", jwt_secret=SECRET)
    assert real.study_grant_required is True
    assert load_settings(require_study_grant=True).study_grant_required is True
    relaxed = load_settings(
        redis_url="redis://127.0.0.1:1/0", jwt_secret=SECRET, require_study_grant=False
    )
    assert relaxed.study_grant_required is False


@pytest.mark.parametrize(
    ("argv", "granted"),
    [
        (["token", "bob", "--study", "s1", "--study", "s2"], {"s1", "s2"}),
        (["token", "bob", "--all-studies"], {"*"}),
        (["token", "bob"], set()),
    ],
)
def test_the_token_command_grants(
    argv: list[str], granted: set[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 0
    printed = capsys.readouterr().out.strip()
    assert TokenVerifier(DEV_JWT_SECRET).principal(printed).studies == granted


@pytest.fixture
def wall() -> MovableClock:
    """The node's clock, which token expiry follows."""
    return MovableClock()


@pytest.fixture
def client(key_prefix: str, wall: MovableClock) -> Iterator[TestClient]:
    with app_client(key_prefix=key_prefix, require_study_grant=True) as test_client:
        node_of(test_client).clock = wall
        yield test_client


def test_rest_with_a_grant(client: TestClient) -> None:
    headers = auth(studies=["s1"])
    assert client.post("/presence/heartbeat", json={"study_id": "s1"}, headers=headers).is_success
    assert client.get("/presence/s1", headers=headers).json()["total"] == 1
    assert client.delete("/presence/s1", headers=headers).json() == {"status": "success"}


@pytest.mark.parametrize("grant", [{}, {"studies": ["s2"]}, {"studies": []}])
def test_rest_without_a_grant_is_403_and_changes_nothing(
    client: TestClient, grant: dict[str, Any]
) -> None:
    everyone = auth(studies="*")
    client.post("/presence/heartbeat", json={"study_id": "s1"}, headers=everyone)
    for method, path, body in [
        ("POST", "/presence/heartbeat", {"study_id": "s1", "chapter_id": "c9"}),
        ("GET", "/presence/s1", None),
        ("DELETE", "/presence/s1", None),
    ]:
        response = client.request(method, path, json=body, headers=auth(**grant))
        assert response.status_code == 403
        assert response.json() == {
            "error": "forbidden",
            "detail": "the token grants no access to study 's1'",
        }
    users = client.get("/presence/s1", headers=everyone).json()["users"]
    assert [(u["user_id"], u["chapter_id"]) for u in users] == [("alice", None)]


def test_a_socket_without_a_grant_is_closed_with_4403_before_any_data(client: TestClient) -> None:
    url = f"/ws/presence?study_id=s1&token={token('alice', studies=['s2'])}"
    with client.websocket_connect(url) as ws, pytest.raises(WebSocketDisconnect) as refused:
        ws.receive_text()
    assert refused.value.code == 4403


def test_a_socket_with_a_grant_is_served(client: TestClient) -> None:
    url = f"/ws/presence?study_id=s1&token={token('alice', studies=['s1'])}"
    with client.websocket_connect(url) as ws:
        assert ws.receive_json()["type"] == "connected"
        assert ws.receive_json()["type"] == "presence.snapshot"


def open_for(client: TestClient, ttl: int) -> Any:
    signed = token("alice", ttl=ttl, studies=["s1"])
    return client.websocket_connect(f"/ws/presence?study_id=s1&token={signed}")


def test_a_socket_whose_token_expires_is_closed_with_4401(
    client: TestClient, wall: MovableClock
) -> None:
    with open_for(client, ttl=60) as ws:
        assert ws.receive_json()["type"] == "connected"
        assert ws.receive_json()["type"] == "presence.snapshot"
        ws.send_json({"type": "ping"})
        assert ws.receive_json()["type"] == "pong"  # open before the expiry
        wall.advance(61)
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()  # nothing else arrives before the close
        assert (closed.value.code, closed.value.reason) == (4401, "token expired")


def test_a_refreshed_socket_stays_open(client: TestClient, wall: MovableClock) -> None:
    with open_for(client, ttl=60) as ws:
        ws.receive_json()
        ws.receive_json()
        ws.send_json({"type": "refresh", "token": token("mallory", studies="*")})
        refused = ws.receive_json()
        assert refused["type"] == "error"
        assert refused["data"]["code"] == "invalid_token"
        ws.send_json({"type": "refresh", "token": token("alice", studies=["s2"])})
        assert ws.receive_json()["data"]["code"] == "invalid_token"
        ws.send_json({"type": "refresh", "token": token("alice", ttl=600, studies=["s1"])})
        refreshed = ws.receive_json()
        assert refreshed["type"] == "refreshed"
        wall.advance(120)  # past the first token's expiry
        ws.send_json({"type": "ping"})
        assert ws.receive_json()["type"] == "pong"
        wall.advance(600)  # past the fresh token's expiry too
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 4401


def test_a_long_refusal_reason_is_cut_to_fit_a_close_frame(client: TestClient) -> None:
    long_garbage = "x" * 3000 + "." + "y" * 3000 + "." + "z" * 3000
    url = f"/ws/presence?study_id=s1&token={long_garbage}"
    with client.websocket_connect(url) as ws, pytest.raises(WebSocketDisconnect) as refused:
        ws.receive_text()
    assert refused.value.code == 4401
    assert len(refused.value.reason.encode()) <= 123
