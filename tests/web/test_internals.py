"""What web/stepping.py, the raw ASGI endpoint and web/ws_entry.py's NodeApp (Starlette's own
`__call__`, inlined) rely on from asyncio, Starlette and uvicorn.

None of it is public API, and a change in any of it would not fail a behaviour test: the node
would fall back to slower paths or fail only under load. These tests fail instead, naming
what changed (stepping.py's docstring says what each item bought).
"""

from __future__ import annotations

import ast
import asyncio
import base64
import contextlib
import inspect
import os
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import starlette
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from presence_svc.app import create_app
from presence_svc.leases import LeaseKeeper
from presence_svc.models import NO_CURSOR, CursorUpdate, Session
from presence_svc.redis.cluster import is_cluster
from presence_svc.redis.store import RedisStore
from presence_svc.service import PresenceService
from presence_svc.settings import load_settings
from presence_svc.web import stepping
from presence_svc.web.ws import presence_socket
from presence_svc.web.ws_entry import NodeApp
from tests.support.processes import free_port

PYTHON = f"Python {sys.version.split()[0]}"


async def _outcome_of(awaitable: Any) -> BaseException:
    """How `awaitable` ended when driven by stepping.drive (StopIteration if it returned)."""
    ended: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    stepping.drive(awaitable, ended.set_result)
    return await asyncio.wait_for(ended, 5)


# --- Starlette -------------------------------------------------------------------------------


def test_starlette_hands_the_endpoint_scope_receive_and_send_as_is() -> None:
    route = WebSocketRoute("/ws/presence", presence_socket)
    assert route.app is presence_socket, (
        f"starlette {starlette.__version__} wraps an ASGI endpoint: ws.py would be called "
        "with a WebSocket, not (scope, receive, send)"
    )
    app = create_app(load_settings())  # connects to nothing until its lifespan starts
    routes = [r for r in app.routes if isinstance(r, WebSocketRoute)]
    assert [r.app for r in routes] == [presence_socket]


# --- asyncio: coroutines stepped without a Task ----------------------------------------------


async def test_a_driven_coroutine_waits_on_futures_as_a_task_would() -> None:
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[int] = loop.create_future()
    tasks: list[asyncio.Task[Any] | None] = []

    async def work() -> int:
        await asyncio.sleep(0)  # a bare yield
        tasks.append(asyncio.current_task())
        value = await answer  # an asyncio future
        await asyncio.gather(asyncio.sleep(0.001), asyncio.sleep(0))
        async with asyncio.Lock():
            tasks.append(asyncio.current_task())
        return value + 1

    loop.call_later(0.01, answer.set_result, 41)
    outcome = await _outcome_of(work())
    assert type(outcome) is StopIteration, (
        f"{PYTHON}: asyncio's futures no longer follow the protocol stepping.py drives "
        f"(_asyncio_future_blocking): {outcome!r}"
    )
    assert outcome.value == 42
    assert tasks == [None, None]  # its later steps ran from callbacks, outside any Task


async def test_code_that_needs_a_task_fails_when_driven() -> None:
    # Why the store path must stay free of asyncio.timeout and the like: the next test
    # would fail like this.
    async def timed() -> None:
        await asyncio.sleep(0)
        async with asyncio.timeout(1):
            await asyncio.sleep(0)

    outcome = await _outcome_of(timed())
    assert isinstance(outcome, RuntimeError)


async def test_the_heartbeat_store_path_needs_no_task(any_redis: Any, store: RedisStore) -> None:
    if is_cluster(any_redis):
        # As the node does at start-up (app.py): ClusterBatcher.run would otherwise learn the
        # slot map inline, and redis-py's connect needs a Task (asyncio.timeout).
        await any_redis.initialize()
    leases = LeaseKeeper(PresenceService(store), lease_ttl=5.0)
    moved = CursorUpdate("c1", "main.1", sets_chapter=True, sets_move_path=True)
    for cursor in (NO_CURSOR, moved):
        outcome = await _outcome_of(leases.heartbeat("conn-1", "alice", "s1", cursor))
        assert type(outcome) is StopIteration, (
            "the heartbeat's store path now needs a current Task (asyncio.timeout, a "
            f"TaskGroup, an anyio scope?): ws_heartbeats.py cannot step it: {outcome!r}"
        )
        session = outcome.value
        assert isinstance(session, Session)
    assert (session.user_id, session.chapter_id, session.move_path) == ("alice", "c1", "main.1")


# --- uvicorn: its ASGI send ------------------------------------------------------------------


@dataclass
class _Probe:
    """A raw ASGI app that steps one send by hand, then sends to a client that went away."""

    first_step_finished: bool | None = None
    late_send_error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "websocket"
        try:
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            stalled = stepping.first_step(send({"type": "websocket.send", "text": "probe"}))
            self.first_step_finished = stalled is None
            if stalled is not None:
                await stepping.finish(*stalled)
            assert (await receive())["type"] == "websocket.disconnect"
            try:
                await send({"type": "websocket.send", "text": "too late"})
            except BaseException as exc:
                self.late_send_error = exc
        finally:
            self.done.set()


@pytest.fixture
def probe() -> Iterator[tuple[_Probe, int]]:
    """uvicorn (websockets-sansio, as the node runs it) serving a _Probe on loopback."""
    app = _Probe()
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, ws="websockets-sansio", lifespan="off",
        log_level="warning",
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-probe", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn exited during start-up"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield app, port
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "uvicorn did not stop"


