"""Tokens never reach the logs: the filter, and a real node's access lines."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from presence_svc.auth import issue_token
from presence_svc.logs import REDACTED, RedactTokens, redact
from presence_svc.settings import DEV_JWT_SECRET
from tests.support.processes import NodeProcess


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("/ws/presence?token=abc.def.ghi", f"/ws/presence?token={REDACTED}"),
        ("/ws?study_id=s1&token=a.b.c&x=1", f"/ws?study_id=s1&token={REDACTED}&x=1"),
        ('"WebSocket /ws?token=a.b.c" [accepted]', f'"WebSocket /ws?token={REDACTED}" [accepted]'),
        ("/presence/s1?mytoken=keep", "/presence/s1?mytoken=keep"),
        ("no query at all", "no query at all"),
    ],
)
def test_redact(line: str, expected: str) -> None:
    assert redact(line) == expected


def test_the_filter_rewrites_message_and_arguments() -> None:
    record = logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        __file__,
        1,
        '%s - "WebSocket %s"',
        ("1.2.3.4", "/ws?token=t.o.k"),
        None,
    )
    assert RedactTokens().filter(record)
    assert record.getMessage() == f'1.2.3.4 - "WebSocket /ws?token={REDACTED}"'


async def test_a_node_logs_no_token(tmp_path: Path) -> None:
    # The embedded mode needs no Redis: enough to see what uvicorn logs for a handshake.
    clean = {k: "" for k in os.environ if k.startswith("PRESENCE_")}
    node = NodeProcess(clean, tmp_path, log_level="info").start()
    token = issue_token("alice", DEV_JWT_SECRET)
    try:
        async with connect(f"{node.ws_url}/ws/presence?study_id=s1&token={token}") as ws:
            await ws.recv()
        async with httpx.AsyncClient() as http:
            await http.get(f"{node.base_url}/presence/s1?token={token}")
    finally:
        node.stop()
    log = node.log_text()
    assert "WebSocket /ws/presence?study_id=s1&token=[redacted]" in log
    assert "/presence/s1?token=[redacted]" in log
    assert token not in log
    assert token.split(".")[2] not in log
