"""`presence-svc bench`: runs the chosen scenarios and writes their results.

Each run gets a folder `bench/results/<UTC time>-<profile>/` with one JSON per scenario, the
PNG plots, `summary.json` (targets and verdicts), `report.txt` (everything printed) and the
processes' logs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from presence_svc.bench import report
from presence_svc.bench.profiles import Profile
from presence_svc.bench.runner import (
    Child,
    Endpoint,
    WorkerPool,
    environment,
    start_baseline,
    start_nodes,
    start_peer,
    start_redis,
)


@dataclass
class BenchOptions:
    profile: Profile
    scenarios: tuple[str, ...] = ()  # names, in the order to run; empty: every one
    out_root: Path = Path("bench/results")
    redis_url: str | None = None  # None: start a private redis-server
    nodes: tuple[str, ...] = ()  # external nodes (http://HOST:PORT); empty: start local ones
    baseline_nodes: tuple[str, ...] = ()  # external bare servers; empty: start local ones
    key_prefix: str = "presence"  # the external nodes' PRESENCE_KEY_PREFIX
    jwt_secret: str | None = None  # the external nodes' PRESENCE_JWT_SECRET
    quiet: bool = False


@dataclass
class Context:
    """What a scenario gets: the profile, Redis, the client workers, and ways to start servers."""

    options: BenchOptions
    run_id: str
    folder: Path
    redis_url: str
    redis_child: Child | None
    pool: WorkerPool
    secret: str
    lines: list[str] = field(default_factory=list)
    # The python-socketio peer's AsyncRedisManager channel: its own, whoever else uses Redis.
    peer_channel: str = field(default_factory=lambda: f"bench-socketio-{secrets.token_hex(6)}")

    @property
    def profile(self) -> Profile:
        return self.options.profile

    @property
    def redis_pid(self) -> int | None:
        return self.redis_child.pid if self.redis_child is not None else None

    @property
    def clients(self) -> int:
        """Client workers are 0..clients-1; the last worker is the publisher."""
        return len(self.pool) - 1

    @property
    def publisher(self) -> int:
        return len(self.pool) - 1

    @property
    def external_nodes(self) -> bool:
        return bool(self.options.nodes)

    def prefix(self, scenario: str) -> str:
        # External nodes use the prefix they were started with; local ones get a fresh one per
        # scenario so that no scenario sees another's keys.
        if self.external_nodes:
            return self.options.key_prefix
        return f"bench-{self.run_id}-{scenario}"

    def emit(self, text: str) -> None:
        self.lines.append(text)
        if not self.options.quiet:
            print(text, flush=True)

    def client_pids(self) -> dict[str, int | None]:
        return dict(self.pool.pids)

    @contextlib.contextmanager
    def nodes(
        self, count: int, prefix: str, settings: Mapping[str, str] | None = None
    ) -> Iterator[list[Endpoint]]:
        """`count` nodes: the external ones given on the command line, or fresh local ones
        (with `settings`, PRESENCE_* variables, on top of the harness's; external nodes keep
        their own)."""
        if self.options.nodes:
            yield [Endpoint.from_url(f"node-{i}", u) for i, u in enumerate(self.options.nodes)]
            return
        env = {
            "PRESENCE_REDIS_URL": self.redis_url,
            "PRESENCE_JWT_SECRET": self.secret,
            "PRESENCE_KEY_PREFIX": prefix,
            # Load generators are abusive clients by design: measure capacity, not the limits.
            "PRESENCE_WS_MESSAGE_RATE": "1000000",
            "PRESENCE_WS_MESSAGE_BURST": "1000000",
            "PRESENCE_REST_HEARTBEAT_RATE": "1000000",
            "PRESENCE_REST_HEARTBEAT_BURST": "1000000",
            "PRESENCE_MAX_SOCKETS_PER_USER": "100000",
            **(settings or {}),
        }
        with contextlib.ExitStack() as stack:
            started = []
            names = [f"{prefix}-node-{i}" for i in range(count)]
            for child, endpoint in start_nodes(names, self.folder / "logs", env):
                stack.callback(child.stop)
                started.append(endpoint)
            yield started

    @contextlib.contextmanager
    def baselines(self, count: int) -> Iterator[list[Endpoint]]:
        if self.options.baseline_nodes:
            urls = self.options.baseline_nodes
            yield [Endpoint.from_url(f"baseline-{i}", u) for i, u in enumerate(urls)]
            return
        with contextlib.ExitStack() as stack:
            started = []
            for i in range(count):
                name = f"baseline-{time.monotonic_ns()}-{i}"
                child, endpoint = start_baseline(name, self.folder / "logs")
                stack.callback(child.stop)
                started.append(endpoint)
            yield started

    @contextlib.contextmanager
    def peers(self, count: int) -> Iterator[list[Endpoint]]:
        """`count` python-socketio servers (peer.py), always local, on this run's Redis."""
        with contextlib.ExitStack() as stack:
            started = []
            for i in range(count):
                name = f"socketio-{time.monotonic_ns()}-{i}"
                child, endpoint = start_peer(
                    name, self.folder / "logs", self.redis_url, self.peer_channel
                )
                stack.callback(child.stop)
                started.append(endpoint)
            yield started


