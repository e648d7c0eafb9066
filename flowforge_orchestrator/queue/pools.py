"""Opening an arq Redis pool without leaking a connection when the opening is cancelled.

arq's `create_pool` builds the client, then PINGs it, and drops the client when that PING
fails or is cancelled. redis-py closes a connection whose read or write is interrupted, but
not one interrupted in the check that follows its connect (`can_read_destructive`, a read
under a zero timeout): cancelled there, the connection goes back to the pool still open,
and the pool is garbage with it. A worker stopped while it starts, or an orchestrator
stopped while it connects, left an open socket to the garbage collector, which warns
("unclosed Connection") wherever it happens to run. Here the client is closed whatever
ends its first PING, and arq's retries are kept.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from arq.connections import ArqRedis, RedisSettings
from redis.exceptions import RedisError

from flowforge_orchestrator.errors import ConfigError

__all__ = ["open_pool"]

log = logging.getLogger(__name__)


async def open_pool(settings: RedisSettings | None, **attributes: Any) -> ArqRedis:
    """A client that answered PING: arq's `create_pool(settings, **attributes)` (its
    connection options, `conn_retries` tries `conn_retry_delay` apart), but closed, not
    dropped, when a PING fails or the caller is cancelled. No settings: arq's defaults."""
    settings = settings or RedisSettings()
    if settings.sentinel:
        raise ConfigError("Redis Sentinel is not supported: give the primary's URL")
    retry = 0
    while True:
        pool = ArqRedis(
            host=settings.host,
            port=settings.port,
            unix_socket_path=settings.unix_socket_path,
            socket_connect_timeout=settings.conn_timeout,
            ssl=settings.ssl,
            ssl_keyfile=settings.ssl_keyfile,
            ssl_certfile=settings.ssl_certfile,
            ssl_cert_reqs=settings.ssl_cert_reqs,
            ssl_ca_certs=settings.ssl_ca_certs,
            ssl_ca_data=settings.ssl_ca_data,
            ssl_check_hostname=settings.ssl_check_hostname,
            retry=settings.retry,
            retry_on_timeout=settings.retry_on_timeout,
            retry_on_error=settings.retry_on_error,
            max_connections=settings.max_connections,
            db=settings.database,
            username=settings.username,
            password=settings.password,
            encoding="utf8",
            **attributes,
        )
        try:
            await pool.ping()
        except BaseException as exc:
            # Not shielded: a second cancellation during the close is the caller's to make.
            await pool.aclose(close_connection_pool=True)
            retryable = isinstance(exc, (OSError, RedisError, asyncio.TimeoutError))
            if not retryable or retry >= settings.conn_retries:
                raise
            log.warning(
                "Redis at %s:%s did not answer (%s: %s); tries left: %d",
                settings.host,
                settings.port,
                type(exc).__name__,
                exc,
                settings.conn_retries - retry,
            )
        else:
            return pool
        await asyncio.sleep(settings.conn_retry_delay)
        retry += 1
