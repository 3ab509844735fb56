"""Study affinity through a real nginx running deploy/nginx.conf in front of three real nodes.

Every socket of a study lands on one node, studies spread over the nodes, and a killed node's
studies move to the others, their clients resynced without a user_left flap. The figure it
prints (nodes reached per event, with and without the `hash` line) is in docs/capacity.md.
"""

from __future__ import annotations

import asyncio
import random
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from presence_svc.publisher import StudyEventPublisher
from presence_svc.redis.keys import Keys
from tests.deploy.nginx_proxy import NginxProxy
from tests.support import auth as support_auth
from tests.support.clients import Watcher
from tests.support.events import EventTap
from tests.support.nodes import node_factory, presence_env, private_redis
from tests.support.processes import NodeProcess, RedisServer

SECRET = "affinity-tests-secret-0123456789abcdef012345"
PREFIX = "affinity"
LEASE_TTL, GRACE, SWEEP = 1.5, 2.5, 0.1
STUDIES, VIEWERS = 12, 3


def token(user: str) -> str:
    return support_auth.token(user, secret=SECRET, ttl=600, studies="*")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with private_redis("needs") as server:
        yield server


@pytest.fixture
def nodes(redis_server: RedisServer, tmp_path: Path) -> Iterator[list[NodeProcess]]:
    """Three real nodes on the test's Redis, short lease and grace so failover is quick."""
    env = presence_env(
        redis_url=redis_server.url,
        jwt_secret=SECRET,
        key_prefix=PREFIX,
        sweep_interval=SWEEP,
        lease_ttl=LEASE_TTL,
        leave_grace=GRACE,
        drain_timeout="2",
    )
    with node_factory(env, tmp_path) as factory:
        yield [factory() for _ in range(3)]


ProxyFactory = Callable[..., NginxProxy]


@pytest.fixture
def proxy(nodes: list[NodeProcess], tmp_path: Path) -> Iterator[ProxyFactory]:
    """Start nginx with the repository's config over the three nodes."""
    started: list[NginxProxy] = []

    def start(affinity: bool = True) -> NginxProxy:
        servers = [f"127.0.0.1:{node.port}" for node in nodes]
        folder = tmp_path / f"nginx-{len(started)}"
        started.append(NginxProxy(servers, folder, affinity=affinity).start())
        return started[-1]

    try:
        yield start
    finally:
        for one in started:
            one.stop()


def upstream(watcher: Watcher) -> str:
    """The node nginx sent the handshake to (deploy/nginx.conf adds it to the 101)."""
    response = watcher.ws.response
    assert response is not None
    value: str = response.headers["X-Presence-Upstream"]
    return value.split(",")[-1].strip()  # "a, b" when a refused and b took it


async def open_shuffled(lb: NginxProxy, studies: list[str]) -> dict[str, list[Watcher]]:
    """VIEWERS sockets per study, opened in a shuffled order (viewers arrive interleaved)."""
    order = [(sid, n) for sid in studies for n in range(VIEWERS)]
    random.Random(15).shuffle(order)
    opened: dict[str, list[Watcher]] = {sid: [] for sid in studies}
    for sid, n in order:
        opened[sid].append(await Watcher.open(lb.ws_url, sid, token(f"{sid}-u{n}")))
    return opened


async def nodes_reached(redis_url: str, opened: dict[str, list[Watcher]]) -> list[int]:
    """How many nodes one event of each study reaches: PUBLISH's receiver count, checked by
    every socket of the study getting the event."""
    client = redis.Redis.from_url(redis_url)
    try:
        publisher = StudyEventPublisher(client, key_prefix=PREFIX)
        reached = [publisher.publish(sid, "study.probe", {"n": 1}) for sid in opened]
    finally:
        client.close()
    for watchers in opened.values():
        for watcher in watchers:
            await watcher.wait_until(lambda w: bool(w.events("study.probe")), what="the probe")
    return reached


async def close_all(opened: dict[str, list[Watcher]]) -> None:
    await asyncio.gather(*(w.close() for ws in opened.values() for w in ws))


