"""The measured figures the capacity model starts from: per-operation costs of one `make bench`
run, as built-in defaults (the full run named in docs/capacity.md) or read from a
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
# judges its targets (fanout_measure.TARGET_LOAD; not imported: it pulls in the harness).
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
    # fanout.json, the receive-cost point (one socket per node and event), node rows: all
    # nodes' CPU per event and node at the highest events/s measured, that rate, and the same
    # at the events/s nearest fanout_events_per_s. None: not measured (a results folder without
    # the point, or external nodes); the model then splits node_us_per_delivery with
    # Workload.receive_share instead (capacity_model.fanout_split).
    receive_us_per_event: float | None = None
    receive_events_per_s: float | None = None
    receive_us_per_event_at_fanout_rate: float | None = None
    # The same point's Redis CPU (fraction of a core, read in ns) at receive_events_per_s, and
    # the baseline row's at that rate (the baseline does not use Redis: Redis's idle CPU).
    receive_redis_cpu: float | None = None
    receive_redis_idle_cpu: float | None = None
    # heartbeats.json, WebSocket row, from its commandstats: top-level requests per heartbeat
    # (ws_requests: the EVALSHAs and the lease SADDs the node sent) and schedule.lua runs per
    # heartbeat (ws_schedules: the EVALSHAs beyond heartbeat.lua's one). The defaults are the
    # steady heartbeat's (the bench's sockets are past their first heartbeat and never idle):
    # 1 request, no schedule.lua; a row of code before steady heartbeats has 3 and 1.
    ws_requests_per_hb: float = 1.004
    ws_schedules_per_hb: float = 0.0
    fallbacks: tuple[str, ...] = ()  # fields a results folder lacked (built-in value used)

    @property
    def redis_us_per_event(self) -> float:
        """Redis CPU per event published (one publish, a copy to each of fanout_nodes).

        From the receive-cost point where it was measured, else from the fan-out load. Like a
        node's, Redis's CPU per event falls as its rate rises (a wake-up is shared by more
        events): the receive point publishes ten times the load's events/s and reads Redis in
        ns, and a planned primary is busier than either, so the busier point is the nearer,
        and still a conservative, figure."""
        rate = self.receive_events_per_s
        if self.receive_redis_cpu is not None and rate:
            busy = max(self.receive_redis_cpu - (self.receive_redis_idle_cpu or 0.0), 0.0)
            return busy / rate / US
        busy = max(self.fanout_redis_cpu - self.fanout_redis_idle_cpu, 0.0)
        return busy / self.fanout_events_per_s / US if self.fanout_events_per_s else 0.0

    @property
    def redis_measured_at(self) -> str:
        """Where redis_us_per_event comes from, for the report."""
        if self.receive_redis_cpu is not None and self.receive_events_per_s:
            return f"the receive-cost point, {self.receive_events_per_s:,.0f} events/s"
        return f"the fan-out load, {self.fanout_events_per_s:,.0f} events/s"

    @property
    def receive_measured(self) -> bool:
        """The receive-cost point is in these figures (else receive_share is used)."""
        return self.receive_us_per_event is not None

    @property
    def ws_steady(self) -> bool:
        """The WebSocket row measured steady heartbeats (code since 6791863): most of its
        heartbeats ran no schedule.lua. Before, every WebSocket heartbeat was a full one (lease
        SADD, heartbeat.lua, schedule.lua), and the row's figures are those of full heartbeats."""
        return self.ws_schedules_per_hb < 0.5

    @property
    def sockets_per_event_and_node(self) -> float:
        """Local sockets each node delivered one event to in the fan-out scenario."""
        return self.fanout_viewers / self.fanout_nodes


