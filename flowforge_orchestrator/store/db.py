"""Connections: pools with JSON codecs, and the one classifier of transient failures."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg

from flowforge_orchestrator.errors import StoreError, TransientStoreError

__all__ = [
    "Connection",
    "Pool",
    "Record",
    "connect",
    "create_pool",
    "is_database_error",
    "is_lock_timeout",
    "is_member_fault",
    "is_transient",
    "retrying",
    "wrap",
]

log = logging.getLogger(__name__)

Connection = asyncpg.Connection
Record = asyncpg.Record
Pool = asyncpg.Pool
T = TypeVar("T")

_TRANSIENT = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # connection closed under us
    asyncpg.InternalClientError,  # a connection left mid-operation by a server restart
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def json_texts(values: Iterable[object]) -> list[str | None]:
    """JSON values for a `text[]` parameter cast to jsonb per element. A `jsonb[]` parameter
    cannot carry them: asyncpg reads a value that is a list as one more array dimension."""
    return [None if value is None else _dumps(value) for value in values]


TOO_DEEP = "<a JSON value nested too deep to read>"


def _loads(text: str) -> Any:
    """JSON from a column. A value nested deeper than Python's decoder recurses (an input
    the API inserted; PostgreSQL takes thousands of levels) reads as a marker, so that a
    listing or a view of that run works; the engine itself refuses such inputs at claim."""
    try:
        return json.loads(text)
    except RecursionError:
        return TOO_DEEP


async def _init(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=_dumps, decoder=_loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=_dumps, decoder=_loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pooled connections hold no session state (no LISTEN, SET or session advisory lock:
    those get connections of their own), so a release skips asyncpg's reset query, a round
    trip per release. asyncpg still rolls back a transaction left open."""


async def create_pool(
    dsn: str, *, size: int = 10, lock_timeout: float | None = None
) -> asyncpg.Pool:
    """A pool whose connections speak JSON for json/jsonb columns.

    `lock_timeout` (seconds) bounds every wait for a lock on these connections: a row or
    key held by someone else then fails the statement instead of stalling it (the
    orchestrator sets it, so a lock held outside the engine delays one run, not all)."""
    settings = {"lock_timeout": f"{int(lock_timeout * 1000)}ms"} if lock_timeout else None
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=size,
            init=_init,
            reset=_keep_session,
            command_timeout=60,
            server_settings=settings,
        )
    except Exception as exc:
        raise wrap(exc) from exc
    assert pool is not None
    return pool


async def connect(dsn: str) -> asyncpg.Connection:
    """One dedicated connection (LISTEN needs its own)."""
    try:
        conn = await asyncpg.connect(dsn)
        await _init(conn)
    except Exception as exc:
        raise wrap(exc) from exc
    return conn


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (TransientStoreError, *_TRANSIENT))


def is_database_error(exc: BaseException) -> bool:
    """Anything the driver raised: the transaction it happened in cannot go on."""
    return is_transient(exc) or isinstance(exc, StoreError | asyncpg.PostgresError)


def is_lock_timeout(exc: BaseException) -> bool:
    """A lock was held by someone else longer than `lock_timeout` (here or as the cause)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, asyncpg.LockNotAvailableError):
            return True
        seen = seen.__cause__
    return False


def is_member_fault(exc: BaseException) -> bool:
    """The database refused what a statement wrote (a value, a key, a constraint): retrying
    the same batch fails the same way, so the member at fault must be found and set apart.
    Transient failures and lock timeouts are not: the same write may pass later."""
    return is_database_error(exc) and not is_transient(exc) and not is_lock_timeout(exc)


def wrap(exc: BaseException) -> StoreError:
    """Driver errors become our hierarchy, keeping the cause."""
    if isinstance(exc, StoreError):
        return exc
    if is_transient(exc):
        return TransientStoreError(f"database unavailable: {exc}")
    return StoreError(f"database error: {exc}")


async def retrying(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    attempts: int | None = None,
    base: float = 0.1,
    cap: float = 5.0,
) -> T:
    """Run `op` again on transient failures, with capped exponential backoff and jitter.

    `attempts=None` retries forever: the daemon outlives a database restart. Any other
    database error comes out as a `StoreError`, so callers handle one hierarchy.
    """
    attempt = 0
    while True:
        try:
            return await op()
        except Exception as exc:
            if not is_transient(exc):
                if is_database_error(exc):
                    raise wrap(exc) from exc
                raise
            attempt += 1
            if attempts is not None and attempt >= attempts:
                raise wrap(exc) from exc
            delay = min(cap, base * 2 ** min(attempt, 16)) * (0.5 + random.random() / 2)
            log.warning("%s failed (%s); retrying in %.2fs", what, exc, delay)
            await asyncio.sleep(delay)


@asynccontextmanager
async def transaction(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection inside a transaction."""
    async with pool.acquire() as conn, conn.transaction():
        yield conn
