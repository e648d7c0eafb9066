"""What a database failure means to the person at the command line, in one line."""

from __future__ import annotations

import errno
import socket

import asyncpg

from flowforge_orchestrator.errors import StoreError
from flowforge_orchestrator.store.db import is_transient

__all__ = ["describe_database_failure"]

_LOGIN = (
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,  # no such database
)
_NO_SCHEMA = (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def describe_database_failure(exc: BaseException) -> str | None:
    """One line for a database that cannot be used (unreachable, refused the login, no
    schema), looking through the exception's causes; None when it is no such failure."""
    chain = _chain(exc)
    for cause in chain:
        if isinstance(cause, _LOGIN):
            return f"the database refused us: {cause}"
        if isinstance(cause, _NO_SCHEMA):
            return (
                f"the database has no FlowForge schema ({cause}): "
                "run `flowforge-orchestrator migrate`"
            )
    for cause in chain:
        if isinstance(cause, StoreError):
            return str(cause) if is_transient(cause) else None
        if isinstance(cause, OSError) and not _network(cause):
            continue  # a file that cannot be read or written is not the database's
        if is_transient(cause):
            return f"database unavailable: {cause}"
    return None


def _network(exc: OSError) -> bool:
    return isinstance(exc, ConnectionError | TimeoutError | socket.gaierror) or exc.errno in _NET


_NET = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT}
