"""What one running node holds: its settings, Redis clients, service, fan-out and leases."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from presence_svc.auth import TokenVerifier
from presence_svc.clock import Clock, SystemClock
from presence_svc.coalesce import Coalescer
from presence_svc.codec import Outgoing
from presence_svc.fanout import Fanout
from presence_svc.leases import LeaseKeeper
from presence_svc.limits import KeyedBuckets
from presence_svc.metrics import Metrics
from presence_svc.redis.store import RedisStore
from presence_svc.service import PresenceService
from presence_svc.settings import Settings
from presence_svc.stats import NodeReport, OperatorStats, StatsWriter
from presence_svc.sweeper import Sweeper


@dataclass(eq=False)
class Node:
    settings: Settings
    redis: Any
    store: RedisStore
    service: PresenceService
    snapshots: Coalescer[Outgoing]  # study_id -> its presence.snapshot message
    fanout: Fanout
    sweeper: Sweeper
    leases: LeaseKeeper
    verifier: TokenVerifier
    rest_heartbeats: KeyedBuckets  # per user
    metrics: Metrics
    stats: OperatorStats  # operators' reads (GET /stats); the writer reports this node's own
    stats_writer: StatsWriter
    # Token expiry: the node's shared clock (leases.clock) in a running node; tests move it.
    clock: Clock = field(default_factory=SystemClock)
    sockets_by_user: Counter[str] = field(default_factory=Counter)
    draining: bool = False
    open_sockets: int = 0
    slow_consumers: int = 0  # sockets closed because they fell behind

    def count_slow_consumer(self) -> None:
        self.slow_consumers += 1

    def liveness(self) -> dict[str, Any]:
        """What /healthz reports: the loop answers, plus what the node holds right now."""
        return {
            "status": "ok",
            "node_id": self.leases.node_id,
            "sockets": self.open_sockets,
            "studies": self.fanout.studies,
            "leases": self.leases.held,
            "slow_consumers": self.slow_consumers,
        }

    def report(self) -> NodeReport:
        """What this node writes of itself for GET /stats (StatsWriter's input)."""
        return NodeReport(
            sockets=self.open_sockets,
            studies=self.fanout.studies,
            leases=self.leases.held,
            events_published=self.store.events_published,
            watching=self.fanout.watching(),
            watchers=self.fanout.watchers(),
        )

    async def redis_ready(self) -> bool:
        """True if Redis answers a PING within a second."""
        try:
            return bool(await asyncio.wait_for(self.redis.ping(), 1.0))
        except Exception:
            return False

    async def readiness(self) -> dict[str, Any]:
        """What /readyz reports; `ready` only if every check passes."""
        redis_ok = await self.redis_ready()
        checks = {
            "redis": "ok" if redis_ok else "unreachable",
            "pubsub": "ok" if self.fanout.connected else "reconnecting",
            "draining": self.draining,
        }
        clock_ok = not self.leases.clock.skewed
        checks["clock"] = "ok" if clock_ok else "skewed"
        ready = redis_ok and self.fanout.connected and not self.draining and clock_ok
        return {"status": "ready" if ready else "not ready", **checks}
