"""What the chaos run measures besides correctness: how the engine recovers.

* **Readiness under a probe storm.** Every orchestrator serves /readyz on a port of its
  own; once a second, 20 probes at once go to each live one. `readyz_max_ms` is the slowest
  answer, `readyz_failed` the probes that got none from a process that stayed live.
  `pg_connections_max` is the most connections the chaos database ever had (sampled each
  second): a storm that opened a connection per probe would show here.
* **Back to normal after a Redis restart.** From the history: for each time Redis came
  back, the steps dispatched in the minute after it, and how long each waited for a worker
  (`step.dispatched` to `step.started`). `redis_recovery_s` is, over the restarts, the
  longest time from Redis' return until the last of those steps that waited more than
  2 s started: 0 when every step after the restart was handed over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import httpx

from flowforge_orchestrator import store

__all__ = ["Recovery", "probe_readiness", "redis_recovery"]

PROBES = 20  # at once, per orchestrator, per second
SLOW_HANDOFF = 2.0  # seconds from dispatch to start that count as not recovered
WINDOW = 60.0  # seconds after a Redis start that are looked at


@dataclass
class Recovery:
    readyz_max_ms: float = 0.0
    readyz_answered: int = 0
    readyz_failed: int = 0
    pg_connections_max: int = 0
    redis_recovery_s: float | None = None  # None: Redis was not restarted
    slow_after_redis: int = 0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        recovery = "n/a" if self.redis_recovery_s is None else f"{self.redis_recovery_s:.1f}s"
        return (
            f"readyz_max_ms={self.readyz_max_ms:.0f} readyz_answered={self.readyz_answered} "
            f"readyz_failed={self.readyz_failed} pg_connections_max={self.pg_connections_max} "
            f"redis_recovery={recovery} slow_handoffs_after_redis={self.slow_after_redis}"
        )


async def probe_readiness(
    ports: Callable[[], list[int]], pool: store.Pool, recovery: Recovery
) -> None:
    """Until cancelled: a storm of /readyz probes at each live orchestrator (`ports()`
    gives their ports now), and a sample of the database's connections, every second."""
    limits = httpx.Limits(max_connections=PROBES * 8)
    async with httpx.AsyncClient(timeout=2.0, limits=limits) as http:
        while True:
            started = time.monotonic()
            await asyncio.gather(
                *(_storm(http, port, ports, recovery) for port in ports()),
                _count_connections(pool, recovery),
            )
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


async def _storm(
    http: httpx.AsyncClient, port: int, ports: Callable[[], list[int]], recovery: Recovery
) -> None:
    async def one() -> float | None:
        began = time.monotonic()
        try:
            response = await http.get(f"http://127.0.0.1:{port}/readyz")
        except httpx.HTTPError:
            return None
        return (time.monotonic() - began) * 1000 if response.status_code in (200, 503) else None

    answers = await asyncio.gather(*(one() for _ in range(PROBES)))
    if port not in ports():
        return  # killed, paused or stopped meanwhile: its silence is the fault's, not a finding
    for ms in answers:
        if ms is None:
            recovery.readyz_failed += 1
        else:
            recovery.readyz_answered += 1
            recovery.readyz_max_ms = max(recovery.readyz_max_ms, ms)


async def _count_connections(pool: store.Pool, recovery: Recovery) -> None:
    with contextlib.suppress(Exception):  # PostgreSQL may be restarting: no sample then
        async with pool.acquire() as conn:
            count = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            )
        recovery.pg_connections_max = max(recovery.pg_connections_max, int(count))


async def redis_recovery(conn: store.Connection, starts: list[float], recovery: Recovery) -> None:
    """Fill the Redis figures from the history; `starts`: wall-clock times Redis came back."""
    if not starts:
        return
    rows = await conn.fetch(
        """
        SELECT d.time AS dispatched, s.time AS started
        FROM flowforge.outbox d
        JOIN flowforge.outbox s
          ON s.run_id = d.run_id AND s.attempt_id = d.attempt_id AND s.type = 'step.started'
        WHERE d.type = 'step.dispatched'
        """
    )
    handoffs = [(_ts(r["dispatched"]), _ts(r["started"])) for r in rows]
    worst = 0.0
    for back in starts:
        after = [(d, s) for d, s in handoffs if back <= d < back + WINDOW]
        slow = [(d, s) for d, s in after if s - d > SLOW_HANDOFF]
        recovery.slow_after_redis += len(slow)
        if slow:
            worst = max(worst, max(s for _, s in slow) - back)
    recovery.redis_recovery_s = worst


def _ts(moment: datetime) -> float:
    return moment.timestamp()
