"""Real processes for tests: a private redis-server, and presence-svc nodes on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_ready(check: object, what: str, timeout: float, *procs: subprocess.Popen[bytes]) -> None:
    """Poll `check` until it is true; fail at once if any of `procs` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exited := next((proc for proc in procs if proc.poll() is not None), None):
            raise RuntimeError(f"{what}: exited with {exited.returncode} before it was ready")
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s")


class RedisServer:
    """A throw-away redis-server on a free loopback port.

    Nothing is saved to disk unless `persist` (an append-only file in a temporary folder, so
    the server can be killed and started again on the same port with its data).
    """

    def __init__(self, binary: str | None = None, persist: bool = False) -> None:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise FileNotFoundError("redis-server is not on PATH")
        self.binary = found
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.persist = persist
        self._dir = tempfile.TemporaryDirectory(prefix="presence-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self._proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.persist else "no",
                "--appendfsync",
                "always",
                "--dir",
                self._dir.name,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            wait_ready(client.ping, "redis-server", 10, self._proc)
        finally:
            client.close()
        return self

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL); `start()` brings it back on the same port."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def stop(self) -> None:
        if self._proc is not None:
            terminate(self._proc, 5)
        self._dir.cleanup()


class NodeProcess:
    """`presence-svc serve` as its own process, on a free port."""

    def __init__(self, env: Mapping[str, str], log_dir: Path, log_level: str = "warning") -> None:
        self.log_level = log_level
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self._env = {**os.environ, **env}
        self.log_path = log_dir / f"node-{self.port}.log"
        self._log = self.log_path.open("wb")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NodeProcess:
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "presence_svc.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                self.log_level,
            ],
            env=self._env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_ready(self._healthy, f"node on port {self.port}", 20, self._proc)
        return self

    def _healthy(self) -> bool:
        return httpx.get(self.base_url + "/readyz", timeout=0.5).status_code == 200

    def health(self) -> dict[str, object]:
        """The node's /healthz report (sockets, studies, leases it holds)."""
        report: dict[str, object] = httpx.get(self.base_url + "/healthz", timeout=2).json()
        return report

    def signal(self, signum: int) -> None:
        assert self._proc is not None
        self._proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; its exit code."""
        assert self._proc is not None
        return self._proc.wait(timeout)

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def stop(self) -> None:
        if self._proc is not None:
            terminate(self._proc, 15)
        self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")
