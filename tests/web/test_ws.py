"""`WS /ws/presence`: TestClient on fakeredis, plus a real uvicorn server on real Redis."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import pytest
import redis.asyncio as aioredis
import uvicorn
from starlette.applications import Starlette
from starlette.testclient import TestClient, WebSocketTestSession
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import presence_svc
from presence_svc.app import create_app
from presence_svc.auth import ALL_STUDIES
from presence_svc.codec import Outgoing
from presence_svc.metrics import Metrics
from presence_svc.models import NO_CURSOR, iso_from_ms
from presence_svc.node import Node
from presence_svc.publisher import study_event
from presence_svc.redis.keys import Keys
from presence_svc.store import StoreUnavailable
from presence_svc.web.ws_connection import CLOSE_SLOW_CONSUMER, Connection, Disconnected
from presence_svc.web.ws_heartbeats import HEARTBEATS_IN_FLIGHT, Heartbeats
from tests.support.app import app_client, fake_redis, make_settings, node_of, unreachable_redis
from tests.support.auth import SECRET, auth, bearer, token
from tests.support.clients import Watcher, rest_heartbeat
from tests.support.clock import MovableClock
from tests.support.processes import free_port
from tests.support.waiting import eventually, eventually_async

ISO_MS_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
EVENT_FIELDS = {
    "session_id",
    "user_id",
    "study_id",
    "chapter_id",
    "move_path",
    "status",
    "previous_status",
    "timestamp",
    "seq",
}
RECEIVE_TIMEOUT = 5.0
# The in-process node's thresholds: far longer than any test, so only its sockets make events.
THRESHOLDS: dict[str, Any] = {
    "idle_after": 30,
    "away_after": 60,
    "expire_after": 90,
    "sweep_interval": 0.1,
}


def receive(ws: WebSocketTestSession, timeout: float = RECEIVE_TIMEOUT) -> dict[str, Any]:
    """The next JSON message, waiting at most `timeout` (TestClient's own receive never times
    out); a close frame raises WebSocketDisconnect as TestClient does."""

    async def next_message() -> Any:
        with anyio.fail_after(timeout):
            return await ws._send_rx.receive()

    message = ws.portal.call(next_message)
    ws._raise_on_close(message)
    assert message["type"] == "websocket.send", message
    assert "text" in message and message["text"] is not None, message
    decoded: dict[str, Any] = json.loads(message["text"])
    return decoded


def receive_event(ws: WebSocketTestSession) -> dict[str, Any]:
    message = receive(ws)
    assert message["type"].startswith("presence."), message
    return message


@dataclass
class App:
    client: TestClient
    redis: Any
    keys: Keys

    @property
    def node(self) -> Node:
        return node_of(self.client)

    def open(self, study: str, user: str = "alice") -> Any:
        return self.client.websocket_connect(f"/ws/presence?study_id={study}", headers=auth(user))

    def heartbeat(self, study: str, user: str = "alice", **cursor: Any) -> dict[str, Any]:
        response = self.client.post(
            "/presence/heartbeat", json={"study_id": study, **cursor}, headers=auth(user)
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def presence(self, study: str) -> dict[str, Any]:
        response = self.client.get(f"/presence/{study}", headers=auth())
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def publish(self, study: str, payload: bytes) -> None:
        async def publish() -> None:
            await self.redis.publish(self.keys.channel(study), payload)

        portal = self.client.portal
        assert portal is not None, "the app is not running"
        portal.call(publish)


@pytest.fixture
def app(key_prefix: str) -> Iterator[App]:
    redis = fake_redis()
    with app_client(key_prefix=key_prefix, redis=redis, **THRESHOLDS) as client:
        yield App(client, redis, Keys(key_prefix))


def join(ws: WebSocketTestSession) -> tuple[dict[str, Any], dict[str, Any]]:
    """The connected message and the snapshot, checking their order."""
    connected = receive(ws)
    assert connected["type"] == "connected", connected
    snapshot = receive(ws)
    assert snapshot["type"] == "presence.snapshot", snapshot
    return connected["data"], snapshot["data"]


def ping(ws: WebSocketTestSession) -> None:
    ws.send_json({"type": "ping"})
    pong = receive(ws)
    assert pong["type"] == "pong", pong


# --- handshake -----------------------------------------------------------------------------


def test_connected_then_snapshot(app: App) -> None:
    bob = app.heartbeat("s1", "bob", chapter_id="c1", move_path="main.1")
    app.heartbeat("other", "carol")
    with app.open("s1", "alice") as ws:
        connected, snapshot = join(ws)
    assert set(connected) == {"connection_id", "user_id", "study_id", "timestamp"}
    assert connected["user_id"] == "alice"
    assert connected["study_id"] == "s1"
    assert re.fullmatch(r"[0-9a-f]{32}", connected["connection_id"])
    assert ISO_MS_Z.match(connected["timestamp"])
    assert snapshot == {
        "study_id": "s1",
        "users": [bob],
        "total": 1,
        "counts": {"active": 1, "idle": 0, "away": 0},
        "seq": 1,
        "complete": True,
    }
    assert snapshot == app.presence("s1")
    # Connecting is not a heartbeat: alice is not present.
    assert app.presence("s1")["total"] == 1


def test_each_connection_has_its_own_id(app: App) -> None:
    with app.open("s1") as first, app.open("s1") as second:
        one, _ = join(first)
        two, _ = join(second)
    assert one["connection_id"] != two["connection_id"]


def test_snapshot_of_an_empty_study(app: App) -> None:
    with app.open("empty") as ws:
        _, snapshot = join(ws)
    assert snapshot == {
        "study_id": "empty",
        "users": [],
        "total": 0,
        "counts": {"active": 0, "idle": 0, "away": 0},
        "seq": 0,
        "complete": True,
    }


@pytest.fixture(params=["fake", "real"])
def crowd(request: pytest.FixtureRequest, key_prefix: str) -> Iterator[App]:
    """An app whose snapshots list at most 3 users: on fakeredis, or connected to the real
    Redis itself (owning its clients, as a node does; its keys are deleted after)."""
    if request.param == "fake":
        redis = fake_redis()
        with app_client(
            key_prefix=key_prefix, redis=redis, snapshot_max_users=3, **THRESHOLDS
        ) as c:
            yield App(c, redis, Keys(key_prefix))
        return
    url: str = request.getfixturevalue("cleanup_real_redis")
    settings = make_settings(
        key_prefix, redis_url=url, require_study_grant=False, snapshot_max_users=3, **THRESHOLDS
    )
    with TestClient(create_app(settings)) as client:
        yield App(client, None, Keys(key_prefix))


def next_millisecond() -> None:
    """Wait until the wall clock (the node's) is past the current millisecond."""
    now_ms = int(time.time() * 1000)
    eventually(lambda: int(time.time() * 1000) > now_ms, within=1.0, what="the next millisecond")


def test_a_crowd_snapshot_lists_the_cap_and_counts_everyone(crowd: App) -> None:
    users = [f"u{n}" for n in range(6)]
    for user in users:
        crowd.heartbeat("s1", user)
        next_millisecond()  # distinct heartbeat times, so "the most recent" is one set
    crowd.heartbeat("s1", "u0")  # u0 is the most recent again (no event: seq stays 6)
    with crowd.open("s1", "watcher") as ws:
        _, snapshot = join(ws)
        # Listed: the 3 most recent heartbeats (u0, u5, u4), in join order.
        assert [u["user_id"] for u in snapshot["users"]] == ["u0", "u4", "u5"]
        assert snapshot["total"] == 6
        assert snapshot["counts"] == {"active": 6, "idle": 0, "away": 0}
        assert (snapshot["seq"], snapshot["complete"]) == (6, False)
        assert set(snapshot) == {"study_id", "users", "total", "counts", "seq", "complete"}
        # Events go on from the snapshot's seq, for listed and unlisted users alike.
        crowd.heartbeat("s1", "late")
        joined = receive_event(ws)
        assert (joined["type"], joined["data"]["seq"]) == ("presence.user_joined", 7)
    # The REST listing without parameters is still everyone.
    everyone = crowd.presence("s1")
    assert everyone["complete"] is True and len(everyone["users"]) == everyone["total"] == 7


def test_token_in_query_string(app: App) -> None:
    with app.client.websocket_connect(f"/ws/presence?study_id=s1&token={token('qbert')}") as ws:
        connected, _ = join(ws)
        ws.send_json({"type": "heartbeat"})
        assert receive_event(ws)["data"]["user_id"] == "qbert"
    assert connected["user_id"] == "qbert"


def test_token_in_header(app: App) -> None:
    with app.client.websocket_connect("/ws/presence?study_id=s1", headers=auth("hank")) as ws:
        connected, _ = join(ws)
    assert connected["user_id"] == "hank"


def _expired() -> str:
    return jwt.encode({"sub": "alice", "exp": int(time.time()) - 5}, SECRET, algorithm="HS256")


BAD_TOKENS: dict[str, tuple[dict[str, str], str]] = {
    "missing": ({}, ""),
    "empty-query": ({}, "&token="),
    "garbage-query": ({}, "&token=not.a.jwt"),
    "garbage-header": ({"Authorization": "Bearer junk"}, ""),
    "basic-scheme": ({"Authorization": "Basic YWxpY2U6cHc="}, ""),
    "forged": ({"Authorization": "Bearer " + token(secret="x" * 40)}, ""),
    "expired": ({"Authorization": "Bearer " + _expired()}, ""),
    "expired-query": ({}, "&token=" + _expired()),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_bad_token_closes_with_4401_before_any_data(app: App, case: str) -> None:
    headers, query = BAD_TOKENS[case]
    app.heartbeat("s1", "bob")
    with (
        pytest.raises(WebSocketDisconnect) as closed,
        app.client.websocket_connect(f"/ws/presence?study_id=s1{query}", headers=headers) as ws,
    ):
        receive(ws)  # the very first message is the close: no connected, no snapshot
    assert closed.value.code == 4401
    assert closed.value.reason
    assert app.node.fanout.studies == 0  # never subscribed


def test_expired_token_close_reason(app: App) -> None:
    with (
        pytest.raises(WebSocketDisconnect) as closed,
        app.client.websocket_connect(
            "/ws/presence?study_id=s1", headers={"Authorization": f"Bearer {_expired()}"}
        ) as ws,
    ):
        receive(ws)
    assert closed.value.reason == "token expired"


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?study_id=",
        "?study=s1",
        "?study_id=-s1",
        "?study_id=a%20b",
        "?study_id=s1%0A",
        "?study_id=s1/x",
        "?study_id=" + "a" * 129,
    ],
)
def test_bad_study_id_closes_with_4400(app: App, query: str) -> None:
    with (
        pytest.raises(WebSocketDisconnect) as closed,
        app.client.websocket_connect(f"/ws/presence{query}", headers=auth()) as ws,
    ):
        receive(ws)
    assert closed.value.code == 4400
    assert app.node.fanout.studies == 0


