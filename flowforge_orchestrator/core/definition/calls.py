"""Which workflows a definition calls (`type: workflow` steps), and the calls of itself that
nothing on their path can stop. Pure: reads a validated definition."""

from __future__ import annotations

from flowforge_orchestrator.core.definition.models import (
    ConditionStep,
    ParallelStep,
    Step,
    SwitchStep,
    WorkflowDefinition,
    WorkflowStep,
    handler_lists,
)

__all__ = ["unguarded_self_calls"]


def unguarded_self_calls(definition: WorkflowDefinition) -> list[str]:
    """The ids of the workflow steps that call their own workflow with nothing on the path
    to them that may not run: not inside a condition's or a switch's branch, a `for_each`
    (an empty list runs nothing), a catch handler or a compensation. Every run of such a
    workflow starts another, until the depth limit (FLOWFORGE_MAX_CHILD_DEPTH) fails
    them all."""
    found: list[str] = []
    todo: list[tuple[Step, bool]] = [(step, False) for step in definition.steps]
    while todo:
        step, guarded = todo.pop()
        if isinstance(step, WorkflowStep) and step.workflow == definition.name and not guarded:
            found.append(step.id)
        todo += [(inner, True) for steps in handler_lists(step) for inner in steps]
        inside = guarded or isinstance(step, ConditionStep | SwitchStep)
        if isinstance(step, ParallelStep):
            inside = inside or step.for_each is not None
            todo += [(inner, inside) for branch in step.branches or () for inner in branch]
            todo += [(step.step, inside)] if step.step is not None else []
        elif isinstance(step, ConditionStep):
            todo += [(inner, True) for inner in step.then + step.else_]
        elif isinstance(step, SwitchStep):
            todo += [(inner, True) for case in step.cases for inner in case.steps]
            todo += [(inner, True) for inner in step.default]
    return sorted(found)
