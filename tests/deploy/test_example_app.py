"""deploy/examples/app.py, the sidecar overlay's app, against a real node and a real Redis: the
tokens it mints open sockets on the node, and the study event it publishes reaches them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.deploy.artifacts import DEPLOY
from tests.support.clients import Watcher
from tests.support.processes import NodeProcess, free_port, terminate, wait_ready

SECRET = "example-app-secret-0123456789abcdef0123456789"
APP = DEPLOY / "examples" / "app.py"


@pytest.fixture
def node(cleanup_real_redis: str, key_prefix: str, tmp_path: Path) -> Iterator[NodeProcess]:
    env = {
        "PRESENCE_REDIS_URL": cleanup_real_redis,
        "PRESENCE_JWT_SECRET": SECRET,
        "PRESENCE_KEY_PREFIX": key_prefix,
    }
    started = NodeProcess(env, tmp_path)
    try:
        yield started.start()
    finally:
        started.stop()
    assert "Traceback" not in started.log_text()


@pytest.fixture
def app(node: NodeProcess, cleanup_real_redis: str, key_prefix: str) -> Iterator[str]:
    """The example app on loopback, its sidecar the node, as in the overlay's pod."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PRESENCE_", "APP_"))}
    env = {
        **clean,
        "PRESENCE_REDIS_URL": cleanup_real_redis,
        "PRESENCE_JWT_SECRET": SECRET,
        "PRESENCE_KEY_PREFIX": key_prefix,
        "APP_HOST": "127.0.0.1",
        "APP_PORT": str(port),
        "APP_PRESENCE_URL": node.base_url,
    }
    proc = subprocess.Popen(
        [sys.executable, str(APP)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(lambda: httpx.get(f"{base}/healthz", timeout=0.5).is_success, "app", 20, proc)
        yield base
    finally:
        terminate(proc, 15)
        output = proc.communicate()[0].decode(errors="replace")
        assert "Traceback" not in output, output


async def test_app_tokens_open_sockets_and_its_events_reach_them(
    node: NodeProcess, app: str
) -> None:
    async with httpx.AsyncClient(base_url=app) as http:
        login = await http.post("/login", json={"user_id": "alice", "study_id": "study-x"})
        assert login.status_code == 200, login.text
        assert login.json()["websocket"] == "/ws/presence?study_id=study-x"
        watcher = await Watcher.open(node.ws_url, "study-x", login.json()["token"])
        try:
            await watcher.send({"type": "heartbeat", "chapter_id": "ch1"})
            await watcher.wait_until(lambda w: bool(w.events("presence.user_joined")))
            renamed = await http.post(
                "/studies/study-x/rename", json={"chapter_id": "ch1", "name": "Najdorf"}
            )
            assert renamed.json() == {"published": True, "nodes": 1}
            await watcher.wait_until(lambda w: bool(w.events("study.chapter_renamed")))
            (event,) = watcher.events("study.chapter_renamed")
            assert event["data"] == {"chapter_id": "ch1", "name": "Najdorf"}
            # The app reads presence from its sidecar with a token of its own.
            listing = await http.get("/studies/study-x/presence")
            assert listing.status_code == 200, listing.text
            assert [u["user_id"] for u in listing.json()["users"]] == ["alice"]
        finally:
            await watcher.close()
        # The token grants only the study the user logged in to.
        with pytest.raises(ConnectionClosed) as refused:
            await Watcher.open(node.ws_url, "study-y", login.json()["token"])
        assert refused.value.rcvd is not None and refused.value.rcvd.code == 4403


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/login", {"user_id": "not a user", "study_id": "s"}),
        ("/login", {"user_id": "alice"}),
        ("/studies/s/rename", {"chapter_id": "c1"}),
        ("/studies/bad%20id/rename", {"chapter_id": "c1", "name": "n"}),
    ],
)
async def test_app_answers_bad_input_with_a_400(app: str, path: str, body: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=app) as http:
        response = await http.post(path, json=body)
    assert response.status_code == 400 and "error" in response.json()
