"""What `presence-svc capacity` prints: a plan as tables, or as JSON."""

from __future__ import annotations

import dataclasses
from typing import Any

from presence_svc.bench.capacity.inputs import MIB, Measured
from presence_svc.bench.capacity.model import Traffic, Workload, costs
from presence_svc.bench.capacity.plan import Plan, viewers_text
from presence_svc.bench.report import fmt, table

QUANTITY = ["quantity", "value", "unit", "how"]  # the columns of the tables but the last


def _mb(value: float) -> float:
    return value / MIB


def split_text(m: Measured, w: Workload) -> str:
    """Where the node's per-event and per-delivery costs come from (capacity_model.fanout_split)."""
    c = costs(m, w)
    n, d = f"{m.sockets_per_event_and_node:g}", fmt(m.node_us_per_delivery)
    if not m.receive_measured:
        return (
            "node receive cost: not measured (these figures have no receive-cost point), so "
            f"receive_share {w.receive_share:g} of {d} us per delivery x {n} sockets is taken as "
            f"paid once per event and node (a guess); {fmt(c.node_delivery)} us per delivery"
        )
    at = m.receive_events_per_s
    one = m.receive_us_per_event_at_fanout_rate
    return (
        f"node receive cost, measured: {fmt(m.receive_us_per_event)} us per event and node with "
        f"one socket at {fmt(at) if at is not None else '?'} events/s"
        + (f" ({fmt(one)} at {fmt(m.fanout_events_per_s)} events/s)" if one is not None else "")
        + f", {d} us per delivery with {n} sockets at {fmt(m.fanout_events_per_s)} events/s: "
        f"send {fmt(c.node_delivery)} us per delivery, receive {fmt(c.node_receive)} us per event"
    )


def render(p: Plan) -> str:
    """The tables `presence-svc capacity` prints."""
    sections = [
        table("Load", QUANTITY, _load_rows(p.traffic)),
        table("Nodes (one process = one core)", QUANTITY, _node_rows(p)),
        table("Redis (one primary = one core)", QUANTITY, _redis_rows(p)),
        table(
            "What breaks first (k: growth at which a limit is hit, at 100 % of it: of all load "
            "with the planned fleet, or of the largest study's viewers)",
            ["#", "limit", "k", "scale-out", "now", "what to do"],
            _limit_rows(p),
        ),
    ]
    lines = _header(p)
    for section in sections:
        lines += ["", section]
    return "\n".join(lines)


def _header(p: Plan) -> list[str]:
    w, m, s = p.workload, p.measured, p.sizes
    c = costs(m, w)
    lines = [
        f"presence-svc capacity: {w.users:,} users in {w.studies:,} studies; each node process "
        f"and Redis primary planned at {_pct(w)} of a core",
        f"measured: {m.source}",
    ]
    if m.fallbacks:
        lines.append(f"not in the results, built-in value used: {', '.join(m.fallbacks)}")
    spread_text = "one node per study (affinity)" if w.affinity else "at random over the nodes"
    hot = (
        f"; {w.hot_studies:,} hot studies of {w.hot_study_viewers:,} viewers"
        if w.hot_studies
        else ""
    )
    lines.append(split_text(m, w))
    lines += [
        f"workload: a heartbeat every {w.heartbeat_interval:g} s + {w.cursor_rate:g} cursor "
        f"moves/s per user; {w.session_minutes:g} min stays; {w.idle_per_hour:g} idle spells/h "
        f"per user; sockets {spread_text}{hot}",
        f"event: cursor_moved {s.envelope} B msgpack envelope, {s.pubsub_message} B pushed to a "
        f"node, {s.json_text} B JSON ({s.ws_frame} B frame) per socket",
        f"costs (us of one core): node {fmt(c.node_heartbeat)} per heartbeat, "
        f"{fmt(c.node_receive)} per event received, {fmt(c.node_delivery)} per delivery; "
        f"Redis {fmt(c.redis_heartbeat)} per heartbeat, {fmt(c.redis_copy)} per event published "
        f"or copied to a node (measured at {m.redis_measured_at})",
    ]
    return lines


def _pct(w: Workload) -> str:
    return f"{w.utilisation * 100:g} %"


# The four functions below are data tables: one row per line of the printed table.


def _load_rows(t: Traffic) -> list[list[Any]]:
    return [
        ["heartbeats", t.heartbeats, "/s", "users / interval + cursor moves"],
        ["events published", t.events, "/s", "all types below"],
        ["  cursor_moved", t.cursor_moves, "/s", "users x cursor rate"],
        ["  user_joined, user_left", t.joins, "/s each", "users / mean stay"],
        ["  user_idle, user_active", t.idles, "/s each", "users x idle spells"],
        ["sweep transitions", t.sweep_transitions, "/s", "user_idle + user_left"],
        ["deliveries to sockets", t.deliveries, "/s", "events x viewers of their study"],
        ["nodes reached per event", t.nodes_per_event, "", "N(1 - (1 - 1/N)^viewers)"],
    ]


