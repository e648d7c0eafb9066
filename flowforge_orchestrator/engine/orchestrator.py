"""The orchestrator daemon: claims runs, drives their graphs, group-commits, dispatches.

Its loops share one event loop and never block each other:

* claim:   NOTIFY on `flowforge_runs` or the slow poll -> lock runs, build their graphs,
           write their first transitions and take the lease, all in one transaction;
* results: NOTIFY on `flowforge_results` (payload: attempt ids) or the slow poll -> fetch
           those results, apply them to the in-memory graphs (stale ones are ignored);
* commit:  whatever the graphs changed since the last commit goes out in ONE transaction
           (group commit); only after it commits are the new attempts enqueued on arq;
* leases, timers, cancellations and the reconciler: `upkeep`.

`run_orchestrator` is the process around it: pool, Redis, health and metrics endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from opentelemetry import trace
from pydantic import ValidationError

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core import jsonb
from flowforge_orchestrator.core.concurrency import concurrency_keys
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.core.expressions.cost import Budget
from flowforge_orchestrator.core.expressions.templates import Evaluator
from flowforge_orchestrator.core.graph.run import CompiledWorkflow, RunState
from flowforge_orchestrator.core.records import (
    Dispatch,
    Limits,
    RunChanges,
    StepResult,
    json_size,
    rejected_run,
)
from flowforge_orchestrator.core.state import RunStatus
from flowforge_orchestrator.core.tokens import AttemptTokens, ResultVerifier
from flowforge_orchestrator.engine.listener import Listener
from flowforge_orchestrator.engine.retention import Retention
from flowforge_orchestrator.engine.sampler import run_sampler
from flowforge_orchestrator.engine.sandbox.pool import BoundedEvaluator, Sandbox
from flowforge_orchestrator.engine.upkeep import Owned, Upkeep
from flowforge_orchestrator.errors import (
    ConfigError,
    DefinitionError,
    ExpressionError,
    FlowForgeError,
    StepError,
    StoreError,
)
from flowforge_orchestrator.ops import health, metrics, sdnotify, telemetry
from flowforge_orchestrator.queue.dispatch import Dispatcher
from flowforge_orchestrator.queue.jobs import JobKeys

__all__ = ["Orchestrator"]

log = logging.getLogger(__name__)

MAX_STRIKES = 3  # errors on one run before it is failed rather than resumed again
REDELIVERY_DELAY = 1.0  # seconds between tries of dispatches Redis refused


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _cause(exc: BaseException) -> str:
    """The driver's message behind a store error (what the database said)."""
    cause = exc.__cause__ or exc
    return str(cause) or type(cause).__name__


def _incarnation(created_at: datetime | None) -> str | None:
    """When the run's row was created, to the microsecond: what tells two runs inserted
    under one id apart (`nodes.attempt_id`)."""
    return created_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%f") if created_at else None


@dataclass
class _Verdict:
    """What became of each run of a group commit."""

    written: list[tuple[Owned, RunChanges]] = field(default_factory=list)
    lost: list[tuple[Owned, RunChanges]] = field(default_factory=list)  # epoch moved on, gone
    deferred: list[tuple[Owned, RunChanges]] = field(default_factory=list)  # row locked
    failed: list[tuple[tuple[Owned, RunChanges], StoreError]] = field(default_factory=list)

    def __add__(self, other: _Verdict) -> _Verdict:
        return _Verdict(
            self.written + other.written,
            self.lost + other.lost,
            self.deferred + other.deferred,
            self.failed + other.failed,
        )


async def _supervised(name: str, loop: Callable[[], Awaitable[None]]) -> None:
    """Run a loop forever: a bug in one iteration is logged, never fatal to the daemon."""
    while True:
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the %s loop failed; restarting it", name)
            await asyncio.sleep(1.0)


