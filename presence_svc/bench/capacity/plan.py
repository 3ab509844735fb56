"""The fleet a workload needs: node processes and Redis primaries (the fewest that meet every
constraint), the largest study one primary or node can carry, and which limit load growth
reaches first.

Pure functions of capacity_model's arithmetic; loads in cores (CPU seconds per second).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

from presence_svc.bench.capacity.inputs import KIB, MIB, US, Measured
from presence_svc.bench.capacity.model import (
    HeartbeatMix,
    Traffic,
    Workload,
    costs,
    heartbeat_mix,
    per_user,
    spread,
    study_node_cores,
    study_redis_cores,
    tiers,
    traffic,
    validate,
)
from presence_svc.bench.capacity.sizes import Sizes, measure_sizes
from presence_svc.bench.report import fmt
from presence_svc.redis.keys import SCHEDULE_SHARDS

# Redis's default `client-output-buffer-limit pubsub 32mb 8mb 60`: a subscriber connection is
# closed once Redis holds 32 MiB of output for it (or more than 8 MiB for 60 s, which a node
# that reads at all never reaches at these rates).
PUBSUB_HARD_LIMIT = 32 * MIB
# Commands emit() in lua/_lib.lua adds for each event a heartbeat publishes: HINCRBY, SPUBLISH.
COMMANDS_PER_EMIT = 2


def ceil(x: float) -> int:
    """math.ceil, forgiving float noise (6.0000000001 cores need 6, not 7)."""
    return math.ceil(x - 1e-9)


def sockets_per_node(m: Measured, w: Workload) -> int:
    """Sockets whose idle RSS fits in a node's memory at the target utilisation."""
    free_mib = w.utilisation * w.node_memory_mib - m.node_base_rss_mib
    return max(int(free_mib * KIB / m.kib_per_socket), 0)


@dataclass(frozen=True, slots=True)
class NodePlan:
    processes: int
    binding: str  # the constraint that sets `processes`
    by_cpu: int
    by_memory: int
    cores_heartbeats: float
    cores_receive: float
    cores_deliveries: float
    cores_sweep: float
    sockets_per_node_limit: int
    sockets_per_node: float
    rss_mib_per_node: float
    cpu_per_node: float  # fraction of a core
    pubsub_in_bytes_per_node: float
    egress_bytes_per_node: float

    @property
    def cores(self) -> float:
        return self.cores_heartbeats + self.cores_receive + self.cores_deliveries + self.cores_sweep


def node_cores(m: Measured, w: Workload, nodes: int) -> tuple[float, float, float, float]:
    """(heartbeats, pub/sub receive, deliveries, sweep) in cores, with `nodes` processes."""
    c, t = costs(m, w), traffic(w, nodes)
    return (
        t.heartbeats * c.node_heartbeat * US,
        t.node_receives * c.node_receive * US,
        t.deliveries * c.node_delivery * US,
        t.sweep_transitions * c.node_transition * US,
    )


def plan_nodes(m: Measured, w: Workload, sizes: Sizes) -> NodePlan:
    """The fewest processes that meet every constraint. The CPU one grows with the number of
    nodes (more nodes, more of them per study), so iterate from 1: the count only rises and
    stops at the first fixed point."""
    cap = sockets_per_node(m, w)
    by_memory = ceil(w.users / cap) if cap else sys.maxsize
    processes = 1
    for _ in range(1000):
        by_cpu = ceil(sum(node_cores(m, w, processes)) / w.utilisation)
        wanted = max(by_cpu, by_memory, 1)
        if wanted == processes:
            break
        processes = wanted
    hb, recv, deliv, sweep = node_cores(m, w, processes)
    t = traffic(w, processes)
    per_node = w.users / processes
    return NodePlan(
        processes=processes,
        binding="CPU" if by_cpu >= by_memory else "socket memory",
        by_cpu=by_cpu,
        by_memory=by_memory,
        cores_heartbeats=hb,
        cores_receive=recv,
        cores_deliveries=deliv,
        cores_sweep=sweep,
        sockets_per_node_limit=cap,
        sockets_per_node=per_node,
        rss_mib_per_node=m.node_base_rss_mib + per_node * m.kib_per_socket / KIB,
        cpu_per_node=(hb + recv + deliv + sweep) / processes,
        pubsub_in_bytes_per_node=t.node_receives * sizes.pubsub_message / processes,
        egress_bytes_per_node=t.deliveries * sizes.ws_frame / processes,
    )


