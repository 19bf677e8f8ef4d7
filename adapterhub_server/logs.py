"""Process-wide logging: plain text for people, one JSON object per line for log shippers.

Every record carries the id of the HTTP request being served (`request_id`), read from a
context variable that the API's request-id middleware sets, so that all lines of one request
can be found together, whatever module wrote them. Work handed to other threads through
anyio or `contextvars.copy_context` keeps the id; the engine thread serves many requests at
once and has none.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]

TRACE = 5
"""uvicorn's `trace` level, below DEBUG."""

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"

_request_id: ContextVar[str | None] = ContextVar("adapterhub_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is
# written out as its own JSON field.
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "taskName",
}


def current_request_id() -> str | None:
    """The id of the request this code runs for, or None outside a request."""
    return _request_id.get()


@contextmanager
def request_id_context(request_id: str) -> Iterator[None]:
    """Tag every log record written inside the block with `request_id`."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` (None outside a request) unless the caller passed one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _request_id.get()
        return True


class TextFormatter(logging.Formatter):
    """`2025-01-01 12:00:00,000 INFO adapterhub_server.x [req-id] message`."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # "-" outside a request, without writing it into the record other handlers share.
        values = {**record.__dict__, "request_id": getattr(record, "request_id", None) or "-"}
        return _TEXT_FORMAT % values


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, exc_info, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        # default=str: an extra that JSON cannot encode must not lose the whole line.
        return json.dumps(entry, ensure_ascii=False, default=str)


def parse_level(level: str | int) -> int:
    """`"info"`, `"WARNING"`, `"trace"` or a number -> a logging level number."""
    if isinstance(level, int):
        return level
    name = level.strip().upper()
    if name == "TRACE":
        return TRACE
    number = logging.getLevelName(name)
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}")
    return number


def configure_logging(
    level: str | int = "info", fmt: LogFormat = "text", *, stream: TextIO | None = None
) -> logging.Handler:
    """Send every logger's records to `stream` (stderr) in `fmt`, at `level` and above.

    Replaces the root handler this function installed before (calling it twice does not
    duplicate lines) and leaves other handlers alone. For uvicorn's own lines to follow the
    same format, run uvicorn with `log_config=None` so that it does not install its own.
    """
    if fmt not in ("text", "json"):
        raise ValueError("log format must be text or json")
    logging.addLevelName(TRACE, "TRACE")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(parse_level(level))
    return handler


_HANDLER_NAME = "adapterhub"
