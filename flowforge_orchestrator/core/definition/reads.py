"""What a `for_each` may read: only steps certain to have finished when it starts.

A fan-out's elements are not stored: a replica that adopts the run evaluates `for_each`
again and must get the same list. It does if the expression reads only the step's own
dependencies (and theirs), the steps the enclosing steps waited for, `input` and `run`;
a step that may finish meanwhile could change the list under running elements.
"""

from __future__ import annotations

from flowforge_orchestrator.core.definition.models import (
    ParallelStep,
    Step,
    WorkflowDefinition,
    child_lists,
)
from flowforge_orchestrator.errors import DefinitionProblem

__all__ = ["for_each_problems"]


def for_each_problems(
    definition: WorkflowDefinition, source: str | None = None
) -> list[DefinitionProblem]:
    problems: list[DefinitionProblem] = []
    # Each list with its enclosing steps (and their lists): what finished before a step
    # starts is worked out only for for_each steps, so a long chain costs no quadratic walk.
    todo: list[tuple[list[Step], tuple[tuple[dict[str, Step], Step], ...]]] = [
        (definition.steps, ())
    ]
    while todo:
        steps, enclosing = todo.pop()
        by_id = {step.id: step for step in steps}
        for step in steps:
            chain = (*enclosing, (by_id, step))
            if isinstance(step, ParallelStep) and step.for_each is not None:
                finished = frozenset().union(*(_upstream(s, ids) for ids, s in chain))
                problems += _check(definition, step, finished, source)
            todo.extend((inner, chain) for inner in child_lists(step))
    return problems


def _upstream(step: Step, by_id: dict[str, Step]) -> frozenset[str]:
    """The steps of its list that finish before `step` starts: dependencies, transitively."""
    seen: set[str] = set()
    todo = list(step.depends_on)
    while todo:
        dep = todo.pop()
        if dep not in seen and dep in by_id:
            seen.add(dep)
            todo.extend(by_id[dep].depends_on)
    return frozenset(seen)


def _check(
    definition: WorkflowDefinition, step: ParallelStep, finished: frozenset[str], source: str | None
) -> list[DefinitionProblem]:
    refs = definition.compiled.expression(step.id, "for_each").step_refs
    if refs is None:
        message = "for_each must name the steps it reads (steps.<id>), not index `steps`"
        return [DefinitionProblem(message, source, step.id, "for_each")]
    return [
        DefinitionProblem(
            f"reads steps.{ref}, which may still be running when the fan-out starts: "
            f"add '{ref}' to depends_on (the list must be the same if it is evaluated again)",
            source,
            step.id,
            "for_each",
        )
        for ref in sorted(refs - finished)
    ]
