"""The node in process: settings for tests, and a TestClient (lifespan included) on a Redis.

    with app_client(key_prefix=prefix, idle_after=0.2) as client:  # on a fresh fakeredis
        client.post("/presence/heartbeat", json={"study_id": "s1"}, headers=auth("alice"))

The Redis client the app runs on is closed before the app stops (in the app's event loop, the
only one its connections can be closed in); the app itself never closes a client handed to it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fakeredis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.testclient import TestClient

from presence_svc.app import create_app
from presence_svc.node import Node
from presence_svc.settings import Settings, load_settings
from tests.support.auth import SECRET
from tests.support.processes import free_port


def fresh_prefix() -> str:
    """A key prefix no other test uses."""
    return f"test-{uuid.uuid4().hex[:12]}"


def make_settings(key_prefix: str | None = None, **overrides: Any) -> Settings:
    """Settings of an in-process node: no Redis URL, the tests' secret, its own key prefix."""
    values: dict[str, Any] = {
        "redis_url": None,
        "jwt_secret": SECRET,
        "key_prefix": key_prefix or fresh_prefix(),
    }
    return load_settings(**{**values, **overrides})


def fake_redis() -> fakeredis.FakeAsyncRedis:
    """An asyncio fakeredis (with Lua) on a server of its own."""
    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())


def unreachable_redis() -> aioredis.Redis:
    """A client of a closed loopback port, without retries, so every call fails at once."""
    return aioredis.Redis(
        host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )


@contextmanager
def app_client(
    settings: Settings | None = None, *, redis: Any = None, **overrides: Any
) -> Iterator[TestClient]:
    """A started app on `redis` (default: a fresh fakeredis), which is closed on the way out.

    Either `settings`, or keyword overrides of `make_settings` (key_prefix among them).
    """
    if settings is not None and overrides:
        raise TypeError("give settings or overrides of make_settings, not both")
    chosen = settings if settings is not None else make_settings(**overrides)
    client = fake_redis() if redis is None else redis
    with TestClient(create_app(chosen, redis=client)) as tc:
        try:
            yield tc
        finally:
            tc.portal.call(client.aclose)  # type: ignore[union-attr]


def node_of(client: TestClient) -> Node:
    """The node behind a TestClient's app."""
    node: Node = client.app.state.node  # type: ignore[attr-defined]
    return node
