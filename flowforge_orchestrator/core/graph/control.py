"""How steps and lists start, and the steps the orchestrator runs itself: delay, wait,
condition, transform and parallel (its branches or fan-out started within `max_parallel`, judged by
the join policy, `joins`, the losers cancelled). A worker step starts with its first
attempt (`attempts`).

Branches start one at a time through the follow-up queue, so a branch that finishes at once
is judged before another is dispatched. A fan-out's elements each get a list instance and a
frame (`item`, `index`); once it finishes they leave memory and the checkpoint.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flowforge_orchestrator.core.definition.models import (
    ConditionStep,
    DelayStep,
    FailStep,
    ParallelStep,
    SwitchStep,
    TaskStep,
    TransformStep,
    WaitStep,
    WorkflowStep,
)
from flowforge_orchestrator.core.expressions.templates import Expression, to_json_value
from flowforge_orchestrator.core.graph.attempts import Dispatching, dispatch_new_attempt
from flowforge_orchestrator.core.graph.children import start_child
from flowforge_orchestrator.core.graph.context import context, evaluate
from flowforge_orchestrator.core.graph.ending import (
    cancel_children,
    fail,
    skip_scope,
    succeed,
)
from flowforge_orchestrator.core.graph.failures import expression_error
from flowforge_orchestrator.core.graph.followups import Check, Launch
from flowforge_orchestrator.core.graph.joins import JoinState, JoinVerdict, needed
from flowforge_orchestrator.core.graph.moves import begin_attempt, to
from flowforge_orchestrator.core.graph.nodes import Node, Scope, kind_of, list_output
from flowforge_orchestrator.core.graph.timers import iso
from flowforge_orchestrator.core.graph.tree import expand
from flowforge_orchestrator.core.records import WaitStarted
from flowforge_orchestrator.core.state import StepStatus
from flowforge_orchestrator.errors import ExpressionError, StepError

__all__ = ["branch_finished", "chosen_list", "launch", "start_node", "start_scope"]

# Control steps need nothing of the run beyond what dispatching does: `Dispatching`.


def start_scope(run: Dispatching, scope: Scope, now: datetime) -> None:
    """Open a list: its steps without dependencies start."""
    scope.started = True
    for node in scope.nodes.values():
        if not node.step.depends_on and node.status is StepStatus.PENDING:
            start_node(run, node, now)
    # Steps restored as finished (a redrive) count as done; the check starts what
    # they unblock and closes a list with nothing left to run, an empty one too.
    run._queue.append(Check(scope))


def start_node(run: Dispatching, node: Node, now: datetime) -> None:
    step = node.step
    if isinstance(step, TaskStep):
        dispatch_new_attempt(run, node, now)
        return
    if isinstance(step, WorkflowStep):
        start_child(run, node, now)
        return
    begin_attempt(run, node)
    try:
        if isinstance(step, TransformStep):
            output = run.workflow.outputs[step.id].render(
                context(run, node), evaluator=run._evaluator
            )
            succeed(run, node, output, now, computed=True)
        elif isinstance(step, DelayStep):
            _start_delay(run, node, step, now)
        elif isinstance(step, WaitStep):
            _start_wait(run, node, step, now)
        elif isinstance(step, ConditionStep):
            _start_condition(run, node, now)
        elif isinstance(step, SwitchStep):
            _start_switch(run, node, step, now)
        elif isinstance(step, FailStep):
            fail(run, node, _raised(run, node), now)
        else:
            assert isinstance(step, ParallelStep)
            _start_parallel(run, node, step, now)
    except ExpressionError as exc:
        fail(run, node, expression_error(exc), now)


def _start_delay(run: Dispatching, node: Node, step: DelayStep, now: datetime) -> None:
    if step.duration is not None:
        fire_at = now + timedelta(seconds=step.duration)
    else:
        value = evaluate(run, node, "until")
        fire_at = _timestamp(value, run.workflow.expression(step.id, "until"))
    to(run, node, StepStatus.RUNNING, now, "step.started", data={"until": iso(fire_at)})
    if fire_at <= now:
        succeed(run, node, {"waited_until": iso(now)}, now)
    else:
        run._timers.set(node, fire_at)


MAX_WAIT_KEY = 1000  # characters, as the events table allows (sql/0013)


def _start_wait(run: Dispatching, node: Node, step: WaitStep, now: datetime) -> None:
    """Listen for the event: the key is computed now, once (an adopting replica reads it
    from the checkpoint); the deadline is the wait's own `timeout`, if any."""
    key = None
    if step.key is not None:
        expression = run.workflow.expression(step.id, "key")
        value = evaluate(run, node, "key")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise expression.error(f"`key` must give a string or an integer, got {kind_of(value)}")
        key = str(value)
        if len(key) > MAX_WAIT_KEY:
            raise expression.error(f"`key` gave {len(key)} characters; at most {MAX_WAIT_KEY}")
    node.wait_key = key
    deadline = now + timedelta(seconds=step.timeout) if step.timeout is not None else None
    data = {"event": step.event, "key": key, "deadline": iso(deadline) if deadline else None}
    to(run, node, StepStatus.RUNNING, now, "step.waiting", data=data)
    if deadline is not None:
        run._timers.set(node, deadline)
    assert node.attempt_id is not None
    run._journal.changes().waits.append(WaitStarted(node.key, node.attempt_id, step.event, key))


