"""The connection-level limits docs/security.md leaves to the load balancer are in nginx.conf."""

from __future__ import annotations

import re

from tests.deploy.artifacts import DEPLOY, ROOT, nginx_block, seconds

SECTION = "## Limits that belong to the load balancer"


def documented() -> list[list[str]]:
    """The nginx directives of the section's table (its last column), as words."""
    text = (ROOT / "docs" / "security.md").read_text()
    assert SECTION in text
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][2:]
    assert rows, "the section's table has no rows"
    return [code.split() for row in rows for code in re.findall(r"`([^`]+)`", row.split(" | ")[-1])]


def test_nginx_sets_every_limit_the_security_notes_leave_to_it() -> None:
    server = nginx_block((DEPLOY / "nginx.conf").read_text(), "server")
    names = {directive[0] for directive in documented()}
    assert {"client_header_timeout", "keepalive_timeout", "large_client_header_buffers"} <= names
    for directive in documented():
        assert directive in server, f"{' '.join(directive)} is not in deploy/nginx.conf's server"


def test_nginx_header_limits_match_the_nodes() -> None:
    server = nginx_block((DEPLOY / "nginx.conf").read_text(), "server")
    values = {d[0]: d[1:] for d in server}
    assert seconds(values["client_header_timeout"][0]) <= 30
    # The node stops a handshake line at 8 KiB: nginx must not accept longer ones silently.
    count, size = values["large_client_header_buffers"]
    assert size in {"8k", "8192"} and int(count) >= 2
