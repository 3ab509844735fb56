"""Node faults: kill -9, SIGTERM, a slow reader, a reconnect storm, and what is left behind."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis

from presence_svc.publisher import AsyncStudyEventPublisher
from presence_svc.redis.keys import Keys
from tests.faults.conftest import GRACE, LEASE_TTL, SWEEP, NodeFactory, record, study, token
from tests.support.clients import Watcher
from tests.support.processes import NodeProcess, RedisServer
from tests.support.waiting import eventually_async

SLACK = 1.5  # scheduling noise on a loaded 2-core machine


def leaves(watcher: Watcher, user: str) -> list[dict[str, object]]:
    return [e for e in watcher.events("presence.user_left") if e["data"]["user_id"] == user]


def joins(watcher: Watcher, user: str) -> list[dict[str, object]]:
    return [e for e in watcher.events("presence.user_joined") if e["data"]["user_id"] == user]


async def hold(node: NodeProcess, sid: str, user: str) -> Watcher:
    """A user's socket on `node` that heartbeats once, so it holds the user's session."""
    socket = await Watcher.open(node.ws_url, sid, token(user))
    await socket.send({"type": "heartbeat", "chapter_id": "ch1"})
    return socket


async def healthz(node: NodeProcess) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        report: dict[str, Any] = (await http.get(node.base_url + "/healthz")).json()
        return report


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_kill_9_node_its_users_leave_unless_they_reconnect(nodes: NodeFactory) -> None:
    a, b = nodes(), nodes()
    sid = study()
    watcher = await Watcher.open(a.ws_url, sid, token("viewer"))
    gone = await hold(b, sid, "gone")
    back = await hold(b, sid, "back")
    await watcher.wait_until(lambda w: len(w.events()) == 2, what="two joins")

    b.signal(signal.SIGKILL)
    killed = time.monotonic()
    b.wait(5)
    await asyncio.gather(gone.close(), back.close())
    # "back" reconnects to the other node within the grace; "gone" never returns.
    back = await hold(a, sid, "back")
    await watcher.wait_until(lambda w: bool(leaves(w, "gone")), within=LEASE_TTL + GRACE + 10)
    took = time.monotonic() - killed
    record("kill -9 node", "user_left of a user on the dead node", took)
    assert took <= LEASE_TTL + GRACE + SLACK
    # What must not happen has no event to await: wait out back's grace on the real nodes.
    await asyncio.sleep(GRACE + 3 * SWEEP)
    assert leaves(watcher, "back") == [] and len(joins(watcher, "back")) == 1
    assert len(leaves(watcher, "gone")) == 1
    await asyncio.gather(watcher.close(), back.close())


async def test_sigterm_drains_without_a_leave_join_flap(
    redis_server: RedisServer, nodes: NodeFactory
) -> None:
    a, b = nodes(), nodes()
    b_id = (await healthz(b))["node_id"]
    sid = study()
    watcher = await Watcher.open(a.ws_url, sid, token("viewer"))
    movers = [await hold(b, sid, f"tab-{n}") for n in range(5)]
    stayer = await hold(b, sid, "no-return")
    await watcher.wait_until(lambda w: len(w.events()) == 6, what="six joins")

    b.signal(signal.SIGTERM)
    asked = time.monotonic()
    for socket in [*movers, stayer]:
        await socket.wait_until(lambda s: s.closed, within=5, what="close on SIGTERM")
        assert socket.close_code == 1012
    record("SIGTERM", "sockets closed with 1012", time.monotonic() - asked)
    moved = [await hold(a, sid, f"tab-{n}") for n in range(5)]
    # uvicorn re-raises the signal once it has shut down cleanly, so the status says SIGTERM.
    assert b.wait(15) in (0, -signal.SIGTERM)
    record("SIGTERM", "node exited", time.monotonic() - asked)
    client = redis.Redis.from_url(redis_server.url)
    keys = Keys("faults")
    # It deregistered itself after releasing its leases: nobody has to reap it.
    assert client.zscore(keys.live_nodes, b_id) is None
    assert client.exists(keys.node_leases(b_id)) == 0
    client.close()
    await watcher.wait_until(lambda w: bool(leaves(w, "no-return")), within=GRACE + 10)
    await asyncio.sleep(GRACE)  # the movers' grace runs out on the real nodes: none may leave
    for n in range(5):
        assert leaves(watcher, f"tab-{n}") == [] and len(joins(watcher, f"tab-{n}")) == 1
    await asyncio.gather(watcher.close(), *(s.close() for s in moved))


async def test_slow_reader_is_dropped_without_delaying_others(
    redis_server: RedisServer, nodes: NodeFactory
) -> None:
    a = nodes(socket_queue_size="16")
    sid = study()
    fast = await Watcher.open(a.ws_url, sid, token("fast"))
    # A reader that stops reading: its client buffers little, so the node's queue fills.
    slow = await Watcher.open(a.ws_url, sid, token("slow"), max_queue=1)
    slow._reader.cancel()
    client = aioredis.Redis.from_url(redis_server.url)
    publisher = AsyncStudyEventPublisher(client, key_prefix="faults")
    payload = "x" * 32_768
    count = 400
    started = time.monotonic()
    # 16 MiB in about a second: far more than the slow socket's buffers, paced so that a
    # reader that keeps up (the fast one) never has 16 events queued.
    for n in range(count):
        await publisher.publish(sid, "study.bulk", {"n": n, "t": time.time(), "blob": payload})
        if n % 10 == 9:
            await asyncio.sleep(0.02)
    await fast.wait_until(lambda w: len(w.messages) == count, within=20, what="all events")
    record("slow reader", f"{count} x 32 KiB events to the fast reader", time.monotonic() - started)
    assert [m["data"]["n"] for m in fast.messages] == list(range(count))
    assert not fast.closed
    health = await healthz(a)
    assert health["slow_consumers"] == 1
    await client.aclose()
    # Drain what the slow client buffered: the node closed it with 1013.
    code = None
    try:
        while True:
            await asyncio.wait_for(slow.ws.recv(), 5)
    except Exception:
        code = slow.ws.close_code
    assert code == 1013
    await asyncio.gather(fast.close(), slow.close())


async def test_reconnect_storm_and_no_leaks(redis_server: RedisServer, nodes: NodeFactory) -> None:
    # A longer grace than the other tests: 400 reconnects on a loaded 2-core CI machine can
    # take several seconds, and the test is about what happens within the grace.
    grace = 10.0
    a, b = nodes(leave_grace=str(grace)), nodes(leave_grace=str(grace))
    sid = study()
    users = [f"user-{n}" for n in range(400)]
    watcher = await Watcher.open(a.ws_url, sid, token("viewer"))
    sockets = await asyncio.gather(*(hold(b, sid, u) for u in users))
    # Joins only: on a busy machine the first users can turn idle before the last one joins.
    await watcher.wait_until(
        lambda w: len(w.events("presence.user_joined")) == len(users), within=30, what="joins"
    )
    rss_before = rss_kib(a.pid)
    client = redis.Redis.from_url(redis_server.url)
    commands_before = client.info("stats")["total_commands_processed"]

    b.signal(signal.SIGTERM)
    started = time.monotonic()
    await asyncio.gather(*(s.wait_until(lambda s: s.closed, within=10) for s in sockets))
    await asyncio.gather(*(s.close() for s in sockets))
    moved = await asyncio.gather(*(hold(a, sid, u) for u in users))
    took = time.monotonic() - started
    record("reconnect storm", f"{len(users)} sockets moved to another node", took)
    assert took < grace, "the reconnects did not even fit in the grace period"
    # Past the whole grace of the real nodes: a leave of any moved user would have come by now.
    await asyncio.sleep(started + grace + 1.0 - time.monotonic())
    assert watcher.events("presence.user_left") == []
    assert len(watcher.events("presence.user_joined")) == len(users)
    grew = rss_kib(a.pid) - rss_before
    record("reconnect storm", "RSS growth of the receiving node", grew / 1024, "MiB")
    commands = client.info("stats")["total_commands_processed"] - commands_before
    record(
        "reconnect storm",
        "Redis commands (scripts included) per moved socket",
        commands / len(users),
        "cmd",
    )
    assert grew < 64 * 1024

    await asyncio.gather(watcher.close(), *(s.close() for s in moved))

    async def closed() -> bool:
        return bool((await healthz(a))["sockets"] == 0)

    await eventually_async(closed, within=5, what="node A closing every socket")
    health = await healthz(a)
    assert (health["sockets"], health["studies"], health["leases"]) == (0, 0, 0)
    numsub = client.pubsub_numsub(Keys("faults").channel(sid))[0][1]
    assert numsub == 0
    client.close()
