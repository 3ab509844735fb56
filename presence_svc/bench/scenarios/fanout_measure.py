"""The fan-out scenario's plumbing (fanout.py, fanout_receive.py): sockets laid out over the
servers, and one measured point (events published at a set rate, every delivery counted, the
processes' CPU over the window)."""

from __future__ import annotations

import array
from collections.abc import Sequence
from typing import Any

from presence_svc.bench import report
from presence_svc.bench.harness import Context
from presence_svc.bench.runner import CpuWindow, Endpoint
from presence_svc.bench.scenarios.sockets import Layout

TARGET_LOAD = 10_000  # deliveries/s at which the p99 and CPU-ratio targets are judged


def specs(
    ctx: Context, servers: list[Endpoint], studies: list[str], viewers: int, user_prefix: str
) -> Layout:
    """Per client worker: [host, port, study index, study id, user id] of each socket.

    Viewer k (over all studies) goes to server k mod len(servers): with `viewers` a multiple of
    the servers, each server holds viewers / servers sockets of every study."""
    per_worker: Layout = [[] for _ in range(ctx.clients)]
    for s, study in enumerate(studies):
        for v in range(viewers):
            k = s * viewers + v
            server = servers[k % len(servers)]
            worker = (k // len(servers)) % ctx.clients
            per_worker[worker].append([server.host, server.port, s, study, f"{user_prefix}{k}"])
    return per_worker


def measure(
    ctx: Context,
    kind: str,
    servers: list[Endpoint],
    studies: list[str],
    *,
    group: str,
    viewers: int,
    events_per_s: float,
    seconds: float,
    precise: bool = False,
    point: str = "fan-out",
) -> dict[str, Any]:
    """Publish `events_per_s` round-robin over `studies` (each with `viewers` sockets of
    `group`, spread over `servers`) for `seconds`, and count what arrived where.

    `precise`: read the processes' CPU in ns (schedstat) rather than 10 ms ticks. `point`
    names the scenario's point the row belongs to ("fan-out": the loads of the targets,
    "receive": the receive-cost point)."""
    ctx.pool.call_all("fanout_reset", 30, [{} for _ in range(ctx.clients)])
    window = CpuWindow(_measured_pids(ctx, servers), precise).start()
    published = _publish(ctx, kind, servers, studies, events_per_s, seconds)
    expected = dict(enumerate(published["per_study"]))
    replies = ctx.pool.call_all(
        "fanout_collect", 60, [{"group": group, "expected": expected, "wait": 10.0}] * ctx.clients
    )
    window.stop()
    latencies = _latencies(replies)
    row = {"target": kind, "offered_deliveries_per_s": round(events_per_s * viewers)}
    row.update(_figures(published, replies, latencies, window, len(servers)))
    # Every study has a viewer on every server (specs), so each server reads every event.
    reached = min(viewers, len(servers))
    row.update(
        # Added with the receive-cost point (fanout_receive.py); the keys above are unchanged.
        point=point,
        sockets_per_event_and_node=viewers / reached,
        server_cpu_us_per_event_and_node=report.us_each(
            window.total("server-"), published["published"] * reached
        ),
        cpu_clock=window.clock,
        _latencies=latencies,
    )
    return row


def _measured_pids(ctx: Context, servers: list[Endpoint]) -> dict[str, int | None]:
    pids: dict[str, int | None] = {f"server-{s.name}": s.pid for s in servers}
    pids.update(redis=ctx.redis_pid, publisher=ctx.pool.pids[f"client-{ctx.publisher}"])
    pids.update({k: v for k, v in ctx.client_pids().items() if k != f"client-{ctx.publisher}"})
    return pids


def _publish(
    ctx: Context,
    kind: str,
    servers: list[Endpoint],
    studies: list[str],
    events_per_s: float,
    seconds: float,
) -> dict[str, Any]:
    published: dict[str, Any] = ctx.pool.call(
        ctx.publisher,
        "publish",
        seconds + 60,
        mode=kind,
        studies=studies,
        rate=events_per_s,
        duration=seconds,
        redis_url=ctx.redis_url,
        prefix=ctx.prefix("fanout"),
        targets=[[s.host, s.port] for s in servers] if kind == "baseline" else [],
        channel=ctx.peer_channel,
    )
    return published


def _latencies(replies: Sequence[dict[str, Any]]) -> array.array[int]:
    latencies = array.array("q")
    for r in replies:
        latencies.extend(r["latencies_ns"])
    return latencies


def _figures(
    published: dict[str, Any],
    replies: list[dict[str, Any]],
    latencies: array.array[int],
    window: CpuWindow,
    servers: int,
) -> dict[str, Any]:
    """What one point delivered and what it cost, in the order of the row's columns."""

    def total(key: str) -> int:
        return sum(r[key] for r in replies)

    delivered = total("received") - total("duplicated")
    server_cpu = window.total("server-")
    clients_cpu = sum(v for k, v in window.cpu.items() if k.startswith("client-"))
    return {
        "events_per_s": round(published["published"] / published["seconds"], 1),
        "deliveries_per_s": round(delivered / window.wall, 1),
        "expected": total("expected"),
        "received": total("received"),
        "lost": total("lost"),
        "duplicated": total("duplicated"),
        "reordered": total("reordered"),
        "misrouted": total("misrouted"),
        "closed_sockets": total("closed_sockets"),
        "latency_ms": report.percentiles_ms(latencies),
        "server_cpu_us_per_delivery": report.us_each(server_cpu, delivered),
        "server_cpu_util_per_process": (
            round(server_cpu / window.wall / servers, 3) if server_cpu is not None else None
        ),
        "redis_cpu_util": report.cores(window.cpu.get("redis"), window.wall),
        "clients_cpu_util": round(clients_cpu / window.wall, 3),
        "publisher_worst_lag_ms": round(published["worst_lag_ms"], 1),
        "window_s": round(window.wall, 2),
    }


def vs_baseline(rows: list[dict[str, Any]], load: str, cost: str, ratio: str) -> None:
    """Set each row's `ratio`: its `cost` over that of the baseline row at the same `load`
    (None where either is missing or zero)."""
    by = {(r["target"], r[load]): r for r in rows}
    for r in rows:
        base = by.get(("baseline", r[load]))
        cpu, base_cpu = r[cost], base and base[cost]
        r[ratio] = round(cpu / base_cpu, 2) if cpu and base_cpu else None
