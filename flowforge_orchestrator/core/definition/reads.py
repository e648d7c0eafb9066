"""What a step's expressions may read: only steps certain to have finished when it starts.

A step reading `steps.X` where X is not among its upstream steps (its `depends_on`, theirs,
what its enclosing steps waited for, and every step nested in those) may start before X
ends and fail at run time with "no such key": refused at `definitions apply`, naming the
missing `depends_on`.

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
    handler_lists,
)
from flowforge_orchestrator.errors import DefinitionProblem

__all__ = ["for_each_problems", "upstream_problems"]


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


def upstream_problems(
    definition: WorkflowDefinition, source: str | None = None
) -> list[DefinitionProblem]:
    """Every expression (but `for_each`'s, checked above) that reads a step that may not
    have finished when its own step starts."""
    problems: list[DefinitionProblem] = []
    compiled = definition.compiled
    reads: dict[str, list[tuple[str, frozenset[str]]]] = {}
    for (step_id, name), expression in compiled.expressions.items():
        if name != "for_each" and expression.step_refs:
            reads.setdefault(step_id, []).append((name, expression.step_refs))
    for (step_id, name), template in compiled.templates.items():
        refs = frozenset().union(
            *(e.step_refs or () for string in template.strings for e in string.expressions)
        )
        if refs:
            reads.setdefault(step_id, []).append((name, refs))
    if not reads:
        return problems
    known = {step.id for step in definition.all_steps()}
    # Each list with its enclosing steps, and the steps certain to have ended when the list
    # runs because it is a catch handler or a compensation of theirs (the step it handles
    # failed, or the step it undoes succeeded, before any of its steps starts).
    todo: list[tuple[list[Step], tuple[tuple[dict[str, Step], Step], ...], frozenset[str]]] = [
        (definition.steps, (), frozenset())
    ]
    while todo:
        steps, enclosing, ended = todo.pop()
        by_id = {step.id: step for step in steps}
        for step in steps:
            chain = (*enclosing, (by_id, step))
            if step.id in reads:
                done = ended.union(*(_upstream(s, ids) for ids, s in chain))
                finished = done | _nested(done, definition) | _nested({step.id}, definition)
                for name, refs in reads[step.id]:
                    for ref in sorted((refs & known) - finished - {step.id}):
                        problems.append(
                            DefinitionProblem(
                                f"reads steps.{ref}, which is not among its upstream steps "
                                f"and may not have finished: add '{ref}' to depends_on "
                                f"(of this step, or of the step it is nested in)",
                                source,
                                step.id,
                                name,
                            )
                        )
            todo.extend((inner, chain, ended) for inner in _own_lists(step))
            handled = ended | {step.id} | _nested({step.id}, definition)
            todo.extend((inner, chain, frozenset(handled)) for inner in handler_lists(step))
    return problems


def _own_lists(step: Step) -> list[list[Step]]:
    handlers = handler_lists(step)
    return [inner for inner in child_lists(step) if not any(inner is h for h in handlers)]


def _nested(step_ids: frozenset[str] | set[str], definition: WorkflowDefinition) -> set[str]:
    """Every step nested, at any depth, inside the steps `step_ids`."""
    found: set[str] = set()
    todo = [definition.step(step_id) for step_id in step_ids]
    while todo:
        for inner in (s for lst in child_lists(todo.pop()) for s in lst):
            found.add(inner.id)
            todo.append(inner)
    return found
