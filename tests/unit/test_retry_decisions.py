"""A failed worker step's error says what its retry policy decided (pure, in the graph)."""

from __future__ import annotations

from flowforge_orchestrator.core.graph.run import RunState
from flowforge_orchestrator.core.state import RunStatus
from tests.unit.test_graph import Recorder, at, failed, http, new_run, workflow

PAYMENT_REQUIRED = {"message": "HTTP 402", "category": "http_402", "retryable": True}
BUSY = {"message": "HTTP 503", "category": "http_503", "retryable": True}
RETRY = {"max_retries": 1, "initial_interval": "1s", "jitter": False}


def start(**step: object) -> tuple[RunState, Recorder]:
    run, rec = new_run(workflow(http("a", **step))), Recorder()
    run.start(at(0))
    rec.drain(run)
    return run, rec


def errors(rec: Recorder, event: str) -> list[dict[str, object]]:
    return [e.data["error"] for e in rec.events if e.type == event]


def test_an_error_not_in_retry_on_says_so_in_the_step_and_the_run() -> None:
    run, rec = start(retry={**RETRY, "retry_on": ["http_5xx", "timeout"]})

    rec.apply(run, failed(rec.dispatches[-1], PAYMENT_REQUIRED), at(1))

    decision = "not retried: http_402 is not in retry_on [http_5xx, timeout]"
    assert rec.status is RunStatus.FAILED
    (step_error,) = errors(rec, "step.failed")
    assert step_error == {**PAYMENT_REQUIRED, "retry_decision": decision}
    (run_error,) = errors(rec, "workflow.failed")
    assert (run_error["retryable"], run_error["retry_decision"]) == (True, decision)


def test_each_retry_and_the_last_failure_say_what_was_decided() -> None:
    run, rec = start(retry=RETRY)

    rec.apply(run, failed(rec.dispatches[-1], BUSY), at(1))
    run.fire_timers(at(2))
    rec.drain(run)
    rec.apply(run, failed(rec.dispatches[-1], BUSY), at(3))

    assert [e["retry_decision"] for e in errors(rec, "step.retrying")] == [
        "http_503 matches http_5xx: attempt 2 of 2 in 1s (backoff)"
    ]
    assert [e["retry_decision"] for e in errors(rec, "step.failed")] == [
        "retries exhausted: attempt 2 of 2 failed"
    ]


def test_a_listed_error_without_a_retry_policy_says_none_allows_a_retry() -> None:
    run, rec = start()

    rec.apply(run, failed(rec.dispatches[-1], BUSY), at(1))

    (step_error,) = errors(rec, "step.failed")
    assert step_error["retry_decision"] == (
        "not retried: http_503 matches http_5xx in retry_on, but the step allows no retries "
        "(max_retries: 0)"
    )


def test_an_error_that_is_not_retryable_is_left_as_it_says() -> None:
    run, rec = start(retry=RETRY)
    refused = {"message": "too large", "category": "payload_too_large", "retryable": False}

    rec.apply(run, failed(rec.dispatches[-1], refused), at(1))

    assert errors(rec, "step.failed") == [refused]
