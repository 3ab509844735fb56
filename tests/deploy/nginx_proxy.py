"""A real nginx on loopback running deploy/nginx.conf, with its servers swapped for test nodes.

The config is the repository's, rewritten only where a test must differ: the upstream servers
(the compose service names become loopback nodes), the listen address, the log and temporary
paths (under a folder of the test's), and `daemon off;` with a pid file of its own. Each rewrite
must match, so a change of nginx.conf's shape fails here instead of testing something else.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.deploy.artifacts import DEPLOY
from tests.support.processes import free_port, terminate, wait_ready

NGINX = "/usr/sbin/nginx"
SOURCE = DEPLOY / "nginx.conf"
_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def _sub_once(pattern: str, replacement: str, text: str, flags: int = 0) -> str:
    result, count = re.subn(pattern, replacement, text, flags=flags)
    assert count >= 1, f"deploy/nginx.conf no longer has {pattern!r}"
    return result


def _with_servers(upstream: str, servers: list[str]) -> str:
    """An upstream block's `server` lines replaced by `servers`, with the first one's options."""
    lines = re.findall(r"^( *)server +\S+( [^;]*)?;\n", upstream, flags=re.M)
    assert lines, "an upstream without server lines"
    indent, options = lines[0]
    replacement = "".join(f"{indent}server {server}{options};\n" for server in servers)
    first = re.search(r"^ *server +\S+[^;]*;\n", upstream, flags=re.M)
    assert first is not None
    body = re.sub(r"^ *server +\S+[^;]*;\n", "", upstream, flags=re.M)
    return body[: first.start()] + replacement + body[first.start() :]


def loopback_config(
    servers: list[str], port: int, folder: Path, *, affinity: bool = True, text: str | None = None
) -> str:
    """deploy/nginx.conf for `servers` on 127.0.0.1:`port`; without affinity its `hash` lines
    are dropped (nginx's default round-robin for WebSockets too, the baseline to compare)."""
    conf = SOURCE.read_text() if text is None else text
    conf = re.sub(
        r"upstream \w+ \{.*?\n    \}",
        lambda m: _with_servers(m.group(0), servers),
        conf,
        flags=re.S,
    )
    if not affinity:
        conf = _sub_once(r"^ *hash \$arg_study_id consistent;\n", "", conf, flags=re.M)
    conf = _sub_once(r"listen 8080;", f"listen 127.0.0.1:{port};", conf)
    conf = _sub_once(r"access_log /dev/stdout ", f"access_log {folder}/access.log ", conf)
    conf = _sub_once(r"error_log /dev/stderr crit;", f"error_log {folder}/error.log warn;", conf)
    temp = "".join(f"    {name}_temp_path {folder}/{name};\n" for name in _TEMP_PATHS)
    conf = _sub_once(r"^http \{\n", "http {\n" + temp, conf, flags=re.M)
    # As root, nginx would hand its workers to an unprivileged user; keep the current one.
    user = f"user {pwd.getpwuid(os.getuid()).pw_name};\n" if os.getuid() == 0 else ""
    return f"daemon off;\npid {folder}/nginx.pid;\n{user}" + conf


class NginxProxy:
    """nginx in the foreground on a free loopback port, in front of `servers`."""

    def __init__(self, servers: list[str], folder: Path, *, affinity: bool = True) -> None:
        if not Path(NGINX).is_file():
            pytest.skip(f"needs nginx at {NGINX}: apt-get install nginx (Debian's `nginx` package)")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "nginx.conf"
        self.conf.write_text(loopback_config(servers, self.port, folder, affinity=affinity))
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NginxProxy:
        argv = [NGINX, "-p", str(self.folder), "-e", str(self.folder / "error.log")]
        check = subprocess.run([*argv, "-t", "-c", str(self.conf)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self._proc = subprocess.Popen(
            [*argv, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def healthy() -> bool:
            return httpx.get(f"{self.base_url}/lb-health", timeout=0.5).status_code == 200

        wait_ready(healthy, "nginx", 10, self._proc)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            terminate(self._proc, 10)

    def error_log(self) -> str:
        path = self.folder / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""
