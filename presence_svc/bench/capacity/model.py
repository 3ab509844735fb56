"""The capacity model's workload (what is carried, and the assumptions) and its arithmetic: what
one user causes per second, how a study's sockets spread over the nodes, the cost of each
operation, and the traffic that results.

Every formula is a small pure function; costs are in microseconds of CPU of one core, loads in
cores (CPU seconds per second). capacity_plan sizes the fleet from them.
"""

from __future__ import annotations

from dataclasses import dataclass

from presence_svc.bench.capacity.inputs import US, Measured


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
    # Only when the figures lack the fan-out scenario's receive-cost point (an older results
    # folder; fanout_split): the share of the node's CPU per delivery at the fan-out point
    # taken as paid once per event and node (reading pub/sub, decoding, encoding the JSON)
    # rather than once per socket. 0.3 was a guess from a py-spy profile (docs/performance.md,
    # before hiredis); the receive-cost point measures the split instead.
    receive_share: float = 0.3
    # Share of a full heartbeat's Redis CPU (the floor row: heartbeat.lua + schedule.lua with
    # no node in between, 2 EVALSHA + 5 inside) that is one schedule.lua call: its EVALSHA and
    # ZSCORE, a ZADD when it moves the due time (2 of the 7 commands, 3 of 8). It prices a
    # schedule.lua call on one of the 16 schedule shards; a steady heartbeat's measured Redis
    # CPU has none in it, so a share of that would mean nothing.
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
    # One schedule.lua call, on its schedule shard. Within redis_heartbeat, not added to it:
    # the measured CPU per heartbeat is what the node's mix of heartbeats cost.
    redis_schedule: float


def fanout_split(m: Measured, w: Workload) -> tuple[float, float]:
    """The node's fan-out CPU as (receive: per event and node reached, send: per delivery).

    The fan-out point costs a node n x d per event it receives (d per delivery, n sockets per
    node and event). The receive-cost point costs it E per event with one socket: E1 at the
    fan-out point's own events/s, E at the highest rate measured. Per event, the n-socket
    point pays n - 1 sends more than the one-socket point at the same rate; what is paid once
    per event (reading it, and at these low rates waking a mostly idle process) cancels out:
    send = (n x d - E1) / (n - 1), clamped to [0, d]. The receive cost is the rest of a
    one-socket event at the highest rate, nearer the regime of a planned node (thousands of
    events/s at 0.6 of a core) than 200 events/s: receive = E - send, clamped at 0.

    Without the receive-cost point: receive_share x n x d per event, (1 - receive_share) x d
    per delivery (the old guess).
    """
    n, d = m.sockets_per_event_and_node, m.node_us_per_delivery
    if m.receive_us_per_event is None:
        return w.receive_share * d * n, (1 - w.receive_share) * d
    one = m.receive_us_per_event_at_fanout_rate
    if one is None:
        one = m.receive_us_per_event
    # n <= 1: the fan-out point had one socket per node too; nothing tells the parts apart.
    send = min(max((n * d - one) / (n - 1), 0.0), d) if n > 1 else 0.0
    return max(m.receive_us_per_event - send, 0.0), send


def costs(m: Measured, w: Workload) -> Costs:
    # The fan-out figure is per delivery with `sockets_per_event_and_node` sockets sharing each
    # event a node receives; split it into a per-(event, node) and a per-socket part, so that
    # it applies to studies whose viewers are spread thinner.
    receive, send = fanout_split(m, w)
    redis_hb = (1 - w.rest_share) * m.ws_redis_us_per_hb + w.rest_share * m.rest_redis_us_per_hb
    return Costs(
        node_heartbeat=(1 - w.rest_share) * m.ws_node_us_per_hb
        + w.rest_share * m.rest_node_us_per_hb,
        node_receive=receive,
        node_delivery=send,
        node_transition=m.sweep_node_us_per_transition,
        redis_heartbeat=redis_hb,
        # The measured event cost covers one publish and one copy to each of fanout_nodes
        # subscribers: counted as (1 + nodes) equal parts, each part paid again per extra node.
        redis_copy=m.redis_us_per_event / (1 + m.fanout_nodes),
        redis_transition=m.sweep_redis_us_per_transition,
        redis_command=m.floor_redis_us_per_hb / m.floor_commands_per_hb,
        redis_schedule=w.schedule_share * m.floor_redis_us_per_hb,
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


# Top-level requests of each kind of heartbeat (RedisStore.heartbeat). A full WebSocket
# heartbeat (a socket's first, or the first after a failed store call or a dead-node mark) is
# one pipeline of the lease SADD, heartbeat.lua and schedule.lua; a REST heartbeat has no lease.
# A steady heartbeat is one EVALSHA (its count comes from the bench row), and schedule.lua
# follows it in a second round trip when it turned an idle or away session active.
FULL_REQUESTS_PER_HEARTBEAT = 3
REST_REQUESTS_PER_HEARTBEAT = 2
SCHEDULE_REQUESTS = 1


@dataclass(frozen=True, slots=True)
class HeartbeatMix:
    """The kinds of heartbeat the nodes send, as shares of all heartbeats (they add up to 1),
    and what that makes per heartbeat."""

    full: float  # WebSocket, lease SADD + heartbeat.lua + schedule.lua
    reactivating: float  # WebSocket, steady, schedule.lua follows (it made the session active)
    steady: float  # WebSocket, heartbeat.lua alone
    rest: float  # heartbeat.lua + schedule.lua, no lease
    requests: float  # top-level requests per heartbeat
    schedules: float  # schedule.lua calls per heartbeat


def heartbeat_mix(m: Measured, w: Workload) -> HeartbeatMix:
    """Which heartbeats are full, steady or reactivating.

    A socket sends one full heartbeat per connection, i.e. per stay (`session_minutes`: j per
    user and second), and a steady heartbeat is followed by schedule.lua once per idle spell
    (the user_active transition: i per user and second); the rest are steady, one request as
    the bench row measured them. So per WebSocket heartbeat j / h are full and i / h
    reactivating. Full heartbeats after a failed store call or a dead-node mark are left out:
    they follow failures, not load. Where the row measured code before steady heartbeats
    (Measured.ws_steady false), every WebSocket heartbeat is counted full, as that code sent it.
    """
    u = per_user(w)
    ws = 1 - w.rest_share
    if m.ws_steady:
        full = min(u.joins / u.heartbeats, 1.0)
        reactivating = min(u.idles / u.heartbeats, 1.0 - full)
    else:
        full, reactivating = 1.0, 0.0
    steady = 1.0 - full - reactivating
    return HeartbeatMix(
        full=ws * full,
        reactivating=ws * reactivating,
        steady=ws * steady,
        rest=w.rest_share,
        requests=ws
        * (
            full * FULL_REQUESTS_PER_HEARTBEAT
            + reactivating * (m.ws_requests_per_hb + SCHEDULE_REQUESTS)
            + steady * m.ws_requests_per_hb
        )
        + w.rest_share * REST_REQUESTS_PER_HEARTBEAT,
        schedules=ws * (full + reactivating) + w.rest_share,
    )


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
