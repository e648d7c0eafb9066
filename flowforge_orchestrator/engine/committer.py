"""The group commit: whatever the graphs changed since the last commit goes out in ONE
statement, written so that no run's fault touches another's.

The database refuses a run's data: the batch is halved until that run is alone, and it
fails after its last stored transition. A row locked by another session: the batch is
written again without waiting for locked rows, and their runs wait for a later commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core import jsonb
from flowforge_orchestrator.core.records import RunChanges, rejected_run
from flowforge_orchestrator.core.state import RunStatus
from flowforge_orchestrator.engine.children import trace_children
from flowforge_orchestrator.engine.faults import cause, set_aside
from flowforge_orchestrator.engine.owned import Drop, Owned, OwnedRuns
from flowforge_orchestrator.errors import StepError, StoreError
from flowforge_orchestrator.ops import metrics

__all__ = ["Committer", "owned_changes"]

log = logging.getLogger("flowforge_orchestrator.engine.orchestrator")

Item = tuple[Owned, RunChanges]


@dataclass
class _Verdict:
    """What became of each run of a group commit."""

    written: list[Item] = field(default_factory=list)
    lost: list[Item] = field(default_factory=list)  # epoch moved on, or the run is gone
    deferred: list[Item] = field(default_factory=list)  # row locked
    failed: list[tuple[Item, StoreError]] = field(default_factory=list)

    def __add__(self, other: _Verdict) -> _Verdict:
        return _Verdict(
            self.written + other.written,
            self.lost + other.lost,
            self.deferred + other.deferred,
            self.failed + other.failed,
        )


def owned_changes(
    owned: Owned, changes: RunChanges, *, new_epoch: int, claimed: bool = False
) -> store.OwnedChanges:
    """The write of a run's changes, fenced by its epoch; it hibernates the run if
    `owned.parking` says so (and the changes leave it running)."""
    parking = owned.parking if changes.status is RunStatus.RUNNING else None
    return store.OwnedChanges(
        changes,
        epoch=owned.epoch,
        new_epoch=new_epoch,
        claimed=claimed,
        traceparent=owned.new_traceparent if claimed else None,
        parked=parking is not None,
        wake_at=parking.wake_at if parking is not None else None,
        waits=parking.waits if parking is not None else (),
    )


class Committer:
    """Writes the owned runs' changes, each run's fate its own."""

    def __init__(
        self,
        settings: Settings,
        pool: store.Pool,
        measures: metrics.OrchestratorMetrics,
        runs: OwnedRuns,
        *,
        owned_rows: asyncio.Lock,
        clock: Callable[[], datetime],
        committed: Callable[[Owned, RunChanges], None],
        changed: Callable[[UUID], None],
        drop: Drop,
    ) -> None:
        """`committed`: what follows a durable write (enqueue, abort, forget); `changed`:
        the run has changes to commit; `owned_rows`: held while owned rows are written."""
        self.settings = settings
        self.node = settings.node_id
        self.pool = pool
        self.metrics = measures
        self._runs = runs
        self._owned_rows = owned_rows
        self._clock = clock
        self._committed = committed
        self._changed = changed
        self._drop = drop

    async def commit(self, batch: list[Item]) -> None:
        started = time.perf_counter()
        verdict = await self._write_isolating(batch, skip_locked=False)
        self.metrics.observe_commit(
            "commit",
            [c for _, c in verdict.written],
            seconds=time.perf_counter() - started,
            now=self._clock(),
        )
        for owned, changes in verdict.written:
            owned.deferrals = 0
            owned.seq = int(changes.checkpoint.get("seq", owned.seq))
            self._committed(owned, changes)
        for _, changes in verdict.lost:
            self._drop(changes.run_id, "lost ownership (epoch moved on)")
        for owned, changes in verdict.deferred:
            self._defer(owned, changes)
        for (owned, changes), fault in verdict.failed:
            await self._fail_unwritable(owned, changes, fault)

    async def _write(self, items: list[Item], *, skip_locked: bool) -> dict[UUID, bool]:
        """One statement, atomic on its own: no BEGIN/COMMIT round trips."""
        for owned, changes in items:
            trace_children(owned, changes)  # the child runs' rows carry their step's span
        writes = [owned_changes(o, changes, new_epoch=o.epoch) for o, changes in items]
        async with self._owned_rows, self.pool.acquire() as conn:
            if skip_locked:
                return await store.write_changes_skip_locked(
                    conn, self.node, self.settings.lease_seconds, writes
                )
            written = await store.write_changes(
                conn, self.node, self.settings.lease_seconds, writes
            )
            return dict.fromkeys(written, True)

    async def _write_isolating(self, items: list[Item], *, skip_locked: bool) -> _Verdict:
        """Write a group commit so that no run's fault touches another's (see the module);
        transient failures (the database away) are retried until they pass."""
        try:
            answer = await store.retrying(
                lambda: self._write(items, skip_locked=skip_locked),
                what="committing transitions",
            )
        except StoreError as exc:
            if store.is_lock_timeout(exc) and not skip_locked:
                return await self._write_isolating(items, skip_locked=True)
            if not store.is_lock_timeout(exc) and not store.is_member_fault(exc):
                raise
            if len(items) == 1:
                if store.is_lock_timeout(exc):
                    return _Verdict(deferred=items)
                return _Verdict(failed=[(items[0], exc)])
            half = len(items) // 2
            first = await self._write_isolating(items[:half], skip_locked=skip_locked)
            return first + await self._write_isolating(items[half:], skip_locked=skip_locked)
        return await self._classify(items, answer, skip_locked=skip_locked)

    async def _classify(
        self, items: list[Item], answer: dict[UUID, bool], *, skip_locked: bool
    ) -> _Verdict:
        """Sort a written batch by its statement's answer (see `store.write_changes*`)."""
        verdict = _Verdict()
        missing: list[Item] = []
        for item in items:
            written = answer.get(item[1].run_id)
            if written is None and skip_locked:
                missing.append(item)  # locked elsewhere, or gone
            elif written:
                verdict.written.append(item)
            else:
                verdict.lost.append(item)
        if missing:
            async with self.pool.acquire() as conn:
                exist = await store.existing_runs(conn, [c.run_id for _, c in missing])
            for item in missing:
                (verdict.deferred if item[1].run_id in exist else verdict.lost).append(item)
        return verdict

    def _defer(self, owned: Owned, changes: RunChanges) -> None:
        """Another session holds the run's row: keep its changes for a later commit, tried
        again with a growing pause (the others went on without it)."""
        owned.unwritten = changes
        owned.deferrals += 1
        self.metrics.reconciled("deferred")
        if owned.deferrals == 1:
            log.warning(
                "run %s: its row is locked by another session; its changes wait",
                changes.run_id,
                extra={"run_id": str(changes.run_id)},
            )
        delay = min(5.0, 0.1 * 2**owned.deferrals)
        run_id = changes.run_id

        def again() -> None:
            if self._runs.get(run_id) is owned:
                self._changed(run_id)

        asyncio.get_running_loop().call_later(delay, again)

    async def _fail_unwritable(self, owned: Owned, changes: RunChanges, fault: StoreError) -> None:
        """The database refuses this run's changes: fail the run after its last stored
        transition, with the cause. Its attempts still out are aborted. If not even that can
        be written, the run is set apart: left as it is, and never claimed here again."""
        run_id = changes.run_id
        why = f"the database refused to store this run's changes: {cause(fault)}"
        error = StepError(jsonb.storable(why), category="storage_error", retryable=False)
        now = self._clock()

        async def write_alone() -> tuple[bool, RunChanges]:
            async with self._owned_rows, self.pool.acquire() as conn:
                seq = max(owned.seq, await store.last_seq(conn, run_id))
                failed = rejected_run(run_id, RunStatus.RUNNING, seq, error.to_dict(), now)
                failed.aborts = self._runs.attempts_of(run_id)
                write = store.OwnedChanges(failed, epoch=owned.epoch, new_epoch=owned.epoch)
                written = await store.write_changes(
                    conn, self.node, self.settings.lease_seconds, [write]
                )
                return run_id in written, failed

        try:
            written, failed = await store.retrying(write_alone, what="failing a run", attempts=5)
        except Exception as exc:
            self._drop(run_id, "its changes cannot be stored")
            set_aside(self._runs, self.metrics, run_id, why, exc)
            return
        if not written:
            self._drop(run_id, "lost ownership (epoch moved on)")
            return
        self.metrics.reconciled("unstorable")
        log.error("run %s failed: %s", run_id, why, extra={"run_id": str(run_id)})
        self._committed(owned, failed)
