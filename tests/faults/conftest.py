"""Fault tests: each starts its own redis-server and real node processes, then breaks them.

Measured figures (time to detect, time to recover, ...) are collected with `record()` and
printed at the end of the run.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import auth as support_auth
from tests.support.nodes import NodeFactory as NodeFactory  # re-exported for the tests
from tests.support.nodes import node_factory, presence_env, private_redis
from tests.support.processes import RedisServer

SECRET = "fault-tests-secret-0123456789abcdef0123456789"
IDLE, AWAY, EXPIRE, SWEEP = 5.0, 10.0, 60.0, 0.1
LEASE_TTL, GRACE, DRAIN = 1.5, 2.5, 3.0

_FIGURES: list[tuple[str, str, float, str]] = []


def record(test: str, what: str, value: float, unit: str = "s") -> None:
    """Keep a measured figure for the end-of-run report."""
    _FIGURES.append((test, what, value, unit))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("fault figures")
    for test, what, value, unit in _FIGURES:
        terminalreporter.write_line(f"{test}: {what} = {value:.3f} {unit}")


def token(user: str) -> str:
    """A token of the nodes' secret granting every study."""
    return support_auth.token(user, secret=SECRET, ttl=600, studies="*")


def study() -> str:
    return f"study-{uuid.uuid4().hex[:10]}"


def node_env(redis_url: str) -> dict[str, str]:
    """The PRESENCE_* settings of the fault tests' nodes on `redis_url` (their thresholds)."""
    return presence_env(
        redis_url=redis_url,
        jwt_secret=SECRET,
        key_prefix="faults",
        idle_after=IDLE,
        away_after=AWAY,
        expire_after=EXPIRE,
        sweep_interval=SWEEP,
        lease_ttl=LEASE_TTL,
        leave_grace=GRACE,
        drain_timeout=DRAIN,
    )


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private, persistent redis-server that the test may kill and restart."""
    with private_redis("fault tests need", persist=True) as server:
        yield server


@pytest.fixture
def nodes(redis_server: RedisServer, tmp_path: Path) -> Iterator[NodeFactory]:
    """Start nodes on the test's Redis (keyword arguments override PRESENCE_* settings)."""
    # The traffic helper posts 20 REST heartbeats a second.
    env = node_env(redis_server.url) | presence_env(rest_heartbeat_rate="1000")
    with node_factory(env, tmp_path) as factory:
        yield factory
