"""Opening the node's Redis client: a real server (with retry) or the embedded dev Redis."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from presence_svc.settings import Settings

log = logging.getLogger(__name__)

CONNECT_ATTEMPTS = 10


def embedded_redis() -> Any:
    """An in-process Redis (fakeredis with Lua) for the single-node dev mode."""
    try:
        import fakeredis
    except ImportError:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "PRESENCE_REDIS_URL is unset and the embedded Redis is not installed: "
            "pip install 'presence-svc[embedded]' or set PRESENCE_REDIS_URL"
        ) from None
    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())


async def connect(settings: Settings) -> Any:
    """A connected client for `settings`, retrying a real server with capped backoff."""
    if settings.redis_url is None:
        log.warning(
            "SINGLE-NODE DEV MODE: embedded in-process Redis (PRESENCE_REDIS_URL is unset); "
            "state is lost on exit and no other node can share it"
        )
        return embedded_redis()
    client = Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=5,
        socket_timeout=10,
        socket_keepalive=True,
        health_check_interval=15,
    )
    delay = 0.2
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        try:
            await client.ping()
            return client
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if attempt == CONNECT_ATTEMPTS:
                await client.aclose()
                raise RuntimeError(f"cannot reach Redis after {attempt} attempts: {exc}") from exc
            log.warning("Redis not reachable (attempt %d): %s; retrying", attempt, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")
