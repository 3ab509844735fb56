"""REST endpoints: parse, authenticate, call the service, render JSON.

Every error is JSON: `{"error": <code>, "detail": <message or list of problems>}`. A token is
checked (401) before the request is validated (422) and the study grant (403) after.
"""

from __future__ import annotations

import math

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from presence_svc.metrics import CONTENT_TYPE
from presence_svc.models import HeartbeatRequest
from presence_svc.store import StoreUnavailable
from presence_svc.web.errors import ApiError, validation_problems
from presence_svc.web.openapi import document_bytes
from presence_svc.web.paging import page_request
from presence_svc.web.requests import authorize, node_of, principal, study_id


async def heartbeat(request: Request) -> Response:
    counted = node_of(request).metrics.heartbeats
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
    caller = principal(request)
    body = await request.body()
    try:
        payload = HeartbeatRequest.model_validate_json(body)
    except ValidationError as exc:
        problems = validation_problems(exc)
        if any(p["type"] == "json_invalid" for p in problems):
            raise ApiError(400, "invalid_json", "request body is not valid JSON") from None
        raise ApiError(422, "validation_error", problems) from None
    authorize(request, caller, payload.study_id)
    wait = node_of(request).rest_heartbeats.take(caller.user_id)
    if wait:
        retry = str(max(1, math.ceil(wait)))
        detail = f"more than {node_of(request).settings.rest_heartbeat_rate:g} heartbeats a second"
        raise ApiError(429, "rate_limited", detail, {"Retry-After": retry})
    service = node_of(request).service
    session = await service.heartbeat(caller.user_id, payload.study_id, payload.cursor())
    return JSONResponse(session.to_json())


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
    Route("/presence/heartbeat", heartbeat, methods=["POST"]),
    Route("/presence/{study_id}", study_presence, methods=["GET", "DELETE"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
