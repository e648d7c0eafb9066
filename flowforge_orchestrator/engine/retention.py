"""Retention: finished runs older than FLOWFORGE_RUN_RETENTION are deleted, in small
batches, by one orchestrator at a time; and the outbox consumers' lag is sampled.

Each tick deletes batches until one comes back short (or the tick's batch budget is spent,
so a large first clean-up is spread over ticks instead of one vacuum storm), then samples
every consumer's lag for /metrics. A run whose events a registered consumer has not read
waits for it, at most FLOWFORGE_OUTBOX_MAX_AGE more; a run deleted past that is logged as a
warning naming the consumer, and counted. A batch that fails (a row locked past the lock
timeout, a row the database refuses) is retried run by run: the run at fault is skipped
until the next tick, with a warning naming it, and the others go. A failed tick is logged
and retried at the next: retention never stops the orchestrator.
"""

from __future__ import annotations

import asyncio
import logging
from uuid import UUID

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.ops.metrics import OrchestratorMetrics
from flowforge_orchestrator.store import events as store_events

__all__ = ["Retention"]

log = logging.getLogger(__name__)

BATCH = 500  # runs per transaction: a few thousand rows, locks held for milliseconds
BATCHES_PER_TICK = 20
LAG_COUNT_CAP = 1_000_000  # counting further than this only costs time


class Retention:
    """Deletes expired runs and samples consumer lag, every `interval` seconds."""

    def __init__(
        self,
        pool: store.Pool,
        settings: Settings,
        metrics: OrchestratorMetrics,
        *,
        interval: float | None = None,
        batch: int = BATCH,
    ) -> None:
        self.pool = pool
        self.retention = settings.run_retention
        self.max_age = settings.outbox_max_age
        self.event_retention = settings.event_retention
        self.metrics = metrics
        self.batch = batch
        # A quarter of the period, so a run outlives it by at most a quarter; never busier
        # than twice a second, never idler than once a minute.
        self.interval = interval or min(60.0, max(0.5, (self.retention or 240.0) / 4))
        self._consumers: set[str] = set()

    async def run(self) -> None:
        """Tick until cancelled."""
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("retention tick failed (will retry): %s", exc)
            await asyncio.sleep(self.interval)

    async def tick(self) -> int:
        """One round: delete what expired (nothing when retention is 0), then sample the
        consumers' lag. Returns the runs deleted."""
        deleted = await self.delete_expired() if self.retention > 0 else 0
        if self.retention > 0:
            await self.delete_expired_events()
        await self.sample_lag()
        return deleted

    async def delete_expired_events(self) -> None:
        """Keyed events past FLOWFORGE_EVENT_RETENTION, completions past the run retention."""
        for _ in range(BATCHES_PER_TICK):
            async with self.pool.acquire() as conn:
                events, completions = await store_events.delete_expired(
                    conn,
                    event_retention=self.event_retention,
                    run_retention=self.retention,
                    batch=self.batch,
                )
            if max(events, completions) < self.batch:
                return
            await asyncio.sleep(0)

    async def delete_expired(self) -> int:
        deleted = 0
        skip: set[UUID] = set()  # runs that could not be deleted this tick
        for _ in range(BATCHES_PER_TICK):
            try:
                batch = await self._delete(skip=skip)
            except Exception as exc:
                # One run's rows may be locked or refused: find it, delete the others.
                log.info("a retention batch failed (%s); deleting its runs one by one", exc)
                deleted += await self._delete_one_by_one(skip)
                continue
            if batch.locked_out:
                break  # another orchestrator is at it
            self._observe(batch)
            deleted += batch.runs
            if batch.runs < self.batch:
                break
            await asyncio.sleep(0)  # let the engine's loops in between batches
        return deleted

    async def _delete(
        self, *, skip: set[UUID], among: list[UUID] | None = None
    ) -> store.RetentionBatch:
        async with self.pool.acquire() as conn:
            return await store.delete_finished_runs(
                conn,
                retention=self.retention,
                max_age=self.max_age,
                batch=self.batch,
                skip=sorted(skip),
                among=among,
            )

    async def _delete_one_by_one(self, skip: set[UUID]) -> int:
        async with self.pool.acquire() as conn:
            candidates = await store.expired_runs(
                conn,
                retention=self.retention,
                max_age=self.max_age,
                batch=self.batch,
                skip=sorted(skip),
            )
        deleted = 0
        for run_id in candidates:
            try:
                batch = await self._delete(skip=skip, among=[run_id])
            except Exception as exc:
                skip.add(run_id)
                log.warning(
                    "retention could not delete run %s (tried again at the next tick): %s",
                    run_id,
                    exc,
                    extra={"run_id": str(run_id)},
                )
                continue
            self._observe(batch)
            deleted += batch.runs
        return deleted

    def _observe(self, batch: store.RetentionBatch) -> None:
        for table, rows in (
            ("runs", batch.runs),
            ("outbox", batch.outbox),
            ("step_results", batch.step_results),
        ):
            self.metrics.retention_deleted.labels(table).inc(rows)
        if batch.runs:
            log.info(
                "retention deleted %d runs (%d events, %d results)",
                batch.runs,
                batch.outbox,
                batch.step_results,
            )
        for consumer, events in sorted(batch.lost.items()):
            self.metrics.outbox_events_lost.labels(consumer).inc(events)
            log.warning(
                "retention deleted %d events outbox consumer %r had not read: it is stuck "
                "or gone (waited FLOWFORGE_OUTBOX_MAX_AGE=%gs past retention); drop it if "
                "it is gone",
                events,
                consumer,
                self.max_age,
                extra={"consumer": consumer, "lost_events": events},
            )

    async def sample_lag(self) -> None:
        async with self.pool.acquire() as conn:
            lags = await store.consumer_lags(conn, count_up_to=LAG_COUNT_CAP)
        seen = set()
        for lag in lags:
            seen.add(lag.name)
            self.metrics.outbox_consumer_lag_events.labels(lag.name).set(lag.events_behind)
            self.metrics.outbox_consumer_lag_seconds.labels(lag.name).set(lag.seconds_behind or 0.0)
        for gone in self._consumers - seen:
            self.metrics.outbox_consumer_lag_events.remove(gone)
            self.metrics.outbox_consumer_lag_seconds.remove(gone)
        self._consumers = seen
