"""Deliveries and the reconciler that keeps every dispatched attempt answered.

* committed dispatches are enqueued; what Redis refuses is tried again every second;
* on the slow poll, attempts of which Redis knows nothing (and that have no result) are
  sent again: a Redis that lost its data (restarted without persistence, failed over)
  loses no run;
* at schedule_to_start, attempts no worker took time out; cancelled attempts are aborted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from uuid import UUID

from flowforge_orchestrator.core.records import Dispatch, StepResult
from flowforge_orchestrator.engine.background import Spawn
from flowforge_orchestrator.engine.owned import Drop, OwnedRuns
from flowforge_orchestrator.ops import metrics
from flowforge_orchestrator.queue.dispatch import Dispatcher

__all__ = ["CHECK_BATCH", "REDELIVERY_DELAY", "Fetch", "Reconciler"]

log = logging.getLogger("flowforge_orchestrator.engine.orchestrator")

REDELIVERY_DELAY = 1.0  # seconds between tries of dispatches Redis refused
# Attempts looked for in Redis per slow poll, in rotation: looking for all of a 100,000-
# element fan-out's took 1.4-2.2 s of Redis and 1.1 s of the orchestrator's CPU every poll.
CHECK_BATCH = 5_000

# Read the stored results of these attempts: (run id, result) for each found.
Fetch = Callable[[list[UUID]], Awaitable[list[tuple[UUID, StepResult]]]]
Jobs = list[tuple[Dispatch, str | None]]  # dispatches to send, with their trace context
Prepare = Callable[[Jobs], Awaitable[Jobs]]


class Reconciler:
    """Sends the owned runs' outstanding attempts to Redis, and again when it lost them."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        measures: metrics.OrchestratorMetrics,
        runs: OwnedRuns,
        *,
        poll_interval: float,
        fetch: Fetch,
        clock: Callable[[], datetime],
        changed: Callable[[UUID], None],
        drop: Drop,
        spawn: Spawn,
        prepare: Prepare | None = None,
        check_batch: int = CHECK_BATCH,
    ) -> None:
        """`changed`: the run has changes to commit; `prepare`: what completes jobs just
        before they are sent (a retry's last heartbeat); `check_batch`: attempts looked for
        in Redis per poll."""
        self.dispatcher = dispatcher
        self.metrics = measures
        self._runs = runs
        self._poll_interval = poll_interval
        self._fetch = fetch
        self._clock = clock
        self._changed = changed
        self._drop = drop
        self._spawn = spawn
        self._prepare = prepare
        self._dispatch_failing = False  # Redis refused the last dispatches (warned once)
        # Attempts being enqueued now: a big commit's take seconds to send, and an attempt
        # not sent yet is not lost (it was counted so, and sent twice: 69,000 of 100,000).
        self._delivering: set[UUID] = set()
        self._redelivery_due = False  # a retry of the refused dispatches is scheduled
        self._check_batch = check_batch
        self._checked: set[UUID] = set()  # looked for in this round of the rotation

    async def redeliver(self) -> None:
        """Enqueue committed dispatches; what Redis refuses is kept and tried again a
        second later (not only at the next poll), so a Redis that comes back is used within
        a second. One warning per outage, not one per try."""
        todo = self._runs.take_undelivered()
        if not todo:
            return
        ids = [d.attempt_id for d, _ in todo]
        self._delivering.update(ids)
        try:
            if self._prepare is not None:
                todo = await self._prepare(todo)
            outcomes = await self.dispatcher.dispatch_many(todo)
        finally:
            self._delivering.difference_update(ids)
        failed = [
            d.attempt_id
            for (d, _), ok in zip(todo, outcomes, strict=True)
            if isinstance(ok, BaseException)
        ]
        self.metrics.observe_enqueued(
            d
            for (d, _), ok in zip(todo, outcomes, strict=True)
            if not isinstance(ok, BaseException)
        )
        self.metrics.dispatch_failures.inc(len(failed))
        if not failed:
            if self._dispatch_failing:
                log.info("Redis takes dispatches again")
            self._dispatch_failing = False
            return
        if not self._dispatch_failing:
            log.warning("%d dispatch(es) failed; retrying every second", len(failed))
        self._dispatch_failing = True
        self._runs.deliver_again(failed)
        if not self._redelivery_due:
            self._redelivery_due = True
            asyncio.get_running_loop().call_later(REDELIVERY_DELAY, self._redeliver_again)

    def _redeliver_again(self) -> None:
        self._redelivery_due = False
        self._spawn(self.redeliver())

    async def reconcile_jobs(self) -> None:
        """Every dispatched attempt has a result, a job in Redis, or is sent again.

        At most `check_batch` attempts are looked for per poll, those not looked for yet in
        this round first: each is looked for within `ceil(outstanding / check_batch)`
        polls. Once one is missing, every other is looked for at once: a Redis that lost a
        job (restarted empty, failed over) has most likely lost them all."""
        settled = time.monotonic() - self._poll_interval  # leave fresh ones alone
        sent = [
            attempt
            for attempt in self._runs.sent_before(settled)
            if attempt not in self._delivering and not self._runs.undelivered(attempt)
        ]
        if not sent:
            self._checked.clear()
            return
        unchecked = (a for a in sent if a not in self._checked)
        batch = list(itertools.islice(unchecked, self._check_batch))
        if not batch:  # the round is over: the next begins
            self._checked.clear()
            batch = sent[: self._check_batch]
        try:
            lost = await self._lost(batch)
            if lost and len(batch) < len(sent):
                looked = set(batch)
                lost += await self._lost([a for a in sent if a not in looked])
                self._checked.clear()
            else:
                self._checked.update(batch)
        except Exception as exc:
            log.warning("could not check the jobs of %d attempt(s): %s", len(batch), exc)
            return
        if lost:
            log.warning("%d attempt(s) had no job in Redis: sending them again", len(lost))
            self.metrics.reconciled("redelivered", len(lost))
            self._runs.deliver_again(lost)
            await self.redeliver()

    async def _lost(self, attempts: list[UUID]) -> list[UUID]:
        """Those of `attempts` Redis knows nothing of and that have no stored result."""
        lost = await self.dispatcher.missing(attempts)
        if lost:
            answered = {r.attempt_id for _, r in await self._fetch(lost)}
            lost = [a for a in lost if a not in answered]
        return lost

    async def probe(self, run_id: UUID, probes: list[tuple[str, UUID, str]]) -> None:
        """schedule_to_start passed: time out the attempts no worker has taken."""
        try:
            waiting = await self.dispatcher.waiting([(a, t) for _, a, t in probes])
        except Exception as exc:  # Redis away: the deadline still ends the attempts
            log.warning("could not check %d attempt(s) in Redis: %s", len(probes), exc)
            return
        owned = self._runs.get(run_id)
        if owned is None:
            return
        now = self._clock()
        try:
            for (key, attempt, _), untaken in zip(probes, waiting, strict=True):
                if untaken and owned.state.not_picked_up(key, attempt, now):
                    self._changed(run_id)
        except Exception:  # a bug must not take the daemon down with it
            log.exception(
                "run %s: timing out attempts failed", run_id, extra={"run_id": str(run_id)}
            )
            self._drop(run_id, "internal error while timing out an attempt", give_back=True)

    async def abort(self, attempts: list[UUID]) -> None:
        """Ask workers to stop cancelled attempts; best effort, their results are ignored."""
        try:
            await self.dispatcher.abort(*attempts)
        except Exception as exc:
            log.warning("could not abort %d attempt(s): %s", len(attempts), exc)
