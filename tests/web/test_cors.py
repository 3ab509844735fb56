"""CORS for REST from pages of other origins: PRESENCE_ALLOWED_ORIGINS (any origin when it is
empty), preflights answered, credentials never allowed, WebSockets untouched."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.middleware.cors import CORSMiddleware
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from presence_svc.app import cors
from presence_svc.web.cors import Cors
from tests.support.app import app_client, make_settings
from tests.support.auth import auth

ALLOWED = "https://app.example"
OTHER = "https://evil.example"


@pytest.fixture
def client() -> Iterator[TestClient]:
    with app_client(allowed_origins=f"{ALLOWED}, https://admin.example/") as tc:
        yield tc


def preflight(client: TestClient, origin: str, method: str = "POST") -> Any:
    return client.options(
        "/presence/heartbeat",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_a_preflight_from_an_allowed_origin_is_answered(client: TestClient) -> None:
    response = preflight(client, ALLOWED)
    assert response.status_code == 200
    headers = response.headers
    assert headers["access-control-allow-origin"] == ALLOWED
    assert {"GET", "POST", "DELETE"} <= set(headers["access-control-allow-methods"].split(", "))
    allowed_headers = headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed_headers and "content-type" in allowed_headers
    assert "access-control-allow-credentials" not in headers
    assert headers["access-control-max-age"] == "600"
    assert "origin" in headers["vary"].lower()


def test_an_origin_with_a_trailing_slash_in_the_setting_is_allowed(client: TestClient) -> None:
    response = preflight(client, "https://admin.example")
    assert response.headers["access-control-allow-origin"] == "https://admin.example"


def test_a_preflight_from_another_origin_is_refused(client: TestClient) -> None:
    response = preflight(client, OTHER)
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    refused_method = preflight(client, ALLOWED, method="PUT")
    assert refused_method.status_code == 400


def test_answers_name_the_allowed_origin_only(client: TestClient) -> None:
    body = {"study_id": "s1"}
    ok = client.post("/presence/heartbeat", json=body, headers={**auth(), "Origin": ALLOWED})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ALLOWED
    assert "Retry-After" in ok.headers["access-control-expose-headers"]
    assert "access-control-allow-credentials" not in ok.headers
    # An error answer too, so the page can read why.
    denied = client.get("/presence/s1", headers={"Origin": ALLOWED})
    assert denied.status_code == 401
    assert denied.headers["access-control-allow-origin"] == ALLOWED
    # Another origin: served (CORS is the browser's check), but without a grant to read it.
    other = client.get("/presence/s1", headers={**auth(), "Origin": OTHER})
    assert other.status_code == 200
    assert "access-control-allow-origin" not in other.headers


def test_a_request_without_an_origin_gets_no_cors_headers(client: TestClient) -> None:
    response = client.get("/presence/s1", headers=auth())
    assert response.status_code == 200
    assert not any(name.startswith("access-control-") for name in response.headers)


def test_no_setting_allows_any_origin_without_credentials() -> None:
    with app_client() as tc:
        response = preflight(tc, OTHER)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "*"
        plain = tc.get("/healthz", headers={"Origin": OTHER})
        assert plain.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in plain.headers


def test_websockets_pass_through(client: TestClient) -> None:
    path = "/ws/presence?study_id=s1"
    with client.websocket_connect(path, headers={**auth(), "Origin": ALLOWED}) as ws:
        assert ws.receive_json()["type"] == "connected"


# --- presence_svc.web.cors against Starlette's CORSMiddleware ----------------------------------

OPTIONS: list[dict[str, Any]] = [
    dict(cors(make_settings()).kwargs),  # any origin
    dict(cors(make_settings(allowed_origins=ALLOWED)).kwargs),
]
ANSWERS: list[dict[str, Any]] = [
    {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]},
    {"type": "http.response.start", "status": 200},  # no headers at all
    {"type": "http.response.start", "status": 404, "headers": [(b"vary", b"Accept-Encoding")]},
    {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"vary", b"Accept"), (b"x-a", b"1"), (b"vary", b"Cookie")],
    },
]
REQUESTS: list[dict[str, Any]] = [
    {"type": "http", "method": "GET", "headers": []},
    {"type": "http", "method": "POST", "headers": [(b"host", b"h"), (b"x-origin", b"no")]},
    {"type": "http", "method": "GET", "headers": [(b"origin", ALLOWED.encode())]},
    {"type": "http", "method": "GET", "headers": [(b"origin", OTHER.encode())]},
    {
        "type": "http",
        "method": "OPTIONS",
        "headers": [(b"origin", ALLOWED.encode()), (b"access-control-request-method", b"POST")],
    },
    {
        "type": "http",
        "method": "OPTIONS",
        "headers": [(b"origin", OTHER.encode()), (b"access-control-request-method", b"PUT")],
    },
    {"type": "http", "method": "OPTIONS", "headers": []},  # not a preflight: no Origin
    {"type": "websocket", "headers": [(b"origin", OTHER.encode())]},
]


def _through(middleware: Any, options: dict[str, Any], request: dict[str, Any], answer: Any) -> Any:
    """What `middleware(app, **options)` sends for `request` when the app answers `answer`."""
    sent: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(copy.deepcopy(answer))
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(middleware(app, **options)(copy.deepcopy(request), receive, send))
    return sent


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("request_scope", REQUESTS)
@pytest.mark.parametrize("answer", ANSWERS)
def test_the_short_way_answers_as_cors_middleware(
    options: dict[str, Any], request_scope: dict[str, Any], answer: dict[str, Any]
) -> None:
    ours = _through(Cors, options, request_scope, answer)
    assert ours == _through(CORSMiddleware, options, request_scope, answer)
    if request_scope["type"] == "http" and not request_scope["headers"]:  # the short way
        assert [v for n, v in ours[0]["headers"] if n == b"vary"][-1].endswith(b"Origin")
