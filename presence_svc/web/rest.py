"""REST endpoints: parse, authenticate, call the service, render JSON.

Every error is JSON: `{"error": <code>, "detail": <message or list of problems>}`. A token is
checked (401) before the request is validated (422) and the study grant (403) after.
"""

from __future__ import annotations

import math
import re

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from presence_svc.auth import AuthError, Principal, bearer
from presence_svc.metrics import CONTENT_TYPE
from presence_svc.models import ID_PATTERN, HeartbeatRequest
from presence_svc.node import Node
from presence_svc.store import StoreUnavailable
from presence_svc.web.errors import ApiError, validation_problems
from presence_svc.web.openapi import document_bytes

_STUDY_ID = re.compile(ID_PATTERN)


def _node(request: Request) -> Node:
    node: Node = request.app.state.node
    return node


def _principal(request: Request) -> Principal:
    try:
        return _node(request).verifier.principal(bearer(request.headers.get("authorization")))
    except AuthError as exc:
        raise ApiError(401, "unauthorized", str(exc), {"WWW-Authenticate": "Bearer"}) from None


def _authorize(request: Request, principal: Principal, study_id: str) -> None:
    if _node(request).settings.study_grant_required and not principal.may_access(study_id):
        raise ApiError(403, "forbidden", f"the token grants no access to study {study_id!r}")


def _study_id(request: Request) -> str:
    study_id: str = request.path_params["study_id"]
    if not _STUDY_ID.fullmatch(study_id):
        raise ApiError(
            422,
            "validation_error",
            [{"loc": ["path", "study_id"], "msg": f"must match {ID_PATTERN}", "type": "pattern"}],
        )
    return study_id


async def heartbeat(request: Request) -> Response:
    counted = _node(request).metrics.heartbeats
    try:
        response = await _heartbeat(request)
    except ApiError as exc:
        counted.labels("rest", exc.code).inc()
        raise
    except StoreUnavailable:
        counted.labels("rest", "unavailable").inc()
        raise
    counted.labels("rest", "ok").inc()
    return response


async def _heartbeat(request: Request) -> Response:
    principal = _principal(request)
    body = await request.body()
    try:
        payload = HeartbeatRequest.model_validate_json(body)
    except ValidationError as exc:
        problems = validation_problems(exc)
        if any(p["type"] == "json_invalid" for p in problems):
            raise ApiError(400, "invalid_json", "request body is not valid JSON") from None
        raise ApiError(422, "validation_error", problems) from None
    _authorize(request, principal, payload.study_id)
    wait = _node(request).rest_heartbeats.take(principal.user_id)
    if wait:
        retry = str(max(1, math.ceil(wait)))
        detail = f"more than {_node(request).settings.rest_heartbeat_rate:g} heartbeats a second"
        raise ApiError(429, "rate_limited", detail, {"Retry-After": retry})
    service = _node(request).service
    session = await service.heartbeat(principal.user_id, payload.study_id, payload.cursor())
    return JSONResponse(session.to_json())


async def get_presence(request: Request) -> Response:
    principal = _principal(request)
    study_id = _study_id(request)
    _authorize(request, principal, study_id)
    presence = await _node(request).service.presence(study_id)
    return JSONResponse(presence.to_json())


async def leave(request: Request) -> Response:
    principal = _principal(request)
    study_id = _study_id(request)
    _authorize(request, principal, study_id)
    await _node(request).service.leave(principal.user_id, study_id)
    return JSONResponse({"status": "success"})


async def study_presence(request: Request) -> Response:
    # One route for both methods, so that a 405 on this path lists all of them in `Allow`.
    if request.method == "DELETE":
        return await leave(request)
    return await get_presence(request)


async def metrics(request: Request) -> Response:
    return Response(_node(request).metrics.render(), media_type=CONTENT_TYPE)


async def healthz(request: Request) -> Response:
    return JSONResponse(_node(request).liveness())


async def readyz(request: Request) -> Response:
    report = await _node(request).readiness()
    return JSONResponse(report, status_code=200 if report["status"] == "ready" else 503)


async def openapi(request: Request) -> Response:
    # No token needed: the document describes the API, it holds no data.
    return Response(document_bytes(), media_type="application/json")


ROUTES = [
    Route("/presence/heartbeat", heartbeat, methods=["POST"]),
    Route("/presence/{study_id}", study_presence, methods=["GET", "DELETE"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
