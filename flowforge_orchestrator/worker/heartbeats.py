"""Heartbeats of long steps, written in batches: a step may beat as often as it likes; the
worker keeps each attempt's last details and writes every attempt that beat since the last
write in one statement, at most once per `interval` (sql/0013, `flowforge.heartbeat`).

So a thousand steps beating ten times a second cost one statement a second, not ten
thousand; and a step that beats once an hour costs one row write an hour. The interval is
a fraction of the shortest heartbeat timeout among the attempts that beat (a quarter, at
most a second), so a beat reaches PostgreSQL well before the orchestrator would miss it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

__all__ = ["Beat", "Heartbeats"]

log = logging.getLogger(__name__)

MAX_INTERVAL = 1.0
"""Longest pause between two writes while some attempt has beaten."""


@dataclass(frozen=True)
class Beat:
    """An attempt's last heartbeat, as written: run, attempt, token, details."""

    run_id: UUID
    attempt_id: UUID
    token: bytes
    details: Any

    def as_row(self) -> tuple[UUID, UUID, bytes, Any]:
        return (self.run_id, self.attempt_id, self.token, self.details)


Write = Callable[[Sequence[tuple[UUID, UUID, bytes, Any]]], Awaitable[int]]


class Heartbeats:
    """Collects beats; `run()` writes them until cancelled; `flush()` writes what is left."""

    def __init__(self, write: Write) -> None:
        self._write = write
        self._pending: dict[UUID, Beat] = {}
        self._interval = MAX_INTERVAL
        self._wake = asyncio.Event()
        self.written = 0  # beats written so far, for tests and metrics

    def beat(self, beat: Beat, timeout: float | None) -> None:
        """Keep `beat` as its attempt's last; with a heartbeat timeout, write often enough."""
        self._pending[beat.attempt_id] = beat
        if timeout is not None and timeout / 4 < self._interval:
            self._interval = max(timeout / 4, 0.05)
        self._wake.set()

    async def flush(self) -> None:
        beats, self._pending = self._pending, {}
        if not beats:
            return
        try:
            self.written += await self._write([b.as_row() for b in beats.values()])
        except Exception:
            # A lost beat is replaced by the next one; keep the newest of each attempt.
            for attempt_id, beat in beats.items():
                self._pending.setdefault(attempt_id, beat)
            raise

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:
                log.warning("heartbeats not written (%s); trying again", exc)
                self._wake.set()
            await asyncio.sleep(self._interval)
