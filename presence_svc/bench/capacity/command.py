"""`presence-svc capacity`: how many node processes and Redis primaries a workload needs.

A calculator, not a benchmark: it takes per-operation costs measured by `make bench` (a results
folder, or the built-in figures of the latest full run printed in docs/performance.md), a
workload (users, studies, heartbeat and cursor rates, ...) and a target utilisation, and prints
the traffic, the fleet that carries it, and which limit load growth reaches first.
docs/capacity.md explains the model, its assumptions and the plan for 1 M users.

This module is the command line; the rest lives in capacity_inputs (the measured figures),
capacity_sizes (bytes on the wire), capacity_model (the workload and its arithmetic),
capacity_plan (the fleet and its limits) and capacity_report (tables and JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from presence_svc.bench.capacity.inputs import (
    DEFAULT_MEASURED,
    RECEIVE_FIELDS,
    Measured,
    read_results,
)
from presence_svc.bench.capacity.model import Workload
from presence_svc.bench.capacity.plan import plan
from presence_svc.bench.capacity.report import render, to_json


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
    """NAME=VALUE pairs, each a field of Workload or of Measured (`none` for a receive-cost
    figure: as if not measured)."""
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
            if name in RECEIVE_FIELDS:  # may be None: not measured (receive_share is used)
                changes = {name: None if text.strip().lower() == "none" else float(text)}
            else:
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
