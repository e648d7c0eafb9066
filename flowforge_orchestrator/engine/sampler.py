"""The gauges only the database knows (the outbox backlog, runs by status), sampled by the
orchestrator on a timer: a scrape costs no query."""

from __future__ import annotations

import asyncio
import logging

from flowforge_orchestrator import store
from flowforge_orchestrator.ops.metrics import OrchestratorMetrics

__all__ = ["run_sampler", "sample_database"]

log = logging.getLogger(__name__)


async def sample_database(pool: store.Pool, metrics: OrchestratorMetrics) -> None:
    """Fill the gauges that only the database knows (outbox backlog, open runs)."""
    async with pool.acquire() as conn:
        backlog = await store.outbox_backlog(conn)
        open_runs = await store.count_open_runs(conn)
    metrics.outbox_unpublished.set(backlog.unpublished)
    metrics.outbox_oldest_age.set(backlog.oldest_age or 0.0)
    for status, count in open_runs.items():
        metrics.runs.labels(status).set(count)


async def run_sampler(
    pool: store.Pool, metrics: OrchestratorMetrics, *, interval: float = 15.0
) -> None:
    """`sample_database` every `interval` seconds until cancelled; a failed sample keeps the
    last values (readiness, not a metric, is what reports the database down)."""
    while True:
        try:
            await sample_database(pool, metrics)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("sampling database metrics failed: %s", exc)
        await asyncio.sleep(interval)
