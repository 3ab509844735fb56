"""The stats of presence_svc/stats.py on Redis: each node's report, and bounded reads for operators.

What each call costs in Redis (S = schedule shards, 16; N = live nodes):
- `write_node` (each node, every PRESENCE_STATS_INTERVAL): one pipeline on the node's own hash
  tag: HSET of its 6 fields and PEXPIRE of its report, and for each of its two hashes per study
  (sockets, watchers) HSET/HDEL of the counts that changed and PEXPIRE; every FULL_WRITE_EVERY
  writes, first one round trip of an HKEYS of each, then all of their counts.
- `overview` (GET /stats): two round trips. ZRANGEBYSCORE of the live nodes (at most
  MAX_NODES), ZCARD and ZRANGE 0..STUDIES_PER_SHARD-1 of each shard; then HGETALL of each
  node's report (6 fields) and, per sampled study, ZCARD and two ZCOUNTs of its index
  (O(log n) each). At most S x STUDIES_PER_SHARD studies are counted: with more, the top list
  and the status counts are those of that sample (`exact` is false).
- `study` (GET /presence/{study_id}/stats): two round trips. The live nodes, ZCARD, two ZCOUNTs
  and an HGET of the study; then two HGETs per live node: its sockets and its watchers of the
  study.

Statuses are read from the index's heartbeat times against the thresholds (what the sweep
applies, within a sweep interval), never from the sessions themselves.

Redis refusing a read (an ACL without a command it needs, WRONGTYPE) is logged with Redis's
words and raised as StoreUnavailable: the endpoints answer their documented 503, never a bare
500, and what went wrong is in the node's log, not in the answer (which anyone granted a study
can get).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

from redis.exceptions import ResponseError

from presence_svc.models import Thresholds
from presence_svc.redis.batch import TIMEOUT
from presence_svc.redis.calls import reachable, text
from presence_svc.redis.keys import Keys
from presence_svc.stats import (
    CountChanges,
    NodeReport,
    NodeStats,
    Overview,
    StatusCounts,
    StudyCount,
    StudyStats,
)
from presence_svc.store import StoreUnavailable

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

MAX_NODES = 1000
STUDIES_PER_SHARD = 64
TOP_STUDIES = 10


def _int(value: bytes | str | None) -> int | None:
    try:
        return None if value is None else int(text(value))
    except ValueError:
        return None


def _float(value: bytes | str | None) -> float | None:
    try:
        return None if value is None else float(text(value))
    except ValueError:
        return None


def refusals_unavailable(
    method: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Log Redis refusing the read (an error reply: NOPERM, WRONGTYPE, ...) and raise it as
    StoreUnavailable. For the operators' reads only: they change nothing, and the node cannot
    serve them until its ACL or its keys are fixed, which is not the caller's doing (no 4xx).
    The lease and heartbeat paths keep their errors as calls.reachable reports them."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except ResponseError as exc:
            log.error("stats read %s refused by Redis: %s", method.__name__, exc)
            raise StoreUnavailable(f"Redis refused the stats read: {exc}") from exc

    return wrapper


class RedisStats:
    """Node reports and operators' reads on Redis (works on fakeredis and Redis Cluster).

    Every call has a deadline, `call_timeout` seconds, past which it fails with
    StoreUnavailable like any other way Redis can fail.
    """

    def __init__(
        self,
        redis: Any,
        keys: Keys,
        thresholds: Thresholds,
        *,
        call_timeout: float = TIMEOUT,
        studies_per_shard: int = STUDIES_PER_SHARD,
        top: int = TOP_STUDIES,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.call_timeout = call_timeout  # seconds (calls.reachable)
        self._idle_ms = round(thresholds.idle_after * 1000)
        self._away_ms = round(thresholds.away_after * 1000)
        self._studies_per_shard = studies_per_shard
        self._top = top

    @reachable
    async def write_node(
        self,
        node_id: str,
        report: NodeReport,
        events_per_second: float,
        watching: CountChanges,
        watchers: CountChanges,
        *,
        whole: bool,
        ttl_ms: int,
    ) -> None:
        """Store the node's report (see StatsStore.write_node)."""
        hashes = {
            self._keys.node_watching(node_id): watching,
            self._keys.node_watchers(node_id): watchers,
        }
        if whole:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in hashes:
                    pipe.hkeys(key)
                held = await pipe.execute()
            # Stale fields go after the new values are in: a reader never sees a count missing.
            hashes = {
                key: CountChanges(c.changed, [s for s in map(text, h) if s not in c.changed])
                for (key, c), h in zip(hashes.items(), held, strict=True)
            }
        stats = self._keys.node_stats(node_id)
        fields = {
            "sockets": report.sockets,
            "watchers": sum(report.watchers.values()),
            "studies": report.studies,
            "leases": report.leases,
            "events": report.events_published,
            "events_per_second": events_per_second,
        }
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(stats, mapping=fields)
            pipe.pexpire(stats, ttl_ms)
            for key, changes in hashes.items():
                if changes.changed:
                    pipe.hset(key, mapping=dict(changes.changed))
                if changes.dropped:
                    pipe.hdel(key, *changes.dropped)
                pipe.pexpire(key, ttl_ms)
            await pipe.execute()

    @reachable
    async def forget_node(self, node_id: str) -> None:
        """Delete the node's report."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(self._keys.node_stats(node_id))
            pipe.delete(self._keys.node_watching(node_id))
            pipe.delete(self._keys.node_watchers(node_id))
            await pipe.execute()

    @refusals_unavailable
    @reachable
    async def overview(self, now_ms: int, lease_ttl_ms: int) -> Overview:
        """The live nodes and the studies with the most users (see the module's costs)."""
        shards = self._keys.schedule_shards()
        async with self._redis.pipeline(transaction=False) as pipe:
            self._live_nodes(pipe, now_ms, lease_ttl_ms)
            for shard in shards:
                pipe.zcard(shard)
                pipe.zrange(shard, 0, self._studies_per_shard - 1)
            replies = await pipe.execute()
        live, per_shard = replies[0], replies[1:]
        total = sum(int(n) for n in per_shard[0::2])
        studies = sorted({text(s) for sampled in per_shard[1::2] for s in sampled})
        async with self._redis.pipeline(transaction=False) as pipe:
            for node_id, _ in live:
                pipe.hgetall(self._keys.node_stats(text(node_id)))
            for study_id in studies:
                self._count_users(pipe, study_id, now_ms)
            replies = await pipe.execute()
        nodes = tuple(
            _node_stats(text(node_id), now_ms - int(seen), report)
            for (node_id, seen), report in zip(live, replies[: len(live)], strict=True)
        )
        counts = replies[len(live) :]
        found = [
            StudyCount(study_id, _status_counts(counts[3 * i : 3 * i + 3]))
            for i, study_id in enumerate(studies)
        ]
        found = [s for s in found if s.users.total]  # emptied since the shard was read
        found.sort(key=lambda s: (-s.users.total, s.study_id))
        sessions = sum((s.users for s in found), StatusCounts())
        return Overview(nodes, total, len(studies), tuple(found[: self._top]), sessions)

    @refusals_unavailable
    @reachable
    async def study(self, study_id: str, now_ms: int, lease_ttl_ms: int) -> StudyStats:
        """One study's users by status, its seq, and the sockets and watchers of live nodes
        watching it."""
        async with self._redis.pipeline(transaction=False) as pipe:
            self._live_nodes(pipe, now_ms, lease_ttl_ms)
            self._count_users(pipe, study_id, now_ms)
            pipe.hget(self._keys.study(study_id).meta, "seq")
            live, card, active, idle, seq = await pipe.execute()
        watching = watchers = 0
        if live:
            async with self._redis.pipeline(transaction=False) as pipe:
                for node_id, _ in live:
                    pipe.hget(self._keys.node_watching(text(node_id)), study_id)
                    pipe.hget(self._keys.node_watchers(text(node_id)), study_id)
                counts = [_int(n) or 0 for n in await pipe.execute()]
            watching, watchers = sum(counts[0::2]), sum(counts[1::2])
        users = _status_counts([card, active, idle])
        return StudyStats(study_id, users, watching, watchers, _int(seq) or 0)

    def _live_nodes(self, pipe: Any, now_ms: int, lease_ttl_ms: int) -> None:
        pipe.zrangebyscore(
            self._keys.live_nodes, now_ms - lease_ttl_ms, "+inf", 0, MAX_NODES, withscores=True
        )

    def _count_users(self, pipe: Any, study_id: str, now_ms: int) -> None:
        # A session is idle once its heartbeat is `idle_ms` old, away at `away_ms` (the
        # boundaries of lua/sweep_scan.lua); three O(log n) counts, no session read.
        index = self._keys.study(study_id).index
        pipe.zcard(index)
        pipe.zcount(index, f"({now_ms - self._idle_ms}", "+inf")
        pipe.zcount(index, f"({now_ms - self._away_ms}", now_ms - self._idle_ms)


def _status_counts(replies: Sequence[Any]) -> StatusCounts:
    card, active, idle = (int(r) for r in replies)
    return StatusCounts(active, idle, max(0, card - active - idle))


def _node_stats(node_id: str, seen_ms_ago: int, report: Mapping[bytes, bytes]) -> NodeStats:
    fields = {text(k): v for k, v in report.items()}
    return NodeStats(
        node_id,
        max(0, seen_ms_ago),
        sockets=_int(fields.get("sockets")),
        watchers=_int(fields.get("watchers")),
        studies=_int(fields.get("studies")),
        leases=_int(fields.get("leases")),
        events_per_second=_float(fields.get("events_per_second")),
    )
