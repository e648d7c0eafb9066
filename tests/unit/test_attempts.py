"""Retries, deadlines, schedule-to-start, run timeouts and cancellation in the graph (pure)."""

from __future__ import annotations

from typing import Any

from flowforge_orchestrator.core.graph.nodes import attempt_id
from flowforge_orchestrator.core.graph.run import RunState
from flowforge_orchestrator.core.state import RunStatus, StepStatus
from tests.unit.test_graph import (
    RUN_ID,
    Recorder,
    at,
    failed,
    http,
    kinds,
    new_run,
    ok,
    workflow,
)

RETRY = {"max_retries": 2, "initial_interval": "10s", "backoff_factor": 2, "jitter": False}


def start(*steps: dict[str, Any], **extra: Any) -> tuple[RunState, Recorder]:
    run, rec = new_run(workflow(*steps, **extra)), Recorder()
    run.start(at(0))
    rec.drain(run)
    return run, rec


def fire(run: RunState, rec: Recorder, seconds: float) -> None:
    run.fire_timers(at(seconds))
    rec.drain(run)


def test_a_retryable_failure_waits_its_backoff_then_runs_a_new_attempt() -> None:
    run, rec = start(http("a", retry=RETRY))
    first = rec.dispatches[-1]
    error = {"message": "busy", "category": "http_503", "retryable": True}
    rec.apply(run, failed(first, error, finished=2), at(2))

    assert run.step_status("a") is StepStatus.RETRYING
    retrying = rec.events[-1]
    assert retrying.type == "step.retrying"
    assert retrying.data["next_attempt"] == 2
    assert retrying.data["next_attempt_at"] == "2024-05-01T12:00:12Z"
    assert run.next_timer() == at(12)
    assert rec.checkpoint["steps"]["a"]["s"] == "w"  # the backoff survives a restart

    fire(run, rec, 11)
    assert len(rec.dispatches) == 1  # not yet
    fire(run, rec, 12)
    second = rec.dispatches[-1]
    assert (second.attempt, second.attempt_id) == (2, attempt_id(RUN_ID, "a", 2))
    rec.apply(run, failed(second, error, finished=13), at(13))
    assert run.next_timer() == at(33)  # 20 s: the backoff doubled
    fire(run, rec, 33)
    rec.apply(run, ok(rec.dispatches[-1], "third time"), at(34))
    assert rec.status is RunStatus.COMPLETED
    assert rec.output == {"a": "third time"}


def test_a_non_retryable_error_or_exhausted_retries_fail_the_step() -> None:
    run, rec = start(http("a", retry=RETRY))
    rec.apply(run, failed(rec.dispatches[-1], {"message": "no", "retryable": False}), at(1))
    assert rec.status is RunStatus.FAILED
    assert [t for t, _ in kinds(rec.events)].count("step.retrying") == 0


def test_a_late_result_of_an_earlier_attempt_is_ignored() -> None:
    run, rec = start(http("a", retry=RETRY))
    first = rec.dispatches[-1]
    rec.apply(run, failed(first, {"message": "x", "category": "timeout"}), at(1))
    fire(run, rec, 11)
    assert not rec.apply(run, ok(first, "late"), at(12))
    assert run.step_status("a") is StepStatus.DISPATCHED


def test_an_attempt_without_a_result_times_out_is_aborted_and_retried() -> None:
    run, rec = start(http("a", timeout="5s", retry=RETRY))
    first = rec.dispatches[-1]
    assert run.next_timer() == at(10)  # 5 s to be picked up (its timeout) plus 5 s to run
    run.fire_timers(at(10))
    changes = rec.drain(run)
    assert changes is not None
    assert changes.aborts == [first.attempt_id]
    assert changes.attempts_finished[0].status is StepStatus.TIMED_OUT
    assert changes.attempts_finished[0].error is not None
    assert changes.attempts_finished[0].error["category"] == "timeout"
    assert run.step_status("a") is StepStatus.RETRYING


def test_without_retries_a_timed_out_attempt_times_the_step_out() -> None:
    run, rec = start(http("a", timeout="5s"))
    fire(run, rec, 10)
    assert rec.status is RunStatus.FAILED
    assert ("step.timed_out", "a") in kinds(rec.events)


def test_schedule_to_start_asks_whether_a_worker_took_the_attempt() -> None:
    run, rec = start(http("a", timeout="5s", schedule_to_start="2s"))
    first = rec.dispatches[-1]
    assert run.next_timer() == at(2)
    run.fire_timers(at(2))
    changes = rec.drain(run)
    assert changes is not None
    assert changes.probes == [("a", first.attempt_id, "http")]
    assert run.next_timer() == at(7)  # now the deadline: its timeout from here
    # A worker had it: nothing happens until the result.
    assert not run.not_picked_up("a", attempt_id(RUN_ID, "a", 9), at(3))
    assert run.not_picked_up("a", first.attempt_id, at(3))
    rec.drain(run)
    assert rec.status is RunStatus.FAILED
    assert rec.events[-2].data["error"]["category"] == "schedule_to_start_timeout"


def test_a_run_timeout_fails_the_run_and_cancels_its_steps() -> None:
    run, rec = start(http("a"), timeout="1m")
    assert rec.checkpoint["deadline"] == "2024-05-01T12:01:00+00:00"
    restored = rec.restore(run)
    assert restored.next_timer() == at(60)  # the deadline survives a restart
    fire(run, rec, 60)
    assert rec.status is RunStatus.FAILED
    assert kinds(rec.events)[-2:] == [("step.cancelled", "a"), ("workflow.failed", None)]
    assert rec.events[-1].data["error"]["category"] == "run_timeout"


def test_cancel_ends_the_run_and_aborts_what_workers_hold() -> None:
    run, rec = start(http("a"), http("b", "a"))
    assert run.cancel(at(5), "asked")
    changes = rec.drain(run)
    assert changes is not None
    assert changes.aborts == [rec.dispatches[0].attempt_id]
    assert kinds(changes.events) == [
        ("step.cancelled", "a"),
        ("step.cancelled", "b"),
        ("workflow.cancelled", None),
    ]
    assert changes.events[-1].data == {"reason": "asked"}
    assert not run.cancel(at(6))  # already over


def test_a_fan_out_packs_its_elements_and_restores_them_with_their_retries() -> None:
    each = {
        "id": "fe",
        "type": "parallel",
        "for_each": "[1, 2, 3]",
        "step": http("el", retry=RETRY),
    }
    run, rec = start(each)
    by_key = {d.step_id: d for d in rec.dispatches}
    rec.apply(run, ok(by_key["el[0]"], "zero"), at(1))
    busy = {"message": "busy", "category": "http_503", "retryable": True}
    rec.apply(run, failed(by_key["el[1]"], busy), at(2))
    saved = rec.checkpoint["steps"]
    assert saved["fe"]["i"] == "Spd"  # el[1] waits out its backoff: saved on its own
    assert saved["el[1]"]["s"] == "w"
    fire(run, rec, 12)
    saved = rec.checkpoint["steps"]
    assert (saved["fe"]["i"], saved["fe"]["na"]) == ("Sdd", {"1": 2})
    assert "el[1]" not in saved

    adopted = rec.restore(run)
    assert [adopted.step_status(f"el[{i}]") for i in range(3)] == [
        StepStatus.SUCCEEDED,
        StepStatus.DISPATCHED,
        StepStatus.DISPATCHED,
    ]
    assert sorted(adopted.outstanding()) == sorted(run.outstanding())
    assert adopted.checkpoint() == rec.checkpoint
