"""The `presence-svc bench` subcommand's arguments; the harness itself is imported on use."""

from __future__ import annotations

import argparse
from typing import Any

SCENARIOS = ["fanout", "heartbeats", "idle", "sweep"]


def _run(args: argparse.Namespace) -> int:
    # Imported here: the harness (and its optional plotting dependency) is no part of a node.
    from presence_svc.bench.harness import main

    return main(args)


def add_bench_command(commands: Any) -> None:
    """Add `bench` to the `presence-svc` subcommands (an argparse subparsers object)."""
    bench = commands.add_parser(
        "bench",
        help="run the benchmark harness on loopback (see docs/performance.md)",
        description="Benchmarks with real Redis, node and client processes: prints tables, "
        "writes JSON and PNG files under --out/<run id>/.",
    )
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes (default)")
    size.add_argument("--full", action="store_true", help="the full sizes, about 15 minutes")
    size.add_argument("--profile", choices=["quick", "full", "smoke"], help=argparse.SUPPRESS)
    bench.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable; default: all, in this order: "
        + ", ".join(SCENARIOS)
        + ")",
    )
    bench.add_argument(
        "--redis-url", help="use this Redis (keys under fresh prefixes) instead of starting one"
    )
    bench.add_argument(
        "--nodes",
        action="append",
        metavar="URL[,URL]",
        help="running nodes (http://HOST:PORT) to use instead of starting local ones; they "
        "must use --redis-url, --key-prefix and --jwt-secret",
    )
    bench.add_argument(
        "--baseline-nodes",
        action="append",
        metavar="URL[,URL]",
        help="running bare baseline servers (python -m presence_svc.bench.baseline)",
    )
    bench.add_argument("--key-prefix", default="presence", help="PRESENCE_KEY_PREFIX of --nodes")
    bench.add_argument(
        "--jwt-secret", help="PRESENCE_JWT_SECRET of --nodes (default: $PRESENCE_JWT_SECRET)"
    )
    bench.add_argument("--out", default="bench/results", help="results folder")
    bench.set_defaults(run=_run)
