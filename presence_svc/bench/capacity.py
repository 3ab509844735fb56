"""`presence-svc capacity`: how many node processes and Redis primaries a workload needs.

A calculator, not a benchmark: it takes per-operation costs measured by `make bench` (a results
folder, or the built-in figures of the latest full run printed in docs/performance.md), a
workload (users, studies, heartbeat and cursor rates, ...) and a target utilisation, and prints
the traffic, the fleet that carries it, and which limit load growth reaches first.
docs/capacity.md explains the model, its assumptions and the plan for 1 M users.

Every formula is a small pure function below; costs are in microseconds of CPU of one core,
loads in cores (CPU seconds per second).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from presence_svc.bench.report import fmt, table
from presence_svc.keys import SCHEDULE_SHARDS, Keys

US = 1e-6
KIB = 1024
MIB = 1024 * 1024
# The fan-out row the model takes its per-delivery costs from: the load at which the harness
# judges its targets (fanout.TARGET_LOAD; not imported, that module pulls in the harness).
FANOUT_LOAD = 10_000
# The sweep row: transitions made due at once (the larger of the two the harness measures).
SWEEP_DUE = 10_000
# Redis's default `client-output-buffer-limit pubsub 32mb 8mb 60`: a subscriber connection is
# closed once Redis holds 32 MiB of output for it (or more than 8 MiB for 60 s, which a node
# that reads at all never reaches at these rates).
PUBSUB_HARD_LIMIT = 32 * MIB
# A heartbeat over a WebSocket is three top-level commands (RedisStore.heartbeat): the lease
# SADD, heartbeat.lua and schedule.lua; over REST there is no lease.
WS_REQUESTS_PER_HEARTBEAT = 3
REST_REQUESTS_PER_HEARTBEAT = 2
# Commands emit() in lua/_lib.lua adds for each event a heartbeat publishes: HINCRBY, SPUBLISH.
COMMANDS_PER_EMIT = 2


# --- inputs ---------------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class Workload:
    """What is carried, and the assumptions of the model (docs/capacity.md says why each)."""

    users: int = 1_000_000  # concurrent, each on one WebSocket
    studies: int = 100_000
    # Skew: `hot_studies` studies of `hot_study_viewers` each; the other users are spread
    # evenly over the other studies.
    hot_studies: int = 0
    hot_study_viewers: int = 1_000
    # 10 s: three heartbeats per PRESENCE_IDLE_AFTER (30 s), so one late or lost heartbeat
    # does not flap a user to idle, at a third of the cost of beating every 3 s.
    heartbeat_interval: float = 10.0
    # Cursor moves per user per second; each is a heartbeat that publishes cursor_moved. Also
    # sent on top of the periodic heartbeats (an upper bound: a client may skip the next one).
    cursor_rate: float = 0.1
    session_minutes: float = 30.0  # mean stay in a study: one user_joined and one user_left
    idle_per_hour: float = 2.0  # idle spells per user and hour: user_idle (sweep), user_active
    rest_share: float = 0.0  # heartbeats sent over REST instead of the socket
    utilisation: float = 0.6  # plan each node process and Redis primary at this share of a core
    node_memory_mib: float = 512.0  # a node's memory limit (deploy/k8s/deployment.yaml)
    # The load balancer puts a study's sockets on one node (hash of study_id); otherwise each
    # socket lands on a node at random.
    affinity: bool = False
    # Share of the node's measured CPU per delivery that is paid once per event and node
    # (reading pub/sub, decoding, encoding the JSON) rather than once per socket: ~30 % of the
    # node's busy time in the py-spy profile of docs/performance.md (before hiredis).
    receive_share: float = 0.3
    # Share of a heartbeat's Redis CPU that is schedule.lua (3 of its ~11 commands: EVALSHA,
    # ZSCORE, ZADD); it runs on one of the 16 schedule shards, whatever the study.
    schedule_share: float = 0.3
    # How long a node may stop reading pub/sub (CPU-throttled, paused) before its output
    # buffers in Redis count as at risk.
    stall_seconds: float = 10.0
    sweep_interval: float = 1.0  # PRESENCE_SWEEP_INTERVAL: every node polls 16 shards per tick


def validate(w: Workload) -> None:
    """Raise ValueError naming the first assumption that makes no sense."""
    checks = [
        (w.users > 0, "users must be > 0"),
        (w.studies > 0, "studies must be > 0"),
        (0 <= w.hot_studies < w.studies, "hot_studies must be >= 0 and below studies"),
        (w.hot_study_viewers >= 1, "hot_study_viewers must be >= 1"),
        (
            w.users - w.hot_studies * w.hot_study_viewers >= w.studies - w.hot_studies,
            "hot studies take more users than there are (need >= 1 user per other study)",
        ),
        (w.heartbeat_interval > 0, "heartbeat_interval must be > 0"),
        (w.cursor_rate >= 0, "cursor_rate must be >= 0"),
        (w.session_minutes > 0, "session_minutes must be > 0"),
        (w.idle_per_hour >= 0, "idle_per_hour must be >= 0"),
        (0 <= w.rest_share <= 1, "rest_share must be in [0, 1]"),
        (0 < w.utilisation <= 1, "utilisation must be in (0, 1]"),
        (0 <= w.receive_share < 1, "receive_share must be in [0, 1)"),
        (0 <= w.schedule_share <= 1, "schedule_share must be in [0, 1]"),
        (w.stall_seconds > 0, "stall_seconds must be > 0"),
        (w.sweep_interval > 0, "sweep_interval must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


# --- reading a results folder ---------------------------------------------------------------


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


# --- sizes of what travels ------------------------------------------------------------------

# A typical cursor_moved: ids of typical lengths (8-character study and chapter ids as a
# chess site makes them, a 12-character user name), a variation a few plies deep.
TYPICAL_STUDY = "kB7xQ2mP"
TYPICAL_USER = "player_12345"
TYPICAL_CHAPTER = "Zt4mW9qA"
TYPICAL_MOVE_PATH = "main.24.var2.7"
TYPICAL_ID = "9f86d081884c7d659a2feaa0c55ad015"  # session, connection and node ids: 32 hex
TYPICAL_MS = 1_795_942_626_123
TYPICAL_ISO = "2026-11-28T08:57:06.123Z"
TYPICAL_SEQ = 48_213


@dataclass(frozen=True, slots=True)
class Sizes:
    """Bytes of one event and one heartbeat on the wire."""

    envelope: int  # msgpack envelope a script publishes (codec.encode_envelope)
    json_text: int  # the JSON text a node sends each socket (codec.json_text)
    ws_frame: int  # that text in a server WebSocket frame (unmasked)
    pubsub_message: int  # the envelope as Redis pushes it to a subscribed node (RESP)
    heartbeat_request: int  # a WebSocket heartbeat's three commands (RESP), cursor unchanged
    cursor_request: int  # the same with a new cursor
    heartbeat_reply: int


def resp_command(*args: object) -> int:
    """Bytes of a command as a RESP array of bulk strings."""
    size = len(f"*{len(args)}\r\n")
    for arg in args:
        n = len(str(arg).encode())
        size += len(f"${n}\r\n") + n + 2
    return size


def pubsub_message_bytes(channel: str, payload: int, kind: str = "smessage") -> int:
    """A pushed pub/sub message: *3 kind channel payload (RESP2; `smessage` when sharded)."""
    head = resp_command(kind, channel) - len("*2\r\n")
    return len("*3\r\n") + head + len(f"${payload}\r\n") + payload + 2


def ws_frame_bytes(payload: int) -> int:
    """A server-to-client frame: 2-byte header, +2 bytes of length from 126, +8 from 64 KiB."""
    return payload + (2 if payload < 126 else 4 if payload < 65_536 else 10)


def typical_cursor_moved() -> tuple[str, dict[str, Any]]:
    # Field order as lua/_lib.lua's emit() writes it: the same msgpack bytes.
    return "presence.cursor_moved", {
        "session_id": TYPICAL_ID,
        "user_id": TYPICAL_USER,
        "study_id": TYPICAL_STUDY,
        "chapter_id": TYPICAL_CHAPTER,
        "move_path": TYPICAL_MOVE_PATH,
        "status": "active",
        "timestamp": TYPICAL_ISO,
        "seq": TYPICAL_SEQ,
    }


def heartbeat_request_bytes(cursor: bool) -> int:
    """RESP bytes of RedisStore.heartbeat's commands for one WebSocket heartbeat."""
    keys = Keys("presence")
    sha = "0" * 40
    study = keys.study(TYPICAL_STUDY)
    lease = resp_command(
        "SADD", keys.node_leases(TYPICAL_ID), f"{TYPICAL_STUDY} {TYPICAL_USER} {TYPICAL_ID}"
    )
    cursor_args = ["1", TYPICAL_CHAPTER, "1", TYPICAL_MOVE_PATH] if cursor else ["0", "", "0", ""]
    beat = resp_command(
        "EVALSHA",
        sha,
        6,
        *study.of_session(TYPICAL_USER),
        TYPICAL_USER,
        TYPICAL_STUDY,
        TYPICAL_MS,
        TYPICAL_ISO,
        TYPICAL_ID,
        *cursor_args,
        TYPICAL_ID,
    )
    schedule = resp_command(
        "EVALSHA", sha, 1, keys.schedule(TYPICAL_STUDY), TYPICAL_STUDY, TYPICAL_MS, TYPICAL_MS
    )
    return lease + beat + schedule


