"""Several `presence-svc serve` processes on one real Redis, with real WebSocket clients.

Every test runs twice: on a single Redis, and on a local 3-master Redis Cluster
(PRESENCE_REDIS_CLUSTER, sharded pub/sub).

Watchers sit on one node, heartbeats arrive through others; every event must reach every
watcher exactly once, in seq order, within a sweep interval of its due time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.cluster import RedisCluster

from presence_svc.publisher import StudyEventPublisher
from presence_svc.redis.keys import Keys
from tests.conftest import _delete_prefix
from tests.support import auth as support_auth
from tests.support.auth import bearer
from tests.support.clients import Watcher, rest_heartbeat
from tests.support.cluster import crossslot_errors
from tests.support.processes import NodeProcess
from tests.support.waiting import eventually_async

pytestmark = pytest.mark.multinode

SECRET = "multinode-test-secret-of-at-least-32-bytes"
IDLE, AWAY, EXPIRE, SWEEP = 0.8, 1.6, 2.4, 0.1
GRACE, LEASE_TTL = 1.0, 1.0
# Allowed lateness of a sweep transition beyond one interval: process scheduling on a busy
# 2-core CI machine, not the design, is what this absorbs.
SLACK = 1.0


class Backend:
    """The Redis the nodes share: a single server, or a cluster given by a seed node."""

    def __init__(self, url: str, is_cluster: bool) -> None:
        self.url = url
        self.is_cluster = is_cluster

    def client(self) -> Any:
        return (
            RedisCluster.from_url(self.url) if self.is_cluster else redis.Redis.from_url(self.url)
        )

    def subscribers(self, client: Any, channel: str) -> int:
        """Subscriptions to a study channel (sharded ones in a cluster)."""
        if self.is_cluster:
            node = client.get_node_from_key(channel)
            [(_, sharded)] = client.pubsub_shardnumsub(channel, target_nodes=node)
            return int(sharded)
        count: int = client.pubsub_numsub(channel)[0][1]
        return count


@pytest.fixture(scope="module", params=["single", "cluster"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    on_cluster = request.param == "cluster"
    url: str = request.getfixturevalue("cluster_url" if on_cluster else "real_redis_url")
    backend = Backend(url, on_cluster)
    prefix = f"test-multinode-{uuid.uuid4().hex[:8]}"
    env = {
        "PRESENCE_REDIS_URL": url,
        "PRESENCE_REDIS_CLUSTER": "true" if on_cluster else "false",
        "PRESENCE_JWT_SECRET": SECRET,
        "PRESENCE_KEY_PREFIX": prefix,
        "PRESENCE_IDLE_AFTER": str(IDLE),
        "PRESENCE_AWAY_AFTER": str(AWAY),
        "PRESENCE_EXPIRE_AFTER": str(EXPIRE),
        "PRESENCE_SWEEP_INTERVAL": str(SWEEP),
        "PRESENCE_LEAVE_GRACE": str(GRACE),
        "PRESENCE_LEASE_TTL": str(LEASE_TTL),
    }
    logs: Path = tmp_path_factory.mktemp("nodes")
    nodes = [NodeProcess(env, logs) for _ in range(3)]
    try:
        for node in nodes:
            node.start()
        yield nodes, prefix, backend
    finally:
        for node in nodes:
            node.stop()
        for node in nodes:
            text = node.log_text()
            assert "Traceback" not in text, text
        if on_cluster:
            client = backend.client()
            try:
                # Every key and channel of one operation shared a slot: no master refused one.
                assert crossslot_errors(url) == 0
                for key in client.scan_iter(
                    match=f"{prefix}:*", target_nodes=RedisCluster.PRIMARIES
                ):
                    client.delete(key)
            finally:
                client.close()
        else:
            _delete_prefix(url, prefix)


def token(user: str) -> str:
    """A token of the nodes' secret granting every study."""
    return support_auth.token(user, secret=SECRET, ttl=600, studies="*")


def study() -> str:
    return f"study-{uuid.uuid4().hex[:10]}"


def when(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["data"]["timestamp"]).timestamp()


def assert_seq_run(watcher: Watcher, count: int) -> list[dict[str, Any]]:
    events = watcher.events()
    start = watcher.snapshot["seq"]
    assert [e["data"]["seq"] for e in events] == list(range(start + 1, start + 1 + count))
    return events


async def close_all(*watchers: Watcher) -> None:
    await asyncio.gather(*(w.close() for w in watchers))