async def test_uvicorn_sends_in_one_step_and_raises_oserror_once_the_client_is_gone(
    probe: tuple[_Probe, int],
) -> None:
    app, port = probe
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    frame = await asyncio.wait_for(reader.readexactly(2 + len("probe")), 5)
    assert frame == b"\x81\x05probe"  # a final text frame, unmasked, 5 bytes
    writer.transport.abort()  # gone, without a close frame
    assert await asyncio.to_thread(app.done.wait, 5)
    version = f"uvicorn {uvicorn.__version__}"
    assert app.first_step_finished, (
        f"{version}: a send to a writable socket no longer completes in its first step, so "
        "every message goes through a writer task (ws_connection.py, stepping.py)"
    )
    assert isinstance(app.late_send_error, OSError), (
        f"{version}: a send to a gone client raised {app.late_send_error!r}, not an OSError "
        "(ws_connection.py takes an OSError to mean the client is gone)"
    )
    writer.close()


# --- Starlette: its __call__, which web/ws_entry.py's NodeApp inlines ------------------------


def _statements_of(function: Any) -> list[ast.stmt]:
    """The statements of a method's body as parsed from its source (docstring left out)."""
    [definition] = ast.parse(textwrap.dedent(inspect.getsource(function))).body
    assert isinstance(definition, ast.AsyncFunctionDef), f"{function!r} is not `async def`"
    body = definition.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return body


def _is_the_shortcut(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.If) and "WS_PATH" in ast.unparse(statement.test)


def test_node_app_inlines_starlette_call_statement_for_statement() -> None:
    theirs = _statements_of(Starlette.__call__)
    ours = [s for s in _statements_of(NodeApp.__call__) if not _is_the_shortcut(s)]
    assert len(ours) == len(_statements_of(NodeApp.__call__)) - 1, "the WS shortcut moved"
    assert [ast.dump(s) for s in ours] == [ast.dump(s) for s in theirs], (
        f"starlette {starlette.__version__}: Starlette.__call__ is now\n"
        + "\n".join(ast.unparse(s) for s in theirs)
        + "\nbut NodeApp.__call__ (web/ws_entry.py) inlines\n"
        + "\n".join(ast.unparse(s) for s in ours)
    )


def _comparison_app(cls: type[Starlette], log: list[str]) -> Starlette:
    """An app with a route of each kind, a user middleware, an exception handler and a
    lifespan: built the same way as a plain Starlette and as a NodeApp."""

    async def home(request: Request) -> Response:
        return PlainTextResponse(f"{request.app is app} {request.state.started}")

    async def teapot(request: Request) -> Response:
        raise HTTPException(418, "short and stout")

    async def crash(request: Request) -> Response:
        raise RuntimeError("unhandled")

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(f"{websocket.app is app} {await websocket.receive_text()}")
        await websocket.close()

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return PlainTextResponse(f"handled {exc.detail}", exc.status_code)

    class Tagged:
        def __init__(self, inner: ASGIApp) -> None:
            self.inner = inner

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            async def tagged(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message["headers"], (b"x-tag", b"1")]}
                await send(message)

            await self.inner(scope, receive, tagged if scope["type"] == "http" else send)

    @contextlib.asynccontextmanager
    async def lifespan(started: Starlette) -> AsyncIterator[dict[str, Any]]:
        log.append(f"startup {started is app}")
        yield {"started": "yes"}
        log.append("shutdown")

    app = cls(
        routes=[
            Route("/", home, methods=["GET"]),
            Route("/teapot", teapot),
            Route("/crash", crash),
            WebSocketRoute("/ws/echo", echo),
        ],
        middleware=[Middleware(Tagged)],
        exception_handlers={HTTPException: on_http_error},
        lifespan=lifespan,
    )
    return app


def _answers(client: TestClient) -> list[tuple[int, str, str | None]]:
    answers = []
    for method, path in [
        ("GET", "/"),
        ("POST", "/"),  # 405 from the router
        ("GET", "/missing"),  # 404 from the router
        ("GET", "/teapot"),  # the app's exception handler (ExceptionMiddleware)
        ("GET", "/crash"),  # ServerErrorMiddleware's 500
        ("GET", "/ws/echo"),  # a WebSocket route asked over HTTP
    ]:
        response = client.request(method, path)
        answers.append((response.status_code, response.text, response.headers.get("x-tag")))
    return answers


def test_a_node_app_answers_as_the_starlette_it_inlines() -> None:
    seen: dict[str, Any] = {}
    for cls in (Starlette, NodeApp):
        log: list[str] = []
        app = _comparison_app(cls, log)
        assert app.middleware_stack is None, "the stack is no longer built lazily"
        with TestClient(app, raise_server_exceptions=False) as client:
            stack = app.middleware_stack
            assert stack is not None, "the lifespan did not build the middleware stack"
            answers = _answers(client)
            with client.websocket_connect("/ws/echo") as ws:
                ws.send_text("hi")
                answers.append((0, ws.receive_text(), None))
            assert app.middleware_stack is stack, "the stack was built more than once"
        seen[cls.__name__] = (answers, log)
    version = f"starlette {starlette.__version__}"
    plain_answers, plain_log = seen["Starlette"]
    assert plain_log == ["startup True", "shutdown"], f"{version}: the lifespan changed"
    assert plain_answers[0] == (200, "True yes", "1"), f"{version}: {plain_answers[0]}"
    assert [status for status, _, _ in plain_answers] == [200, 405, 404, 418, 500, 404, 0]
    assert seen["NodeApp"] == seen["Starlette"], (
        f"{version}: a NodeApp (web/ws_entry.py) no longer answers as a plain Starlette"
    )
