"""Runs the browser client's unit tests (*.test.mjs here) with Node's own test runner."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def test_node_test_runner_passes_the_client_unit_tests() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("the browser client's unit tests need Node.js 20+ (`node` on PATH)")
    files = sorted(HERE.glob("*.test.mjs"))
    assert files, "no *.test.mjs files found"
    done = subprocess.run(
        [node, "--test", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    summary = [line for line in done.stdout.splitlines() if line.startswith(("# pass", "# fail"))]
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert summary and summary[-1] == "# fail 0", summary