def test_auth_is_checked_before_the_study_id(app: App) -> None:
    with (
        pytest.raises(WebSocketDisconnect) as closed,
        app.client.websocket_connect("/ws/presence?study_id=-bad") as ws,
    ):
        receive(ws)
    assert closed.value.code == 4401


# --- client messages -----------------------------------------------------------------------


def test_ping_pong(app: App) -> None:
    with app.open("s1") as ws:
        join(ws)
        for _ in range(3):
            ws.send_json({"type": "ping"})
            pong = receive(ws)
            assert set(pong) == {"type", "data"}
            assert pong["type"] == "pong"
            assert set(pong["data"]) == {"timestamp"}
            assert ISO_MS_Z.match(pong["data"]["timestamp"])
    assert app.presence("s1")["total"] == 0  # a ping is not a heartbeat


@pytest.mark.parametrize(
    "ms",
    [0, 1, 999, 1000, 1001, -1, -1000, 1_764_600_000_000, 1_764_600_059_999, 4_102_444_800_005],
)
def test_timestamps_are_isoformat_to_the_millisecond(ms: int) -> None:
    expected = datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    assert iso_from_ms(ms) == expected.replace("+00:00", "Z")


@pytest.mark.parametrize(
    "text",
    [
        "garbage",
        "",
        "{",
        "[]",
        "null",
        "42",
        "{}",
        '{"type": "nope"}',
        '{"type": 1}',
        '{"type": "PING"}',
        '{"type": "ping", "extra": 1}',
        '{"type": "heartbeat", "study_id": "elsewhere"}',
        '{"type": "heartbeat", "user_id": "mallory"}',
        '{"type": "heartbeat", "move_path": "e4 e5"}',
        '{"type": "heartbeat", "move_path": ""}',
        '{"type": "heartbeat", "chapter_id": 5}',
        '{"type": "heartbeat", "chapter_id": "-c"}',
    ],
)
def test_invalid_message_gets_an_error_and_the_socket_stays_open(app: App, text: str) -> None:
    with app.open("s1") as ws:
        join(ws)
        ws.send_text(text)
        error = receive(ws)
        assert error["type"] == "error", error
        data = error["data"]
        assert data["code"] == "invalid_message"
        assert data["message"]
        assert isinstance(data["errors"], list)
        assert data["errors"]
        for problem in data["errors"]:
            assert set(problem) == {"loc", "msg", "type"}
        ping(ws)  # still usable
        ws.send_json({"type": "heartbeat"})
        assert receive_event(ws)["type"] == "presence.user_joined"
    # The rejected message changed nothing: alice's only event is the valid heartbeat's join.
    presence = app.presence("s1")
    assert presence["seq"] == 1
    assert presence["users"][0]["move_path"] is None
    assert presence["users"][0]["chapter_id"] is None


