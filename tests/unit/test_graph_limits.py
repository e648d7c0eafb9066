"""The graph within bounds: values PostgreSQL cannot store fail their step, every expression
goes through the run's evaluator, and a definition nested as deep as allowed runs without
deep recursion."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from flowforge_orchestrator.core.definition.checks import MAX_STEP_DEPTH
from flowforge_orchestrator.core.expressions.cost import Budget, Weight, weigh
from flowforge_orchestrator.core.expressions.templates import Expression
from flowforge_orchestrator.core.graph.nodes import FrameWeigher
from flowforge_orchestrator.core.graph.run import RunState
from flowforge_orchestrator.core.jsonb import value_problem
from flowforge_orchestrator.core.records import Limits
from flowforge_orchestrator.core.state import RunStatus, StepStatus
from flowforge_orchestrator.engine.sandbox.pool import BoundedEvaluator, Sandbox
from tests.unit.test_definitions import nested
from tests.unit.test_graph import (
    LIMITS,
    RUN_ID,
    Recorder,
    at,
    http,
    new_run,
    ok,
    transform,
    workflow,
)


def failure(run: RunState, key: str) -> dict[str, Any]:
    error = run._nodes[key].error
    assert error is not None
    return error


# --- what PostgreSQL cannot store ----------------------------------------------------------


def test_a_transform_output_holding_a_nul_fails_its_step_as_invalid_output() -> None:
    run = new_run(workflow(transform("t", "${{ 'a\\x00b' }}"), transform("after", 1, "t")))
    run.start(at(0))
    assert run.step_status("t") is StepStatus.FAILED
    error = failure(run, "t")
    assert error["category"] == "invalid_output"
    assert error["retryable"] is False
    assert error["message"] == (
        "step 't': the output cannot be stored: it holds a NUL character (\\u0000), "
        "which PostgreSQL cannot store"
    )
    assert run.status is RunStatus.FAILED


def test_a_computed_output_nested_past_64_fails_its_step() -> None:
    deep = "[" * 70 + "1" + "]" * 70
    run = new_run(workflow(transform("t", f"${{{{ {deep} }}}}")))
    run.start(at(0))
    assert failure(run, "t")["message"].endswith("it is nested more than 64 levels deep")
    fine = new_run(workflow(transform("t", "${{ " + "[" * 60 + "1" + "]" * 60 + " }}")))
    fine.start(at(0))
    assert fine.status is RunStatus.COMPLETED


def test_a_run_output_holding_a_nul_fails_the_run() -> None:
    run = new_run(workflow(transform("t", 1), output={"x": "${{ input.s + '\\x00' }}"}), {"s": "a"})
    run.start(at(0))
    assert run.status is RunStatus.FAILED
    assert run.error is not None
    assert run.error["category"] == "invalid_output"
    assert "the run output cannot be stored" in run.error["message"]


def test_rendered_parameters_holding_a_nul_are_never_dispatched() -> None:
    wf = workflow(http("a", params={"url": "https://x.test/", "json": "${{ input.v + '\\x00' }}"}))
    run = new_run(wf, {"v": "x"})
    run.start(at(0))
    changes = run.take_changes()
    assert changes is not None and changes.dispatches == []
    assert failure(run, "a")["category"] == "invalid_output"
    assert "the rendered parameters cannot be stored" in failure(run, "a")["message"]


def test_an_expression_error_quoting_a_nul_is_recorded_mended() -> None:
    run = new_run(workflow(transform("t", "${{ {'a': 1}['b\\x00c'] }}")))
    run.start(at(0))
    error = failure(run, "t")
    assert error["category"] == "expression_error"
    assert value_problem(error) is None  # PostgreSQL can store it
    assert "b\ufffdc" in error["message"]


# --- every evaluation goes through the run's evaluator -------------------------------------


class Recording:
    """An Evaluator that notes each (step, field) it is asked and evaluates in process."""

    def __init__(self) -> None:
        self.seen: list[tuple[str | None, str | None]] = []

    def evaluate(self, expression: Expression, context: Any) -> Any:
        self.seen.append((expression.step_id, expression.field))
        return expression.run(expression.variables(context))


def test_every_expression_site_uses_the_evaluator() -> None:
    wf = workflow(
        http("a", params={"url": "https://x.test/${{ input.id }}"}),
        {"id": "c", "type": "condition", "depends_on": ["a"], "if": "steps.a.output.ok",
         "then": [transform("t", {"v": "${{ steps.a.output.n + 1 }}"})]},
        {"id": "d", "type": "delay", "depends_on": ["a"], "until": "'2024-05-01T12:00:00Z'"},
        {"id": "f", "type": "parallel", "depends_on": ["a"], "for_each": "steps.a.output.items",
         "step": transform("e", "${{ item * 2 }}")},
        output={"n": "${{ steps.f.output.size() }}"},
    )  # fmt: skip
    recording = Recording()
    run = RunState(
        run_id=RUN_ID, workflow=wf, version=3, input={"id": 7}, limits=LIMITS, evaluator=recording
    )
    recorder = Recorder()
    run.start(at(0))
    changes = recorder.drain(run)
    assert changes is not None
    (dispatch,) = changes.dispatches
    assert dispatch.params["url"] == "https://x.test/7"
    recorder.apply(run, ok(dispatch, {"ok": True, "n": 1, "items": [1, 2]}), at(2))
    assert run.status is RunStatus.COMPLETED
    assert sorted(set(recording.seen), key=str) == sorted(
        {
            ("a", "with.url"),
            ("c", "if"),
            ("t", "output.v"),
            ("d", "until"),
            ("f", "for_each"),
            ("e", "output"),
            (None, "output.n"),
        },
        key=str,
    )


def test_a_restored_fan_out_evaluates_for_each_through_the_evaluator() -> None:
    wf = workflow(
        {"id": "f", "type": "parallel", "for_each": "input.items",
         "step": http("e", params={"url": "https://x.test/${{ item }}"})},
    )  # fmt: skip
    recording = Recording()
    run = new_run(wf, {"items": [1, 2]})
    recorder = Recorder()
    run.start(at(0))
    recorder.drain(run)
    RunState(
        run_id=RUN_ID,
        workflow=wf,
        version=3,
        input={"items": [1, 2]},
        limits=LIMITS,
        status=RunStatus.RUNNING,
        checkpoint=recorder.checkpoint,
        evaluator=recording,
    )
    assert recording.seen == [("f", "for_each")]


def test_weights_come_from_the_cached_outputs_and_input() -> None:
    wf = workflow(http("a"), transform("t", "${{ steps.a.output.x }}", "a"))
    run = new_run(wf, {"big": list(range(10))})
    recorder = Recorder()
    run.start(at(0))
    changes = recorder.drain(run)
    assert changes is not None
    (dispatch,) = changes.dispatches
    output = {"x": "y" * 50, "l": [1, 2, 3]}
    recorder.apply(run, ok(dispatch, output), at(1))
    frame = run._root.frame
    weigher = FrameWeigher(frame, run._weigh_input)
    entry = {"output": output, "status": "succeeded", "error": None}
    assert weigher.weight("steps", frozenset({"a"})) == weigh(entry)
    assert weigher.weight("steps", None) == weigh(entry) + weigh(run._nodes["t"].context_entry())
    assert weigher.weight("input", None) == weigh({"big": list(range(10))})
    assert run._nodes["a"].weight is not None  # cached
    big = new_run(wf, {"big": list(range(100_000))})
    assert big._weigh_input().nodes == 2_001  # "more than the cap": not walked further


# --- bounded, with a real sandbox ----------------------------------------------------------


@pytest.fixture(scope="module")
def bounded() -> Iterator[BoundedEvaluator]:
    budget = Budget(timeout=0.1, memory_bytes=256 << 20, max_result_bytes=4 << 20)
    with Sandbox(budget) as sandbox:
        assert sandbox.warm(20)
        yield BoundedEvaluator(sandbox)


def test_a_cel_bomb_fails_its_step_naming_the_limit_and_nothing_else(
    bounded: BoundedEvaluator,
) -> None:
    wf = workflow(
        transform("ok", "${{ input.l.size() }}"),
        transform("bomb", "${{ input.l.map(x, input.l.map(y, x + y)) }}"),
        transform("mapped", "${{ input.l.map(x, x * 2).size() }}"),
    )
    run = RunState(
        run_id=RUN_ID,
        workflow=wf,
        version=3,
        input={"l": list(range(400))},
        limits=Limits(max_output_bytes=10**6, max_context_bytes=10**7, default_timeout=30),
        evaluator=bounded,
    )
    run.start(at(0))
    assert run.step_status("ok") is StepStatus.SUCCEEDED
    assert run._nodes["mapped"].output == 400
    error = failure(run, "bomb")
    assert error["category"] == "expression_error"
    assert "evaluation ran past FLOWFORGE_EXPRESSION_TIMEOUT (100 ms)" in error["message"]
    assert error["details"]["field"] == "output"
    assert run.status is RunStatus.FAILED


# --- as deep as allowed, without deep recursion -------------------------------------------


def frames() -> int:
    depth = 0
    frame: FrameType | None = sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    return depth


@pytest.fixture
def little_stack() -> Iterator[None]:
    """Python frames limited to what a few levels of recursion per step level need: a path
    that recursed per value, per element or per event would not fit."""
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(frames() + 250)
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)


def test_a_definition_nested_as_deep_as_allowed_runs_restores_and_completes(
    little_stack: None,
) -> None:
    leaf = http(f"s{MAX_STEP_DEPTH}", params={"url": "https://x.test/${{ item }}"})
    wf = workflow(*nested(MAX_STEP_DEPTH, leaf=leaf)["steps"])
    run = new_run(wf)
    recorder = Recorder()
    run.start(at(0))
    changes = recorder.drain(run)
    assert changes is not None
    (dispatch,) = changes.dispatches
    assert dispatch.step_id.count("[0]") == len(range(2, MAX_STEP_DEPTH, 3))
    adopted = recorder.restore(run)
    adopted.resume(at(1))
    recorder.drain(adopted)
    recorder.apply(adopted, ok(dispatch, {"done": True}), at(2))
    assert adopted.status is RunStatus.COMPLETED
    assert recorder.status is RunStatus.COMPLETED
    cancelled = new_run(wf)
    cancelled.start(at(0))
    assert cancelled.cancel(at(1))
    assert all(n.status.finished for n in cancelled._nodes.values())


def test_weights_of_a_fresh_run_are_unknown_until_asked() -> None:
    run = new_run(workflow(transform("t", 1)), {"a": 1})
    assert run._input_weight is None
    assert run._weigh_input() == Weight(2, 1, 1, 1)
