"""The cancellation watcher: `flowforge_cancel` NOTIFY, and on the slow poll the requests
we missed. A requested pending run that waits for a concurrency slot is un-blocked, so a
claim cancels it (the API's request locks no run row)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from uuid import UUID

from flowforge_orchestrator import store
from flowforge_orchestrator.engine.background import Spawn
from flowforge_orchestrator.engine.owned import Drop, OwnedRuns

__all__ = ["CancellationWatcher"]

log = logging.getLogger("flowforge_orchestrator.engine.orchestrator")


class CancellationWatcher:
    """Cancels the owned runs asked to stop; un-blocks the pending ones."""

    def __init__(
        self,
        pool: store.Pool,
        node: str,
        runs: OwnedRuns,
        *,
        clock: Callable[[], datetime],
        changed: Callable[[UUID], None],
        drop: Drop,
        spawn: Spawn,
    ) -> None:
        """`changed`: the run has changes to commit."""
        self.pool = pool
        self.node = node
        self._runs = runs
        self._clock = clock
        self._changed = changed
        self._drop = drop
        self._spawn = spawn

    def on_notify(self, payload: str) -> None:
        try:
            run_id = UUID(payload)
        except ValueError:
            return
        self.cancel(run_id)

    def cancel(self, run_id: UUID) -> None:
        owned = self._runs.get(run_id)
        if owned is None:
            # Pending (a claim cancels it, once it no longer waits for a slot) or another
            # replica's (the owner cancels it).
            self._spawn(self._unblock([run_id]))
            return
        try:
            if owned.state.cancel(self._clock(), "cancel requested"):
                self._changed(run_id)
        except Exception:  # a bug must not take the daemon down with it
            log.exception("run %s: cancelling failed", run_id, extra={"run_id": str(run_id)})
            self._drop(run_id, "internal error while cancelling", give_back=True)

    async def _unblock(self, run_ids: list[UUID]) -> None:
        """Let these runs, if pending, requested and waiting for a concurrency slot, be
        claimed (and so cancelled)."""
        try:
            async with self.pool.acquire() as conn:
                await store.unblock_cancelled(conn, run_ids)
        except Exception as exc:  # the slow poll tries again
            log.warning("could not un-block cancelled runs: %s", exc)

    async def missed(self) -> None:
        """Cancellations whose notification we may have missed (LISTEN was down); requests
        whose run has ended are marked handled."""
        try:
            async with self.pool.acquire() as conn:
                await store.unblock_cancelled(conn, None)
                await store.settle_cancel_requests(conn)
                wanted = await store.cancel_requested(conn, self.node) if len(self._runs) else []
        except Exception as exc:
            log.warning("could not look for cancellations: %s", exc)
            return
        for run_id in wanted:
            self.cancel(run_id)