@pytest.mark.parametrize("payload", [b"\x00\xff", b'{"type": "ping"}', b""])
def test_binary_frame_gets_an_error_and_the_socket_stays_open(app: App, payload: bytes) -> None:
    with app.open("s1") as ws:
        join(ws)
        ws.send_bytes(payload)
        error = receive(ws)
        assert error == {
            "type": "error",
            "data": {"code": "invalid_message", "message": "binary frames are not supported"},
        }
        ping(ws)


def test_many_bad_messages_in_a_row(app: App) -> None:
    with app.open("s1") as ws:
        join(ws)
        for i in range(20):
            ws.send_text(f"junk {i}")
        for _ in range(20):
            assert receive(ws)["type"] == "error"
        ping(ws)


# --- events --------------------------------------------------------------------------------


def test_heartbeat_over_the_socket_reaches_the_study_only(app: App) -> None:
    with (
        app.open("s1", "alice") as mine,
        app.open("s1", "bob") as same_study,
        app.open("s2", "carol") as other_study,
    ):
        for ws in (mine, same_study, other_study):
            join(ws)
        mine.send_json({"type": "heartbeat", "chapter_id": "c1", "move_path": "main.1.var1.1"})
        joined = receive_event(mine)
        assert receive_event(same_study) == joined
        # s1's event went out on the pub/sub connection before s2's: had it been misrouted to
        # the s2 socket, it would come before s2's own event.
        other_study.send_json({"type": "heartbeat"})
        own = receive_event(other_study)
        assert own["data"]["study_id"] == "s2"
        assert own["data"]["user_id"] == "carol"

    assert joined["type"] == "presence.user_joined"
    data = joined["data"]
    assert set(data) == EVENT_FIELDS
    session = app.presence("s1")["users"][0]
    assert data["session_id"] == session["session_id"]
    assert data["user_id"] == "alice"
    assert data["study_id"] == "s1"
    assert data["chapter_id"] == "c1"
    assert data["move_path"] == "main.1.var1.1"
    assert data["status"] == "active"
    assert data["seq"] == 1
    assert ISO_MS_Z.match(data["timestamp"])
    assert data["timestamp"] == session["last_heartbeat"]


def test_socket_heartbeat_is_for_the_sockets_user_and_study(app: App) -> None:
    with app.open("s1", "alice") as ws:
        join(ws)
        ws.send_json({"type": "heartbeat"})
        receive_event(ws)
    assert [u["user_id"] for u in app.presence("s1")["users"]] == ["alice"]
    assert app.presence("s2")["total"] == 0


