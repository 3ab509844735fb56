"""REST endpoints: parse, authenticate, call the service, render JSON.

Every error is JSON: `{"error": <code>, "detail": <message or list of problems>}`. A token is
checked (401) before the request is validated (422) and the study grant (403) after.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from prometheus_client import Counter
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from presence_svc import jsontext
from presence_svc.metrics import CONTENT_TYPE
from presence_svc.models import HeartbeatRequest, Session, rest_heartbeat_fields
from presence_svc.node import Node
from presence_svc.store import StoreUnavailable
from presence_svc.web.errors import ApiError, validation_problems
from presence_svc.web.openapi import document_bytes
from presence_svc.web.paging import page_request
from presence_svc.web.requests import (
    authorize,
    caller_of,
    check_grant,
    node_of,
    principal,
    study_id,
)


class Heartbeat:
    """`POST /presence/heartbeat`, a raw ASGI endpoint (a class, so Starlette's Route does not
    wrap it in a Request and a Response): the hottest REST call reads its header and body from
    the ASGI messages and sends its answer as two prepared messages.

    What it answers is unchanged: errors are raised as before and rendered by the app's handlers
    (web/errors.py); the common body takes the fast path of `models.rest_heartbeat_fields`,
    any other goes through pydantic as before, which produces the errors.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        node: Node = scope["app"].state.node
        try:
            body = await _heartbeat(node, scope, receive)
        except ApiError as exc:
            _counted(node.metrics.heartbeats, exc.code).inc()
            raise
        except StoreUnavailable:
            _counted(node.metrics.heartbeats, "unavailable").inc()
            raise
        _counted(node.metrics.heartbeats, "ok").inc()
        # What JSONResponse sends: the same headers in the same order.
        headers = [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


heartbeat = Heartbeat()
HEARTBEAT_PATH = "/presence/heartbeat"


class HeartbeatShortcut:
    """Middleware: `POST /presence/heartbeat` straight to its endpoint, past Starlette's
    ExceptionMiddleware and router, which cost a REST heartbeat several microseconds of
    wrappers and matching (docs/performance.md, "REST heartbeats").

    It takes only requests the router would hand to that endpoint with nothing left to decide
    (HEARTBEAT_PATH itself, no root_path, method POST; the heartbeat route comes first), and
    does with them what ExceptionMiddleware would: an error the endpoint raises (ApiError,
    StoreUnavailable) is answered by the handler the app registered for its class, found the
    same way; an exception without one goes on up to ServerErrorMiddleware (500), as it would
    from ExceptionMiddleware. Everything else takes the usual way. tests/web/test_rest_fast.py
    compares its answers with the router's.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != HEARTBEAT_PATH
            or scope["method"] != "POST"
            or scope.get("root_path")
        ):
            await self.app(scope, receive, send)
            return
        try:
            await heartbeat(scope, receive, send)
        except Exception as exc:
            handler = _handler(scope["app"].exception_handlers, exc)
            if handler is None:
                raise
            # The endpoint raises before it sends anything, so the answer is still to send.
            response = await handler(Request(scope, receive, send), exc)
            await response(scope, receive, send)
            # As Starlette does: a reused exception instance must not pile up tracebacks.
            exc.__traceback__ = None


def _handler(handlers: dict[Any, Any], exc: Exception) -> Any:
    """The handler ExceptionMiddleware would pick for `exc` (the endpoint raises no
    HTTPException, so status-code handlers never apply), or None."""
    for cls in type(exc).__mro__:
        if cls is Exception:  # Starlette hands that one to ServerErrorMiddleware
            return None
        if cls in handlers:
            return handlers[cls]
    return None


@functools.lru_cache(maxsize=64)
def _counted(counter: Counter, outcome: str) -> Any:
    # A child is the same object at every labels() call, which costs microseconds each.
    return counter.labels("rest", outcome)


async def _heartbeat(node: Node, scope: Scope, receive: Receive) -> bytes:
    caller = caller_of(node, _header(scope, b"authorization"))
    body = await _body(receive)
    fields = rest_heartbeat_fields(body)
    if fields is None:
        try:
            payload = HeartbeatRequest.model_validate_json(body)
        except ValidationError as exc:
            problems = validation_problems(exc)
            if any(p["type"] == "json_invalid" for p in problems):
                raise ApiError(400, "invalid_json", "request body is not valid JSON") from None
            raise ApiError(422, "validation_error", problems) from None
        fields = payload.study_id, payload.cursor()
    study, cursor = fields
    check_grant(node, caller, study)
    wait = node.rest_heartbeats.take(caller.user_id)
    if wait:
        retry = str(max(1, math.ceil(wait)))
        detail = f"more than {node.settings.rest_heartbeat_rate:g} heartbeats a second"
        raise ApiError(429, "rate_limited", detail, {"Retry-After": retry})
    return _session_json(await node.service.heartbeat(caller.user_id, study, cursor))


def _header(scope: Scope, name: bytes) -> str | None:
    """The first header `name` (lower case) of the request, as Starlette's Headers.get."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


async def _body(receive: Receive) -> bytes:
    """The whole request body, as Starlette's Request.body reads it (ClientDisconnect when
    the client goes away first)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk: bytes = message.get("body", b"")
            if not message.get("more_body", False):
                return b"".join([*chunks, chunk]) if chunks else chunk
            chunks.append(chunk)
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


def _session_json(session: Session) -> bytes:
    """`JSONResponse(session.to_json()).body`, byte for byte, through the C encoder built once
    (jsontext.py) instead of json.dumps building one per call."""
    return jsontext.compact(session.to_json()).encode()


async def get_presence(request: Request) -> Response:
    caller = principal(request)
    study = study_id(request)
    page = page_request(request.query_params)
    authorize(request, caller, study)
    service = node_of(request).service
    if page is None:
        presence = await service.presence(study)
    else:
        presence = await service.page(study, page.limit, page.after)
    return JSONResponse(presence.to_json())


async def leave(request: Request) -> Response:
    caller = principal(request)
    study = study_id(request)
    authorize(request, caller, study)
    await node_of(request).service.leave(caller.user_id, study)
    return JSONResponse({"status": "success"})


async def study_presence(request: Request) -> Response:
    # One route for both methods, so that a 405 on this path lists all of them in `Allow`.
    if request.method == "DELETE":
        return await leave(request)
    return await get_presence(request)


async def metrics(request: Request) -> Response:
    return Response(node_of(request).metrics.render(), media_type=CONTENT_TYPE)


async def healthz(request: Request) -> Response:
    return JSONResponse(node_of(request).liveness())


async def readyz(request: Request) -> Response:
    report = await node_of(request).readiness()
    return JSONResponse(report, status_code=200 if report["status"] == "ready" else 503)


async def openapi(request: Request) -> Response:
    # No token needed: the document describes the API, it holds no data.
    return Response(document_bytes(), media_type="application/json")


ROUTES = [
    Route(HEARTBEAT_PATH, heartbeat, methods=["POST"]),
    Route("/presence/{study_id}", study_presence, methods=["GET", "DELETE"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
