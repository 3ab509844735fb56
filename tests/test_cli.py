"""The `presence-svc` command: settings errors stop a node at start; `token` mints usable tokens."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from presence_svc.auth import TokenVerifier
from presence_svc.cli import main
from presence_svc.settings import DEV_JWT_SECRET


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
