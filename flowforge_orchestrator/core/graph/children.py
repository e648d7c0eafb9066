"""Workflow steps: each attempt starts a child run and waits for it.

The child is an ordinary run (its own row, history, limits), inserted by the commit that
records the attempt (`RunChanges.children`), under an id derived from the attempt
(`nodes.child_run_id`): a replay of that commit, by this orchestrator or one that adopted
the parent, inserts nothing more. The child's final commit writes the attempt's result,
which reaches the parent like a worker's (`RunState.apply_result`). Stopping the attempt
(a cancellation, a join, the step's `timeout`) cancels the child (`ending.abort`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from flowforge_orchestrator.core.definition.models import WorkflowStep
from flowforge_orchestrator.core.graph.attempts import Dispatching
from flowforge_orchestrator.core.graph.context import context
from flowforge_orchestrator.core.graph.ending import abort, fail
from flowforge_orchestrator.core.graph.failures import expression_error, invalid_output, measure
from flowforge_orchestrator.core.graph.moves import begin_attempt, to
from flowforge_orchestrator.core.graph.nodes import Node, child_run_id
from flowforge_orchestrator.core.records import ChildStart, Limits
from flowforge_orchestrator.core.state import StepStatus
from flowforge_orchestrator.errors import ExpressionError, PayloadTooLarge, StepError

__all__ = ["child_timer", "depth_exceeded", "start_child"]


def start_child(run: Dispatching, node: Node, now: datetime) -> None:
    """The step's next attempt: its child run is started with this commit."""
    step = node.step
    assert isinstance(step, WorkflowStep)
    begin_attempt(run, node)
    node.error = None
    depth = run.depth + 1
    if depth > run.limits.max_child_depth:
        fail(run, node, depth_exceeded(node.key, step.workflow, depth, run.limits), now)
        return
    child_input = _input(run, node, step, now)
    if child_input is None:
        return  # failed already
    assert node.attempt_id is not None
    child = child_run_id(node.attempt_id)
    if step.timeout is not None:
        run._timers.set(node, now + timedelta(seconds=step.timeout))
    data: dict[str, object] = {
        "type": step.type,
        "attempt": node.attempt,
        "workflow": step.workflow,
        "child_run_id": str(child),
    }
    if step.version is not None:
        data["version"] = step.version
    to(run, node, StepStatus.DISPATCHED, now, "step.dispatched", data=data)
    run._journal.changes().children.append(
        ChildStart(
            run_id=child,
            parent_step=node.key,
            parent_attempt_id=node.attempt_id,
            workflow=step.workflow,
            version=step.version,
            input=child_input[0],
            depth=depth,
        )
    )


def _input(run: Dispatching, node: Node, step: WorkflowStep, now: datetime) -> tuple[Any] | None:
    """The child's input rendered (in a 1-tuple: null is an input too); None once the step
    failed because it cannot be."""
    try:
        value = run.workflow.child_inputs[step.id].render(
            context(run, node), evaluator=run._evaluator
        )
    except ExpressionError as exc:
        fail(run, node, expression_error(exc), now)
        return None
    size, problem = measure(value)
    if problem is not None:
        fail(run, node, invalid_output(node.key, "the child's input", problem), now)
        return None
    if size > run.limits.max_context_bytes:
        error = PayloadTooLarge(
            step_id=node.key,
            what="the child's input",
            size=size,
            limit=run.limits.max_context_bytes,
        )
        fail(run, node, error.to_dict(), now)
        return None
    return (value,)


def child_timer(run: Dispatching, node: Node, now: datetime) -> None:
    """A workflow step's timer: a retry's backoff ended (the next child starts), or the
    step's timeout passed (its child is cancelled; retried per policy)."""
    if node.status is StepStatus.RETRYING:
        start_child(run, node, now)
        return
    step = node.step
    assert isinstance(step, WorkflowStep) and node.attempt_id is not None
    child = child_run_id(node.attempt_id)
    error = StepError(
        f"step '{node.key}': child run {child} of workflow '{step.workflow}' did not finish "
        f"within the step's timeout of {step.timeout or 0:g}s; it is cancelled",
        category="timeout",
        details={"timeout": step.timeout, "child_run_id": str(child)},
    ).to_dict()
    abort(run, node)
    fail(run, node, error, now, status=StepStatus.TIMED_OUT)


def depth_exceeded(key: str, workflow: str, depth: int, limits: Limits) -> dict[str, Any]:
    """The error of a workflow step that would nest child runs deeper than allowed."""
    limit = limits.max_child_depth
    return StepError(
        f"step '{key}': a run of workflow '{workflow}' would be a child run {depth} deep; "
        f"the limit is {limit} (FLOWFORGE_MAX_CHILD_DEPTH): does '{workflow}' call itself "
        "without a condition that stops it?",
        category="child_depth_exceeded",
        retryable=False,
        details={"workflow": workflow, "depth": depth, "limit": limit},
    ).to_dict()