def heartbeat_reply_bytes() -> int:
    """SADD's and schedule.lua's integers, heartbeat.lua's 7-element array."""
    fields = [TYPICAL_ID, TYPICAL_CHAPTER, TYPICAL_MOVE_PATH, "active"]
    array = len("*7\r\n") + sum(len(f"${len(f)}\r\n") + len(f) + 2 for f in fields)
    array += len(f":{TYPICAL_MS}\r\n") * 2 + len(":1\r\n")
    return array + 2 * len(":1\r\n")


def measure_sizes() -> Sizes:
    """Encode a typical cursor_moved with the service's own codec."""
    from presence_svc.codec import encode_envelope, json_text  # msgpack: only when used

    event_type, data = typical_cursor_moved()
    envelope = len(encode_envelope(event_type, data, TYPICAL_MS))
    text = len(json_text({"type": event_type, "data": data}).encode())
    channel = Keys("presence").channel(TYPICAL_STUDY)
    return Sizes(
        envelope=envelope,
        json_text=text,
        ws_frame=ws_frame_bytes(text),
        pubsub_message=pubsub_message_bytes(channel, envelope),
        heartbeat_request=heartbeat_request_bytes(cursor=False),
        cursor_request=heartbeat_request_bytes(cursor=True),
        heartbeat_reply=heartbeat_reply_bytes(),
    )