def test_cursor_moved(app: App) -> None:
    with app.open("s1") as ws:
        _, snapshot = join(ws)
        ws.send_json({"type": "heartbeat", "chapter_id": "c1", "move_path": "main.1"})
        assert receive_event(ws)["type"] == "presence.user_joined"
        ws.send_json({"type": "heartbeat", "move_path": "main.1.var1.1"})
        moved = receive_event(ws)
        assert moved["type"] == "presence.cursor_moved"
        assert moved["data"]["chapter_id"] == "c1"  # omitted: kept
        assert moved["data"]["move_path"] == "main.1.var1.1"
        assert moved["data"]["seq"] == snapshot["seq"] + 2
        # Unchanged cursor: no event. Bob's join must be the very next event.
        ws.send_json({"type": "heartbeat", "move_path": "main.1.var1.1"})
        ws.send_json({"type": "heartbeat"})
        ping(ws)
        app.heartbeat("s1", "bob")
        following = receive_event(ws)
        assert following["type"] == "presence.user_joined"
        assert following["data"]["user_id"] == "bob"
        assert following["data"]["seq"] == snapshot["seq"] + 3
        # Clearing with null is a move too.
        ws.send_json({"type": "heartbeat", "chapter_id": None})
        cleared = receive_event(ws)
        assert cleared["type"] == "presence.cursor_moved"
        assert cleared["data"]["chapter_id"] is None
        assert cleared["data"]["move_path"] == "main.1.var1.1"


def test_events_follow_the_snapshot_seq_one_by_one(app: App) -> None:
    app.heartbeat("s1", "bob")
    app.heartbeat("s1", "carol")
    app.heartbeat("s1", "bob", move_path="main.2")
    with app.open("s1") as ws:
        _, snapshot = join(ws)
        assert snapshot["seq"] == 3
        ws.send_json({"type": "heartbeat"})  # alice joins
        app.heartbeat("s1", "bob", move_path="main.3")
        app.client.delete("/presence/s1", headers=auth("carol"))
        ws.send_json({"type": "heartbeat", "chapter_id": "c9"})
        seen = [receive_event(ws) for _ in range(4)]
    assert [e["data"]["seq"] for e in seen] == [4, 5, 6, 7]
    assert [(e["type"], e["data"]["user_id"]) for e in seen] == [
        ("presence.user_joined", "alice"),
        ("presence.cursor_moved", "bob"),
        ("presence.user_left", "carol"),
        ("presence.cursor_moved", "alice"),
    ]
    assert app.presence("s1")["seq"] == 7


def test_rest_delete_sends_user_left(app: App) -> None:
    with app.open("s1", "watcher") as ws:
        _, snapshot = join(ws)
        session = app.heartbeat("s1", "alice", chapter_id="c1")
        assert receive_event(ws)["type"] == "presence.user_joined"
        response = app.client.delete("/presence/s1", headers=auth("alice"))
        assert response.json() == {"status": "success"}
        left = receive_event(ws)
        # A second DELETE publishes nothing: the next event is bob's join.
        app.client.delete("/presence/s1", headers=auth("alice"))
        app.heartbeat("s1", "bob")
        after = receive_event(ws)
    assert left["type"] == "presence.user_left"
    assert set(left["data"]) == EVENT_FIELDS
    assert left["data"]["user_id"] == "alice"
    assert left["data"]["session_id"] == session["session_id"]
    assert left["data"]["chapter_id"] == "c1"
    assert left["data"]["status"] == "active"
    assert left["data"]["seq"] == snapshot["seq"] + 2
    assert after["type"] == "presence.user_joined"
    assert after["data"]["user_id"] == "bob"
    assert after["data"]["seq"] == snapshot["seq"] + 3


def test_external_events_are_relayed_unchanged(app: App) -> None:
    with app.open("s1") as ws:
        join(ws)
        data = {"chapter_id": "c1", "name": "Najdorf", "seq": 1, "nested": {"a": [1, 2]}}
        app.publish("s1", study_event("s1", "study.chapter_renamed", data))
        relayed = receive(ws)
    assert relayed == {"type": "study.chapter_renamed", "data": data}


