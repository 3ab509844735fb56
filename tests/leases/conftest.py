"""The keeper's Node: a real PresenceService over RedisStore on fakeredis, the keeper on a
ManualTimer (tests/support/leases.py has the rest of what the lease tests share)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import pytest

from presence_svc.leases import LeaseKeeper
from presence_svc.redis.keys import Keys
from presence_svc.redis.store import RedisStore
from presence_svc.service import PresenceService
from tests.support.clock import FakeClock, ManualTimer
from tests.support.leases import GRACE_MS, KEEPER_TTL, TTL_MS, Node
from tests.support.store import THRESHOLDS


@pytest.fixture
async def node(key_prefix: str, clock: FakeClock, timer: ManualTimer) -> AsyncIterator[Node]:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)
    keys = Keys(key_prefix)
    store = RedisStore(client, keys, THRESHOLDS)
    service = PresenceService(store, clock, leave_grace=GRACE_MS / 1000, lease_ttl=TTL_MS / 1000)
    try:
        keeper = LeaseKeeper(service, KEEPER_TTL, monotonic=timer.monotonic, sleep=timer.sleep)
        yield Node(server, client, keys, store, service, keeper, clock, timer)
    finally:
        server.connected = True
        await client.aclose()
