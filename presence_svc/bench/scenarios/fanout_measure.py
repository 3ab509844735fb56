"""The fan-out scenario's plumbing (fanout.py, fanout_receive.py): sockets laid out over the
servers, opened and closed in the client workers, and one measured point (events published at a
set rate, every delivery counted, the processes' CPU over the window)."""

from __future__ import annotations

import array
from typing import Any

from presence_svc.bench import report
from presence_svc.bench.harness import Context
from presence_svc.bench.runner import CpuWindow, Endpoint

TARGET_LOAD = 10_000  # deliveries/s at which the p99 and CPU-ratio targets are judged


def specs(
    ctx: Context, servers: list[Endpoint], studies: list[str], viewers: int, user_prefix: str
) -> list[list[list[Any]]]:
    """Per client worker: [host, port, study index, study id, user id] of each socket.

    Viewer k (over all studies) goes to server k mod len(servers): with `viewers` a multiple of
    the servers, each server holds viewers / servers sockets of every study."""
    per_worker: list[list[list[Any]]] = [[] for _ in range(ctx.clients)]
    for s, study in enumerate(studies):
        for v in range(viewers):
            k = s * viewers + v
            server = servers[k % len(servers)]
            worker = (k // len(servers)) % ctx.clients
            per_worker[worker].append([server.host, server.port, s, study, f"{user_prefix}{k}"])
    return per_worker


def open_sockets(ctx: Context, group: str, kind: str, layout: list[list[list[Any]]]) -> None:
    replies = ctx.pool.call_all(
        "open",
        120,
        [
            {
                "group": group,
                "kind": kind,
                "specs": s,
                "secret": ctx.secret,
                "concurrency": 100,
                "connect_timeout": 30,
            }
            for s in layout
        ],
    )
    failed = sum(r["failed"] for r in replies)
    if failed:
        raise RuntimeError(f"{failed} {kind} sockets failed to open: {replies[0]['errors']}")


def close_sockets(ctx: Context, *groups: str) -> None:
    for group in groups:
        ctx.pool.call_all("close", 60, [{"group": group}] * ctx.clients)


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
    pids: dict[str, int | None] = {f"server-{s.name}": s.pid for s in servers}
    pids.update(redis=ctx.redis_pid, publisher=ctx.pool.pids[f"client-{ctx.publisher}"])
    pids.update({k: v for k, v in ctx.client_pids().items() if k != f"client-{ctx.publisher}"})
    window = CpuWindow(pids, precise).start()
    published = ctx.pool.call(
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
    )
    expected = dict(enumerate(published["per_study"]))
    replies = ctx.pool.call_all(
        "fanout_collect", 60, [{"group": group, "expected": expected, "wait": 10.0}] * ctx.clients
    )
    window.stop()
    latencies = array.array("q")
    for r in replies:
        latencies.extend(r["latencies_ns"])
    received = sum(r["received"] for r in replies)
    duplicated = sum(r["duplicated"] for r in replies)
    delivered = received - duplicated
    server_cpu = window.total("server-")
    clients_cpu = sum(v for k, v in window.cpu.items() if k.startswith("client-"))
    # Every study has a viewer on every server (specs), so each server reads every event.
    reached = min(viewers, len(servers))
    received_by_servers = published["published"] * reached
    return {
        "target": kind,
        "offered_deliveries_per_s": round(events_per_s * viewers),
        "events_per_s": round(published["published"] / published["seconds"], 1),
        "deliveries_per_s": round(delivered / window.wall, 1),
        "expected": sum(r["expected"] for r in replies),
        "received": received,
        "lost": sum(r["lost"] for r in replies),
        "duplicated": duplicated,
        "reordered": sum(r["reordered"] for r in replies),
        "misrouted": sum(r["misrouted"] for r in replies),
        "closed_sockets": sum(r["closed_sockets"] for r in replies),
        "latency_ms": report.percentiles_ms(latencies),
        "server_cpu_us_per_delivery": (
            round(server_cpu / delivered * 1e6, 2) if server_cpu is not None and delivered else None
        ),
        "server_cpu_util_per_process": (
            round(server_cpu / window.wall / len(servers), 3) if server_cpu is not None else None
        ),
        "redis_cpu_util": round(window.cpu["redis"] / window.wall, 3)
        if "redis" in window.cpu
        else None,
        "clients_cpu_util": round(clients_cpu / window.wall, 3),
        "publisher_worst_lag_ms": round(published["worst_lag_ms"], 1),
        "window_s": round(window.wall, 2),
        # Added with the receive-cost point (fanout_receive.py); the keys above are unchanged.
        "point": point,
        "sockets_per_event_and_node": viewers / reached,
        "server_cpu_us_per_event_and_node": (
            round(server_cpu / received_by_servers * 1e6, 2)
            if server_cpu is not None and received_by_servers
            else None
        ),
        "cpu_clock": window.clock,
        "_latencies": latencies,
    }
