"""Logs: tokens never reach them (filter, formatters, a real node's access lines); the JSON
format, its settings, and a real node logging JSON with request and connection ids."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from presence_svc.logs import (
    REDACTED,
    UVICORN_LOGGERS,
    JsonFormatter,
    RedactTokens,
    configure_logging,
    redact,
)
from presence_svc.settings import DEV_JWT_SECRET, SettingsError, load_settings
from tests.support import auth as support_auth
from tests.support.processes import NodeProcess

ISO_MS_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


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


@pytest.mark.parametrize(
    ("msg", "args"),
    [
        ("open /ws?study_id=s1&token=%s", ("a.b.c",)),  # the value is an argument
        ("open %(url)s", ({"url": "/ws?token=a.b.c"},)),  # a mapping of arguments
    ],
)
def test_the_filter_redacts_values_that_are_arguments(msg: str, args: Any) -> None:
    rec = logging.LogRecord("presence_svc", logging.INFO, __file__, 1, msg, args, None)
    assert RedactTokens().filter(rec)
    assert "a.b.c" not in rec.getMessage()
    assert f"token={REDACTED}" in rec.getMessage()


def test_the_filter_keeps_uvicorns_access_arguments() -> None:
    # uvicorn's text AccessFormatter unpacks them; the JSON formatter reads them.
    args = ("1.2.3.4:5", "GET", "/presence/s1?token=a.b.c", "1.1", 200)
    rec = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None
    )
    assert RedactTokens().filter(rec)
    assert rec.args == ("1.2.3.4:5", "GET", f"/presence/s1?token={REDACTED}", "1.1", 200)


async def test_a_node_logs_no_token(tmp_path: Path) -> None:
    # The embedded mode needs no Redis: enough to see what uvicorn logs for a handshake.
    clean = {k: "" for k in os.environ if k.startswith("PRESENCE_")}
    node = NodeProcess(clean, tmp_path, log_level="info").start()
    token = support_auth.token("alice", secret=DEV_JWT_SECRET)
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


# --- the JSON formatter --------------------------------------------------------------------------


def record(
    msg: str,
    args: tuple[object, ...] = (),
    name: str = "presence_svc.web.ws",
    level: int = logging.INFO,
    exc_info: Any = None,
) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)


def as_json(rec: logging.LogRecord, node: str | None = None) -> dict[str, Any]:
    text = JsonFormatter(lambda: node).format(rec)
    assert "\n" not in text
    line: dict[str, Any] = json.loads(text)
    return line


def test_json_fields() -> None:
    rec = record("user %s joined %s", ("alice", "s1"), level=logging.WARNING)
    rec.created = 1_700_000_000.25
    rec.msecs = 250.0
    line = as_json(rec, node="n-1")
    assert line == {
        "ts": "2023-11-14T22:13:20.250Z",
        "level": "WARNING",
        "logger": "presence_svc.web.ws",
        "msg": "user alice joined s1",
        "node": "n-1",
    }


def test_json_timestamp_is_the_records_time_in_utc() -> None:
    rec = record("now")
    ts = as_json(rec)["ts"]
    assert ISO_MS_Z.match(ts), ts
    parsed = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(parsed.timestamp() - rec.created) < 0.001


def test_json_omits_what_is_unknown() -> None:
    # No node yet (start-up), no request or connection (a background task).
    line = as_json(record("sweep"))
    assert set(line) == {"ts", "level", "logger", "msg"}


def test_json_redacts_message_and_arguments() -> None:
    # A child logger: the filter on `presence_svc` never sees its records.
    rec = record('"WebSocket %s" token=%s', ("/ws?study_id=s1&token=a.b.c", "x"))
    rec.msg = "GET /x?token=t.o.k " + rec.msg
    line = as_json(rec)
    assert "a.b.c" not in line["msg"]
    assert "t.o.k" not in line["msg"]
    assert f"/ws?study_id=s1&token={REDACTED}" in line["msg"]


def test_json_keeps_a_multi_line_message_on_one_line() -> None:
    assert as_json(record("first\nsecond"))["msg"] == "first\nsecond"


def test_json_exception() -> None:
    try:
        raise ValueError("bad url /ws?token=s.e.cret")
    except ValueError:
        rec = record("heartbeat failed", level=logging.ERROR, exc_info=sys.exc_info())
    line = as_json(rec)
    assert line["msg"] == "heartbeat failed"
    assert line["exc"].startswith("Traceback (most recent call last):")
    assert f"ValueError: bad url /ws?token={REDACTED}" in line["exc"]
    assert "s.e.cret" not in line["exc"]


def test_json_access_line() -> None:
    args = ("10.0.0.7:5123", "GET", "/presence/s1?token=a.b.c", "1.1", 200)
    line = as_json(record('%s - "%s %s HTTP/%s" %d', args, name="uvicorn.access"))
    assert line["method"] == "GET"
    assert line["path"] == f"/presence/s1?token={REDACTED}"
    assert line["status"] == 200
    assert line["client"] == "10.0.0.7:5123"
    assert line["msg"] == f'10.0.0.7:5123 - "GET /presence/s1?token={REDACTED} HTTP/1.1" 200'


# --- configure_logging ---------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back."""
    root = logging.getLogger()
    root_handlers, root_level = root.handlers[:], root.level
    saved = {
        name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate)
        for name in UVICORN_LOGGERS
    }
    hook = sys.excepthook
    try:
        yield
    finally:
        root.handlers[:] = root_handlers
        root.setLevel(root_level)
        for name, (handlers, propagate) in saved.items():
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).propagate = propagate
        logging.captureWarnings(False)
        sys.excepthook = hook


