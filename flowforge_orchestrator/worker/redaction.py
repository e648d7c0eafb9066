"""Redaction: a worker's secret values never leave it, in any form it can foresee.

Before a result is written (output, error message, error details, snippets of response
bodies) and before a log line is emitted, every occurrence of every secret value
(`FLOWFORGE_SECRET_*`) and of the attempt's credential headers (`Authorization`,
`Proxy-Authorization`, `Cookie`) is replaced by `[REDACTED]`: the raw value, its
percent-encoded forms (either case of hex digits), and its JSON-escaped form. A server that
echoes the request, an error that quotes a URL holding a secret, a step that returns what it
was given: none of it reaches PostgreSQL, the outbox or the logs with the secret in it.

Values shorter than `MIN_SECRET_LENGTH` cannot be redacted without mangling ordinary text
(and are too weak to be secrets): a worker refuses to start with one; a credential header
that short is left alone.

Pure: no I/O.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any
from urllib.parse import quote, quote_plus

from flowforge_orchestrator.errors import ConfigError

__all__ = [
    "MIN_SECRET_LENGTH",
    "REDACTED",
    "SENSITIVE_HEADERS",
    "RedactingFilter",
    "Redactor",
    "attempt_redaction",
    "check_secrets",
    "credential_values",
    "redact_logs",
]

REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 8
SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


def check_secrets(secrets: Mapping[str, str]) -> None:
    """Refuse secret values too short to redact; the error names the variable, never the
    value."""
    short = sorted(name for name, value in secrets.items() if len(value) < MIN_SECRET_LENGTH)
    if short:
        names = ", ".join(f"FLOWFORGE_SECRET_{name}" for name in short)
        raise ConfigError(
            f"{names}: a secret value needs at least {MIN_SECRET_LENGTH} characters, or it "
            "cannot be redacted from outputs, errors and logs without mangling them"
        )


def credential_values(params: object) -> list[str]:
    """The values an attempt sends as credentials: its `Authorization`, `Proxy-Authorization`
    and `Cookie` headers, their credentials without the scheme (`Bearer xyz` -> `xyz`), and
    each cookie's value."""
    headers = params.get("headers") if isinstance(params, Mapping) else None
    if not isinstance(headers, Mapping):
        return []
    found: list[str] = []
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            continue
        if name.lower() not in SENSITIVE_HEADERS:
            continue
        found.append(value)
        if name.lower() == "cookie":
            found += [part.partition("=")[2].strip() for part in value.split(";")]
        else:
            found.append(value.partition(" ")[2].strip())
    return [v for v in found if len(v) >= MIN_SECRET_LENGTH]


def _percent_pattern(encoded: str) -> str:
    """A pattern for a percent-encoded text whose hex digits may be either case."""
    parts = re.split(r"(%[0-9A-F]{2})", encoded)
    out = []
    for part in parts:
        if re.fullmatch(r"%[0-9A-F]{2}", part):
            out.append("%" + "".join(f"[{c}{c.lower()}]" if c.isalpha() else c for c in part[1:]))
        else:
            out.append(re.escape(part))
    return "".join(out)


def _patterns(value: str) -> set[str]:
    found = {re.escape(value), re.escape(json.dumps(value)[1:-1])}
    for encoded in (quote(value, safe=""), quote(value), quote_plus(value)):
        found.add(_percent_pattern(encoded))
    return found


class Redactor:
    """Replaces every form of a set of values by `[REDACTED]` in texts and JSON values."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self.values = frozenset(v for v in values if len(v) >= MIN_SECRET_LENGTH)
        patterns = sorted({p for v in self.values for p in _patterns(v)}, key=len, reverse=True)
        # Longest first: at each position the fullest form is the one replaced.
        self._regex = re.compile("|".join(patterns)) if patterns else None

    @property
    def empty(self) -> bool:
        return self._regex is None

    def with_values(self, more: Iterable[str]) -> Redactor:
        """This redactor plus `more` (an attempt's credential headers)."""
        extra = frozenset(more) - self.values
        return Redactor(self.values | extra) if extra else self

    def text(self, text: str) -> str:
        if self._regex is None:
            return text
        return self._regex.sub(REDACTED, text)

    def value(self, value: Any) -> Any:
        """A copy of a JSON value with every string (keys included) redacted. Nesting is
        bounded by the caller (RecursionError past Python's limit)."""
        if self._regex is None:
            return value
        return self._value(value)

    def _value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._regex.sub(REDACTED, value) if self._regex else value
        if isinstance(value, dict):
            return {self._value(k): self._value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._value(v) for v in value]
        return value


# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}

_attempt: ContextVar[Redactor | None] = ContextVar("flowforge_redactor", default=None)


@contextmanager
def attempt_redaction(redactor: Redactor) -> Iterator[None]:
    """Inside the block (and the tasks it starts), log records are redacted with `redactor`
    (an attempt's own, which knows its credential headers)."""
    token = _attempt.set(redactor)
    try:
        yield
    finally:
        _attempt.reset(token)


class RedactingFilter(logging.Filter):
    """A handler filter that redacts each record's message, exception text and extra
    string fields, with the current attempt's redactor or else the process's."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = _attempt.get() or self.redactor
        if redactor.empty:
            return True
        try:
            record.msg = redactor.text(record.getMessage())
            record.args = None
        except Exception:  # a record that cannot be formatted: the handler reports it
            return True
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redactor.text(record.exc_text)
        if record.stack_info:
            record.stack_info = redactor.text(record.stack_info)
        for key, value in list(vars(record).items()):
            if isinstance(value, str) and key not in _STANDARD:
                setattr(record, key, redactor.text(value))
        return True


def redact_logs(redactor: Redactor) -> Callable[[], None]:
    """Redact every record that reaches the root logger's handlers (the process's values,
    or inside `attempt_redaction` the attempt's); returns what stops it."""
    redacting = RedactingFilter(redactor)
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(redacting)

    def stop() -> None:
        for handler in handlers:
            handler.removeFilter(redacting)

    return stop
