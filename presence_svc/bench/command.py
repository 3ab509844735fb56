"""The `presence-svc bench` subcommand: its arguments, and `main`, which runs the harness.

The harness and the scenarios are imported on use only: they (and the optional plotting
dependency) are no part of a node.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from presence_svc.bench.scenarios import NAMES


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(args: Any) -> int:
    """Entry point of `presence-svc bench` (args from add_bench_command's parser)."""
    from presence_svc.bench.harness import BenchOptions, run
    from presence_svc.bench.profiles import PROFILES
    from presence_svc.bench.scenarios import catalogue

    profile = PROFILES["full" if args.full else "quick"]
    if args.profile:
        profile = PROFILES[args.profile]
    options = BenchOptions(
        profile=profile,
        scenarios=tuple(args.scenario or ()),
        out_root=Path(args.out),
        redis_url=args.redis_url,
        nodes=tuple(u for part in args.nodes or () for u in part.split(",") if u),
        baseline_nodes=tuple(u for part in args.baseline_nodes or () for u in part.split(",") if u),
        key_prefix=args.key_prefix,
        jwt_secret=args.jwt_secret,
    )
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        run(options, catalogue())
    except KeyboardInterrupt:
        print(
            "presence-svc bench: interrupted; every process it started is stopped", file=sys.stderr
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


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
        choices=NAMES,
        help="run only this scenario (repeatable; default: all, in this order: "
        + ", ".join(NAMES)
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
    bench.set_defaults(run=main)
