"""The Python client against real nodes: a private redis-server and node processes per test
(tests may kill a node), with thresholds short enough to watch idling and leave graces."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import auth as support_auth
from tests.support.processes import NodeProcess, RedisServer

SECRET = "client-tests-secret-0123456789abcdef0123456789"
PREFIX = "client"
IDLE, AWAY, EXPIRE, SWEEP = 3.0, 6.0, 60.0, 0.1
LEASE_TTL, GRACE = 1.5, 2.5
HEARTBEAT = 1.0  # the clients' interval: a third of IDLE, as the client's docs advise
SLACK = 1.5  # scheduling noise on a loaded 2-core machine

NodeFactory = Callable[..., NodeProcess]

_FIGURES: list[tuple[str, float]] = []


def record(what: str, seconds: float) -> None:
    """Keep a measured figure for the end-of-run report."""
    _FIGURES.append((what, seconds))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("client figures")
        for what, seconds in _FIGURES:
            terminalreporter.write_line(f"{what} = {seconds:.3f} s")


def token(user: str, ttl: float = 600, studies: str | list[str] = "*", secret: str = SECRET) -> str:
    """A token of the nodes' secret (by default granting every study)."""
    return support_auth.token(user, secret=secret, ttl=ttl, studies=studies)


def study() -> str:
    return f"study-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("client end-to-end tests need redis-server on PATH")
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nodes(redis_server: RedisServer, tmp_path: Path) -> Iterator[NodeFactory]:
    """Start nodes on the test's Redis (keyword arguments override PRESENCE_* settings)."""
    started: list[NodeProcess] = []

    def start(**overrides: str) -> NodeProcess:
        env = {
            "PRESENCE_REDIS_URL": redis_server.url,
            "PRESENCE_JWT_SECRET": SECRET,
            "PRESENCE_KEY_PREFIX": PREFIX,
            "PRESENCE_IDLE_AFTER": str(IDLE),
            "PRESENCE_AWAY_AFTER": str(AWAY),
            "PRESENCE_EXPIRE_AFTER": str(EXPIRE),
            "PRESENCE_SWEEP_INTERVAL": str(SWEEP),
            "PRESENCE_LEASE_TTL": str(LEASE_TTL),
            "PRESENCE_LEAVE_GRACE": str(GRACE),
            "PRESENCE_DRAIN_TIMEOUT": "3",
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
