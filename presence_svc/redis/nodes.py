"""The node registry on Redis: which nodes are alive, the leases each holds, reaping the dead.

RedisStore delegates its node methods here (store.py has their contract).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from presence_svc.models import Lease
from presence_svc.redis.batch import Batcher, Command
from presence_svc.redis.calls import call, lease_member, parse_lease, text
from presence_svc.redis.cluster import ClusterBatcher
from presence_svc.redis.keys import Keys
from presence_svc.redis.scripts import Scripts
from presence_svc.store import NodeRenewal

log = logging.getLogger(__name__)

# Dead-node cleanup: nodes claimed per call, leases released per round trip, and how long a
# claimed cleanup may stay unfinished before another node takes it over.
REAP_NODES = 10
REAP_BATCH = 500
REAP_RETRY_MS = 30_000
# Members asked for per SSCAN page when a node reads its own lease set (a hint to Redis).
LEASE_PAGE = 1000

Release = Callable[[Sequence[Lease], int, int], Awaitable[int]]


class RedisNodes:
    def __init__(
        self,
        redis: Any,
        keys: Keys,
        scripts: Scripts,
        batch: Batcher | ClusterBatcher,
        release: Release,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._scripts = scripts
        self._batch = batch
        self._release = release

    async def renew(self, node_id: str, now_ms: int | None) -> NodeRenewal:
        keys = [self._keys.live_nodes, self._keys.dead_nodes]
        args = [node_id, "" if now_ms is None else now_ms]
        [(known, at_ms)] = await self._batch.run([call(self._scripts.renew_node, keys, args)])
        return NodeRenewal(bool(known), int(at_ms))

    async def reacquire(self, leases: Sequence[Lease]) -> list[bool]:
        if not leases:
            return []
        operations: list[list[Command]] = []
        for lease in leases:
            sk = self._keys.study(lease.study_id)
            member = lease_member(lease.study_id, lease.user_id, lease.holder)
            operations.append(
                [
                    ("SADD", self._keys.node_leases(lease.holder.node_id), member),
                    call(
                        self._scripts.acquire,
                        sk.of_hold(lease.user_id),
                        [lease.user_id, lease.holder.connection_id],
                    ),
                ]
            )
        replies = await asyncio.gather(*(self._batch.run(op) for op in operations))
        return [bool(reply[1]) for reply in replies]

    async def drop(self, node_id: str) -> None:
        # Only a node whose lease set is empty (an empty set is no key: nothing to delete). A
        # lease still listed means a release that never happened: the set and the liveness
        # entry stay, so the node is taken for dead after its TTL and a peer releases them.
        # (Not atomic, the two keys live on different slots; the node sends nothing at
        # shutdown but this.)
        left = await self._redis.scard(self._keys.node_leases(node_id))
        if left:
            log.warning("node %s still lists %d leases: left for a peer to reap", node_id, left)
            return
        await self._redis.zrem(self._keys.live_nodes, node_id)

    async def leases_of(self, node_id: str) -> list[Lease]:
        key = self._keys.node_leases(node_id)
        # A dict: SSCAN may return a member twice (the set was resized between two pages).
        found: dict[Lease, None] = {}
        cursor = 0
        while True:
            cursor, page = await self._redis.sscan(key, cursor, count=LEASE_PAGE)
            for raw in page:
                lease = parse_lease(node_id, raw)
                if lease is not None:
                    found[lease] = None
            if int(cursor) == 0:
                return list(found)

    async def reap(self, caller: str, lease_ttl_ms: int, grace_ms: int, now_ms: int | None) -> int:
        keys = [self._keys.live_nodes, self._keys.dead_nodes]
        at = "" if now_ms is None else now_ms
        args = [at, lease_ttl_ms, REAP_RETRY_MS, REAP_NODES, caller]
        [reply] = await self._batch.run([call(self._scripts.claim_dead_nodes, keys, args)])
        claimed_at, claimed = int(reply[0]), reply[1:]
        # The whole grace from the claim, on Redis's clock: a reap that comes late (after a
        # pause, an outage) gives the users of the dead node as long to come back as one on time.
        leave_at = claimed_at + grace_ms
        released = 0
        for i in range(0, len(claimed), 2):
            node_id = text(claimed[i])
            key = self._keys.node_leases(node_id)
            # Read, release, then remove: a reaper dying midway leaves the rest for the next.
            while batch := await self._redis.srandmember(key, REAP_BATCH):
                leases = [parse_lease(node_id, raw) for raw in batch]
                await self._release([lease for lease in leases if lease], leave_at, claimed_at)
                await self._redis.srem(key, *batch)
                released += len(batch)
            # Its report for /stats would expire by itself; a dead node's goes with it at once.
            await self._redis.delete(
                self._keys.node_stats(node_id),
                self._keys.node_watching(node_id),
                self._keys.node_watchers(node_id),
            )
            await self._redis.zrem(self._keys.dead_nodes, node_id)
        return released
