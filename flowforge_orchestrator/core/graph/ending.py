"""How steps end: succeed (within the byte limits), fail (or wait to be retried, as the
step's policy says), be skipped, be cancelled; and the lists that end with them, skipped or
cancelled as a whole.

Ending a worker step's attempt also records it for its commit (`attempts_finished`); a step
the orchestrator ran itself stores its outcome as a result (`inline_results`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Protocol

from flowforge_orchestrator.core.definition.models import TaskStep, WorkflowStep
from flowforge_orchestrator.core.graph.catching import catch
from flowforge_orchestrator.core.graph.failures import invalid_output, measure, too_large
from flowforge_orchestrator.core.graph.moves import Moving, to
from flowforge_orchestrator.core.graph.nodes import Node, Scope, child_run_id, list_succeeded
from flowforge_orchestrator.core.graph.packing import touch
from flowforge_orchestrator.core.graph.timers import iso
from flowforge_orchestrator.core.records import AttemptFinished, InlineResult, Limits, json_size
from flowforge_orchestrator.core.retry import RetryDecision, decide
from flowforge_orchestrator.core.state import StepStatus

__all__ = [
    "Ending",
    "abort",
    "cancel_children",
    "cancel_node",
    "cancel_scope",
    "fail",
    "skip",
    "skip_scope",
    "succeed",
]


class Ending(Moving, Protocol):
    """What ending steps uses of the run."""

    limits: Limits
    # The keys of the steps with a compensation that succeeded, in the order they did.
    _completed: list[str]


def succeed(
    run: Ending, node: Node, output: object, now: datetime, *, computed: bool = False
) -> None:
    """Succeed with `output`, or fail the step if the output breaks a byte limit.
    `computed`: the orchestrator made it (a transform), so it is also checked for what
    PostgreSQL cannot store (a NUL, a lone surrogate, nesting past jsonb.MAX_DEPTH)."""
    if computed:
        size, problem = measure(output)
        error = invalid_output(node.key, "the output", problem) if problem else None
    else:
        size, error = json_size(output), None
    error = error or too_large(run.limits, run._context_bytes, node.key, size)
    if error is not None:
        fail(run, node, error, now)
        return
    was_with_worker = node.with_worker
    run._timers.clear(node)
    node.output = output
    run._context_bytes += size
    to(run, node, StepStatus.SUCCEEDED, now, "step.succeeded")
    if node.undo is not None and node.caught is None:
        run._completed.append(node.key)  # a caught step's own work failed: nothing to undo
    assert node.attempt_id is not None
    changes = run._journal.changes()
    if was_with_worker:
        changes.attempts_finished.append(
            AttemptFinished(node.attempt_id, StepStatus.SUCCEEDED, now, None)
        )
    if was_with_worker and node.handed_off:
        # Completed from outside: the orchestrator stores what the worker did not.
        changes.inline_results.append(
            InlineResult(node.attempt_id, node.key, "succeeded", output, None, now)
        )
    elif not was_with_worker and node.caught is None:
        # A caught step's attempt has its failure stored; its output is its handler's.
        changes.inline_results.append(
            InlineResult(node.attempt_id, node.key, "succeeded", output, None, now)
        )


def fail(
    run: Ending,
    node: Node,
    error: dict[str, Any],
    now: datetime,
    *,
    status: StepStatus = StepStatus.FAILED,
) -> None:
    """The attempt failed (`status`: failed or timed_out): retry it if its policy says so,
    else the step fails."""
    cancel_children(run, node, now)  # a control step that fails ends what it holds
    with_worker = node.with_worker
    decision = _decision(run, node, error, now) if with_worker else None
    if decision is not None and error.get("retryable", True) is not False:
        # "retryable": true only says the error may be retried: say what the policy decided.
        error = {**error, "retry_decision": decision.reason}
    node.error = error
    touch(run._packed, node)  # a caught element moves without `to`
    run._timers.clear(node)
    if with_worker:
        assert node.attempt_id is not None
        run._journal.changes().attempts_finished.append(
            AttemptFinished(node.attempt_id, status, now, error)
        )
        if node.handed_off:
            run._journal.changes().inline_results.append(
                InlineResult(node.attempt_id, node.key, "failed", None, error, now)
            )
        if decision is not None and decision.retry:
            _retry(run, node, error, now, status, decision.delay)
            return
    if node.attempt_id is not None and not isinstance(node.step, TaskStep) and node.caught is None:
        run._journal.changes().inline_results.append(
            InlineResult(node.attempt_id, node.key, "failed", None, error, now)
        )
    if catch(run, node, error, status, now):  # only once its retries are spent
        return
    event = "step.timed_out" if status is StepStatus.TIMED_OUT else "step.failed"
    to(run, node, status, now, event, data={"error": error})


def _decision(run: Ending, node: Node, error: dict[str, Any], now: datetime) -> RetryDecision:
    """Whether the step's policy retries its failed attempt, and why."""
    assert node.attempt_id is not None
    policy = run.workflow.definition.effective_retry(node.step)
    # The jitter comes from the attempt id: a replay after a crash waits the same.
    rand = node.attempt_id.int / 2**128
    return decide(policy, error, node.attempt, rand=rand, now=now)


