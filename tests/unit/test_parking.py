"""When a run hibernates (engine/parking.py): only with nothing out, and a timer further
than HIBERNATE_AFTER away or a wait; never with an attempt out, a near timer, or off."""

from __future__ import annotations

from datetime import timedelta

from flowforge_orchestrator.core.records import RunChanges
from flowforge_orchestrator.core.state import RunStatus
from flowforge_orchestrator.engine.parking import WAKE_AHEAD, Parking, park_until, wake_ahead
from tests.unit.test_graph import at, by_step, drain, failed, http, new_run, ok, workflow

DELAY = {"id": "pause", "type": "delay", "duration": "1h"}


def test_a_run_on_a_far_delay_parks_until_the_delay_ends() -> None:
    run = new_run(workflow(DELAY))
    run.start(at(0))
    drain(run)
    assert park_until(run, at(0), 60) == Parking(at(3600), ())
    assert park_until(run, at(3540), 60) is None  # 60 s away: not further than AFTER
    assert park_until(run, at(0), 0) is None  # 0: hibernation is off


def test_a_run_with_an_attempt_out_never_parks() -> None:
    run = new_run(workflow(http("a"), {**DELAY, "depends_on": ["a"]}))
    run.start(at(0))
    dispatched = by_step(drain(run))["a"]
    assert park_until(run, at(0), 60) is None  # a's result would find no one
    run.apply_result(ok(dispatched, {"x": 1}), at(1))
    drain(run)
    assert park_until(run, at(1), 60) == Parking(at(3601), ())


def test_a_retry_backoff_parks_until_the_retry() -> None:
    retry = {
        "max_retries": 1,
        "initial_interval": "10m",
        "max_interval": "1h",
        "jitter": False,
        "retry_on": ["http_5xx"],
    }
    run = new_run(workflow(http("a", retry=retry)))
    run.start(at(0))
    dispatched = by_step(drain(run))["a"]
    error = {"message": "down", "category": "http_5xx", "retryable": True}
    run.apply_result(failed(dispatched, error), at(2))
    changes: RunChanges = drain(run)
    assert not changes.dispatches
    parking = park_until(run, at(2), 60)
    assert parking is not None and parking.wake_at == run.next_timer()
    assert parking.wake_at is not None and parking.wake_at - at(2) > timedelta(minutes=5)


def test_a_wait_parks_with_its_event_and_key_and_its_timeout() -> None:
    wait = {"id": "paid", "type": "wait", "event": "paid", "key": "'order-' + string(input.n)"}
    run = new_run(workflow(wait), {"n": 7})
    run.start(at(0))
    drain(run)
    assert park_until(run, at(0), 60) == Parking(None, (("paid", "order-7"),))
    timed = new_run(workflow({**wait, "timeout": "30s"}), {"n": 7})
    timed.start(at(0))
    drain(timed)
    assert park_until(timed, at(0), 60) is None  # its timeout is near


def test_a_finished_run_never_parks_and_a_run_with_nothing_to_wait_for_neither() -> None:
    run = new_run(workflow({"id": "t", "type": "transform", "output": 1}))
    run.start(at(0))
    drain(run)
    assert run.status is RunStatus.COMPLETED
    assert park_until(run, at(0), 60) is None


def test_runs_are_claimed_early_by_at_most_half_of_hibernate_after() -> None:
    assert wake_ahead(60) == WAKE_AHEAD
    assert wake_ahead(1) == 0.5
    assert wake_ahead(0) == 0
