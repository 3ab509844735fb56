"""The fan-out scenario's receive-cost point: every event reaches exactly one socket per node.

The loads of fanout.py deliver each event to 25 sockets per node (50 viewers over 2 nodes), so
their CPU per delivery mixes what a node pays once per event it receives from Redis (read the
pub/sub message, decode the envelope, encode the JSON text once) with what it pays per socket.
Here S studies x 2 viewers, viewer k on node k mod 2: a node's CPU per event is the receive cost
plus a single delivery. The same events go through the bare baseline servers' /publish path
with one socket each, so the two compare in the same run. CPU is read in ns (schedstat): the
nodes are busy a few percent of a core at the lower rate, too little for 10 ms ticks.
"""

from __future__ import annotations

import time
from typing import Any

from presence_svc.bench import report
from presence_svc.bench.harness import Context
from presence_svc.bench.runner import CpuWindow, Endpoint
from presence_svc.bench.scenarios.fanout_measure import TARGET_LOAD, measure, specs, vs_baseline
from presence_svc.bench.scenarios.sockets import close_groups, open_all

POINT = "receive"
RECEIVE_TARGET_RATE = 2_000  # events/s offered at which issue 14 judges the receive cost
RECEIVE_TARGET_US = 40.0
RECEIVE_TARGET_VS_BARE = 0.6
TARGETS = ("node CPU per received event", "node CPU per received event vs bare")


def _idle(groups: dict[str, list[Endpoint]], seconds: float) -> dict[str, float | None]:
    """CPU (fraction of a core) each server of each group uses with its sockets open and
    nothing published (pub/sub pings, the sweep tick, lease refreshes), over one window."""
    pids = {f"{kind}/{s.name}": s.pid for kind, servers in groups.items() for s in servers}
    window = CpuWindow(pids, precise=True).start()
    time.sleep(seconds)
    window.stop()
    out: dict[str, float | None] = {}
    for kind, servers in groups.items():
        total = window.total(f"{kind}/")
        out[kind] = round(total / window.wall / len(servers), 4) if total is not None else None
    return out


def run_point(ctx: Context, nodes: list[Endpoint], bases: list[Endpoint]) -> list[dict[str, Any]]:
    """Measure the point on the scenario's nodes and baseline servers (their other sockets
    closed); rows in the order node, baseline per rate."""
    p = ctx.profile.fanout
    if not p.receive_events:
        return []
    viewers = len(nodes)  # one socket per node and study
    studies = [f"bench-r{i}" for i in range(p.receive_studies)]
    layouts = {
        "node": (nodes, specs(ctx, nodes, studies, viewers, "bench-rv")),
        "baseline": (bases, specs(ctx, bases, studies, viewers, "bench-rb")),
    }
    for kind, (_, layout) in layouts.items():
        open_all(ctx, f"fanout-{POINT}-{kind}", kind, layout)
    idle = _idle({kind: servers for kind, (servers, _) in layouts.items()}, p.receive_idle_seconds)
    rows = []
    for rate in p.receive_events:
        for kind, (servers, _) in layouts.items():
            row = measure(
                ctx,
                kind,
                servers,
                studies,
                group=f"fanout-{POINT}-{kind}",
                viewers=viewers,
                events_per_s=rate,
                seconds=p.receive_seconds,
                precise=True,
                point=POINT,
            )
            row["offered_events_per_s"] = rate
            row["server_idle_cpu_util_per_process"] = idle[kind]
            rows.append(row)
    close_groups(ctx, *(f"fanout-{POINT}-{kind}" for kind in layouts))
    return rows


def summarize(
    ctx: Context, rows: list[dict[str, Any]], loads: list[dict[str, Any]], node_count: int
) -> list[dict[str, Any]]:
    """Print the point's table (with the per-event cost of the load nearest the targets' for
    comparison) and return its rows, ready for fanout.json."""
    for r in rows:
        del r["_latencies"]
    if not rows:
        return rows
    vs_baseline(
        rows,
        "offered_events_per_s",
        "server_cpu_us_per_event_and_node",
        "cpu_per_event_vs_baseline",
    )
    ctx.emit("\n" + _table(ctx, rows, node_count))
    comparison = _comparison(loads)
    if comparison:
        ctx.emit(comparison)
    return rows


def _table(ctx: Context, rows: list[dict[str, Any]], node_count: int) -> str:
    columns = [
        "target",
        "events/s offered",
        "events/s",
        "sockets/node",
        "delivered/s",
        "p50 ms",
        "p99 ms",
        "lost",
        "dup",
        "CPU us/event/node",
        "x base",
        "srv CPU/proc",
        "idle CPU/proc",
    ]
    table_rows = [
        [
            r["target"],
            r["offered_events_per_s"],
            r["events_per_s"],
            r["sockets_per_event_and_node"],
            r["deliveries_per_s"],
            r["latency_ms"]["p50"],
            r["latency_ms"]["p99"],
            r["lost"],
            r["duplicated"],
            r["server_cpu_us_per_event_and_node"],
            r["cpu_per_event_vs_baseline"],
            r["server_cpu_util_per_process"],
            r["server_idle_cpu_util_per_process"],
        ]
        for r in rows
    ]
    p = ctx.profile.fanout
    return report.table(
        f"Receive cost: {p.receive_studies} studies x {node_count} "
        f"viewers, one socket per node and event; {p.receive_seconds:g} s per point; "
        "CPU in ns (schedstat)",
        columns,
        table_rows,
    )


def _comparison(loads: list[dict[str, Any]]) -> str | None:
    """The load nearest the targets', per event and node; None if no node row has one."""
    judged = [r for r in loads if r["target"] == "node" and r.get("point", "fan-out") == "fan-out"]
    if not judged:
        return None
    near = min(judged, key=lambda r: abs(r["offered_deliveries_per_s"] - TARGET_LOAD))
    return (
        f"for comparison, {near['offered_deliveries_per_s']:,} deliveries/s above: "
        f"{report.fmt(near['sockets_per_event_and_node'])} sockets per node and event, node "
        f"CPU {report.fmt(near['server_cpu_us_per_event_and_node'])} us per event and node "
        f"({report.fmt(near['server_cpu_us_per_delivery'])} us per delivery)"
    )


def targets(rows: list[dict[str, Any]], node_count: int) -> list[report.Target]:
    """Issue 14's receive-cost targets, judged on the node row nearest RECEIVE_TARGET_RATE."""
    nodes = [r for r in rows if r["target"] == "node"]
    node = (
        min(nodes, key=lambda r: abs(r["offered_events_per_s"] - RECEIVE_TARGET_RATE))
        if nodes
        else None
    )
    at = (
        f"at {node['offered_events_per_s']:,} events/s offered, one socket per node, "
        f"{node_count} node(s)"
        if node
        else "receive point not run"
    )
    return [
        report.check(
            TARGETS[0],
            f"<= {RECEIVE_TARGET_US:g} us",
            node["server_cpu_us_per_event_and_node"] if node else None,
            "us",
            RECEIVE_TARGET_US,
            False,
            at,
        ),
        report.check(
            TARGETS[1],
            f"<= {RECEIVE_TARGET_VS_BARE:g}x",
            node["cpu_per_event_vs_baseline"] if node else None,
            "x",
            RECEIVE_TARGET_VS_BARE,
            False,
            at,
        ),
    ]
