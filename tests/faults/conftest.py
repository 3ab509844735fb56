"""Fault tests: each starts its own redis-server and real node processes, then breaks them.

Measured figures (time to detect, time to recover, ...) are collected with `record()` and
printed at the end of the run.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import auth as support_auth
from tests.support.processes import NodeProcess, RedisServer

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


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private, persistent redis-server that the test may kill and restart."""
    if shutil.which("redis-server") is None:
        pytest.skip("fault tests need redis-server on PATH")
    server = RedisServer(persist=True).start()
    try:
        yield server
    finally:
        server.stop()


NodeFactory = Callable[..., NodeProcess]


@pytest.fixture
def nodes(redis_server: RedisServer, tmp_path: Path) -> Iterator[NodeFactory]:
    """Start nodes on the test's Redis (keyword arguments override PRESENCE_* settings)."""
    started: list[NodeProcess] = []

    def start(**overrides: str) -> NodeProcess:
        env = {
            "PRESENCE_REDIS_URL": redis_server.url,
            "PRESENCE_JWT_SECRET": SECRET,
            "PRESENCE_KEY_PREFIX": "faults",
            "PRESENCE_IDLE_AFTER": str(IDLE),
            "PRESENCE_AWAY_AFTER": str(AWAY),
            "PRESENCE_EXPIRE_AFTER": str(EXPIRE),
            "PRESENCE_SWEEP_INTERVAL": str(SWEEP),
            "PRESENCE_LEASE_TTL": str(LEASE_TTL),
            "PRESENCE_LEAVE_GRACE": str(GRACE),
            "PRESENCE_DRAIN_TIMEOUT": str(DRAIN),
            "PRESENCE_REST_HEARTBEAT_RATE": "1000",  # the traffic helper posts 20 a second
            **{f"PRESENCE_{key.upper()}": value for key, value in overrides.items()},
        }
        node = NodeProcess(env, tmp_path).start()
        started.append(node)
        return node

    try:
        yield start
    finally:
        for node in started:
            node.stop()
        for node in started:
            log = node.log_text()
            assert "Traceback" not in log, log
