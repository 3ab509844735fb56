"""The capacity model's node receive cost: how it splits the fan-out figure with the bench's
receive-cost point (one socket per node and event), reads that point from a results folder, and
falls back on `receive_share` without it. No Redis, nothing timed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from presence_svc.bench.capacity import command as cap
from presence_svc.bench.capacity import inputs as capacity_inputs
from presence_svc.bench.capacity import model as capacity_model
from presence_svc.bench.capacity import plan as capacity_plan
from presence_svc.bench.capacity import report as capacity_report
from tests.bench.capacity.test_capacity import SMALL, _fake_results


def _split(**figures: float | None) -> tuple[float, float]:
    m = dataclasses.replace(
        capacity_inputs.DEFAULT_MEASURED,
        node_us_per_delivery=28.0,
        fanout_viewers=50,
        fanout_nodes=2,
        receive_events_per_s=2000.0,
        **figures,  # type: ignore[arg-type]
    )
    c = capacity_model.costs(m, SMALL)
    assert capacity_model.fanout_split(m, SMALL) == (c.node_receive, c.node_delivery)
    return c.node_receive, c.node_delivery


def test_the_receive_cost_point_splits_the_fan_out_figure() -> None:
    # 25 sockets: 700 us per event and node at the fan-out rate; one socket at the same rate
    # 300 us, so the other 24 sockets cost 400 us: 16.67 each. One socket at the higher rate
    # costs 120 us, of which one send: 103.33 per event received.
    receive, send = _split(receive_us_per_event=120.0, receive_us_per_event_at_fanout_rate=300.0)
    assert send == pytest.approx(400 / 24)
    assert receive == pytest.approx(120 - 400 / 24)
    assert receive + send == pytest.approx(120.0)  # a node with one socket of the study
    # receive_share no longer matters.
    assert capacity_model.fanout_split(
        dataclasses.replace(
            capacity_inputs.DEFAULT_MEASURED,
            receive_us_per_event=120.0,
            receive_us_per_event_at_fanout_rate=300.0,
            node_us_per_delivery=28.0,
            fanout_viewers=50,
            fanout_nodes=2,
        ),
        dataclasses.replace(SMALL, receive_share=0.9),
    ) == pytest.approx((receive, send))
    # Only one rate measured: it is used for both.
    receive, send = _split(receive_us_per_event=220.0, receive_us_per_event_at_fanout_rate=None)
    assert send == pytest.approx((700 - 220) / 24)
    assert receive == pytest.approx(220 - send)


def test_the_split_is_clamped() -> None:
    # One socket costs more than 25 at the same rate: nothing left per socket.
    assert _split(receive_us_per_event=120.0, receive_us_per_event_at_fanout_rate=800.0) == (
        120.0,
        0.0,
    )
    # One socket costs less than one delivery of 25: all of the figure per socket.
    assert _split(receive_us_per_event=120.0, receive_us_per_event_at_fanout_rate=10.0) == (
        pytest.approx(92.0),
        pytest.approx(28.0),
    )
    # A send dearer than a whole one-socket event at the higher rate: no negative receive.
    assert _split(receive_us_per_event=20.0, receive_us_per_event_at_fanout_rate=10.0) == (
        0.0,
        pytest.approx(28.0),
    )


def _without_receive_point(folder: Path, legacy: bool) -> None:
    """fanout.json as an older harness wrote it (legacy: rows without `point`), or with the
    point run on external nodes (no CPU)."""
    path = folder / "fanout.json"
    data = json.loads(path.read_text())
    if legacy:
        data["rows"] = [r for r in data["rows"] if "point" not in r]
    else:
        for row in data["rows"]:
            if row.get("point") == "receive":
                row["server_cpu_us_per_event_and_node"] = None
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("legacy", [True, False], ids=["older-harness", "no-cpu"])
def test_without_the_receive_point_receive_share_is_used(tmp_path: Path, legacy: bool) -> None:
    folder = tmp_path / "run"
    _fake_results(folder)
    _without_receive_point(folder, legacy)
    m = capacity_inputs.read_results(folder)
    # Not the built-in run's receive figures: they would not match this folder's fan-out figure.
    assert not m.receive_measured
    assert m.receive_us_per_event is None and m.receive_us_per_event_at_fanout_rate is None
    assert not set(capacity_inputs.RECEIVE_FIELDS) & set(m.fallbacks)
    assert m.node_us_per_delivery == 35.0  # the loads are read as before
    w = dataclasses.replace(SMALL, receive_share=0.2)
    c = capacity_model.costs(m, w)
    assert c.node_receive == pytest.approx(0.2 * 35.0 * 20)  # 40 viewers over 2 nodes
    assert c.node_delivery == pytest.approx(0.8 * 35.0)
    text = capacity_report.render(capacity_plan.plan(m, w))
    assert "node receive cost: not measured (these figures have no receive-cost point)" in text
    assert "receive_share 0.2 of 35.0 us per delivery x 20 sockets" in text


def test_receive_figures_can_be_overridden() -> None:
    m, w = capacity_inputs.DEFAULT_MEASURED, capacity_model.Workload()
    m, w = cap.apply_overrides(m, w, ["receive_us_per_event=150"])
    assert m.receive_us_per_event == 150.0 and m.receive_measured
    m, w = cap.apply_overrides(m, w, ["receive_us_per_event=none"])
    assert m.receive_us_per_event is None and not m.receive_measured
    m, w = cap.apply_overrides(m, w, ["receive_us_per_event=90.5", "receive_share=0.1"])
    assert (m.receive_us_per_event, w.receive_share) == (90.5, 0.1)


def test_redis_per_event_comes_from_the_receive_point_when_it_has_a_reading(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "run"
    _fake_results(folder)
    m = capacity_inputs.read_results(folder)
    assert m.redis_us_per_event == pytest.approx((0.2 - 0.005) / 5000 * 1e6)
    # The point without a Redis reading (an external Redis): the fan-out load's figure.
    path = folder / "fanout.json"
    data = json.loads(path.read_text())
    for row in data["rows"]:
        if row.get("point") == "receive":
            row["redis_cpu_util"] = None
    path.write_text(json.dumps(data))
    m = capacity_inputs.read_results(folder)
    assert m.receive_measured and m.receive_redis_cpu is None
    assert m.redis_us_per_event == pytest.approx((0.05 - 0.004) / 300 * 1e6)
    assert m.redis_measured_at == "the fan-out load, 300 events/s"
    # `--set receive_redis_cpu=none` does the same to any figures.
    m2, _ = cap.apply_overrides(
        dataclasses.replace(m, receive_redis_cpu=0.2),
        capacity_model.Workload(),
        ["receive_redis_cpu=none"],
    )
    assert m2.receive_redis_cpu is None
