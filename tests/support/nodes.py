"""The shared fixture logic of the suites that start real processes: a private redis-server, and
a factory of presence-svc nodes that stops them all (and checks their logs) at teardown.

A conftest keeps its own thresholds and passes them in: `presence_env()` turns settings into
PRESENCE_* variables, `NodeFactory` starts nodes with them plus per-node overrides, and
`node_factory()` / `private_redis()` are the context managers its fixtures yield from.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.support.processes import NodeProcess, RedisServer


def presence_env(**settings: object) -> dict[str, str]:
    """PRESENCE_* variables for `settings`: `idle_after=3.0` is PRESENCE_IDLE_AFTER="3.0"."""
    return {f"PRESENCE_{key.upper()}": str(value) for key, value in settings.items()}


@contextlib.contextmanager
def private_redis(needed_by: str, persist: bool = False) -> Iterator[RedisServer]:
    """A throw-away redis-server for one test, stopped afterwards; skips the test without one.

    `needed_by` names the tests in the skip message ("fault tests need redis-server on PATH").
    """
    if shutil.which("redis-server") is None:
        pytest.skip(f"{needed_by} redis-server on PATH")
    server = RedisServer(persist=persist).start()
    try:
        yield server
    finally:
        server.stop()


class NodeFactory:
    """Starts nodes on a base environment; call it with PRESENCE_* overrides per node.

    Every node started is kept, so `stop_all()` can stop them at teardown and then fail the
    test if any node logged a traceback (printing that log).
    """

    def __init__(
        self,
        env: Mapping[str, str],
        log_dir: Path,
        node_class: type[NodeProcess] = NodeProcess,
    ) -> None:
        self.env = dict(env)
        self.log_dir = log_dir
        self.node_class = node_class
        self.started: list[NodeProcess] = []

    def __call__(self, **overrides: object) -> NodeProcess:
        """Start a node; keyword arguments override PRESENCE_* settings (`lease_ttl="0.5"`)."""
        return self.start(presence_env(**overrides))

    def start(self, extra_env: Mapping[str, str]) -> NodeProcess:
        """Start a node with `extra_env` (any variables) over the base environment."""
        node = self.node_class({**self.env, **extra_env}, self.log_dir)
        # Kept before it starts: a node that never becomes ready is still stopped at teardown.
        self.started.append(node)
        return node.start()

    def stop_all(self) -> None:
        """Stop every node started, then fail on a traceback in any of their logs."""
        for node in self.started:
            node.stop()
        for node in self.started:
            log = node.log_text()
            assert "Traceback" not in log, log


@contextlib.contextmanager
def node_factory(
    env: Mapping[str, str], log_dir: Path, node_class: type[NodeProcess] = NodeProcess
) -> Iterator[NodeFactory]:
    """A `NodeFactory` whose nodes are all stopped (and their logs checked) on exit."""
    factory = NodeFactory(env, log_dir, node_class)
    try:
        yield factory
    finally:
        factory.stop_all()