# --- the model ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PerUser:
    """What one user causes per second."""

    heartbeats: float  # periodic + cursor moves
    cursor_moves: float
    joins: float  # = leaves (a steady state)
    idles: float  # = returns to active

    @property
    def heartbeat_events(self) -> float:
        """Events heartbeat.lua publishes: cursor_moved, user_joined, user_active."""
        return self.cursor_moves + self.joins + self.idles

    @property
    def sweep_transitions(self) -> float:
        """Events the sweep publishes: user_idle, user_left."""
        return self.idles + self.joins

    @property
    def events(self) -> float:
        return self.heartbeat_events + self.sweep_transitions


def per_user(w: Workload) -> PerUser:
    return PerUser(
        heartbeats=1 / w.heartbeat_interval + w.cursor_rate,
        cursor_moves=w.cursor_rate,
        joins=1 / (w.session_minutes * 60),
        idles=w.idle_per_hour / 3600,
    )


@dataclass(frozen=True, slots=True)
class Tier:
    """`studies` studies of `viewers` sockets each."""

    studies: int
    viewers: float


def tiers(w: Workload) -> list[Tier]:
    hot = w.hot_studies * w.hot_study_viewers
    out = [Tier(w.studies - w.hot_studies, (w.users - hot) / (w.studies - w.hot_studies))]
    if w.hot_studies:
        out.append(Tier(w.hot_studies, float(w.hot_study_viewers)))
    return out


