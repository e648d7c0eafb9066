"""How a run ends: at once, or after compensating (sagas).

When a run fails or is cancelled (as the definition's `compensate_on` allows), the steps
that succeeded and declare `compensate` are undone first: their compensation lists run one
at a time, in reverse order of completion (`_completed`, which the checkpoint keeps), each
reading `error` (the run's) and the outputs of every finished step. The run stays running
meanwhile (`workflow.compensating`); each step records `step.compensating`, then
`step.compensated` or `step.compensation_failed`; one that fails (after its own retries)
does not stop the others. Then the run ends failed or cancelled, its error (or the
cancellation's event) carrying the outcome per step.

Progress is in the checkpoint: the compensations' own steps are nodes like any other, so an
adopting replica goes on where the last commit left off and never starts one twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from flowforge_orchestrator.core.graph.attempts import Dispatching
from flowforge_orchestrator.core.graph.control import start_scope
from flowforge_orchestrator.core.graph.nodes import Node, Scope
from flowforge_orchestrator.core.graph.timers import RUN_TIMER
from flowforge_orchestrator.core.state import RunStatus, StepStatus, check_run

__all__ = [
    "Compensating",
    "Compensation",
    "begin_compensation",
    "compensation_ended",
    "compensation_scopes",
    "finish",
    "go_on",
]


@dataclass
class Compensation:
    """A run compensating: how it will end, and the `error` its compensations read."""

    ending: RunStatus  # failed | cancelled
    error: dict[str, Any]
    reason: str | None = None  # a cancellation's


class Compensating(Dispatching, Protocol):
    """What ending a run uses of it: all that starting steps does, and its own status."""

    status: RunStatus
    output: object
    error: dict[str, Any] | None
    _compensation: Compensation | None


def begin_compensation(
    run: Compensating,
    ending: RunStatus,
    error: dict[str, Any],
    now: datetime,
    reason: str | None = None,
) -> bool:
    """Enter the compensating phase if the run has anything to undo and its definition
    compensates this ending; False: end the run now."""
    if ending.value not in run.workflow.definition.compensate_on:
        return False
    todo = _to_undo(run)
    if not todo:
        return False
    run._compensation = Compensation(ending, error, reason)
    # Decision: the run's timeout does not cut compensations short (each step has its own).
    run._timers.drop(RUN_TIMER)
    run._journal.emit(
        now,
        "workflow.compensating",
        RunStatus.RUNNING,
        from_status=RunStatus.RUNNING,
        data={"ending": ending.value, "error": error, "steps": [n.key for n in todo]},
    )
    go_on(run, now)
    return True


def _to_undo(run: Compensating) -> list[Node]:
    """The steps to compensate, latest completion first."""
    nodes = (run._nodes.get(key) for key in reversed(run._completed))
    return [n for n in nodes if n is not None and n.status is StepStatus.SUCCEEDED and n.undo]


def compensation_scopes(run: Compensating) -> list[Scope]:
    """The compensation lists of this phase, in the order they run."""
    return [n.undo for n in _to_undo(run) if n.undo is not None]


def go_on(run: Compensating, now: datetime) -> None:
    """Start the next compensation, unless one is running; none left: the run ends."""
    comp = run._compensation
    assert comp is not None
    for node in _to_undo(run):
        scope = node.undo
        assert scope is not None
        if scope.closed:
            continue
        if not scope.started:
            _emit(run, node, "step.compensating", now)
            scope.frame.error = comp.error
            start_scope(run, scope, now)
        return
    _end(run, now)


def compensation_ended(run: Compensating, node: Node, scope: Scope, now: datetime) -> None:
    """The compensation of `node` closed (`scope.outcome`): record it, go on."""
    if scope.outcome == "succeeded":
        _emit(run, node, "step.compensated", now)
    else:
        _emit(run, node, "step.compensation_failed", now, {"error": scope.failure})
    go_on(run, now)


def _emit(
    run: Compensating, node: Node, event: str, now: datetime, data: dict[str, object] | None = None
) -> None:
    run._journal.emit(
        now,
        event,
        node.status,
        from_status=node.status,
        step_id=node.key,
        data={"step_id": node.key} | (data or {}),
    )


def _end(run: Compensating, now: datetime) -> None:
    comp = run._compensation
    assert comp is not None
    outcomes = {
        n.key: "compensated" if n.undo.outcome == "succeeded" else "compensation_failed"
        for n in _to_undo(run)
        if n.undo is not None
    }
    failed = [key for key, outcome in outcomes.items() if outcome != "compensated"]
    summary: dict[str, object] = {"steps": outcomes}
    if comp.ending is RunStatus.CANCELLED:
        data: dict[str, object] = {"reason": comp.reason, "compensation": summary}
        if failed:
            data["compensation_failed"] = failed
        finish(run, RunStatus.CANCELLED, now, "workflow.cancelled", data)
        return
    error = {**comp.error, "compensation": summary}
    if failed:
        error["compensation_failed"] = failed
        error["message"] = (
            f"{comp.error.get('message', 'the run failed')}; "
            f"compensation failed for: {', '.join(failed)}"
        )
    run.error = error
    finish(run, RunStatus.FAILED, now, "workflow.failed", {"error": error})


def finish(
    run: Compensating, status: RunStatus, now: datetime, event: str, data: dict[str, object]
) -> None:
    """The run ends in `status`: no timer and no follow-up is left."""
    previous = run.status
    check_run(previous, status)
    run.status = status
    run._timers.reset()
    run._queue.clear()
    run._journal.emit(now, event, status, from_status=previous, data=data)
    run._journal.changes().finished_at = now
