"""The REST API's OpenAPI 3.1 document, generated from the pydantic models (`GET /openapi.json`).

Schemas come from pydantic models: the request body from `models.HeartbeatRequest`, the
responses from the `*Out` models of `web/schemas.py`. The document is built once, on first use,
and served as the same bytes after.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from presence_svc import __version__
from presence_svc.models import ID_PATTERN, HeartbeatRequest
from presence_svc.web.paging import DEFAULT_LIMIT, MAX_LIMIT
from presence_svc.web.schemas import (
    ErrorOut,
    HealthOut,
    LeaveOut,
    PageOut,
    PresenceOut,
    ReadinessOut,
    SessionOut,
    StatsOut,
    StudyStatsOut,
)

OPENAPI_VERSION = "3.1.0"
SECURITY_SCHEME = "bearerAuth"
_REF = "#/components/schemas/{model}"
_JSON = "application/json"

_MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (HeartbeatRequest, "validation"),
    (SessionOut, "serialization"),
    (PresenceOut, "serialization"),
    (PageOut, "serialization"),
    (LeaveOut, "serialization"),
    (ErrorOut, "serialization"),
    (HealthOut, "serialization"),
    (ReadinessOut, "serialization"),
    (StatsOut, "serialization"),
    (StudyStatsOut, "serialization"),
]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {_JSON: {"schema": schema}}


def _error(
    description: str,
    code: str,
    *,
    problems: bool = False,
    headers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A reusable error response: `ErrorOut` with this `error` code (and 422's problem list)."""
    detail: dict[str, Any] = {"type": "array"} if problems else {"type": "string"}
    schema = {
        "allOf": [
            _ref(ErrorOut),
            {"properties": {"error": {"const": code}, "detail": detail}},
        ]
    }
    response: dict[str, Any] = {"description": description, "content": _json(schema)}
    if headers:
        response["headers"] = headers
    return response


def _header(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "required": True, "schema": schema}


_RETRY_AFTER = _header("seconds to wait before trying again", {"type": "integer", "minimum": 1})

_RESPONSES: dict[str, Any] = {
    "InvalidJson": _error("The body is not JSON.", "invalid_json"),
    "Unauthorized": _error(
        "Token missing, malformed, forged or expired, or a malformed `studies` claim.",
        "unauthorized",
        headers={
            "WWW-Authenticate": _header("the scheme to use", {"type": "string", "const": "Bearer"})
        },
    ),
    "Forbidden": _error(
        "The token does not grant the study (when grants are required).", "forbidden"
    ),
    "NotAdmin": _error(
        'Not an operator\'s token: it must grant every study (`studies: "*"`) and carry '
        "`presence:admin` in its `scope` claim.",
        "forbidden",
    ),
    "NotFound": _error("No such route (e.g. an empty study id, or one with `/`).", "not_found"),
    "MethodNotAllowed": _error(
        "No such method on this path; `Allow` lists the methods it has.",
        "method_not_allowed",
        headers={"Allow": _header("the methods of this path", {"type": "string"})},
    ),
    "ValidationError": _error(
        "Unknown fields, wrong types, or ids or move paths that do not match the grammar: "
        "`detail` lists each problem as `{loc, msg, type}`.",
        "validation_error",
        problems=True,
    ),
    "RateLimited": _error(
        "More REST heartbeats from this user than the node allows.",
        "rate_limited",
        headers={"Retry-After": _RETRY_AFTER},
    ),
    "Unavailable": _error(
        "Presence storage (Redis) is unreachable.",
        "unavailable",
        headers={"Retry-After": _RETRY_AFTER},
    ),
}


def _responses(ok: dict[str, Any], *errors: tuple[int, str]) -> dict[str, Any]:
    responses = {"200": ok}
    for status, name in errors:
        responses[str(status)] = {"$ref": f"#/components/responses/{name}"}
    return responses


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": _json(schema)}


def _bearer() -> list[dict[str, list[str]]]:
    return [{SECURITY_SCHEME: []}]


def _readiness(status: str) -> dict[str, Any]:
    return {"allOf": [_ref(ReadinessOut), {"properties": {"status": {"const": status}}}]}


_STUDY_ERRORS = (
    (401, "Unauthorized"),
    (403, "Forbidden"),
    (404, "NotFound"),
    (422, "ValidationError"),
    (503, "Unavailable"),
)


def _page_parameters() -> list[dict[str, Any]]:
    return [
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "description": (
                "read one page of at most this many sessions, in user_id order (decimal "
                "digits only; at most once)"
            ),
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
        },
        {
            "name": "after",
            "in": "query",
            "required": False,
            "description": (
                "the page starts after this user id (exclusive): the previous page's `next`"
            ),
            "schema": {"type": "string", "pattern": ID_PATTERN},
        },
    ]