def distinct_nodes(viewers: float, nodes: int) -> float:
    """Expected number of nodes holding at least one of `viewers` sockets placed at random:
    each node misses all of them with probability (1 - 1/nodes)^viewers."""
    if nodes <= 0 or viewers <= 0:
        return 0.0
    return float(nodes * (1 - (1 - 1 / nodes) ** viewers))


def spread(viewers: float, nodes: int, affinity: bool) -> float:
    """Nodes one study's events go to: one with study affinity, else distinct_nodes."""
    if viewers <= 0:
        return 0.0
    return 1.0 if affinity else distinct_nodes(viewers, nodes)


@dataclass(frozen=True, slots=True)
class Costs:
    """Microseconds of one core per operation, derived from Measured and the split shares."""

    node_heartbeat: float
    node_receive: float  # per event and node that has a watcher of its study
    node_delivery: float  # per event and socket
    node_transition: float  # the sweeping node, per transition
    redis_heartbeat: float
    redis_copy: float  # per published event, and again per node it is pushed to
    redis_transition: float  # sweep_scan + sweep_apply + reschedule, per transition
    redis_command: float  # a plain command (a sweep tick's ZRANGEBYSCORE)
    redis_schedule: float  # schedule.lua, part of redis_heartbeat


def costs(m: Measured, w: Workload) -> Costs:
    # The fan-out figure is per delivery with `sockets_per_event_and_node` sockets sharing each
    # event a node receives; split it into a per-(event, node) and a per-socket part, so that
    # it applies to studies whose viewers are spread thinner.
    per_event = w.receive_share * m.node_us_per_delivery * m.sockets_per_event_and_node
    redis_hb = (1 - w.rest_share) * m.ws_redis_us_per_hb + w.rest_share * m.rest_redis_us_per_hb
    return Costs(
        node_heartbeat=(1 - w.rest_share) * m.ws_node_us_per_hb
        + w.rest_share * m.rest_node_us_per_hb,
        node_receive=per_event,
        node_delivery=(1 - w.receive_share) * m.node_us_per_delivery,
        node_transition=m.sweep_node_us_per_transition,
        redis_heartbeat=redis_hb,
        # The measured event cost covers one publish and one copy to each of fanout_nodes
        # subscribers: counted as (1 + nodes) equal parts, each part paid again per extra node.
        redis_copy=m.redis_us_per_event / (1 + m.fanout_nodes),
        redis_transition=m.sweep_redis_us_per_transition,
        redis_command=m.floor_redis_us_per_hb / m.floor_commands_per_hb,
        redis_schedule=w.schedule_share * redis_hb,
    )


def study_node_cores(viewers: float, nodes_reached: float, u: PerUser, c: Costs) -> float:
    """Node CPU (cores, all nodes together) one study of `viewers` sockets costs."""
    events = viewers * u.events
    return US * (
        viewers * u.heartbeats * c.node_heartbeat
        + events * (nodes_reached * c.node_receive + viewers * c.node_delivery)
        + viewers * u.sweep_transitions * c.node_transition
    )


def study_redis_cores(viewers: float, nodes_reached: float, u: PerUser, c: Costs) -> float:
    """Redis CPU one study costs; all of it on the primary of the study's slot."""
    return (
        US
        * viewers
        * (
            u.heartbeats * c.redis_heartbeat
            + u.heartbeat_events * (1 + nodes_reached) * c.redis_copy
            + u.sweep_transitions * (c.redis_transition + nodes_reached * c.redis_copy)
        )
    )


