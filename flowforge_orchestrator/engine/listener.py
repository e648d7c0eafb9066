"""LISTEN on a dedicated connection, reconnecting with backoff when it drops.

Notifications are hints, never the truth: after every (re)connect the owner is told to catch
up through its poll path, since anything sent while the connection was down is gone.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import asyncpg

from flowforge_orchestrator import store

__all__ = ["Listener"]

log = logging.getLogger(__name__)

Handler = Callable[[str], None]


class Listener:
    """Keeps one LISTEN connection alive for a set of channels."""

    def __init__(
        self,
        dsn: str,
        handlers: dict[str, Handler],
        *,
        on_connect: Callable[[], None],
        check_interval: float = 1.0,
    ) -> None:
        self.dsn = dsn
        self.handlers = handlers
        self.on_connect = on_connect
        self.check_interval = check_interval
        self.connected = asyncio.Event()
        self._conn: asyncpg.Connection | None = None

    def _callback(self, channel: str) -> Callable[..., None]:
        handler = self.handlers[channel]

        def notified(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            handler(payload)

        return notified

    async def _connect(self) -> asyncpg.Connection:
        conn = await store.connect(self.dsn)
        for channel in self.handlers:
            await conn.add_listener(channel, self._callback(channel))
        return conn

    async def run(self) -> None:
        """Connect, hold, reconnect; until cancelled."""
        failures = 0
        try:
            while True:
                try:
                    self._conn = await self._connect()
                except Exception as exc:
                    failures += 1
                    delay = min(5.0, 0.1 * 2**failures) * (0.5 + random.random() / 2)
                    log.warning("LISTEN connection failed (%s); retrying in %.1fs", exc, delay)
                    await asyncio.sleep(delay)
                    continue
                failures = 0
                self.connected.set()
                self.on_connect()
                while not self._conn.is_closed():
                    await asyncio.sleep(self.check_interval)
                    try:
                        await self._conn.execute("SELECT 1")
                    except Exception:
                        break
                self.connected.clear()
                log.warning("LISTEN connection lost; reconnecting")
                await self._close()
        finally:
            await self._close()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=2)
            except Exception:
                conn.terminate()
