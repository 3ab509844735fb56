"""Redis Sentinel: the primary killed mid-traffic under two real nodes, and a replica promoted.

A primary, a replica and three sentinels (tests/support/processes.py SentinelDeployment, down
after 600 ms), all with a password; the nodes know only the sentinels.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.faults.conftest import SWEEP, NodeFactory, record, study, token
from tests.faults.test_redis_faults import seqs_after_last_snapshot
from tests.support.auth import bearer
from tests.support.clients import Watcher, rest_heartbeat
from tests.support.processes import NodeProcess, SentinelDeployment
from tests.support.waiting import eventually_async

PASSWORD = "sentinel-tests-password"


@pytest.fixture
def deployment() -> Iterator[SentinelDeployment]:
    if shutil.which("redis-server") is None:
        pytest.skip("Sentinel tests need redis-server on PATH")
    started = SentinelDeployment(password=PASSWORD).start()
    try:
        yield started
    finally:
        started.stop()


def on_sentinel(deployment: SentinelDeployment) -> dict[str, str]:
    """Node settings that name the sentinels, and how to talk to the primary they name."""
    return {
        "redis_sentinels": deployment.addresses,
        "redis_sentinel_master": deployment.master,
        # The host is the master's name by convention: it is not used.
        "redis_url": f"redis://:{PASSWORD}@{deployment.master}/0",
    }


async def ws_heartbeats(holder: Watcher, stop: asyncio.Event) -> None:
    """The holder's socket heartbeats every 100 ms until stopped (errors come back as messages)."""
    while not stop.is_set():
        await holder.send({"type": "heartbeat", "chapter_id": "ch1"})
        await asyncio.sleep(0.1)  # the pace of the traffic, not a wait


async def promoted(deployment: SentinelDeployment, old: tuple[str, int]) -> float:
    """Seconds until a majority of the sentinels name another primary."""
    started = time.monotonic()

    def moved() -> bool:
        current = deployment.current_primary()
        return current is not None and current != old

    await eventually_async(moved, within=30, what="a replica promoted", poll=0.05)
    return time.monotonic() - started


def user_ids(snapshot: dict[str, object]) -> set[str]:
    return {u["user_id"] for u in snapshot["users"]}  # type: ignore[attr-defined]


def seqs_never_go_back(watcher: Watcher) -> bool:
    """Every event's seq is above the last one the watcher had, unless a snapshot came between
    (a snapshot replaces the client's state, and may carry a lower seq after lost writes)."""
    last = watcher.snapshot["seq"]
    for message in watcher.messages:
        if message["type"] == "presence.snapshot":
            last = message["data"]["seq"]
        elif message["type"].startswith("presence."):
            if message["data"]["seq"] <= last:
                return False
            last = message["data"]["seq"]
    return True


async def test_the_primary_killed_mid_traffic_fails_over_to_the_replica(
    deployment: SentinelDeployment, nodes: NodeFactory
) -> None:
    a, b = nodes(**on_sentinel(deployment)), nodes(**on_sentinel(deployment))
    sid = study()
    watcher = await Watcher.open(a.ws_url, sid, token("viewer"))
    holder = await Watcher.open(b.ws_url, sid, token("u1"))
    stop = asyncio.Event()
    beats = asyncio.create_task(ws_heartbeats(holder, stop))
    traffic = asyncio.create_task(timed_traffic(b, sid, stop))
    try:
        await watcher.wait_until(lambda w: len(w.events("presence.cursor")) >= 5, what="traffic")
        old = ("127.0.0.1", deployment.primary.port)
        deployment.primary.kill()
        killed = time.monotonic()
        promotion = await promoted(deployment, old)
        record("sentinel failover", "replica promoted after the kill", promotion)
        await watcher.wait_until(lambda w: bool(w.snapshots()), within=20, what="a resync")
        record("sentinel failover", "resync snapshot after the kill", time.monotonic() - killed)
        await asyncio.sleep(1.0)  # a second of traffic on the new primary
        stop.set()
        await beats
        first_ok = answered_unavailable_until_promoted(await traffic, killed, promotion)
        record("sentinel failover", "first REST success after the kill", first_ok)
        # WebSocket heartbeats: `unavailable` errors only; the sockets stayed open.
        codes = {m["data"]["code"] for m in holder.messages if m["type"] == "error"}
        assert codes <= {"unavailable"}, codes
        assert not watcher.closed and not holder.closed
        await nothing_lost_after_the_resync(a, b, sid, watcher)
        assert deployment.replica.role() == "master"
    finally:
        stop.set()
        await asyncio.gather(beats, traffic, return_exceptions=True)
        await asyncio.gather(watcher.close(), holder.close())


def answered_unavailable_until_promoted(
    answers: list[tuple[float, int]], killed: float, promotion: float
) -> float:
    """REST answered 503 only, and only until the promotion, then 200 without a restart, for
    good; the seconds from the kill to the first success."""
    # Requests sent after the kill: one sent before may still be answered after it.
    after_kill = [(at - killed, code) for at, code in answers if at >= killed]
    first_ok = next((at for at, code in after_kill if code == 200), None)
    assert first_ok is not None, f"no success after the kill: {after_kill}"
    assert {code for _, code in after_kill if code != 200} <= {503}, after_kill
    assert any(code == 503 for _, code in after_kill), "the outage was not seen"
    assert all(code == 200 for at, code in after_kill if at >= first_ok), after_kill
    assert first_ok < promotion + 3.0, "the node took long to follow the promotion"
    return first_ok


async def nothing_lost_after_the_resync(
    a: NodeProcess, b: NodeProcess, sid: str, watcher: Watcher
) -> None:
    """Every later transition reaches the watcher, seq never goes back, no ghost user."""
    async with httpx.AsyncClient(timeout=5) as http:
        await rest_heartbeat(http, a.base_url, token("late"), study_id=sid)
        await watcher.wait_until(
            lambda w: any(e["data"]["user_id"] == "late" for e in w.events()), what="late joined"
        )
        left = await http.delete(f"{b.base_url}/presence/{sid}", headers=bearer(token("late")))
        assert left.status_code in (200, 204), left.text
        await watcher.wait_until(
            lambda w: any(e["data"]["user_id"] == "late" for e in w.events("presence.user_left")),
            what="late left",
        )
        await asyncio.sleep(3 * SWEEP)  # real node processes: three sweeps would show a stray
        floor, after = seqs_after_last_snapshot(watcher)
        assert after == list(range(floor + 1, floor + 1 + len(after))), "a transition was lost"
        assert seqs_never_go_back(watcher)
        now = await http.get(f"{a.base_url}/presence/{sid}", headers=bearer(token("viewer")))
    assert now.status_code == 200, now.text
    assert user_ids(now.json()) == {"u1", "mover"}, "a ghost user, or a lost one"


async def timed_traffic(
    node: NodeProcess, sid: str, stop: asyncio.Event
) -> list[tuple[float, int]]:
    """REST cursor moves of "mover" every 50 ms until stopped: when each was sent, and its
    status (0: no answer)."""
    answers: list[tuple[float, int]] = []
    step = 0
    async with httpx.AsyncClient(timeout=5) as http:
        while not stop.is_set():
            step += 1
            sent = time.monotonic()
            try:
                response = await http.post(
                    f"{node.base_url}/presence/heartbeat",
                    json={"study_id": sid, "chapter_id": "ch1", "move_path": f"main.{step}"},
                    headers=bearer(token("mover")),
                )
                answers.append((sent, response.status_code))
            except httpx.HTTPError:
                answers.append((sent, 0))
            await asyncio.sleep(0.05)  # the pace of the traffic, not a wait
    return answers
