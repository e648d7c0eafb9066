"""Connections the engine did not open: an API's SQLAlchemy `AsyncSession` or
`AsyncConnection`, reached down to its asyncpg connection, inside the caller's transaction.

Why the driver connection rather than the same statements through SQLAlchemy `text()`: one
implementation of every statement (the engine's own, tested against PostgreSQL), asyncpg
stays the engine's driver, and the caller's transaction is the one that commits or rolls
back. The statements the client runs pass JSON as text and read it as text, so they need
none of the engine's type codecs (SQLAlchemy's asyncpg dialect sets codecs of its own).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from flowforge_orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

__all__ = ["AnyConnection", "driver_connection"]

AnyConnection: TypeAlias = "asyncpg.Connection | AsyncSession | AsyncConnection"
"""What the client accepts: an asyncpg connection, or a SQLAlchemy session or connection on
the asyncpg driver (`postgresql+asyncpg://`)."""

# SQLAlchemy's asyncpg dialect sends BEGIN lazily, with the first statement: one statement
# through the caller's connection opens the transaction the engine's statements then join.
_OPEN_TRANSACTION = "SELECT 1"


async def driver_connection(conn: Any) -> asyncpg.Connection:
    """The asyncpg connection under `conn`, in the caller's transaction (begun if the caller's
    SQLAlchemy transaction has not sent BEGIN yet)."""
    if isinstance(conn, asyncpg.Connection):
        return conn
    try:
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    except ImportError:  # pragma: no cover - sqlalchemy is a dependency
        raise ConfigError(f"not a database connection: {type(conn).__name__}") from None
    if isinstance(conn, AsyncSession):
        conn = await conn.connection()  # the session's transaction, begun if need be
    if not isinstance(conn, AsyncConnection):
        raise ConfigError(
            "expected an asyncpg Connection or a SQLAlchemy AsyncSession or AsyncConnection, "
            f"not {type(conn).__name__}"
        )
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    if not isinstance(driver, asyncpg.Connection):
        raise ConfigError(
            f"the SQLAlchemy engine uses {type(driver).__name__}: FlowForge needs the asyncpg "
            "driver (a URL starting postgresql+asyncpg://)"
        )
    if conn.in_transaction() and not driver.is_in_transaction():
        await conn.execute(text(_OPEN_TRANSACTION))
    return driver