def _retry(
    run: Ending,
    node: Node,
    error: dict[str, Any],
    now: datetime,
    outcome: StepStatus,
    delay: float,
) -> None:
    """`outcome`: how the attempt ended (failed or timed_out). The retrying event says
    it, because that event is what ends the attempt in `step_attempts` (sql/0007)."""
    at = now + timedelta(seconds=delay)
    data = {
        "error": error,
        "outcome": outcome.value,
        "next_attempt": node.attempt + 1,
        "next_attempt_at": iso(at),
    }
    to(run, node, StepStatus.RETRYING, now, "step.retrying", data=data)
    run._timers.set(node, at)


def skip(run: Ending, node: Node, now: datetime) -> None:
    """A step that will not run (its dependencies were skipped), with all it holds."""
    to(run, node, StepStatus.SKIPPED, now, "step.skipped")
    for child in node.children:
        skip_scope(run, child, now)


def skip_scope(run: Ending, scope: Scope, now: datetime) -> None:
    """A list that will not run: the branch a condition did not choose."""
    scope.closed, scope.outcome = True, "skipped"
    for node in scope.nodes.values():
        if node.status is StepStatus.PENDING:
            skip(run, node, now)


def cancel_node(run: Ending, node: Node, now: datetime) -> None:
    """An open step is cancelled, with all it holds; its attempt out on a worker is
    aborted."""
    if node.status.finished:
        return
    cancel_children(run, node, now)
    run._timers.clear(node)
    with_worker = node.with_worker
    to(run, node, StepStatus.CANCELLED, now, "step.cancelled")
    if with_worker and node.attempt_id is not None:
        changes = run._journal.changes()
        changes.attempts_finished.append(
            AttemptFinished(node.attempt_id, StepStatus.CANCELLED, now, None)
        )
        abort(run, node)


def abort(run: Ending, node: Node) -> None:
    """Stop the node's attempt where it runs: a worker's job is aborted, a child run is
    cancelled (a request written with this commit; it cancels its own children)."""
    assert node.attempt_id is not None
    changes = run._journal.changes()
    if isinstance(node.step, WorkflowStep):
        changes.child_cancels.append(child_run_id(node.attempt_id))
    else:
        changes.aborts.append(node.attempt_id)


def cancel_children(run: Ending, node: Node, now: datetime) -> None:
    """Close the lists `node` holds: its branches, and the handler it runs (the others
    never started; a compensation is not the step's to end)."""
    for child in node.children:
        if not child.closed:
            cancel_scope(run, child, now)
    for handler in node.handlers:
        if handler.started and not handler.closed:
            cancel_scope(run, handler, now)


def cancel_scope(run: Ending, scope: Scope, now: datetime) -> None:
    """Close the list: its open steps are cancelled."""
    if scope.outcome is None and list_succeeded(scope):
        # It finished in the same move as what decided to cancel it; its follow-up
        # is still queued. It succeeded: say so.
        scope.outcome = "succeeded"
    scope.closed = True
    scope.outcome = scope.outcome or "cancelled"
    for node in scope.nodes.values():
        cancel_node(run, node, now)
