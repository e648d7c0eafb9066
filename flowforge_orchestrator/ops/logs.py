"""Logging: JSON lines for log collectors, readable text on a terminal.

`configure_logging()` installs one handler on the root logger. Each record carries, when
known, the run id, step id, attempt and trace id, from three places (first wins):

1. `extra=` of the call: `log.info("...", extra={"run_id": str(run_id)})`;
2. the context of the current task, set with `with log_context(run_id=..., step_id=...):`
   (a worker wraps each attempt in one; asyncio copies it into tasks started inside);
3. the current OpenTelemetry span, for `trace_id` and `span_id`.

In JSON every other `extra=` field is kept too; values that are not JSON become strings.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TextIO

from opentelemetry import trace

from flowforge_orchestrator.errors import ConfigError

__all__ = [
    "CONTEXT_FIELDS",
    "ContextFilter",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "log_context",
]

# In this order in every line; the text form shows the first four.
CONTEXT_FIELDS = ("run_id", "step_id", "attempt", "attempt_id", "workflow", "trace_id", "span_id")
_TEXT_FIELDS = ("run_id", "step_id", "attempt", "trace_id")
_NOISY = ("arq", "httpx", "httpcore", "asyncio")

_EMPTY: Mapping[str, object] = MappingProxyType({})
_context: ContextVar[Mapping[str, object]] = ContextVar("flowforge_log_context", default=_EMPTY)

# Attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Add fields (None values are skipped) to every record logged inside the block."""
    added = {key: value for key, value in fields.items() if value is not None}
    token = _context.set(MappingProxyType({**_context.get(), **added}))
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Copy the task's log context and the current span's ids onto each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):  # an explicit extra= wins
                setattr(record, key, value)
        if not hasattr(record, "trace_id"):
            span = trace.get_current_span().get_span_context()
            if span.is_valid:
                record.trace_id = trace.format_trace_id(span.trace_id)
                record.span_id = trace.format_span_id(span.span_id)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message [run_id=... step_id=... attempt=...]` for people."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = [
            f"{key}={getattr(record, key)}"
            for key in _TEXT_FIELDS
            if getattr(record, key, None) is not None
        ]
        return f"{text} [{' '.join(fields)}]" if fields else text


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours, so that configuring again replaces it and leaves other handlers alone."""


def _level(level: int | str) -> int:
    if isinstance(level, int):
        return level
    levels = logging.getLevelNamesMapping()
    try:
        return levels[level.strip().upper()]
    except KeyError:
        raise ConfigError(
            f"unknown log level {level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL"
        ) from None


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def configure_logging(
    level: int | str = "INFO", *, json: bool | None = None, stream: TextIO | None = None
) -> logging.Handler:
    """Log to `stream` (stderr) at `level`: JSON lines, or text when `json` is False.

    `json=None` decides by the stream: text on a terminal, JSON otherwise (a service
    manager, a container runtime, a pipe). Safe to call again: it replaces its own handler.
    """
    stream = stream or sys.stderr
    as_json = not _is_terminal(stream) if json is None else json
    handler = _Handler(stream)
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    number = _level(level)
    root.setLevel(number)
    for name in _NOISY:  # their INFO is per request or per job: too much for a daemon
        logging.getLogger(name).setLevel(max(number, logging.WARNING))
    return handler
