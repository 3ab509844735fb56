"""Request and connection ids: X-Request-ID over the real app, and the ids on its log lines."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import StreamingResponse
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from presence_svc import requestid
from presence_svc.logs import JsonFormatter
from presence_svc.requestid import RequestIdMiddleware
from tests.support.app import app_client, node_of
from tests.support.auth import token

GENERATED = re.compile(r"^[0-9a-f]{32}$")


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


@pytest.fixture
def client(key_prefix: str) -> Iterator[TestClient]:
    with app_client(key_prefix=key_prefix) as tc:
        yield tc


# --- X-Request-ID over the real app ------------------------------------------------------------


def test_a_request_without_an_id_gets_a_fresh_one(client: TestClient) -> None:
    first = client.get("/healthz")
    second = client.get("/healthz")
    assert first.status_code == second.status_code == 200
    assert GENERATED.match(first.headers["x-request-id"])
    assert GENERATED.match(second.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


@pytest.mark.parametrize(
    "sent",
    [
        "abc-123",
        "0f8fad5b-d9cb-469f-a165-70867728950e",
        "Root=1-5759e988:bd862e3f/e1be46a9.94272793+x_y",
        "a" * requestid.MAX_LENGTH,
    ],
)
def test_a_valid_id_is_echoed(client: TestClient, sent: str) -> None:
    response = client.get("/healthz", headers={"X-Request-ID": sent})
    assert response.headers.get_list("x-request-id") == [sent]


@pytest.mark.parametrize(
    "sent",
    [
        "",
        "a" * (requestid.MAX_LENGTH + 1),
        "has space",
        'quote"d',
        "semi;colon",
        "<script>",
        "tab\there",
    ],
)
def test_an_invalid_id_is_replaced(client: TestClient, sent: str) -> None:
    response = client.get("/healthz", headers={"X-Request-ID": sent})
    assert response.headers.get_list("x-request-id") != [sent]
    [replaced] = response.headers.get_list("x-request-id")
    assert GENERATED.match(replaced)


def test_error_responses_carry_the_id_too(client: TestClient) -> None:
    response = client.get("/presence/s1", headers={"X-Request-ID": "no-auth-1"})
    assert response.status_code == 401
    assert response.headers["x-request-id"] == "no-auth-1"


def test_lines_logged_in_a_request_and_its_tasks_carry_its_id(
    client: TestClient, lines: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = node_of(client)
    readiness = node.readiness
    log = logging.getLogger("presence_svc.test")

    async def logged_readiness() -> dict[str, Any]:
        log.info("inside the request")
        await asyncio.create_task(_log_later(log, "inside a task of the request"))
        return await readiness()

    monkeypatch.setattr(node, "readiness", logged_readiness)
    response = client.get("/readyz", headers={"X-Request-ID": "req-42"})
    assert response.status_code == 200

    async def after() -> None:
        log.info("after the request")

    assert client.portal is not None
    client.portal.call(after)
    [inside] = lines.messages("inside the request")
    [task] = lines.messages("inside a task of the request")
    [outside] = lines.messages("after the request")
    assert inside["request_id"] == task["request_id"] == "req-42"
    assert "connection_id" not in inside
    assert "request_id" not in outside


async def _log_later(log: logging.Logger, message: str) -> None:
    await asyncio.sleep(0)
    log.info(message)


def test_lines_logged_during_a_websocket_carry_its_connection_id(
    client: TestClient, lines: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unavailable(*args: object) -> None:
        raise RuntimeError("pub/sub down")

    # ws.py logs an error when it cannot subscribe: a real line of a real connection.
    monkeypatch.setattr(node_of(client).fanout, "add", unavailable)
    alice = token("alice")
    for _ in range(2):
        with (
            client.websocket_connect(f"/ws/presence?study_id=s1&token={alice}") as ws,
            pytest.raises(WebSocketDisconnect),
        ):
            ws.receive_text()
    first, second = lines.messages("cannot subscribe to study s1")
    assert GENERATED.match(first["connection_id"])
    assert GENERATED.match(second["connection_id"])
    assert first["connection_id"] != second["connection_id"]
    assert "request_id" not in first


def test_the_connected_message_names_the_connection_id_the_logs_carry(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(requestid, "new_id", lambda: "conn-from-the-middleware")
    with client.websocket_connect(f"/ws/presence?study_id=s1&token={token('alice')}") as ws:
        connected = ws.receive_json()
    assert connected["type"] == "connected"
    assert connected["data"]["connection_id"] == "conn-from-the-middleware"


# --- the middleware on its own -------------------------------------------------------------------


def test_it_is_pure_asgi() -> None:
    # BaseHTTPMiddleware runs the endpoint in another task and buffers streaming responses.
    assert not issubclass(RequestIdMiddleware, BaseHTTPMiddleware)


async def test_websocket_messages_go_straight_to_the_server() -> None:
    seen: list[tuple[Send, str | None]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((send, requestid.connection_id()))

    async def send(message: Message) -> None:
        pass

    async def receive() -> Message:
        return {}

    # Nothing per message: the app is handed the server's own `send`, unwrapped.
    await asyncio.create_task(RequestIdMiddleware(app)({"type": "websocket"}, receive, send))
    [(given, connection)] = seen
    assert given is send
    assert connection is not None and GENERATED.match(connection)


async def test_lifespan_passes_through_without_an_id() -> None:
    seen: list[tuple[str, str] | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(requestid.current())

    async def receive() -> Message:
        return {}

    async def send(message: Message) -> None:
        pass

    await RequestIdMiddleware(app)({"type": "lifespan"}, receive, send)
    assert seen == [None]


async def test_the_id_is_unset_after_the_request() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert requestid.request_id() == "r-1"
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "headers": [(b"x-request-id", b"r-1")]}
    await RequestIdMiddleware(app)(scope, receive, send)
    assert requestid.current() is None
    assert (b"x-request-id", b"r-1") in sent[0]["headers"]


async def test_the_servers_traceback_line_of_a_failed_request_carries_its_id(
    lines: Lines,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise ValueError("boom")

    async def receive() -> Message:
        return {}

    async def send(message: Message) -> None:
        pass

    async def serve_one() -> None:
        # What a server does: run the app in the request's task, log what escapes it.
        try:
            await RequestIdMiddleware(app)(
                {"type": "http", "headers": [(b"x-request-id", b"r-2")]}, receive, send
            )
        except ValueError:
            logging.getLogger("presence_svc.server").exception("Exception in ASGI application")

    await asyncio.create_task(serve_one())
    [line] = lines.messages("Exception in ASGI application")
    assert line["request_id"] == "r-2"
    assert "ValueError: boom" in line["exc"]


async def _chunks() -> AsyncIterator[bytes]:
    for part in (b"one ", b"two ", b"three"):
        yield part


def test_streaming_responses_still_stream_with_the_header() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await StreamingResponse(_chunks())(scope, receive, send)

    # Not entered as a context manager: no lifespan, which this bare app does not speak.
    response = TestClient(RequestIdMiddleware(app)).get("/", headers={"X-Request-ID": "stream-1"})
    assert response.text == "one two three"
    assert response.headers["x-request-id"] == "stream-1"


# --- fresh ids ---------------------------------------------------------------------------------


def test_fresh_ids_are_distinct_across_batches() -> None:
    drawn = [requestid.new_id() for _ in range(3 * 256 + 5)]  # three batches from the OS and more
    assert all(GENERATED.match(i) for i in drawn)
    assert len(set(drawn)) == len(drawn)


_FORKED = """
import os, sys
from presence_svc import requestid
requestid.new_id()  # the parent draws a batch and keeps the rest
read, write = os.pipe()
if os.fork() == 0:
    os.write(write, requestid.new_id().encode())
    os._exit(0)
os.wait()
child = os.read(read, 64).decode()
left = {requestid.new_id() for _ in range(255)}
sys.exit(0 if child and child not in left else 1)
"""


def test_a_forked_child_draws_none_of_the_ids_its_parent_has_left() -> None:
    # A fresh interpreter: forking the test process (its threads) is not what this is about.
    assert subprocess.run([sys.executable, "-c", _FORKED], timeout=60).returncode == 0
