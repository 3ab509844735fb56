"""Browser tests: headless Chromium (Debian's `chromium` package) driven by Playwright for Python,
against two real node processes on one real Redis.

Playwright's own browser download cannot work here: the browser is always /usr/bin/chromium.
Fixtures: `browser` (one Chromium per module), `context` (a fresh profile per test, closed
afterwards), `nodes` (a factory of nodes with short thresholds; keyword arguments override
PRESENCE_* settings), `two_nodes` (two nodes on the same Redis and key prefix), and `token()`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import auth as support_auth
from tests.support.nodes import NodeFactory as NodeFactory  # re-exported for the tests
from tests.support.nodes import node_factory, presence_env
from tests.support.processes import NodeProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SECRET = "browser-tests-secret-0123456789abcdef0123456789"
# Short thresholds so a page turns idle within seconds; the grace covers a reconnect to a peer.
IDLE, AWAY, EXPIRE, SWEEP = 2.0, 30.0, 60.0, 0.1
LEASE_TTL, GRACE, DRAIN = 1.5, 4.0, 3.0


def token(user: str, ttl: float = 600, studies: str = "*") -> str:
    """A token of the nodes' secret for `user` (all studies by default)."""
    return support_auth.token(user, secret=SECRET, ttl=ttl, studies=studies)


def study() -> str:
    return f"study-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium per test module (Debian's, never a download).

    Not per session: while Playwright's sync API is open, its event loop counts as running in
    the main thread, and the asyncio tests of later modules could not start theirs.
    """
    if not Path(CHROMIUM).exists():
        pytest.skip(f"browser tests need {CHROMIUM}: apt-get install chromium")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="browser tests need Playwright: pip install -e '.[test]'"
    )
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    """A fresh browser profile (cookies, storage) for one test."""
    opened = browser.new_context(viewport={"width": 1000, "height": 700})
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def nodes(cleanup_real_redis: str, key_prefix: str, tmp_path: Path) -> Iterator[NodeFactory]:
    """Start nodes on a real Redis under this test's key prefix (overrides: PRESENCE_* values)."""
    env = presence_env(
        redis_url=cleanup_real_redis,
        jwt_secret=SECRET,
        key_prefix=key_prefix,
        idle_after=IDLE,
        away_after=AWAY,
        expire_after=EXPIRE,
        sweep_interval=SWEEP,
        lease_ttl=LEASE_TTL,
        leave_grace=GRACE,
        drain_timeout=DRAIN,
    )
    with node_factory(env, tmp_path) as factory:
        yield factory


@pytest.fixture
def two_nodes(nodes: NodeFactory) -> tuple[NodeProcess, NodeProcess]:
    """Two nodes on the same Redis and key prefix."""
    return nodes(), nodes()
