"""The wait step in one run's graph: it listens once started, takes one event (recorded as
taken in the same commit), times out with `event_timeout`, and survives a restore."""

from __future__ import annotations

from typing import Any

from flowforge_orchestrator.core.records import EventTaken, WaitStarted
from flowforge_orchestrator.core.state import RunStatus, StepStatus
from tests.unit.test_graph import (
    Recorder,
    at,
    by_step,
    http,
    kinds,
    new_run,
    ok,
    transform,
    workflow,
)


def wait(step_id: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "wait", "depends_on": list(deps), **extra}


def _event(event_id: int, payload: Any) -> dict[str, Any]:
    return {"name": "paid", "key": "o-7", "payload": payload, "id": event_id, "received_at": "t"}


def test_a_wait_listens_then_takes_an_event_and_its_payload_reaches_the_next_step() -> None:
    wf = workflow(
        http("reserve"),
        wait("paid", "reserve", event="paid", key="'o-' + string(input.order)", timeout="1h"),
        transform("receipt", "${{ steps.paid.output.payload.amount * 2 }}", "paid"),
    )
    run, rec = new_run(wf, {"order": 7}), Recorder()
    run.start(at(0))
    first = rec.drain(run)
    assert first is not None
    rec.apply(run, ok(by_step(first)["reserve"], {"ok": True}), at(1))
    waits = [e for e in rec.events if e.type == "step.waiting"]
    assert len(waits) == 1 and waits[0].data["key"] == "o-7" and waits[0].data["event"] == "paid"
    assert waits[0].data["deadline"] == "2024-05-01T13:00:01Z"
    (listening,) = run.waiting()
    assert listening == WaitStarted("paid", listening.attempt_id, "paid", "o-7")
    assert run.next_timer() == at(3601)

    assert not run.take_event("paid", listening.attempt_id.__class__(int=1), 5, {}, at(2))
    assert run.take_event("paid", listening.attempt_id, 5, _event(5, {"amount": 21}), at(2))
    changes = run.take_changes()
    assert changes is not None
    assert changes.events_taken == [EventTaken(5, "paid", listening.attempt_id)]
    assert kinds(changes.events)[:3] == [
        ("step.event_received", "paid"),
        ("step.succeeded", "paid"),
        ("step.succeeded", "receipt"),
    ]
    assert run.status is RunStatus.COMPLETED and run.output == {"receipt": 42}
    assert run.waiting() == [] and not run.is_waiting("paid", listening.attempt_id)
    # A second event for the same step changes nothing.
    assert not run.take_event("paid", listening.attempt_id, 6, _event(6, {}), at(3))


def test_a_wait_without_an_event_fails_with_event_timeout_at_its_deadline() -> None:
    wf = workflow(wait("approval", event="approved", timeout="2s"), http("after", "approval"))
    run, rec = new_run(wf), Recorder()
    run.start(at(0))
    rec.drain(run)
    assert not run.fire_timers(at(1.9))
    assert run.fire_timers(at(2))
    rec.drain(run)
    assert run.step_status("approval") is StepStatus.FAILED
    assert run.status is RunStatus.FAILED
    failed = [e for e in rec.events if e.type == "step.failed"]
    assert failed[0].data["error"]["category"] == "event_timeout"
    assert "no event 'approved' arrived within its timeout of 2s" in str(failed[0].data["error"])


def test_a_timed_out_wait_may_continue_on_failure() -> None:
    wf = workflow(
        wait("approval", event="approved", timeout="2s", continue_on_failure=True),
        transform("after", "${{ steps.approval.status }}", "approval"),
    )
    run = new_run(wf)
    run.start(at(0))
    run.fire_timers(at(2))
    assert run.status is RunStatus.COMPLETED and run.output == {"after": "failed"}


def test_the_workflow_default_timeout_does_not_bound_a_wait() -> None:
    wf = workflow(wait("w", event="e"), defaults={"timeout": "1s"})
    run = new_run(wf)
    run.start(at(0))
    assert run.next_timer() is None and run.waiting()


def test_a_restored_wait_listens_again_with_its_key_and_deadline() -> None:
    wf = workflow(wait("w", event="e", key="input.customer", timeout="10s"))
    run, rec = new_run(wf, {"customer": "c-1"}), Recorder()
    run.start(at(0))
    rec.drain(run)
    assert rec.checkpoint["steps"]["w"]["k"] == "c-1"
    adopted = rec.restore(new_run(wf, {"customer": "changed-later"}))
    assert adopted.waiting() == run.waiting()
    assert adopted.next_timer() == at(10)
    assert adopted.take_event("w", run.waiting()[0].attempt_id, 1, _event(1, None), at(3))
    assert adopted.status is RunStatus.COMPLETED


