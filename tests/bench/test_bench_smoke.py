"""The benchmark harness end to end at tiny sizes: plumbing and bookkeeping, never speed.

Real Redis, node, baseline and client processes, as in `make bench`, but for seconds. The
figures of this profile mean nothing; what must hold is that every scenario writes well-formed
JSON and that the fan-out loses and duplicates nothing.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from presence_svc.bench.capacity.inputs import read_results
from presence_svc.bench.harness import BenchOptions, run
from presence_svc.bench.profiles import PROFILES
from presence_svc.bench.scenarios import NAMES, catalogue, fanout_peer
from presence_svc.bench.scenarios.fanout_peer import TARGET as PEER_TARGET
from presence_svc.bench.scenarios.fanout_receive import TARGETS as RECEIVE_TARGETS
from presence_svc.bench.scenarios.heartbeats_rest import TARGET as REST_RATIO_TARGET

pytestmark = [pytest.mark.redis, pytest.mark.multinode, pytest.mark.timeout(90)]

TARGET_KEYS = {"name", "goal", "measured", "unit", "met", "note"}


def _load(folder: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / f"{name}.json").read_text())
    return data


# Every scenario in turn, bigroom's four node starts included: longer than the module's bound.
@pytest.mark.timeout(180)
def test_smoke_profile_writes_results(real_redis_url: str, tmp_path: Path) -> None:
    summary = run(
        BenchOptions(
            profile=PROFILES["smoke"], out_root=tmp_path, redis_url=real_redis_url, quiet=True
        ),
        catalogue(),
    )
    folder = tmp_path / summary["run_id"]
    assert (folder / "report.txt").read_text().count("===") == 2 * len(NAMES)

    written = _load(folder, "summary")
    assert written["scenarios"] == list(NAMES)
    assert written["environment"]["cores"] >= 1
    assert written["targets"] and all(set(t) == TARGET_KEYS for t in written["targets"])

    fanout = _load(folder, "fanout")
    assert {r["target"] for r in fanout["rows"]} == {"node", "baseline"}
    for row in fanout["rows"]:
        assert row["expected"] > 0
        assert row["received"] == row["expected"], row
        assert row["lost"] == 0 and row["duplicated"] == 0 and row["misrouted"] == 0, row
        assert set(row["latency_ms"]) == {"p50", "p90", "p99", "p999", "max"}
        assert row["latency_ms"]["p50"] is not None
        assert row["server_cpu_us_per_delivery"] is not None
        assert row["server_cpu_us_per_event_and_node"] is not None
    # The loads (4 viewers per study over 2 nodes), then the receive-cost point: 2 viewers per
    # study, one on each node, so each node hands each event to exactly one socket.
    points = [(r["point"], r["target"], r["sockets_per_event_and_node"]) for r in fanout["rows"]]
    assert points == [
        ("fan-out", "node", 2),
        ("fan-out", "baseline", 2),
        ("receive", "node", 1),
        ("receive", "baseline", 1),
    ]
    receive = [r for r in fanout["rows"] if r["point"] == "receive"]
    for row in receive:
        assert row["offered_events_per_s"] == 50
        assert row["expected"] == 2 * round(50 * 0.5)  # every event, once on each node
        assert row["cpu_clock"] in ("schedstat", "stat")
        assert row["server_idle_cpu_util_per_process"] is not None
    assert receive[0]["cpu_per_event_vs_baseline"] is not None
    assert fanout["config"]["receive_events"] == [50]
    # The fan-out targets are judged on the loads, the receive-cost ones on the receive point.
    by_name = {t["name"]: t for t in fanout["targets"]}
    received = [by_name.pop(name) for name in RECEIVE_TARGETS]
    assert all("receive" not in t["note"] for t in by_name.values())
    assert received[0]["measured"] == receive[0]["server_cpu_us_per_event_and_node"]
    assert received[1]["measured"] == receive[0]["cpu_per_event_vs_baseline"]
    assert all("at 50 events/s offered" in t["note"] for t in received)
    every_load = by_name["fan-out CPU per delivery vs bare, every load"]
    assert every_load["measured"] == max(
        r["cpu_vs_baseline"]
        for r in fanout["rows"]
        if r["point"] == "fan-out" and r["target"] == "node"
    )
    report = (folder / "report.txt").read_text()
    assert "Receive cost: 2 studies x 2 viewers" in report

    # The capacity model finds the receive-cost point in what the harness wrote.
    measured = read_results(folder)
    assert measured.receive_measured
    assert measured.receive_us_per_event == receive[0]["server_cpu_us_per_event_and_node"]
    assert measured.receive_events_per_s == receive[0]["events_per_s"]
    assert "receive_us_per_event" not in measured.fallbacks
    assert measured.sockets_per_event_and_node == 2

    heartbeats = _load(folder, "heartbeats")
    assert [r["path"] for r in heartbeats["rows"]] == ["WebSocket", "REST", "raw Redis (floor)"]
    for row in heartbeats["rows"]:
        assert row["heartbeats"] > 0 and row["errors"] == 0 and row["non_200"] == 0, row
        assert "evalsha" in row["redis_commands_per_heartbeat"]
    # REST at a fixed rate, the node then the bare JSON endpoint: every request answered 200.
    moderate = heartbeats["rest_moderate"]
    assert [(r["target"], r["round"]) for r in moderate["rows"]] == [("node", 1), ("bare", 1)]
    for row in moderate["rows"]:
        assert row["sent"] == 50 and row["ok"] == row["sent"] and row["non_200"] == 0, row
        assert row["cpu_us_per_request"] is not None and row["idle_cpu_util"] is not None, row
    ratio = next(t for t in heartbeats["targets"] if t["name"] == REST_RATIO_TARGET)
    assert ratio["goal"] == "<= 1.5x" and isinstance(ratio["met"], bool)
    assert ratio["measured"] == round(moderate["node_us"] / moderate["bare_us"], 3)

    idle = _load(folder, "idle")
    assert [r["sockets"] for r in idle["rows"] if r["server"] == "node"] == [20, 40]
    assert [r["sockets"] for r in idle["rows"] if r["server"] == "raw ASGI"] == [20, 40]
    assert all(r["failed"] == 0 and r["rss_per_socket_kib"] is not None for r in idle["rows"])

    sweep = _load(folder, "sweep")
    due = [r for r in sweep["rows"] if "due" in r]
    assert [r["due"] for r in due] == [100, 200]
    assert all(r["events"] == r["due"] for r in due)
    empty = next(r for r in sweep["rows"] if r["kind"] == "nothing due")
    assert empty["tick_ms"]["p50"] is not None

    _check_bigroom(_load(folder, "bigroom"))


def _check_bigroom(bigroom: dict[str, Any]) -> None:
    """Both runs moved every member, every socket applied every frame without a gap, and every
    watcher ended holding every present member's last move and none of those who left."""
    p = PROFILES["smoke"].bigroom
    assert [r["mode"] for r in bigroom["rows"]] == ["on", "off"]
    assert bigroom["rows"][0]["env"]["PRESENCE_BATCH_WINDOW"] == "0.05"
    assert bigroom["rows"][1]["env"]["PRESENCE_BATCH_WINDOW"] == "0"
    for row in bigroom["rows"]:
        assert row["heartbeats"] > 0 and row["frames_per_watcher_per_s"] > 0, row
        assert row["gaps"] == 0 and row["events_before_snapshot"] == 0, row
        assert row["disordered_batches"] == 0, row
        assert row["churn"]["left"] >= 1 and row["churn"]["joined"] >= 1, row
        assert row["churn"]["delete_statuses"] == {"200": row["churn"]["left"]}, row
        # The members present at the end: as many as at the start, churn or not.
        assert row["final_pairs_expected"] == p.watchers * p.members, row
        assert row["final_pairs_reached"] == row["final_pairs_expected"], row
        assert row["left_still_held"] == 0 and row["watchers_open"] == p.watchers, row
        assert row["staleness_samples"] > 0 and row["staleness_ms"]["p99"] is not None, row
        assert all(c is not None for c in row["node_cores"]), row
        assert len(row["node_wait_cores"]) == 2 and row["machine_busy_cores"] > 0, row
    # 65 sockets per node, above the threshold: batched in the first run only.
    on, off = bigroom["rows"]
    assert on["batch_frames_share"] > 0.5 and off["batch_frames_share"] == 0, (on, off)
    names = [t["name"] for t in bigroom["targets"]]
    assert names == [
        "big room node CPU",
        "big room p99 cursor staleness",
        "big room seq gaps",
        "big room final cursors at every watcher",
    ]
    connect = {r["members"]: r for r in bigroom["connect"]}
    assert set(connect) == set(p.connect_members)
    for members, row in connect.items():
        assert row["total"] == members and row["connected_bytes"] > 0, row
        assert row["first_frames_bytes"] == row["connected_bytes"] + row["snapshot_bytes"]
    # PRESENCE_SNAPSHOT_MAX_USERS at its default: the large study's snapshot lists 100 users.
    few, many = (connect[m] for m in sorted(connect))
    assert few["users_listed"] == few["total"] and few["complete"] is True, few
    assert many["users_listed"] == 100 and many["complete"] is False, many


