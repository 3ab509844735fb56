"""Floods against a real node: the abuser is cut off, everyone else is served on time."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from tests.faults.conftest import NodeFactory, record, study, token
from tests.support.auth import bearer
from tests.support.clients import Watcher


async def ping_times(watcher: Watcher, count: int, gap: float) -> list[float]:
    """Round trips of `count` pings, one every `gap` seconds."""
    times: list[float] = []
    for _ in range(count):
        before = len([m for m in watcher.messages if m["type"] == "pong"])
        sent = time.monotonic()
        await watcher.send({"type": "ping"})
        await watcher.wait_until(
            lambda w, before=before: len([m for m in w.messages if m["type"] == "pong"]) > before,
            within=5,
            what="pong",
        )
        times.append(time.monotonic() - sent)
        await asyncio.sleep(gap)  # the pace of the pings, not a wait
    return times


async def test_floods_do_not_starve_other_clients(nodes: NodeFactory) -> None:
    # Limits as shipped (the fixture lifts the REST one for its traffic helper).
    node = nodes(rest_heartbeat_rate="10")
    sid = study()
    bystander = await Watcher.open(node.ws_url, sid, token("bystander"))
    flooder = await Watcher.open(node.ws_url, sid, token("flooder"))
    stop = asyncio.Event()
    statuses: dict[int, int] = {}

    async def rest_flood() -> None:
        headers = bearer(token("flooder"))
        async with httpx.AsyncClient(timeout=5) as http:
            while not stop.is_set():
                response = await http.post(
                    f"{node.base_url}/presence/heartbeat", json={"study_id": sid}, headers=headers
                )
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    async def socket_flood() -> None:
        frame = json.dumps({"type": "ping"})
        try:
            while not flooder.closed:
                await flooder.ws.send(frame)
                await asyncio.sleep(0)  # a send may not yield: leave the test's loop some air
        except Exception:
            return  # closed by the node

    floods = [asyncio.create_task(rest_flood()) for _ in range(4)]
    floods.append(asyncio.create_task(socket_flood()))
    times = await ping_times(bystander, 20, 0.05)
    stop.set()
    await asyncio.gather(*floods)

    record(
        "floods", "bystander ping p50 during floods", sorted(times)[len(times) // 2] * 1000, "ms"
    )
    record("floods", "bystander ping max during floods", max(times) * 1000, "ms")
    assert max(times) < 1.0
    assert flooder.close_code == 1008
    assert statuses.get(429, 0) > statuses.get(200, 0) > 0
    assert set(statuses) <= {200, 429}
    await bystander.close()
