"""One clock: a Redis freeze must not make nodes declare each other dead, and a node whose own
clock is 30 s off must neither disturb the users of other nodes nor close its own sockets.

Real node processes on their own redis-server: the freeze is SIGSTOP/SIGCONT of that server;
the skewed node runs under libfaketime (Debian package `faketime`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.faults.conftest import (
    GRACE,
    IDLE,
    LEASE_TTL,
    NodeFactory,
    node_env,
    record,
    study,
    token,
)
from tests.support.auth import bearer
from tests.support.clients import Watcher
from tests.support.nodes import node_factory
from tests.support.processes import NodeProcess, RedisServer
from tests.support.waiting import eventually_async

FREEZE = 4 * LEASE_TTL  # Redis stopped this long: every lease looks expired several times over
BEAT = 0.5  # seconds between a client's heartbeats
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
DECLARED_DEAD = "node was declared dead"


async def beating(socket: Watcher, stop: asyncio.Event) -> None:
    """A client's heartbeats every BEAT seconds until stopped (errors while Redis is away)."""
    while not stop.is_set():
        with contextlib.suppress(Exception):
            await socket.send({"type": "heartbeat"})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), BEAT)  # the client's pace, not a wait


@contextlib.asynccontextmanager
async def clients(
    sid: str, where: dict[str, NodeProcess]
) -> AsyncIterator[tuple[Watcher, dict[str, Watcher]]]:
    """A watcher of the study on the first node, and one heartbeating socket per user."""
    first = next(iter(where.values()))
    watcher = await Watcher.open(first.ws_url, sid, token("viewer"))
    sockets = {
        user: await Watcher.open(node.ws_url, sid, token(user)) for user, node in where.items()
    }
    stop = asyncio.Event()
    beats = [asyncio.create_task(beating(s, stop)) for s in sockets.values()]
    try:
        await watcher.wait_until(lambda w: len(w.events("presence.user_joined")) == len(where))
        yield watcher, sockets
    finally:
        stop.set()
        await asyncio.gather(*beats)
        await asyncio.gather(watcher.close(), *(s.close() for s in sockets.values()))


def flaps(watcher: Watcher, users: list[str]) -> dict[str, int]:
    """Events of `users` beyond their first join: leaves, re-joins, idles."""
    counts = {"user_left": 0, "user_joined": -len(users), "user_idle": 0, "user_away": 0}
    for event in watcher.events():
        kind = event["type"].removeprefix("presence.")
        if kind in counts and event["data"]["user_id"] in users:
            counts[kind] += 1
    return counts


async def sessions(node: NodeProcess, sid: str) -> dict[str, str]:
    """user -> session id, as Redis has them now (a leave and a re-join changes the id)."""
    async with httpx.AsyncClient(timeout=5) as http:
        reply = await http.get(f"{node.base_url}/presence/{sid}", headers=bearer(token("reader")))
    reply.raise_for_status()
    return {u["user_id"]: u["session_id"] for u in reply.json()["users"]}


async def readiness(node: NodeProcess) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=2) as http:
        reply = await http.get(node.base_url + "/readyz")
    report: dict[str, Any] = reply.json()
    return reply.status_code, report


async def test_a_redis_freeze_declares_no_node_dead(
    redis_server: RedisServer, nodes: NodeFactory
) -> None:
    # Calls wait out the freeze rather than time out, as in the run that found it: the
    # renewals queued in the stopped Redis run only after SIGCONT.
    running = [nodes(redis_socket_timeout="60") for _ in range(3)]
    sid = study()
    users = [f"u{n}" for n in range(len(running))]
    async with clients(sid, dict(zip(users, running, strict=True))) as (watcher, sockets):
        before = await sessions(running[0], sid)
        client = redis.Redis.from_url(redis_server.url)
        pid = int(client.info("server")["process_id"])
        client.close()

        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(FREEZE)  # the freeze itself
        finally:
            os.kill(pid, signal.SIGCONT)
        thawed = time.monotonic()

        async def all_ready() -> bool:
            codes = [(await readiness(node))[0] for node in running]
            return codes == [200] * len(running)

        await eventually_async(all_ready, within=30, what="every node ready after the freeze")
        record(
            "redis freeze",
            f"readyz of 3 nodes after a {FREEZE:.0f}s freeze",
            time.monotonic() - thawed,
        )
        # A wrong reap shows within a TTL of renewals plus the grace: wait all of it out.
        await asyncio.sleep(max(0.0, thawed + 2 * LEASE_TTL + GRACE + 1.0 - time.monotonic()))
        after = await sessions(running[0], sid)
        assert not any(s.closed for s in sockets.values())

    seen = flaps(watcher, users)
    dead = sum(node.log_text().count(DECLARED_DEAD) for node in running)
    record("redis freeze", "leave/join flaps of users with open sockets", seen["user_left"], "")
    record("redis freeze", "nodes that were declared dead", dead, "")
    assert dead == 0, [node.log_text() for node in running]
    assert (seen["user_left"], seen["user_joined"]) == (0, 0), seen
    assert after == before, "a session ended and began again during the freeze"