Scenario = Callable[[Context], dict[str, Any]]


def run(options: BenchOptions, catalogue: Mapping[str, Scenario]) -> dict[str, Any]:
    """Run the chosen scenarios of `catalogue`; returns the summary (also in summary.json)."""
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{options.profile.name}"
    folder = options.out_root / run_id
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    chosen = options.scenarios or tuple(catalogue)
    unknown = [s for s in chosen if s not in catalogue]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; choose from {list(catalogue)}")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        redis_child: Child | None = None
        redis_url = options.redis_url
        if redis_url is None:
            redis_child, redis_url = start_redis(folder / "logs")
            stack.callback(redis_child.stop)
        pool = WorkerPool(options.profile.client_workers + 1, options.profile.lifetime)
        stack.callback(pool.close)
        ctx = Context(options, run_id, folder, redis_url, redis_child, pool, _secret(options))
        env = _introduce(ctx)
        targets = _run_scenarios(ctx, chosen, catalogue, env)
        ctx.emit("\n" + report.targets_table(targets))
        ctx.emit(f"\nresults in {folder} ({time.monotonic() - started:.0f} s)")
        summary = {
            "run_id": run_id,
            "profile": options.profile.name,
            "environment": env,
            "scenarios": list(chosen),
            "targets": targets,
            "loadavg_at_end": list(os.getloadavg()),
            "seconds": round(time.monotonic() - started, 1),
        }
        report.write_json(folder, "summary", summary)
        (folder / "report.txt").write_text("\n".join(ctx.lines) + "\n")
        return summary


def _secret(options: BenchOptions) -> str:
    """The JWT secret the clients sign with: the external nodes' own, or a throw-away one."""
    secret = options.jwt_secret or os.environ.get("PRESENCE_JWT_SECRET") or ""
    if not options.nodes:
        return secrets.token_hex(32)
    if len(secret.encode()) < 32:
        raise ValueError("external nodes need their PRESENCE_JWT_SECRET (--jwt-secret)")
    return secret


def _introduce(ctx: Context) -> dict[str, Any]:
    """Print what is measured, and on what; the environment every result carries."""
    options = ctx.options
    layout = {
        "redis": "local private redis-server" if ctx.redis_child else f"external {ctx.redis_url}",
        "nodes": list(options.nodes) or "local presence-svc serve processes (per scenario)",
        "client_workers": options.profile.client_workers,
        "publisher_workers": 1,
    }
    env = environment(layout)
    ctx.emit(f"presence-svc bench: profile {options.profile.name}, run {ctx.run_id}")
    ctx.emit(
        f"machine: {env['cores']} cores ({env['cpu_model']}), load average "
        f"{' '.join(f'{x:.2f}' for x in env['loadavg_at_start'])}; {env['note']}"
    )
    ctx.emit(f"code measured: {env['code']}")
    if not report.plotting_available():
        ctx.emit("plots skipped: matplotlib is missing (pip install -e '.[bench]')")
    return env


def _run_scenarios(
    ctx: Context, chosen: tuple[str, ...], catalogue: Mapping[str, Scenario], env: dict[str, Any]
) -> list[report.Target]:
    """Run each scenario and write its JSON; the targets of all of them."""
    targets: list[report.Target] = []
    for name in chosen:
        ctx.emit(f"\n=== {name} ===")
        t0 = time.monotonic()
        result = catalogue[name](ctx)
        result["seconds"] = round(time.monotonic() - t0, 1)
        result.update(scenario=name, profile=ctx.profile.name, environment=env)
        report.write_json(ctx.folder, name, result)
        targets += result.get("targets", [])
    return targets