def ceil(x: float) -> int:
    """math.ceil, forgiving float noise (6.0000000001 cores need 6, not 7)."""
    return math.ceil(x - 1e-9)


def sockets_per_node(m: Measured, w: Workload) -> int:
    """Sockets whose idle RSS fits in a node's memory at the target utilisation."""
    free_mib = w.utilisation * w.node_memory_mib - m.node_base_rss_mib
    return max(int(free_mib * KIB / m.kib_per_socket), 0)


@dataclass(frozen=True, slots=True)
class Traffic:
    heartbeats: float
    cursor_moves: float
    joins: float  # user_joined/s, = user_left/s
    idles: float  # user_idle/s, = user_active/s
    events: float
    sweep_transitions: float
    deliveries: float  # event copies handed to sockets
    node_receives: float  # event copies pushed by Redis to nodes
    nodes_per_event: float  # node_receives / events


def traffic(w: Workload, nodes: int) -> Traffic:
    u = per_user(w)
    events = w.users * u.events
    receives = sum(
        t.studies * t.viewers * u.events * spread(t.viewers, nodes, w.affinity) for t in tiers(w)
    )
    return Traffic(
        heartbeats=w.users * u.heartbeats,
        cursor_moves=w.users * u.cursor_moves,
        joins=w.users * u.joins,
        idles=w.users * u.idles,
        events=events,
        sweep_transitions=w.users * u.sweep_transitions,
        deliveries=sum(t.studies * t.viewers * u.events * t.viewers for t in tiers(w)),
        node_receives=receives,
        nodes_per_event=receives / events if events else 0.0,
    )


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

    @property
    def cores(self) -> float:
        return (
            self.cores_heartbeats
            + self.cores_publish
            + self.cores_copies
            + self.cores_sweep
            + self.cores_polls
        )