async def test_lifecycle_reaches_every_watcher_once_in_order(cluster: Any) -> None:
    (a, b, c), _, _ = cluster
    sid = study()
    watchers = [
        await Watcher.open(a.ws_url, sid, token("viewer-1")),
        await Watcher.open(a.ws_url, sid, token("viewer-2")),
        await Watcher.open(c.ws_url, sid, token("viewer-3")),
    ]
    async with httpx.AsyncClient() as http:
        await rest_heartbeat(
            http, b.base_url, token("u1"), study_id=sid, chapter_id="ch1", move_path="main.1"
        )
        await rest_heartbeat(
            http,
            b.base_url,
            token("u1"),
            study_id=sid,
            chapter_id="ch1",
            move_path="main.12.var2.3",
        )
    # u2 heartbeats over its socket, which then holds the session: it turns idle and away but
    # only leaves a grace period after the socket closes.
    u2 = await Watcher.open(b.ws_url, sid, token("u2"))
    await u2.send({"type": "heartbeat", "chapter_id": "ch2"})

    def u2_away(w: Watcher) -> bool:
        return any(
            e["type"] == "presence.user_away" and e["data"]["user_id"] == "u2" for e in w.events()
        )

    await watchers[0].wait_until(u2_away, within=AWAY + 10, what="u2 away")
    # Real time on real nodes: past u2's expiry by heartbeat age, which the socket must outlive.
    await asyncio.sleep(EXPIRE)
    assert not any(e["data"]["user_id"] == "u2" for e in watchers[0].events("presence.user_left"))
    closed_at = time.time()
    await u2.close()

    def both_left(w: Watcher) -> bool:
        return sum(e["type"] == "presence.user_left" for e in w.events()) == 2

    for watcher in watchers:
        await watcher.wait_until(both_left, within=EXPIRE + 10, what="two user_left")
    await asyncio.sleep(3 * SWEEP)  # a duplicate has no event to await: it would be here by now

    reference = assert_seq_run(watchers[0], 9)
    for watcher in watchers[1:]:
        assert watcher.raw == watchers[0].raw
    by_user: dict[str, list[str]] = {}
    for event in reference:
        by_user.setdefault(event["data"]["user_id"], []).append(event["type"])
    assert by_user == {
        "u1": [
            "presence.user_joined",
            "presence.cursor_moved",
            "presence.user_idle",
            "presence.user_away",
            "presence.user_left",
        ],
        "u2": [
            "presence.user_joined",
            "presence.user_idle",
            "presence.user_away",
            "presence.user_left",
        ],
    }
    for user in ("u1", "u2"):
        events = [e for e in reference if e["data"]["user_id"] == user]
        last_beat = when(events[1] if user == "u1" else events[0])
        due = {"presence.user_idle": IDLE, "presence.user_away": AWAY, "presence.user_left": EXPIRE}
        for event in events:
            if event["type"] in due:
                base, wait = last_beat, due[event["type"]]
                if user == "u2" and event["type"] == "presence.user_left":
                    base, wait = closed_at, GRACE
                lateness = when(event) - base - wait
                assert -0.05 <= lateness <= SWEEP + SLACK, (event, lateness)
    assert reference[-1]["data"]["status"] == "away"
    await close_all(*watchers)


async def test_heartbeat_on_another_node_makes_an_idle_user_active(cluster: Any) -> None:
    (a, b, c), _, _ = cluster
    sid = study()
    watcher = await Watcher.open(a.ws_url, sid, token("viewer"))
    async with httpx.AsyncClient() as http:
        await rest_heartbeat(http, b.base_url, token("u1"), study_id=sid)
        await watcher.wait_until(
            lambda w: any(e["type"] == "presence.user_idle" for e in w.events()), what="idle"
        )
        session = await rest_heartbeat(http, c.base_url, token("u1"), study_id=sid)
        assert session["status"] == "active"
        await watcher.wait_until(lambda w: len(w.events()) == 3, what="user_active")
        response = await http.delete(f"{a.base_url}/presence/{sid}", headers=bearer(token("u1")))
        assert response.json() == {"status": "success"}
        await watcher.wait_until(lambda w: len(w.events()) == 4, what="user_left")
        listing = await http.get(f"{c.base_url}/presence/{sid}", headers=bearer(token("x")))
    # A left user must not turn idle or leave again: real sweeps, so real time to wait.
    await asyncio.sleep(IDLE + 3 * SWEEP)
    types = [e["type"] for e in assert_seq_run(watcher, 4)]
    assert types == [
        "presence.user_joined",
        "presence.user_idle",
        "presence.user_active",
        "presence.user_left",
    ]
    assert listing.json() == {
        "study_id": sid,
        "users": [],
        "total": 0,
        "counts": {"active": 0, "idle": 0, "away": 0},
        "seq": watcher.snapshot["seq"] + 4,
        "complete": True,
    }
    await watcher.close()


