"""The orchestrator's upkeep: timers, leases, cancellations, and the reconciler that keeps
every dispatched attempt answered (mixed into Orchestrator).

* timers:     one heap of the runs' next timers (delays, backoffs, deadlines); one loop
              sleeps until the earliest, so thousands of parked runs cost no query each;
* leases:     one statement renews every lease held; a run no longer ours is dropped;
* cancels:    `flowforge_cancel` NOTIFY, and on the slow poll the requests we missed; a
              requested pending run that waits for a concurrency slot is un-blocked, so a
              claim cancels it (the API's request locks no run row);
* reconciler: on the slow poll, attempts of which Redis knows nothing (and that have no
              result) are sent again; at schedule_to_start, attempts no worker took time out.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from opentelemetry import trace

from flowforge_orchestrator import store
from flowforge_orchestrator.core.graph.run import RunState
from flowforge_orchestrator.core.records import Dispatch, RunChanges, StepResult
from flowforge_orchestrator.core.tokens import RefusedResult
from flowforge_orchestrator.errors import FlowForgeError
from flowforge_orchestrator.ops import metrics

if TYPE_CHECKING:
    from flowforge_orchestrator.config import Settings
    from flowforge_orchestrator.queue.dispatch import Dispatcher

__all__ = ["Owned", "Upkeep"]

log = logging.getLogger("flowforge_orchestrator.engine.orchestrator")


@dataclass
class Owned:
    """A run this orchestrator owns, with the fence its writes carry."""

    state: RunState
    epoch: int
    span: trace.Span
    traceparent: str | None
    new_traceparent: str | None = None  # written with the next commit (fresh starts only)
    # Dispatched, no result applied yet: what was sent, and when (monotonic), so that an
    # attempt Redis lost can be sent again.
    attempts: dict[UUID, tuple[Dispatch, float]] = field(default_factory=dict)
    timer_at: datetime | None = None  # the run's next timer, as pushed on the heap
    seq: int = 0  # the last transition written: a run that cannot be written fails after it
    # Changes a commit could not write because another session held the run's row: the
    # next commit writes them first. `deferrals` counts the tries, for the backoff.
    unwritten: RunChanges | None = None
    deferrals: int = 0

    def take_changes(self) -> RunChanges | None:
        """What the next commit writes for this run: unwritten changes first, then new ones."""
        later = self.state.take_changes()
        earlier, self.unwritten = self.unwritten, None
        return later if earlier is None else earlier.then(later)


class Upkeep:
    """The upkeep half of Orchestrator; the attributes below are Orchestrator's."""

    if TYPE_CHECKING:
        settings: Settings
        pool: store.Pool
        dispatcher: Dispatcher
        node: str
        metrics: metrics.OrchestratorMetrics
        runs: dict[UUID, Owned]
        clock: Any
        _dirty: set[UUID]
        _wake_commit: asyncio.Event
        _wake_timers: asyncio.Event
        _timers: list[tuple[datetime, int, UUID]]
        _timer_seq: int
        _to_release: set[UUID]
        _undelivered: list[tuple[Dispatch, str | None]]
        _owned_rows: asyncio.Lock

        def _drop(self, run_id: UUID, why: str, *, give_back: bool = False) -> None: ...
        async def _redeliver(self) -> None: ...
        async def _fetch(self, wanted: list[UUID]) -> list[tuple[UUID, StepResult]]: ...
        def _in_background(self, coro: Coroutine[Any, Any, None]) -> None: ...

    def _on_cancel_notify(self, payload: str) -> None:
        try:
            run_id = UUID(payload)
        except ValueError:
            return
        self._cancel(run_id)

    def _result_refused(self, refused: RefusedResult) -> None:
        """A result row that does not count (wrong token) or cannot be read; once per row."""
        self.metrics.results_refused.labels(refused.reason).inc()
        log.error(
            "result of attempt %s refused (%s): %s",
            refused.attempt_id,
            refused.reason,
            refused.detail,
            extra={"run_id": str(refused.run_id), "attempt_id": str(refused.attempt_id)},
        )

    def _cancel(self, run_id: UUID) -> None:
        owned = self.runs.get(run_id)
        if owned is None:
            # Pending (a claim cancels it, once it no longer waits for a slot) or another
            # replica's (the owner cancels it).
            self._in_background(self._unblock([run_id]))
            return
        try:
            if owned.state.cancel(self.clock(), "cancel requested"):
                self._dirty.add(run_id)
                self._wake_commit.set()
        except Exception:  # a bug must not take the daemon down with it
            log.exception("run %s: cancelling failed", run_id, extra={"run_id": str(run_id)})
            self._drop(run_id, "internal error while cancelling", give_back=True)

    async def _reconcile_jobs(self) -> None:
        """Every dispatched attempt has a result, a job in Redis, or is sent again: a Redis
        that lost its data (restarted without persistence, failed over) loses no run."""
        settled = time.monotonic() - self.settings.poll_interval  # leave fresh ones alone
        sent = {
            attempt: (dispatch, owned.traceparent)
            for owned in self.runs.values()
            for attempt, (dispatch, at) in owned.attempts.items()
            if at < settled
        }
        if not sent:
            return
        try:
            lost = await self.dispatcher.missing(list(sent))
            if lost:
                answered = {r.attempt_id for _, r in await self._fetch(lost)}
                lost = [a for a in lost if a not in answered]
        except Exception as exc:
            log.warning("could not check the jobs of %d attempt(s): %s", len(sent), exc)
            return
        if lost:
            log.warning("%d attempt(s) had no job in Redis: sending them again", len(lost))
            self.metrics.reconciled("redelivered", len(lost))
            self._undelivered.extend(sent[a] for a in lost)
            await self._redeliver()

    async def _unblock(self, run_ids: list[UUID]) -> None:
        """Let these runs, if pending, requested and waiting for a concurrency slot, be
        claimed (and so cancelled)."""
        try:
            async with self.pool.acquire() as conn:
                await store.unblock_cancelled(conn, run_ids)
        except Exception as exc:  # the slow poll tries again
            log.warning("could not un-block cancelled runs: %s", exc)

    async def _missed_cancels(self) -> None:
        """Cancellations whose notification we may have missed (LISTEN was down); requests
        whose run has ended are marked handled."""
        try:
            async with self.pool.acquire() as conn:
                await store.unblock_cancelled(conn, None)
                await store.settle_cancel_requests(conn)
                wanted = await store.cancel_requested(conn, self.node) if self.runs else []
        except Exception as exc:
            log.warning("could not look for cancellations: %s", exc)
            return
        for run_id in wanted:
            self._cancel(run_id)

    async def _probe(self, run_id: UUID, probes: list[tuple[str, UUID, str]]) -> None:
        """schedule_to_start passed: time out the attempts no worker has taken."""
        try:
            waiting = await self.dispatcher.waiting([(a, t) for _, a, t in probes])
        except Exception as exc:  # Redis away: the deadline still ends the attempts
            log.warning("could not check %d attempt(s) in Redis: %s", len(probes), exc)
            return
        owned = self.runs.get(run_id)
        if owned is None:
            return
        now = self.clock()
        try:
            for (key, attempt, _), untaken in zip(probes, waiting, strict=True):
                if untaken and owned.state.not_picked_up(key, attempt, now):
                    self._dirty.add(run_id)
                    self._wake_commit.set()
        except Exception:  # a bug must not take the daemon down with it
            log.exception(
                "run %s: timing out attempts failed", run_id, extra={"run_id": str(run_id)}
            )
            self._drop(run_id, "internal error while timing out an attempt", give_back=True)

    async def _abort(self, attempts: list[UUID]) -> None:
        """Ask workers to stop cancelled attempts; best effort, their results are ignored."""
        try:
            await self.dispatcher.abort(*attempts)
        except Exception as exc:
            log.warning("could not abort %d attempt(s): %s", len(attempts), exc)

    # -- timers --------------------------------------------------------------------------

    def _schedule(self, run_id: UUID, owned: Owned) -> None:
        """Push the run's next timer if it changed; the loop wakes if it is the earliest."""
        when = owned.state.next_timer()
        if when is None or when == owned.timer_at:
            owned.timer_at = when
            return
        owned.timer_at = when
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, run_id))
        if self._timers[0][2] == run_id:
            self._wake_timers.set()

    async def _timer_loop(self) -> None:
        while True:
            self._wake_timers.clear()
            now = self.clock()
            due: list[UUID] = []
            while self._timers:
                when, _, run_id = self._timers[0]
                owned = self.runs.get(run_id)
                if owned is None or owned.timer_at != when:
                    heapq.heappop(self._timers)  # stale: the run moved on or left
                elif when <= now:
                    heapq.heappop(self._timers)
                    owned.timer_at = None
                    due.append(run_id)
                else:
                    break
            for run_id in due:
                self._fire(run_id, now)
            if due:
                self._wake_commit.set()
            delay = (self._timers[0][0] - now).total_seconds() if self._timers else None
            try:
                await asyncio.wait_for(self._wake_timers.wait(), timeout=delay)
            except TimeoutError:
                pass

    def _fire(self, run_id: UUID, now: datetime) -> None:
        owned = self.runs.get(run_id)
        if owned is None:
            return
        try:
            if owned.state.fire_timers(now):
                self._dirty.add(run_id)
            self._schedule(run_id, owned)
        except Exception:  # a bug must not take the daemon down with it
            log.exception("run %s: firing a timer failed", run_id, extra={"run_id": str(run_id)})
            self._drop(run_id, "internal error while firing a timer", give_back=True)

    # -- leases --------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        interval = self.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            # Only runs owned before the renewal started can be judged by its answer; one
            # claimed meanwhile is ours even though the statement did not see it.
            before = {run_id: owned.epoch for run_id, owned in self.runs.items()}
            try:
                held = await store.retrying(self._renew, what="renewing leases", attempts=3)
            except FlowForgeError as exc:
                log.error("renewing leases failed: %s", exc)
                continue
            self.metrics.leases_held.set(len(held))
            for run_id, epoch in before.items():
                owned = self.runs.get(run_id)
                if owned is not None and owned.epoch == epoch and held.get(run_id) != epoch:
                    self._drop(run_id, "lease lost")

    async def _renew(self) -> dict[UUID, int]:
        async with self._owned_rows, self.pool.acquire() as conn:
            if self._to_release:
                released = list(self._to_release)
                await store.release_leases(conn, self.node, released)
                self._to_release.difference_update(released)
            owned = list(self.runs)
            try:
                return await store.renew_leases(conn, self.node, self.settings.lease_seconds, owned)
            except Exception as exc:
                if not store.is_lock_timeout(exc):
                    raise
                # A row locked by another session: renew the others now, that one next time.
                log.warning("a run's row is locked by another session; renewing the others")
                return await store.renew_leases(
                    conn, self.node, self.settings.lease_seconds, owned, skip_locked=True
                )