def plan_redis(m: Measured, w: Workload, nodes: int, sizes: Sizes) -> RedisPlan:
    c, t = costs(m, w), traffic(w, nodes)
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
    requests_per_hb = (1 - w.rest_share) * WS_REQUESTS_PER_HEARTBEAT + (
        w.rest_share * REST_REQUESTS_PER_HEARTBEAT
    )
    cursor_share = t.cursor_moves / t.heartbeats if t.heartbeats else 0.0
    request = (1 - cursor_share) * sizes.heartbeat_request + cursor_share * sizes.cursor_request
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
        requests_per_s=t.heartbeats * requests_per_hb + polls,
        published_per_s=t.events,
        published_bytes_per_s=t.events * sizes.envelope,
        pushed_per_s=t.node_receives,
        pushed_bytes_per_s=t.node_receives * sizes.pubsub_message,
        heartbeat_bytes_in_per_s=t.heartbeats * request,
        heartbeat_bytes_out_per_s=t.heartbeats * sizes.heartbeat_reply,
        memory_mib=w.users * m.redis_mib_per_million_sessions / 1e6,
        cpu_per_primary=total / primaries,
        schedule_shard_cpu=US
        * (
            t.heartbeats / SCHEDULE_SHARDS * c.redis_schedule
            + nodes / w.sweep_interval * c.redis_command
        ),
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
    shard_max = largest_study(study_on_shard(m, w, n.processes), 1.0)
    node_max = largest_study(study_on_node(m, w, n.processes), 1.0)
    free_mib = w.node_memory_mib - m.node_base_rss_mib
    socket_mib = n.sockets_per_node * m.kib_per_socket / KIB
    link = heaviest_pubsub_link(w, t, n.processes, r.primaries) * sizes.pubsub_message
    biggest = f"largest study {viewers_text(largest)} viewers"
    out = [
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
        Limit(
            f"{SCHEDULE_SHARDS} schedule shards",
            f"busiest {fmt(r.schedule_shard_cpu)} of a core "
            f"({fmt(t.heartbeats / SCHEDULE_SHARDS)} schedule.lua/s)",
            1 / r.schedule_shard_cpu,
            False,
            "fewer heartbeats; more schedule shards (a storage format change)",
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
    return sorted(out, key=lambda x: x.breaks_at)


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


# --- output ---------------------------------------------------------------------------------


def _mb(value: float) -> float:
    return value / MIB


def render(p: Plan) -> str:
    """The tables `presence-svc capacity` prints."""
    w, m, s, t, n, r = p.workload, p.measured, p.sizes, p.traffic, p.nodes, p.redis
    c = costs(m, w)
    u_pct = f"{w.utilisation * 100:g} %"
    lines = [
        f"presence-svc capacity: {w.users:,} users in {w.studies:,} studies; each node process "
        f"and Redis primary planned at {u_pct} of a core",
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
    lines += [
        f"workload: a heartbeat every {w.heartbeat_interval:g} s + {w.cursor_rate:g} cursor "
        f"moves/s per user; {w.session_minutes:g} min stays; {w.idle_per_hour:g} idle spells/h "
        f"per user; sockets {spread_text}{hot}",
        f"event: cursor_moved {s.envelope} B msgpack envelope, {s.pubsub_message} B pushed to a "
        f"node, {s.json_text} B JSON ({s.ws_frame} B frame) per socket",
        f"costs (us of one core): node {fmt(c.node_heartbeat)} per heartbeat, "
        f"{fmt(c.node_receive)} per event received, {fmt(c.node_delivery)} per delivery; "
        f"Redis {fmt(c.redis_heartbeat)} per heartbeat, {fmt(c.redis_copy)} per event published "
        f"or copied to a node",
    ]
    load_rows: list[list[Any]] = [
        ["heartbeats", t.heartbeats, "/s", "users / interval + cursor moves"],
        ["events published", t.events, "/s", "all types below"],
        ["  cursor_moved", t.cursor_moves, "/s", "users x cursor rate"],
        ["  user_joined, user_left", t.joins, "/s each", "users / mean stay"],
        ["  user_idle, user_active", t.idles, "/s each", "users x idle spells"],
        ["sweep transitions", t.sweep_transitions, "/s", "user_idle + user_left"],
        ["deliveries to sockets", t.deliveries, "/s", "events x viewers of their study"],
        ["nodes reached per event", t.nodes_per_event, "", "N(1 - (1 - 1/N)^viewers)"],
    ]
    lines += ["", table("Load", ["quantity", "value", "unit", "how"], load_rows)]
    node_rows: list[list[Any]] = [
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
    lines += [
        "",
        table("Nodes (one process = one core)", ["quantity", "value", "unit", "how"], node_rows),
    ]
    redis_rows: list[list[Any]] = [
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
    lines += [
        "",
        table("Redis (one primary = one core)", ["quantity", "value", "unit", "how"], redis_rows),
    ]
    limit_rows = [
        [i + 1, x.name, x.breaks_at, "yes" if x.scale_out else "no", x.now, x.remedy]
        for i, x in enumerate(p.limits)
    ]
    lines += [
        "",
        table(
            "What breaks first (k: growth at which a limit is hit, at 100 % of it: of all load "
            "with the planned fleet, or of the largest study's viewers)",
            ["#", "limit", "k", "scale-out", "now", "what to do"],
            limit_rows,
        ),
    ]
    return "\n".join(lines)


def to_json(p: Plan) -> dict[str, Any]:
    data: dict[str, Any] = dataclasses.asdict(p)
    data["nodes"]["cores"] = p.nodes.cores
    data["redis"]["cores"] = p.redis.cores
    data["measured"]["redis_us_per_event"] = p.measured.redis_us_per_event
    data["costs_us"] = dataclasses.asdict(costs(p.measured, p.workload))
    return data


# --- command line ---------------------------------------------------------------------------


def _parse_value(current: object, text: str) -> object:
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"not a boolean: {text!r}")
        return text.lower() in ("true", "1", "yes")
    if isinstance(current, int):
        return int(text.replace("_", "").replace(",", ""))
    if isinstance(current, float):
        return float(text)
    return text


def apply_overrides(
    m: Measured, w: Workload, assignments: Sequence[str]
) -> tuple[Measured, Workload]:
    """NAME=VALUE pairs, each a field of Workload or of Measured."""
    for item in assignments:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"--set wants NAME=VALUE, got {item!r}")
        changes: Mapping[str, object]
        if name in {f.name for f in dataclasses.fields(Workload)}:
            changes = {name: _parse_value(getattr(w, name), text)}
            w = dataclasses.replace(w, **changes)  # type: ignore[arg-type]
        elif name in {f.name for f in dataclasses.fields(Measured)} - {"source", "fallbacks"}:
            changes = {name: _parse_value(getattr(m, name), text)}
            m = dataclasses.replace(m, **changes)  # type: ignore[arg-type]
        else:
            raise ValueError(f"--set: no assumption or measured figure named {name!r}")
    return m, w


def run(args: argparse.Namespace) -> int:
    """Entry point of `presence-svc capacity` (args from add_capacity_command's parser)."""
    try:
        m = read_results(Path(args.results)) if args.results else DEFAULT_MEASURED
        w = Workload()
        given = {
            "users": args.users,
            "studies": args.studies,
            "heartbeat_interval": args.heartbeat_interval,
            "cursor_rate": args.cursor_rate,
            "utilisation": args.utilisation,
            "hot_studies": args.hot_studies,
            "hot_study_viewers": args.hot_study_viewers,
        }
        w = dataclasses.replace(w, **{k: v for k, v in given.items() if v is not None})
        if args.affinity:
            w = dataclasses.replace(w, affinity=True)
        m, w = apply_overrides(m, w, args.set or [])
        result = plan(m, w)
    except (ValueError, ZeroDivisionError, FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"presence-svc capacity: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_json(result), indent=2))
    else:
        print(render(result))
    return 0


def add_capacity_command(commands: Any) -> None:
    """Add `capacity` to the `presence-svc` subcommands (an argparse subparsers object)."""
    cmd = commands.add_parser(
        "capacity",
        help="size nodes and Redis primaries for a workload from bench figures "
        "(see docs/capacity.md)",
        description="A capacity model: the node processes and Redis primaries a workload needs, "
        "from the costs `presence-svc bench` measured, and what breaks first as it grows.",
    )
    cmd.add_argument(
        "--results",
        metavar="DIR",
        help="a bench results folder (bench/results/<run>); default: the built-in figures of "
        "the latest full run in docs/performance.md",
    )
    cmd.add_argument("--users", type=int, help="concurrent users (default 1,000,000)")
    cmd.add_argument("--studies", type=int, help="studies they are in (default 100,000)")
    cmd.add_argument(
        "--heartbeat-interval", type=float, metavar="S", help="seconds between heartbeats (10)"
    )
    cmd.add_argument("--cursor-rate", type=float, metavar="R", help="cursor moves/s per user (0.1)")
    cmd.add_argument("--utilisation", type=float, metavar="U", help="target share of a core (0.6)")
    cmd.add_argument("--hot-studies", type=int, metavar="N", help="studies far larger (0)")
    cmd.add_argument("--hot-study-viewers", type=int, metavar="V", help="viewers of each (1000)")
    cmd.add_argument(
        "--affinity", action="store_true", help="the load balancer keeps a study on one node"
    )
    cmd.add_argument(
        "--set",
        action="append",
        metavar="NAME=VALUE",
        help="override any other assumption or measured figure (docs/capacity.md lists them)",
    )
    cmd.add_argument("--json", action="store_true", help="print JSON instead of tables")
    cmd.set_defaults(run=run)
