"""Errors as the transport renders them: `ApiError` and the JSON error handlers (REST), and
pydantic validation errors as plain problem lists (REST 422 bodies and WebSocket errors).

Every REST error is JSON: `{"error": <code>, "detail": <message or list of problems>}`.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from presence_svc.store import StoreUnavailable


class ApiError(Exception):
    """A REST error answer: HTTP status, error code, detail and extra headers."""

    def __init__(self, status: int, code: str, detail: Any, headers: dict[str, str] | None = None):
        super().__init__(code)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def validation_problems(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic errors as plain JSON: where, what, and the error type."""
    return [
        {"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


def _error(status: int, code: str, detail: Any, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error(exc.status, exc.code, exc.detail, exc.headers)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error(exc.status_code, code, exc.detail, dict(exc.headers or {}))


async def on_store_unavailable(request: Request, exc: Exception) -> Response:
    return _error(503, "unavailable", "presence storage is unreachable", {"Retry-After": "1"})


EXCEPTION_HANDLERS: dict[Any, Any] = {
    ApiError: on_api_error,
    HTTPException: on_http_error,
    StoreUnavailable: on_store_unavailable,
}