@dataclass(frozen=True, slots=True)
class RedisPlan:
    primaries: int
    cores_heartbeats: float
    cores_publish: float  # the publish itself
    cores_copies: float  # one copy per node reached
    cores_sweep: float
    cores_polls: float  # every node's sweep tick: 16 ZRANGEBYSCORE
    commands_per_s: float  # INFO commandstats style: commands inside scripts included
    requests_per_s: float  # top-level commands the nodes send
    published_per_s: float
    published_bytes_per_s: float
    pushed_per_s: float  # messages to nodes
    pushed_bytes_per_s: float
    heartbeat_bytes_in_per_s: float
    heartbeat_bytes_out_per_s: float
    memory_mib: float
    cpu_per_primary: float
    schedule_shard_cpu: float  # the busiest of the 16 schedule shards, fraction of a core
    schedule_calls_per_s: float  # schedule.lua, all shards (full, reactivating, REST heartbeats)

    @property
    def cores(self) -> float:
        return (
            self.cores_heartbeats
            + self.cores_publish
            + self.cores_copies
            + self.cores_sweep
            + self.cores_polls
        )


def heartbeat_bytes(mix: HeartbeatMix, sizes: Sizes, cursor_share: float) -> tuple[float, float]:
    """RESP bytes (to Redis, back) per heartbeat for this mix of kinds: a reactivating one is
    a steady one and then schedule.lua; `cursor_share` of them carry a new cursor (the same
    four arguments more in every kind)."""
    cursor = cursor_share * (sizes.cursor_request - sizes.heartbeat_request)
    request = (
        mix.steady * sizes.heartbeat_request
        + mix.reactivating * (sizes.heartbeat_request + sizes.schedule_request)
        + mix.full * sizes.full_request
        + mix.rest * sizes.rest_request
    )
    reply = (
        mix.steady * sizes.heartbeat_reply
        + mix.reactivating * (sizes.heartbeat_reply + sizes.schedule_reply)
        + mix.full * sizes.full_reply
        + mix.rest * sizes.rest_reply
    )
    return request + cursor, reply


def plan_redis(m: Measured, w: Workload, nodes: int, sizes: Sizes) -> RedisPlan:
    c, t, mix = costs(m, w), traffic(w, nodes), heartbeat_mix(m, w)
    polls = nodes * SCHEDULE_SHARDS / w.sweep_interval
    heartbeat_events = t.events - t.sweep_transitions
    cores = {
        "heartbeats": t.heartbeats * c.redis_heartbeat * US,
        "publish": heartbeat_events * c.redis_copy * US,  # the sweep's is in redis_transition
        "copies": t.node_receives * c.redis_copy * US,
        "sweep": t.sweep_transitions * c.redis_transition * US,
        "polls": polls * c.redis_command * US,
    }
    total = sum(cores.values())
    primaries = max(ceil(total / w.utilisation), 1)
    commands_per_hb = (1 - w.rest_share) * m.ws_commands_per_hb + w.rest_share * (
        m.floor_commands_per_hb
    )
    cursor_share = t.cursor_moves / t.heartbeats if t.heartbeats else 0.0
    bytes_in, bytes_out = heartbeat_bytes(mix, sizes, cursor_share)
    schedules = t.heartbeats * mix.schedules
    return RedisPlan(
        primaries=primaries,
        cores_heartbeats=cores["heartbeats"],
        cores_publish=cores["publish"],
        cores_copies=cores["copies"],
        cores_sweep=cores["sweep"],
        cores_polls=cores["polls"],
        commands_per_s=t.heartbeats * commands_per_hb
        + heartbeat_events * COMMANDS_PER_EMIT
        + polls,
        requests_per_s=t.heartbeats * mix.requests + polls,
        published_per_s=t.events,
        published_bytes_per_s=t.events * sizes.envelope,
        pushed_per_s=t.node_receives,
        pushed_bytes_per_s=t.node_receives * sizes.pubsub_message,
        heartbeat_bytes_in_per_s=t.heartbeats * bytes_in,
        heartbeat_bytes_out_per_s=t.heartbeats * bytes_out,
        memory_mib=w.users * m.redis_mib_per_million_sessions / 1e6,
        cpu_per_primary=total / primaries,
        # Studies spread evenly over the shards (crc32 of the id); every node polls each one.
        schedule_shard_cpu=US
        * (
            schedules / SCHEDULE_SHARDS * c.redis_schedule
            + nodes / w.sweep_interval * c.redis_command
        ),
        schedule_calls_per_s=schedules,
    )


