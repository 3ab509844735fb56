"""The `presence-svc` command: settings errors stop a node at start; `token` mints usable tokens."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from types import SimpleNamespace

import httpx
import jwt
import pytest
from starlette.applications import Starlette

from presence_svc import __version__
from presence_svc.auth import TokenVerifier
from presence_svc.cli import _count_protocol_close, main
from presence_svc.metrics import Metrics
from presence_svc.settings import DEV_JWT_SECRET
from presence_svc.web import openapi
from tests.support.processes import terminate, wait_ready

ROOT = Path(__file__).resolve().parent.parent


def serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
    return subprocess.run(
        [sys.executable, "-m", "presence_svc.cli", "serve", "--port", "1"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PRESENCE_IDLE_AFTER": "400"}, "PRESENCE_IDLE_AFTER"),
        ({"PRESENCE_AWAY_AFTER": "700"}, "PRESENCE_EXPIRE_AFTER"),
        ({"PRESENCE_SWEEP_INTERVAL": "soon"}, "PRESENCE_SWEEP_INTERVAL"),
        ({"PRESENCE_KEY_PREFIX": "a{b}"}, "PRESENCE_KEY_PREFIX"),
        ({"PRESENCE_REDIS_URL": "redis://127.0.0.1:1/0"}, "PRESENCE_JWT_SECRET"),
        ({"PRESENCE_JWT_SECRET": "short"}, "PRESENCE_JWT_SECRET"),
        ({"PRESENCE_WS_MAX_OUTGOING_BUFFER": "65536"}, "PRESENCE_WS_MAX_OUTGOING_BUFFER"),
    ],
)
def test_invalid_settings_stop_the_node_naming_the_variable(
    env: dict[str, str], named: str
) -> None:
    result = serve(env)
    assert result.returncode == 2
    assert named in result.stderr
    assert "Traceback" not in result.stderr


def test_token_defaults_to_the_dev_secret(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "alice", "--ttl", "60"]) == 0
    token = capsys.readouterr().out.strip()
    assert TokenVerifier(DEV_JWT_SECRET).user_id(token) == "alice"


def test_token_uses_the_given_secret(capsys: pytest.CaptureFixture[str]) -> None:
    secret = "s" * 40
    assert main(["token", "bob", "--secret", secret]) == 0
    assert TokenVerifier(secret).user_id(capsys.readouterr().out.strip()) == "bob"


@pytest.mark.parametrize("argv", [["token", "not a user"], ["token", "bob", "--secret", "short"]])
def test_token_refuses_bad_input(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "presence-svc:" in capsys.readouterr().err


def test_protocol_closes_are_counted_in_the_node_metrics() -> None:
    app = Starlette()
    count = _count_protocol_close(app)
    count("bad_handshake")  # before start-up built the node: nothing to count in, no error
    metrics = Metrics()
    app.state.node = SimpleNamespace(metrics=metrics)
    count("invalid_utf8")
    count("invalid_utf8")
    text = metrics.render().decode()
    assert 'presence_ws_protocol_closes_total{reason="invalid_utf8"} 2.0' in text
    assert 'reason="bad_handshake"' not in text


def test_serve_uds_answers_over_the_unix_socket(cleanup_real_redis: str, key_prefix: str) -> None:
    # A short directory of its own: AF_UNIX paths are limited to about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="psvc-") as folder:
        path = Path(folder) / "presence.sock"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
        env = {
            **clean,
            "PRESENCE_REDIS_URL": cleanup_real_redis,
            "PRESENCE_KEY_PREFIX": key_prefix,
            "PRESENCE_JWT_SECRET": "uds-test-secret-0123456789abcdef0123456789",
        }
        argv = [sys.executable, "-m", "presence_svc.cli", "serve", "--uds", str(path)]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(path))) as client:

                def ready() -> bool:
                    # httpcore leaks the socket of a failed Unix connect: wait for the file.
                    if not path.exists():
                        return False
                    return client.get("http://node/readyz", timeout=1).status_code == 200

                wait_ready(ready, "serve --uds", 20, proc)
                health = client.get("http://node/healthz", timeout=2)
            assert health.status_code == 200
            assert health.json()["status"] == "ok"
        finally:
            terminate(proc, 15)
            output = proc.communicate()[0].decode(errors="replace")
        # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly.
        assert proc.returncode in {0, -signal.SIGTERM}, output
        assert f"unix socket {path}" in output and "Traceback" not in output


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"presence-svc {__version__}\n"


def test_the_version_has_one_source() -> None:
    # pyproject.toml names no version of its own: setuptools reads __version__ at build time.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "presence_svc.__version__"}
    assert openapi.build()["info"]["version"] == __version__
    # The CHANGELOG's first release heading (after "Unreleased") is the version being released.
    releases = re.findall(r"^## (?!Unreleased$)(\S+)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert releases[0] == __version__
    assert len(releases) == len(set(releases))


def test_serve_help_shows_its_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 127.0.0.1)" in text
    assert "(default: 8000)" in text
    assert "(default: $PRESENCE_LOG_LEVEL, else info)" in text


def test_token_ttl_says_and_uses_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["token", "--help"])
    assert "(default: 3600, one hour)" in " ".join(capsys.readouterr().out.split())
    assert main(["token", "alice"]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 3600
