"""`catch`: a step that failed for good (its retries spent) runs the first of its handlers
whose `errors` match, instead of failing its list.

The failure stays in the history (`step.failed` or `step.timed_out`, marked `caught`), then
`step.caught` names the handler; the step is running again while its handler list runs
(in a frame that adds `error`), and ends with the handler list's outcome (`flow`): done
with its output, or failed. A step catches once: a handler that fails fails the step.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flowforge_orchestrator.core.definition.models import Step
from flowforge_orchestrator.core.graph.followups import Check
from flowforge_orchestrator.core.graph.moves import Moving
from flowforge_orchestrator.core.graph.nodes import Node
from flowforge_orchestrator.core.retry import matching_entry
from flowforge_orchestrator.core.state import StepStatus, check_caught

__all__ = ["catch", "handler_for", "seen_error"]


def handler_for(step: Step, error: dict[str, Any]) -> int | None:
    """The index of the first handler of `step` that takes `error` (None: none does);
    `errors` match the error's category as `retry_on` does, absent matches every error."""
    category = str(error.get("category") or "")
    for index, handler in enumerate(step.catch or ()):
        if handler.errors is None or matching_entry(handler.errors, category) is not None:
            return index
    return None


def seen_error(node: Node, error: dict[str, Any]) -> dict[str, Any]:
    """`error` as a handler's expressions read it: the failure, its step and attempt."""
    return {**error, "step_id": node.key, "attempt": node.attempt}


def catch(
    run: Moving, node: Node, error: dict[str, Any], status: StepStatus, now: datetime
) -> bool:
    """Hand the final failure `error` (`status`: failed or timed_out) of `node` to its
    handler; False when it has none that matches, or has caught once already."""
    if node.caught is not None or not node.handlers:
        return False
    index = handler_for(node.step, error)
    if index is None:
        return False
    check_caught(node.key, node.status)
    event = "step.timed_out" if status is StepStatus.TIMED_OUT else "step.failed"
    base: dict[str, object] = {"step_id": node.key}
    if node.attempt:
        base["attempt"] = node.attempt
    run._journal.emit(
        now,
        event,
        status,
        from_status=node.status,
        step_id=node.key,
        attempt_id=node.attempt_id,
        data=base | {"error": error, "caught": True},
    )
    node.status, node.caught, node.weight = StepStatus.RUNNING, index, None
    run._journal.emit(
        now,
        "step.caught",
        StepStatus.RUNNING,
        from_status=status,
        step_id=node.key,
        attempt_id=node.attempt_id,
        data=base | {"handler": index, "error": error},
    )
    scope = node.handlers[index]
    scope.frame.error = seen_error(node, error)
    scope.started = True
    run._queue.append(Check(scope))  # `flow` starts its first steps
    return True
