"""One step's move: its status changes (checked against the state machine), the event is
journalled, and a final status queues the follow-up that decides what comes next; a new
attempt gets its number and its derived id."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Protocol
from uuid import UUID

from flowforge_orchestrator.core.graph.followups import Finished, FollowUps
from flowforge_orchestrator.core.graph.journal import Journal
from flowforge_orchestrator.core.graph.nodes import Node, attempt_id
from flowforge_orchestrator.core.graph.packing import touch
from flowforge_orchestrator.core.graph.tree import Growing, forget_elements
from flowforge_orchestrator.core.state import StepStatus, check_step

__all__ = ["Moving", "Numbering", "begin_attempt", "current_attempt_id", "to"]


class Numbering(Protocol):
    """What identifying attempts uses of the run."""

    run_id: UUID
    _incarnation: str | None  # see nodes.attempt_id
    _generation: int  # redrives so far: new attempts get fresh ids


class Moving(Growing, Numbering, Protocol):
    """What moving a step uses of the run."""

    _journal: Journal
    _queue: FollowUps


def to(
    run: Moving,
    node: Node,
    target: StepStatus,
    at: datetime,
    event: str,
    *,
    data: Mapping[str, object] | None = None,
) -> None:
    """Move `node` to `target`, journalling `event` (its data: the step id, the attempt
    and `data`)."""
    check_step(node.key, node.status, target)
    previous = node.status
    node.status = target
    node.weight = None  # what expressions read of it changed
    touch(run._packed, node)
    if target is StepStatus.DISPATCHED:  # an attempt goes out (running: the same attempt)
        run._out.append(node)
    payload: dict[str, object] = {"step_id": node.key}
    if node.attempt:
        payload["attempt"] = node.attempt
    if data:
        payload.update(data)
    run._journal.emit(
        at,
        event,
        target,
        from_status=previous,
        step_id=node.key,
        attempt_id=node.attempt_id,
        data=payload,
    )
    if target.finished:
        node.scope.open -= 1
        if not node.scope.closed:
            run._queue.append(Finished(node))
        if node.items is not None:
            forget_elements(run, node)


def begin_attempt(run: Numbering, node: Node) -> None:
    """The node's next attempt, numbered and identified for the run's generation."""
    node.attempt += 1
    node.handed_off = False
    node.generation = run._generation
    node.attempt_id = current_attempt_id(run, node)


def current_attempt_id(run: Numbering, node: Node) -> UUID:
    return attempt_id(run.run_id, node.key, node.attempt, node.generation, run._incarnation)
