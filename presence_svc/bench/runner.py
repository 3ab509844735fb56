"""Process orchestration for the benchmarks: Redis, nodes, baseline and peer servers, client
workers.

CPU time comes from /proc/<pid>/stat (utime + stime) read before and after a measured window,
RSS from /proc/<pid>/status (VmRSS). Every child is started with PR_SET_PDEATHSIG so that it
dies with the harness even if the harness itself is killed, and is stopped explicitly on exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; the fields after its closing paren do not.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def run_time_seconds(pid: int) -> float | None:
    """CPU time so far in ns steps: the threads' run time from /proc/<pid>/task/*/schedstat;
    None when the kernel does not expose it.

    /proc/<pid>/stat counts in clock ticks (10 ms), too coarse for a window in which a process
    uses a fraction of a second; schedstat's first field is the same run time in ns. Threads
    that ended are no longer listed (the servers measured start none while measured).
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                total += int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9 if total else None


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class CpuWindow:
    """CPU seconds each of a set of processes used between start() and stop().

    `precise`: read schedstat (ns, run_time_seconds) instead of /proc/<pid>/stat (10 ms ticks),
    if every process has it; `clock` says which was read.
    """

    def __init__(self, pids: Mapping[str, int | None], precise: bool = False) -> None:
        self._precise = precise
        self._read = cpu_seconds
        self.clock = "stat"
        self._pids = {name: pid for name, pid in pids.items() if pid is not None}
        self._start: dict[str, float] = {}
        self._t0 = 0.0
        self.cpu: dict[str, float] = {}
        self.wall = 0.0

    def start(self) -> CpuWindow:
        if self._precise and all(run_time_seconds(p) is not None for p in self._pids.values()):
            self._read = lambda pid: run_time_seconds(pid) or cpu_seconds(pid)
            self.clock = "schedstat"
        self._t0 = time.perf_counter()
        self._start = {name: self._read(pid) for name, pid in self._pids.items()}
        return self

    def stop(self) -> CpuWindow:
        self.cpu = {n: self._read(p) - self._start[n] for n, p in self._pids.items()}
        self.wall = time.perf_counter() - self._t0
        return self

    def total(self, prefix: str) -> float | None:
        """Summed CPU of the processes whose name starts with `prefix`; None if none is local."""
        picked = [v for name, v in self.cpu.items() if name.startswith(prefix)]
        return sum(picked) if picked else None


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGTERM it when we go away.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _wait_until(check: Callable[[], bool], what: str, timeout: float, proc: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=0.5) as response:
        return bool(response.status == 200)


class Child:
    """A child process with its output in a log file, stopped by stop() or with the harness."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, env: Mapping[str, str]):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            list(argv),
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A server the clients talk to; `pid` is None when it runs elsewhere (not measurable)."""

    name: str
    host: str
    port: int
    pid: int | None

    @classmethod
    def from_url(cls, name: str, url: str) -> Endpoint:
        parts = urlsplit(url if "//" in url else f"http://{url}")
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"{url!r}: expected http://HOST:PORT")
        return cls(name, parts.hostname, parts.port, None)


