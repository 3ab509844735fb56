"""The sweep on Redis: the schedule of due studies, and the time-driven transitions of each.

RedisStore delegates its sweep here, and asks it for the schedule command its writes end with
(store.py has the contract; lua/schedule.lua, sweep_scan.lua, sweep_apply.lua and
reschedule.lua each operation).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from presence_svc.models import SweepReport, iso_from_ms
from presence_svc.redis.batch import Batcher, Command
from presence_svc.redis.calls import call, text, unavailable
from presence_svc.redis.cluster import ClusterBatcher
from presence_svc.redis.keys import Keys
from presence_svc.redis.scripts import Scripts, located

# The store's logger: a failed sweep step was logged under it before the sweep had a module of
# its own, and the JSON logs name it ("logger").
log = logging.getLogger("presence_svc.redis.store")

# How long an empty study keeps its seq (so watchers never see it go backwards meanwhile).
EMPTY_STUDY_TTL_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class _DueStudy:
    schedule_key: str
    study_id: str
    score: bytes


class RedisSweep:
    """Bounded sweep ticks: `studies_per_sweep` studies per schedule shard, `sessions_per_window`
    sessions per threshold window of a study (store.py's RedisStore has their meaning)."""

    def __init__(
        self,
        redis: Any,
        keys: Keys,
        scripts: Scripts,
        batch: Batcher | ClusterBatcher,
        publish: str,
        *,
        idle_ms: int,
        away_ms: int,
        expire_ms: int,
        studies_per_sweep: int,
        sessions_per_window: int,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._scripts = scripts
        self._batch = batch
        self._publish = publish
        self._idle_ms = idle_ms
        self._away_ms = away_ms
        self._expire_ms = expire_ms
        self._studies_per_sweep = studies_per_sweep
        self._sessions_per_window = sessions_per_window

    async def sweep(self, now_ms: int) -> SweepReport:
        due, more = await self._due_studies(now_ms)
        if not due:
            return SweepReport()
        scans = await self._run_each([self._scan(d, now_ms) for d in due])
        scanned = [(d, scan) for d, scan in zip(due, scans, strict=True) if scan is not None]
        applies = await self._run_each([self._apply(d, scan, now_ms) for d, scan in scanned])
        done = [(d, a) for (d, _), a in zip(scanned, applies, strict=True) if a is not None]
        await self._run_each([self._reschedule(d, reply) for d, reply in done])
        events = sum(int(reply[0]) for _, reply in done)
        # A study whose scan was cut by sessions_per_window is already due again.
        more = more or any(reply[1] and int(text(reply[1])) <= now_ms for _, reply in done)
        return SweepReport(studies=len(due), events=events, more_due=more)

    def schedule(self, study_id: str, due_ms: int, now_ms: int) -> Command:
        """The command that makes `study_id` due by `due_ms` (lua/schedule.lua)."""
        return call(
            self._scripts.schedule, [self._keys.schedule(study_id)], [study_id, due_ms, now_ms]
        )

    async def _due_studies(self, now_ms: int) -> tuple[list[_DueStudy], bool]:
        shards = self._keys.schedule_shards()
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.zrangebyscore(
                    shard,
                    "-inf",
                    now_ms,
                    start=0,
                    num=self._studies_per_sweep,
                    withscores=True,
                    score_cast_func=lambda raw: raw,
                )
            replies = await pipe.execute()
        due: list[_DueStudy] = []
        more = False
        for shard, hits in zip(shards, replies, strict=True):
            more = more or len(hits) >= self._studies_per_sweep
            due.extend(_DueStudy(shard, text(study), score) for study, score in hits)
        return due, more

    def _scan(self, due: _DueStudy, now_ms: int) -> Command:
        sk = self._keys.study(due.study_id)
        return call(
            self._scripts.sweep_scan,
            [sk.index, sk.meta, sk.leaving],
            [now_ms, self._idle_ms, self._away_ms, self._expire_ms, self._sessions_per_window],
        )

    def _apply(self, due: _DueStudy, scan: list[bytes], now_ms: int) -> Command:
        sk = self._keys.study(due.study_id)
        idle_wm, away_wm, expire_wm, *raw_users = scan
        users = [text(u) for u in raw_users]
        per_user = [key for u in users for key in (sk.session(u), sk.conns(u))]
        return call(
            self._scripts.sweep_apply,
            [sk.index, sk.meta, sk.channel, sk.leaving, *per_user],
            [
                now_ms,
                iso_from_ms(now_ms),
                self._idle_ms,
                self._away_ms,
                self._expire_ms,
                idle_wm,
                away_wm,
                expire_wm,
                EMPTY_STUDY_TTL_MS,
                self._publish,
                *users,
            ],
        )

    def _reschedule(self, due: _DueStudy, applied: list[Any]) -> Command:
        return call(
            self._scripts.reschedule, [due.schedule_key], [due.study_id, due.score, applied[1]]
        )

    async def _run_each(self, commands: Sequence[Command]) -> list[Any]:
        """Run each command as its own operation; a failing one is logged and yields None."""
        replies = await asyncio.gather(
            *(self._batch.run([command]) for command in commands), return_exceptions=True
        )
        out: list[Any] = []
        for reply in replies:
            if isinstance(reply, BaseException) and unavailable(reply):
                raise reply
            if isinstance(reply, BaseException):
                # Logged here, not raised: worded with its script and line as `reachable` would.
                error = located(reply) if isinstance(reply, ResponseError) else reply
                log.error("sweep step failed: %s", error)
                out.append(None)
            else:
                out.append(reply[0])
        return out