def test_smoke_peer_column(real_redis_url: str, tmp_path: Path) -> None:
    """python-socketio as the fan-out's third column: every event reaches its rooms once
    through its AsyncRedisManager, its CPU is measured, and the nodes-vs-peer ratio is a
    target row (met or not is the run's figure, never this test's)."""
    pytest.importorskip(
        "socketio", reason="python-socketio is not installed (pip install -e '.[test]')"
    )
    smoke = PROFILES["smoke"]
    profile = replace(smoke, fanout=replace(smoke.fanout, peer=True, receive_events=()))
    options = BenchOptions(
        profile=profile,
        scenarios=("fanout",),
        out_root=tmp_path,
        redis_url=real_redis_url,
        quiet=True,
    )
    summary = run(options, catalogue())
    folder = tmp_path / summary["run_id"]

    rows = _load(folder, "fanout")["rows"]
    assert [r["target"] for r in rows] == ["node", "baseline", "socketio"]
    node, peer = rows[0], rows[2]
    assert peer["expected"] == node["expected"] > 0
    assert peer["received"] == peer["expected"], peer
    assert peer["lost"] == 0 and peer["duplicated"] == 0 and peer["misrouted"] == 0, peer
    assert peer["closed_sockets"] == 0 and peer["reordered"] == 0, peer
    assert peer["latency_ms"]["p50"] is not None
    assert peer["server_cpu_us_per_delivery"] is not None
    assert peer["cpu_vs_baseline"] is not None

    target = next(t for t in _load(folder, "summary")["targets"] if t["name"] == PEER_TARGET)
    assert target["goal"] == ">= 3x cheaper" and isinstance(target["met"], bool)
    ratio = peer["server_cpu_us_per_delivery"] / node["server_cpu_us_per_delivery"]
    assert target["measured"] == round(ratio, 2)
    report = (folder / "report.txt").read_text()
    assert "2 nodes, 2 bare baseline servers, 2 python-socketio servers" in report
    assert "Fan-out CPU per delivery, three ways" in report


def test_peer_target_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without python-socketio the column is left out and its target reads n/a, saying why."""
    monkeypatch.setattr(fanout_peer, "available", lambda: False)
    ctx: Any = SimpleNamespace(profile=PROFILES["quick"])
    node = {"target": "node", "offered_deliveries_per_s": 10_000, "server_cpu_us_per_delivery": 40}
    (target,) = fanout_peer.targets(ctx, [node], 10_000, "at 10,000 deliveries/s")
    assert target.name == PEER_TARGET and target.measured is None and target.met is None
    assert "python-socketio is not installed" in target.note
    assert fanout_peer.cpu_table([node]) is None
    # A profile without the column has no such target at all.
    ctx = SimpleNamespace(profile=PROFILES["smoke"])
    assert fanout_peer.targets(ctx, [node], 10_000, "") == []
