"""Exit codes, and the one line a command prints instead of a traceback.

| code | meaning |
| --- | --- |
| 0 | done |
| 1 | what was asked about is not well (a run that did not complete, a `doctor` finding) |
| 2 | a usage or settings error, or a run, definition or workflow that is not there |
| 3 | PostgreSQL or Redis cannot be used: unreachable, refused us, or lacks the schema |
| 4 | gave up waiting (`--timeout`) for a run that is still going |
| 70 | a bug: an unexpected error (`--debug` shows its traceback) |
| 130 | interrupted (Ctrl-C) |
"""

from __future__ import annotations

from redis.exceptions import AuthenticationError, RedisError

from flowforge_orchestrator.errors import FlowForgeError, ServiceUnavailable, WaitTimedOut
from flowforge_orchestrator.store.failures import describe_database_failure

__all__ = [
    "EXIT_INTERNAL",
    "EXIT_NOT_WELL",
    "EXIT_OK",
    "EXIT_TIMED_OUT",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "explain",
]

EXIT_OK = 0
EXIT_NOT_WELL = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_TIMED_OUT = 4
EXIT_INTERNAL = 70


def _redis_failure(exc: BaseException) -> str | None:
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, AuthenticationError):
            return f"Redis refused us: {current}"
        if isinstance(current, RedisError):
            return f"Redis unavailable: {current}"
        current = current.__cause__
    return None


def explain(exc: BaseException) -> tuple[str, int]:
    """The line to print after `error: `, and the exit code, for an exception that ended a
    command."""
    if isinstance(exc, WaitTimedOut):
        return str(exc), EXIT_TIMED_OUT
    if isinstance(exc, ServiceUnavailable):
        return str(exc), EXIT_UNAVAILABLE
    redis = _redis_failure(exc)
    if redis is not None:
        return redis, EXIT_UNAVAILABLE
    database = describe_database_failure(exc)
    if database is not None:
        return database, EXIT_UNAVAILABLE
    if isinstance(exc, FlowForgeError):
        return str(exc), EXIT_USAGE
    return (
        f"unexpected {type(exc).__name__}: {exc} (run again with --debug for the traceback)",
        EXIT_INTERNAL,
    )
