"""Metrics: what each observe_* call records, on a registry of the test's own."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flowforge_orchestrator.core.records import (
    AttemptFinished,
    Dispatch,
    Event,
    RunChanges,
    StepResult,
)
from flowforge_orchestrator.core.state import RunStatus, StepStatus
from flowforge_orchestrator.ops.metrics import (
    OrchestratorMetrics,
    WorkerMetrics,
    _Bounded,
    new_registry,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _s(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _changes(
    *events: Event, dispatches: tuple[Dispatch, ...] = (), finished: tuple[UUID, ...] = ()
) -> RunChanges:
    return RunChanges(
        run_id=uuid4(),
        status=RunStatus.RUNNING,
        checkpoint={},
        events=list(events),
        dispatches=list(dispatches),
        attempts_finished=[AttemptFinished(a, StepStatus.SUCCEEDED, T0, None) for a in finished],
    )


def _event(type_: str, to_status: str, **data: object) -> Event:
    return Event(seq=1, type=type_, at=T0, to_status=to_status, data=dict(data))


def _dispatch(attempt_id: UUID, step_type: str = "http") -> Dispatch:
    return Dispatch(attempt_id, uuid4(), "s", step_type, 1, {}, 30.0)


def _expression_error(field: str | None = None, **extra: object) -> dict[str, object]:
    error: dict[str, object] = {"message": "x", "category": "expression_error", **extra}
    if field:
        error["details"] = {"expression": "a.b", "field": field}
    return error


@pytest.fixture
def om() -> OrchestratorMetrics:
    return OrchestratorMetrics(new_registry(process=False))


def value(metrics: OrchestratorMetrics | WorkerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_registries_are_per_process_objects() -> None:
    shared = new_registry(process=False)
    OrchestratorMetrics(shared)
    WorkerMetrics(shared)  # one process may run both: no name collides
    OrchestratorMetrics(new_registry(process=False))  # another registry: independent
    with pytest.raises(ValueError, match="Duplicated"):
        OrchestratorMetrics(shared)


def test_process_collectors_are_optional() -> None:
    assert b"process_cpu_seconds_total" in generate_latest(new_registry())
    assert b"process_cpu" not in generate_latest(new_registry(process=False))


def test_every_metric_has_help_and_known_labels_start_at_zero(om: OrchestratorMetrics) -> None:
    WorkerMetrics(om.registry).serves(["http"])
    text = generate_latest(om.registry).decode()
    families = list(text_string_to_metric_families(text))
    assert len(families) >= 20
    assert all(f.documentation.strip() for f in families), [f.name for f in families]
    assert value(om, "flowforge_run_transitions_total", status="failed") == 0
    assert value(om, "flowforge_reconciler_actions_total", action="adopted") == 0
    assert value(om, "flowforge_runs", status="pending") == 0
    assert 'flowforge_worker_attempts_total{outcome="succeeded",step_type="http"} 0.0' in text


def test_commit_counts_batches_run_transitions_and_expression_errors(
    om: OrchestratorMetrics,
) -> None:
    batch = [
        _changes(_event("workflow.started", "running"), _event("step.dispatched", "dispatched")),
        _changes(
            _event("step.failed", "failed", error=_expression_error("with")),
            # the same failure failing its run: counted once, as the step's
            _event("workflow.failed", "failed", error=_expression_error("with", step_id="s")),
        ),
        # a run output template that failed: a run-level expression error
        _changes(_event("workflow.failed", "failed", error=_expression_error())),
        _changes(_event("workflow.completed", "completed", output=1)),
    ]
    om.observe_commit("commit", batch, seconds=0.02, now=T0)
    om.observe_commit("claim", batch[:1], seconds=0.01, now=T0)

    assert value(om, "flowforge_run_transitions_total", status="running") == 2
    assert value(om, "flowforge_run_transitions_total", status="failed") == 2
    assert value(om, "flowforge_run_transitions_total", status="completed") == 1
    assert value(om, "flowforge_expression_errors_total", field="with") == 1
    assert value(om, "flowforge_expression_errors_total", field="output") == 1
    assert value(om, "flowforge_group_commit_runs_sum", kind="commit") == 4
    assert value(om, "flowforge_group_commit_runs_count", kind="claim") == 1
    assert value(om, "flowforge_group_commit_duration_seconds_sum", kind="commit") == 0.02


def test_an_attempt_is_timed_from_commit_to_enqueue_to_result_to_apply(
    om: OrchestratorMetrics,
) -> None:
    attempt = uuid4()
    dispatch = _dispatch(attempt, "sms")
    om.observe_commit("commit", [_changes(dispatches=(dispatch,))], seconds=0.01, now=_s(0))
    om.observe_enqueued([dispatch], now=_s(0.5))
    om.observe_enqueued([dispatch], now=_s(9))  # redelivered: the lag was observed once
    result = StepResult(attempt, "s", "succeeded", {}, None, started_at=_s(11), finished_at=_s(14))
    om.observe_result(result, "sms")
    om.observe_commit("commit", [_changes(finished=(attempt,))], seconds=0.01, now=_s(14.25))

    assert value(om, "flowforge_dispatch_lag_seconds_sum") == 0.5
    assert value(om, "flowforge_dispatch_lag_seconds_count") == 1
    assert value(om, "flowforge_step_queue_wait_seconds_sum", step_type="sms") == 2  # from 9
    assert (
        value(om, "flowforge_step_duration_seconds_sum", step_type="sms", outcome="succeeded") == 3
    )
    assert value(om, "flowforge_result_apply_lag_seconds_sum") == 0.25
    assert len(om._attempts) == 0 and len(om._results) == 0  # nothing kept once applied


def test_clock_skew_never_gives_negative_durations(om: OrchestratorMetrics) -> None:
    attempt = uuid4()
    dispatch = _dispatch(attempt)
    om.observe_commit("commit", [_changes(dispatches=(dispatch,))], seconds=-1, now=_s(5))
    om.observe_enqueued([dispatch], now=_s(5))
    # the worker's clock runs behind the orchestrator's
    result = StepResult(attempt, "s", "failed", None, {}, started_at=_s(1), finished_at=_s(2))
    om.observe_result(result, "http")
    om.observe_commit("commit", [_changes(finished=(attempt,))], seconds=0.01, now=_s(1))
    assert value(om, "flowforge_step_queue_wait_seconds_sum", step_type="http") == 0
    assert value(om, "flowforge_result_apply_lag_seconds_sum") == 0
    assert value(om, "flowforge_group_commit_duration_seconds_sum", kind="commit") == 0.01


def test_a_result_of_an_adopted_run_still_counts_its_duration(om: OrchestratorMetrics) -> None:
    result = StepResult(uuid4(), "s", "succeeded", {}, None, started_at=_s(0), finished_at=_s(2))
    om.observe_result(result, "http")
    assert (
        value(om, "flowforge_step_duration_seconds_count", step_type="http", outcome="succeeded")
        == 1
    )
    assert value(om, "flowforge_step_queue_wait_seconds_count", step_type="http") is None


def test_reconciler_actions_and_gauges(om: OrchestratorMetrics) -> None:
    om.reconciled("adopted", 3)
    om.reconciled("redelivered")
    om.reconciled("dropped", 0)
    runs = {uuid4(): object()}
    om.active_runs.set_function(lambda: len(runs))
    om.leases_held.set(7)
    assert value(om, "flowforge_reconciler_actions_total", action="adopted") == 3
    assert value(om, "flowforge_reconciler_actions_total", action="redelivered") == 1
    assert value(om, "flowforge_reconciler_actions_total", action="dropped") == 0
    assert value(om, "flowforge_active_runs") == 1
    assert value(om, "flowforge_leases_held") == 7


def test_worker_attempts_by_type_and_outcome() -> None:
    wm = WorkerMetrics(new_registry(process=False))
    with wm.attempt("http"):
        assert value(wm, "flowforge_worker_attempts_in_progress", step_type="http") == 1
    with wm.attempt("http") as timer:
        timer.outcome = "failed"
    with pytest.raises(RuntimeError), wm.attempt("sms"):
        raise RuntimeError("boom")
    with pytest.raises(asyncio.CancelledError), wm.attempt("sms"):
        raise asyncio.CancelledError
    wm.observe_queue_wait("http", enqueued_at=_s(0), started_at=_s(1.5))

    for step_type, outcome in [
        ("http", "succeeded"),
        ("http", "failed"),
        ("sms", "error"),
        ("sms", "cancelled"),
    ]:
        labels = {"step_type": step_type, "outcome": outcome}
        assert value(wm, "flowforge_worker_attempts_total", **labels) == 1
        assert value(wm, "flowforge_worker_attempt_duration_seconds_count", **labels) == 1
    assert value(wm, "flowforge_worker_attempts_in_progress", step_type="http") == 0
    assert value(wm, "flowforge_worker_attempts_in_progress", step_type="sms") == 0
    assert value(wm, "flowforge_worker_queue_wait_seconds_sum", step_type="http") == 1.5


def test_tracking_is_bounded() -> None:
    bounded: _Bounded[int, int] = _Bounded(3)
    for i in range(5):
        bounded[i] = i
    assert len(bounded) == 3
    assert bounded.get(0) is None and bounded.get(4) == 4
    assert bounded.pop(4) == 4 and bounded.pop(4) is None