# --- a node whose clock is 30 s off --------------------------------------------------------------


class _SkewedNode(NodeProcess):
    """A node that is expected not to become ready (its clock is skewed): started once alive."""

    def _healthy(self) -> bool:
        return httpx.get(self.base_url + "/healthz", timeout=0.5).status_code == 200


@pytest.fixture
def skewed_node(redis_server: RedisServer, tmp_path: Path) -> Iterator[Any]:
    """Start a node whose clock is off by `offset` (faketime syntax: "+30s", "-30s")."""
    if shutil.which("faketime") is None or not FAKETIME_LIB.exists():
        pytest.skip("the skewed-clock tests need the Debian package faketime (libfaketime)")

    def start(offset: str) -> NodeProcess:
        # What `faketime -f <offset>` sets; the monotonic clock stays real for asyncio.
        faked = {
            "LD_PRELOAD": str(FAKETIME_LIB),
            "FAKETIME": offset,
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }
        return factory.start(faked)

    with node_factory(node_env(redis_server.url), tmp_path, _SkewedNode) as factory:
        yield start


def skew_metric(text: str) -> float:
    match = re.search(r"^presence_clock_skew_seconds (\S+)$", text, re.MULTILINE)
    assert match, "no presence_clock_skew_seconds in /metrics"
    return float(match.group(1))


@pytest.mark.parametrize("offset", ["+30s", "-30s"])
async def test_a_node_30s_off_disturbs_nobody_and_says_so(
    nodes: NodeFactory, skewed_node: Any, offset: str
) -> None:
    a = nodes()
    skewed: NodeProcess = skewed_node(offset)

    async def says_skewed() -> bool:
        return (await readiness(skewed))[1].get("clock") == "skewed"

    # Measured at registration, before the node serves anyone: skewed from its first answer.
    took = await eventually_async(says_skewed, within=5, what="readiness clock: skewed")
    record(f"clock {offset}", "readyz saying skewed once the node answers", took)
    sid = study()
    users = ["on-a-1", "on-a-2", "on-a-3", "on-skewed"]
    where = {user: a for user in users[:3]} | {users[3]: skewed}
    async with clients(sid, where) as (watcher, sockets):
        before = await sessions(a, sid)
        # Long enough for dozens of the skewed node's sweeps (each SWEEP) and several of its
        # lease ticks: with its own clock, every sweep would idle the users of node A.
        await asyncio.sleep(2 * IDLE / 2)
        after = await sessions(a, sid)
        closed = {user: s.close_code for user, s in sockets.items() if s.closed}

    seen = flaps(watcher, users)
    record(
        f"clock {offset}", "idle/leave/re-join flaps of 4 users over 5 s", sum(seen.values()), ""
    )
    assert closed == {}, (
        f"sockets closed (4401: their tokens looked expired or not yet valid): {closed}"
    )
    assert seen == {"user_left": 0, "user_joined": 0, "user_idle": 0, "user_away": 0}, seen
    assert after == before

    # The skewed node says so: a warning, the gauge, and readiness.
    status, report = await readiness(skewed)
    assert (status, report["clock"], report["status"]) == (503, "skewed", "not ready"), report
    async with httpx.AsyncClient(timeout=2) as http:
        measured = skew_metric((await http.get(skewed.base_url + "/metrics")).text)
        assert (await readiness(a))[1]["clock"] == "ok"
    record(f"clock {offset}", "skew measured by the node", measured)
    assert measured == pytest.approx(float(offset.removesuffix("s")), abs=1.0)
    assert "clock is" in skewed.log_text() and "off Redis's" in skewed.log_text()
