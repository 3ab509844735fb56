"""Scenario 4, the sweep: RedisStore.sweep(now) timed directly against 100k / 1M sessions.

Redis is filled with the documented layout (docs/redis-protocol.md) under a fresh prefix: a
Lua loop writes each study's session hashes, index and meta, the schedule shards get one entry
per study. Most studies are fresh (due only after the idle threshold); separate groups of
studies hold sessions already past it, parked far in the future in the schedule. Measured:
ticks with nothing due, then each group made due at once and swept until nothing is left,
which must publish exactly one user_idle per due session.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis

from presence_svc.bench import report
from presence_svc.bench.harness import Context
from presence_svc.bench.profiles import SweepProfile
from presence_svc.bench.runner import CpuWindow
from presence_svc.models import Thresholds
from presence_svc.redis.keys import Keys
from presence_svc.redis.scripts import script_source
from presence_svc.redis.store import RedisStore

THRESHOLDS = Thresholds(30.0, 300.0, 600.0)  # the service's defaults
IDLE_MS = 30_000
FILL_BATCH = 1000  # studies per fill script call: a few ms of Redis time each

_FILL = """
-- ARGV[1] key prefix, ARGV[2] last heartbeat (ms), ARGV[3] sessions per study, ARGV[4..] studies
local prefix, beat, per = ARGV[1], ARGV[2], tonumber(ARGV[3])
for i = 4, #ARGV do
  local sid = ARGV[i]
  local base = prefix .. ':{' .. sid .. '}:'
  local members = {}
  for u = 1, per do
    local uid = 'u' .. u
    redis.call('HSET', base .. 'session:' .. uid,
      'session_id', string.sub(redis.sha1hex(sid .. uid), 1, 32), 'user_id', uid,
      'study_id', sid, 'status', 'active', 'last_heartbeat', beat, 'joined_at', beat)
    members[#members + 1] = beat
    members[#members + 1] = uid
  end
  redis.call('ZADD', base .. 'index', unpack(members))
  redis.call('HSET', base .. 'meta', 'seq', per)
end
return #ARGV - 3
"""

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)  # the loop the nodes run on


async def _fill(
    client: Any, keys: Keys, studies: list[str], per: int, beat: int, due_at: int
) -> None:
    fill = client.register_script(_FILL)
    for start in range(0, len(studies), FILL_BATCH):
        await fill(args=[keys.prefix, beat, per, *studies[start : start + FILL_BATCH]])
    await _schedule(client, keys, studies, due_at)


async def _schedule(client: Any, keys: Keys, studies: list[str], due_at: int) -> None:
    shards: dict[str, dict[str, int]] = {}
    for study in studies:
        shards.setdefault(keys.schedule(study), {})[study] = due_at
    async with client.pipeline(transaction=False) as pipe:
        for shard, members in shards.items():
            items = list(members.items())
            for start in range(0, len(items), 5000):
                pipe.zadd(shard, dict(items[start : start + 5000]))
        await pipe.execute()


async def _delete_prefix(client: Any, prefix: str) -> None:
    cursor = 0
    while True:
        cursor, found = await client.scan(cursor, match=f"{prefix}:*", count=10_000)
        if found:
            await client.unlink(*found)
        if cursor == 0:
            return


async def _one_size(ctx: Context, sessions: int) -> list[dict[str, Any]]:
    p = ctx.profile.sweep
    keys = Keys(f"bench-{ctx.run_id}-sweep{sessions}")
    client = aioredis.Redis.from_url(ctx.redis_url)
    try:
        now = int(time.time() * 1000)
        stale = now - IDLE_MS - 5_000  # past idle, not yet away
        groups = {d: [f"d{d}-{i}" for i in range(d // p.sessions_per_study)] for d in p.due}
        row = await _fill_all(client, keys, p, sessions, groups, now, stale)
        for name in ("sweep_scan", "sweep_apply", "reschedule"):
            await client.script_load(script_source(name))  # as on a node that has swept before
        store = RedisStore(client, keys, THRESHOLDS)
        row.update(await _empty_ticks(store, now, p.empty_ticks))
        rows = [row]
        for due, studies in groups.items():
            await _schedule(client, keys, studies, stale + IDLE_MS)
            rows.append(await _sweep_due(ctx, store, now, due, row["sessions"]))
            if rows[-1]["events"] != len(studies) * p.sessions_per_study:
                raise RuntimeError(
                    f"{rows[-1]['events']} transitions for "
                    f"{len(studies) * p.sessions_per_study} due sessions"
                )
    finally:
        await _delete_prefix(client, keys.prefix)
        await client.aclose()
    return rows


async def _fill_all(
    client: Any,
    keys: Keys,
    p: SweepProfile,
    sessions: int,
    groups: dict[int, list[str]],
    now: int,
    stale: int,
) -> dict[str, Any]:
    """Fill Redis: fresh studies due after the idle threshold, then the stale `groups` parked
    far in the future; the start of the "nothing due" row (the size, fill time and memory)."""
    per = p.sessions_per_study
    fresh = [f"f{i}" for i in range((sessions - sum(p.due)) // per)]
    started = time.perf_counter()
    await _fill(client, keys, fresh, per, now, now + IDLE_MS)
    for studies in groups.values():
        await _fill(client, keys, studies, per, stale, now + 10**9)  # parked: not due
    fill_s = time.perf_counter() - started
    memory = (await client.info("memory"))["used_memory"]
    total = (len(fresh) + sum(map(len, groups.values()))) * per
    return {
        "kind": "nothing due",
        "sessions": total,
        "studies": total // per,
        "fill_s": round(fill_s, 1),
        "redis_used_mib": round(memory / 2**20),
    }


async def _empty_ticks(store: RedisStore, now: int, ticks: int) -> dict[str, Any]:
    durations = []
    for _ in range(ticks):
        t0 = time.perf_counter_ns()
        tick = await store.sweep(now)
        durations.append(time.perf_counter_ns() - t0)
        assert tick.studies == 0, tick
    return {"ticks": ticks, "tick_ms": report.percentiles_ms(durations)}


async def _sweep_due(
    ctx: Context, store: RedisStore, now: int, due: int, sessions: int
) -> dict[str, Any]:
    """Sweep until nothing is due (1000 ticks at most), the Redis and harness CPU measured."""
    window = CpuWindow({"harness": os.getpid(), "redis": ctx.redis_pid}).start()
    events = ticks = 0
    while ticks < 1000:
        tick = await store.sweep(now)
        events += tick.events
        ticks += 1
        if not tick.more_due:
            break
    window.stop()
    return {
        "kind": f"{due:,} due",
        "sessions": sessions,
        "due": due,
        "ticks": ticks,
        "events": events,
        "sweep_ms": round(window.wall * 1000, 1),
        "us_per_transition": report.us_each(window.wall, max(events, 1)),
        "harness_cpu_us_per_transition": report.us_each(window.cpu["harness"], max(events, 1)),
        "redis_cpu_us_per_transition": report.us_each(window.cpu.get("redis"), max(events, 1)),
    }


def run(ctx: Context) -> dict[str, Any]:
    p = ctx.profile.sweep
    ctx.emit(
        f"RedisStore.sweep(now) called directly from the harness; {p.sessions_per_study} "
        f"sessions per study; {p.empty_ticks} ticks with nothing due per size"
    )
    rows: list[dict[str, Any]] = []
    for sessions in p.sessions:
        rows += _run(_one_size(ctx, sessions))
    ctx.emit(_table(rows))
    plots = [_plot(ctx, rows)] if len(p.sessions) > 1 or len(p.due) > 1 else []
    return {
        "config": asdict(p),
        "rows": rows,
        "targets": _targets(rows),
        "plots": [str(x) for x in plots if x is not None],
    }


def _table(rows: list[dict[str, Any]]) -> str:
    return report.table(
        "Sweep (ms: wall time; us: microseconds; CPU read from /proc in 10 ms steps)",
        [
            "sessions",
            "measured",
            "fill s",
            "redis MiB",
            "tick p50 ms",
            "tick p99 ms",
            "tick max ms",
            "ticks",
            "sweep ms",
            "us/transition",
            "harness CPU us/tr",
            "redis CPU us/tr",
        ],
        [
            [
                r["sessions"],
                r["kind"],
                r.get("fill_s"),
                r.get("redis_used_mib"),
                r.get("tick_ms", {}).get("p50"),
                r.get("tick_ms", {}).get("p99"),
                r.get("tick_ms", {}).get("max"),
                r["ticks"],
                r.get("sweep_ms"),
                r.get("us_per_transition"),
                r.get("harness_cpu_us_per_transition"),
                r.get("redis_cpu_us_per_transition"),
            ]
            for r in rows
        ],
    )


def _targets(rows: list[dict[str, Any]]) -> list[report.Target]:
    """The empty tick at the largest size; the cost per transition of its largest due group
    over its smallest."""
    biggest = max(r["sessions"] for r in rows)
    empty = next(r for r in rows if r["sessions"] == biggest and r["kind"] == "nothing due")
    due_rows = [r for r in rows if r["sessions"] == biggest and "due" in r]
    note = f"at {biggest:,} sessions; p99 {empty['tick_ms']['p99']} ms"
    targets = [
        report.check(
            "sweep tick, nothing due",
            "<= 2 ms at 1M sessions",
            empty["tick_ms"]["p50"],
            "ms (p50)",
            2.0,
            False,
            note if biggest >= 1_000_000 else note + " (profile below 1M)",
        )
    ]
    if len(due_rows) > 1:
        small, large = due_rows[0], due_rows[-1]
        ratio = large["us_per_transition"] / small["us_per_transition"]
        targets.append(
            report.check(
                "sweep cost proportional to due sessions",
                "cost per transition flat (<= 1.5x)",
                ratio,
                "x",
                1.5,
                False,
                f"{large['due']:,} due: {large['us_per_transition']} us each, "
                f"{small['due']:,} due: {small['us_per_transition']} us each",
            )
        )
    return targets


def _plot(ctx: Context, rows: list[dict[str, Any]]) -> Path | None:
    series = {
        f"{n:,} sessions": [
            (r["due"], r["sweep_ms"]) for r in rows if r["sessions"] == n and "due" in r
        ]
        for n in sorted({r["sessions"] for r in rows})
    }
    return report.plot_lines(
        ctx.folder / "sweep-due.png",
        "Sweep: time to apply due transitions",
        "sessions due at once",
        "ms for the whole sweep",
        series,
    )
