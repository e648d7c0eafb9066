"""The run's tree as it grows and shrinks: a step list instantiated (its nodes, and the
lists of its condition and parallel steps), a fan-out expanded into one list per element,
and a finished fan-out's elements forgotten."""

from __future__ import annotations

from collections import deque
from typing import Protocol

from flowforge_orchestrator.core.definition.models import (
    ConditionStep,
    ParallelStep,
    SwitchStep,
    TaskStep,
    WorkflowStep,
)
from flowforge_orchestrator.core.definition.plan import CompiledWorkflow, ListPlan
from flowforge_orchestrator.core.graph.nodes import Frame, Node, Scope, own_lists
from flowforge_orchestrator.core.graph.packing import Packing
from flowforge_orchestrator.core.graph.timers import Timers
from flowforge_orchestrator.core.records import json_size
from flowforge_orchestrator.core.state import StepStatus

__all__ = ["Growing", "expand", "forget_elements", "new_scope"]


class Growing(Protocol):
    """What growing and pruning the tree uses of the run."""

    workflow: CompiledWorkflow
    _nodes: dict[str, Node]  # every node, by key
    # The nodes the checkpoint saves one by one: all but the packed fan-out elements
    # (so a checkpoint does not even visit those).
    _saved_alone: dict[str, Node]
    # Running fan-outs of one worker step: their elements are saved packed (checkpoint).
    _packed: dict[str, Packing]
    # Fan-outs that ended since the last commit whose parts were stored: they go.
    _parts_dropped: list[str]
    _timers: Timers
    _context_bytes: int  # what the outputs in memory weigh, for the run's byte limit
    # The nodes whose attempt went out (dispatched or running), oldest first; some may be
    # back since, or listed twice (`RunState.has_outstanding` drops those): asked before
    # every commit, it must not walk every node of a big fan-out. A deque, not a dict: a
    # dict emptied from the front makes `next(iter())` skip every deleted slot.
    _out: deque[Node]


def new_scope(
    run: Growing, plan: ListPlan, frame: Frame, owner: Node | None, role: str = "list"
) -> Scope:
    """An instance of a step list, with its nodes (and theirs, but a fan-out's elements:
    those come with `expand`). A catch handler and a compensation get a frame of their own,
    for `error`."""
    scope = Scope(plan, frame, owner, role)
    for step in plan.steps:
        node = Node(step.id + frame.suffix, step, scope)
        scope.nodes[step.id] = node
        frame.names[step.id] = node
        run._nodes[node.key] = node
        run._saved_alone[node.key] = node
        scope.open += 1
        if isinstance(step, ConditionStep | SwitchStep) or (
            isinstance(step, ParallelStep) and step.for_each is None
        ):
            node.children = [
                new_scope(run, child, frame, node) for child in run.workflow.children[step.id]
            ]
        node.handlers = [
            new_scope(run, handler, Frame(frame, frame.suffix), node, "catch")
            for handler in run.workflow.handlers.get(step.id, ())
        ]
        undo = run.workflow.compensations.get(step.id)
        if undo is not None:
            node.undo = new_scope(run, undo, Frame(frame, frame.suffix), node, "undo")
    return scope


def expand(run: Growing, node: Node, items: list[object]) -> None:
    """One list instance per element, each with its own frame (`item`, `index`)."""
    node.items = items
    (template,) = run.workflow.children[node.step.id]
    outer = node.scope.frame
    frames = [
        Frame(outer, f"{outer.suffix}[{index}]", item=item, index=index)
        for index, item in enumerate(items)
    ]
    node.children = [new_scope(run, template, frame, node) for frame in frames]
    if len(template.steps) == 1 and _packable(template.steps[0]):
        node.elements = [next(iter(scope.nodes.values())) for scope in node.children]
        for element in node.elements:
            element.packed = True
            del run._saved_alone[element.key]
        run._packed[node.key] = Packing(node)


def _packable(step: object) -> bool:
    """A fan-out of one worker step, or of one workflow step without a timeout (whose
    deadline a packed element could not keep), saves its elements packed."""
    return isinstance(step, TaskStep) or (isinstance(step, WorkflowStep) and step.timeout is None)


def forget_elements(run: Growing, node: Node) -> None:
    """A finished fan-out keeps only its own output: its elements leave memory and the
    checkpoint (their history stays in the transitions)."""
    stack = list(node.children)  # its elements; its own handlers and compensation stay
    while stack:
        scope = stack.pop()
        for inner in scope.nodes.values():
            run._nodes.pop(inner.key, None)
            run._saved_alone.pop(inner.key, None)
            run._timers.drop(inner.key)
            if inner.status is StepStatus.SUCCEEDED:
                run._context_bytes -= json_size(inner.output)
            stack.extend(own_lists(inner))
    node.children, node.items, node.elements = [], None, []
    packing = run._packed.pop(node.key, None)
    if packing is not None and packing.parted:
        run._parts_dropped.append(node.key)
