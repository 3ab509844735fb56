"""What the lease tests (tests/leases/) share: their grace and TTL, leases, holds, looks at the
lease keys, and the keeper's Node (its fixture is tests/leases/conftest.py's `node`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from presence_svc.leases import LeaseKeeper
from presence_svc.models import CursorUpdate, Holder, Lease, Session, Status
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
from presence_svc.service import PresenceService
from tests.support.clock import FakeClock, ManualTimer
from tests.support.store import NO_CURSOR
from tests.support.tasks import stop

GRACE_MS = 10_000
TTL_MS = 5_000


def lease(study: str, user: str, conn: str, node: str = "n1") -> Lease:
    return Lease(study, user, Holder(node, conn))


async def hold(
    store: RedisStore,
    user: str,
    study: str,
    conn: str,
    now_ms: int,
    node: str = "n1",
    cursor: CursorUpdate = NO_CURSOR,
) -> Session:
    """A heartbeat over WebSocket `conn` of `node`."""
    return await store.heartbeat(user, study, cursor, now_ms, Holder(node, conn))


async def late_hold(
    store: RedisStore,
    client: Any,
    keys: Keys,
    user: str,
    study: str,
    conn: str,
    now_ms: int,
    node: str,
) -> None:
    """A heartbeat of closed socket `conn` that Redis applies after its release, once the
    scripts' record of that release is gone (past RELEASED_KEEP_MS, or RELEASED_MAX later
    releases): the ghost hold they cannot refuse, left for the keeper's pass."""
    await client.delete(keys.study(study).released(user))
    await hold(store, user, study, conn, now_ms, node=node)


async def smembers(client: Any, key: str) -> set[str]:
    return {m.decode() for m in await client.smembers(key)}


async def pending_leaves(client: Any, keys: Keys, study: str) -> dict[str, int]:
    rows = await client.zrange(keys.study(study).leaving, 0, -1, withscores=True)
    return {m.decode(): int(score) for m, score in rows}


async def holders(client: Any, keys: Keys, study: str, user: str) -> set[str]:
    return await smembers(client, keys.study(study).conns(user))


async def live_nodes(client: Any, keys: Keys) -> dict[str, int]:
    rows = await client.zrange(keys.live_nodes, 0, -1, withscores=True)
    return {m.decode(): int(score) for m, score in rows}


async def dead_nodes(client: Any, keys: Keys) -> dict[str, int]:
    rows = await client.zrange(keys.dead_nodes, 0, -1, withscores=True)
    return {m.decode(): int(score) for m, score in rows}


async def users_of(store: RedisStore, study: str) -> dict[str, Status]:
    view = await store.presence(study)
    return {s.user_id: s.status for s in view.sessions}


async def assert_gone(client: Any, keys: Keys, study: str, user: str) -> None:
    sk = keys.study(study)
    assert await client.exists(sk.session(user)) == 0
    assert await client.exists(sk.conns(user)) == 0
    assert await client.zscore(sk.index, user) is None
    assert await client.zscore(sk.leaving, user) is None


# The keeper's time (its renewal ticks) is a ManualTimer; the service's is FakeClock.
TICK = 1.0
KEEPER_TTL = 3 * TICK


@dataclass
class Node:
    server: Any
    client: Any
    keys: Keys
    store: RedisStore
    service: PresenceService
    keeper: LeaseKeeper
    clock: FakeClock
    timer: ManualTimer


@contextlib.asynccontextmanager
async def running(node: Node) -> AsyncIterator[asyncio.Task[None]]:
    """The keeper's loop, waiting for its first tick."""
    task = asyncio.create_task(node.keeper.run())
    try:
        await node.timer.wait_asleep()
        yield task
    finally:
        await stop(task)


async def redis_now_ms(node: Node) -> int:
    """Redis's time now (the clock renewals and reaps run on), in ms."""
    seconds, micros = await node.client.time()
    return int(seconds) * 1000 + int(micros) // 1000
