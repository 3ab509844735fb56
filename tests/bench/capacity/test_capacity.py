"""The capacity model (presence_svc.bench.capacity): its arithmetic
on inputs small enough to check by hand, reading a results folder as the harness writes it, the
binding constraint and the ranking of limits, and the `presence-svc capacity` command. No Redis,
nothing timed."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

from presence_svc.bench.capacity import command as cap
from presence_svc.bench.capacity import inputs as capacity_inputs
from presence_svc.bench.capacity import model as capacity_model
from presence_svc.bench.capacity import plan as capacity_plan
from presence_svc.bench.capacity import sizes as capacity_sizes
from presence_svc.cli import main
from presence_svc.codec import encode_envelope, json_text

DOC = Path(__file__).resolve().parents[3] / "docs" / "capacity.md"

# Small, round workload: 1000 users in 100 studies (10 each), 0.1 heartbeat/s + 0.1 cursor
# move/s per user, stays of 1000 s and one idle spell per 1000 s per user.
SMALL = capacity_model.Workload(
    users=1000,
    studies=100,
    heartbeat_interval=10.0,
    cursor_rate=0.1,
    session_minutes=1000 / 60,
    idle_per_hour=3.6,
    utilisation=0.5,
)

# Round costs: 1000 us per heartbeat on the node, nothing else, 1 MiB per socket.
ROUND = dataclasses.replace(
    capacity_inputs.DEFAULT_MEASURED,
    ws_node_us_per_hb=1000.0,
    node_us_per_delivery=0.0,
    sweep_node_us_per_transition=0.0,
    kib_per_socket=1024.0,
    node_base_rss_mib=0.0,
    receive_us_per_event=None,  # receive_share (0 below): the node pays heartbeats only
)


# --- arithmetic ---------------------------------------------------------------------------


def test_distinct_nodes_by_hand() -> None:
    # 3 viewers on 2 nodes: a node misses all three with probability 1/8.
    assert capacity_model.distinct_nodes(3, 2) == pytest.approx(2 * (1 - 1 / 8))  # 1.75
    assert capacity_model.distinct_nodes(2, 4) == pytest.approx(4 * (1 - (3 / 4) ** 2))  # 1.75
    assert capacity_model.distinct_nodes(1, 500) == pytest.approx(1.0)
    assert capacity_model.distinct_nodes(7, 1) == pytest.approx(1.0)
    assert capacity_model.distinct_nodes(0, 10) == 0.0
    assert capacity_model.distinct_nodes(10_000, 10) == pytest.approx(10.0)
    # Study affinity: one node per study, whatever its size.
    assert capacity_model.spread(3, 2, affinity=True) == 1.0
    assert capacity_model.spread(3, 2, affinity=False) == pytest.approx(1.75)


def test_traffic_by_hand() -> None:
    u = capacity_model.per_user(SMALL)
    assert u.heartbeats == pytest.approx(0.2)
    assert u.joins == pytest.approx(0.001)
    assert u.idles == pytest.approx(0.001)
    t = capacity_model.traffic(SMALL, nodes=1)
    assert t.heartbeats == pytest.approx(200)  # 1000 x (1/10 + 0.1)
    assert t.cursor_moves == pytest.approx(100)
    assert t.joins == pytest.approx(1) and t.idles == pytest.approx(1)
    # cursor_moved 100 + user_joined 1 + user_active 1 + user_idle 1 + user_left 1
    assert t.events == pytest.approx(104)
    assert t.sweep_transitions == pytest.approx(2)
    assert t.deliveries == pytest.approx(1040)  # every event to the 10 sockets of its study
    # One node: every event is pushed to it once.
    assert t.node_receives == pytest.approx(104)
    assert capacity_model.traffic(SMALL, nodes=2).nodes_per_event == pytest.approx(
        capacity_model.distinct_nodes(10, 2)
    )


def test_skewed_studies_split_users() -> None:
    w = dataclasses.replace(SMALL, hot_studies=2, hot_study_viewers=100)
    assert capacity_model.tiers(w) == [
        capacity_model.Tier(98, 800 / 98),
        capacity_model.Tier(2, 100.0),
    ]
    t = capacity_model.traffic(w, nodes=1)
    # Deliveries grow with the square of a study's size: sum over studies of events x viewers.
    per_user = capacity_model.per_user(w).events
    expected = 800 * per_user * (800 / 98) + 200 * per_user * 100
    assert t.deliveries == pytest.approx(expected)
    with pytest.raises(ValueError, match="hot studies take more users"):
        capacity_model.validate(dataclasses.replace(SMALL, hot_studies=10, hot_study_viewers=100))


def test_costs_split_the_measured_figures() -> None:
    # Without the receive-cost point (an older results folder): the receive_share guess.
    m = dataclasses.replace(
        capacity_inputs.DEFAULT_MEASURED,
        node_us_per_delivery=40.0,
        fanout_viewers=50,
        fanout_nodes=2,
        fanout_redis_cpu=0.032,
        fanout_redis_idle_cpu=0.002,
        fanout_events_per_s=100.0,
        receive_us_per_event=None,
        receive_events_per_s=None,
        receive_us_per_event_at_fanout_rate=None,
    )
    assert not m.receive_measured
    c = capacity_model.costs(m, dataclasses.replace(SMALL, receive_share=0.3))
    # 25 sockets shared each event a node received: 30 % of 40 us x 25 once, 70 % per socket.
    assert c.node_receive == pytest.approx(300.0)
    assert c.node_delivery == pytest.approx(28.0)
    assert c.node_receive / 25 + c.node_delivery == pytest.approx(40.0)
    # 0.03 of a core for 100 events/s = 300 us each, for one publish and two copies.
    assert m.redis_us_per_event == pytest.approx(300.0)
    assert c.redis_copy == pytest.approx(100.0)


def test_the_default_figures_are_the_latest_full_run() -> None:
    m = capacity_inputs.DEFAULT_MEASURED
    assert "20261201T190838Z-full" in m.source and "c26b3bc" in m.source
    assert not m.fallbacks
    # Redis per event from the receive-cost point (its Redis read in ns at the busiest rate),
    # less Redis's idle CPU (the baseline row at the same offered rate).
    assert (m.receive_redis_cpu, m.receive_redis_idle_cpu) == (0.122, 0.003)
    assert m.redis_us_per_event == pytest.approx((0.122 - 0.003) / 2000.1 * 1e6)
    assert m.redis_measured_at == "the receive-cost point, 2,000 events/s"
    assert m.sockets_per_event_and_node == 25
    # That run had the receive-cost point: the split is measured, receive_share unused.
    assert m.receive_measured
    receive, send = capacity_model.fanout_split(m, capacity_model.Workload())
    assert send == pytest.approx((25 * 30.08 - 334.46) / 24)
    assert receive == pytest.approx(92.06 - send)


def test_sizes_by_hand() -> None:
    # *3 $3 SET $1 k $1 v
    assert capacity_sizes.resp_command("SET", "k", "v") == len(
        "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"
    )
    assert capacity_sizes.pubsub_message_bytes("ch", 5) == len(
        "*3\r\n$8\r\nsmessage\r\n$2\r\nch\r\n$5\r\n12345\r\n"
    )
    assert capacity_sizes.ws_frame_bytes(125) == 127
    assert capacity_sizes.ws_frame_bytes(126) == 130
    assert capacity_sizes.ws_frame_bytes(70_000) == 70_010
    sizes = capacity_sizes.measure_sizes()
    event_type, data = capacity_sizes.typical_cursor_moved()
    assert sizes.envelope == len(encode_envelope(event_type, data, capacity_sizes.TYPICAL_MS))
    assert sizes.json_text == len(json_text({"type": event_type, "data": data}).encode())
    assert sizes.cursor_request > sizes.heartbeat_request > 0


def test_heartbeat_sizes_by_hand() -> None:
    # A steady heartbeat is heartbeat.lua's EVALSHA alone, with RedisStore.heartbeat's layout:
    # 7 keys, then user, study, ms, ISO, no session id, the cursor, the connection, SPUBLISH, 1.
    base = "presence:{kB7xQ2mP}:"
    keys = [
        base + "session:player_12345",
        base + "index",
        base + "meta",
        base + "events",
        base + "conns:player_12345",
        base + "leaving",
        base + "released:player_12345",
    ]
    ms, iso, cid = "1795942626123", "2026-11-28T08:57:06.123Z", "9f86d081884c7d659a2feaa0c55ad015"
    head = ["EVALSHA", "0" * 40, 7, *keys, "player_12345", "kB7xQ2mP", ms, iso]
    steady = capacity_sizes.resp_command(*head, "", "0", "", "0", "", cid, "SPUBLISH", "1")
    cursor = capacity_sizes.resp_command(
        *head, "", "1", "Zt4mW9qA", "1", "main.24.var2.7", cid, "SPUBLISH", "1"
    )
    assert steady == 518 and cursor == 541
    # schedule.lua: the shard key (crc32 of the study id mod 16), study, due (+30 s), now.
    shard = capacity_sizes.Keys("presence").schedule("kB7xQ2mP")
    due = str(1_795_942_626_123 + 30_000)
    schedule = capacity_sizes.resp_command("EVALSHA", "0" * 40, 1, shard, "kB7xQ2mP", due, ms)
    assert schedule == 157
    # A full heartbeat: the lease SADD, heartbeat.lua starting a session (its id given, no '1'),
    # schedule.lua, in one pipeline; REST: no lease, no connection.
    lease = capacity_sizes.resp_command(
        "SADD", f"presence:{{node:{cid}}}:leases", f"kB7xQ2mP player_12345 {cid}"
    )
    full_beat = capacity_sizes.resp_command(*head, cid, "0", "", "0", "", cid, "SPUBLISH")
    rest_beat = capacity_sizes.resp_command(*head, cid, "0", "", "0", "", "", "SPUBLISH")
    # heartbeat.lua's reply: *8, four bulk strings (32 + 8 + 14 + 6 bytes), two 13-digit ms,
    # events and covered: 4 + 39 + 14 + 21 + 12 + 2 x 16 + 2 x 4 = 130; SADD's :1 and
    # schedule.lua's :1 are 4 bytes each.
    sizes = capacity_sizes.measure_sizes()
    assert (sizes.heartbeat_request, sizes.cursor_request) == (steady, cursor)
    assert sizes.schedule_request == schedule and sizes.schedule_reply == 4
    assert sizes.full_request == lease + full_beat + schedule == 838
    assert sizes.rest_request == rest_beat + schedule == 668
    assert (sizes.heartbeat_reply, sizes.full_reply, sizes.rest_reply) == (130, 138, 134)


def test_heartbeat_mix_by_hand() -> None:
    # SMALL: 0.2 heartbeats/s per user, a stay (one full heartbeat) and an idle spell (one
    # reactivating steady heartbeat, schedule.lua after it) every 1000 s: 0.001 / 0.2 each.
    m = capacity_inputs.DEFAULT_MEASURED
    assert m.ws_steady and m.ws_requests_per_hb == 1.007
    mix = capacity_model.heartbeat_mix(m, SMALL)
    assert (mix.full, mix.reactivating, mix.rest) == pytest.approx((0.005, 0.005, 0.0))
    assert mix.steady == pytest.approx(0.99)
    assert mix.requests == pytest.approx(0.005 * 3 + 0.005 * (1.007 + 1) + 0.99 * 1.007)
    assert mix.schedules == pytest.approx(0.01)
    # Half the heartbeats over REST: 2 requests and a schedule.lua each.
    half = capacity_model.heartbeat_mix(m, dataclasses.replace(SMALL, rest_share=0.5))
    assert half.full == pytest.approx(0.0025) and half.steady == pytest.approx(0.495)
    assert half.requests == pytest.approx(0.5 * mix.requests + 0.5 * 2)
    assert half.schedules == pytest.approx(0.5 * 0.01 + 0.5)
    # A row measured before steady heartbeats (schedule.lua on every one): all full, as sent.
    old = dataclasses.replace(m, ws_requests_per_hb=3.078, ws_schedules_per_hb=1.026)
    assert not old.ws_steady
    before = capacity_model.heartbeat_mix(old, SMALL)
    assert (before.full, before.steady, before.requests, before.schedules) == (1, 0, 3, 1)


def test_redis_requests_bytes_and_schedule_shard_by_hand() -> None:
    # SMALL on one node: 200 heartbeats/s (100 with a cursor), 1 full and 1 reactivating.
    m = dataclasses.replace(
        capacity_inputs.DEFAULT_MEASURED,
        ws_requests_per_hb=1.0,
        floor_redis_us_per_hb=30.0,
        floor_commands_per_hb=6.0,
    )
    sizes = capacity_sizes.measure_sizes()
    r = capacity_plan.plan_redis(m, SMALL, 1, sizes)
    # 198 steady + 1 reactivating (+ schedule.lua) + 1 full (3), and 16 sweep polls.
    assert r.requests_per_s == pytest.approx(198 + 2 + 3 + 16)
    assert r.schedule_calls_per_s == pytest.approx(2)
    bytes_in = (
        198 * sizes.heartbeat_request
        + (sizes.heartbeat_request + sizes.schedule_request)
        + sizes.full_request
        + 100 * (sizes.cursor_request - sizes.heartbeat_request)
    )
    assert r.heartbeat_bytes_in_per_s == pytest.approx(bytes_in)
    bytes_out = 199 * sizes.heartbeat_reply + sizes.schedule_reply + sizes.full_reply
    assert r.heartbeat_bytes_out_per_s == pytest.approx(bytes_out)
    # One schedule.lua: 0.3 of the floor's 30 us = 9 us; 2/s over 16 shards, plus one node's
    # ZRANGEBYSCORE per tick at 30 / 6 = 5 us.
    assert capacity_model.costs(m, SMALL).redis_schedule == pytest.approx(9.0)
    assert r.schedule_shard_cpu == pytest.approx(1e-6 * (2 / 16 * 9.0 + 5.0))
    # The measured Redis CPU per heartbeat is not added to: schedule.lua calls cost nothing more.
    assert r.cores_heartbeats == pytest.approx(200 * m.ws_redis_us_per_hb * 1e-6)


def test_largest_study_search() -> None:
    assert capacity_plan.largest_study(lambda v: v * 0.01, 1.0) == 100
    assert capacity_plan.largest_study(lambda v: v * v / 10_000, 1.0) == 100
    assert capacity_plan.largest_study(lambda v: v * 0.01, 0.005) == 0
    assert capacity_plan.largest_study(lambda v: 0.0, 1.0, ceiling=1000) == 1000


# --- the plan and its binding constraint --------------------------------------------------


def test_memory_binds_when_sockets_are_expensive() -> None:
    # 200 heartbeats/s x 1000 us = 0.2 cores -> 1 process at 0.5; 1 MiB sockets in
    # 0.5 x 100 MiB -> 50 sockets per process -> 20 processes.
    w = dataclasses.replace(SMALL, node_memory_mib=100.0, affinity=True, receive_share=0.0)
    n = capacity_plan.plan_nodes(ROUND, w, capacity_sizes.measure_sizes())
    assert n.cores_heartbeats == pytest.approx(0.2)
    assert n.by_cpu == 1
    assert n.sockets_per_node_limit == 50
    assert n.by_memory == 20
    assert (n.processes, n.binding) == (20, "socket memory")


def test_cpu_binds_when_heartbeats_are_expensive() -> None:
    # 200 heartbeats/s x 10,000 us = 2 cores -> 4 processes at 0.5; memory wants 1.
    m = dataclasses.replace(ROUND, ws_node_us_per_hb=10_000.0, kib_per_socket=1.0)
    w = dataclasses.replace(SMALL, node_memory_mib=100.0, affinity=True, receive_share=0.0)
    n = capacity_plan.plan_nodes(m, w, capacity_sizes.measure_sizes())
    assert (n.by_cpu, n.by_memory) == (4, 1)
    assert (n.processes, n.binding) == (4, "CPU")
    assert n.cpu_per_node == pytest.approx(0.5)


def test_node_count_is_a_fixed_point_of_the_spread() -> None:
    # At random, more nodes mean more nodes per event and more CPU: the plan must cover the CPU
    # it needs at its own size.
    p = capacity_plan.plan(capacity_inputs.DEFAULT_MEASURED, capacity_model.Workload())
    n = p.nodes
    assert n.processes == max(capacity_plan.ceil(n.cores / 0.6), n.by_memory)
    assert (
        capacity_plan.ceil(sum(capacity_plan.node_cores(p.measured, p.workload, n.processes)) / 0.6)
        == n.by_cpu
    )
    assert n.cpu_per_node <= 0.6 + 1e-9
    assert p.redis.cpu_per_primary <= 0.6 + 1e-9
    assert p.traffic.nodes_per_event == pytest.approx(
        capacity_model.distinct_nodes(10, n.processes)
    )
    # Affinity sends each event to one node: fewer processes and primaries.
    q = capacity_plan.plan(capacity_inputs.DEFAULT_MEASURED, capacity_model.Workload(affinity=True))
    assert q.traffic.nodes_per_event == pytest.approx(1.0)
    assert q.nodes.processes < n.processes and q.redis.primaries < p.redis.primaries


def test_per_study_loads_add_up_to_the_fleets() -> None:
    # The hot-study limits use the per-study formulas; summed over all studies they must give
    # the fleets' totals (the sweep's polling of the schedule shards aside).
    w = capacity_model.Workload(hot_studies=50, hot_study_viewers=300)
    p = capacity_plan.plan(capacity_inputs.DEFAULT_MEASURED, w)
    n, u, c = p.nodes.processes, capacity_model.per_user(w), capacity_model.costs(p.measured, w)
    studies = [
        (t.studies, t.viewers, capacity_model.spread(t.viewers, n, w.affinity))
        for t in capacity_model.tiers(w)
    ]
    node = sum(k * capacity_model.study_node_cores(v, d, u, c) for k, v, d in studies)
    redis = sum(k * capacity_model.study_redis_cores(v, d, u, c) for k, v, d in studies)
    assert node == pytest.approx(p.nodes.cores)
    assert redis + p.redis.cores_polls == pytest.approx(p.redis.cores)


def test_limits_are_ranked_and_a_hot_study_comes_first() -> None:
    p = capacity_plan.plan(
        capacity_inputs.DEFAULT_MEASURED,
        capacity_model.Workload(hot_studies=100, hot_study_viewers=1000),
    )
    ks = [x.breaks_at for x in p.limits]
    assert ks == sorted(ks)
    first = p.limits[0]
    assert first.name == "one hot study on its primary"
    assert first.breaks_at < 1 and not first.scale_out
    assert p.shard_study_limit < 1000
    names = {x.name for x in p.limits}
    assert names == {
        "node CPU",
        "node memory (idle sockets)",
        "Redis primary CPU",
        "one hot study on its primary",
        "one hot study on its nodes",
        "16 schedule shards",
        "pub/sub output buffer per node",
    }
    # Sized at 60 %, the fleet's own limits are reached at about 1 / 0.6.
    by_name = {x.name: x for x in p.limits}
    assert 1 / 0.6 <= by_name["node CPU"].breaks_at < 1 / 0.6 * 1.01


# --- reading a results folder -------------------------------------------------------------

ENV = {"code": "abc1234", "cores": 2}


def _write(folder: Path, name: str, data: dict[str, Any]) -> None:
    (folder / f"{name}.json").write_text(json.dumps({**data, "environment": ENV}))


def _fanout_row(target: str, load: int, us: float, redis: float, p99: float) -> dict[str, Any]:
    """A row of the loads, as the harness wrote it before the receive-cost point (no `point`)."""
    return {
        "target": target,
        "offered_deliveries_per_s": load,
        "events_per_s": load / 40,
        "deliveries_per_s": load - 1,
        "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": p99, "p999": 9.0, "max": 10.0},
        "server_cpu_us_per_delivery": us,
        "redis_cpu_util": redis,
    }


def _receive_row(
    target: str, events: float, us: float | None, redis: float = 0.01
) -> dict[str, Any]:
    """A row of the receive-cost point: 2 viewers per study, one on each of the 2 nodes."""
    return {
        **_fanout_row(target, round(events * 2), us, redis, 1.0),
        "events_per_s": events,
        "offered_events_per_s": events,
        "point": "receive",
        "sockets_per_event_and_node": 1.0,
        "server_cpu_us_per_event_and_node": us,
    }


# The receive-cost point: 5,000 events/s to 2 viewers is 10,000 deliveries/s, the load the
# model takes the fan-out figures from; it must not be taken for that load.
RECEIVE_ROWS = [
    _receive_row("node", 200.0, 310.0),
    _receive_row("baseline", 200.0, 150.0),
    _receive_row("node", 5000.0, 100.0, 0.2),
    _receive_row("baseline", 5000.0, 50.0, 0.005),
]


def _fake_results(folder: Path) -> None:
    folder.mkdir()
    _write(
        folder,
        "heartbeats",
        {
            "config": {"ws_sockets": 96},
            "rows": [
                {
                    "path": "WebSocket",
                    "node_cpu_us_per_heartbeat": 60.0,
                    "redis_cpu_us_per_heartbeat": 22.0,
                    # Code before steady heartbeats: every one full (2 SADD: the lease, the
                    # connection set inside heartbeat.lua).
                    "redis_commands_per_heartbeat": {
                        "evalsha": 2.0,
                        "sadd": 2.0,
                        "hgetall": 1.0,
                        "zadd": 1.0,
                    },
                },
                {
                    "path": "REST",
                    "node_cpu_us_per_heartbeat": 150.0,
                    "redis_cpu_us_per_heartbeat": 30.0,
                    "redis_commands_per_heartbeat": {"evalsha": 2.0},
                },
                {
                    "path": "raw Redis (floor)",
                    "node_cpu_us_per_heartbeat": None,
                    "redis_cpu_us_per_heartbeat": 18.0,
                    "redis_commands_per_heartbeat": {"evalsha": 2.0, "hset": 1.0, "zadd": 2.0},
                },
            ],
            "targets": [],
        },
    )
    _write(
        folder,
        "fanout",
        {
            "config": {"studies": 20, "viewers": 40, "nodes": 2},
            "rows": [
                _fanout_row("node", 5_000, 50.0, 0.02, 4.0),
                _fanout_row("baseline", 5_000, 30.0, 0.003, 2.0),
                _fanout_row("node", 12_000, 35.0, 0.05, 5.5),
                _fanout_row("baseline", 12_000, 25.0, 0.004, 2.5),
                _fanout_row("node", 40_000, 20.0, 0.09, 90.0),
                _fanout_row("baseline", 40_000, 18.0, 0.005, 20.0),
                *RECEIVE_ROWS,
            ],
            "targets": [],
        },
    )
    _write(
        folder,
        "idle",
        {
            "config": {},
            "rows": [
                {
                    "server": "node",
                    "sockets": 1000,
                    "rss_per_socket_kib": 40.0,
                    "rss_before_mib": 50,
                },
                {
                    "server": "node",
                    "sockets": 5000,
                    "rss_per_socket_kib": 28.0,
                    "rss_before_mib": 50,
                },
                {"server": "baseline", "sockets": 9000, "rss_per_socket_kib": 1.0},
            ],
            "targets": [],
        },
    )
    _write(
        folder,
        "sweep",
        {
            "config": {},
            "rows": [
                {"kind": "nothing due", "sessions": 100_000, "redis_used_mib": 40},
                {
                    "kind": "10,000 due",
                    "sessions": 100_000,
                    "due": 10_000,
                    "redis_cpu_us_per_transition": 99.0,
                    "harness_cpu_us_per_transition": 99.0,
                },
                {"kind": "nothing due", "sessions": 500_000, "redis_used_mib": 200},
                {
                    "kind": "1,000 due",
                    "sessions": 500_000,
                    "due": 1_000,
                    "redis_cpu_us_per_transition": 60.0,
                    "harness_cpu_us_per_transition": 30.0,
                },
                {
                    "kind": "10,000 due",
                    "sessions": 500_000,
                    "due": 10_000,
                    "redis_cpu_us_per_transition": 45.0,
                    "harness_cpu_us_per_transition": 15.0,
                },
            ],
            "targets": [],
        },
    )


def test_read_results_picks_the_right_rows(tmp_path: Path) -> None:
    folder = tmp_path / "20261201T000000Z-full"
    _fake_results(folder)
    m = capacity_inputs.read_results(folder)
    assert m.source == f"bench results {folder} (code abc1234)"
    assert not m.fallbacks
    assert (m.ws_node_us_per_hb, m.ws_redis_us_per_hb, m.ws_commands_per_hb) == (60, 22, 6)
    # 2 EVALSHA + half of 2 SADD; the EVALSHA beyond heartbeat.lua's (one HGETALL) is schedule.lua.
    assert (m.ws_requests_per_hb, m.ws_schedules_per_hb) == (3.0, 1.0)
    assert not m.ws_steady
    assert (m.rest_node_us_per_hb, m.rest_redis_us_per_hb) == (150, 30)
    assert (m.floor_redis_us_per_hb, m.floor_commands_per_hb) == (18, 5)
    # Fan-out: the node row nearest 10k (12k), with the baseline row of that load.
    assert m.node_us_per_delivery == 35.0
    assert m.fanout_p99_ms == 5.5
    assert m.fanout_events_per_s == 300.0
    assert (m.fanout_redis_cpu, m.fanout_redis_idle_cpu) == (0.05, 0.004)
    assert (m.fanout_nodes, m.fanout_viewers) == (2, 40)
    assert isinstance(m.fanout_nodes, int)
    # The receive-cost point: the node row at the highest rate, and the one nearest the
    # fan-out figure's 300 events/s.
    assert m.receive_measured
    assert (m.receive_us_per_event, m.receive_events_per_s) == (100.0, 5000.0)
    assert m.receive_us_per_event_at_fanout_rate == 310.0
    # Redis per event from the same point's busiest rate, less the baseline's (idle) Redis.
    assert (m.receive_redis_cpu, m.receive_redis_idle_cpu) == (0.2, 0.005)
    assert m.redis_us_per_event == pytest.approx(0.195 / 5000 * 1e6)
    assert m.redis_measured_at == "the receive-cost point, 5,000 events/s"
    # Idle: the node's largest step.
    assert (m.kib_per_socket, m.node_base_rss_mib, m.idle_sockets) == (28.0, 50.0, 5000)
    # Sweep: the largest size, 10k due; memory scaled to a million sessions.
    assert (m.sweep_redis_us_per_transition, m.sweep_node_us_per_transition) == (45.0, 15.0)
    assert m.redis_mib_per_million_sessions == pytest.approx(400.0)


def test_read_results_of_steady_heartbeats(tmp_path: Path) -> None:
    # The WebSocket row as the harness writes it since steady heartbeats: one EVALSHA, four
    # commands inside, no lease SADD, no schedule.lua.
    folder = tmp_path / "steady"
    _fake_results(folder)
    data = json.loads((folder / "heartbeats.json").read_text())
    data["rows"][0]["redis_commands_per_heartbeat"] = {
        "evalsha": 1.004,
        "hgetall": 1.004,
        "hset": 1.004,
        "sismember": 1.004,
        "zadd": 1.004,
    }
    (folder / "heartbeats.json").write_text(json.dumps(data))
    m = capacity_inputs.read_results(folder)
    assert m.ws_requests_per_hb == pytest.approx(1.004)
    assert m.ws_schedules_per_hb == pytest.approx(0.0)
    assert m.ws_steady and m.ws_commands_per_hb == pytest.approx(5.02)
    # A row without commandstats keeps the built-in figures, and says so.
    del data["rows"][0]["redis_commands_per_heartbeat"]
    (folder / "heartbeats.json").write_text(json.dumps(data))
    m = capacity_inputs.read_results(folder)
    assert {"ws_requests_per_hb", "ws_schedules_per_hb"} <= set(m.fallbacks)
    assert m.ws_requests_per_hb == capacity_inputs.DEFAULT_MEASURED.ws_requests_per_hb


def test_missing_scenarios_keep_the_built_in_figures(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    _fake_results(folder)
    (folder / "idle.json").unlink()
    (folder / "sweep.json").unlink()
    m = capacity_inputs.read_results(folder)
    assert m.kib_per_socket == capacity_inputs.DEFAULT_MEASURED.kib_per_socket
    assert "kib_per_socket" in m.fallbacks and "sweep_redis_us_per_transition" in m.fallbacks
    assert "ws_node_us_per_hb" not in m.fallbacks
    with pytest.raises(FileNotFoundError):
        capacity_inputs.read_results(tmp_path / "nowhere")


def test_overrides() -> None:
    m, w = cap.apply_overrides(
        capacity_inputs.DEFAULT_MEASURED,
        capacity_model.Workload(),
        ["receive_share=0", "kib_per_socket=10", "affinity=true", "users=2_000"],
    )
    assert (w.receive_share, w.affinity, w.users) == (0.0, True, 2000)
    assert m.kib_per_socket == 10.0
    with pytest.raises(ValueError, match="no assumption"):
        cap.apply_overrides(m, w, ["nonsense=1"])
    with pytest.raises(ValueError, match="NAME=VALUE"):
        cap.apply_overrides(m, w, ["users"])


# --- the command --------------------------------------------------------------------------


def test_cli_prints_the_tables(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capacity"]) == 0
    out = capsys.readouterr().out
    for heading in ("Load", "Nodes (one process = one core)", "Redis (one primary = one core)"):
        assert f"\n{heading}\n" in out
    assert "What breaks first" in out
    assert "20261201T190838Z-full" in out
    assert "node receive cost, measured: 92.1 us per event and node" in out
    assert re.search(r"node processes\s+[\d,]+\s+binding: (CPU|socket memory)", out)


def test_cli_options_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "run"
    _fake_results(folder)
    args = ["capacity", "--results", str(folder), "--users", "1000", "--studies", "100"]
    args += ["--heartbeat-interval", "10", "--cursor-rate", "0.1", "--utilisation", "0.5"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["workload"]["users"] == 1000 and data["workload"]["utilisation"] == 0.5
    assert data["measured"]["ws_node_us_per_hb"] == 60.0
    assert data["measured"]["receive_us_per_event"] == 100.0
    # 40 viewers over 2 nodes, 35 us per delivery, 310 us per event with one socket at that
    # rate: (20 x 35 - 310) / 19 per delivery; the rest of 100 us per event received.
    send = (20 * 35.0 - 310.0) / 19
    assert data["costs_us"]["node_delivery"] == pytest.approx(send)
    assert data["costs_us"]["node_receive"] == pytest.approx(100.0 - send)
    assert data["traffic"]["heartbeats"] == pytest.approx(200)
    assert data["nodes"]["processes"] >= 1 and data["redis"]["primaries"] >= 1
    assert [x["breaks_at"] for x in data["limits"]] == sorted(
        x["breaks_at"] for x in data["limits"]
    )


def test_cli_refuses_nonsense(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capacity", "--users", "0"]) == 2
    assert "users must be > 0" in capsys.readouterr().err
    assert main(["capacity", "--set", "bogus=1"]) == 2
    assert main(["capacity", "--results", "/nonexistent/run"]) == 2


def test_the_doc_shows_what_the_command_prints(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/capacity.md copies the default output verbatim: regenerate it when this fails."""
    assert main(["capacity"]) == 0
    printed = capsys.readouterr().out
    blocks = re.findall(
        r"```\n\$ presence-svc capacity\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S
    )
    assert blocks, "docs/capacity.md has no ```$ presence-svc capacity``` block"
    assert blocks[0] == printed
