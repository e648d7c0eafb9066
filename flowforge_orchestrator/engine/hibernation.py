"""Hibernation: runs parked on a far timer or on an event leave memory, and come back.

* Leaving: the group commit (or the claim) that leaves a run with nothing to do but wait
  (`parking.park_until`) writes its wake-up time and its waits and releases it in the same
  statement (sql/0016); the orchestrator then forgets it (`Orchestrator._hibernated`).
  Whatever touched the run in memory meanwhile and is not committed is not lost: an event
  not taken is still in its table, a cancellation request still open. So after each such
  commit the parked runs are checked once in the database (`wake_if_called`): one that
  has an event to take or a cancellation asked for is woken at once.
* Coming back on time: one loop asks for the earliest wake-up time (one indexed query, not
  one per run) and wakes the claimer `parking.wake_ahead` seconds before it; the claim
  takes every due run, earliest first, in batches, and the timer fires in memory.
* Coming back on an event or a cancellation: NOTIFY `flowforge_events` names the new
  events' ids, and `flowforge_cancel` a run; the hibernated runs they concern are woken
  (`wake_at = now()` and NOTIFY `flowforge_runs`: any replica claims them). The slow poll
  looks again at the events of the last minutes and at open cancellation requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from uuid import UUID

from flowforge_orchestrator import store
from flowforge_orchestrator.engine.eventing import _merged
from flowforge_orchestrator.engine.owned import OwnedRuns
from flowforge_orchestrator.engine.parking import wake_ahead
from flowforge_orchestrator.ops import metrics
from flowforge_orchestrator.store import hibernation as parked

__all__ = ["Hibernation"]

log = logging.getLogger("flowforge_orchestrator.engine.orchestrator")

CHECK_BATCH = 1000  # runs per wake_if_called query
RECENT = 120.0  # seconds of events the slow poll reads again (as event delivery does)


class Hibernation:
    """Wakes hibernated runs: when due, and when an event or a cancellation calls them."""

    def __init__(
        self,
        pool: store.Pool,
        measures: metrics.OrchestratorMetrics,
        runs: OwnedRuns,
        *,
        after: float,
        poll_interval: float,
        event_retention: float,
        clock: Callable[[], datetime],
        wake_claim: Callable[[], None],
    ) -> None:
        """`after`: FLOWFORGE_HIBERNATE_AFTER; `wake_claim`: the claimer is to look for runs."""
        self.pool = pool
        self.metrics = measures
        self._runs = runs
        self._ahead = wake_ahead(after)
        self._poll_interval = poll_interval
        self._retention = event_retention
        self._clock = clock
        self._wake_claim = wake_claim
        self._ranges: list[tuple[int, int]] = []  # notified event ids
        self._called: set[UUID] = set()  # runs to check: just parked, or a cancel named them
        self.wake = asyncio.Event()

    # -- what the orchestrator tells it --------------------------------------------------

    def parked(self, run_id: UUID) -> None:
        """The run hibernated: check it once (see the module), and the next wake-up."""
        self._called.add(run_id)
        self.wake.set()

    def on_event_notify(self, payload: str) -> None:
        """Payload: `first-last`, the ids one inserting statement gave its events."""
        first, _, last = payload.partition("-")
        try:
            self._ranges.append((int(first), int(last or first)))
        except ValueError:
            return
        self.wake.set()

    def on_cancel_notify(self, payload: str) -> None:
        """Payload: the run whose cancellation was asked for; not ours: it may hibernate."""
        with contextlib.suppress(ValueError):
            run_id = UUID(payload)
            if run_id not in self._runs:
                self._called.add(run_id)
                self.wake.set()

    # -- the loop ------------------------------------------------------------------------

    async def loop(self) -> None:
        while True:
            self.wake.clear()
            try:
                delay = await self._tick()
            except Exception as exc:  # the database away: try again shortly
                log.warning("waking hibernated runs failed (%s); trying again", exc)
                delay = 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=delay)

    async def poll(self) -> None:
        """The slow path: events of the last minutes, open cancellation requests."""
        try:
            async with self.pool.acquire() as conn:
                woken = await parked.wake_for_recent_events(conn, RECENT)
                woken += await parked.wake_cancelled(conn)
        except Exception as exc:
            log.warning("could not look for hibernated runs to wake: %s", exc)
            return
        self._woke(woken)

    async def _tick(self) -> float:
        """Wake the runs called since the last tick; wake the claimer if a run is due.
        Returns how long to sleep before looking again."""
        ranges, self._ranges = self._ranges, []
        called, self._called = list(self._called), set()
        woken = 0
        try:
            async with self.pool.acquire() as conn:
                for first, last in _merged(ranges):
                    woken += await parked.wake_for_events(conn, first, last)
                for i in range(0, len(called), CHECK_BATCH):
                    batch = called[i : i + CHECK_BATCH]
                    woken += await parked.wake_if_called(conn, batch, self._retention)
                ranges, called = [], []
                due = await parked.next_wake(conn)
        finally:  # what was not done is done next time
            self._ranges += ranges
            self._called.update(called)
        self._woke(woken)
        if due is None:
            return self._poll_interval
        until = (due - self._clock()).total_seconds() - self._ahead
        if until <= 0:
            self._wake_claim()
            # The claim takes them in batches; look again soon (well within the time a
            # run is claimed ahead), not in a busy loop.
            return max(0.05, min(0.25, self._ahead / 4))
        return min(until, self._poll_interval)

    def _woke(self, count: int) -> None:
        if count:
            self.metrics.reconciled("called", count)
            self._wake_claim()