def _paths() -> dict[str, Any]:
    study_id = {
        "name": "study_id",
        "in": "path",
        "required": True,
        "description": "the study",
        "schema": {"type": "string", "pattern": ID_PATTERN},
    }
    return {
        "/presence/heartbeat": {
            "post": {
                "operationId": "heartbeat",
                "summary": "Join a study or stay in it, and set the cursor",
                "description": "A field left out keeps its value; `null` clears it.",
                "security": _bearer(),
                "requestBody": {"required": True, "content": _json(_ref(HeartbeatRequest))},
                "responses": _responses(
                    _ok("The session.", _ref(SessionOut)),
                    (400, "InvalidJson"),
                    (401, "Unauthorized"),
                    (403, "Forbidden"),
                    (422, "ValidationError"),
                    (429, "RateLimited"),
                    (503, "Unavailable"),
                ),
            }
        },
        "/presence/{study_id}": {
            "parameters": [study_id],
            "get": {
                "operationId": "get_presence",
                "summary": "Everyone present in a study, or one page of them",
                "description": (
                    "Without parameters, every session (`complete` true). With `limit` (or "
                    f"`after` alone, which reads {DEFAULT_LIMIT}), one page in user_id order "
                    "and `next`, the `after` of the next page. Each answer is read atomically "
                    "with its `seq` and the `counts` of the whole study."
                ),
                "security": _bearer(),
                "parameters": _page_parameters(),
                "responses": _responses(
                    _ok(
                        "The study's sessions (all, or a page), its counts and the seq.",
                        {"oneOf": [_ref(PresenceOut), _ref(PageOut)]},
                    ),
                    *_STUDY_ERRORS,
                ),
            },
            "delete": {
                "operationId": "leave",
                "summary": "Leave a study (succeeds also when there was no session)",
                "security": _bearer(),
                "responses": _responses(_ok("Left.", _ref(LeaveOut)), *_STUDY_ERRORS),
            },
        },
        "/presence/{study_id}/stats": {
            "parameters": [study_id],
            "get": {
                "operationId": "get_study_stats",
                "summary": "A study's users by status and the sockets watching it",
                "description": (
                    "Counts from the study's index by heartbeat age (no session is read), and "
                    "per live node its sockets watching the study and the watchers among them "
                    "(no heartbeat yet)."
                ),
                "security": _bearer(),
                "responses": _responses(
                    _ok("The study's counts.", _ref(StudyStatsOut)), *_STUDY_ERRORS
                ),
            },
        },
        "/stats": {
            "get": {
                "operationId": "get_stats",
                "summary": "Operators: the live nodes and the studies with the most users",
                "description": (
                    "Needs a token granting every study with the `presence:admin` scope. "
                    "Reads each live node's own report and counts at most a bounded sample "
                    "of studies (`exact` says whether it counted them all)."
                ),
                "security": _bearer(),
                "responses": _responses(
                    _ok("The overview.", _ref(StatsOut)),
                    (401, "Unauthorized"),
                    (403, "NotAdmin"),
                    (503, "Unavailable"),
                ),
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Liveness: the event loop answers",
                "security": [],
                "responses": _responses(_ok("Alive.", _ref(HealthOut))),
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics of this node (text exposition format)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The metrics.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Readiness: Redis and pub/sub answer and the node is not draining",
                "security": [],
                "responses": {
                    "200": _ok("Ready.", _readiness("ready")),
                    "503": _ok(
                        "Not ready: a check failed, or the node is draining.",
                        _readiness("not ready"),
                    ),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": _responses(_ok("The OpenAPI document.", {"type": "object"})),
            }
        },
    }


def build() -> dict[str, Any]:
    """A freshly built document (use `document()`, which builds it once)."""
    _, definitions = models_json_schema(_MODELS, ref_template=_REF)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "presence-svc",
            "version": __version__,
            "description": (
                "Who is in a collaborative chess study right now, what they are doing, and "
                "where their cursor is. Errors are JSON: `{error, detail}`. A method a path "
                "does not have gets 405 (`MethodNotAllowed`); a path that matches no route "
                "gets 404 (`NotFound`)."
            ),
        },
        "paths": _paths(),
        "components": {
            "schemas": definitions["$defs"],
            "responses": copy.deepcopy(_RESPONSES),
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": (
                        "A JWT: `sub` = user id, `exp` required; a `studies` claim (a list of "
                        'study ids, or `"*"`) grants studies.'
                    ),
                }
            },
        },
    }


@functools.cache
def _built() -> dict[str, Any]:
    return build()


def document() -> dict[str, Any]:
    """The document (a copy: callers may change it)."""
    return copy.deepcopy(_built())


@functools.cache
def document_bytes() -> bytes:
    """The document as the JSON `GET /openapi.json` serves."""
    return json.dumps(_built(), separators=(",", ":")).encode()
