"""The heartbeat watcher: attempts of steps with a `heartbeat_timeout` must beat.

Workers write each attempt's last heartbeat in batches (`worker.heartbeats`); this part
reads the age of those of the owned runs' beating attempts, in one query, a few times per
timeout, and times out an attempt whose worker went silent for longer than its step
allows (`heartbeat_timeout`, retried per policy). An attempt that never beat is silent
from its dispatch on, unless its job still waits in Redis for a worker (then
`schedule_to_start`, not the heartbeat, bounds it).

It also hands a retried attempt the details of the last heartbeat its previous attempt
sent, just before the job goes to Redis (`fill`), so a long job resumes where it was.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from uuid import UUID

from flowforge_orchestrator import store
from flowforge_orchestrator.core.records import Dispatch
from flowforge_orchestrator.engine.owned import Drop, OwnedRuns, Sent
from flowforge_orchestrator.ops import metrics
from flowforge_orchestrator.queue.dispatch import Dispatcher
from flowforge_orchestrator.store import events as store_events

__all__ = ["HeartbeatWatcher"]

log = logging.getLogger("flowforge_orchestrator.engine.orchestrator")

IDLE_INTERVAL = 1.0  # seconds between looks when nothing beats
MIN_INTERVAL = 0.1


class HeartbeatWatcher:
    """Times out the owned runs' attempts whose worker stopped beating."""

    def __init__(
        self,
        pool: store.Pool,
        dispatcher: Dispatcher,
        measures: metrics.OrchestratorMetrics,
        runs: OwnedRuns,
        *,
        clock: Callable[[], datetime],
        changed: Callable[[UUID], None],
        drop: Drop,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.dispatcher = dispatcher
        self.metrics = measures
        self._runs = runs
        self._clock = clock
        self._changed = changed
        self._drop = drop
        self._monotonic = monotonic

    async def loop(self) -> None:
        while True:
            beating = self._runs.beating()
            await asyncio.sleep(_interval(beating))
            try:
                await self.check()
            except Exception as exc:  # the database or Redis away: look again later
                log.warning("could not check heartbeats: %s", exc)
                await asyncio.sleep(IDLE_INTERVAL)

    async def check(self) -> None:
        beating = self._runs.beating()
        if not beating:
            return
        async with self.pool.acquire() as conn:
            ages = await store_events.heartbeat_ages(
                conn, [sent.dispatch.attempt_id for _, sent in beating]
            )
        now = self._monotonic()
        silent: list[tuple[UUID, Dispatch, float]] = []
        never: list[tuple[UUID, Dispatch, float]] = []
        for run_id, sent in beating:
            dispatch = sent.dispatch
            limit = dispatch.heartbeat_timeout or 0.0
            age = ages.get(dispatch.attempt_id)
            if age is not None and age > limit:
                silent.append((run_id, dispatch, age))
            elif age is None and now - sent.at > limit:
                never.append((run_id, dispatch, now - sent.at))
        if never:
            queued = await self.dispatcher.waiting(
                [(d.attempt_id, d.step_type) for _, d, _ in never]
            )
            silent += [entry for entry, waits in zip(never, queued, strict=True) if not waits]
        for run_id, dispatch, age in silent:
            self._missed(run_id, dispatch, age)

    def _missed(self, run_id: UUID, dispatch: Dispatch, silent: float) -> None:
        owned = self._runs.get(run_id)
        if owned is None:
            return
        try:
            missed = owned.state.heartbeat_missed(
                dispatch.step_id, dispatch.attempt_id, silent, self._clock()
            )
        except Exception:  # a bug must not take the daemon down with it
            log.exception(
                "run %s: timing out a silent attempt failed", run_id, extra={"run_id": str(run_id)}
            )
            self._drop(run_id, "internal error while timing out a silent attempt", give_back=True)
            return
        if missed:
            self.metrics.heartbeats_missed.inc()
            log.warning(
                "run %s: attempt %s of %s sent no heartbeat for %.1fs; timed out",
                run_id,
                dispatch.attempt_id,
                dispatch.step_id,
                silent,
                extra={"run_id": str(run_id)},
            )
            self._changed(run_id)

    async def fill(
        self, todo: list[tuple[Dispatch, str | None]]
    ) -> list[tuple[Dispatch, str | None]]:
        """The jobs to send, each retry of a beating step given its previous attempt's last
        heartbeat. Best effort: without the database, they go without it."""
        wanted = [d.previous_attempt_id for d, _ in todo if _needs_last_beat(d)]
        if not wanted:
            return todo
        try:
            async with self.pool.acquire() as conn:
                details = await store_events.last_heartbeats(conn, [w for w in wanted if w])
        except Exception as exc:
            log.warning("could not read the last heartbeats of %d attempt(s): %s", len(wanted), exc)
            return todo
        return [
            (_with_last_beat(d, details), tp) if _needs_last_beat(d) else (d, tp) for d, tp in todo
        ]


def _needs_last_beat(dispatch: Dispatch) -> bool:
    return dispatch.previous_attempt_id is not None and dispatch.last_heartbeat is None


def _with_last_beat(dispatch: Dispatch, details: dict[UUID, object]) -> Dispatch:
    assert dispatch.previous_attempt_id is not None
    last = details.get(dispatch.previous_attempt_id)
    return dispatch if last is None else dataclasses.replace(dispatch, last_heartbeat=last)


def _interval(beating: Sequence[tuple[UUID, Sent]]) -> float:
    """A quarter of the shortest heartbeat timeout among the beating attempts."""
    timeouts = [s.dispatch.heartbeat_timeout or IDLE_INTERVAL for _, s in beating]
    return max(MIN_INTERVAL, min([IDLE_INTERVAL, *(t / 4 for t in timeouts)]))
