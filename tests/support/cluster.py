"""A throw-away Redis Cluster: three masters from redis-server binaries on free loopback ports."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import redis
from redis.cluster import RedisCluster

from tests.support.processes import free_port, terminate, wait_ready

MASTERS = 3


class LocalCluster:
    """`redis-cli --cluster create` over fresh `redis-server --cluster-enabled` processes:
    `masters` primaries, each with `replicas` replicas."""

    def __init__(self, masters: int = MASTERS, replicas: int = 0) -> None:
        server = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        if server is None or cli is None:
            raise FileNotFoundError("redis-server and redis-cli must be on PATH")
        self._server, self._cli = server, cli
        self.replicas = replicas
        self.ports = [free_port() for _ in range(masters * (1 + replicas))]
        # The bus port defaults to port + 10000, which may be taken or past 65535.
        self._bus_ports = [free_port() for _ in self.ports]
        self._dir = tempfile.TemporaryDirectory(prefix="presence-cluster-")
        self._procs: list[subprocess.Popen[bytes]] = []
        self._killed: set[int] = set()

    @property
    def url(self) -> str:
        """A seed node's URL, as PRESENCE_REDIS_URL takes it."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self) -> LocalCluster:
        """Start the servers and form the cluster; on failure, stop whatever was started."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> LocalCluster:
        for port, bus_port in zip(self.ports, self._bus_ports, strict=True):
            folder = Path(self._dir.name) / str(port)
            folder.mkdir()
            self._procs.append(
                subprocess.Popen(
                    [
                        self._server,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-port",
                        str(bus_port),
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                        # Replicas sync at once (the default waits 5 s for more replicas).
                        "--repl-diskless-sync-delay",
                        "0",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(folder),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in self.ports:
            self._wait(lambda p=port: self.client(p).ping(), f"redis-server on {port}")
        subprocess.run(
            [
                self._cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        for port in self.ports:
            self._wait(lambda p=port: self._ready(p), f"cluster state ok on {port}")
            # A replica that never synced refuses to take over from its primary.
            self._wait(lambda p=port: self._synced(p), f"replication up on {port}")
        return self

    def _synced(self, port: int) -> bool:
        with self.client(port) as client:
            info = client.info("replication")
            return bool(info.get("role") == "master" or info.get("master_link_status") == "up")

    def kill(self, port: int) -> None:
        """SIGKILL the server on `port` (its replica, if any, takes over)."""
        proc = self._procs[self.ports.index(port)]
        self._killed.add(port)
        proc.kill()
        proc.wait()

    def client(self, port: int) -> redis.Redis:
        """A plain client of one node (close it after use)."""
        return redis.Redis(port=port, socket_connect_timeout=0.5)

    def _ready(self, port: int) -> bool:
        with self.client(port) as client:
            info = client.cluster("INFO")
            return (
                b"cluster_state:ok" in info
                if isinstance(info, bytes)
                else (info.get("cluster_state") == "ok")
            )

    def _wait(self, check: object, what: str, timeout: float = 20) -> None:
        # Not strict: while starting, fewer servers run than there are ports.
        started = zip(self.ports, self._procs, strict=False)
        alive = [proc for port, proc in started if port not in self._killed]
        wait_ready(check, what, timeout, *alive)

    def stop(self) -> None:
        for proc in self._procs:
            terminate(proc, 5)
        self._dir.cleanup()


def crossslot_errors(url: str) -> int:
    """CROSSSLOT error replies the primaries of the cluster at `url` have sent since they
    started (none, if every command's keys shared a slot)."""
    client = RedisCluster.from_url(url)
    try:
        total = 0
        for node in client.get_primaries():  # type: ignore[no-untyped-call]
            stats = client.info("errorstats", target_nodes=node)
            total += int(stats.get("errorstat_CROSSSLOT", {}).get("count", 0))
        return total
    finally:
        client.close()