def _timestamp(value: object, expression: Expression) -> datetime:
    """`until` gives a CEL timestamp or an RFC 3339 string; naive means UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise expression.error(f"`until` gave {value!r}, not an RFC 3339 timestamp") from None
    if not isinstance(value, datetime):
        raise expression.error(f"`until` must give a timestamp, got {kind_of(value)}")
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _start_condition(run: Dispatching, node: Node, now: datetime) -> None:
    expression = run.workflow.expression(node.step.id, "if")
    value = evaluate(run, node, "if")
    if not isinstance(value, bool):
        raise expression.error(f"`if` must give true or false, got {kind_of(value)}")
    node.branch = "then" if value else "else"
    chosen, other = node.children if value else reversed(node.children)
    to(run, node, StepStatus.RUNNING, now, "step.started", data={"branch": node.branch})
    skip_scope(run, other, now)
    start_scope(run, chosen, now)


def _start_switch(run: Dispatching, node: Node, step: SwitchStep, now: datetime) -> None:
    """The first case whose `when` is true runs (else `default`); every other list is
    skipped, at every depth."""
    node.branch = "default"
    for index in range(len(step.cases)):
        name = f"cases.{index}.when"
        value = evaluate(run, node, name)
        if not isinstance(value, bool):
            expression = run.workflow.expression(step.id, name)
            raise expression.error(f"`when` must give true or false, got {kind_of(value)}")
        if value:
            node.branch = str(index)
            break
    chosen = chosen_list(node)
    to(run, node, StepStatus.RUNNING, now, "step.started", data={"case": _case(node.branch)})
    for scope in node.children:
        if scope is not chosen:
            skip_scope(run, scope, now)
    start_scope(run, chosen, now)


def chosen_list(node: Node) -> Scope:
    """The list a condition or a switch chose (its `branch`, which must be set)."""
    if node.branch in ("then", "else"):
        return node.children[node.branch == "else"]
    return node.children[-1 if node.branch == "default" else int(node.branch or 0)]


def _case(branch: str | None) -> int | str:
    return int(branch) if branch is not None and branch.isdigit() else "default"


def switch_output(node: Node, scope: Scope) -> dict[str, object]:
    return {"case": _case(node.branch), "output": list_output(scope)}


def _raised(run: Dispatching, node: Node) -> dict[str, object]:
    """The error a fail step ends with, rendered from its templates (never retried)."""
    step = node.step
    assert isinstance(step, FailStep)
    rendered = run.workflow.errors[step.id].render(context(run, node), evaluator=run._evaluator)
    assert isinstance(rendered, dict)
    for name in ("message", "category"):
        value = rendered.get(name)
        if not isinstance(value, str) or not value:
            raise ExpressionError(
                f"must give a non-empty string, got {kind_of(value)}",
                expression=str(getattr(step.error, name)),
                step_id=step.id,
                field=f"error.{name}",
            )
    details = rendered.get("details")
    return StepError(
        rendered["message"],
        category=rendered["category"],
        retryable=False,
        details=details if isinstance(details, dict) or details is None else {"value": details},
    ).to_dict()


# -- parallel steps ------------------------------------------------------------------------


def _start_parallel(run: Dispatching, node: Node, step: ParallelStep, now: datetime) -> None:
    if step.for_each is not None:
        items = evaluate(run, node, "for_each")
        if not isinstance(items, list):
            expression = run.workflow.expression(step.id, "for_each")
            raise expression.error(f"`for_each` must give a list, got {kind_of(items)}")
        expand(run, node, [to_json_value(item) for item in items])
    total = len(node.children)
    node.join = JoinState(total, needed(step.join, total), step.fail_fast)
    to(run, node, StepStatus.RUNNING, now, "step.started", data={"branches": total})
    if node.join.need > total:
        message = (
            f"step '{node.key}': the join needs {node.join.need} successful branches "
            f"but there are only {total}"
        )
        fail(run, node, StepError(message, category="join_failed", retryable=False).to_dict(), now)
        return
    _judge(run, node, now)


def branch_finished(run: Dispatching, node: Node, scope: Scope, now: datetime) -> None:
    """A branch of the parallel step `node` closed (`scope.outcome`): count it in."""
    if node.status is not StepStatus.RUNNING or node.join is None:
        return
    if scope.outcome == "succeeded":
        node.join.succeeded += 1
    else:
        node.join.failed += 1
    _judge(run, node, now)


def _judge(run: Dispatching, node: Node, now: datetime) -> None:
    """Apply the join policy; start more branches while it waits."""
    assert node.join is not None
    verdict = node.join.verdict()
    if verdict is JoinVerdict.WAIT:
        launch(run, node, now)
        return
    cancel_children(run, node, now)
    output = [_branch_entry(scope) for scope in node.children]
    if verdict is JoinVerdict.SUCCEED:
        succeed(run, node, output, now)
        return
    failed = [s for s in node.children if s.outcome == "failed"]
    message = (
        f"step '{node.key}': {len(failed)} of {node.join.total} branches failed; "
        f"the join needs {node.join.need} to succeed"
    )
    details: dict[str, object] = {"branches": output}
    if failed:
        details["first_error"] = failed[0].failure
    error = StepError(message, category="join_failed", retryable=False, details=details)
    fail(run, node, error.to_dict(), now)


def launch(run: Dispatching, node: Node, now: datetime) -> None:
    """Start the next branch if the limit allows; the rest follow through the queue, so
    a branch that finishes at once is judged before another is dispatched."""
    if node.status is not StepStatus.RUNNING or node.join is None:
        return
    assert isinstance(node.step, ParallelStep)
    limit = node.step.max_parallel or len(node.children)
    if node.launched < len(node.children) and node.launched - node.join.finished < limit:
        scope = node.children[node.launched]
        node.launched += 1
        start_scope(run, scope, now)
        run._queue.append(Launch(node))


def _branch_entry(scope: Scope) -> dict[str, object]:
    entry: dict[str, object] = {"status": scope.outcome or "cancelled", "output": None}
    if scope.outcome == "succeeded":
        entry["output"] = list_output(scope)
    elif scope.outcome == "failed":
        entry["error"] = scope.failure
    return entry