def test_text_format_redacts_records_of_child_loggers(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("text", "info")
    logging.getLogger("presence_svc.web.ws").info("open /ws?token=%s", "a.b.c")
    logging.getLogger("presence_svc.web.ws").debug("below the level")
    err = capsys.readouterr().err
    assert f"INFO presence_svc.web.ws: open /ws?token={REDACTED}" in err
    assert "a.b.c" not in err
    assert "below the level" not in err


def test_json_format_routes_uvicorn_and_uncaught_exceptions_through_it(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logging.getLogger("uvicorn.access").addHandler(logging.StreamHandler(io.StringIO()))
    configure_logging("json", "debug", node_id=lambda: "n-9")
    for name in UVICORN_LOGGERS:
        assert logging.getLogger(name).handlers == []
        assert logging.getLogger(name).propagate
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    try:
        raise RuntimeError("crash")
    except RuntimeError as exc:
        sys.excepthook(RuntimeError, exc, exc.__traceback__)
    started, crash = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert started["logger"] == "uvicorn.error"
    assert started["msg"] == "Started server process [42]"
    assert started["node"] == "n-9"
    assert crash["level"] == "CRITICAL"
    assert "RuntimeError: crash" in crash["exc"]


# --- settings ------------------------------------------------------------------------------------


@pytest.fixture
def no_presence_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("PRESENCE_"):
            monkeypatch.delenv(name)


def test_log_settings_default_to_text_and_info(no_presence_env: None) -> None:
    settings = load_settings()
    assert (settings.log_format, settings.log_level) == ("text", "info")


@pytest.mark.parametrize(
    ("fmt", "level", "expected"),
    [
        ("json", "debug", ("json", "debug")),
        (" JSON ", "WARNING", ("json", "warning")),
        ("", "", ("text", "info")),
    ],
)
def test_log_settings_from_the_environment(
    no_presence_env: None,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
    level: str,
    expected: tuple[str, str],
) -> None:
    monkeypatch.setenv("PRESENCE_LOG_FORMAT", fmt)
    monkeypatch.setenv("PRESENCE_LOG_LEVEL", level)
    settings = load_settings()
    assert (settings.log_format, settings.log_level) == expected


@pytest.mark.parametrize(
    ("name", "value"), [("PRESENCE_LOG_FORMAT", "xml"), ("PRESENCE_LOG_LEVEL", "loud")]
)
def test_invalid_log_settings_are_named(
    no_presence_env: None, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings()


def test_an_invalid_log_format_stops_the_node() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
    result = subprocess.run(
        [sys.executable, "-m", "presence_svc.cli", "serve", "--port", "1"],
        env={**clean, "PRESENCE_LOG_FORMAT": "xml"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "PRESENCE_LOG_FORMAT" in result.stderr


# --- a real node in json -------------------------------------------------------------------------


async def test_a_json_node_logs_json_lines_with_request_and_connection_ids(
    tmp_path: Path,
) -> None:
    clean = {k: "" for k in os.environ if k.startswith("PRESENCE_")}
    node = NodeProcess({**clean, "PRESENCE_LOG_FORMAT": "json"}, tmp_path, log_level="info")
    node.start()
    token = support_auth.token("alice", secret=DEV_JWT_SECRET)
    try:
        async with httpx.AsyncClient() as http:
            response = await http.get(
                f"{node.base_url}/presence/s1?token={token}",
                headers={"X-Request-ID": "e2e-req-1", "Authorization": f"Bearer {token}"},
            )
        async with connect(f"{node.ws_url}/ws/presence?study_id=s1&token={token}") as ws:
            await ws.recv()
    finally:
        node.stop()
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "e2e-req-1"
    text = node.log_text()
    assert token.split(".")[2] not in text
    # stdout and stderr both: every line, uvicorn's included, is one JSON object.
    lines = [json.loads(raw) for raw in text.splitlines()]
    assert lines
    for line in lines:
        assert {"ts", "level", "logger", "msg"} <= set(line), line
        assert ISO_MS_Z.match(line["ts"])
    [access] = [line for line in lines if line.get("request_id") == "e2e-req-1"]
    assert access["logger"] == "uvicorn.access"
    assert access["method"] == "GET"
    assert access["path"] == f"/presence/s1?token={REDACTED}"
    assert access["status"] == 200
    assert access["node"]
    [ready] = [line for line in lines if line["msg"].startswith("node ")]
    assert ready["msg"].startswith(f"node {access['node']} ready")
    [accepted] = [line for line in lines if "[accepted]" in line["msg"]]
    assert accepted["logger"] == "uvicorn.error"
    assert f"token={REDACTED}" in accepted["msg"]
    assert re.fullmatch(r"[0-9a-f]{32}", accepted["connection_id"])
    assert "request_id" not in accepted
