"""The lease keeper: one statement renews every lease this replica holds; a run no longer
ours is dropped; runs given back after an error have their leases released at once, so a
claim resumes them without waiting for the lease to expire."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from uuid import UUID

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.engine.owned import Drop, OwnedRuns
from flowforge_orchestrator.errors import FlowForgeError
from flowforge_orchestrator.ops import metrics
from flowforge_orchestrator.store import liveness as store_liveness

__all__ = ["LeaseKeeper"]

log = logging.getLogger("flowforge_orchestrator.engine.orchestrator")


class LeaseKeeper:
    """Renews, releases and gives back the leases of the runs in `runs`."""

    def __init__(
        self,
        settings: Settings,
        pool: store.Pool,
        measures: metrics.OrchestratorMetrics,
        runs: OwnedRuns,
        *,
        owned_rows: asyncio.Lock,
        drop: Drop,
        wake_claim: Callable[[], None],
    ) -> None:
        """`owned_rows`: held while the owned runs' rows are written (the group commit and
        the renewal update the same rows, each in its own order: run at once, they could
        deadlock each other)."""
        self.settings = settings
        self.node = settings.node_id
        self.pool = pool
        self.metrics = measures
        self._runs = runs
        self._owned_rows = owned_rows
        self._drop = drop
        self._wake_claim = wake_claim

    async def loop(self) -> None:
        # Every lease_seconds / 6, rewriting only the leases with less than 2/3 of theirs
        # left (`renew_below`): a lease is renewed with at least half of it still to run,
        # and a run that ends within a third of a lease of its claim is never renewed
        # (each renewal is a non-HOT update: BENCHMARKS.md "Lease renewals").
        interval = self.settings.lease_seconds / 6
        while True:
            await asyncio.sleep(interval)
            await self.renew_once()

    async def renew_once(self) -> None:
        # Only runs owned before the renewal started can be judged by its answer; one
        # claimed meanwhile is ours even though the statement did not see it.
        before = self._runs.epochs()
        try:
            held = await store.retrying(self._renew, what="renewing leases", attempts=3)
        except FlowForgeError as exc:
            log.error("renewing leases failed: %s", exc)
            return
        self.metrics.leases_held.set(len(held))
        for run_id, epoch in before.items():
            owned = self._runs.get(run_id)
            if owned is not None and owned.epoch == epoch and held.get(run_id) != epoch:
                self._drop(run_id, "lease lost")

    async def _renew(self) -> dict[UUID, int]:
        async with self._owned_rows, self.pool.acquire() as conn:
            await self._release_given_back(conn)
            owned = self._runs.ids()
            lease = self.settings.lease_seconds
            try:
                return await store.renew_leases(
                    conn, self.node, lease, owned, renew_below=lease * 2 / 3
                )
            except Exception as exc:
                if not store.is_lock_timeout(exc):
                    raise
                # A row locked by another session: renew the others now, that one next time.
                log.warning("a run's row is locked by another session; renewing the others")
                return await store.renew_leases(conn, self.node, lease, owned, skip_locked=True)

    async def _release_given_back(self, conn: store.Connection) -> None:
        released = self._runs.to_release()
        if released:
            await store.release_leases(conn, self.node, released)
            self._runs.released(released)

    async def release_given_back(self) -> None:
        """Expire the leases of runs given back now, so that a claim (this replica's, woken
        here, or another's) resumes them at once; the lease loop tries again on failure."""
        try:
            async with self._owned_rows, self.pool.acquire() as conn:
                await self._release_given_back(conn)
        except Exception as exc:
            log.warning("could not release given-back runs now (%s); trying again later", exc)
            return
        self._wake_claim()

    async def release_all(self) -> None:
        """Hand every owned run back at once, and wake the other replicas' claims, so one
        adopts them without waiting for its slow poll."""
        if not len(self._runs):
            return
        try:
            async with self.pool.acquire() as conn:
                await store.release_leases(conn, self.node, self._runs.ids())
                await store_liveness.wake_claimers(conn)
        except Exception as exc:
            log.warning("could not release leases (%s); they expire on their own", exc)
        for owned in self._runs.clear():
            owned.span.end()
