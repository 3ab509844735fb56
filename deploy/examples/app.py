"""An app backend with presence-svc as its sidecar (deploy/k8s/overlays/sidecar), end to end.

It does the three things an app does around its sidecar:

- mints its users' tokens (PyJWT, HS256, the sidecar's PRESENCE_JWT_SECRET), each granting the
  study the user opens: POST /login {"user_id": ..., "study_id": ...};
- publishes its own study events through Redis with presence_svc.publisher, which every node
  with watchers of the study relays to their sockets: POST /studies/{study_id}/rename;
- reads presence from its sidecar over loopback (APP_PRESENCE_URL):
  GET /studies/{study_id}/presence.

/login trusts the body: a real app authenticates the user first and grants only the studies
that user may see. Run it with `python deploy/examples/app.py` (settings from the environment:
PRESENCE_JWT_SECRET, PRESENCE_REDIS_URL, PRESENCE_KEY_PREFIX, APP_HOST, APP_PORT,
APP_DRAIN_TIMEOUT, APP_PRESENCE_URL).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import jwt
import redis.asyncio as aioredis
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from presence_svc.publisher import AsyncStudyEventPublisher

# The ids presence-svc accepts (presence_svc.models.ID_PATTERN); checked here for a clear 400.
ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
TOKEN_TTL_S = 3600


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def mint_token(secret: str, user_id: str, studies: list[str]) -> str:
    now = int(time.time())
    claims = {"sub": user_id, "iat": now, "exp": now + TOKEN_TTL_S, "studies": studies}
    return jwt.encode(claims, secret, algorithm="HS256")


async def _body(request: Request, *fields: str) -> dict[str, str] | JSONResponse:
    """The JSON body's `fields`, each a valid id (or a string for "name"), else a 400."""
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "the body must be JSON")
    values: dict[str, str] = {}
    for field in fields:
        value = body.get(field) if isinstance(body, dict) else None
        if not isinstance(value, str) or not (
            0 < len(value) <= 200 if field == "name" else ID.fullmatch(value)
        ):
            return _error(400, f"{field} is missing or invalid")
        values[field] = value
    return values


def build_app(env: dict[str, str]) -> Starlette:
    secret = env["PRESENCE_JWT_SECRET"]
    redis = aioredis.Redis.from_url(env["PRESENCE_REDIS_URL"])
    publisher = AsyncStudyEventPublisher(
        redis, key_prefix=env.get("PRESENCE_KEY_PREFIX", "presence")
    )
    sidecar = env.get("APP_PRESENCE_URL", "http://127.0.0.1:8000").rstrip("/")

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def login(request: Request) -> JSONResponse:
        body = await _body(request, "user_id", "study_id")
        if isinstance(body, JSONResponse):
            return body
        token = mint_token(secret, body["user_id"], [body["study_id"]])
        socket = f"/ws/presence?study_id={body['study_id']}"
        return JSONResponse({"token": token, "websocket": socket})

    async def rename(request: Request) -> JSONResponse:
        study_id = request.path_params["study_id"]
        body = await _body(request, "chapter_id", "name")
        if isinstance(body, JSONResponse):
            return body
        if not ID.fullmatch(study_id):
            return _error(400, "study_id is invalid")
        data = {"chapter_id": body["chapter_id"], "name": body["name"]}
        nodes = await publisher.publish(study_id, "study.chapter_renamed", data)
        return JSONResponse({"published": True, "nodes": nodes})

    async def presence(request: Request) -> JSONResponse:
        study_id = request.path_params["study_id"]
        if not ID.fullmatch(study_id):
            return _error(400, "study_id is invalid")
        # The app's own token for its sidecar's REST API, granting just this study.
        token = mint_token(secret, "example-app", [study_id])
        status, listing = await run_in_threadpool(_get, f"{sidecar}/presence/{study_id}", token)
        return JSONResponse(listing, status_code=status if status < 500 else 502)

    routes = [
        Route("/healthz", healthz),
        Route("/login", login, methods=["POST"]),
        Route("/studies/{study_id}/rename", rename, methods=["POST"]),
        Route("/studies/{study_id}/presence", presence),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await redis.aclose()

    return Starlette(routes=routes, lifespan=lifespan)


def _get(url: str, token: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError as exc:
        return 502, {"error": f"presence sidecar unreachable: {exc}"}


def main() -> None:
    env = dict(os.environ)
    uvicorn.run(
        build_app(env),
        # Every interface by default: in its pod, the Service reaches it on the pod's address.
        host=env.get("APP_HOST", "0.0.0.0"),
        port=int(env.get("APP_PORT", "8080")),
        timeout_graceful_shutdown=int(float(env.get("APP_DRAIN_TIMEOUT", "10"))),
    )


if __name__ == "__main__":
    main()
