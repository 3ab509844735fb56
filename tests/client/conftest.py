"""The Python client against real nodes: a private redis-server and node processes per test
(tests may kill a node), with thresholds short enough to watch idling and leave graces."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import auth as support_auth
from tests.support.nodes import NodeFactory as NodeFactory  # re-exported for the tests
from tests.support.nodes import node_factory, presence_env, private_redis
from tests.support.processes import RedisServer

SECRET = "client-tests-secret-0123456789abcdef0123456789"
PREFIX = "client"
IDLE, AWAY, EXPIRE, SWEEP = 3.0, 6.0, 60.0, 0.1
LEASE_TTL, GRACE = 1.5, 2.5
HEARTBEAT = 1.0  # the clients' interval: a third of IDLE, as the client's docs advise
SLACK = 1.5  # scheduling noise on a loaded 2-core machine

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
    with private_redis("client end-to-end tests need") as server:
        yield server


@pytest.fixture
def nodes(redis_server: RedisServer, tmp_path: Path) -> Iterator[NodeFactory]:
    """Start nodes on the test's Redis (keyword arguments override PRESENCE_* settings)."""
    env = presence_env(
        redis_url=redis_server.url,
        jwt_secret=SECRET,
        key_prefix=PREFIX,
        idle_after=IDLE,
        away_after=AWAY,
        expire_after=EXPIRE,
        sweep_interval=SWEEP,
        lease_ttl=LEASE_TTL,
        leave_grace=GRACE,
        drain_timeout="3",
    )
    with node_factory(env, tmp_path) as factory:
        yield factory