# The full run of issue 14's round on the new machine: `make bench`, run 20261201T190838Z-full,
# 2026-12-01, service code of commit c26b3bc (b8ef633's too: the commits after it change only
# docs), on a 2-core AMD EPYC virtual machine, slower than the one be34885's run came from
# (docs/capacity.md compares the two). Values as that run's JSON holds them, i.e. what
# `presence-svc capacity --results bench/results/20261201T190838Z-full` reads (the commands sum
# 5 x 1.007 to 5.034999999999999 in floating point).
DEFAULT_MEASURED = Measured(
    source="bench run 20261201T190838Z-full (code c26b3bc), see docs/capacity.md",
    ws_node_us_per_hb=48.03,
    rest_node_us_per_hb=263.82,
    ws_redis_us_per_hb=31.78,
    rest_redis_us_per_hb=53.73,
    floor_redis_us_per_hb=40.92,
    # evalsha=1.007 hgetall=1.007 hset=1.007 sismember=1.007 zadd=1.007 (the steady heartbeat:
    # one EVALSHA, four commands inside)
    ws_commands_per_hb=5.034999999999999,
    floor_commands_per_hb=7.0,
    node_us_per_delivery=30.08,
    fanout_deliveries_per_s=9_977,
    fanout_p99_ms=4.082,
    fanout_events_per_s=200.1,
    fanout_redis_cpu=0.027,
    fanout_redis_idle_cpu=0.003,
    fanout_nodes=2,
    fanout_viewers=50,
    kib_per_socket=21.09,
    node_base_rss_mib=64.2,
    idle_sockets=10_000,
    sweep_redis_us_per_transition=75.0,
    sweep_node_us_per_transition=10.0,
    redis_mib_per_million_sessions=336.0,
    receive_us_per_event=92.06,
    receive_events_per_s=2000.1,
    receive_us_per_event_at_fanout_rate=334.46,
    receive_redis_cpu=0.122,
    receive_redis_idle_cpu=0.003,
    # evalsha 1.007 + no sadd; 1.007 EVALSHA - 1.007 HGETALL
    ws_requests_per_hb=1.007,
    ws_schedules_per_hb=0.0,
)


# Fields of the receive-cost point: a results folder without it leaves them None (the model then
# falls back on Workload.receive_share), rather than taking the built-in run's figures.
RECEIVE_FIELDS = (
    "receive_us_per_event",
    "receive_events_per_s",
    "receive_us_per_event_at_fanout_rate",
    "receive_redis_cpu",
    "receive_redis_idle_cpu",
)


SCENARIOS = ("heartbeats", "fanout", "idle", "sweep")  # the JSON files read, in this order


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
    runs = {scenario: _rows(folder, scenario) for scenario in SCENARIOS}
    loads = _fanout_loads(*runs["fanout"])
    rate = loads.get("fanout_events_per_s", defaults.fanout_events_per_s)
    found = {
        **_heartbeat_costs(runs["heartbeats"][1]),
        **loads,
        **_receive_point(runs["fanout"][1], rate),
        **_idle_costs(runs["idle"][1]),
        **_sweep_costs(runs["sweep"][1]),
    }
    # The first scenario that names the code measured names it for all.
    code = ""
    for data, _ in runs.values():
        code = code or data.get("environment", {}).get("code", "")
    names = [f.name for f in dataclasses.fields(Measured) if f.name not in ("source", "fallbacks")]
    source = f"bench results {folder}" + (f" (code {code})" if code else "")
    return dataclasses.replace(
        defaults,
        source=source,
        fallbacks=tuple(n for n in names if n not in found),
        **{k: _number(getattr(defaults, k), v) for k, v in found.items()},
    )


def _measured(**figures: Any) -> dict[str, Any]:
    """The figures a results folder holds: a None (not in it) leaves the field's default."""
    return {name: value for name, value in figures.items() if value is not None}


def _commands(row: dict[str, Any]) -> float | None:
    per_heartbeat = row.get("redis_commands_per_heartbeat")
    return sum(per_heartbeat.values()) if per_heartbeat else None


def _requests(row: dict[str, Any]) -> float | None:
    """Top-level requests per heartbeat in a WebSocket row: every EVALSHA, and the lease SADDs.

    The only plain command a heartbeat sends is the lease SADD of a full heartbeat, and a full
    heartbeat runs a second SADD inside heartbeat.lua (the connection set, hold_unless_released
    in lua/_lib.lua); commandstats cannot tell them apart, so half the SADDs are the node's (a
    row of full heartbeats: 2 EVALSHA + 2 SADD = 3 requests, as RedisStore.heartbeat sends).
    """
    per_heartbeat = row.get("redis_commands_per_heartbeat")
    if not per_heartbeat or "evalsha" not in per_heartbeat:
        return None
    return float(per_heartbeat["evalsha"]) + float(per_heartbeat.get("sadd", 0.0)) / 2


def _schedules(row: dict[str, Any]) -> float | None:
    """schedule.lua runs per heartbeat in a WebSocket row: the EVALSHAs that are not
    heartbeat.lua, which runs one HGETALL each time (a steady row: 1.004 - 1.004 = 0)."""
    per_heartbeat = row.get("redis_commands_per_heartbeat")
    if not per_heartbeat or "evalsha" not in per_heartbeat:
        return None
    return max(float(per_heartbeat["evalsha"]) - float(per_heartbeat.get("hgetall", 0.0)), 0.0)


