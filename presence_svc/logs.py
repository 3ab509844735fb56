"""Log hygiene and format: bearer tokens never reach a log line; text or JSON lines.

Browsers pass the WebSocket token as `?token=`, which uvicorn would otherwise print in its
access lines (`uvicorn.access` for HTTP, `uvicorn.error` for WebSocket handshakes).

JSON lines (`PRESENCE_LOG_FORMAT=json`, set by the container image) are for log shippers: one
object per line, carrying the request or connection id of the request or socket being handled.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Literal

from presence_svc import requestid

_TOKEN_PARAM = re.compile(r"(?<=[?&]token=)[^&\s\"']+")
REDACTED = "[redacted]"
LOGGERS = ("uvicorn.access", "uvicorn.error", "presence_svc")


def redact(text: str) -> str:
    """`text` with the value of every `token=` query parameter replaced."""
    return _TOKEN_PARAM.sub(REDACTED, text)


class RedactTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg, args = record.msg, record.args
        if not isinstance(msg, str):
            return True
        if not args:
            record.msg = redact(msg)
            return True
        # `msg` is a format string: its `%s` must survive, so arguments are redacted one by one
        # (which keeps uvicorn's access arguments a tuple its formatter can unpack).
        if isinstance(args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in args)
        if "token=" in msg or not isinstance(args, tuple):
            # The value may be an argument ("token=%s"), or hide in a mapping: redact the
            # formatted message instead.
            try:
                message = record.getMessage()
            except (TypeError, ValueError, KeyError):
                return True  # the handler reports the broken call; nothing to leak yet
            record.msg, record.args = redact(message), ()
        return True


def install_redaction() -> None:
    """Attach the filter to the loggers that may see request URLs (idempotent)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())


# --- formats -----------------------------------------------------------------------------------

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# uvicorn's loggers: in json they lose their own handlers and go through the root's formatter.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def _timestamp(record: logging.LogRecord) -> str:
    """ISO-8601 UTC with milliseconds, e.g. 2025-01-31T09:26:53.123Z."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except (TypeError, ValueError, KeyError):
        # The stdlib would print a multi-line "Logging error" report: not a JSON line.
        return f"{record.msg} (unformattable arguments: {record.args!r})"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (JSON escapes any newline in the message).

    `node_id` is asked on every line because a node re-registers under a new id after it was
    declared dead.
    """

    def __init__(self, node_id: Callable[[], str | None] | None = None) -> None:
        super().__init__()
        self._node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            # Redacted here too: a record logged on a child logger (presence_svc.web.ws) skips the
            # parent's filter.
            "msg": redact(_message(record)),
        }
        node = self._node_id() if self._node_id is not None else None
        if node:
            line["node"] = node
        ids = requestid.current()
        if ids is not None:
            line[ids[0]] = ids[1]
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            # uvicorn's access call: (client, method, path with query, HTTP version, status).
            client, method, path, _, status = args
            line["method"] = method
            line["path"] = redact(str(path))
            line["status"] = status
            line["client"] = client
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exc"] = redact(record.exc_text)
        if record.stack_info:
            line["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(line, default=str)


class _RedactingFormatter(logging.Formatter):
    # On the root handler, unlike a logger filter, it sees records of child loggers too, and
    # the traceback as well as the message.
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("presence_svc").critical("uncaught exception", exc_info=(kind, exc, tb))


def configure_logging(
    fmt: LogFormat, level: str, node_id: Callable[[], str | None] | None = None
) -> None:
    """Route every log record to one stderr handler in `fmt`, at `level` and above.

    In `text`, uvicorn keeps its own (coloured) handlers, as it configures them itself. In
    `json`, its loggers propagate to the root handler instead, so uvicorn must then be started
    with `log_config=None`; warnings and uncaught exceptions become JSON lines too, so that
    nothing else reaches stderr.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(node_id))
    else:
        handler.setFormatter(_RedactingFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if fmt == "json":
        for name in UVICORN_LOGGERS:
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