async def test_concurrent_heartbeats_through_two_nodes(cluster: Any) -> None:
    (a, b, c), _, _ = cluster
    sid = study()
    watchers = [
        await Watcher.open(a.ws_url, sid, token("viewer-a")),
        await Watcher.open(c.ws_url, sid, token("viewer-c")),
    ]
    users = [f"user-{n}" for n in range(12)]
    rounds = 4
    async with httpx.AsyncClient() as http:
        for step in range(rounds):
            await asyncio.gather(
                *(
                    rest_heartbeat(
                        http,
                        (b if (n + step) % 2 else c).base_url,
                        token(user),
                        study_id=sid,
                        chapter_id="ch1",
                        move_path=f"main.{step + 1}",
                    )
                    for n, user in enumerate(users)
                )
            )
        total = len(users) * rounds
        for watcher in watchers:
            await watcher.wait_until(lambda w: len(w.events()) >= total, what=f"{total} events")
        listing = (
            await http.get(f"{b.base_url}/presence/{sid}", headers=bearer(token("x")))
        ).json()
        await asyncio.gather(
            *(http.delete(f"{c.base_url}/presence/{sid}", headers=bearer(token(u))) for u in users)
        )
        for watcher in watchers:
            await watcher.wait_until(
                lambda w: len(w.events()) >= total + len(users), what="user_left of everyone"
            )
    await asyncio.sleep(3 * SWEEP)  # a duplicate has no event to await: it would be here by now
    events = assert_seq_run(watchers[0], total + len(users))
    assert watchers[1].raw == watchers[0].raw
    for user in users:
        mine = [(e["type"], e["data"]["move_path"]) for e in events if e["data"]["user_id"] == user]
        assert mine == [
            ("presence.user_joined", "main.1"),
            ("presence.cursor_moved", "main.2"),
            ("presence.cursor_moved", "main.3"),
            ("presence.cursor_moved", "main.4"),
            ("presence.user_left", "main.4"),
        ]
    assert listing["total"] == len(users)
    assert listing["seq"] == watchers[0].snapshot["seq"] + total
    assert {u["user_id"] for u in listing["users"]} == set(users)
    await close_all(*watchers)


async def test_backend_events_are_relayed_unchanged_by_every_node(cluster: Any) -> None:
    (a, _, c), prefix, backend = cluster
    sid = study()
    watchers = [
        await Watcher.open(a.ws_url, sid, token("viewer-a")),
        await Watcher.open(c.ws_url, sid, token("viewer-c")),
    ]
    client = backend.client()
    try:
        data = {"chapter_id": "ch1", "name": "Najdorf", "moves": [1, 2, 3], "seq": 99}
        receivers = StudyEventPublisher(client, key_prefix=prefix).publish(
            sid, "study.chapter_renamed", data
        )
    finally:
        client.close()
    assert receivers == 2
    for watcher in watchers:
        await watcher.wait_until(lambda w: len(w.messages) == 1, what="relayed event")
        assert watcher.messages == [{"type": "study.chapter_renamed", "data": data}]
    await close_all(*watchers)


async def test_nodes_hold_a_study_subscription_only_while_they_have_its_sockets(
    cluster: Any,
) -> None:
    (a, b, _), prefix, backend = cluster
    sid = study()
    channel = Keys(prefix).channel(sid)
    client = backend.client()

    def subscribers() -> int:
        return backend.subscribers(client, channel)

    try:
        assert subscribers() == 0
        first = await Watcher.open(a.ws_url, sid, token("v1"))
        second = await Watcher.open(a.ws_url, sid, token("v2"))
        third = await Watcher.open(b.ws_url, sid, token("v3"))
        assert subscribers() == 2  # one subscription per node, not per socket
        await close_all(first, third)

        def closed() -> bool:
            return bool(a.health()["sockets"] == 1 and b.health()["sockets"] == 0)

        # Each node has finished closing its socket (its fan-out is told before the count).
        await eventually_async(closed, within=15.0, what="the two sockets closed on their nodes")
        assert a.health()["studies"] == 1, "A dropped the study though `second` still watches"
        await eventually_async(lambda: subscribers() == 1, what="b's subscription dropped")
        await second.close()
        await eventually_async(lambda: subscribers() == 0, what="a's subscription dropped")
    finally:
        client.close()


async def test_an_oversized_message_closes_only_its_socket_with_1009(cluster: Any) -> None:
    (a, _, _), _, _ = cluster
    sid = study()
    bystander = await Watcher.open(a.ws_url, sid, token("bystander"))
    sender = await Watcher.open(a.ws_url, sid, token("sender"))
    await sender.ws.send('{"type": "ping", "pad": "' + "x" * 70_000 + '"}')
    await sender.wait_until(lambda w: w.closed, what="close on an oversized message")
    assert sender.close_code == 1009
    await bystander.send({"type": "ping"})
    await bystander.wait_until(lambda w: any(m["type"] == "pong" for m in w.messages))
    await bystander.close()
