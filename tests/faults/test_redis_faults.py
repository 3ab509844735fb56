"""Redis faults: a restart mid-traffic, and the pub/sub connection killed under the nodes."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import httpx
import redis

from tests.faults.conftest import GRACE, SWEEP, NodeFactory, record, study, token
from tests.support.auth import bearer
from tests.support.clients import Watcher, rest_heartbeat
from tests.support.processes import NodeProcess, RedisServer
from tests.support.waiting import eventually_async


def ready(node: NodeProcess) -> bool:
    try:
        return httpx.get(node.base_url + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def seqs_after_last_snapshot(watcher: Watcher) -> tuple[int, list[int]]:
    """The seq of the last snapshot the watcher got and the event seqs that followed it."""
    floor = watcher.snapshot["seq"]
    after: list[int] = []
    for message in watcher.messages:
        if message["type"] == "presence.snapshot":
            floor, after = message["data"]["seq"], []
        elif message["type"].startswith("presence."):
            after.append(message["data"]["seq"])
    return floor, after


async def cursor_traffic(base: str, sid: str, stop: asyncio.Event) -> list[int]:
    """REST cursor moves every 50 ms until stopped; the status code of each."""
    codes: list[int] = []
    step = 0
    async with httpx.AsyncClient(timeout=5) as http:
        while not stop.is_set():
            step += 1
            try:
                response = await http.post(
                    f"{base}/presence/heartbeat",
                    json={"study_id": sid, "chapter_id": "ch1", "move_path": f"main.{step}"},
                    headers=bearer(token("mover")),
                )
                codes.append(response.status_code)
            except httpx.HTTPError:
                codes.append(0)
            await asyncio.sleep(0.05)  # the pace of the traffic, not a wait
    return codes


async def test_redis_restart_mid_traffic(redis_server: RedisServer, nodes: NodeFactory) -> None:
    a, b = nodes(), nodes()
    sid = study()
    watcher = await Watcher.open(a.ws_url, sid, token("viewer"))
    holder = await Watcher.open(b.ws_url, sid, token("u1"))
    await holder.send({"type": "heartbeat", "chapter_id": "ch1"})
    await watcher.wait_until(lambda w: len(w.events()) >= 1, what="u1 joined")
    stop = asyncio.Event()
    traffic = asyncio.create_task(cursor_traffic(b.base_url, sid, stop))
    await asyncio.sleep(0.5)  # half a second of traffic before the outage

    redis_server.kill()
    killed = time.monotonic()
    detect = await eventually_async(lambda: not ready(a), within=10, what="A not ready")
    record("redis restart", "readyz not ready after kill", detect)

    async with httpx.AsyncClient(timeout=10) as http:
        started = time.monotonic()
        response = await http.post(
            f"{a.base_url}/presence/heartbeat",
            json={"study_id": sid},
            headers=bearer(token("u2")),
        )
        record("redis restart", "REST answer while Redis is down", time.monotonic() - started)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"] == "unavailable"
    await holder.send({"type": "heartbeat"})
    await holder.wait_until(
        lambda w: any(m["type"] == "error" for m in w.messages), what="an error for the heartbeat"
    )
    assert [m["data"]["code"] for m in holder.messages if m["type"] == "error"] == ["unavailable"]
    assert not watcher.closed and not holder.closed

    # Redis stays down 2 s of real time: the nodes' retries and liveness have to ride it out.
    await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - killed)))
    redis_server.start()
    restarted = time.monotonic()
    await watcher.wait_until(lambda w: bool(w.snapshots()), within=15, what="a fresh snapshot")
    record("redis restart", "resync snapshot after restart", time.monotonic() - restarted)
    for node in (a, b):
        await eventually_async(functools.partial(ready, node), within=15, what="ready again")
    record("redis restart", "readyz ready after restart", time.monotonic() - restarted)
    stop.set()
    codes = await traffic
    assert 503 in codes and codes[-1] == 200

    # The session held by u1's open socket survived; events after the resync are all there.
    resync = watcher.snapshots()[-1]
    assert "u1" in {u["user_id"] for u in resync["users"]}
    async with httpx.AsyncClient() as http:
        await rest_heartbeat(http, b.base_url, token("late"), study_id=sid)
    await watcher.wait_until(
        lambda w: any(e["data"]["user_id"] == "late" for e in w.events()), what="late joined"
    )
    # Real node processes: nothing to await for "no more events"; three sweeps would show one.
    await asyncio.sleep(3 * SWEEP)
    floor, after = seqs_after_last_snapshot(watcher)
    assert after == list(range(floor + 1, floor + 1 + len(after)))
    # No node mistook its peers for dead after the outage: u1 did not leave.
    await asyncio.sleep(GRACE)  # a wrong reap would have made u1 leave within the grace
    assert not [e for e in watcher.events("presence.user_left") if e["data"]["user_id"] == "u1"]
    await asyncio.gather(watcher.close(), holder.close())


async def test_pubsub_connection_killed(redis_server: RedisServer, nodes: NodeFactory) -> None:
    a, b = nodes(), nodes()
    sid = study()
    watchers = [
        await Watcher.open(a.ws_url, sid, token("viewer-a")),
        await Watcher.open(b.ws_url, sid, token("viewer-b")),
    ]
    stop = asyncio.Event()
    traffic = asyncio.create_task(cursor_traffic(a.base_url, sid, stop))
    for watcher in watchers:
        await watcher.wait_until(lambda w: len(w.events()) >= 3, what="traffic flowing")

    client: Any = redis.Redis.from_url(redis_server.url)
    try:
        killed_at = time.monotonic()
        killed = client.client_kill_filter(_type="pubsub")
    finally:
        client.close()
    assert killed == 2  # one pub/sub connection per node, not one per socket
    for watcher in watchers:
        await watcher.wait_until(lambda w: bool(w.snapshots()), within=5, what="resync snapshot")
        record("pubsub killed", "detect + resubscribe + snapshot", time.monotonic() - killed_at)
    await asyncio.sleep(1.0)  # a second of traffic after the resync
    stop.set()
    await traffic
    await asyncio.sleep(3 * SWEEP)  # the last events reach the watchers (real processes)
    for watcher in watchers:
        floor, after = seqs_after_last_snapshot(watcher)
        assert len(after) >= 5, "events flow again after the resync"
        assert after == list(range(floor + 1, floor + 1 + len(after))), "none lost after resync"
    assert watchers[0].raw[-5:] == watchers[1].raw[-5:]
    await asyncio.gather(*(w.close() for w in watchers))