def test_an_event_already_in_the_snapshot_is_not_sent_again(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    app.heartbeat("s1", "bob")
    service = app.node.service
    read = service.presence

    async def join_then_read(study_id: str, max_users: int | None = None) -> Any:
        # Subscribed already: carol's user_joined is delivered, and is also in the snapshot.
        await service.heartbeat("carol", study_id)
        return await read(study_id, max_users)

    monkeypatch.setattr(service, "presence", join_then_read)
    with app.open("s1") as ws:
        _, snapshot = join(ws)
        monkeypatch.undo()
        assert snapshot["seq"] == 2
        assert [u["user_id"] for u in snapshot["users"]] == ["bob", "carol"]
        app.heartbeat("s1", "dave")
        first = receive_event(ws)
    assert (first["data"]["user_id"], first["data"]["seq"]) == ("dave", 3)


def test_an_event_after_the_snapshot_read_is_sent(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = app.node.service
    read = service.presence

    async def read_then_join(study_id: str, max_users: int | None = None) -> Any:
        snapshot = await read(study_id, max_users)
        await service.heartbeat("carol", study_id)  # before the socket's writer starts
        return snapshot

    monkeypatch.setattr(service, "presence", read_then_join)
    with app.open("s1") as ws:
        _, snapshot = join(ws)
        first = receive_event(ws)
    assert snapshot["seq"] == 0
    assert snapshot["users"] == []
    assert (first["type"], first["data"]["user_id"], first["data"]["seq"]) == (
        "presence.user_joined",
        "carol",
        1,
    )


# --- subscriptions -------------------------------------------------------------------------


def test_subscriptions_follow_the_sockets(app: App) -> None:
    fanout = app.node.fanout
    assert fanout.studies == 0
    with app.open("s1") as a:
        join(a)
        assert fanout.studies == 1
        with app.open("s1") as b, app.open("s2") as c:
            join(b)
            join(c)
            assert fanout.studies == 2
        eventually(lambda: fanout.studies == 1, what="s2's subscription dropped")
        # The remaining socket still gets its study's events.
        app.heartbeat("s1", "bob")
        assert receive_event(a)["data"]["user_id"] == "bob"
    eventually(lambda: fanout.studies == 0, what="s1's subscription dropped")


# --- failures ------------------------------------------------------------------------------


def test_heartbeat_with_the_store_down_sends_an_error(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unavailable(*args: object, **kwargs: object) -> Any:
        raise StoreUnavailable("connection refused")

    with app.open("s1") as ws:
        join(ws)
        monkeypatch.setattr(app.node.service, "heartbeat", unavailable)
        ws.send_json({"type": "heartbeat"})
        error = receive(ws)
        assert error == {
            "type": "error",
            "data": {"code": "unavailable", "message": "presence storage is unreachable"},
        }
        ping(ws)
        monkeypatch.undo()
        ws.send_json({"type": "heartbeat"})
        assert receive_event(ws)["type"] == "presence.user_joined"


def test_heartbeat_that_fails_unexpectedly_sends_an_internal_error(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object, **kwargs: object) -> Any:
        raise RuntimeError("a bug")

    with app.open("s1") as ws:
        join(ws)
        monkeypatch.setattr(app.node.service, "heartbeat", broken)
        ws.send_json({"type": "heartbeat"})
        assert receive(ws) == {
            "type": "error",
            "data": {"code": "internal", "message": "the heartbeat could not be recorded"},
        }
        ping(ws)  # the socket stays open


def test_snapshot_failure_closes_with_1011(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    async def unavailable(*args: object, **kwargs: object) -> Any:
        raise StoreUnavailable("connection refused")

    monkeypatch.setattr(app.node.service, "presence", unavailable)
    with pytest.raises(WebSocketDisconnect) as closed, app.open("s1") as ws:
        receive(ws)
    assert closed.value.code == 1011
    eventually(lambda: app.node.fanout.studies == 0, what="the subscription dropped")


def test_unreachable_redis_closes_with_1011(key_prefix: str) -> None:
    with app_client(key_prefix=key_prefix, redis=unreachable_redis(), **THRESHOLDS) as client:
        with (
            pytest.raises(WebSocketDisconnect) as closed,
            client.websocket_connect("/ws/presence?study_id=s1", headers=auth()) as ws,
        ):
            receive(ws)
        assert closed.value.code == 1011
        assert node_of(client).fanout.studies == 0


class _StuckSocket:
    """The ASGI send of a socket whose client never reads: every message blocks."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed: tuple[int, str] | None = None

    async def send(self, message: Message) -> None:
        if message["type"] == "websocket.close":
            self.closed = (message["code"], message["reason"])
            return
        self.sent.append(message["text"])
        await asyncio.Event().wait()


async def test_slow_consumer_is_closed_with_1013() -> None:
    socket = _StuckSocket()
    conn = Connection(socket.send, queue_size=4)
    conn.start(floor=0)
    for seq in range(1, 6):
        conn.deliver(Outgoing(seq, f"event {seq}"))
        await asyncio.sleep(0)
    assert not conn.overflowed  # one is being sent, four are queued
    conn.deliver(Outgoing(6, "event 6"))
    assert conn.overflowed
    await eventually_async(lambda: socket.closed is not None, what="the close frame")
    assert socket.closed == (CLOSE_SLOW_CONSUMER, "slow consumer")
    conn.deliver(Outgoing(7, "event 7"))  # ignored once overflowed
    await conn.stop()
    assert socket.sent == ["event 1"]


class _Socket:
    """An ASGI send that records every message; while `writable` is clear, sends wait."""

    def __init__(self, error: Exception | None = None) -> None:
        self.messages: list[Message] = []
        self.writable = asyncio.Event()
        self.writable.set()
        self.error = error  # raised by every send, as a server's send to a gone client

    async def send(self, message: Message) -> None:
        await self.writable.wait()
        if self.error is not None:
            raise self.error
        self.messages.append(message)

    @property
    def sent(self) -> list[str]:
        return [m["text"] for m in self.messages if m["type"] == "websocket.send"]

    @property
    def closes(self) -> list[tuple[int, str]]:
        return [(m["code"], m["reason"]) for m in self.messages if m["type"] == "websocket.close"]


async def test_connection_skips_events_at_or_below_the_floor() -> None:
    socket = _Socket()
    conn = Connection(socket.send, queue_size=16)
    for seq in (3, 4, 5, None, 6):
        conn.deliver(Outgoing(seq, f"e{seq}"))
    conn.start(floor=4)
    for _ in range(10):
        await asyncio.sleep(0)
    await conn.stop()
    assert socket.sent == ["e5", "eNone", "e6"]


async def test_connection_sends_at_once_and_keeps_the_order_when_a_send_waits() -> None:
    socket = _Socket()
    conn = Connection(socket.send, queue_size=16)
    conn.start(floor=0)
    conn.deliver(Outgoing(1, "e1"))
    assert socket.sent == ["e1"]  # sent by the caller, without a turn of the loop
    socket.writable.clear()
    conn.deliver(Outgoing(2, "e2"))  # has to wait for the socket: the writer finishes it
    conn.deliver(Outgoing(3, "e3"))  # queued behind it
    await asyncio.sleep(0)
    assert socket.sent == ["e1"]
    socket.writable.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert socket.sent == ["e1", "e2", "e3"]
    conn.deliver(Outgoing(4, "e4"))
    assert socket.sent == ["e1", "e2", "e3", "e4"]
    await conn.stop()


async def test_connection_sends_one_close_frame_at_most() -> None:
    socket = _Socket()
    conn = Connection(socket.send, queue_size=16)
    conn.start(floor=0)
    conn.close_with(4401, "token expired")
    await conn.close()  # the endpoint's own close, at the end: nothing more goes out
    conn.deliver(Outgoing(1, "e1"))
    await conn.stop()
    assert socket.messages == [{"type": "websocket.close", "code": 4401, "reason": "token expired"}]


async def test_a_close_that_has_to_wait_still_goes_out() -> None:
    socket = _Socket()
    conn = Connection(socket.send, queue_size=16)
    conn.start(floor=0)
    socket.writable.clear()
    conn.close_with(1008, "message rate exceeded")
    stopping = asyncio.ensure_future(conn.stop())
    await asyncio.sleep(0)
    assert not stopping.done()  # stop waits for the close frame
    socket.writable.set()
    await asyncio.wait_for(stopping, 1)
    assert socket.closes == [(1008, "message rate exceeded")]


async def test_a_close_before_the_snapshot_goes_out_with_it() -> None:
    socket = _Socket()
    conn = Connection(socket.send, queue_size=16)
    conn.close_with(CLOSE_SLOW_CONSUMER, "slow consumer")
    assert socket.messages == []  # the client has not had its snapshot yet
    await conn.send_text("snapshot")
    conn.start(floor=0)
    await conn.stop()
    assert (socket.sent, socket.closes) == (["snapshot"], [(CLOSE_SLOW_CONSUMER, "slow consumer")])


async def test_a_failed_send_means_the_client_is_gone() -> None:
    socket = _Socket(error=ConnectionResetError("gone"))
    conn = Connection(socket.send, queue_size=16)
    with pytest.raises(Disconnected):
        await conn.send_text("connected")
    conn.start(floor=0)
    conn.deliver(Outgoing(1, "e1"))
    socket.error = None  # were anything still sent, it would be recorded now
    conn.close_with(4401, "token expired")
    await conn.close()
    await conn.stop()
    assert socket.messages == []


async def test_no_close_frame_is_owed_to_a_client_that_disconnected() -> None:
    socket = _Socket()
    conn = Connection(socket.send, queue_size=16)
    conn.start(floor=0)
    conn.client_gone()
    await conn.close()
    await conn.stop()
    assert socket.closes == []


async def test_a_connection_closes_at_its_tokens_expiry_as_last_moved() -> None:
    socket = _Socket()
    conn = Connection(socket.send, queue_size=16)
    conn.start(floor=0)
    clock = MovableClock(start=1_000.0)
    conn.expire_at(1_060.0, clock)
    conn.expire_at(1_600.0, clock)  # a refresh: the first expiry no longer applies
    clock.advance(100)
    assert clock.pending == 1
    await asyncio.sleep(0)  # a turn of the loop: what came due has run
    assert socket.closes == []
    clock.advance(500)
    await eventually_async(lambda: socket.closes != [], what="the close at the expiry")
    assert socket.closes == [(4401, "token expired")]
    await conn.stop()


async def test_connections_whose_tokens_expire_together_share_one_timer() -> None:
    clock = MovableClock(start=1_000.0)
    sockets = [_Socket() for _ in range(3)]
    conns = [Connection(socket.send, queue_size=16) for socket in sockets]
    for conn in conns:
        conn.start(floor=0)
        conn.expire_at(1_060.0, clock)
    assert clock.pending == 1
    conns[2].expire_at(1_600.0, clock)  # refreshed
    assert clock.pending == 2
    clock.advance(60)
    await eventually_async(lambda: sockets[0].closes and sockets[1].closes, what="both closed")
    assert [socket.closes for socket in sockets] == [[(4401, "token expired")]] * 2 + [[]]
    for conn in conns:
        await conn.stop()
    assert clock.pending == 0


async def test_a_stopped_connection_has_no_expiry_left() -> None:
    conn = Connection(_Socket().send, queue_size=16)
    clock = MovableClock(start=1_000.0)
    conn.expire_at(1_060.0, clock)
    await conn.stop()
    assert clock.pending == 0


class _PendingLeases:
    """A LeaseKeeper whose heartbeats finish when the test says so."""

    generation = 0

    def __init__(self) -> None:
        self.calls: list[asyncio.Future[None]] = []
        self.failed = 0

    def steady(self, connection_id: str) -> bool:
        return True  # its answers carry no session to confirm a full heartbeat with

    def heartbeat_failed(self) -> None:
        self.failed += 1

    def heartbeat(
        self, connection_id: str, user_id: str, study_id: str, cursor: Any, steady: bool
    ) -> Any:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.calls.append(future)

        async def call() -> None:
            await future

        return call()


class _Delivered:
    def __init__(self) -> None:
        self.codes: list[str] = []

    def deliver(self, event: Outgoing) -> None:
        self.codes.append(json.loads(event.text)["data"]["code"])


async def test_heartbeats_in_flight_are_bounded_counted_and_drained() -> None:
    leases, delivered, metrics = _PendingLeases(), _Delivered(), Metrics()
    node: Any = type("FakeNode", (), {"leases": leases, "metrics": metrics})()
    beats = Heartbeats(node, delivered, "c1", "alice", "s1")  # type: ignore[arg-type]
    for _ in range(HEARTBEATS_IN_FLIGHT - 1):
        assert beats.start(NO_CURSOR) is None
    full = beats.start(NO_CURSOR)  # one too many: the reader waits on this
    assert full is not None and not full.done()
    assert len(leases.calls) == HEARTBEATS_IN_FLIGHT  # every store call started at once
    leases.calls[0].set_result(None)
    await asyncio.sleep(0)
    assert full.done() and beats.in_flight == HEARTBEATS_IN_FLIGHT - 1
    idle = beats.idle()
    assert idle is not None
    leases.calls[1].set_exception(StoreUnavailable("down"))
    leases.calls[2].set_exception(RuntimeError("a bug"))
    for call in leases.calls[3:]:
        call.set_result(None)
    await asyncio.wait_for(idle, 1)
    assert beats.in_flight == 0 and beats.idle() is None
    assert leases.failed == 2  # each failure makes every socket's next heartbeat a full one
    assert delivered.codes == ["unavailable", "internal"]

    def count(outcome: str) -> float | None:
        labels = {"transport": "websocket", "outcome": outcome}
        return metrics.registry.get_sample_value("presence_heartbeats_total", labels)

    assert (count("ok"), count("unavailable"), count("internal")) == (
        HEARTBEATS_IN_FLIGHT - 2,
        1,
        1,
    )


# --- what an idle socket holds ----------------------------------------------------------------

PACKAGE = str(Path(presence_svc.__file__).parent)


def _endpoint_frames() -> list[tuple[str, dict[str, Any]]]:
    """The service's coroutines a presence socket's task is suspended in, outermost first,
    each with its locals (run in the app's loop)."""
    for task in asyncio.all_tasks():
        chain = []
        awaited: Any = task.get_coro()
        while hasattr(awaited, "cr_await"):  # a coroutine: follow what it awaits
            chain.append(awaited)
            awaited = awaited.cr_await
        ours = [c for c in chain if c.cr_code.co_filename.startswith(PACKAGE)]
        if any(c.cr_code.co_qualname == "PresenceSocket.__call__" for c in ours):
            return [(c.cr_code.co_qualname, dict(c.cr_frame.f_locals)) for c in ours]
    return []


def test_an_idle_socket_waits_in_one_frame_of_the_endpoint(app: App) -> None:
    # Idle sockets are the bulk of a node's memory (docs/performance.md, "Idle socket memory"):
    # each coroutine suspended for a socket's life, and whatever its locals still hold, is paid
    # once per socket.
    with app.open("s1") as ws:
        join(ws)
        frames = ws.portal.call(_endpoint_frames)
    assert [name for name, _ in frames] == ["NodeApp.__call__", "PresenceSocket.__call__"]
    held = frames[-1][1]
    assert "admitted" not in held
    # Neither the handshake's WebSocket nor a message of the greeting; the scope is uvicorn's.
    kept = [name for name, v in held.items() if isinstance(v, WebSocket | dict)]
    assert kept == ["scope"]


# --- a real server -------------------------------------------------------------------------

IDLE, AWAY, EXPIRE, SWEEP = 0.5, 1.0, 1.5, 0.1


def live_token(user: str = "alice") -> str:
    """A token for the live server: on a real Redis, grants are required, so it grants all."""
    return token(user, studies=ALL_STUDIES)


@dataclass
class LiveServer:
    http: str
    ws: str
    app: Starlette
    url: str
    keys: Keys

    @property
    def node(self) -> Node:
        node: Node = self.app.state.node
        return node


@pytest.fixture
def live_server(cleanup_real_redis: str, key_prefix: str) -> Iterator[LiveServer]:
    """uvicorn in a background thread, on real Redis, serving real sockets on loopback."""
    settings = make_settings(
        key_prefix,
        redis_url=cleanup_real_redis,
        idle_after=IDLE,
        away_after=AWAY,
        expire_after=EXPIRE,
        sweep_interval=SWEEP,
    )
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        ws_per_message_deflate=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    eventually(lambda: server.started or not thread.is_alive(), within=10, what="uvicorn start")
    assert server.started, "uvicorn exited during start-up"
    try:
        yield LiveServer(
            f"http://127.0.0.1:{port}",
            f"ws://127.0.0.1:{port}",
            app,
            cleanup_real_redis,
            Keys(key_prefix),
        )
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "uvicorn did not stop"


async def _numsub(url: str, channel: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        [(_, count)] = await client.pubsub_numsub(channel)
        return int(count)
    finally:
        await client.aclose()


async def _open_with_query_token(ws_base: str, study: str, jwt_token: str) -> Watcher:
    ws = await connect(f"{ws_base}/ws/presence?study_id={study}&token={jwt_token}")
    connected = json.loads(await asyncio.wait_for(ws.recv(), 5))
    snapshot = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert connected["type"] == "connected", connected
    assert snapshot["type"] == "presence.snapshot", snapshot
    return Watcher(ws, connected["data"], snapshot["data"])


@pytest.mark.redis
async def test_real_server_lifecycle_arrives_once_in_seq_order(live_server: LiveServer) -> None:
    study = f"study-{uuid.uuid4().hex[:8]}"
    by_header = await Watcher.open(live_server.ws, study, live_token("viewer-1"))
    # The second watcher passes its token in the query string.
    by_query = await _open_with_query_token(live_server.ws, study, live_token("viewer-2"))
    try:
        assert by_header.snapshot == {
            "study_id": study,
            "users": [],
            "total": 0,
            "counts": {"active": 0, "idle": 0, "away": 0},
            "seq": 0,
            "complete": True,
        }
        assert by_query.connected["user_id"] == "viewer-2"
        assert live_server.node.fanout.studies == 1
        async with httpx.AsyncClient(timeout=5) as http:
            session = await rest_heartbeat(
                http, live_server.http, live_token("walker"), study_id=study, move_path="main.1"
            )

            def left(w: Watcher) -> bool:
                return any(e["type"] == "presence.user_left" for e in w.events())

            for watcher in (by_header, by_query):
                await watcher.wait_until(left, within=EXPIRE + 5, what="user_left")
            await asyncio.sleep(4 * SWEEP)  # a duplicate would have arrived by now

            response = await http.get(
                f"{live_server.http}/presence/{study}", headers=bearer(live_token())
            )
            assert response.json() == {
                "study_id": study,
                "users": [],
                "total": 0,
                "counts": {"active": 0, "idle": 0, "away": 0},
                "seq": 4,
                "complete": True,
            }
    finally:
        await by_header.close()
        await by_query.close()

    events = by_header.events()
    assert [e["type"] for e in events] == [
        "presence.user_joined",
        "presence.user_idle",
        "presence.user_away",
        "presence.user_left",
    ]
    assert [e["data"]["seq"] for e in events] == [1, 2, 3, 4]
    assert [e["data"]["status"] for e in events] == ["active", "idle", "away", "away"]
    for event in events:
        assert event["data"]["session_id"] == session["session_id"]
        assert event["data"]["user_id"] == "walker"
        assert event["data"]["move_path"] == "main.1"
    # Nothing but the four events, and the same bytes to both sockets.
    assert by_header.messages == events
    assert by_query.raw == by_header.raw
    # Each transition happened no earlier than its threshold after the heartbeat.
    stamps = [datetime.fromisoformat(e["data"]["timestamp"]).timestamp() for e in events]
    joined = stamps[0]
    for stamp, threshold in zip(stamps[1:], (IDLE, AWAY, EXPIRE), strict=True):
        assert threshold - 0.01 <= stamp - joined <= threshold + 2.0

    # Both sockets gone: the node drops the study's subscription, in Redis too.
    channel = live_server.keys.channel(study)

    async def released() -> bool:
        return not live_server.node.fanout.studies and not await _numsub(live_server.url, channel)

    await eventually_async(released, within=3, what="the study's subscription released")


@pytest.mark.redis
async def test_real_server_refuses_bad_tokens_and_study_ids(live_server: LiveServer) -> None:
    cases = [
        ("/ws/presence?study_id=s1", {}, 4401),
        ("/ws/presence?study_id=s1&token=junk", {}, 4401),
        ("/ws/presence?study_id=-s1", bearer(live_token()), 4400),
        ("/ws/presence", bearer(live_token()), 4400),
    ]
    for path, headers, code in cases:
        async with connect(live_server.ws + path, additional_headers=headers) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == code, path
    assert live_server.node.fanout.studies == 0


@pytest.mark.redis
async def test_real_server_client_messages(live_server: LiveServer) -> None:
    study = f"study-{uuid.uuid4().hex[:8]}"
    async with connect(
        f"{live_server.ws}/ws/presence?study_id={study}",
        additional_headers=bearer(live_token("alice")),
    ) as ws:

        async def next_message() -> dict[str, Any]:
            message = await asyncio.wait_for(ws.recv(), 5)
            assert isinstance(message, str)
            decoded: dict[str, Any] = json.loads(message)
            return decoded

        assert (await next_message())["type"] == "connected"
        assert (await next_message())["type"] == "presence.snapshot"
        await ws.send(b"\x01\x02")
        assert (await next_message())["type"] == "error"
        await ws.send("not json")
        assert (await next_message())["type"] == "error"
        await ws.send(json.dumps({"type": "ping"}))
        assert (await next_message())["type"] == "pong"
        await ws.send(json.dumps({"type": "heartbeat", "chapter_id": "c1"}))
        joined = await next_message()
        assert (joined["type"], joined["data"]["chapter_id"]) == ("presence.user_joined", "c1")
        await ws.send(json.dumps({"type": "heartbeat", "chapter_id": "c2"}))
        moved = await next_message()
        assert (moved["type"], moved["data"]["seq"]) == ("presence.cursor_moved", 2)


def test_heartbeats_sent_back_to_back_apply_in_order(app: App) -> None:
    # The server reads the next frame before the previous heartbeat is stored; the store
    # must still apply them in the order the socket sent them.
    with app.open("s1") as ws:
        join(ws)
        for step in range(1, 41):
            ws.send_json({"type": "heartbeat", "chapter_id": "ch1", "move_path": f"main.{step}"})
        events = [receive_event(ws) for _ in range(40)]
    assert events[0]["type"] == "presence.user_joined"
    assert [e["type"] for e in events[1:]] == ["presence.cursor_moved"] * 39
    assert [e["data"]["move_path"] for e in events] == [f"main.{n}" for n in range(1, 41)]
    assert app.presence("s1")["users"][0]["move_path"] == "main.40"


@pytest.mark.parametrize(
    ("origin", "accepted"),
    [
        ("https://app.example", True),
        ("https://app.example/", True),
        (None, True),  # another backend: no Origin header
        ("https://evil.example", False),
        ("null", False),
    ],
)
def test_allowed_origins(key_prefix: str, origin: str | None, accepted: bool) -> None:
    allowed = "https://app.example,https://b.example"
    headers = auth()
    if origin is not None:
        headers["origin"] = origin
    with (
        app_client(key_prefix=key_prefix, allowed_origins=allowed, **THRESHOLDS) as client,
        client.websocket_connect("/ws/presence?study_id=s1", headers=headers) as ws,
    ):
        if accepted:
            assert receive(ws)["type"] == "connected"
        else:
            with pytest.raises(WebSocketDisconnect) as refused:
                receive(ws)
            assert refused.value.code == 4403