def test_a_cancelled_run_stops_listening() -> None:
    wf = workflow(wait("w", event="e"))
    run = new_run(wf)
    run.start(at(0))
    (listening,) = run.waiting()
    run.cancel(at(1))
    assert run.waiting() == [] and not run.take_event("w", listening.attempt_id, 1, {}, at(2))


def test_a_key_that_is_not_a_string_or_an_integer_fails_the_step() -> None:
    wf = workflow(wait("w", event="e", key="input.customer"))
    run = new_run(wf, {"customer": {"id": 1}})
    run.start(at(0))
    assert run.status is RunStatus.FAILED
    assert "`key` must give a string or an integer, got dict" in str(run.error)


# -- heartbeats ----------------------------------------------------------------------------


def test_a_beating_step_dispatches_its_heartbeat_timeout_and_its_retry_the_last_attempt() -> None:
    wf = workflow(
        http("long", heartbeat_timeout="2s", timeout="1m", retry={"max_retries": 2}),
    )
    run, rec = new_run(wf), Recorder()
    run.start(at(0))
    first = by_step(rec.drain(run) or drain_none())["long"]
    assert (first.heartbeat_timeout, first.previous_attempt_id) == (2.0, None)

    assert not run.heartbeat_missed("long", first.attempt_id.__class__(int=3), 2.5, at(5))
    assert run.heartbeat_missed("long", first.attempt_id, 2.5, at(5))
    changes = rec.drain(run)
    assert changes is not None and changes.aborts == [first.attempt_id]
    retrying = [e for e in rec.events if e.type == "step.retrying"]
    assert retrying[0].data["error"]["category"] == "heartbeat_timeout"
    assert "sent no heartbeat for 2.5s" in str(retrying[0].data["error"])
    run.fire_timers(at(60))
    second = by_step(rec.drain(run) or drain_none())["long"]
    assert second.attempt == 2 and second.previous_attempt_id == first.attempt_id
    # Once answered, a late verdict on the old attempt changes nothing.
    assert not run.heartbeat_missed("long", first.attempt_id, 9, at(61))


def test_a_step_without_heartbeat_timeout_dispatches_none() -> None:
    run, rec = new_run(workflow(http("short"))), Recorder()
    run.start(at(0))
    (only,) = (rec.drain(run) or drain_none()).dispatches
    assert only.heartbeat_timeout is None and only.previous_attempt_id is None


def drain_none() -> Any:
    raise AssertionError("the run had no changes")


# -- steps completed from outside ------------------------------------------------------------


def _handed_off(d: Any, *, started: float = 1) -> Any:
    result = ok(d, None, started=started, finished=started + 0.1)
    return type(result)(
        attempt_id=result.attempt_id,
        step_id=result.step_id,
        outcome="handed_off",
        output=None,
        error=None,
        started_at=result.started_at,
        finished_at=result.finished_at,
        worker="w-1",
    )


def test_a_handed_off_attempt_waits_for_its_completion_which_the_orchestrator_stores() -> None:
    wf = workflow(http("ship", timeout="1m"), transform("done", "${{ steps.ship.output }}", "ship"))
    run, rec = new_run(wf), Recorder()
    run.start(at(0))
    ship = by_step(rec.drain(run) or drain_none())["ship"]
    assert rec.apply(run, _handed_off(ship), at(2))
    assert not rec.apply(run, _handed_off(ship), at(2.5))  # a duplicate changes nothing
    assert run.step_status("ship") is StepStatus.RUNNING
    assert run.handed_off() == [ship.attempt_id] and run.outstanding() == [ship.attempt_id]
    assert [e.type for e in rec.events][-2:] == ["step.started", "step.handed_off"]
    assert run.next_timer() == at(61)  # the step's timeout from when the worker started
    assert rec.checkpoint["steps"]["ship"]["h"] == 1

    # An orchestrator that adopts it keeps waiting, with the same deadline.
    adopted = rec.restore(run)
    assert adopted.handed_off() == [ship.attempt_id] and adopted.next_timer() == at(61)

    completion = ok(ship, {"tracking": "T-1"}, started=1, finished=30)
    changes_before = len(rec.events)
    assert rec.apply(adopted, completion, at(30))
    assert adopted.status is RunStatus.COMPLETED and adopted.output == {"done": {"tracking": "T-1"}}
    assert rec.results[ship.attempt_id].output == {"tracking": "T-1"}  # an inline result
    assert len(rec.events) > changes_before


def test_a_handed_off_attempt_not_completed_in_time_times_out() -> None:
    wf = workflow(http("ship", timeout="10s", retry={"max_retries": 0}))
    run, rec = new_run(wf), Recorder()
    run.start(at(0))
    ship = by_step(rec.drain(run) or drain_none())["ship"]
    rec.apply(run, _handed_off(ship), at(1))
    run.fire_timers(at(11))
    rec.drain(run)
    assert run.status is RunStatus.FAILED
    assert "was handed off and not completed within its timeout of 10s" in str(run.error)