def largest_study(load: Callable[[int], float], capacity: float, ceiling: int = 10**8) -> int:
    """The most viewers a study may have with load(viewers) <= capacity (load rises with
    viewers); 0 when even one viewer is too many."""
    if load(1) > capacity:
        return 0
    low, high = 1, 2
    while high < ceiling and load(high) <= capacity:
        low, high = high, high * 2
    high = min(high, ceiling)
    if load(high) <= capacity:
        return high
    while high - low > 1:
        mid = (low + high) // 2
        if load(mid) <= capacity:
            low = mid
        else:
            high = mid
    return low


def study_on_shard(m: Measured, w: Workload, nodes: int) -> Callable[[int], float]:
    """Redis CPU of one study of v viewers: it cannot be split, its slot is on one primary."""
    u, c = per_user(w), costs(m, w)
    return lambda v: study_redis_cores(v, spread(v, nodes, w.affinity), u, c)


def study_on_node(m: Measured, w: Workload, nodes: int) -> Callable[[int], float]:
    """Node CPU one study of v viewers costs each node it reaches: every one of them reads
    every event of the study, and the deliveries are shared among them."""
    u, c = per_user(w), costs(m, w)

    def load(v: int) -> float:
        reached = spread(v, nodes, w.affinity)
        return study_node_cores(v, reached, u, c) / reached

    return load


@dataclass(frozen=True, slots=True)
class Limit:
    name: str
    now: str  # where it stands at the planned load
    breaks_at: float  # load factor k at which it is reached (100 %, planned fleet)
    scale_out: bool  # adding nodes or primaries pushes it back
    remedy: str


@dataclass(frozen=True, slots=True)
class Plan:
    measured: Measured
    workload: Workload
    sizes: Sizes
    traffic: Traffic
    nodes: NodePlan
    redis: RedisPlan
    largest_study: float  # viewers of the largest study in the workload
    shard_study_limit: int  # viewers one study may have on one primary, at the utilisation
    node_study_limit: int  # ... on the nodes it reaches
    limits: tuple[Limit, ...]


def viewers_text(viewers: float) -> str:
    return f"{viewers:,.0f}" if viewers == int(viewers) else f"{viewers:,.1f}"


def heaviest_pubsub_link(w: Workload, t: Traffic, nodes: int, primaries: int) -> float:
    """Messages/s on the busiest (node, primary) SSUBSCRIBE link: its share of the node's
    events, plus every event of one hot study it watches (one channel, one primary)."""
    u = per_user(w)
    even = t.node_receives / nodes / primaries
    hot = w.hot_study_viewers * u.events if w.hot_studies else 0.0
    return even + hot


def limits(
    m: Measured, w: Workload, sizes: Sizes, t: Traffic, n: NodePlan, r: RedisPlan, largest: float
) -> list[Limit]:
    """What load growth reaches first, ranked. k scales every user rate with the planned fleet
    kept (fleet limits), or the largest study's viewers (hot-study limits)."""
    out = [
        *_fleet_limits(m, w, n, r),
        *_hot_study_limits(m, w, n, largest),
        *_shared_limits(w, sizes, t, n, r),
    ]
    return sorted(out, key=lambda x: x.breaks_at)


