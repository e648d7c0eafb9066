"""The results loop: on NOTIFY `flowforge_results` (payload: attempt ids) or the slow
poll, fetch the results of outstanding attempts and apply them to their runs' graphs
(a result of an attempt no longer outstanding is ignored)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from datetime import datetime
from uuid import UUID

from flowforge_orchestrator import store
from flowforge_orchestrator.core.records import StepResult
from flowforge_orchestrator.engine.owned import Drop, OwnedRuns
from flowforge_orchestrator.engine.reconciler import Fetch
from flowforge_orchestrator.errors import FlowForgeError
from flowforge_orchestrator.ops import metrics

__all__ = ["ResultApplier"]

log = logging.getLogger("flowforge_orchestrator.engine.orchestrator")


class ResultApplier:
    """Fetches and applies the results of the owned runs' notified attempts."""

    def __init__(
        self,
        measures: metrics.OrchestratorMetrics,
        runs: OwnedRuns,
        *,
        fetch: Fetch,
        clock: Callable[[], datetime],
        changed: Callable[[UUID], None],
        drop: Drop,
    ) -> None:
        """`changed`: the run has changes to commit."""
        self.metrics = measures
        self._runs = runs
        self._fetch = fetch
        self._clock = clock
        self._changed = changed
        self._drop = drop
        self.wake = asyncio.Event()

    async def loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            wanted = self._runs.take_notified()
            if not wanted:
                continue
            try:
                rows = await store.retrying(
                    functools.partial(self._fetch, wanted), what="fetching results"
                )
            except FlowForgeError as exc:
                log.error("fetching results failed: %s", exc)
                self._runs.notify(wanted)
                continue
            now = self._clock()
            for run_id, result in rows:
                self._apply(run_id, result, now)

    def _apply(self, run_id: UUID, result: StepResult, now: datetime) -> None:
        owned = self._runs.answered(run_id, result.attempt_id)
        if owned is None:
            return
        try:
            applied = owned.state.apply_result(result, now)
        except Exception:  # a bug must not take the daemon down with it
            log.exception("run %s: applying a result failed", run_id, extra={"run_id": str(run_id)})
            self._drop(run_id, "internal error while applying a result", give_back=True)
            return
        if result.outcome == "handed_off":
            # Still running, elsewhere: its completion is routed like a result.
            if result.attempt_id in owned.state.handed_off():
                self._runs.handed_off(run_id, [result.attempt_id])
            if applied:
                self._changed(run_id)
            return
        if applied:
            self._changed(run_id)
            self.metrics.observe_result(result, owned.state.step_type(result.step_id))
