"""Logs for every service: structured JSON, one event per line, no secrets.

`configure_logging(service, level)` installs a JSON formatter on the root logger.
Extra fields passed with `logger.info("...", extra={"tenant_id": ...})` are
emitted as top-level keys. Messages must never carry keys, tokens or prompt
text; log identifiers (tenant, session, response ids) instead. A line logged
while a span is current (tracing on, see `switchboard.telemetry.tracing`) carries its
`trace_id` and `span_id`, so a log search can jump to the trace and back.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
from opentelemetry import trace

# LogRecord attributes that are not user-supplied `extra` fields.
# uvicorn adds `color_message` and the protocol object `websocket` to its records.
_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {
    "message",
    "asctime",
    "color_message",
    "websocket",
}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                event[key] = value
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            event["trace_id"] = format(span.trace_id, "032x")
            event["span_id"] = format(span.span_id, "016x")
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(event, default=str).decode()


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send every log record to stderr as one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn would otherwise print a request line, with its URL, per request.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


class RateLimitedLog:
    """One kind of expected, client-caused line (a refused handshake), logged at
    `info` at most `per_second` times a second; the next line logged says how
    many were left out (`left_out`), so a flood costs a few lines, not one per
    request."""

    def __init__(
        self,
        logger: logging.Logger,
        per_second: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.per_second = per_second
        self._clock = clock
        self._window = -1.0
        self._count = 0
        self.left_out = 0

    def info(self, message: str, **extra: Any) -> None:
        now = self._clock()
        if now - self._window >= 1.0:
            self._window, self._count = now, 0
        if self._count >= self.per_second:
            self.left_out += 1
            return
        self._count += 1
        if self.left_out:
            extra["left_out"] = self.left_out
            self.left_out = 0
        self.logger.info(message, extra=extra)
