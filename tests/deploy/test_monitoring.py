"""The Grafana dashboard and the Prometheus alert rules in deploy/: well formed, valid PromQL,
their unit tests pass, and every metric and label they query is one a running node serves.

promtool (Debian's `prometheus` package) checks the rules and, through recording rules made of
them, the dashboard's queries; those tests skip, naming the package, when it is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.artifacts import DEPLOY
from tests.support.app import app_client, node_of
from tests.support.auth import auth

DASHBOARD = DEPLOY / "grafana" / "presence.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"

# What operators must be told about (issue 15): each needs an alert on the metric named.
REQUIRED_ALERTS = {
    "presence_pubsub_connected": "pub/sub down",
    "presence_redis_errors_total": "Redis errors",
    "presence_slow_consumers_dropped_total": "slow consumers",
    "presence_sweep_duration_seconds_bucket": "sweep lag",
    "presence_dead_node_leases_released_total": "dead-node releases",
    "presence_clock_skew_seconds": "clock skew",
}
# Grafana's variables, replaced by values Prometheus accepts before promtool sees a query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$instance": ".*"}
SELECTOR = re.compile(r"\b(presence_[a-z0-9_]+)(?:\{([^}]*)\})?")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
# Added by Prometheus to every scraped series, so never on /metrics itself.
TARGET_LABELS = {"instance", "job"}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    return [
        target["expr"]
        for panel in dashboard()["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def promql(query: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    assert "$" not in query, f"a Grafana variable this test does not know: {query}"
    return query


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is missing: install Debian's prometheus package")
    return subprocess.run([found, *args], capture_output=True, text=True, timeout=60)


def test_the_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_the_alert_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    }
    assert len(tested) >= 2, tested
    assert tested <= {rule["alert"] for rule in alert_rules()}


def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool has no query check of its own; as recording rules, its rule check parses them.
    rules = [
        {"record": f"dashboard:query_{index}", "expr": promql(query)}
        for index, query in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_operator_concern_has_an_alert_with_a_severity_and_a_text() -> None:
    rules = alert_rules()
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule
    used = {name for rule in rules for name, _ in SELECTOR.findall(rule["expr"])}
    missing = {concern for name, concern in REQUIRED_ALERTS.items() if name not in used}
    assert not missing, f"no alert for {sorted(missing)}"


def test_the_dashboard_is_well_formed() -> None:
    document = dashboard()
    assert document["uid"] and document["title"] and document["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = document["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat"} and panel["title"], panel
        # Every query goes to the data source the viewer picks, never a fixed one.
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"], target


@pytest.fixture
def served() -> Iterator[dict[str, set[str]]]:
    """Each series name a node's /metrics serves, with the label names its samples carry."""
    with app_client() as client:
        # Labelled metrics show their labels once a child exists: a heartbeat and a close.
        client.post("/presence/heartbeat", json={"study_id": "s1"}, headers=auth("alice"))
        node_of(client).metrics.protocol_closes.labels("invalid_utf8")
        text = client.get("/metrics").text
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    yield names


def test_every_metric_and_label_queried_is_served_by_a_node(served: dict[str, set[str]]) -> None:
    queries = [rule["expr"] for rule in alert_rules()] + dashboard_queries()
    variable = dashboard()["templating"]["list"][1]["definition"]
    problems = []
    for query in [*queries, variable]:
        for name, matchers in SELECTOR.findall(query):
            if name not in served:
                problems.append(f"{name} is not served ({query})")
                continue
            labels = set(MATCHER.findall(matchers)) - TARGET_LABELS
            if labels - served[name]:
                problems.append(f"{name} has no label {sorted(labels - served[name])}")
    assert not problems, "\n".join(problems)
    # And the other way round: no metric a node serves is left off the dashboard.
    on_dashboard = {name for query in dashboard_queries() for name, _ in SELECTOR.findall(query)}
    families = {re.sub(r"_(total|created|bucket|sum|count)$", "", name) for name in served}
    shown = {re.sub(r"_(total|created|bucket|sum|count)$", "", name) for name in on_dashboard}
    assert families - shown == set(), f"not on the dashboard: {sorted(families - shown)}"
