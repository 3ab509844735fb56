"""The measured figures the capacity model starts from: per-operation costs of one `make bench`
run, as built-in defaults (the latest full run printed in docs/performance.md) or read from a
results folder.

Costs are in microseconds of CPU of one core, loads in cores (CPU seconds per second).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

US = 1e-6
KIB = 1024
MIB = 1024 * 1024
# The fan-out row the model takes its per-delivery costs from: the load at which the harness
# judges its targets (fanout.TARGET_LOAD; not imported, that module pulls in the harness).
FANOUT_LOAD = 10_000
# The sweep row: transitions made due at once (the larger of the two the harness measures).
SWEEP_DUE = 10_000


@dataclass(frozen=True, slots=True)
class Measured:
    """Per-operation costs from one `make bench` run (see docs/performance.md for each)."""

    source: str
    # heartbeats.json: one node process, CPU per acknowledged heartbeat.
    ws_node_us_per_hb: float
    rest_node_us_per_hb: float
    # Redis CPU per heartbeat as the node drives it (its batching, the lease SADD included),
    # and the floor: the same scripts pipelined 200 at a time with no node in between.
    ws_redis_us_per_hb: float
    rest_redis_us_per_hb: float
    floor_redis_us_per_hb: float
    # INFO commandstats per heartbeat, commands run inside the scripts included.
    ws_commands_per_hb: float
    floor_commands_per_hb: float
    # fanout.json, node row at the load nearest FANOUT_LOAD: all nodes' CPU per delivery,
    # its p99, and Redis CPU (fraction of a core) while it published `fanout_events_per_s`,
    # minus Redis's own idle CPU (the baseline row at that load, which does not use Redis).
    node_us_per_delivery: float
    fanout_deliveries_per_s: float
    fanout_p99_ms: float
    fanout_events_per_s: float
    fanout_redis_cpu: float
    fanout_redis_idle_cpu: float
    fanout_nodes: int  # each event reached this many nodes...
    fanout_viewers: int  # ...with viewers / nodes local sockets each
    # idle.json, node row with the most sockets: RSS per idle socket, RSS before the first.
    kib_per_socket: float
    node_base_rss_mib: float
    idle_sockets: int
    # sweep.json, largest size, SWEEP_DUE sessions due at once: CPU per transition of Redis
    # and of the sweeping process, and Redis used_memory per million sessions.
    sweep_redis_us_per_transition: float
    sweep_node_us_per_transition: float
    redis_mib_per_million_sessions: float
    fallbacks: tuple[str, ...] = ()  # fields a results folder lacked (built-in value used)

    @property
    def redis_us_per_event(self) -> float:
        """Redis CPU per event published in the fan-out scenario (delivered to fanout_nodes)."""
        busy = max(self.fanout_redis_cpu - self.fanout_redis_idle_cpu, 0.0)
        return busy / self.fanout_events_per_s / US if self.fanout_events_per_s else 0.0

    @property
    def sockets_per_event_and_node(self) -> float:
        """Local sockets each node delivered one event to in the fan-out scenario."""
        return self.fanout_viewers / self.fanout_nodes


# The latest full run printed in docs/performance.md ("Latest: full profile after the first
# optimisations"): `make bench`, run 20261128T085706Z-full, code of commit 2a3b92e, 2026-11-28.
# Values as printed there (rounded as printed).
DEFAULT_MEASURED = Measured(
    source="bench run 20261128T085706Z-full (code 2a3b92e), as printed in docs/performance.md",
    ws_node_us_per_hb=70.3,
    rest_node_us_per_hb=193.6,
    ws_redis_us_per_hb=26.3,
    rest_redis_us_per_hb=31.9,
    floor_redis_us_per_hb=20.8,
    # evalsha=2.018 hdel=2.018 hgetall=1.009 hset=1.009 persist=1.009 sadd=2.018 zadd=1.009
    # zrem=1.009 zscore=1.009
    ws_commands_per_hb=12.108,
    floor_commands_per_hb=11.0,
    node_us_per_delivery=40.3,
    fanout_deliveries_per_s=9_998,
    fanout_p99_ms=3.28,
    fanout_events_per_s=200.1,
    fanout_redis_cpu=0.03,
    fanout_redis_idle_cpu=0.002,
    fanout_nodes=2,
    fanout_viewers=50,
    kib_per_socket=29.4,
    node_base_rss_mib=51.9,
    idle_sockets=10_000,
    sweep_redis_us_per_transition=32.0,
    sweep_node_us_per_transition=14.0,
    redis_mib_per_million_sessions=335.0,
)


def _rows(folder: Path, scenario: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    path = folder / f"{scenario}.json"
    if not path.exists():
        return {}, []
    data: dict[str, Any] = json.loads(path.read_text())
    return data, list(data.get("rows", []))


def _nearest(rows: Sequence[dict[str, Any]], key: str, target: float) -> dict[str, Any] | None:
    return min(rows, key=lambda r: abs(r[key] - target)) if rows else None


def read_results(folder: Path, defaults: Measured = DEFAULT_MEASURED) -> Measured:
    """The costs of one results folder; a figure it lacks keeps its default, listed in
    `fallbacks` (a scenario not run, CPU not measured on external nodes, ...)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no results folder {folder}")
    found: dict[str, Any] = {}
    code = ""

    def take(name: str, value: Any) -> None:
        if value is not None:
            found[name] = value

    data, rows = _rows(folder, "heartbeats")
    code = code or data.get("environment", {}).get("code", "")
    paths = {r.get("path"): r for r in rows}
    ws, rest, floor = (paths.get(p) for p in ("WebSocket", "REST", "raw Redis (floor)"))
    if ws:
        take("ws_node_us_per_hb", ws.get("node_cpu_us_per_heartbeat"))
        take("ws_redis_us_per_hb", ws.get("redis_cpu_us_per_heartbeat"))
        if ws.get("redis_commands_per_heartbeat"):
            take("ws_commands_per_hb", sum(ws["redis_commands_per_heartbeat"].values()))
    if rest:
        take("rest_node_us_per_hb", rest.get("node_cpu_us_per_heartbeat"))
        take("rest_redis_us_per_hb", rest.get("redis_cpu_us_per_heartbeat"))
    if floor:
        take("floor_redis_us_per_hb", floor.get("redis_cpu_us_per_heartbeat"))
        if floor.get("redis_commands_per_heartbeat"):
            take("floor_commands_per_hb", sum(floor["redis_commands_per_heartbeat"].values()))

    data, rows = _rows(folder, "fanout")
    code = code or data.get("environment", {}).get("code", "")
    node = _nearest(
        [r for r in rows if r.get("target") == "node"], "offered_deliveries_per_s", FANOUT_LOAD
    )
    if node:
        load = node["offered_deliveries_per_s"]
        base = next(
            (
                r
                for r in rows
                if r.get("target") == "baseline" and r["offered_deliveries_per_s"] == load
            ),
            None,
        )
        take("node_us_per_delivery", node.get("server_cpu_us_per_delivery"))
        take("fanout_deliveries_per_s", node.get("deliveries_per_s"))
        take("fanout_p99_ms", (node.get("latency_ms") or {}).get("p99"))
        take("fanout_events_per_s", node.get("events_per_s"))
        take("fanout_redis_cpu", node.get("redis_cpu_util"))
        # No baseline row: count Redis's idle CPU as zero (a slight overestimate per event).
        take("fanout_redis_idle_cpu", (base or {}).get("redis_cpu_util") or 0.0)
        config = data.get("config", {})
        take("fanout_nodes", config.get("nodes"))
        take("fanout_viewers", config.get("viewers"))

    data, rows = _rows(folder, "idle")
    code = code or data.get("environment", {}).get("code", "")
    nodes = [r for r in rows if r.get("server") == "node" and r.get("sockets")]
    if nodes:
        biggest = max(nodes, key=lambda r: r["sockets"])
        take("kib_per_socket", biggest.get("rss_per_socket_kib"))
        take("node_base_rss_mib", biggest.get("rss_before_mib"))
        take("idle_sockets", biggest.get("sockets"))

    data, rows = _rows(folder, "sweep")
    code = code or data.get("environment", {}).get("code", "")
    if rows:
        size = max(r["sessions"] for r in rows)
        due = _nearest([r for r in rows if r["sessions"] == size and "due" in r], "due", SWEEP_DUE)
        if due:
            take("sweep_redis_us_per_transition", due.get("redis_cpu_us_per_transition"))
            take("sweep_node_us_per_transition", due.get("harness_cpu_us_per_transition"))
        empty = next((r for r in rows if r["sessions"] == size and "due" not in r), None)
        if empty and empty.get("redis_used_mib"):
            take("redis_mib_per_million_sessions", empty["redis_used_mib"] * 1e6 / size)

    names = [f.name for f in dataclasses.fields(Measured) if f.name not in ("source", "fallbacks")]
    source = f"bench results {folder}" + (f" (code {code})" if code else "")
    return dataclasses.replace(
        defaults,
        source=source,
        fallbacks=tuple(n for n in names if n not in found),
        **{k: type(getattr(defaults, k))(v) for k, v in found.items()},
    )
