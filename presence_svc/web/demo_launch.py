"""`make demo`: start nodes serving the demo page and print the URLs to open.

Two nodes on the local Redis (127.0.0.1:6379) under a fresh key prefix when one answers there,
else one node on the embedded store. Each demo URL carries its user's token in the fragment,
which the browser never sends to the server. Ctrl-C stops the nodes (and deletes the keys of
the prefix).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Sequence

import redis

from presence_svc.auth import ADMIN_SCOPE, ALL_STUDIES, issue_token
from presence_svc.settings import DEV_JWT_SECRET

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
TOKEN_TTL = 8 * 3600
STUDY = "demo-study"


def _local_redis_answers() -> bool:
    client = redis.Redis.from_url(LOCAL_REDIS, socket_connect_timeout=0.3, socket_timeout=0.3)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _start(port: int, env: dict[str, str], host: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "presence_svc.cli", "serve", "--host", host]
    return subprocess.Popen([*command, "--port", str(port)], env={**os.environ, **env})


def _wait_ready(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the node at {base} did not start")


def _urls(bases: list[str], secret: str) -> list[str]:
    lines = []
    others = {base: [base, *[each for each in bases if each != base]] for base in bases}
    for index, user in enumerate(["alice", "bob"]):
        base = bases[index % len(bases)]
        signed = issue_token(user, secret, ttl=TOKEN_TTL, studies=[STUDY])
        fragment = f"token={signed}&study={STUDY}&urls={','.join(others[base])}"
        lines.append(f"  {user}: {base}/demo#{fragment}")
    admin = issue_token("operator", secret, ttl=TOKEN_TTL, studies=ALL_STUDIES, scope=ADMIN_SCOPE)
    lines.append(f"  dashboard: {bases[0]}/dashboard#token={admin}")
    return lines


def _delete_prefix(prefix: str) -> None:
    client = redis.Redis.from_url(LOCAL_REDIS)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    env = {"PRESENCE_DEMO": "true", "PRESENCE_DASHBOARD": "true"}
    prefix = None
    if _local_redis_answers():
        prefix = f"demo-{uuid.uuid4().hex[:8]}"
        secret = secrets.token_hex(32)
        env |= {
            "PRESENCE_REDIS_URL": LOCAL_REDIS,
            "PRESENCE_KEY_PREFIX": prefix,
            "PRESENCE_JWT_SECRET": secret,
        }
        ports = [args.port, args.port + 1]
        print(f"two nodes on the local Redis, key prefix {prefix!r}")
    else:
        secret = DEV_JWT_SECRET
        env["PRESENCE_REDIS_URL"] = ""
        ports = [args.port]
        print("no Redis on 127.0.0.1:6379: one node on the embedded store")
    # A SIGTERM (a supervisor, `timeout`) stops the nodes like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    procs = [_start(port, env, args.host) for port in ports]
    try:
        bases = [f"http://{args.host}:{port}" for port in ports]
        for base, proc in zip(bases, procs, strict=True):
            _wait_ready(base, proc)
        print("open these in two browser windows (each user sees the other's cursor):")
        print("\n".join(_urls(bases, secret)), flush=True)
        while all(proc.poll() is None for proc in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)
        if prefix is not None:
            _delete_prefix(prefix)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
