"""Workflow steps in one run's graph: an attempt starts one child run (its id derived from
the attempt), the child's result ends the step like a worker's, a retry starts a new child,
stopping the step cancels its child, and the depth limit fails the step, not the run's
engine."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from flowforge_orchestrator.core.definition.calls import unguarded_self_calls
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.core.graph.nodes import child_run_id
from flowforge_orchestrator.core.graph.run import RunState
from flowforge_orchestrator.core.records import ChildStart, RunChanges, StepResult
from flowforge_orchestrator.core.state import RunStatus, StepStatus
from flowforge_orchestrator.errors import DefinitionError
from tests.unit.test_graph import LIMITS, RUN_ID, Recorder, at, http, kinds, new_run, workflow


def call(step_id: str, *deps: str, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"id": step_id, "type": "workflow", "depends_on": list(deps)}
    return {"workflow": "charge", **spec, **extra}


def answer(
    child: ChildStart, output: Any = None, error: dict[str, Any] | None = None
) -> StepResult:
    """The result row a child's final commit writes for its parent's attempt."""
    return StepResult(
        attempt_id=child.parent_attempt_id,
        step_id=child.parent_step,
        outcome="failed" if error else "succeeded",
        output=output,
        error=error,
        started_at=at(1),
        finished_at=at(2),
    )


def started(changes: RunChanges | None) -> list[ChildStart]:
    assert changes is not None
    return changes.children


def test_a_workflow_step_starts_one_child_with_its_rendered_input_and_uses_its_output() -> None:
    wf = workflow(
        call("pay", input={"amount": "${{ input.total * 2 }}"}, version=2),
        {
            "id": "after",
            "type": "transform",
            "depends_on": ["pay"],
            "output": "${{ steps.pay.output.receipt }}",
        },
    )
    run, rec = new_run(wf, {"total": 21}), Recorder()
    run.start(at(0))
    first = rec.drain(run)
    (child,) = started(first)
    assert first is not None and first.dispatches == []  # no worker job
    assert child.input == {"amount": 42} and child.workflow == "charge" and child.version == 2
    assert child.depth == 1 and child.parent_step == "pay"
    assert child.run_id == child_run_id(child.parent_attempt_id)
    dispatched = [e for e in rec.events if e.type == "step.dispatched"]
    assert dispatched[0].data["child_run_id"] == str(child.run_id)
    assert run.children_out() == [child.parent_attempt_id]
    assert run.outstanding() == [child.parent_attempt_id] and run.handed_off() == []

    assert rec.apply(run, answer(child, {"receipt": "R-1"}), at(3))
    assert run.status is RunStatus.COMPLETED and run.output == {"after": "R-1"}
    assert run.children_out() == []


def test_a_failed_child_fails_the_step_and_a_retry_starts_a_new_child() -> None:
    retry = {
        "max_retries": 1,
        "initial_interval": "1s",
        "jitter": False,
        "retry_on": ["child_failed"],
    }
    run, rec = new_run(workflow(call("pay", retry=retry))), Recorder()
    run.start(at(0))
    (first,) = started(rec.drain(run))
    error = {"category": "child_failed", "message": "child run failed", "retryable": True}
    assert rec.apply(run, answer(first, error=error), at(3))
    assert run.step_status("pay") is StepStatus.RETRYING
    assert run.fire_timers(at(4))
    (second,) = started(rec.drain(run))
    assert second.run_id != first.run_id and second.parent_attempt_id != first.parent_attempt_id
    # The first child's late answer is stale; the second's fails the step for good.
    assert not run.apply_result(answer(first, {"late": True}), at(5))
    assert rec.apply(run, answer(second, error=error), at(6))
    assert run.status is RunStatus.FAILED
    assert run.error is not None and run.error["category"] == "child_failed"


def test_cancelling_the_parent_cancels_its_running_child() -> None:
    run, rec = new_run(workflow(call("pay"), http("other"))), Recorder()
    run.start(at(0))
    (child,) = started(rec.drain(run))
    assert run.cancel(at(1), "asked")
    changes = rec.drain(run)
    assert changes is not None
    assert changes.child_cancels == [child.run_id]
    assert child.parent_attempt_id not in changes.aborts  # no worker job to abort
    assert len(changes.aborts) == 1  # the http step's
    assert run.status is RunStatus.CANCELLED


def test_a_step_timeout_cancels_the_child_and_retries_with_a_new_one() -> None:
    retry = {"max_retries": 1, "initial_interval": "1s", "jitter": False}
    run, rec = new_run(workflow(call("pay", timeout="10s", retry=retry))), Recorder()
    run.start(at(0))
    (first,) = started(rec.drain(run))
    assert run.next_timer() == at(10)
    assert run.fire_timers(at(10))
    changes = rec.drain(run)
    assert changes is not None and changes.child_cancels == [first.run_id]
    assert run.step_status("pay") is StepStatus.RETRYING
    assert run.fire_timers(at(11))
    (second,) = started(rec.drain(run))
    assert second.run_id != first.run_id


def test_the_depth_limit_fails_the_step_naming_the_workflow_and_the_depth() -> None:
    limits = replace(LIMITS, max_child_depth=3)
    run = RunState(
        run_id=RUN_ID, workflow=workflow(call("again")), version=3, input={}, limits=limits, depth=3
    )
    rec = Recorder()
    run.start(at(0))
    changes = rec.drain(run)
    assert changes is not None and changes.children == []
    assert run.status is RunStatus.FAILED and run.error is not None
    assert run.error["category"] == "child_depth_exceeded"
    assert "'charge'" in run.error["message"] and "4 deep" in run.error["message"]
    assert run.error["retryable"] is False


def test_a_restored_parent_waits_for_the_same_child_and_starts_no_other() -> None:
    run, rec = new_run(workflow(call("pay"))), Recorder()
    run.start(at(0))
    (child,) = started(rec.drain(run))
    adopted = rec.restore(run)
    adopted.resume(at(1))
    again = adopted.take_changes()
    assert again is None or (again.children == [] and again.dispatches == [])
    assert adopted.children_out() == [child.parent_attempt_id]
    assert adopted.apply_result(answer(child, {"ok": 1}), at(2))
    assert adopted.status is RunStatus.COMPLETED


def test_a_fan_out_of_children_starts_one_child_per_element_within_max_parallel() -> None:
    wf = workflow(
        {
            "id": "all",
            "type": "parallel",
            "for_each": "input.items",
            "max_parallel": 2,
            "step": call("one", input={"n": "${{ item }}"}),
        },
    )
    run, rec = new_run(wf, {"items": [1, 2, 3]}), Recorder()
    run.start(at(0))
    children = started(rec.drain(run))
    assert [c.input for c in children] == [{"n": 1}, {"n": 2}]
    assert [c.parent_step for c in children] == ["one[0]", "one[1]"]
    assert run.apply_result(answer(children[0], 10), at(1))
    (third,) = started(rec.drain(run))
    assert third.input == {"n": 3}


def test_a_join_that_cancels_losers_cancels_their_children() -> None:
    wf = workflow(
        {"id": "race", "type": "parallel", "join": "any", "branches": [[call("a")], [call("b")]]},
    )
    run, rec = new_run(wf), Recorder()
    run.start(at(0))
    a, b = started(rec.drain(run))
    run.apply_result(answer(a, 1), at(1))
    changes = run.take_changes()
    assert changes is not None and changes.child_cancels == [b.run_id]
    assert run.status is RunStatus.COMPLETED


def test_the_workflow_step_model_and_its_input_expressions_are_checked() -> None:
    with pytest.raises(DefinitionError) as info:
        parse_definition(
            {
                "name": "p",
                "version": 1,
                "steps": [
                    {
                        "id": "a",
                        "type": "workflow",
                        "workflow": "bad name!",
                        "vesion": 2,
                        "input": {"x": "${{ steps.nope.output }}"},
                    }
                ],
            }
        )
    text = str(info.value)
    assert "workflow" in text and "vesion" in text
    with pytest.raises(DefinitionError, match="nope"):
        parse_definition(
            {
                "name": "p",
                "version": 1,
                "steps": [
                    {
                        "id": "a",
                        "type": "workflow",
                        "workflow": "c",
                        "input": {"x": "${{ steps.nope.output }}"},
                    }
                ],
            }
        )
    ok = parse_definition(
        {"name": "p", "version": 1, "steps": [{"id": "a", "type": "workflow", "workflow": "c"}]}
    )
    assert ok.steps[0].type == "workflow"


def test_kinds_of_a_child_attempt_match_a_worker_attempt() -> None:
    run, rec = new_run(workflow(call("pay"))), Recorder()
    run.start(at(0))
    (child,) = started(rec.drain(run))
    rec.apply(run, answer(child, {}), at(1))
    assert kinds(rec.events) == [
        ("workflow.started", None),
        ("step.dispatched", "pay"),
        ("step.started", "pay"),
        ("step.succeeded", "pay"),
        ("workflow.completed", None),
    ]


def _calls_of(*steps: dict[str, Any]) -> list[str]:
    definition = parse_definition({"name": "tree", "version": 1, "steps": list(steps)})
    return unguarded_self_calls(definition)


def test_a_workflow_calling_itself_without_a_condition_is_found() -> None:
    me = {"workflow": "tree"}
    assert _calls_of(call("again", **me)) == ["again"]
    assert _calls_of(
        {"id": "both", "type": "parallel", "branches": [[call("left", **me)], [http("x")]]}
    ) == ["left"]
    assert _calls_of(call("other")) == []  # another workflow
    guarded: list[dict[str, Any]] = [
        {"id": "c", "type": "condition", "if": "input.more", "then": [call("a", **me)]},
        {
            "id": "s",
            "type": "switch",
            "cases": [{"when": "input.more", "steps": [call("b", **me)]}],
        },
        {"id": "f", "type": "parallel", "for_each": "input.kids", "step": call("d", **me)},
        {**http("h"), "catch": [{"steps": [call("e", **me)]}]},
    ]
    assert _calls_of(*guarded) == []


def test_unwritten_changes_followed_by_an_ended_attempt_start_no_child() -> None:
    run, rec = new_run(workflow(call("pay"), http("other"))), Recorder()
    run.start(at(0))
    earlier = run.take_changes()  # not written: its row was locked elsewhere
    assert earlier is not None
    (child,) = earlier.children
    run.cancel(at(1), "asked")
    merged = earlier.then(run.take_changes())
    assert merged.children == []  # never inserted, so nothing to cancel either
    assert merged.child_cancels == []
    assert merged.status is RunStatus.CANCELLED
    assert rec.events == [] and child.run_id not in merged.child_cancels


def test_a_restored_parent_keeps_its_steps_deadline_and_cancels_the_child_at_it() -> None:
    run, rec = new_run(workflow(call("pay", timeout="10s"))), Recorder()
    run.start(at(0))
    (child,) = started(rec.drain(run))
    adopted = rec.restore(run)
    adopted.resume(at(5))
    assert adopted.next_timer() == at(10)
    assert adopted.fire_timers(at(10))
    changes = adopted.take_changes()
    assert changes is not None and changes.child_cancels == [child.run_id]
    assert adopted.status is RunStatus.FAILED
    assert adopted.error is not None and adopted.error["category"] == "timeout"


def test_a_restored_fan_out_of_children_waits_for_the_same_children() -> None:
    wf = workflow(
        {
            "id": "all",
            "type": "parallel",
            "for_each": "input.items",
            "step": call("one", input={"n": "${{ item }}"}),
        },
    )
    run, rec = new_run(wf, {"items": [1, 2, 3]}), Recorder()
    run.start(at(0))
    children = started(rec.drain(run))
    assert rec.apply(run, answer(children[0], 10), at(1))
    assert "one[1]" not in rec.checkpoint["steps"]  # the elements are packed
    adopted = rec.restore(run)
    adopted.resume(at(2))
    again = adopted.take_changes()
    assert again is None or again.children == []
    assert sorted(adopted.children_out()) == sorted(c.parent_attempt_id for c in children[1:])
    for child in children[1:]:
        assert adopted.apply_result(answer(child, child.input["n"] * 10), at(3))
    assert adopted.status is RunStatus.COMPLETED
    assert [b["output"] for b in adopted.output["all"]] == [10, 20, 30]


def test_an_input_that_cannot_be_rendered_or_is_too_large_fails_the_step_alone() -> None:
    wf = workflow(
        call("bad", input={"x": "${{ input.missing.deeper }}"}, continue_on_failure=True),
        call("big", input={"blob": "${{ input.blob }}"}, continue_on_failure=True),
    )
    limits = replace(LIMITS, max_context_bytes=2_000)
    run = RunState(
        run_id=RUN_ID, workflow=wf, version=3, input={"blob": "x" * 2_500}, limits=limits
    )
    rec = Recorder()
    run.start(at(0))
    changes = rec.drain(run)
    assert changes is not None and changes.children == []
    failed = {e.step_id: e.data["error"] for e in rec.events if e.type == "step.failed"}
    assert failed["bad"]["category"] == "expression_error"
    assert failed["big"]["category"] == "payload_too_large"
    assert "the child's input" in failed["big"]["message"]
    assert run.status is RunStatus.COMPLETED  # each failure was its step's alone
