"""Scenario 3, idle connections: RSS of one node process per idle WebSocket.

Sockets are opened in steps up to each level (1k, 5k, 10k in the full profile) and kept open;
after each step and a short settle the node's VmRSS is read. Per socket = (RSS now - RSS before
the first socket) / sockets. The same ramp on the bare Starlette server shows what uvicorn and
Starlette alone cost per socket, and on a raw ASGI app on uvicorn with the node's protocol
settings (bench/floor.py) what uvicorn and websockets alone cost: the floor of this server.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from presence_svc.bench import floor, report
from presence_svc.bench.harness import Context
from presence_svc.bench.runner import Endpoint, cpu_seconds, rss_bytes
from presence_svc.bench.scenarios.sockets import Layout, close_groups, open_group

KIB = 1024


def _ramp(ctx: Context, server: Endpoint, kind: str) -> list[dict[str, Any]]:
    """One row per level of the profile, the sockets of each level kept open for the next."""
    assert server.pid is not None
    time.sleep(ctx.profile.idle.settle)
    rss0 = rss_bytes(server.pid)
    rows: list[dict[str, Any]] = []
    opened = 0
    try:
        for level in ctx.profile.idle.sockets:
            rows.append(_step(ctx, server, kind, opened, level, rss0))
            opened = rows[-1]["sockets"]
    finally:
        close_groups(ctx, f"idle-{kind}", timeout=120)
    return rows


def _layout(ctx: Context, server: Endpoint, first: int, end: int) -> Layout:
    """Sockets first..end-1 round-robin over the workers, `viewers_per_study` per study."""
    per_study = ctx.profile.idle.viewers_per_study
    layout: Layout = [[] for _ in range(ctx.clients)]
    for k in range(first, end):
        study = f"bench-i{k // per_study}"
        layout[k % ctx.clients].append(
            [server.host, server.port, k // per_study, study, f"bench-i{k}"]
        )
    return layout


def _step(
    ctx: Context, server: Endpoint, kind: str, opened: int, level: int, rss0: int
) -> dict[str, Any]:
    """Open sockets from `opened` (those open so far) up to `level`, let the server settle,
    then read its RSS and its CPU while nothing happens."""
    p = ctx.profile.idle
    assert server.pid is not None
    started = time.perf_counter()
    replies = open_group(
        ctx,
        f"idle-{kind}",
        kind,
        _layout(ctx, server, opened, level),
        timeout=600,
        concurrency=64,
        connect_timeout=60,
    )
    open_s = time.perf_counter() - started
    new = sum(r["opened"] for r in replies)
    opened += new
    time.sleep(p.settle)
    cpu0 = cpu_seconds(server.pid)
    time.sleep(p.settle)  # idle CPU: what the open sockets cost while nothing happens
    idle_cpu = (cpu_seconds(server.pid) - cpu0) / p.settle
    rss = rss_bytes(server.pid)
    return {
        "server": kind,
        "sockets": opened,
        "failed": sum(r["failed"] for r in replies),
        "errors": [e for r in replies for e in r["errors"]][:3],
        "rss_mib": round(rss / KIB / KIB, 1),
        "rss_before_mib": round(rss0 / KIB / KIB, 1),
        "rss_per_socket_kib": round((rss - rss0) / KIB / opened, 2) if opened else None,
        "opened_per_s": round(new / open_s, 1),
        "idle_cpu_util": round(idle_cpu, 3),
    }


def run(ctx: Context) -> dict[str, Any]:
    p = ctx.profile.idle
    if ctx.external_nodes:
        ctx.emit("skipped: RSS can only be read from local node processes")
        return {
            "config": asdict(p),
            "rows": [],
            "targets": [_target(None, "not measured: external nodes")],
        }
    ctx.emit(
        f"one node process; sockets opened in steps to {', '.join(map(str, p.sockets))}; "
        f"{p.viewers_per_study} viewers per study; {ctx.clients} client processes"
    )
    rows: list[dict[str, Any]] = []
    with ctx.nodes(1, ctx.prefix("idle")) as nodes:
        rows += _ramp(ctx, nodes[0], "node")
    if p.baseline:
        with ctx.baselines(1) as bases:
            rows += _ramp(ctx, bases[0], "baseline")
        with floor.running(ctx.folder / "logs") as raw:
            rows += _ramp(ctx, raw, "raw ASGI")
    ctx.emit(_table(rows))
    node_rows = [r for r in rows if r["server"] == "node"]
    judged = node_rows[-1] if node_rows else None
    note = ""
    if judged and judged["sockets"] < 10_000:
        note = f"measured at {judged['sockets']:,} sockets (this profile stops below 10k)"
    plots = [_plot(ctx, rows)] if len(node_rows) > 1 else []
    return {
        "config": asdict(p),
        "rows": rows,
        "targets": [_target(judged["rss_per_socket_kib"] if judged else None, note)],
        "plots": [str(x) for x in plots if x is not None],
    }


def _target(kib_per_socket: float | None, note: str) -> report.Target:
    return report.check(
        "RSS per idle WebSocket", "<= 22 KiB at 10k sockets", kib_per_socket, "KiB", 22, False, note
    )


def _table(rows: list[dict[str, Any]]) -> str:
    return report.table(
        "Idle WebSockets (RSS of the server process; idle CPU: fraction of one core)",
        [
            "server",
            "sockets",
            "failed",
            "RSS MiB",
            "RSS before MiB",
            "KiB/socket",
            "opened/s",
            "idle CPU",
        ],
        [
            [
                r["server"],
                r["sockets"],
                r["failed"],
                r["rss_mib"],
                r["rss_before_mib"],
                r["rss_per_socket_kib"],
                r["opened_per_s"],
                r["idle_cpu_util"],
            ]
            for r in rows
        ],
    )


def _plot(ctx: Context, rows: list[dict[str, Any]]) -> Path | None:
    series = {
        k: [(r["sockets"], r["rss_per_socket_kib"]) for r in rows if r["server"] == k]
        for k in ("node", "baseline", "raw ASGI")
    }
    return report.plot_lines(
        ctx.folder / "idle-rss.png",
        "RSS per idle WebSocket",
        "open sockets",
        "KiB per socket",
        {k: v for k, v in series.items() if v},
    )