class Orchestrator(Upkeep):
    """One replica. `run()` until `stop` is set; every run it owns is in `self.runs`."""

    def __init__(
        self,
        settings: Settings,
        pool: store.Pool,
        dispatcher: Dispatcher,
        *,
        tokens: AttemptTokens,
        clock: Callable[[], datetime] = _utcnow,
        measures: metrics.OrchestratorMetrics | None = None,
        evaluator: Evaluator | None = None,
    ) -> None:
        """`evaluator` bounds every CEL evaluation (`run_orchestrator` gives a sandboxed
        one); None evaluates in process, unbounded."""
        assert settings.database_url is not None
        self.settings = settings
        self.evaluator = evaluator
        self.pool = pool
        self.dispatcher = dispatcher
        # Every read of results goes through it: only rows with their attempt's token count.
        self.verifier = ResultVerifier(tokens, on_refused=self._result_refused)
        self.clock = clock
        self.node = settings.node_id
        self.metrics = measures or metrics.OrchestratorMetrics(metrics.new_registry(process=False))
        self.metrics.active_runs.set_function(lambda: len(self.runs))
        self.limits = Limits(
            max_output_bytes=settings.max_output_bytes,
            max_context_bytes=settings.max_context_bytes,
            default_timeout=settings.step_timeout,
        )
        self.runs: dict[UUID, Owned] = {}
        self._attempts: dict[UUID, UUID] = {}  # outstanding attempt id -> run id
        self._workflows: dict[tuple[str, int], CompiledWorkflow | str] = {}
        self._dirty: set[UUID] = set()
        self._notified: set[UUID] = set()
        self._undelivered: list[tuple[Dispatch, str | None]] = []
        self._dispatch_failing = False  # Redis refused the last dispatches (warned once)
        self._redelivery_due = False  # a retry of the refused dispatches is scheduled
        self._background: set[asyncio.Task[None]] = set()
        self._to_release: set[UUID] = set()
        self._committing = False
        self._strikes: dict[UUID, int] = {}  # runs given back after an error, by count
        self._set_apart: set[UUID] = set()  # runs whose failure could not even be written
        self._wake_claim = asyncio.Event()
        self._wake_results = asyncio.Event()
        self._wake_commit = asyncio.Event()
        self._wake_timers = asyncio.Event()
        # The group commit and the lease renewal update the same run rows, each in its own
        # order: run at once, they can deadlock each other. One at a time, they cannot.
        self._owned_rows = asyncio.Lock()
        self._timers: list[tuple[datetime, int, UUID]] = []  # heap; stale entries skipped
        self._timer_seq = 0
        self.listener = Listener(
            settings.database_url,
            {
                "flowforge_runs": self._on_run_notify,
                "flowforge_results": self._on_result_notify,
                "flowforge_cancel": self._on_cancel_notify,
            },
            on_connect=self._reconnected,
        )
        self.ready = asyncio.Event()

    # -- notifications -------------------------------------------------------------------

    def _on_run_notify(self, _payload: str) -> None:
        self._wake_claim.set()

    def _on_result_notify(self, payload: str) -> None:
        """Payload: the attempt ids of one statement's results, comma-separated (sql/0009)."""
        mine = False
        for text in payload.split(","):
            try:
                attempt_id = UUID(text)
            except ValueError:
                continue
            if attempt_id in self._attempts:
                self._notified.add(attempt_id)
                mine = True
        if mine:
            self._wake_results.set()

    def _reconnected(self) -> None:
        self.metrics.reconciled("caught_up")
        self._catch_up()

    def _catch_up(self) -> None:
        """After (re)connecting LISTEN: look for everything we may have missed."""
        self._notified.update(self._attempts)
        self._wake_results.set()
        self._wake_claim.set()

    # -- the daemon ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        loops = {
            "listener": self.listener.run,
            "claim": self._claim_loop,
            "results": self._results_loop,
            "commit": self._commit_loop,
            "leases": self._lease_loop,
            "poll": self._poll_loop,
            "timers": self._timer_loop,
        }
        tasks = [
            asyncio.create_task(_supervised(name, loop), name=name) for name, loop in loops.items()
        ]
        await self.listener.connected.wait()
        self.ready.set()
        sdnotify.ready(f"orchestrator {self.node}: serving")  # Type=notify units start here
        log.info("orchestrator %s running", self.node)
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            stopper.cancel()
            await self._shut_down({task.get_name(): task for task in tasks})

    async def _shut_down(self, tasks: dict[str, asyncio.Task[None]]) -> None:
        """Stop claiming, commit and enqueue what is in hand (bounded), release the leases."""
        for name in ("claim", "poll", "leases"):
            tasks[name].cancel()
        deadline = asyncio.get_running_loop().time() + self.settings.shutdown_timeout
        while (self._dirty or self._committing) and not tasks["commit"].done():
            if asyncio.get_running_loop().time() > deadline:
                log.warning("shutdown: %d run(s) with uncommitted changes", len(self._dirty))
                break
            self._wake_commit.set()
            await asyncio.sleep(0.01)
        if self._background:
            await asyncio.wait(
                self._background, timeout=max(0.1, deadline - asyncio.get_running_loop().time())
            )
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await self._release()

    async def _release(self) -> None:
        """Hand our runs back at once, so a replica adopts them without waiting."""
        if not self.runs:
            return
        try:
            async with self.pool.acquire() as conn:
                await store.release_leases(conn, self.node, list(self.runs))
        except Exception as exc:
            log.warning("could not release leases (%s); they expire on their own", exc)
        for owned in self.runs.values():
            owned.span.end()
        self.runs.clear()

    async def _poll_loop(self) -> None:
        """The slow path that covers lost notifications and undelivered jobs."""
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            self._catch_up()
            self.metrics.reconciled("redelivered", len(self._undelivered))
            await self._redeliver()
            await self._missed_cancels()
            await self._reconcile_jobs()

    # -- claiming ------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while True:
            await self._wake_claim.wait()
            self._wake_claim.clear()
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
        batch: list[store.OwnedChanges] = []
        claimed: dict[UUID, Owned] = {}
        started = time.perf_counter()
        async with store.transaction(self.pool) as conn:
            rows = await store.claim_runs(
                conn, self.settings.claim_batch, among=among, set_apart=list(self._set_apart)
            )
            if not rows:
                return False
            tried.extend(row.id for row in rows)
            inputs, refused = self._read_inputs(rows, now)
            adopted = [r.id for r in rows if r.status == RunStatus.RUNNING]
            # A redriven run is pending with a checkpoint: it reads earlier outputs too.
            restored = adopted + [r.id for r in rows if r.status == "pending" and r.checkpoint]
            results = (
                await store.fetch_run_results(conn, restored, self.verifier) if restored else {}
            )
            blocked = await self._acquire_slots(conn, rows, inputs, refused, now)
            for row in rows:
                if row.id in blocked:
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
                    log.exception(
                        "run %s could not be started", row.id, extra={"run_id": str(row.id)}
                    )
                    owned, changes = None, self._reject(row, f"internal error: {exc}", now)
                if owned is not None:
                    claimed[row.id] = owned
                batch.append(
                    store.OwnedChanges(
                        changes,
                        epoch=row.epoch,
                        new_epoch=row.epoch + 1,
                        claimed=True,
                        traceparent=owned.new_traceparent if owned else None,
                    )
                )
            written = {o.changes.run_id: o.changes for o in batch}
            try:
                await store.write_changes(conn, self.node, self.settings.lease_seconds, batch)
            except BaseException:
                for owned in claimed.values():  # these graphs never became ours
                    owned.span.end()
                raise
        self.metrics.observe_commit(
            "claim", list(written.values()), seconds=time.perf_counter() - started, now=now
        )
        adopted_count = sum(1 for r in rows if r.status == RunStatus.RUNNING and r.id in claimed)
        self.metrics.reconciled("adopted", adopted_count)
        self.metrics.reconciled(
            "rejected", sum(1 for r in rows if r.id not in claimed) - len(blocked)
        )
        for row in rows:
            owned = claimed.get(row.id)
            if owned is None:
                continue
            owned.epoch = row.epoch + 1
            owned.new_traceparent = None
            owned.seq = int(written[row.id].checkpoint.get("seq", 0))
            self._after_commit(row.id, owned, written[row.id], results.get(row.id, {}))
            if row.status == RunStatus.RUNNING:  # results may have arrived while unowned
                self._notified.update(owned.state.outstanding())
                self._wake_results.set()
        log.debug("claimed %d run(s)", len(rows))
        return among is None and len(rows) == self.settings.claim_batch

    def _read_inputs(
        self, rows: list[store.ClaimedRun], now: datetime
    ) -> tuple[dict[UUID, Any], dict[UUID, tuple[None, RunChanges]]]:
        """Each claimed run's input, decoded and checked before any step runs: a run whose
        input is over the context limit, nested too deep or not JSON is failed at once."""
        inputs: dict[UUID, Any] = {}
        refused: dict[UUID, tuple[None, RunChanges]] = {}
        limit = self.settings.max_context_bytes
        for row in rows:
            text = row.input_text
            problem, category = None, "invalid_input"
            if len(text.encode()) > 2 * limit:  # jsonb's text has a space after each , and :
                problem, category = f"the input is over {limit} bytes", "payload_too_large"
            else:
                try:
                    value = json.loads(text)
                except (ValueError, RecursionError):
                    problem = "the input is not JSON this engine can read (nested too deep?)"
                else:
                    problem = jsonb.depth_problem(value)
                    size = json_size(value) if problem is None else 0
                    if size > limit:
                        problem, category = (
                            f"the input is {size} bytes, over the run context limit of "
                            f"{limit} bytes (FLOWFORGE_MAX_CONTEXT_BYTES)",
                            "payload_too_large",
                        )
                    elif problem is not None:
                        problem = f"the input cannot be used: {problem}"
                    else:
                        inputs[row.id] = value
            if problem is not None:
                log.warning("run %s rejected: %s", row.id, problem, extra={"run_id": str(row.id)})
                refused[row.id] = None, self._reject(row, problem, now, category=category)
        return inputs, refused

    async def _reject_alone(self, run_id: UUID, cause: StoreError) -> None:
        """Fail a run the database refused to claim, in a transaction of its own, after any
        transition already stored for it; if not even that can be written, set it apart:
        this replica never claims it again."""
        message = f"the database refused to store this run: {_cause(cause)}"
        try:
            async with store.transaction(self.pool) as conn:
                rows = await store.claim_runs(conn, 1, among=[run_id])
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
            self._set_aside(run_id, message, exc)
            return
        self.metrics.reconciled("unstorable")
        log.error("run %s failed: %s", run_id, message, extra={"run_id": str(run_id)})

    def _set_aside(self, run_id: UUID, why: str, exc: BaseException) -> None:
        self._set_apart.add(run_id)
        self.metrics.reconciled("set_apart")
        log.error(
            "run %s: %s; not even its failure can be stored (%s): this orchestrator leaves "
            "it as it is",
            run_id,
            why,
            _cause(exc),
            extra={"run_id": str(run_id)},
        )

    async def _take_over(
        self,
        conn: store.Connection,
        row: store.ClaimedRun,
        input: Any,
        results: dict[UUID, StepResult],
        now: datetime,
    ) -> tuple[Owned | None, RunChanges]:
        """Build the graph of a claimed run; a run that cannot be built is failed instead."""
        status = RunStatus(row.status)
        if self._strikes.get(row.id, 0) >= MAX_STRIKES:
            return None, self._reject(
                row, f"the engine failed on this run {MAX_STRIKES} times; see its logs", now
            )
        workflow = await self._workflow(conn, row.workflow_name, row.workflow_version)
        if isinstance(workflow, str):
            log.warning("run %s rejected: %s", row.id, workflow, extra={"run_id": str(row.id)})
            return None, self._reject(row, workflow, now, category="definition_error")
        assert row.workflow_version is not None
        state = RunState(
            run_id=row.id,
            workflow=workflow,
            version=row.workflow_version,
            input=input,
            limits=self.limits,
            status=status,
            checkpoint=row.checkpoint,
            results=results,
            incarnation=_incarnation(row.created_at),
            evaluator=self.evaluator,
        )
        if row.cancel_requested:  # asked for while pending, or while no one owned it
            state.cancel(now, "cancel requested")
            changes = state.take_changes()
            assert changes is not None
            return None, changes
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
        return owned, changes

    async def _acquire_slots(
        self,
        conn: store.Connection,
        rows: list[store.ClaimedRun],
        inputs: dict[UUID, Any],
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
            workflow = await self._workflow(conn, row.workflow_name, row.workflow_version)
            if isinstance(workflow, str):
                continue  # _take_over rejects it
            assert row.workflow_version is not None
            try:
                keys = concurrency_keys(
                    workflow.definition,
                    run_id=row.id,
                    version=row.workflow_version,
                    input=inputs[row.id],
                    evaluator=self.evaluator,
                )
            except ExpressionError as exc:
                log.warning("run %s rejected: %s", row.id, exc, extra={"run_id": str(row.id)})
                failed = self._reject(row, str(exc), now, category="expression_error")
                refused[row.id] = None, failed
                continue
            if keys:
                wanted[row.id] = keys
        admitted = await store.acquire_concurrency(conn, wanted)
        return set(wanted) - admitted

    @staticmethod
    def _reject(
        row: store.ClaimedRun, message: str, now: datetime, *, category: str = "internal_error"
    ) -> RunChanges:
        seq = int((row.checkpoint or {}).get("seq", 0))
        error = {"message": jsonb.storable(message), "category": category, "retryable": False}
        return rejected_run(row.id, RunStatus(row.status), seq, error, now)

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

    async def _workflow(
        self, conn: store.Connection, name: str, version: int | None
    ) -> CompiledWorkflow | str:
        """A compiled definition (cached), or the reason there is none."""
        if version is None:
            return f"workflow '{name}' has no registered definition"
        key = (name, version)
        cached = self._workflows.get(key)
        if cached is not None:
            return cached
        found = await store.get_definition(conn, name, version)
        result: CompiledWorkflow | str
        if found is None:
            result = f"workflow '{name}' version {version} is not registered"
        else:
            try:
                result = CompiledWorkflow(
                    parse_definition(found.spec, source=f"{name} v{version} (database)")
                )
            except (DefinitionError, ValidationError) as exc:
                result = f"the stored definition of '{name}' version {version} is invalid: {exc}"
        self._workflows[key] = result
        return result

    # -- results -------------------------------------------------------------------------

    async def _results_loop(self) -> None:
        while True:
            await self._wake_results.wait()
            self._wake_results.clear()
            wanted = [a for a in self._notified if a in self._attempts]
            self._notified.clear()
            if not wanted:
                continue
            try:
                rows = await store.retrying(
                    functools.partial(self._fetch, wanted), what="fetching results"
                )
            except FlowForgeError as exc:
                log.error("fetching results failed: %s", exc)
                self._notified.update(wanted)
                continue
            now = self.clock()
            for run_id, result in rows:
                owned = self.runs.get(run_id)
                if owned is None:
                    continue
                self._attempts.pop(result.attempt_id, None)
                owned.attempts.pop(result.attempt_id, None)
                try:
                    applied = owned.state.apply_result(result, now)
                except Exception:  # a bug must not take the daemon down with it
                    log.exception(
                        "run %s: applying a result failed", run_id, extra={"run_id": str(run_id)}
                    )
                    self._drop(run_id, "internal error while applying a result", give_back=True)
                    continue
                if applied:
                    self._dirty.add(run_id)
                    self.metrics.observe_result(result, owned.state.step_type(result.step_id))
            if self._dirty:
                self._wake_commit.set()

    async def _fetch(self, wanted: list[UUID]) -> list[tuple[UUID, Any]]:
        async with self.pool.acquire() as conn:
            return await store.fetch_results(conn, wanted, self.verifier)

    # -- group commit --------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            await self._wake_commit.wait()
            self._wake_commit.clear()
            batch: list[tuple[Owned, RunChanges]] = []
            for run_id in list(self._dirty):
                owned = self.runs.get(run_id)
                changes = owned.take_changes() if owned else None
                if owned is not None and changes is not None:
                    batch.append((owned, changes))
            self._dirty.clear()
            if batch:
                self._committing = True
                try:
                    await self._commit(batch)
                finally:
                    self._committing = False

    async def _commit(self, batch: list[tuple[Owned, RunChanges]]) -> None:
        started = time.perf_counter()
        verdict = await self._write_isolating(batch, skip_locked=False)
        self.metrics.observe_commit(
            "commit",
            [c for _, c in verdict.written],
            seconds=time.perf_counter() - started,
            now=self.clock(),
        )
        for owned, changes in verdict.written:
            owned.deferrals = 0
            owned.seq = int(changes.checkpoint.get("seq", owned.seq))
            self._after_commit(changes.run_id, owned, changes)
        for _, changes in verdict.lost:
            self._drop(changes.run_id, "lost ownership (epoch moved on)")
        for owned, changes in verdict.deferred:
            self._defer(owned, changes)
        for (owned, changes), fault in verdict.failed:
            await self._fail_unwritable(owned, changes, fault)

    async def _write_isolating(
        self, items: list[tuple[Owned, RunChanges]], *, skip_locked: bool
    ) -> _Verdict:
        """Write a group commit so that no run's fault touches another's. The database
        refuses a run's data: the batch is halved until that run is alone, and it fails
        (`failed`). A row locked by another session: the batch is written again without
        waiting for locked rows, and their runs wait for a later commit (`deferred`).
        Transient failures (the database away) are retried until they pass."""

        async def write() -> dict[UUID, bool]:
            writes = [
                store.OwnedChanges(changes, epoch=o.epoch, new_epoch=o.epoch)
                for o, changes in items
            ]
            # One statement, atomic on its own: no BEGIN/COMMIT round trips.
            async with self._owned_rows, self.pool.acquire() as conn:
                if skip_locked:
                    return await store.write_changes_skip_locked(
                        conn, self.node, self.settings.lease_seconds, writes
                    )
                written = await store.write_changes(
                    conn, self.node, self.settings.lease_seconds, writes
                )
                return dict.fromkeys(written, True)

        try:
            answer = await store.retrying(write, what="committing transitions")
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
        self, items: list[tuple[Owned, RunChanges]], answer: dict[UUID, bool], *, skip_locked: bool
    ) -> _Verdict:
        """Sort a written batch by its statement's answer (see `store.write_changes*`)."""
        verdict = _Verdict()
        missing: list[tuple[Owned, RunChanges]] = []
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
            if self.runs.get(run_id) is owned:
                self._dirty.add(run_id)
                self._wake_commit.set()

        asyncio.get_running_loop().call_later(delay, again)

    async def _fail_unwritable(self, owned: Owned, changes: RunChanges, fault: StoreError) -> None:
        """The database refuses this run's changes: fail the run after its last stored
        transition, with the cause. Its attempts still out are aborted. If not even that can
        be written, the run is set apart: left as it is, and never claimed here again."""
        run_id = changes.run_id
        why = f"the database refused to store this run's changes: {_cause(fault)}"
        error = StepError(jsonb.storable(why), category="storage_error", retryable=False)

        async def write_alone() -> tuple[bool, RunChanges]:
            async with self._owned_rows, self.pool.acquire() as conn:
                seq = max(owned.seq, await store.last_seq(conn, run_id))
                failed = rejected_run(run_id, RunStatus.RUNNING, seq, error.to_dict(), now)
                failed.aborts = list(owned.attempts)
                write = store.OwnedChanges(failed, epoch=owned.epoch, new_epoch=owned.epoch)
                written = await store.write_changes(
                    conn, self.node, self.settings.lease_seconds, [write]
                )
                return run_id in written, failed

        now = self.clock()
        try:
            written, failed = await store.retrying(write_alone, what="failing a run", attempts=5)
        except Exception as exc:
            self._drop(run_id, "its changes cannot be stored")
            self._set_aside(run_id, why, exc)
            return
        if not written:
            self._drop(run_id, "lost ownership (epoch moved on)")
            return
        self.metrics.reconciled("unstorable")
        log.error("run %s failed: %s", run_id, why, extra={"run_id": str(run_id)})
        self._after_commit(run_id, owned, failed)

    def _after_commit(
        self,
        run_id: UUID,
        owned: Owned,
        changes: RunChanges,
        answered: Collection[UUID] = (),
    ) -> None:
        """What may only happen once the transitions are durable: enqueue, abort, forget.
        `answered`: attempts of an adopted run whose result is stored already; they are
        applied by the results loop, not sent to a worker a second time."""
        for finished in changes.attempts_finished:
            self._attempts.pop(finished.attempt_id, None)
            owned.attempts.pop(finished.attempt_id, None)
        for dispatch in changes.dispatches:
            self._attempts[dispatch.attempt_id] = run_id
            owned.attempts[dispatch.attempt_id] = (dispatch, time.monotonic())
            if dispatch.attempt_id not in answered:
                self._undelivered.append((dispatch, owned.traceparent))
        if changes.aborts:
            self._in_background(self._abort(changes.aborts))
        if changes.probes:
            self._in_background(self._probe(run_id, changes.probes))
        if changes.status.finished:
            self._forget_attempts(owned)
            if changes.status is RunStatus.FAILED:
                owned.span.set_status(
                    trace.StatusCode.ERROR, str((changes.error or {}).get("message"))
                )
            owned.span.set_attribute("flowforge.status", changes.status.value)
            owned.span.end()
            self.runs.pop(run_id, None)
            log.debug("run %s %s", run_id, changes.status.value, extra={"run_id": str(run_id)})
        else:
            self.runs[run_id] = owned
            self._schedule(run_id, owned)
        if self._undelivered:
            self._in_background(self._redeliver())

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)  # keep a reference until it is done
        task.add_done_callback(self._background.discard)

    async def _redeliver(self) -> None:
        """Enqueue committed dispatches; what Redis refuses is kept and tried again a
        second later (not only at the next poll), so a Redis that comes back is used within
        a second. One warning per outage, not one per try."""
        todo, self._undelivered = self._undelivered, []
        todo = [(d, tp) for d, tp in todo if d.attempt_id in self._attempts]
        if not todo:
            return
        outcomes = await self.dispatcher.dispatch_many(todo)
        failed = [
            item for item, ok in zip(todo, outcomes, strict=True) if isinstance(ok, BaseException)
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
        self._undelivered.extend(failed)
        if not self._redelivery_due:
            self._redelivery_due = True
            asyncio.get_running_loop().call_later(REDELIVERY_DELAY, self._redeliver_again)

    def _redeliver_again(self) -> None:
        self._redelivery_due = False
        self._in_background(self._redeliver())

    def _forget_attempts(self, owned: Owned) -> None:
        for attempt_id in owned.attempts:
            self._attempts.pop(attempt_id, None)
        owned.attempts.clear()

    async def _release_given_back(self) -> None:
        """Expire the leases of runs given back now, so that a claim (this replica's, woken
        here, or another's) resumes them at once; the lease loop tries again on failure."""
        try:
            async with self._owned_rows, self.pool.acquire() as conn:
                released = list(self._to_release)
                if released:
                    await store.release_leases(conn, self.node, released)
                    self._to_release.difference_update(released)
        except Exception as exc:
            log.warning("could not release given-back runs now (%s); trying again later", exc)
            return
        self._wake_claim.set()

    def _drop(self, run_id: UUID, why: str, *, give_back: bool = False) -> None:
        """Forget a run. `give_back`: we still own it but cannot go on (an error); expire
        its lease so it is resumed from its last checkpoint, and count the strike."""
        self.metrics.reconciled("released" if give_back else "dropped")
        if give_back:
            self._to_release.add(run_id)
            self._in_background(self._release_given_back())
            self._strikes[run_id] = self._strikes.get(run_id, 0) + 1
        owned = self.runs.pop(run_id, None)
        self._dirty.discard(run_id)
        if owned is not None:
            self._forget_attempts(owned)
            owned.span.end()
            log.warning(
                "run %s dropped from this orchestrator: %s",
                run_id,
                why,
                extra={"run_id": str(run_id)},
            )


async def run_orchestrator(
    settings: Settings,
    stop: asyncio.Event,
    *,
    ready: asyncio.Event | None = None,
    measures: metrics.OrchestratorMetrics | None = None,
) -> None:
    """Connect, serve until `stop` is set, release everything. With an HTTP port set, also
    serve /healthz, /readyz and /metrics (`measures`' registry, a new one by default)."""
    if not settings.database_url or not settings.redis_url:
        raise FlowForgeError("the orchestrator needs a database URL and a Redis URL")
    secret = settings.job_key.get_secret_value() if settings.job_key else None
    keys = JobKeys.required(secret, "orchestrator")
    measures = measures or metrics.OrchestratorMetrics(metrics.new_registry())
    pool = await store.retrying(
        lambda: store.create_pool(
            settings.database_url or "",
            size=settings.db_pool_size,
            lock_timeout=settings.lock_timeout,
        ),
        what="connecting to PostgreSQL",
        attempts=30,
    )
    budget = Budget(
        timeout=settings.expression_timeout,
        memory_bytes=settings.expression_memory_bytes,
        max_result_bytes=settings.max_context_bytes,
    )
    sandbox = Sandbox(budget)
    try:

        async def read_secret() -> bytes:
            async with pool.acquire() as conn:
                return await store.engine_secret(conn)

        tokens = AttemptTokens(await store.retrying(read_secret, what="reading the engine secret"))
        if not await asyncio.to_thread(sandbox.warm, 60.0):
            log.error("the expression sandbox did not start; costly expressions will fail")
        dispatcher = await Dispatcher.connect(settings.redis_url, keys, tokens)
        try:
            orchestrator = Orchestrator(
                settings,
                pool,
                dispatcher,
                tokens=tokens,
                measures=measures,
                evaluator=BoundedEvaluator(sandbox),
            )
            if ready is not None:
                waiter = asyncio.create_task(orchestrator.ready.wait())
                waiter.add_done_callback(lambda _: ready.set())
            checks = {
                "database": health.database_check(functools.partial(store.answers, pool)),
                "redis": health.redis_check(dispatcher.ping),
                "listen": health.listening_check(orchestrator.listener.connected),
                "migrations": health.migrations_check(
                    functools.partial(store.missing_migrations, pool)
                ),
            }
            sampler = asyncio.create_task(run_sampler(pool, measures))
            # Data lifecycle: retention and outbox consumer lag (engine/retention.py).
            retention = asyncio.create_task(Retention(pool, settings, measures).run())
            try:
                async with _health_server(settings, measures.registry, checks):
                    await orchestrator.run(stop)
            finally:
                sampler.cancel()
                retention.cancel()
                await asyncio.gather(sampler, retention, return_exceptions=True)
        finally:
            await dispatcher.close()
    finally:
        sandbox.close()
        await pool.close()


@contextlib.asynccontextmanager
async def _health_server(
    settings: Settings, registry: Any, checks: dict[str, health.ReadinessCheck]
) -> AsyncIterator[None]:
    """The probes and metrics endpoint; a port that cannot be bound is logged, not fatal:
    the engine's work matters more than its dashboard."""
    try:
        server = health.serve_health(settings, registry, checks)
        await server.__aenter__()
    except (OSError, ConfigError) as exc:  # the port is taken
        log.error("%s", exc)
        yield
        return
    try:
        yield
    finally:
        await server.__aexit__(None, None, None)