def _heartbeat_costs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    paths = {r.get("path"): r for r in rows}
    ws, rest, floor = (paths.get(p) or {} for p in ("WebSocket", "REST", "raw Redis (floor)"))
    return _measured(
        ws_node_us_per_hb=ws.get("node_cpu_us_per_heartbeat"),
        ws_redis_us_per_hb=ws.get("redis_cpu_us_per_heartbeat"),
        ws_commands_per_hb=_commands(ws),
        ws_requests_per_hb=_requests(ws),
        ws_schedules_per_hb=_schedules(ws),
        rest_node_us_per_hb=rest.get("node_cpu_us_per_heartbeat"),
        rest_redis_us_per_hb=rest.get("redis_cpu_us_per_heartbeat"),
        floor_redis_us_per_hb=floor.get("redis_cpu_us_per_heartbeat"),
        floor_commands_per_hb=_commands(floor),
    )


def _fanout_loads(data: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    # Rows without a `point` predate the receive-cost point: all are the fan-out loads.
    loads = [r for r in rows if r.get("point", "fan-out") == "fan-out"]
    node = _nearest(
        [r for r in loads if r.get("target") == "node"], "offered_deliveries_per_s", FANOUT_LOAD
    )
    if not node:
        return {}
    load = node["offered_deliveries_per_s"]
    base = next(
        (
            r
            for r in loads
            if r.get("target") == "baseline" and r["offered_deliveries_per_s"] == load
        ),
        None,
    )
    config = data.get("config", {})
    return _measured(
        node_us_per_delivery=node.get("server_cpu_us_per_delivery"),
        fanout_deliveries_per_s=node.get("deliveries_per_s"),
        fanout_p99_ms=(node.get("latency_ms") or {}).get("p99"),
        fanout_events_per_s=node.get("events_per_s"),
        fanout_redis_cpu=node.get("redis_cpu_util"),
        # No baseline row: count Redis's idle CPU as zero (a slight overestimate per event).
        fanout_redis_idle_cpu=(base or {}).get("redis_cpu_util") or 0.0,
        fanout_nodes=config.get("nodes"),
        fanout_viewers=config.get("viewers"),
    )


def _receive_point(rows: list[dict[str, Any]], rate: float) -> dict[str, Any]:
    """The receive-cost figures: at the busiest rate, and at the rate nearest `rate` (the
    fan-out loads' events/s)."""
    receive = [
        r
        for r in rows
        if r.get("point") == "receive"
        and r.get("target") == "node"
        and r.get("server_cpu_us_per_event_and_node") is not None
    ]
    if not receive:
        # Explicit Nones, not defaults: the model must not mix in the built-in run's point.
        return dict.fromkeys(RECEIVE_FIELDS)
    busiest = max(receive, key=lambda r: r["events_per_s"])
    matched = min(receive, key=lambda r: abs(r["events_per_s"] - rate))
    base = next(
        (
            r
            for r in rows
            if r.get("point") == "receive"
            and r.get("target") == "baseline"
            and r.get("offered_events_per_s") == busiest.get("offered_events_per_s")
        ),
        None,
    )
    found = _measured(
        receive_us_per_event=busiest["server_cpu_us_per_event_and_node"],
        receive_events_per_s=busiest["events_per_s"],
        receive_us_per_event_at_fanout_rate=matched["server_cpu_us_per_event_and_node"],
        receive_redis_cpu=busiest.get("redis_cpu_util"),
        # No baseline row: count Redis's idle CPU as zero (a slight overestimate per event).
        receive_redis_idle_cpu=(base or {}).get("redis_cpu_util") or 0.0,
    )
    # Explicit None where the point has no Redis reading (external Redis): the fan-out load's.
    return {"receive_redis_cpu": None, **found}


def _idle_costs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    nodes = [r for r in rows if r.get("server") == "node" and r.get("sockets")]
    if not nodes:
        return {}
    biggest = max(nodes, key=lambda r: r["sockets"])
    return _measured(
        kib_per_socket=biggest.get("rss_per_socket_kib"),
        node_base_rss_mib=biggest.get("rss_before_mib"),
        idle_sockets=biggest.get("sockets"),
    )


def _sweep_costs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {}
    size = max(r["sessions"] for r in rows)
    due = _nearest([r for r in rows if r["sessions"] == size and "due" in r], "due", SWEEP_DUE)
    empty = next((r for r in rows if r["sessions"] == size and "due" not in r), None)
    used_mib = empty.get("redis_used_mib") if empty else None
    return _measured(
        sweep_redis_us_per_transition=(due or {}).get("redis_cpu_us_per_transition"),
        sweep_node_us_per_transition=(due or {}).get("harness_cpu_us_per_transition"),
        redis_mib_per_million_sessions=used_mib * 1e6 / size if used_mib else None,
    )


def _number(default: object, value: Any) -> Any:
    """`value` as the field's type: int where the default is one, else float (None stays)."""
    if value is None:
        return None
    return int(value) if isinstance(default, int) else float(value)
