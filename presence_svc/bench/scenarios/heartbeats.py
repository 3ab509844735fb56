"""Scenario 2, heartbeats at saturation on one node process, and the raw Redis floor.

WebSocket: each socket sends `window` heartbeats (no cursor change, so no event) and then a
ping; the node handles a socket's messages in order, so its pong acknowledges the batch and the
client sends the next one (a closed loop, `sockets x window` heartbeats in flight). REST: one
POST in flight per keep-alive connection. Floor: the same two scripts the store runs per
heartbeat (heartbeat.lua then schedule.lua, same keys and argument shapes) sent straight to
Redis from pipelined clients; Redis CPU per heartbeat gives its capacity on one core. Then REST
at a moderate fixed rate against a bare Starlette JSON endpoint (heartbeats_rest.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import redis

from presence_svc.bench import report
from presence_svc.bench.harness import Context
from presence_svc.bench.runner import CpuWindow, Endpoint, command_delta, command_stats
from presence_svc.bench.scenarios import heartbeats_rest
from presence_svc.bench.scenarios.sockets import close_groups, open_group


def _split(items: list[Any], parts: int) -> list[list[Any]]:
    return [items[i::parts] for i in range(parts)]


def _measure(
    ctx: Context, path: str, node: Endpoint | None, drive: Callable[[], list[dict[str, Any]]]
) -> dict[str, Any]:
    client = redis.Redis.from_url(ctx.redis_url)
    try:
        before = command_stats(client)
        pids: dict[str, int | None] = {
            "node": node.pid if node else None,
            "redis": ctx.redis_pid,
            **ctx.client_pids(),
        }
        window = CpuWindow(pids).start()
        replies = drive()
        window.stop()
        commands = command_delta(before, command_stats(client))
    finally:
        client.close()
    beats = sum(r["heartbeats"] for r in replies)
    seconds = max(r["seconds"] for r in replies)
    node_cpu, redis_cpu = window.cpu.get("node"), window.cpu.get("redis")
    clients_cpu = sum(v for k, v in window.cpu.items() if k.startswith("client-"))

    redis_us = report.us_each(redis_cpu, beats)
    return {
        "path": path,
        "heartbeats": beats,
        "heartbeats_per_s": round(beats / seconds, 1) if seconds else 0.0,
        "errors": sum(r.get("errors", 0) for r in replies),
        "non_200": sum(n for r in replies for s, n in r.get("statuses", {}).items() if s != 200),
        "node_cpu_us_per_heartbeat": report.us_each(node_cpu, beats),
        "node_cpu_util": report.cores(node_cpu, window.wall),
        "redis_cpu_us_per_heartbeat": redis_us,
        "redis_capacity_per_s": round(1e6 / redis_us) if redis_us else None,
        "redis_cpu_util": report.cores(redis_cpu, window.wall),
        "clients_cpu_util": round(clients_cpu / window.wall, 3),
        "redis_commands_per_heartbeat": {
            k: round(v / beats, 3) for k, v in commands.items() if beats and v / beats >= 0.01
        },
        "window_s": round(window.wall, 2),
    }


def run(ctx: Context) -> dict[str, Any]:
    p = ctx.profile.heartbeats
    prefix = ctx.prefix("heartbeats")
    users = [
        [f"bench-h{i}", f"bench-hs{i % p.studies}"]
        for i in range(max(p.ws_sockets, p.rest_connections))
    ]
    rows: list[dict[str, Any]] = []
    with ctx.nodes(1, prefix) as nodes:
        node = nodes[0]
        ctx.emit(
            f"1 node process; WebSocket: {p.ws_sockets} sockets x {p.ws_window} heartbeats "
            f"in flight; REST: {p.rest_connections} keep-alive connections; {p.studies} "
            f"studies; {ctx.clients} client processes; {p.seconds:g} s per path"
        )
        rows.append(_websocket(ctx, node, users[: p.ws_sockets]))
        rows.append(_rest(ctx, node, users[: p.rest_connections]))
        with ctx.baselines(1) as bases:
            moderate = heartbeats_rest.run(ctx, node, bases[0], users)
    rows.append(_floor(ctx, prefix, users))
    return _summarize(ctx, rows, moderate)


def _local(node: Endpoint) -> Endpoint | None:
    """`node` if its CPU can be read (a process of ours), else None."""
    return node if node.pid is not None else None


def _websocket(ctx: Context, node: Endpoint, users: list[list[str]]) -> dict[str, Any]:
    p = ctx.profile.heartbeats
    specs = [
        [node.host, node.port, i % p.studies, study, user] for i, (user, study) in enumerate(users)
    ]
    open_group(ctx, "hb", "node", _split(specs, ctx.clients))

    def ws(duration: float) -> list[dict[str, Any]]:
        return ctx.pool.call_all(
            "ws_heartbeats",
            duration + 30,
            [{"group": "hb", "duration": duration, "window": p.ws_window}] * ctx.clients,
        )

    ws(min(1.0, p.seconds))  # warm-up: the first heartbeats create the sessions
    row = _measure(ctx, "WebSocket", _local(node), lambda: ws(p.seconds))
    close_groups(ctx, "hb")
    return row


def _rest(ctx: Context, node: Endpoint, users: list[list[str]]) -> dict[str, Any]:
    p = ctx.profile.heartbeats

    def rest(duration: float) -> list[dict[str, Any]]:
        return ctx.pool.call_all(
            "rest_heartbeats",
            duration + 30,
            [
                {
                    "host": node.host,
                    "port": node.port,
                    "secret": ctx.secret,
                    "users": part,
                    "duration": duration,
                }
                for part in _split(users, ctx.clients)
            ],
        )

    rest(min(1.0, p.seconds))
    return _measure(ctx, "REST", _local(node), lambda: rest(p.seconds))


def _floor(ctx: Context, prefix: str, users: list[list[str]]) -> dict[str, Any]:
    p = ctx.profile.heartbeats

    def floor() -> list[dict[str, Any]]:
        return ctx.pool.call_all(
            "redis_floor",
            p.floor_seconds + 60,
            [
                {
                    "url": ctx.redis_url,
                    "prefix": prefix,
                    "users": part,
                    "duration": p.floor_seconds,
                    "batch": p.floor_batch,
                }
                for part in _split(users, ctx.clients)
            ],
        )

    return _measure(ctx, "raw Redis (floor)", None, floor)


def _busy(row: dict[str, Any]) -> str:
    """How busy the node was: below ~0.9 of a core, something else (a contended core, the
    clients, Redis) limited the rate, not the node alone."""
    if row["node_cpu_util"] is None:
        return "node CPU not measured (external node)"
    return f"node busy {report.fmt(row['node_cpu_util'])} of a core"


def _summarize(
    ctx: Context, rows: list[dict[str, Any]], moderate: dict[str, Any]
) -> dict[str, Any]:
    floor = rows[-1]
    for r in rows:
        r["vs_redis_capacity"] = (
            round(r["heartbeats_per_s"] / floor["redis_capacity_per_s"], 3)
            if floor["redis_capacity_per_s"]
            else None
        )
    ctx.emit(_table(rows))
    ctx.emit(
        f"raw Redis capacity for heartbeat.lua + schedule.lua: "
        f"{report.fmt(floor['redis_capacity_per_s'])}/s on one Redis core "
        f"(1 / Redis CPU per heartbeat); reached {report.fmt(floor['heartbeats_per_s'])}/s"
    )
    heartbeats_rest.emit(ctx, moderate)
    targets = [
        *_targets(rows),
        heartbeats_rest.target(moderate, ctx.profile.heartbeats.moderate_rate),
    ]
    return {
        "config": asdict(ctx.profile.heartbeats),
        "rows": rows,
        "rest_moderate": moderate,
        "targets": targets,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    columns = [
        "path",
        "heartbeats/s",
        "errors",
        "node CPU us/hb",
        "node CPU",
        "redis CPU us/hb",
        "redis CPU",
        "clients CPU",
        "x redis capacity",
        "redis commands per heartbeat",
    ]
    return report.table(
        "Heartbeats (one node process; CPU columns: fraction of one core)",
        columns,
        [
            [
                r["path"],
                r["heartbeats_per_s"],
                r["errors"] + r["non_200"],
                r["node_cpu_us_per_heartbeat"],
                r["node_cpu_util"],
                r["redis_cpu_us_per_heartbeat"],
                r["redis_cpu_util"],
                r["clients_cpu_util"],
                r["vs_redis_capacity"],
                " ".join(f"{k}={v:g}" for k, v in r["redis_commands_per_heartbeat"].items()),
            ]
            for r in rows
        ],
    )


def _targets(rows: list[dict[str, Any]]) -> list[report.Target]:
    ws, rest = rows[0], rows[1]
    return [
        report.check(
            "WebSocket heartbeats per node process",
            ">= 40,000/s",
            ws["heartbeats_per_s"],
            "/s",
            40_000,
            True,
            _busy(ws),
        ),
        report.check(
            "REST heartbeats per node process",
            ">= 12,000/s",
            rest["heartbeats_per_s"],
            "/s",
            12_000,
            True,
            _busy(rest),
        ),
    ]
