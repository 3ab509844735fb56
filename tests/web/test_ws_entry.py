"""web/ws_entry.py's NodeApp: `WS /ws/presence` straight to its endpoint, all else to Starlette."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from presence_svc import requestid
from presence_svc.app import create_app
from presence_svc.logs import JsonFormatter
from presence_svc.web.ws_entry import WS_PATH
from tests.support.app import app_client, fake_redis, make_settings, node_of
from tests.support.auth import auth

MIDDLEWARE_ID = "id-from-the-middleware"


class Entries:
    """Counts the direct entry's calls (requestid.enter_websocket), still doing what it does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        enter = requestid.enter_websocket

        def counted() -> None:
            self.count += 1
            enter()

        monkeypatch.setattr(requestid, "enter_websocket", counted)


@pytest.fixture
def entries(monkeypatch: pytest.MonkeyPatch) -> Entries:
    return Entries(monkeypatch)


@pytest.fixture
def client(key_prefix: str) -> Iterator[TestClient]:
    with app_client(key_prefix=key_prefix) as tc:
        yield tc


def connected_id(client: TestClient, path: str = WS_PATH) -> str:
    """The connection id a presence socket at `path` announces."""
    with client.websocket_connect(f"{path}?study_id=s1", headers=auth("alice")) as ws:
        connected = ws.receive_json()
        assert connected["type"] == "connected", connected
        assert ws.receive_json()["type"] == "presence.snapshot"
    connection_id: str = connected["data"]["connection_id"]
    return connection_id


def test_a_presence_socket_skips_the_middleware(
    client: TestClient, entries: Entries, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection_ids = iter(["id-of-the-entry", MIDDLEWARE_ID])
    monkeypatch.setattr(requestid, "new_id", lambda: next(connection_ids))
    assert connected_id(client) == "id-of-the-entry"
    assert entries.count == 1


@pytest.mark.parametrize(
    "path",
    [
        f"/api{WS_PATH}",  # as uvicorn sends it: the root_path is part of the path
        WS_PATH,  # as some proxies and servers send it: left for the router to take as is
    ],
)
def test_a_presence_socket_under_a_root_path_goes_through_the_router(
    key_prefix: str, entries: Entries, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    monkeypatch.setattr(requestid, "new_id", lambda: MIDDLEWARE_ID)
    redis = fake_redis()
    app = create_app(make_settings(key_prefix=key_prefix), redis=redis)
    with TestClient(app, root_path="/api") as client:
        try:
            assert connected_id(client, path) == MIDDLEWARE_ID  # RequestIdMiddleware's id
        finally:
            assert client.portal is not None
            client.portal.call(redis.aclose)
    assert entries.count == 0


@pytest.mark.parametrize(
    "path", [f"{WS_PATH}/", f"{WS_PATH}/x", WS_PATH[:-1], "/ws/other", "/presence/s1"]
)
def test_a_websocket_to_another_path_gets_the_routers_refusal(
    client: TestClient, entries: Entries, path: str
) -> None:
    # What a plain Starlette router answers a WebSocket that matches no route.
    plain = TestClient(Starlette(routes=[*client.app.routes]))  # type: ignore[attr-defined]
    with pytest.raises(WebSocketDisconnect) as plainly, plain.websocket_connect(path):
        pass
    assert plainly.value.code == 1000
    with (
        pytest.raises(WebSocketDisconnect) as refused,
        client.websocket_connect(f"{path}?study_id=s1", headers=auth("alice")),
    ):
        pass
    assert (refused.value.code, refused.value.reason) == (plainly.value.code, plainly.value.reason)
    assert entries.count == 0


class Lines(logging.Handler):
    """Formats at emit time, as the node's stderr handler does (the ids live in the context)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))

    def messages(self, text: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if text in line["msg"]]


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("presence_svc")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_presence_sockets_log_lines_carry_the_id_it_announces(
    client: TestClient, entries: Entries, lines: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    fanout = node_of(client).fanout
    add = fanout.add
    log = logging.getLogger("presence_svc.test")

    async def logged_add(study_id: str, conn: Any) -> None:
        log.info("subscribing %s", study_id)
        await asyncio.create_task(_log_soon(log, "in a task of the socket"))
        await add(study_id, conn)

    monkeypatch.setattr(fanout, "add", logged_add)
    first, second = connected_id(client), connected_id(client)
    assert entries.count == 2  # both by the direct entry, past RequestIdMiddleware
    assert first != second
    logged = [line.get("connection_id") for line in lines.messages("subscribing s1")]
    in_tasks = [line.get("connection_id") for line in lines.messages("in a task of the socket")]
    assert logged == in_tasks == [first, second]
    assert all("request_id" not in line for line in lines.messages("subscribing s1"))


async def _log_soon(log: logging.Logger, message: str) -> None:
    await asyncio.sleep(0)
    log.info(message)