def start_redis(log_dir: Path) -> tuple[Child, str]:
    """A private redis-server on a free loopback port, persisting nothing."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not on PATH (or pass --redis-url)")
    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="bench-redis-", dir=log_dir)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    argv += ["no", "--dir", data_dir, "--maxclients", "20000"]
    child = Child("redis", argv, log_dir, {})
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    try:
        _wait_until(lambda: bool(client.ping()), "redis-server", 10, child.proc)
    finally:
        client.close()
    return child, url


def start_node(name: str, log_dir: Path, env: Mapping[str, str]) -> tuple[Child, Endpoint]:
    """`presence-svc serve` on a free loopback port; returns once /readyz answers 200."""
    return start_nodes([name], log_dir, env)[0]


def start_nodes(
    names: Sequence[str], log_dir: Path, env: Mapping[str, str]
) -> list[tuple[Child, Endpoint]]:
    """One node per name, started side by side (a node's start-up is mostly imports, seconds
    on a busy machine); returns once every /readyz answers 200, or stops them all and raises."""
    with contextlib.ExitStack() as held:
        # Held together until all are known, so that no two nodes are handed the same port.
        sockets = [held.enter_context(socket.socket()) for _ in names]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        ports: list[int] = [sock.getsockname()[1] for sock in sockets]
    children: list[tuple[Child, Endpoint]] = []
    try:
        for name, port in zip(names, ports, strict=True):
            argv = [sys.executable, "-m", "presence_svc.cli", "serve", "--host", "127.0.0.1"]
            argv += ["--port", str(port), "--log-level", "warning"]
            child = Child(name, argv, log_dir, env)
            children.append((child, Endpoint(name, "127.0.0.1", port, child.pid)))
        for child, endpoint in children:
            ready = functools.partial(_http_ok, f"http://127.0.0.1:{endpoint.port}/readyz")
            _wait_until(ready, child.name, 30, child.proc)
    except BaseException:
        for child, _ in children:
            child.stop()
        raise
    return children


def start_baseline(name: str, log_dir: Path) -> tuple[Child, Endpoint]:
    """The bare Starlette broadcast server (presence_svc.bench.baseline) on a free port."""
    port = free_port()
    argv = [sys.executable, "-m", "presence_svc.bench.baseline", "--port", str(port)]
    child = Child(name, argv, log_dir, {})
    url = f"http://127.0.0.1:{port}/healthz"
    _wait_until(lambda: _http_ok(url), name, 30, child.proc)
    return child, Endpoint(name, "127.0.0.1", port, child.pid)


def start_peer(name: str, log_dir: Path, redis_url: str, channel: str) -> tuple[Child, Endpoint]:
    """The python-socketio peer (presence_svc.bench.peer) on a free port, its AsyncRedisManager
    on `redis_url` and `channel`; returns once it is subscribed and answers /healthz."""
    port = free_port()
    argv = [sys.executable, "-m", "presence_svc.bench.peer", "--port", str(port)]
    argv += ["--redis-url", redis_url, "--channel", channel]
    child = Child(name, argv, log_dir, {})
    url = f"http://127.0.0.1:{port}/healthz"
    _wait_until(lambda: _http_ok(url), name, 30, child.proc)
    return child, Endpoint(name, "127.0.0.1", port, child.pid)


class WorkerPool:
    """Client processes (presence_svc.bench.workers) driven by commands over pipes.

    Spawned, not forked, so that each starts with a clean interpreter and its own event loop.
    """

    def __init__(self, count: int, lifetime: float) -> None:
        from presence_svc.bench.workers import worker_main

        ctx = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for index in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(child, index, lifetime), name=f"bench-client-{index}"
            )
            proc.daemon = True
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    def __len__(self) -> int:
        return len(self._conns)

    @property
    def pids(self) -> dict[str, int | None]:
        return {f"client-{i}": p.pid for i, p in enumerate(self._procs)}

    def send(self, index: int, command: str, **args: Any) -> None:
        self._conns[index].send((command, args))

    def receive(self, index: int, timeout: float) -> Any:
        conn = self._conns[index]
        try:
            if not conn.poll(timeout):
                raise TimeoutError(f"client worker {index} did not answer within {timeout:.0f}s")
            status, value = conn.recv()
        except (EOFError, OSError) as exc:
            proc = self._procs[index]
            proc.join(1)
            raise RuntimeError(f"client worker {index} died (exit code {proc.exitcode})") from exc
        if status != "ok":
            raise RuntimeError(f"client worker {index} failed:\n{value}")
        return value

    def call(self, index: int, command: str, timeout: float, **args: Any) -> Any:
        self.send(index, command, **args)
        return self.receive(index, timeout)

    def call_all(
        self, command: str, timeout: float, per_worker: Sequence[dict[str, Any]]
    ) -> list[Any]:
        """Send each worker its own arguments, then collect every answer."""
        for index, args in enumerate(per_worker):
            self.send(index, command, **args)
        return [self.receive(index, timeout) for index in range(len(per_worker))]

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(Exception):
                conn.send(("quit", {}))
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self._conns:
            conn.close()


def command_stats(client: Any) -> dict[str, int]:
    """Calls per command so far (INFO commandstats), e.g. {'evalsha': 1234}."""
    stats: dict[str, Any] = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def command_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    delta = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in sorted(delta.items()) if v > 0 and k not in ("info", "ping")}


def _code_version() -> str:
    """The commit measured, and whether the service's code differs from it."""
    here = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "presence_svc"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    dirty = [line[3:] for line in changed if line and "presence_svc/bench" not in line]
    return f"{commit} + uncommitted changes in {', '.join(dirty)}" if dirty else commit


def environment(layout: Mapping[str, Any]) -> dict[str, Any]:
    """What these figures were measured on, so that a reader can judge the contention."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = os.cpu_count() or 0
    return {
        "code": _code_version(),
        "cores": cores,
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()),
        "layout": dict(layout),
        "note": (
            f"all processes (nodes, redis, client workers, publisher) share the same {cores} "
            "cores: figures are contended, compare ratios measured in the same run"
        ),
    }