async def test_a_study_lands_on_one_node_and_reaches_one_node_per_event(
    proxy: ProxyFactory, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    studies = [f"study-{n:02d}" for n in range(STUDIES)]
    hashed = await open_shuffled(proxy(affinity=True), studies)
    placement = {sid: {upstream(w) for w in ws} for sid, ws in hashed.items()}
    assert all(len(nodes) == 1 for nodes in placement.values()), placement
    assert len(set.union(*placement.values())) >= 2, f"studies did not spread: {placement}"
    with_affinity = await nodes_reached(redis_server.url, hashed)
    await close_all(hashed)

    spread = await open_shuffled(proxy(affinity=False), studies)
    without = await nodes_reached(redis_server.url, spread)
    await close_all(spread)

    assert with_affinity == [1] * STUDIES
    assert statistics.mean(without) > 1.3, without
    expected = 3 * (1 - (1 - 1 / 3) ** VIEWERS)
    with capsys.disabled():
        print(
            f"\nnginx affinity: {STUDIES} studies x {VIEWERS} viewers on 3 nodes: nodes reached"
            f" per event {statistics.mean(with_affinity):.2f} with `hash $arg_study_id"
            f" consistent`, {statistics.mean(without):.2f} round-robin"
            f" (random placement would give {expected:.2f})"
        )


async def test_a_killed_nodes_studies_move_without_a_leave(
    proxy: ProxyFactory,
    nodes: list[NodeProcess],
    redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lb = proxy(affinity=True)
    client = aioredis.Redis.from_url(redis_server.url)
    tap = EventTap(client, Keys(PREFIX))
    await tap.start()
    studies = [f"kill-{n:02d}" for n in range(6)]
    opened = await open_shuffled(lb, studies)
    for watchers in opened.values():
        for watcher in watchers:
            await watcher.send({"type": "heartbeat", "chapter_id": "ch1"})
        await watchers[0].wait_until(lambda w: len(w.events("presence.user_joined")) >= VIEWERS)
    home = {sid: upstream(ws[0]) for sid, ws in opened.items()}
    victim = next(n for n in nodes if f"127.0.0.1:{n.port}" == home[studies[0]])
    moving = [sid for sid in studies if home[sid] == f"127.0.0.1:{victim.port}"]

    victim.signal(signal.SIGKILL)
    killed = time.monotonic()
    victim.wait(5)
    for sid in moving:
        for watcher in opened[sid]:
            await watcher.wait_until(lambda w: w.closed, what="the dead node's sockets close")
            await watcher.close()
        # The clients reconnect through nginx, as a browser's client does after a drop.
        opened[sid] = [
            await Watcher.open(lb.ws_url, sid, token(f"{sid}-u{n}")) for n in range(VIEWERS)
        ]
        for watcher in opened[sid]:
            await watcher.send({"type": "heartbeat", "chapter_id": "ch1"})
    resynced = time.monotonic() - killed
    for sid, watchers in opened.items():
        (where,) = {upstream(w) for w in watchers}
        if sid in moving:
            assert where != f"127.0.0.1:{victim.port}", sid
            # The fresh snapshot still lists every viewer: the sessions outlived the node.
            users = {u["user_id"] for u in watchers[-1].snapshot["users"]}
            assert users == {f"{sid}-u{n}" for n in range(VIEWERS)}, watchers[-1].snapshot
        else:
            assert where == home[sid] and not any(w.closed for w in watchers), sid

    # A leave would come LEASE_TTL (the reap) + GRACE after the kill: wait that out, then
    # everything published on the studies' channels is known (the tap reads up to a marker).
    await asyncio.sleep(max(0.0, LEASE_TTL + GRACE + 10 * SWEEP + 1 - (time.monotonic() - killed)))
    events = await tap.drain()
    assert [e for e in events if e.type == "presence.user_left"] == []
    await close_all(opened)
    await tap.close()
    await client.aclose()
    with capsys.disabled():
        print(
            f"\nnginx affinity failover: {len(moving)} of {len(studies)} studies moved off the"
            f" killed node, {len(moving) * VIEWERS} sockets reconnected and resynced in"
            f" {resynced:.2f} s, no user_left"
        )