def _node_rows(p: Plan) -> list[list[Any]]:
    w, m, n = p.workload, p.measured, p.nodes
    return [
        ["CPU: heartbeats", n.cores_heartbeats, "cores", "heartbeats x node us/heartbeat"],
        ["CPU: pub/sub receive", n.cores_receive, "cores", "events x nodes reached x us/event"],
        ["CPU: deliveries", n.cores_deliveries, "cores", "deliveries x us/delivery"],
        ["CPU: sweep", n.cores_sweep, "cores", "transitions x us/transition"],
        ["CPU total", n.cores, "cores", ""],
        ["processes for CPU", n.by_cpu, "", f"CPU total / {w.utilisation:g}"],
        [
            "sockets per process (limit)",
            n.sockets_per_node_limit,
            "",
            f"({w.utilisation:g} x {w.node_memory_mib:g} MiB - {m.node_base_rss_mib:g}) / "
            f"{m.kib_per_socket:g} KiB",
        ],
        ["processes for socket memory", n.by_memory, "", "users / sockets per process"],
        ["node processes", n.processes, "", f"binding: {n.binding}"],
        ["sockets per process", round(n.sockets_per_node), "", ""],
        ["RSS per process", n.rss_mib_per_node, "MiB", "idle sockets only"],
        ["CPU per process", n.cpu_per_node, "of a core", ""],
        ["pub/sub in per process", _mb(n.pubsub_in_bytes_per_node), "MiB/s", ""],
        ["to clients per process", _mb(n.egress_bytes_per_node), "MiB/s", "WebSocket frames"],
    ]


def _redis_rows(p: Plan) -> list[list[Any]]:
    w, r, u_pct = p.workload, p.redis, _pct(p.workload)
    return [
        ["CPU: heartbeats", r.cores_heartbeats, "cores", "heartbeats x Redis us/heartbeat"],
        ["CPU: publishes", r.cores_publish, "cores", "heartbeat events x us/copy"],
        ["CPU: copies to nodes", r.cores_copies, "cores", "events x nodes reached x us/copy"],
        ["CPU: sweep", r.cores_sweep, "cores", "transitions x us/transition"],
        ["CPU: sweep polls", r.cores_polls, "cores", "nodes x 16 ZRANGEBYSCORE per tick"],
        ["CPU total", r.cores, "cores", ""],
        ["primaries", r.primaries, "", f"CPU total / {w.utilisation:g} (a cluster: >= 3)"],
        ["CPU per primary", r.cpu_per_primary, "of a core", ""],
        ["commands", r.commands_per_s, "/s", "incl. those inside scripts"],
        ["requests from nodes", r.requests_per_s, "/s", "top-level commands"],
        ["pub/sub published", r.published_per_s, "msg/s", "made inside the scripts"],
        ["pub/sub published", _mb(r.published_bytes_per_s), "MiB/s", "envelopes"],
        ["pub/sub pushed to nodes", r.pushed_per_s, "msg/s", "events x nodes reached"],
        ["pub/sub pushed to nodes", _mb(r.pushed_bytes_per_s), "MiB/s", "with RESP framing"],
        ["heartbeat requests in", _mb(r.heartbeat_bytes_in_per_s), "MiB/s", "RESP"],
        ["heartbeat replies out", _mb(r.heartbeat_bytes_out_per_s), "MiB/s", "RESP"],
        [
            "network per primary",
            _mb(
                (r.heartbeat_bytes_in_per_s + r.heartbeat_bytes_out_per_s + r.pushed_bytes_per_s)
                / r.primaries
            ),
            "MiB/s",
            "in + out",
        ],
        ["memory (sessions)", r.memory_mib, "MiB", "users x MiB per 1M sessions (no leases)"],
        ["busiest schedule shard", r.schedule_shard_cpu, "of a core", "1 of 16, cannot split"],
        [
            "largest study per primary",
            p.shard_study_limit,
            "viewers",
            f"at {u_pct}; largest here {viewers_text(p.largest_study)}",
        ],
        ["largest study per node", p.node_study_limit, "viewers", f"at {u_pct}"],
    ]


def _limit_rows(p: Plan) -> list[list[Any]]:
    return [
        [i + 1, x.name, x.breaks_at, "yes" if x.scale_out else "no", x.now, x.remedy]
        for i, x in enumerate(p.limits)
    ]


def to_json(p: Plan) -> dict[str, Any]:
    data: dict[str, Any] = dataclasses.asdict(p)
    data["nodes"]["cores"] = p.nodes.cores
    data["redis"]["cores"] = p.redis.cores
    data["measured"]["redis_us_per_event"] = p.measured.redis_us_per_event
    data["costs_us"] = dataclasses.asdict(costs(p.measured, p.workload))
    return data
