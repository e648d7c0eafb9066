"""Prometheus metrics of the orchestrator and of workers, served on `/metrics` (see health.py).

Each process builds its own `CollectorRegistry` (`new_registry()`), never the library's
global one: two engines in one test process, or an orchestrator with an in-process worker,
then never register a metric twice by accident. `OrchestratorMetrics` and `WorkerMetrics`
may share one registry (`run --with-worker`): their names do not collide.

The engine reports what happened through a few `observe_*` calls with the records it already
has (`RunChanges`, `StepResult`, `Dispatch`); the arithmetic (lags, durations, which events
are expression errors) lives here, so the orchestrator's loops stay about orchestration.
Durations between two machines' clocks (a worker's result, the orchestrator's commit) are
clamped at zero: skew must not produce negative observations.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar
from uuid import UUID

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from flowforge_orchestrator.core.records import Dispatch, RunChanges, StepResult
from flowforge_orchestrator.errors import JobRefused

__all__ = [
    "RECONCILER_ACTIONS",
    "RETENTION_TABLES",
    "AttemptTimer",
    "OrchestratorMetrics",
    "WorkerMetrics",
    "new_registry",
]

log = logging.getLogger(__name__)

# Seconds. Steps run from milliseconds (an HTTP call) to an hour (the default step timeout
# is 5 min, a definition may set more); lags are expected well under a second.
DURATION_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    *(30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0),
)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)

# What the reconciler does, by `action` label (others are accepted; these start at zero):
RECONCILER_ACTIONS = (
    "adopted",  # a run whose lease had expired was claimed from a stopped replica
    "redelivered",  # committed dispatches enqueued again (Redis refused, or an adopted run)
    "released",  # a run given back after an error, its lease expired at once
    "dropped",  # a run this replica no longer owns (epoch moved on, lease lost)
    "rejected",  # a run failed because it could not be built (no or bad definition)
    "caught_up",  # LISTEN reconnected: looked for what notifications may have missed
    "deferred",  # a run's changes waited: its row was locked by another session
    "unstorable",  # a run failed because the database refused to store its changes
    "set_apart",  # not even a run's failure could be stored: this replica leaves it alone
)
RETENTION_TABLES = ("runs", "outbox", "step_results")
_RUN_STATUSES = ("running", "completed", "failed", "cancelled")
_OPEN_STATUSES = ("pending", "running")
# Attempts whose timing we remember between dispatch, enqueue, result and commit. Entries
# are removed as results are applied; the bound only matters for attempts that never get
# one (cancelled runs, runs handed to another replica).
_TRACKED_ATTEMPTS = 100_000

K = TypeVar("K")
V = TypeVar("V")


def new_registry(*, process: bool = True) -> CollectorRegistry:
    """A registry for one process; `process` adds the usual process/GC/platform collectors."""
    registry = CollectorRegistry(auto_describe=True)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def _seconds(later: datetime, earlier: datetime) -> float:
    return max(0.0, (later - earlier).total_seconds())


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _Bounded(Generic[K, V]):
    """A dict that forgets its oldest entries beyond `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[K, V] = OrderedDict()

    def __setitem__(self, key: K, value: V) -> None:
        self._items[key] = value
        if len(self._items) > self.limit:
            self._items.popitem(last=False)

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class _Attempt:
    committed_at: datetime
    enqueued_at: datetime | None = None


def _expression_error_field(event_type: str, data: dict[str, object]) -> str | None:
    """The field whose expression failed, if this event reports an expression error."""
    error = data.get("error")
    if not isinstance(error, dict) or error.get("category") != "expression_error":
        return None
    # A step's failure that fails its run is reported twice (step.failed, then
    # workflow.failed naming the step): count the step's event only.
    if event_type == "workflow.failed" and "step_id" in error:
        return None
    if event_type not in ("step.failed", "workflow.failed"):
        return None
    details = error.get("details")
    field = details.get("field") if isinstance(details, dict) else None
    if field:
        return str(field)
    return "output" if event_type == "workflow.failed" else "unknown"


class OrchestratorMetrics:
    """What an orchestrator replica measures."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.run_transitions = Counter(
            "flowforge_run_transitions",
            "Runs that entered a status, counted in this orchestrator's commits.",
            ["status"],
            registry=registry,
        )
        self.runs = Gauge(
            "flowforge_runs",
            "Runs in the database that are pending or running (sampled, all replicas).",
            ["status"],
            registry=registry,
        )
        self.active_runs = Gauge(
            "flowforge_active_runs",
            "Runs this orchestrator holds in memory and drives.",
            registry=registry,
        )
        self.leases_held = Gauge(
            "flowforge_leases_held",
            "Run leases this orchestrator held after its last renewal.",
            registry=registry,
        )
        self.step_duration = Histogram(
            "flowforge_step_duration_seconds",
            "Run time of step attempts as their worker measured it, by step type and outcome.",
            ["step_type", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "flowforge_step_queue_wait_seconds",
            "Time from enqueueing an attempt on arq to a worker starting it, by step type.",
            ["step_type"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.dispatch_lag = Histogram(
            "flowforge_dispatch_lag_seconds",
            "Time from the commit that dispatches an attempt to its enqueue on arq.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.result_apply_lag = Histogram(
            "flowforge_result_apply_lag_seconds",
            "Time from a worker storing a result to the commit that applies it.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.commit_runs = Histogram(
            "flowforge_group_commit_runs",
            "Runs written per transaction (group-commit batch size), by kind (claim, commit).",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.commit_duration = Histogram(
            "flowforge_group_commit_duration_seconds",
            "Duration of group-commit transactions, by kind (claim, commit).",
            ["kind"],
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.reconciler_actions = Counter(
            "flowforge_reconciler_actions",
            "Corrective actions: runs adopted, released, dropped, rejected; jobs redelivered.",
            ["action"],
            registry=registry,
        )
        self.dispatch_failures = Counter(
            "flowforge_dispatch_failures",
            "Enqueues on arq that failed; the attempts are enqueued again on the next poll.",
            registry=registry,
        )
        self.results_refused = Counter(
            "flowforge_results_refused",
            "Result rows not applied: a token that does not verify (bad_token), or a verified "
            "row that cannot be decoded (unreadable, its attempt fails).",
            ["reason"],
            registry=registry,
        )
        self.expression_errors = Counter(
            "flowforge_expression_errors",
            "CEL expressions that failed to evaluate, by the field that holds them.",
            ["field"],
            registry=registry,
        )
        self.outbox_unpublished = Gauge(
            "flowforge_outbox_unpublished",
            "Outbox events the slowest registered consumer has not read yet (sampled).",
            registry=registry,
        )
        self.outbox_oldest_age = Gauge(
            "flowforge_outbox_oldest_unpublished_age_seconds",
            "Age of the next event the slowest registered consumer has not read; 0 when "
            "there is none (sampled).",
            registry=registry,
        )
        self.waiting_steps = Gauge(
            "flowforge_waiting_steps",
            "Wait steps this orchestrator listens for (their runs' events).",
            registry=registry,
        )
        self.events_received = Counter(
            "flowforge_events_received",
            "Events taken by wait steps of this orchestrator's runs.",
            registry=registry,
        )
        self.heartbeats_missed = Counter(
            "flowforge_heartbeats_missed",
            "Attempts timed out because their worker stopped sending heartbeats.",
            registry=registry,
        )
        # Data lifecycle: retention and the outbox feed's consumers (engine/retention.py).
        self.retention_deleted = Counter(
            "flowforge_retention_deleted_rows",
            "Rows deleted by retention, by table (runs, outbox, step_results).",
            ["table"],
            registry=registry,
        )
        self.outbox_consumer_lag_events = Gauge(
            "flowforge_outbox_consumer_lag_events",
            "Outbox events a registered consumer has not read yet (sampled).",
            ["consumer"],
            registry=registry,
        )
        self.outbox_consumer_lag_seconds = Gauge(
            "flowforge_outbox_consumer_lag_seconds",
            "Age of the next event a registered consumer has not read; 0 when none (sampled).",
            ["consumer"],
            registry=registry,
        )
        self.outbox_events_lost = Counter(
            "flowforge_outbox_consumer_lost_events",
            "Events retention deleted past FLOWFORGE_OUTBOX_MAX_AGE before this consumer "
            "read them.",
            ["consumer"],
            registry=registry,
        )
        for table in RETENTION_TABLES:
            self.retention_deleted.labels(table)
        for status in _RUN_STATUSES:
            self.run_transitions.labels(status)
        for status in _OPEN_STATUSES:
            self.runs.labels(status)
        for action in RECONCILER_ACTIONS:
            self.reconciler_actions.labels(action)
        for reason in ("bad_token", "unreadable"):
            self.results_refused.labels(reason)
        self._attempts: _Bounded[UUID, _Attempt] = _Bounded(_TRACKED_ATTEMPTS)
        self._results: _Bounded[UUID, datetime] = _Bounded(_TRACKED_ATTEMPTS)

    def observe_commit(
        self,
        kind: str,
        changes: Sequence[RunChanges],
        *,
        seconds: float,
        now: datetime | None = None,
    ) -> None:
        """A transaction wrote `changes` (call after it committed): batch size, run
        transitions, expression errors; starts the dispatch clocks, stops the apply clocks."""
        now = now or _utcnow()
        self.commit_runs.labels(kind).observe(len(changes))
        self.commit_duration.labels(kind).observe(max(0.0, seconds))
        for change in changes:
            for event in change.events:
                if event.type.startswith("workflow."):
                    self.run_transitions.labels(event.to_status).inc()
                field = _expression_error_field(event.type, event.data)
                if field is not None:
                    self.expression_errors.labels(field).inc()
            for dispatch in change.dispatches:
                self._attempts[dispatch.attempt_id] = _Attempt(committed_at=now)
            for finished in change.attempts_finished:
                stored_at = self._results.pop(finished.attempt_id)
                if stored_at is not None:
                    self.result_apply_lag.observe(_seconds(now, stored_at))

    def observe_enqueued(
        self, dispatches: Iterable[Dispatch], *, now: datetime | None = None
    ) -> None:
        """These committed dispatches are now on arq."""
        now = now or _utcnow()
        for dispatch in dispatches:
            attempt = self._attempts.get(dispatch.attempt_id)
            if attempt is None:
                continue
            if attempt.enqueued_at is None:  # a redelivery's delay is in the first's lag
                self.dispatch_lag.observe(_seconds(now, attempt.committed_at))
            attempt.enqueued_at = now

    def observe_result(self, result: StepResult, step_type: str) -> None:
        """A worker's result was applied to its run (not a stale or duplicate one)."""
        if result.started_at is not None:
            self.step_duration.labels(step_type, result.outcome).observe(
                _seconds(result.finished_at, result.started_at)
            )
        attempt = self._attempts.pop(result.attempt_id)
        if attempt is not None and attempt.enqueued_at is not None and result.started_at:
            self.queue_wait.labels(step_type).observe(
                _seconds(result.started_at, attempt.enqueued_at)
            )
        self._results[result.attempt_id] = result.finished_at

    def reconciled(self, action: str, count: int = 1) -> None:
        """The reconciler did `action` `count` times (see RECONCILER_ACTIONS)."""
        if count > 0:
            self.reconciler_actions.labels(action).inc(count)


class AttemptTimer:
    """Set `outcome` before the `with` block of `WorkerMetrics.attempt` ends."""

    def __init__(self) -> None:
        self.outcome = "succeeded"


class WorkerMetrics:
    """What a worker process measures, for the attempts it executes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.attempts = Counter(
            "flowforge_worker_attempts",
            "Step attempts executed by this worker, by step type and outcome.",
            ["step_type", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "flowforge_worker_attempt_duration_seconds",
            "Execution time of step attempts on this worker, by step type and outcome.",
            ["step_type", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.in_progress = Gauge(
            "flowforge_worker_attempts_in_progress",
            "Step attempts executing on this worker now, by step type.",
            ["step_type"],
            registry=registry,
        )
        self.jobs_refused = Counter(
            "flowforge_worker_jobs_refused",
            "Jobs taken off a queue and not run: unsigned or altered (bad_signature), under "
            "another id (wrong_job_id), on another type's queue (wrong_queue), or malformed.",
            ["reason"],
            registry=registry,
        )
        for reason in JobRefused.REASONS:
            self.jobs_refused.labels(reason)
        self.queue_wait = Histogram(
            "flowforge_worker_queue_wait_seconds",
            "Time attempts spent on the arq queue before this worker started them.",
            ["step_type"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )

    def serves(self, step_types: Iterable[str]) -> None:
        """Show every served type from the start, at zero."""
        for step_type in step_types:
            self.in_progress.labels(step_type)
            for outcome in ("succeeded", "failed"):
                self.attempts.labels(step_type, outcome)

    @contextmanager
    def attempt(self, step_type: str) -> Iterator[AttemptTimer]:
        """Time one attempt; an exception out of the block counts as outcome `error`
        (`cancelled` for a cancellation) and propagates."""
        timer = AttemptTimer()
        gauge = self.in_progress.labels(step_type)
        gauge.inc()
        start = time.perf_counter()
        try:
            yield timer
        except asyncio.CancelledError:
            timer.outcome = "cancelled"
            raise
        except BaseException:
            timer.outcome = "error"
            raise
        finally:
            gauge.dec()
            self.attempts.labels(step_type, timer.outcome).inc()
            self.duration.labels(step_type, timer.outcome).observe(time.perf_counter() - start)

    def observe_queue_wait(
        self, step_type: str, enqueued_at: datetime, started_at: datetime
    ) -> None:
        """arq's enqueue time of the job (ctx["enqueue_time"]) against when the attempt began."""
        self.queue_wait.labels(step_type).observe(_seconds(started_at, enqueued_at))
