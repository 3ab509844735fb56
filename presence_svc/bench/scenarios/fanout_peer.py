"""The fan-out scenario's third column: python-socketio (peer.py), the peer a Python team would
pick, beside the nodes and the bare baseline at every load.

Everything a delivery depends on is the nodes': the layout (viewer k of a study on process
k mod 2, so both processes read every event), the studies (one room each), the offered loads,
the `data` of every event, and the counting in the client workers (lost, duplicated, reordered,
latency from `bt`). Only the ways in and out are the peer's own, each the documented one:
clients speak Engine.IO v4 / Socket.IO v5 and join their study's room with an event
(sioclient.py), and the publisher emits to the room through a write-only AsyncRedisManager
(drivers.py), which each server reads from its subscription to the run's channel.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterator
from typing import Any

from presence_svc.bench import report
from presence_svc.bench.harness import Context
from presence_svc.bench.runner import CpuWindow, Endpoint

KIND = "socketio"  # the rows' `target`, the client workers' socket kind, the publisher's mode
TARGET = "fan-out CPU per delivery vs python-socketio"
CHEAPER = 3.0  # the issue's target: the nodes' CPU per delivery at most a third of the peer's
# A load past the peer's capacity leaves packets queued in it after the point's window; they are
# sent before the next point starts (bounded), or they would load that point's servers' cores.
DRAIN_LIMIT = 60.0
_IDLE_CORES = 0.05


def available() -> bool:
    return importlib.util.find_spec("socketio") is not None


@contextlib.contextmanager
def servers(ctx: Context, count: int) -> Iterator[list[Endpoint]]:
    """The peer's processes for this run: none when the profile leaves the column out, or when
    python-socketio is not installed (said in the output)."""
    if not ctx.profile.fanout.peer:
        yield []
        return
    if not available():
        ctx.emit(
            "python-socketio column skipped: the package is not installed "
            "(pip install -e '.[bench]')"
        )
        yield []
        return
    with ctx.peers(count) as started:
        yield started


def drain(servers: list[Endpoint], limit: float = DRAIN_LIMIT) -> float:
    """Wait until the peer's processes are idle again; the seconds it took."""
    started = time.monotonic()
    pids = {s.name: s.pid for s in servers}
    while time.monotonic() - started < limit:
        window = CpuWindow(pids, precise=True).start()
        time.sleep(0.5)
        total = window.stop().total("")
        if total is None or total / window.wall / len(servers) < _IDLE_CORES:
            break
    return round(time.monotonic() - started, 1)


def _ratio(peer: dict[str, Any] | None, node: dict[str, Any] | None) -> float | None:
    """How many times the peer's CPU per delivery the nodes' is (higher: nodes cheaper)."""
    peer_us = peer and peer["server_cpu_us_per_delivery"]
    node_us = node and node["server_cpu_us_per_delivery"]
    return round(peer_us / node_us, 2) if peer_us and node_us else None


def cpu_table(rows: list[dict[str, Any]]) -> str | None:
    """Fan-out CPU per delivery of the three columns at each load; None without peer rows."""
    by = {(r["target"], r["offered_deliveries_per_s"]): r for r in rows}
    loads = sorted({r["offered_deliveries_per_s"] for r in rows if r["target"] == KIND})
    if not loads:
        return None

    def us(kind: str, load: int) -> float | None:
        row = by.get((kind, load))
        return row["server_cpu_us_per_delivery"] if row else None

    table_rows = []
    for load in loads:
        peer = by[(KIND, load)]
        table_rows.append(
            [
                load,
                us("node", load),
                us("baseline", load),
                us(KIND, load),
                _ratio(peer, by.get(("node", load))),
                peer["cpu_vs_baseline"],
                peer["lost"],
                peer["latency_ms"]["p99"],
                peer["drain_s"],
            ]
        )
    columns = [
        "offered/s",
        "node us",
        "bare us",
        "socketio us",
        "socketio/node",
        "socketio x base",
        "socketio lost",
        "socketio p99 ms",
        "drain s",
    ]
    return report.table(
        "Fan-out CPU per delivery, three ways (us of server CPU per delivery; socketio/node: "
        "how many times cheaper the nodes are; drain s: the peer catching up after the window, "
        "none after the last load, where it stops)",
        columns,
        table_rows,
    )


def targets(ctx: Context, rows: list[dict[str, Any]], judged: int, at: str) -> list[report.Target]:
    """The peer's target, judged at the load of the other fan-out targets; none when the
    profile leaves the column out."""
    if not ctx.profile.fanout.peer:
        return []
    by = {(r["target"], r["offered_deliveries_per_s"]): r for r in rows}
    node, peer = by.get(("node", judged)), by.get((KIND, judged))
    if peer is None:
        why = "python-socketio is not installed" if not available() else "no python-socketio row"
        return [report.check(TARGET, ">= 3x cheaper", None, "x", CHEAPER, True, why)]
    note = (
        f"{at}; per delivery: python-socketio {report.fmt(peer['server_cpu_us_per_delivery'])} "
        f"us, nodes {report.fmt(node and node['server_cpu_us_per_delivery'])} us"
    )
    if peer["lost"]:
        note += f"; python-socketio lost {peer['lost']:,}"
    return [report.check(TARGET, ">= 3x cheaper", _ratio(peer, node), "x", CHEAPER, True, note)]
