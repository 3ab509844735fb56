"""The ASGI application: routes, error handlers, and the node's start-up and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

from presence_svc.auth import TokenVerifier
from presence_svc.fanout import Fanout
from presence_svc.http import EXCEPTION_HANDLERS, ROUTES
from presence_svc.keys import Keys
from presence_svc.models import Thresholds
from presence_svc.node import Node
from presence_svc.redis_client import connect
from presence_svc.redis_store import RedisStore
from presence_svc.service import PresenceService
from presence_svc.settings import Settings
from presence_svc.sweeper import Sweeper
from presence_svc.ws import presence_socket

log = logging.getLogger(__name__)


def build_node(settings: Settings, redis: Any) -> Node:
    """Wire a node's parts around an open Redis client."""
    keys = Keys(settings.key_prefix)
    thresholds = Thresholds(settings.idle_after, settings.away_after, settings.expire_after)
    service = PresenceService(RedisStore(redis, keys, thresholds))
    if settings.jwt_secret is None:
        log.warning("using the built-in DEV JWT secret: anyone can mint tokens for this node")
    return Node(
        settings=settings,
        redis=redis,
        service=service,
        fanout=Fanout(redis, keys),
        sweeper=Sweeper(service, settings.sweep_interval),
        verifier=TokenVerifier(settings.effective_jwt_secret),
    )


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the node's background tasks and wait for them to end.

    A cancel can be lost: on Python 3.11, `asyncio.wait_for` (which redis-py uses for every
    socket write) swallows it when the inner call finishes in the same loop step, and the task
    then runs on. So the cancel is repeated until every task has ended.
    """
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    await asyncio.gather(*tasks, return_exceptions=True)


def create_app(settings: Settings, redis: Any = None) -> Starlette:
    """The node's ASGI app. Without `redis`, it connects as `settings` say at start-up."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = redis if redis is not None else await connect(settings)
        node = build_node(settings, client)
        app.state.node = node
        tasks = [
            asyncio.create_task(node.fanout.run(), name="fanout"),
            asyncio.create_task(node.sweeper.run(), name="sweeper"),
        ]
        log.info("node ready (key prefix %r)", settings.key_prefix)
        try:
            yield
        finally:
            await _stop(tasks)
            await node.fanout.close()
            if redis is None:
                await client.aclose()

    return Starlette(
        routes=[*ROUTES, WebSocketRoute("/ws/presence", presence_socket)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
