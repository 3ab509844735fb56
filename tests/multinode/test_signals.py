"""Signals across real node processes: two `presence-svc serve` on one real Redis, and on a local
Redis Cluster (SPUBLISH), with a WebSocket on each.

To show a socket did not get a signal, a backend publishes a marker after it on the same
channel: Redis and the nodes keep a channel's order, so a socket that gets the marker and not
the signal before it never will.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from presence_svc.publisher import StudyEventPublisher
from tests.conftest import _delete_prefix
from tests.support import auth as support_auth
from tests.support.clients import Watcher
from tests.support.nodes import NodeFactory, node_factory, presence_env
from tests.support.processes import NodeProcess

pytestmark = pytest.mark.multinode

SECRET = "multinode-signals-secret-of-32-bytes-at-least"


class Fleet:
    """Two nodes on one Redis, and a backend's publisher on the same Redis."""

    def __init__(self, nodes: list[NodeProcess], publisher: StudyEventPublisher) -> None:
        self.nodes = nodes
        self.publisher = publisher


@pytest.fixture(params=["single", "cluster"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    on_cluster = request.param == "cluster"
    url: str = request.getfixturevalue("cluster_url" if on_cluster else "real_redis_url")
    prefix = f"test-signals-{uuid.uuid4().hex[:8]}"
    env = presence_env(
        redis_url=url,
        redis_cluster="true" if on_cluster else "false",
        jwt_secret=SECRET,
        key_prefix=prefix,
    )
    client: Any = RedisCluster.from_url(url) if on_cluster else redis.Redis.from_url(url)
    try:
        with node_factory(env, tmp_path) as start:
            factory: NodeFactory = start
            nodes = [factory(), factory()]
            yield Fleet(nodes, StudyEventPublisher(client, key_prefix=prefix))
    finally:
        if on_cluster:
            for key in client.scan_iter(match=f"{prefix}:*", target_nodes=RedisCluster.PRIMARIES):
                client.delete(key)
        else:
            _delete_prefix(url, prefix)
        client.close()


def token(user: str) -> str:
    return support_auth.token(user, secret=SECRET, ttl=600, studies="*")


def signals(watcher: Watcher) -> list[dict[str, Any]]:
    return [m for m in watcher.messages if m["type"].startswith("signal.")]


def has(message: dict[str, Any]) -> Any:
    return lambda watcher: message in watcher.messages


async def mark(fleet: Fleet, study: str, n: int, *watchers: Watcher) -> None:
    """Publish a marker after what went before, and wait until every watcher has it."""
    marker = {"type": "test.marker", "data": {"n": n}}
    await asyncio.to_thread(fleet.publisher.publish, study, "test.marker", {"n": n})
    for watcher in watchers:
        await watcher.wait_until(has(marker), what=f"marker {n}")


async def test_a_signal_crosses_nodes_and_a_backend_s_reaches_every_socket(fleet: Fleet) -> None:
    a, b = fleet.nodes
    study = f"study-{uuid.uuid4().hex[:10]}"
    sender = await Watcher.open(a.ws_url, study, token("alice"))
    same_user = await Watcher.open(b.ws_url, study, token("alice"))
    bob = await Watcher.open(b.ws_url, study, token("bob"))
    watchers = (sender, same_user, bob)
    try:
        await sender.send(
            {"type": "signal", "name": "pointer", "data": {"chapter_id": "c1", "square": "e4"}}
        )
        crossed = {
            "type": "signal.pointer",
            "data": {"chapter_id": "c1", "square": "e4", "user_id": "alice"},
        }
        await bob.wait_until(has(crossed), what="alice's signal on the other node")
        await same_user.wait_until(has(crossed), what="alice's signal on her other socket")
        await mark(fleet, study, 1, *watchers)
        assert signals(sender) == []  # not echoed to the socket that sent it

        receivers = await asyncio.to_thread(
            fleet.publisher.publish_signal, study, "typing", "bot", {"chapter_id": "c1"}
        )
        assert receivers == 2  # one subscription per node
        typed = {"type": "signal.typing", "data": {"chapter_id": "c1", "user_id": "bot"}}
        for watcher in watchers:
            await watcher.wait_until(has(typed), what="the backend's signal")
        # Neither signal is a presence event: no seq, no session.
        assert all("seq" not in m["data"] for w in watchers for m in signals(w))
        assert all(not m["type"].startswith("presence.") for w in watchers for m in w.messages)
        assert sender.snapshot["users"] == []
    finally:
        await asyncio.gather(*(w.close() for w in watchers))
