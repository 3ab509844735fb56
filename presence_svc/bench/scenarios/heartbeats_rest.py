"""The heartbeats scenario's moderate-rate REST point: node CPU per REST heartbeat against a
bare Starlette JSON endpoint, the same client and requests, in the same run.

Saturated, a node's CPU per heartbeat mixes in how much work each wake-up shares; at a fixed
moderate rate (the full profile: 400 requests/s over 8 keep-alive connections, one request in
flight each) both servers answer every request at once, so CPU per request is what one costs.
The bare endpoint is the baseline server's `POST /presence/heartbeat` (bench/baseline.py: the
body parsed as JSON, a session-sized JSON object sent back, on the node's uvicorn settings). The
client sends both the same bytes: the node's request with its bearer token, which the bare
endpoint ignores. Node and bare alternate, `moderate_rounds` times each; CPU is read in ns
(schedstat): at this rate a server is busy a fraction of a core. A server's idle CPU (nothing
sent, its connections open) is printed beside it and included in its CPU per request: a node's
timers (lease renewals, the sweep tick, its stats report) run whether requests come or not.
"""

from __future__ import annotations

import time
from typing import Any

from presence_svc.bench import report
from presence_svc.bench.harness import Context
from presence_svc.bench.runner import CpuWindow, Endpoint

TARGET = "node CPU per REST heartbeat vs bare Starlette JSON endpoint"
LIMIT = 1.5


def _split(items: list[Any], parts: int) -> list[list[Any]]:
    return [items[i::parts] for i in range(parts)]


def _drive(
    ctx: Context, server: Endpoint, users: list[list[str]], rate: float, seconds: float
) -> list[dict[str, Any]]:
    parts = _split(users, ctx.clients)
    return ctx.pool.call_all(
        "rest_paced",
        seconds + 60,
        [
            {
                "host": server.host,
                "port": server.port,
                "secret": ctx.secret,
                "users": part,
                "rate": rate / len(parts),
                "duration": seconds,
            }
            for part in parts
        ],
    )


def _idle_cpu(server: Endpoint, seconds: float) -> float | None:
    """Fraction of a core the server uses with nothing sent to it."""
    if server.pid is None:
        return None
    window = CpuWindow({"server": server.pid}, precise=True).start()
    time.sleep(seconds)
    window.stop()
    return round(window.cpu["server"] / window.wall, 4)


def _measure(
    ctx: Context, kind: str, server: Endpoint, users: list[list[str]], round_: int
) -> dict[str, Any]:
    p = ctx.profile.heartbeats
    window = CpuWindow({"server": server.pid}, precise=True).start()
    replies = _drive(ctx, server, users, p.moderate_rate, p.moderate_seconds)
    window.stop()
    statuses: dict[int, int] = {}
    for r in replies:
        for status, n in r["statuses"].items():
            statuses[status] = statuses.get(status, 0) + n
    ok = statuses.get(200, 0)
    latencies = [n for r in replies for n in r["latencies_ns"]]
    seconds = max(r["seconds"] for r in replies)
    cpu = window.cpu.get("server")
    return {
        "target": kind,
        "round": round_,
        "offered_per_s": p.moderate_rate,
        "sent": sum(r["sent"] for r in replies),
        "answered_per_s": round(sum(r["answered"] for r in replies) / seconds, 1),
        "ok": ok,
        "non_200": sum(n for s, n in statuses.items() if s != 200),
        "waited": sum(r["waited"] for r in replies),
        "latency_ms": report.percentiles_ms(latencies),
        "cpu_s": cpu,
        "cpu_us_per_request": report.us_each(cpu, ok),
        "cpu_util": report.cores(cpu, window.wall),
        "cpu_clock": window.clock,
        "window_s": round(window.wall, 2),
    }


def run(ctx: Context, node: Endpoint, baseline: Endpoint, users: list[list[str]]) -> dict[str, Any]:
    """Measure the point: its rows, the CPU per request of each side over all its rounds, and
    their ratio (None when a side's CPU cannot be read)."""
    p = ctx.profile.heartbeats
    users = users[: p.moderate_connections]
    servers = {"node": node, "bare": baseline}
    idle = {kind: _idle_cpu(server, 1.0) for kind, server in servers.items()}
    for server in servers.values():  # warm-up: sessions, token caches, first-call paths
        _drive(ctx, server, users, p.moderate_rate, min(1.0, p.moderate_seconds))
    rows = [
        _measure(ctx, kind, server, users, round_)
        for round_ in range(1, p.moderate_rounds + 1)
        for kind, server in servers.items()
    ]
    each: dict[str, float | None] = {}
    for kind in servers:
        mine = [r for r in rows if r["target"] == kind]
        cpu = [r["cpu_s"] for r in mine]
        total = sum(c for c in cpu if c is not None) if None not in cpu else None
        each[kind] = report.us_each(total, sum(r["ok"] for r in mine))
    node_us, bare_us = each["node"], each["bare"]
    ratio = round(node_us / bare_us, 3) if node_us and bare_us else None
    for r in rows:
        r["idle_cpu_util"] = idle[r["target"]]
    return {"rows": rows, "node_us": node_us, "bare_us": bare_us, "ratio": ratio}


def emit(ctx: Context, point: dict[str, Any]) -> None:
    """Print the point's table and its ratio."""
    ctx.emit("\n" + _table(ctx, point["rows"]))
    ctx.emit(
        f"node CPU per REST heartbeat {report.fmt(point['node_us'])} us, bare Starlette JSON "
        f"endpoint {report.fmt(point['bare_us'])} us per request (all rounds): "
        f"{report.fmt(point['ratio'])}x"
    )


def _table(ctx: Context, rows: list[dict[str, Any]]) -> str:
    p = ctx.profile.heartbeats
    columns = [
        "target",
        "round",
        "offered/s",
        "answered/s",
        "non-200",
        "waited",
        "p50 ms",
        "p99 ms",
        "CPU us/request",
        "CPU",
        "idle CPU",
    ]
    return report.table(
        f"REST heartbeats at a fixed moderate rate, node vs bare Starlette JSON endpoint "
        f"({p.moderate_connections} keep-alive connections, {ctx.clients} client processes, "
        f"{p.moderate_seconds:g} s per row; CPU columns: fraction of one core, read in ns; "
        f"waited: requests sent late because every connection awaited an answer)",
        columns,
        [
            [
                r["target"],
                r["round"],
                r["offered_per_s"],
                r["answered_per_s"],
                r["non_200"],
                r["waited"],
                r["latency_ms"]["p50"],
                r["latency_ms"]["p99"],
                r["cpu_us_per_request"],
                r["cpu_util"],
                r["idle_cpu_util"],
            ]
            for r in rows
        ],
    )


def target(point: dict[str, Any], rate: float) -> report.Target:
    note = (
        f"at {rate:,.0f} requests/s; node {report.fmt(point['node_us'])} us, "
        f"bare {report.fmt(point['bare_us'])} us per request"
    )
    return report.check(TARGET, f"<= {LIMIT:g}x", point["ratio"], "x", LIMIT, False, note)