def _fleet_limits(m: Measured, w: Workload, n: NodePlan, r: RedisPlan) -> list[Limit]:
    """The limits more node processes or primaries push back in proportion."""
    free_mib = w.node_memory_mib - m.node_base_rss_mib
    socket_mib = n.sockets_per_node * m.kib_per_socket / KIB
    return [
        Limit(
            "node CPU",
            f"{fmt(n.cpu_per_node)} of a core per process, {n.processes:,} processes",
            1 / n.cpu_per_node,
            True,
            "more node processes; study affinity in the load balancer (fewer nodes per event)",
        ),
        Limit(
            "node memory (idle sockets)",
            f"{fmt(n.rss_mib_per_node)} of {fmt(w.node_memory_mib)} MiB, "
            f"{fmt(round(n.sockets_per_node))} sockets per process",
            free_mib / socket_mib,
            True,
            "more node processes, or a larger memory limit",
        ),
        Limit(
            "Redis primary CPU",
            f"{fmt(r.cpu_per_primary)} of a core per primary, {r.primaries:,} primaries",
            1 / r.cpu_per_primary,
            True,
            "more primaries (reshard); study affinity (fewer copies); throttle cursor moves",
        ),
    ]


def _hot_study_limits(m: Measured, w: Workload, n: NodePlan, largest: float) -> list[Limit]:
    """The limits of one study, which cannot be split over primaries or past its nodes."""
    shard_max = largest_study(study_on_shard(m, w, n.processes), 1.0)
    node_max = largest_study(study_on_node(m, w, n.processes), 1.0)
    biggest = f"largest study {viewers_text(largest)} viewers"
    return [
        Limit(
            "one hot study on its primary",
            f"{biggest}; one primary carries {shard_max:,}",
            shard_max / largest,
            False,
            "throttle cursor moves in big studies; study affinity; split a huge study",
        ),
        Limit(
            "one hot study on its nodes",
            f"{biggest}; the nodes it reaches carry {node_max:,}",
            node_max / largest,
            False,
            "spread a huge study over several nodes (bounded-load hashing); throttle cursors"
            if w.affinity
            else "throttle cursor moves in big studies; split a huge study",
        ),
    ]


def _shared_limits(w: Workload, sizes: Sizes, t: Traffic, n: NodePlan, r: RedisPlan) -> list[Limit]:
    """The limits of what every node shares: the schedule shards and a pub/sub link."""
    link = heaviest_pubsub_link(w, t, n.processes, r.primaries) * sizes.pubsub_message
    return [
        Limit(
            f"{SCHEDULE_SHARDS} schedule shards",
            f"busiest {fmt(r.schedule_shard_cpu)} of a core "
            f"({fmt(r.schedule_calls_per_s / SCHEDULE_SHARDS)} schedule.lua/s)",
            1 / r.schedule_shard_cpu,
            False,
            "a longer sweep interval (fewer polls); more schedule shards (a storage format change)",
        ),
        Limit(
            "pub/sub output buffer per node",
            f"busiest link {fmt(link / KIB)} KiB/s: 32 MiB after a "
            f"{fmt(PUBSUB_HARD_LIMIT / link)} s stall",
            PUBSUB_HARD_LIMIT / (link * w.stall_seconds),
            True,
            "CPU headroom on nodes; raise client-output-buffer-limit pubsub",
        ),
    ]


def plan(m: Measured, w: Workload, sizes: Sizes | None = None) -> Plan:
    validate(w)
    sizes = sizes or measure_sizes()
    n = plan_nodes(m, w, sizes)
    r = plan_redis(m, w, n.processes, sizes)
    t = traffic(w, n.processes)
    largest = max(tier.viewers for tier in tiers(w))
    return Plan(
        measured=m,
        workload=w,
        sizes=sizes,
        traffic=t,
        nodes=n,
        redis=r,
        largest_study=largest,
        shard_study_limit=largest_study(study_on_shard(m, w, n.processes), w.utilisation),
        node_study_limit=largest_study(study_on_node(m, w, n.processes), w.utilisation),
        limits=tuple(limits(m, w, sizes, t, n, r, largest)),
    )
