"""The timekeeper: the owned runs' next timers (delays, backoffs, deadlines) in one heap,
and one loop that sleeps until the earliest, so thousands of parked runs cost no query
each."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from uuid import UUID

from flowforge_orchestrator.engine.owned import Drop, OwnedRuns
from flowforge_orchestrator.engine.timers import TimerHeap

__all__ = ["Timekeeper"]

log = logging.getLogger("flowforge_orchestrator.engine.orchestrator")


class Timekeeper:
    """Fires the owned runs' timers when they are due."""

    def __init__(
        self,
        runs: OwnedRuns,
        *,
        clock: Callable[[], datetime],
        changed: Callable[[UUID], None],
        drop: Drop,
    ) -> None:
        """`changed`: the run has changes to commit."""
        self._runs = runs
        self._clock = clock
        self._changed = changed
        self._drop = drop
        self._heap = TimerHeap()
        self._wake = asyncio.Event()

    def schedule(self, run_id: UUID) -> None:
        """Set the run's next timer; the loop wakes if it is now the earliest."""
        owned = self._runs.get(run_id)
        when = owned.state.next_timer() if owned is not None else None
        if self._heap.set(run_id, when):
            self._wake.set()

    def discard(self, run_id: UUID) -> None:
        """The run left: its timer no longer counts."""
        self._heap.discard(run_id)

    async def loop(self) -> None:
        while True:
            self._wake.clear()
            now = self._clock()
            for run_id in self._heap.pop_due(now):
                self._fire(run_id, now)
            earliest = self._heap.next_due()
            delay = (earliest - now).total_seconds() if earliest is not None else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    def _fire(self, run_id: UUID, now: datetime) -> None:
        owned = self._runs.get(run_id)
        if owned is None:
            return
        try:
            if owned.state.fire_timers(now):
                self._changed(run_id)
            self.schedule(run_id)
        except Exception:  # a bug must not take the daemon down with it
            log.exception("run %s: firing a timer failed", run_id, extra={"run_id": str(run_id)})
            self._drop(run_id, "internal error while firing a timer", give_back=True)
