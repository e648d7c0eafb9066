"""Compensation (sagas) in one run's graph: what is undone (only what succeeded), in which
order (reverse completion), what a failing compensation does, cancellation, and a restore
mid-compensation. Pure: no services."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.core.graph.run import CompiledWorkflow, RunState
from flowforge_orchestrator.core.redrive import redrive_checkpoint
from flowforge_orchestrator.core.state import RunStatus, StepStatus
from tests.unit.test_control_flow import Live, adopt, parallel
from tests.unit.test_graph import at, http, transform, workflow

E400 = {"message": "bad request", "category": "http_400", "retryable": False}
E503 = {"message": "unavailable", "category": "http_503"}


def undoable(step_id: str, *deps: str, **extra: Any) -> dict[str, Any]:
    """An http step with a compensation that calls back with its output and the error."""
    undo = http(
        f"undo_{step_id}",
        params={
            "method": "POST",
            "url": f"https://svc.test/undo/{step_id}",
            "json": {"had": f"${{{{ steps.{step_id}.output }}}}", "why": "${{ error.message }}"},
        },
    )
    return http(step_id, *deps, compensate=[undo], **extra)


def saga(**extra: Any) -> Any:
    return workflow(
        undoable("reserve"),
        undoable("charge", "reserve"),
        http("ship", "charge"),
        undoable("notify", "ship"),
        **extra,
    )


def compensation_events(live: Live) -> list[tuple[str, str | None]]:
    return [
        (e.type, e.step_id)
        for e in live.rec.events
        if "compensat" in e.type
        or ((e.step_id or "").startswith("undo_") and e.type == "step.dispatched")
    ]


def test_a_failed_saga_undoes_what_succeeded_in_reverse_order_then_fails() -> None:
    live = Live.start(saga())
    live.ok("reserve", {"id": "R1"})
    live.ok("charge", {"id": "C1"}, now=11)
    live.fail("ship", now=12, error=E400)
    assert live.rec.status is RunStatus.RUNNING and live.run.compensating()
    assert live.dispatched()[-1] == "undo_charge"
    assert live.dispatch("undo_charge").params["json"] == {
        "had": {"id": "C1"},
        "why": "bad request",
    }
    live.ok("undo_charge", now=13)
    assert live.dispatched()[-1] == "undo_reserve"
    live.ok("undo_reserve", now=14)

    assert compensation_events(live) == [
        ("workflow.compensating", None),
        ("step.compensating", "charge"),
        ("step.dispatched", "undo_charge"),
        ("step.compensated", "charge"),
        ("step.compensating", "reserve"),
        ("step.dispatched", "undo_reserve"),
        ("step.compensated", "reserve"),
    ]
    assert live.run.status is RunStatus.FAILED
    assert live.status("undo_notify") is StepStatus.PENDING  # notify never ran
    error = live.run.error
    assert error is not None and error["category"] == "http_400"
    assert error["step_id"] == "ship"
    assert error["compensation"] == {"steps": {"charge": "compensated", "reserve": "compensated"}}
    assert "compensation_failed" not in error
    assert live.run.next_timer() is None


def test_a_cancelled_saga_compensates_what_finished_and_ends_cancelled() -> None:
    live = Live.start(saga())
    live.ok("reserve", {"id": "R1"})
    charge = live.dispatch("charge").attempt_id
    assert live.run.cancel(at(20), "customer asked")
    changes = live.rec.drain(live.run)
    assert changes is not None and charge in changes.aborts  # charge was in flight
    assert live.status("charge") is StepStatus.CANCELLED
    assert live.dispatched()[-1] == "undo_reserve"
    # While compensating, another cancellation changes nothing.
    assert live.run.cancel(at(21), "again") is False
    live.ok("undo_reserve", now=22)
    assert live.run.status is RunStatus.CANCELLED
    assert "undo_charge" not in live.dispatched()
    end = live.event("workflow.cancelled", None)
    assert end.data == {
        "reason": "customer asked",
        "compensation": {"steps": {"reserve": "compensated"}},
    }
    assert live.dispatch("undo_reserve").params["json"]["why"] == (
        "the run was cancelled: customer asked"
    )


def test_a_compensation_that_fails_after_its_retries_does_not_stop_the_others() -> None:
    retry = {"max_retries": 1, "initial_interval": 1, "jitter": False}
    wf = workflow(
        undoable("reserve"),
        http(
            "charge",
            "reserve",
            compensate=[http("refund", retry=retry)],
        ),
        http("ship", "charge"),
    )
    live = Live.start(wf)
    live.ok("reserve")
    live.ok("charge")
    live.fail("ship", error=E400)
    live.fail("refund", now=11, error=E503)
    assert live.status("refund") is StepStatus.RETRYING  # its own policy first
    live.fire(12)
    live.fail("refund", now=13, error=E503)
    assert live.dispatched()[-1] == "undo_reserve"
    live.ok("undo_reserve", now=14)
    assert live.run.status is RunStatus.FAILED
    error = live.run.error
    assert error is not None
    assert error["compensation_failed"] == ["charge"]
    assert error["compensation"]["steps"] == {
        "charge": "compensation_failed",
        "reserve": "compensated",
    }
    assert error["message"] == "bad request; compensation failed for: charge"
    failed = live.event("step.compensation_failed", "charge")
    assert failed.data["error"]["message"] == "unavailable"


def test_a_restore_mid_compensation_goes_on_and_starts_nothing_twice() -> None:
    live = Live.start(saga())
    live.ok("reserve", {"id": "R1"})
    live.ok("charge", {"id": "C1"})
    live.fail("ship", error=E400)
    adopted, changes = adopt(live.run, live.rec, 15)
    assert changes.events == []
    assert [d.step_id for d in changes.dispatches] == ["undo_charge"]
    assert changes.dispatches[0].attempt_id == live.dispatch("undo_charge").attempt_id
    assert changes.dispatches[0].params == live.dispatch("undo_charge").params
    live.run = adopted
    live.ok("undo_charge", now=16)
    # Adopted again between two compensations: the next one is running, the first done.
    again, changes = adopt(live.run, live.rec, 17)
    assert changes.events == [] and [d.step_id for d in changes.dispatches] == ["undo_reserve"]
    live.run = again
    live.ok("undo_reserve", now=18)
    assert live.run.status is RunStatus.FAILED
    # Re-dispatches after an adoption carry the same attempt id (arq drops the copy);
    # each compensation step was dispatched once.
    started = [e.step_id for e in live.rec.events if e.type == "step.dispatched"]
    assert started == ["reserve", "charge", "ship", "undo_charge", "undo_reserve"]
    assert len({d.attempt_id for d in live.rec.dispatches if d.step_id == "undo_charge"}) == 1


def test_parallel_branches_are_undone_in_reverse_completion_order() -> None:
    wf = workflow(
        parallel("both", [undoable("left")], [undoable("right")]),
        http("last", "both"),
    )
    live = Live.start(wf)
    live.ok("right")  # completes first
    live.ok("left", now=11)
    live.fail("last", error=E400)
    live.ok("undo_left", now=12)
    live.ok("undo_right", now=13)
    order = [e.step_id for e in live.rec.events if e.type == "step.compensating"]
    assert order == ["left", "right"]
    assert live.run.status is RunStatus.FAILED


def test_compensate_on_failed_only_ends_a_cancelled_run_at_once() -> None:
    live = Live.start(saga(compensate_on=["failed"]))
    live.ok("reserve")
    assert live.run.cancel(at(20), "stop")
    live.rec.drain(live.run)
    assert live.run.status is RunStatus.CANCELLED
    assert not [k for k in live.dispatched() if k.startswith("undo_")]


def test_a_caught_step_is_not_compensated_and_the_run_timeout_spares_compensations() -> None:
    wf = workflow(
        undoable("reserve"),
        undoable(
            "charge",
            "reserve",
            catch=[{"steps": [transform("free", "no charge")]}],
        ),
        http("ship", "charge"),
        timeout=60,
    )
    live = Live.start(wf)
    live.ok("reserve")
    live.fail("charge", error=E400)
    assert live.status("charge") is StepStatus.SUCCEEDED
    live.fire(60)  # the run times out: it fails, and compensates
    assert live.run.compensating()
    assert live.dispatched()[-1] == "undo_reserve"
    assert live.run.next_timer() is not None and live.run.next_timer() != at(60)
    live.ok("undo_reserve", now=200)  # long after the run's deadline
    assert live.run.status is RunStatus.FAILED
    assert live.run.error is not None and live.run.error["category"] == "run_timeout"
    assert live.run.error["compensation"]["steps"] == {"reserve": "compensated"}


def test_a_finished_fan_out_keeps_its_own_compensation() -> None:
    """Its elements leave memory when it ends; its compensation must not go with them."""
    wf = workflow(
        {
            "id": "each",
            "type": "parallel",
            "for_each": "input.xs",
            "step": http("one", params={"url": "https://svc.test/${{ index }}"}),
            "compensate": [http("undo_each")],
        },
        http("last", "each"),
    )
    for xs in ([], [1, 2]):
        live = Live.start(wf, {"xs": xs})
        for index in range(len(xs)):
            live.ok(f"one[{index}]")
        live.fail("last", error=E400)
        assert live.dispatched()[-1] == "undo_each"
        assert live.run.outstanding() == [live.dispatch("undo_each").attempt_id]
        live.ok("undo_each")
        assert live.run.status is RunStatus.FAILED
        assert live.run.error is not None
        assert live.run.error["compensation"] == {"steps": {"each": "compensated"}}


def test_the_readme_saga_parses_and_compensates_as_it_says() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### Handling failures", 1)[1]
    text = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert text is not None
    wf = CompiledWorkflow(parse_definition(yaml.safe_load(text[1])))
    live = Live.start(wf, {"order_id": "A-1", "lines": [1], "total": 10})
    live.ok("reserve", {"body": {"id": "R9"}})
    live.ok("charge", {"body": {"id": "C7"}})
    live.fail("ship", error=E400)
    assert live.dispatch("refund").params == {
        "method": "POST",
        "json": {"reason": "bad request"},
        "url": "https://pay.internal/refund/C7",
    }
    assert "release" not in live.dispatched()  # one at a time, latest completion first
    live.ok("refund")
    assert live.dispatch("release").params["url"] == "https://stock.internal/release/R9"
    live.ok("release")
    assert live.run.status is RunStatus.FAILED
    assert live.run.error is not None
    assert live.run.error["compensation"]["steps"] == {
        "charge": "compensated",
        "reserve": "compensated",
    }


def test_a_restored_fan_out_with_a_catch_and_a_compensation_ends_as_the_original() -> None:
    wf = workflow(
        {
            "id": "each",
            "type": "parallel",
            "for_each": "input.xs",
            "step": http("one", params={"url": "https://svc.test/${{ index }}"}),
            "catch": [{"steps": [http("ask"), http("ask2", "ask")]}],
            "compensate": [http("undo_each")],
        },
        http("gate"),
        transform("after", "${{ steps.each.output }}", "each", "gate"),
        http("last", "after"),
    )
    live = Live.start(wf, {"xs": [1, 2]})
    live.ok("one[0]")
    adopted, changes = adopt(live.run, live.rec, 11)
    assert changes.events == []
    live.run = adopted
    live.fail("one[1]", error=E400)  # the join fails: caught, its handler runs
    live.ok("ask")
    again, changes = adopt(live.run, live.rec, 12)  # mid-handler: `ask` done, `ask2` out
    assert changes.events == []
    assert sorted(d.step_id for d in changes.dispatches) == ["ask2", "gate"]
    live.run = again
    assert live.status("each") is StepStatus.RUNNING
    live.ok("ask2", "join_failed")
    live.ok("gate")
    assert live.run.step_status("after") is StepStatus.SUCCEEDED
    assert live.dispatch("last")  # after succeeded with the handler's output
    live.fail("last", error=E400)
    # Caught: its own work failed, so it is not compensated.
    assert live.run.status is RunStatus.FAILED
    assert "undo_each" not in live.dispatched()
    after = [r for r in live.rec.results.values() if r.step_id == "after"]
    assert [r.output for r in after] == ["join_failed"]


def test_a_redriven_saga_runs_the_undone_steps_again_and_may_compensate_again() -> None:
    live = Live.start(saga())
    live.ok("reserve")
    live.ok("charge")
    live.fail("ship", error=E400)
    live.ok("undo_charge")
    live.ok("undo_reserve")
    first_undo = live.dispatch("undo_charge").attempt_id
    checkpoint = redrive_checkpoint(live.run.workflow, live.rec.checkpoint)
    assert "u" not in checkpoint and "o" not in checkpoint
    live.run = RunState(
        run_id=live.run.run_id,
        workflow=live.run.workflow,
        version=3,
        input={},
        limits=live.run.limits,
        status=RunStatus.PENDING,
        checkpoint=checkpoint,
        results=live.rec.results,
    )
    live.run.start(at(100))
    live.rec.drain(live.run)
    assert live.dispatched()[-1] == "reserve"  # undone: it runs again
    live.ok("reserve", now=101)
    live.ok("charge", now=102)
    live.fail("ship", now=103, error=E400)
    assert live.dispatched()[-1] == "undo_charge"
    assert live.dispatch("undo_charge").attempt_id != first_undo
    live.ok("undo_charge", now=104)
    live.ok("undo_reserve", now=105)
    assert live.run.status is RunStatus.FAILED
    assert live.run.error is not None
    assert live.run.error["compensation"]["steps"] == {
        "charge": "compensated",
        "reserve": "compensated",
    }


def test_redrive_resets_a_condition_whose_steps_catch_and_compensate() -> None:
    wf = workflow(
        {
            "id": "route",
            "type": "condition",
            "if": "true",
            "then": [
                undoable("inner", catch=[{"errors": ["timeout"], "steps": [transform("h", 1)]}]),
                http("boom", "inner"),
            ],
        }
    )
    live = Live.start(wf)
    live.ok("inner")
    live.fail("boom", error=E400)
    live.ok("undo_inner")
    assert live.run.status is RunStatus.FAILED
    checkpoint = redrive_checkpoint(wf, live.rec.checkpoint)
    assert checkpoint["steps"]["inner"] == "p1" and checkpoint["steps"]["undo_inner"] == "p1"
