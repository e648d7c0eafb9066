"""Redrive: the checkpoint that runs a failed or cancelled run again, keeping what succeeded.

Pure, like the graph. The steps to run again are the failed, timed-out and cancelled ones
(or, with `from_step`, that step and everything inside it), plus everything that depends on
them in their list, every failed or cancelled step those depend on (a sibling cancelled by
the failure), and every control step that contains them, up to the top level. The
others keep their status and their stored outputs, which the steps run again read. A
condition (or a switch) run again chooses again, so all of it is reset; a fan-out runs all
its elements again (a finished fan-out keeps no per-element state). A step run again takes
its catch handlers and its compensation afresh. In a run that compensated, the steps whose
compensations ran (undone) run again too, with what depends on them.

The run keeps its id, its history and its sequence numbers; its generation goes up by one,
and new attempts get ids of that generation, so none collides with an earlier attempt.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowforge_orchestrator.core.definition.models import (
    ConditionStep,
    Step,
    SwitchStep,
    child_lists,
    handler_lists,
)
from flowforge_orchestrator.core.definition.plan import CompiledWorkflow, ListPlan
from flowforge_orchestrator.core.graph.checkpoint import for_redrive, read_checkpoint
from flowforge_orchestrator.core.state import StepStatus
from flowforge_orchestrator.errors import RedriveError

__all__ = ["RedriveError", "redrive_checkpoint"]

_RERUN = (StepStatus.FAILED, StepStatus.TIMED_OUT, StepStatus.CANCELLED)


def redrive_checkpoint(
    workflow: CompiledWorkflow, checkpoint: Mapping[str, Any], *, from_step: str | None = None
) -> dict[str, Any]:
    """A new checkpoint for the run; its status goes back to pending alongside it."""
    saved = read_checkpoint(checkpoint)
    decoded = saved.steps
    lists, owners = _structure(workflow)
    failed = {key for key, entry in decoded.items() if entry.status in _RERUN and key in lists}
    # The steps a compensation undid run again (with what depends on them).
    undone = set(saved.completed) & set(lists) if saved.compensation is not None else set()
    failed |= undone
    if from_step is not None:
        if from_step not in lists:
            raise RedriveError(f"the workflow has no step '{from_step}'")
        start = {from_step, *_inside(workflow.definition.step(from_step))}
    elif failed:
        start = failed
    else:
        raise RedriveError("no step failed or was cancelled: name one with --from")
    reset = _spread(workflow, start, failed, lists, owners)
    # The elements of a fan-out that runs again go: it expands them afresh.
    dropped = {
        key for key in decoded if "[" in key and _within(key.split("[", 1)[0], owners, reset)
    }
    rerun = {key: decoded[key].attempt for key in reset if key in decoded}
    return for_redrive(checkpoint, dropped=dropped, rerun=rerun)


def _structure(workflow: CompiledWorkflow) -> tuple[dict[str, ListPlan], dict[str, str | None]]:
    """Each step id's list, and the control step that contains it (None: the top level)."""
    lists: dict[str, ListPlan] = {}
    owners: dict[str, str | None] = {}
    todo: list[tuple[ListPlan, str | None]] = [(workflow.root, None)]
    while todo:
        plan, owner = todo.pop()
        for step in plan.steps:
            lists[step.id], owners[step.id] = plan, owner
            todo.extend((child, step.id) for child in workflow.children.get(step.id, ()))
            todo.extend((child, step.id) for child in workflow.handlers.get(step.id, ()))
            undo = workflow.compensations.get(step.id)
            if undo is not None:
                todo.append((undo, step.id))
    return lists, owners


def _inside(step: Step) -> set[str]:
    """Every step nested in `step`, at any depth."""
    found: set[str] = set()
    todo = [s for steps in child_lists(step) for s in steps]
    while todo:
        inner = todo.pop()
        found.add(inner.id)
        todo.extend(s for steps in child_lists(inner) for s in steps)
    return found


def _spread(
    workflow: CompiledWorkflow,
    start: set[str],
    failed: set[str],
    lists: dict[str, ListPlan],
    owners: dict[str, str | None],
) -> set[str]:
    reset: set[str] = set()
    todo = list(start)
    while todo:
        step_id = todo.pop()
        if step_id in reset:
            continue
        reset.add(step_id)
        todo.extend(lists[step_id].dependents[step_id])
        # An upstream that failed or was cancelled runs again too: a step run again
        # waits for every step it depends on to succeed, not for a cancelled sibling.
        step = workflow.definition.step(step_id)
        todo.extend(dep for dep in step.depends_on if dep in failed)
        owner = owners[step_id]
        if owner is not None:
            todo.append(owner)
        if isinstance(step, ConditionStep | SwitchStep):
            todo.extend(_inside(step))
        else:  # a parallel runs its failed and cancelled branches again, keeps the others
            todo.extend(s for s in _inside(step) if s in failed)
        # A step that runs again may fail and be caught, or be undone, afresh.
        todo.extend(s for steps in handler_lists(step) for s in _ids(steps))
    return reset


def _ids(steps: list[Step]) -> set[str]:
    """The ids of these steps and of every step nested in them."""
    found = {s.id for s in steps}
    for step in steps:
        found |= _inside(step)
    return found


def _within(step_id: str, owners: dict[str, str | None], reset: set[str]) -> bool:
    """Whether the step or a control step containing it runs again."""
    current: str | None = step_id
    while current is not None:
        if current in reset:
            return True
        current = owners.get(current)
    return False
