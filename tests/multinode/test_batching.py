"""Batched delivery on real nodes: two `presence-svc serve` on one real Redis, real WebSockets.

Node A batches any study with more than 2 of its sockets (PRESENCE_BATCH_THRESHOLD=2, the
default window); node B has the default threshold (50), so the same big study is delivered
message by message there. Users move their cursors through sockets on B as fast as their
heartbeats go; the watchers on A apply the presence.batch frames by the protocol's rule.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import _delete_prefix
from tests.support import auth as support_auth
from tests.support.clients import Watcher
from tests.support.nodes import node_factory, presence_env
from tests.support.processes import NodeProcess

pytestmark = pytest.mark.multinode

SECRET = "multinode-batching-secret-of-32-bytes-at-least"
MOVERS = 4
MOVES = 15  # heartbeats per mover, sent back to back


@pytest.fixture
def nodes(real_redis_url: str, tmp_path: Path) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    prefix = f"test-batching-{uuid.uuid4().hex[:8]}"
    env = presence_env(redis_url=real_redis_url, jwt_secret=SECRET, key_prefix=prefix)
    try:
        with node_factory(env, tmp_path) as start:
            yield start(batch_threshold=2), start()
    finally:
        _delete_prefix(real_redis_url, prefix)


def token(user: str) -> str:
    return support_auth.token(user, secret=SECRET, ttl=600, studies="*")


class Applied:
    """A client's state from its snapshot and every frame since, applied by the rule."""

    def __init__(self, watcher: Watcher) -> None:
        self.seq: int = watcher.snapshot["seq"]
        self.cursors = {u["user_id"]: u["move_path"] for u in watcher.snapshot["users"]}
        self.batches = 0
        for message in watcher.messages:
            if message["type"] == "presence.batch":
                self.batch(message["data"])
            elif message["type"].startswith("presence."):
                seq = message["data"]["seq"]
                assert seq <= self.seq or seq == self.seq + 1, f"gap: {self.seq} then {seq}"
                self.event(message)
                self.seq = max(self.seq, seq)

    def batch(self, data: dict[str, Any]) -> None:
        self.batches += 1
        if data["first_seq"] is not None:
            assert data["first_seq"] <= self.seq + 1, f"gap: {self.seq} then batch {data}"
        for event in data["events"]:
            self.event(event)
        if data["last_seq"] is not None:
            self.seq = max(self.seq, data["last_seq"])

    def event(self, event: dict[str, Any]) -> None:
        data = event["data"]
        if not event["type"].startswith("presence.") or data["seq"] <= self.seq:
            return
        if event["type"] == "presence.user_left":
            self.cursors.pop(data["user_id"], None)
        else:
            self.cursors[data["user_id"]] = data["move_path"]


async def move(node: NodeProcess, study: str, user: str, paths: list[str]) -> Watcher:
    """A socket of `user` on `node` that heartbeats through `paths`, back to back."""
    socket = await Watcher.open(node.ws_url, study, token(user))
    for path in paths:
        await socket.send({"type": "heartbeat", "chapter_id": "ch1", "move_path": path})
    return socket


async def test_a_big_study_gets_batches_that_apply_without_a_gap_and_a_small_one_does_not(
    nodes: tuple[NodeProcess, NodeProcess],
) -> None:
    a, b = nodes
    big, small = f"big-{uuid.uuid4().hex[:8]}", f"small-{uuid.uuid4().hex[:8]}"
    watchers = [await Watcher.open(a.ws_url, big, token(f"viewer-{n}")) for n in range(3)]
    alone = await Watcher.open(a.ws_url, small, token("viewer-small"))

    paths = [f"main.{n}" for n in range(1, MOVES + 1)]
    movers = await asyncio.gather(
        *(move(b, big, f"mover-{n}", paths) for n in range(MOVERS)),
        move(b, small, "mover-small", paths[:3]),
    )
    final = {f"mover-{n}": paths[-1] for n in range(MOVERS)}

    def caught_up(watcher: Watcher) -> bool:
        return Applied(watcher).cursors == final  # Applied fails the test on a gap

    for watcher in watchers:
        await watcher.wait_until(caught_up, what="every mover's final cursor")
    async with httpx.AsyncClient() as http:
        listing = await http.get(
            f"{b.base_url}/presence/{big}", headers={"Authorization": f"Bearer {token('x')}"}
        )
    stored = {u["user_id"]: u["move_path"] for u in listing.json()["users"]}
    assert stored == final
    for watcher in watchers:
        applied = Applied(watcher)
        assert applied.seq == listing.json()["seq"]
        # Three sockets on A: every frame of the study is a batch, the same frame for each.
        assert applied.batches >= 1
        assert {m["type"] for m in watcher.messages} == {"presence.batch"}
        assert watcher.raw == watchers[0].raw

    # One socket: each event at once, as before.
    await alone.wait_until(lambda w: len(w.events()) == 3, what="the small study's three events")
    start = alone.snapshot["seq"]
    assert [(e["type"], e["data"]["seq"]) for e in alone.events()] == [
        ("presence.user_joined", start + 1),
        ("presence.cursor_moved", start + 2),
        ("presence.cursor_moved", start + 3),
    ]
    assert all(m["type"] != "presence.batch" for m in alone.messages)
    await asyncio.gather(*(w.close() for w in [*watchers, alone, *movers]))
