"""The follow-up queue worked off, and how lists and the run close.

Each step that finishes queues a follow-up (`followups`); `drain` works the queue until
nothing is left to decide. Follow-ups start the dependents of a finished node, fail its
list when it failed (unless `continue_on_failure`), and hand a finished list to its owner:
the run (top level), a condition or a switch (its chosen list), a parallel step (one
branch, judged by the join policy), a caught step (its handler) or, while the run
compensates, the phase (`compensation`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from flowforge_orchestrator.core.definition.models import ConditionStep, SwitchStep
from flowforge_orchestrator.core.graph.compensation import (
    Compensating,
    begin_compensation,
    compensation_ended,
    compensation_scopes,
    finish,
)
from flowforge_orchestrator.core.graph.context import context
from flowforge_orchestrator.core.graph.control import (
    branch_finished,
    launch,
    start_node,
    switch_output,
)
from flowforge_orchestrator.core.graph.ending import cancel_node, cancel_scope, fail, skip, succeed
from flowforge_orchestrator.core.graph.failures import (
    branch_failed,
    expression_error,
    handler_failed,
    invalid_output,
    measure,
)
from flowforge_orchestrator.core.graph.followups import Check, Finished, Launch
from flowforge_orchestrator.core.graph.nodes import FAILED, Node, Scope, list_output, list_succeeded
from flowforge_orchestrator.core.state import RunStatus, StepStatus
from flowforge_orchestrator.errors import ExpressionError

__all__ = ["Flowing", "cancel_run", "drain", "fail_run", "finish", "open_scopes"]


class Flowing(Compensating, Protocol):
    """What working the queue uses of the run: all that starting steps does, and the run's
    own status, output, error and compensation."""


def drain(run: Flowing, now: datetime) -> None:
    """Work off the follow-ups while the run is running."""
    while run._queue and run.status is RunStatus.RUNNING:
        match run._queue.popleft():
            case Finished(node):
                _after_finish(run, node, now)
            case Launch(node):
                launch(run, node, now)
            case Check(scope):
                _check(run, scope, now)


def _after_finish(run: Flowing, node: Node, now: datetime) -> None:
    scope = node.scope
    if scope.closed:
        return
    if node.status in FAILED and not node.step.continue_on_failure:
        _fail_scope(run, scope, node, now)
        return
    for dependent in scope.plan.dependents[node.step.id]:
        _maybe_start(run, scope.nodes[dependent], now)
    if list_succeeded(scope):
        _scope_done(run, scope, now)


def _check(run: Flowing, scope: Scope, now: datetime) -> None:
    if scope.closed:
        return
    for node in scope.nodes.values():
        _maybe_start(run, node, now)
    if list_succeeded(scope):
        _scope_done(run, scope, now)


def _maybe_start(run: Flowing, node: Node, now: datetime) -> None:
    if node.status is not StepStatus.PENDING or node.scope.closed:
        return
    deps = [node.scope.nodes[d] for d in node.step.depends_on]
    if not all(d.status.finished for d in deps):
        return
    if any(d.status in FAILED and not d.step.continue_on_failure for d in deps):
        return  # the failure closes the list; this guards a restored checkpoint
    if deps and all(d.status is StepStatus.SKIPPED for d in deps):
        skip(run, node, now)
    else:
        start_node(run, node, now)


def _scope_done(run: Flowing, scope: Scope, now: datetime) -> None:
    """Every step of the list finished and none failed it."""
    scope.closed, scope.outcome = True, "succeeded"
    owner = scope.owner
    if owner is None:
        _complete(run, now)
    elif scope.role == "catch":
        succeed(run, owner, list_output(scope), now)
    elif scope.role == "undo":
        compensation_ended(run, owner, scope, now)
    elif isinstance(owner.step, ConditionStep):
        succeed(run, owner, {"branch": owner.branch, "output": list_output(scope)}, now)
    elif isinstance(owner.step, SwitchStep):
        succeed(run, owner, switch_output(owner, scope), now)
    else:
        branch_finished(run, owner, scope, now)


def _fail_scope(run: Flowing, scope: Scope, culprit: Node, now: datetime) -> None:
    error = culprit.error or {"message": f"step '{culprit.key}' failed"}
    scope.closed, scope.outcome, scope.failure = True, "failed", error
    for node in scope.nodes.values():
        cancel_node(run, node, now)
    owner = scope.owner
    if owner is None:
        fail_run(run, {**error, "step_id": culprit.key}, now)
    elif scope.role == "catch":
        fail(run, owner, handler_failed(owner.key, culprit.key, error), now)
    elif scope.role == "undo":
        compensation_ended(run, owner, scope, now)
    elif isinstance(owner.step, ConditionStep):
        fail(run, owner, branch_failed(owner.key, owner.branch, culprit.key, error), now)
    elif isinstance(owner.step, SwitchStep):
        fail(run, owner, branch_failed(owner.key, f"case {owner.branch}", culprit.key, error), now)
    else:
        branch_finished(run, owner, scope, now)


def open_scopes(run: Flowing) -> list[Scope]:
    """The lists started and not closed: the top level, and those of running steps."""
    scopes = [run._root] if run._root.started and not run._root.closed else []
    scopes += [
        child
        for node in run._nodes.values()
        if node.status is StepStatus.RUNNING
        for child in node.children + node.handlers
        if child.started and not child.closed
    ]
    if run._compensation is not None:
        scopes += [s for s in compensation_scopes(run) if s.started and not s.closed]
    return scopes


# -- the run's end ---------------------------------------------------------------------------


def _complete(run: Flowing, now: datetime) -> None:
    template = run.workflow.run_output
    if template is not None:
        try:
            output = template.render(context(run, None), evaluator=run._evaluator)
        except ExpressionError as exc:
            fail_run(run, expression_error(exc), now)
            return
        problem = measure(output)[1]
        if problem is not None:
            fail_run(run, invalid_output(None, "the run output", problem), now)
            return
    else:
        output = {sid: run._root.nodes[sid].output for sid in run._root.plan.sinks}
    run.output = output
    finish(run, RunStatus.COMPLETED, now, "workflow.completed", {"output": output})


def fail_run(run: Flowing, error: dict[str, Any], now: datetime) -> None:
    """The run fails: everything not finished is cancelled, then its compensations run
    (if any) before it ends. Nothing changes once it ended or while it compensates."""
    if run.status.finished or run._compensation is not None:
        return
    cancel_scope(run, run._root, now)
    if begin_compensation(run, RunStatus.FAILED, error, now):
        return
    run.error = error
    finish(run, RunStatus.FAILED, now, "workflow.failed", {"error": error})


def cancel_run(run: Flowing, now: datetime, reason: str | None) -> bool:
    """The run is cancelled: pending steps never start, running ones are aborted, every open
    step is recorded cancelled; then its compensations run (if any) before it ends. False
    once it ended, or while it compensates (decision: the compensations, which make the
    cancellation safe, go on; the run ends as it was going to)."""
    if run.status.finished or run._compensation is not None:
        return False
    cancel_scope(run, run._root, now)
    error = {"category": "cancelled", "message": f"the run was cancelled: {reason or 'no reason'}"}
    # A pending run (a redriven one may have steps done) ends at once: it never started.
    started = run.status is RunStatus.RUNNING
    if not (started and begin_compensation(run, RunStatus.CANCELLED, error, now, reason)):
        finish(run, RunStatus.CANCELLED, now, "workflow.cancelled", {"reason": reason})
    return True
