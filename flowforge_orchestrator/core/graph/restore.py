"""How a run's graph is rebuilt from its checkpoint and stored results.

Restoring walks the step lists top down, restores each saved node, expands a fan-out that
had started (its `for_each` evaluated again, its packed element states unpacked), then
derives, bottom up, which lists are started, closed, and how each parallel step's join
stands. The checkpoint is read through `checkpoint`, the one module that knows its format.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol
from uuid import UUID

from flowforge_orchestrator.core.definition.models import ConditionStep, ParallelStep, SwitchStep
from flowforge_orchestrator.core.expressions.templates import to_json_value
from flowforge_orchestrator.core.graph.catching import seen_error
from flowforge_orchestrator.core.graph.checkpoint import Checkpoint, Saved, unpack
from flowforge_orchestrator.core.graph.compensation import Compensation
from flowforge_orchestrator.core.graph.context import Reading, evaluate
from flowforge_orchestrator.core.graph.control import chosen_list
from flowforge_orchestrator.core.graph.joins import JoinState, needed
from flowforge_orchestrator.core.graph.journal import Journal
from flowforge_orchestrator.core.graph.moves import Numbering, current_attempt_id
from flowforge_orchestrator.core.graph.nodes import (
    FAILED,
    WITH_WORKER,
    Node,
    Scope,
    list_output,
    own_lists,
)
from flowforge_orchestrator.core.graph.timers import RUN_TIMER
from flowforge_orchestrator.core.graph.tree import Growing, expand
from flowforge_orchestrator.core.records import StepResult, json_size
from flowforge_orchestrator.core.state import RunStatus, StepStatus
from flowforge_orchestrator.errors import ExpressionError, StepError

__all__ = ["Restoring", "restore"]

Results = Mapping[UUID, StepResult]


class Restoring(Growing, Reading, Numbering, Protocol):
    """What restoring uses of the run: building its tree, evaluating a fan-out's
    `for_each` again, and the state a checkpoint restores."""

    status: RunStatus
    _journal: Journal
    # Nodes found unrestorable, with why: they fail when the run resumes.
    _broken: list[tuple[Node, dict[str, Any]]]
    _completed: list[str]
    _compensation: Compensation | None


def restore(run: Restoring, saved: Checkpoint, results: Results) -> None:
    """Bring the freshly built tree of `run` to the state `saved` describes."""
    run._journal.seq = saved.seq
    run._generation = saved.generation
    if saved.deadline is not None:
        run._timers.put(RUN_TIMER, saved.deadline)
    run._completed = list(saved.completed)
    run._compensation = saved.compensation
    scopes = [run._root]
    fan_outs: deque[Node] = deque()
    index = 0
    while index < len(scopes) or fan_outs:
        if index < len(scopes):
            scope = scopes[index]
            index += 1
            for node in scope.nodes.values():
                entry = saved.steps.get(node.key)
                if entry is not None:
                    _restore_node(run, node, entry, results)
                    if entry.items is not None:
                        fan_outs.append(node)
                scopes.extend(own_lists(node))
        else:
            node = fan_outs.popleft()
            _restore_fan_out(run, node, saved, results)
            scopes.extend(node.children)  # its elements (its own handlers came with it)
    for packing in run._packed.values():
        # Its elements are all restored now, those saved on their own too: pack them. Parts
        # stored in this size stay as they are; else (letters saved inline: a small
        # fan-out, or one saved before parts existed) the next commit writes them all.
        packing.reload(stored=saved.steps[packing.node.key].part_size == packing.size)
    run._root.started = run.status is RunStatus.RUNNING
    for scope in reversed(scopes):  # children before their owners
        _restore_scope_state(run, scope)


def _restore_node(run: Restoring, node: Node, entry: Saved, results: Results) -> None:
    node.status, node.attempt, node.error = entry.status, entry.attempt, entry.error
    node.fire_at, node.branch, node.wait_key = entry.fire_at, entry.branch, entry.wait_key
    node.handed_off = entry.handed_off
    node.generation = entry.generation
    node.caught = entry.caught
    if entry.attempt_id is not None:
        node.attempt_id = entry.attempt_id
    elif node.attempt and node.status is not StepStatus.PENDING:
        node.attempt_id = current_attempt_id(run, node)
    if node.status.finished:
        node.scope.open -= 1
    result = results.get(node.attempt_id) if node.attempt_id else None
    # A caught step's output is its handler's (see _restore_handler).
    if result is not None and node.status is StepStatus.SUCCEEDED and node.caught is None:
        node.output = result.output
        run._context_bytes += json_size(result.output)
    if not node.status.finished and node.fire_at is not None:
        run._timers.put(node.key, node.fire_at)
    if node.status in WITH_WORKER:
        run._out.append(node)


def _unpack(run: Restoring, node: Node, saved: Checkpoint, results: Results) -> None:
    """Element states saved packed in the fan-out's entry (those saved on their own, with
    an error or a retry timer, are restored with the rest)."""
    entry = saved.steps[node.key]
    # A count that changed (see _restore_fan_out) restores what both sides have.
    for index, scope in enumerate(node.children[: len(entry.elements or "")]):
        (element,) = scope.nodes.values()
        if element.key in saved.steps:
            continue
        state = unpack(entry, index, node.generation)
        if state is not None:
            _restore_node(run, element, state, results)


def _restore_fan_out(run: Restoring, node: Node, saved: Checkpoint, results: Results) -> None:
    """Re-evaluate `for_each` (its inputs are restored); the element count must agree."""
    count = saved.steps[node.key].items
    try:
        items = evaluate(run, node, "for_each")
    except ExpressionError as exc:
        items, problem = None, str(exc)
    else:
        problem = f"it now gives {len(items)} elements" if isinstance(items, list) else ""
    if isinstance(items, list) and len(items) == count:
        expand(run, node, [to_json_value(item) for item in items])
        _unpack(run, node, saved, results)
        return
    # The saved elements still exist (some may be with workers): restore them, to
    # cancel and abort them when the fan-out fails on resume.
    expand(run, node, [None] * (count or 0))
    _unpack(run, node, saved, results)
    if not node.status.finished:
        message = (
            f"step '{node.key}': for_each gave {count} elements when the step "
            f"started, but {problem or 'not a list'} on resume; it must read only the "
            "step's dependencies"
        )
        run._broken.append(
            (node, StepError(message, category="internal_error", retryable=False).to_dict())
        )


def _restore_scope_state(run: Restoring, scope: Scope) -> None:
    nodes = scope.nodes.values()
    if any(n.status is not StepStatus.PENDING for n in nodes):
        scope.started = True
    owner = scope.owner
    if owner is not None and scope.role != "list":
        _restore_handler(run, owner, scope)
        return
    if owner is None and run.status is RunStatus.PENDING:
        return  # a redriven run: its top level opens when it starts again
    if owner is not None and owner.status.finished:
        scope.closed = True
        return
    if owner is not None and owner.status is StepStatus.PENDING:
        return
    culprit = next(
        (n for n in nodes if n.status in FAILED and not n.step.continue_on_failure), None
    )
    if culprit is not None:
        scope.closed, scope.outcome, scope.failure = True, "failed", culprit.error
    elif scope.started and scope.done:
        scope.closed, scope.outcome = True, "succeeded"
    if owner is None:
        return
    if isinstance(owner.step, ConditionStep | SwitchStep):
        if owner.branch is not None and scope is not chosen_list(owner):
            scope.closed, scope.outcome = True, "skipped"
        return
    _restore_join(owner, scope)


def _restore_handler(run: Restoring, owner: Node, scope: Scope) -> None:
    """A catch handler's list (open only if it took the failure) or a compensation's (open
    until it ran); the frame gets `error` back, a caught step its handler's output."""
    if scope.role == "catch":
        if owner.caught is None or owner.handlers[owner.caught] is not scope:
            return  # not (or not yet) taken: as fresh
        scope.started = True
        scope.frame.error = seen_error(owner, owner.error or {})
    elif not scope.started:
        return  # its turn, if any, comes when the run compensates
    elif run._compensation is not None:
        scope.frame.error = run._compensation.error
    culprit = next(
        (n for n in scope.nodes.values() if n.status in FAILED and not n.step.continue_on_failure),
        None,
    )
    if culprit is not None:
        scope.closed, scope.outcome, scope.failure = True, "failed", culprit.error
    elif scope.done:
        scope.closed, scope.outcome = True, "succeeded"
        if scope.role == "catch" and owner.status is StepStatus.SUCCEEDED:
            owner.output = list_output(scope)
            run._context_bytes += json_size(owner.output)
    if owner.status.finished and scope.role == "catch":
        scope.closed = True


def _restore_join(owner: Node, scope: Scope) -> None:
    """Count a restored branch into its parallel step's join."""
    if owner.join is None:
        step = owner.step
        assert isinstance(step, ParallelStep)
        total = len(owner.children)
        owner.join = JoinState(total, needed(step.join, total), step.fail_fast)
    if scope.started:
        owner.launched = max(owner.launched, owner.children.index(scope) + 1)
    if scope.outcome == "succeeded":
        owner.join.succeeded += 1
    elif scope.outcome == "failed":
        owner.join.failed += 1
