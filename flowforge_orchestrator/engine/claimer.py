"""The claimer: on NOTIFY `flowforge_runs` or the slow poll, lock runs, build their graphs,
write their first transitions and take the lease, all in one transaction.

A run's bad input, definition or concurrency key fails that run alone; when the database
refuses a batch, it is halved until the run at fault is alone, and that run is failed in a
transaction of its own (or set apart, if not even that can be written).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from uuid import UUID

from opentelemetry import trace

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core import jsonb
from flowforge_orchestrator.core.concurrency import concurrency_keys
from flowforge_orchestrator.core.expressions.templates import Evaluator
from flowforge_orchestrator.core.graph.run import CompiledWorkflow, RunState
from flowforge_orchestrator.core.records import (
    Limits,
    RunChanges,
    StepResult,
    rejected_run,
)
from flowforge_orchestrator.core.state import RunStatus
from flowforge_orchestrator.core.tokens import ResultVerifier
from flowforge_orchestrator.engine.admission import read_inputs, reject
from flowforge_orchestrator.engine.children import end_child_spans, trace_children
from flowforge_orchestrator.engine.committer import owned_changes
from flowforge_orchestrator.engine.faults import cause, set_aside
from flowforge_orchestrator.engine.owned import Owned, OwnedRuns
from flowforge_orchestrator.engine.parking import Parking, park_until, wake_ahead
from flowforge_orchestrator.engine.workflows import Rejected, Workflows
from flowforge_orchestrator.errors import ExpressionError, FlowForgeError, StoreError
from flowforge_orchestrator.ops import metrics, telemetry

__all__ = ["MAX_STRIKES", "Claimed", "Claimer"]

log = logging.getLogger("flowforge_orchestrator.engine.orchestrator")

MAX_STRIKES = 3  # errors on one run before it is failed rather than resumed again

# A claimed run is ours: (the run, its first changes, written; the attempts whose results
# are stored already; whether it was adopted, running, from another owner).
Claimed = Callable[[Owned, RunChanges, Collection[UUID], bool], None]


def _incarnation(created_at: datetime | None) -> str | None:
    """When the run's row was created, to the microsecond: what tells two runs inserted
    under one id apart (`nodes.attempt_id`)."""
    return created_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%f") if created_at else None


@dataclass
class _Batch:
    """One claim in the making: what each row becomes."""

    rows: list[store.ClaimedRun]
    results: dict[UUID, dict[UUID, StepResult]]
    writes: list[store.OwnedChanges] = field(default_factory=list)
    claimed: dict[UUID, Owned] = field(default_factory=dict)
    blocked: set[UUID] = field(default_factory=set)  # waiting for a concurrency slot


class Claimer:
    """Claims pending runs and adopts runs whose owner's lease expired."""

    def __init__(
        self,
        settings: Settings,
        pool: store.Pool,
        measures: metrics.OrchestratorMetrics,
        runs: OwnedRuns,
        *,
        verifier: ResultVerifier,
        limits: Limits,
        evaluator: Evaluator | None,
        clock: Callable[[], datetime],
        claimed: Claimed,
        may_claim: Callable[[], bool] = lambda: True,
    ) -> None:
        """`may_claim`: False while this replica does not hold its node lock (the other
        replicas would take what it claims); whoever makes it true again sets `wake`."""
        self.settings = settings
        self.node = settings.node_id
        self.pool = pool
        self.metrics = measures
        self._runs = runs
        self._verifier = verifier
        self._limits = limits
        self._evaluator = evaluator
        self.clock = clock
        self._claimed = claimed
        self._may_claim = may_claim
        self._workflows = Workflows()
        self._wake_ahead = wake_ahead(settings.hibernate_after)
        self.wake = asyncio.Event()

    async def loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            if not self._may_claim():
                continue
            try:
                while await self._claim_isolating():
                    pass
            except FlowForgeError as exc:
                log.error("claiming runs failed: %s", exc)

    async def _claim_isolating(self, among: list[UUID] | None = None) -> bool:
        """Claim a batch (or the runs `among`). When the database refuses the batch, the run
        at fault is found by claiming each half on its own, and is failed alone: one run's
        data never stops the claiming of the others. True if there may be more to claim."""
        tried: list[UUID] = []
        try:
            return await store.retrying(
                functools.partial(self._claim_once, among, tried),
                what="claiming runs",
                attempts=3,
            )
        except StoreError as exc:
            if not store.is_member_fault(exc) or not tried:
                raise
            fault = exc
        if len(tried) == 1:
            await self._reject_alone(tried[0], fault)
        else:
            log.debug("a claim of %d runs was refused (%s); halving it", len(tried), fault)
            half = len(tried) // 2
            for part in (tried[:half], tried[half:]):
                await self._claim_isolating(part)
        return among is None

    async def _claim_once(self, among: list[UUID] | None, tried: list[UUID]) -> bool:
        """Claim one batch; True if the batch was full (there may be more). The ids of the
        rows read go to `tried` (for `_claim_isolating`, should the write be refused)."""
        now = self.clock()
        tried.clear()
        started = time.perf_counter()
        async with store.transaction(self.pool) as conn:
            rows = await store.claim_runs(
                conn,
                self.settings.claim_batch,
                among=among,
                set_apart=self._runs.apart(),
                wake_ahead=self._wake_ahead,
            )
            if not rows:
                return False
            tried.extend(row.id for row in rows)
            batch = await self._build(conn, rows, now)
            try:
                await store.write_changes(
                    conn, self.node, self.settings.lease_seconds, batch.writes
                )
            except BaseException:
                for owned in batch.claimed.values():  # these graphs never became ours
                    end_child_spans(owned)
                    owned.span.end()
                raise
        written = {w.changes.run_id: w.changes for w in batch.writes}
        self.metrics.observe_commit(
            "claim", list(written.values()), seconds=time.perf_counter() - started, now=now
        )
        self._took(batch, written)
        log.debug("claimed %d run(s)", len(rows))
        return among is None and len(rows) == self.settings.claim_batch

    async def _build(
        self, conn: store.Connection, rows: list[store.ClaimedRun], now: datetime
    ) -> _Batch:
        """What each claimed row becomes: a run of ours, a failed run, or one left waiting."""
        inputs, refused = read_inputs(rows, self.settings.max_context_bytes, now)
        adopted = [r.id for r in rows if r.status == RunStatus.RUNNING]
        # A redriven run is pending with a checkpoint: it reads earlier outputs too.
        restored = adopted + [r.id for r in rows if r.status == "pending" and r.checkpoint]
        results = await store.fetch_run_results(conn, restored, self._verifier) if restored else {}
        batch = _Batch(rows, results)
        batch.blocked = await self._acquire_slots(conn, rows, inputs, refused, now)
        for row in rows:
            if row.id in batch.blocked:
                continue  # waits for a concurrency slot: stays pending, not ours
            try:
                owned, changes = refused.get(row.id) or await self._take_over(
                    conn, row, inputs[row.id], results.get(row.id, {}), now
                )
            except Exception as exc:
                if store.is_database_error(exc):
                    raise  # the transaction is gone: retry the whole claim
                # A bug on this run's path must not stop the claiming of every other
                # run: fail this one, with the reason, and go on.
                log.exception("run %s could not be started", row.id, extra={"run_id": str(row.id)})
                owned, changes = None, reject(row, f"internal error: {exc}", now)
            if owned is None:
                write = store.OwnedChanges(
                    changes, epoch=row.epoch, new_epoch=row.epoch + 1, claimed=True
                )
            else:
                batch.claimed[row.id] = owned
                owned.parking = self._parking(row, owned, now)
                write = owned_changes(owned, changes, new_epoch=row.epoch + 1, claimed=True)
            batch.writes.append(write)
        return batch

    def _parking(self, row: store.ClaimedRun, owned: Owned, now: datetime) -> Parking | None:
        """Whether the claimed run hibernates again at once: parked on a far timer, yes
        (claiming many parked runs never holds them all in memory). A run woken with
        waits, no: an event may be what woke it, and its waits look for it once it is
        claimed (it hibernates again with a later commit)."""
        if row.wake_at is not None and owned.state.waiting():
            return None
        return park_until(owned.state, now, self.settings.hibernate_after)

    def _took(self, batch: _Batch, written: dict[UUID, RunChanges]) -> None:
        """The claim committed: its runs are ours, fenced by their new epoch."""
        rows, claimed = batch.rows, batch.claimed
        adopted_count = sum(
            1
            for r in rows
            if r.status == RunStatus.RUNNING and r.id in claimed and r.wake_at is None
        )
        self.metrics.reconciled("adopted", adopted_count)
        self.metrics.reconciled("woken", sum(1 for r in rows if r.wake_at is not None))
        self.metrics.reconciled(
            "rejected", sum(1 for r in rows if r.id not in claimed) - len(batch.blocked)
        )
        for row in rows:
            owned = claimed.get(row.id)
            if owned is None:
                continue
            owned.epoch = row.epoch + 1
            owned.new_traceparent = None
            owned.seq = int(written[row.id].checkpoint.get("seq", 0))
            answered = batch.results.get(row.id, {})
            self._claimed(owned, written[row.id], answered, row.status == RunStatus.RUNNING)

    async def _reject_alone(self, run_id: UUID, fault: StoreError) -> None:
        """Fail a run the database refused to claim, in a transaction of its own, after any
        transition already stored for it; if not even that can be written, set it apart:
        this replica never claims it again."""
        message = f"the database refused to store this run: {cause(fault)}"
        try:
            async with store.transaction(self.pool) as conn:
                rows = await store.claim_runs(conn, 1, among=[run_id], wake_ahead=self._wake_ahead)
                if not rows:
                    return  # claimed meanwhile, or no longer claimable
                row = rows[0]
                seq = await store.last_seq(conn, run_id)
                error = {"message": jsonb.storable(message), "category": "storage_error"}
                failed = rejected_run(
                    run_id, RunStatus(row.status), seq, {**error, "retryable": False}, self.clock()
                )
                write = store.OwnedChanges(
                    failed, epoch=row.epoch, new_epoch=row.epoch + 1, claimed=True
                )
                await store.write_changes(conn, self.node, self.settings.lease_seconds, [write])
        except Exception as exc:
            set_aside(self._runs, self.metrics, run_id, message, exc)
            return
        self.metrics.reconciled("unstorable")
        log.error("run %s failed: %s", run_id, message, extra={"run_id": str(run_id)})

    async def _take_over(
        self,
        conn: store.Connection,
        row: store.ClaimedRun,
        input: object,
        results: dict[UUID, StepResult],
        now: datetime,
    ) -> tuple[Owned | None, RunChanges]:
        """Build the graph of a claimed run; a run that cannot be built is failed instead."""
        status = RunStatus(row.status)
        if self._runs.strikes(row.id) >= MAX_STRIKES:
            return None, reject(
                row, f"the engine failed on this run {MAX_STRIKES} times; see its logs", now
            )
        workflow = await self._workflows.get(conn, row.workflow_name, row.workflow_version)
        if isinstance(workflow, Rejected):
            log.warning(
                "run %s rejected: %s", row.id, workflow.reason, extra={"run_id": str(row.id)}
            )
            return None, reject(row, workflow.reason, now, category="definition_error")
        assert row.workflow_version is not None
        state = RunState(
            run_id=row.id,
            workflow=workflow,
            version=row.workflow_version,
            input=input,
            limits=self._limits,
            status=status,
            checkpoint=row.checkpoint,
            results=results,
            incarnation=_incarnation(row.created_at),
            evaluator=self._evaluator,
            depth=row.depth,
        )
        if row.cancel_requested:  # asked for while pending, or while no one owned it
            state.cancel(now, "cancel requested")
            if state.status.finished:
                changes = state.take_changes()
                assert changes is not None
                return None, changes
            # It compensates first (or was compensating already): owned and resumed.
        return self._start(row, workflow, state, now)

    def _start(
        self, row: store.ClaimedRun, workflow: CompiledWorkflow, state: RunState, now: datetime
    ) -> tuple[Owned, RunChanges]:
        """Start a pending run, or resume an adopted one, under its span."""
        status = RunStatus(row.status)
        span, traceparent, new_tp = self._run_span(
            row, workflow, resumed=status is not RunStatus.PENDING
        )
        owned = Owned(state, row.epoch, span, traceparent, new_traceparent=new_tp)
        try:
            if status is RunStatus.PENDING:
                state.start(now)
            else:
                state.resume(now)
        except BaseException:
            span.end()
            raise
        changes = state.take_changes()
        assert changes is not None
        trace_children(owned, changes)
        return owned, changes

    async def _acquire_slots(
        self,
        conn: store.Connection,
        rows: list[store.ClaimedRun],
        inputs: dict[UUID, object],
        refused: dict[UUID, tuple[None, RunChanges]],
        now: datetime,
    ) -> set[UUID]:
        """Take the concurrency slots of the claimed pending runs that need them, for the
        whole batch at once (its keys are locked in one order, so that claims and releases
        do not deadlock each other). Returns the runs left waiting; a run whose concurrency
        key cannot be evaluated joins `refused`, failed."""
        wanted: dict[UUID, dict[str, int]] = {}
        for row in rows:
            if row.status != RunStatus.PENDING or row.cancel_requested or row.id in refused:
                continue  # adopted runs keep their slots; a cancelled run needs none
            workflow = await self._workflows.get(conn, row.workflow_name, row.workflow_version)
            if isinstance(workflow, Rejected):
                continue  # _take_over rejects it
            assert row.workflow_version is not None
            try:
                keys = concurrency_keys(
                    workflow.definition,
                    run_id=row.id,
                    version=row.workflow_version,
                    input=inputs[row.id],
                    evaluator=self._evaluator,
                )
            except ExpressionError as exc:
                log.warning("run %s rejected: %s", row.id, exc, extra={"run_id": str(row.id)})
                failed = reject(row, str(exc), now, category="expression_error")
                refused[row.id] = None, failed
                continue
            if keys:
                wanted[row.id] = keys
        admitted = await store.acquire_concurrency(conn, wanted)
        return set(wanted) - admitted

    def _run_span(
        self, row: store.ClaimedRun, workflow: CompiledWorkflow, *, resumed: bool
    ) -> tuple[trace.Span, str | None, str | None]:
        """The run's span; a fresh run becomes the parent of all its steps' spans."""
        name = f"workflow {workflow.definition.name}"
        span = telemetry.tracer().start_span(
            f"{name} (resumed)" if resumed else name,
            context=telemetry.context_from_traceparent(row.traceparent),
            kind=trace.SpanKind.INTERNAL,
            attributes={
                "flowforge.run_id": str(row.id),
                "flowforge.workflow": workflow.definition.name,
                "flowforge.version": row.workflow_version or 0,
            },
        )
        if resumed and row.traceparent:
            return span, row.traceparent, None
        own = telemetry.traceparent_of(span)
        return span, own, own
