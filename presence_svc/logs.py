"""Log hygiene: bearer tokens never reach a log line.

Browsers pass the WebSocket token as `?token=`, which uvicorn would otherwise print in its
access lines (`uvicorn.access` for HTTP, `uvicorn.error` for WebSocket handshakes).
"""

from __future__ import annotations

import logging
import re

_TOKEN_PARAM = re.compile(r"(?<=[?&]token=)[^&\s\"']+")
REDACTED = "[redacted]"
LOGGERS = ("uvicorn.access", "uvicorn.error", "presence_svc")


def redact(text: str) -> str:
    """`text` with the value of every `token=` query parameter replaced."""
    return _TOKEN_PARAM.sub(REDACTED, text)


class RedactTokens(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def install_redaction() -> None:
    """Attach the filter to the loggers that may see request URLs (idempotent)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
