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
from typing import Any

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


class DataNode:
    """A redis-server for a Sentinel deployment: a primary, or a replica of one (`--replicaof`).

    With `password`, clients and the replication link both need it (`requirepass`,
    `masterauth`). `kill()` then `start()` brings it back on the same port, empty: a returning
    primary is turned into a replica by the sentinels and syncs from the new one.
    """

    def __init__(self, replica_of: int | None = None, password: str | None = None) -> None:
        found = shutil.which("redis-server")
        if found is None:
            raise FileNotFoundError("redis-server is not on PATH")
        self.binary = found
        self.port = free_port()
        self.replica_of = replica_of
        self.password = password
        self._dir = tempfile.TemporaryDirectory(prefix="presence-data-node-")
        self._proc: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        """A synchronous client of this server (the caller closes it)."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=0.5
        )

    def start(self) -> DataNode:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", self._dir.name]
        if self.password is not None:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        try:
            wait_ready(client.ping, f"redis-server on {self.port}", 10, self._proc)
        finally:
            client.close()
        return self

    def role(self) -> str:
        client = self.client()
        try:
            reply: Any = client.execute_command("ROLE")  # type: ignore[no-untyped-call]
            return str(reply[0].decode())
        finally:
            client.close()

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def stop(self) -> None:
        if self._proc is not None:
            terminate(self._proc, 5)
        self._dir.cleanup()


class SentinelProcess:
    """`redis-server --sentinel` on a free port, from a generated config file it may rewrite."""

    def __init__(self, master: str, primary: DataNode, timings: tuple[int, int]) -> None:
        found = shutil.which("redis-server")
        if found is None:
            raise FileNotFoundError("redis-server is not on PATH")
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="presence-sentinel-")
        down_after, failover_timeout = timings
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {self._dir.name}",
            f"sentinel monitor {master} 127.0.0.1 {primary.port} 2",
            f"sentinel down-after-milliseconds {master} {down_after}",
            f"sentinel failover-timeout {master} {failover_timeout}",
            f"sentinel parallel-syncs {master} 1",
        ]
        if primary.password is not None:
            lines.append(f"sentinel auth-pass {master} {primary.password}")
        self.config = Path(self._dir.name) / "sentinel.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self._binary = found
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelProcess:
        self._proc = subprocess.Popen(
            [self._binary, str(self.config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            wait_ready(client.ping, f"sentinel on {self.port}", 10, self._proc)
        finally:
            client.close()
        return self

    def primary(self, master: str) -> tuple[str, int] | None:
        """The primary this sentinel names for `master` now."""
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            reply: Any = client.execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", master
            )
        finally:
            client.close()
        if not reply:
            return None
        return reply[0].decode(), int(reply[1])

    def stop(self) -> None:
        if self._proc is not None:
            terminate(self._proc, 5)
        self._dir.cleanup()


class SentinelDeployment:
    """A primary, a replica and three sentinels (quorum 2) on loopback, with short timings:
    down after `down_after_ms`, so a killed primary is replaced within a few seconds."""

    def __init__(
        self,
        master: str = "presence",
        password: str | None = None,
        down_after_ms: int = 600,
        failover_timeout_ms: int = 2000,
    ) -> None:
        self.master = master
        self.password = password
        self.timings = (down_after_ms, failover_timeout_ms)
        self.primary = DataNode(password=password)
        self.replica = DataNode(replica_of=self.primary.port, password=password)
        self.sentinels: list[SentinelProcess] = []

    @property
    def addresses(self) -> str:
        """PRESENCE_REDIS_SENTINELS for this deployment."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def start(self) -> SentinelDeployment:
        try:
            self.primary.start()
            self.replica.start()
            wait_ready(self._replica_in_sync, "replica in sync", 10)
            self.sentinels = [
                SentinelProcess(self.master, self.primary, self.timings).start() for _ in range(3)
            ]
            wait_ready(self._sentinels_see_everyone, "sentinels see each other", 20)
        except BaseException:
            self.stop()
            raise
        return self

    def _replica_in_sync(self) -> bool:
        client = self.replica.client()
        try:
            info = client.info("replication")
        finally:
            client.close()
        return info.get("master_link_status") == "up"

    def _sentinels_see_everyone(self) -> bool:
        # Every sentinel must know its two peers and the replica, or it could not vote in
        # (or start) a failover.
        for sentinel in self.sentinels:
            client = redis.Redis(host="127.0.0.1", port=sentinel.port, socket_connect_timeout=0.5)
            try:
                state: Any = client.sentinel_master(self.master)
            finally:
                client.close()
            if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                return False
        return True

    def current_primary(self) -> tuple[str, int] | None:
        """The primary a majority of the sentinels name, or None while they disagree."""
        named = [s.primary(self.master) for s in self.sentinels]
        best = max(set(named), key=named.count)
        return best if named.count(best) >= 2 else None

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        self.replica.stop()
        self.primary.stop()
