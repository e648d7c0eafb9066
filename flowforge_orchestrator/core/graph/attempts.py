"""Attempts of worker steps: dispatch, deadlines, schedule-to-start, timeouts.

An attempt is dispatched with its parameters rendered (secrets left to the worker), gets a
deadline timer, and ends with a result, a timeout or a cancellation. A failed or timed-out
attempt is retried when its policy says so (`ending.fail`), after a backoff timer, and the
timer dispatches the next attempt here.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Protocol
from uuid import UUID

from flowforge_orchestrator.core.definition.models import TaskStep
from flowforge_orchestrator.core.definition.plan import SECRET_ROOTS
from flowforge_orchestrator.core.graph.context import Reading, context
from flowforge_orchestrator.core.graph.ending import Ending, fail
from flowforge_orchestrator.core.graph.failures import expression_error, invalid_output, measure
from flowforge_orchestrator.core.graph.moves import begin_attempt, to
from flowforge_orchestrator.core.graph.nodes import Node, attempt_id
from flowforge_orchestrator.core.records import Dispatch
from flowforge_orchestrator.core.state import StepStatus
from flowforge_orchestrator.errors import ExpressionError, PayloadTooLarge, StepError

__all__ = [
    "Dispatching",
    "dispatch_new_attempt",
    "dispatch_of",
    "hand_off",
    "heartbeat_missed",
    "not_picked_up",
    "set_deadline",
    "timer_fired",
]


class Dispatching(Ending, Reading, Protocol):
    """What dispatching attempts uses of the run: ending steps, and evaluating their
    parameters; and, for a workflow step's child run, how deep the run is (0: it is not
    a child run)."""

    depth: int


def dispatch_new_attempt(run: Dispatching, node: Node, now: datetime) -> None:
    begin_attempt(run, node)
    node.error = None
    dispatch = dispatch_of(run, node, now)
    if dispatch is None:  # the parameters could not be rendered: already failed
        return
    set_deadline(run, node, dispatch, now)
    to(
        run,
        node,
        StepStatus.DISPATCHED,
        now,
        "step.dispatched",
        data={"type": node.step.type, "attempt": node.attempt},
    )
    run._journal.changes().dispatches.append(dispatch)


def set_deadline(run: Dispatching, node: Node, dispatch: Dispatch, now: datetime) -> None:
    """The worker ends an attempt at its timeout, counted from when it starts; this
    deadline is for the worker that died or never came: queue wait plus timeout. With
    `schedule_to_start`, the orchestrator first asks, at that time, whether a worker
    took the attempt (`probes`), and times it out at once if none did."""
    waiting = node.step.schedule_to_start
    node.probing = waiting is not None
    first = waiting if waiting is not None else 2 * dispatch.timeout
    run._timers.set(node, now + timedelta(seconds=first))


def dispatch_of(run: Dispatching, node: Node, now: datetime) -> Dispatch | None:
    """The job of the node's current attempt, its parameters rendered; None when they
    cannot be (the step has failed then)."""
    step = node.step
    assert node.attempt_id is not None
    try:
        reads = context(run, node)
        params = run.workflow.params[step.id].render(
            reads, skip_roots=SECRET_ROOTS, evaluator=run._evaluator
        )
        url = run.workflow.urls.get(step.id)
        if url is not None:  # every value encoded for the part of the URL it lands in
            params["url"] = url.render(reads, evaluator=run._evaluator)
    except ExpressionError as exc:
        fail(run, node, expression_error(exc), now)
        return None
    size, problem = measure(params)
    if problem is not None:
        fail(run, node, invalid_output(node.key, "the rendered parameters", problem), now)
        return None
    if size > run.limits.max_context_bytes:
        what = "the rendered parameters"
        error = PayloadTooLarge(
            step_id=node.key, what=what, size=size, limit=run.limits.max_context_bytes
        )
        fail(run, node, error.to_dict(), now)
        return None
    timeout = run.workflow.definition.effective_timeout(step, run.limits.default_timeout)
    return Dispatch(
        attempt_id=node.attempt_id,
        run_id=run.run_id,
        step_id=node.key,
        step_type=step.type,
        attempt=node.attempt,
        params=params,
        timeout=timeout,
        secret_paths=run.workflow.secret_paths.get(step.id, []),
        heartbeat_timeout=step.heartbeat_timeout if isinstance(step, TaskStep) else None,
        previous_attempt_id=_previous_attempt(run, node),
    )


def hand_off(run: Dispatching, node: Node, started: datetime, now: datetime) -> None:
    """The worker handed the attempt to another system: it stays running, its deadline now
    the step's timeout from when the worker started it, and waits for its completion."""
    assert node.attempt_id is not None
    node.handed_off = True
    node.probing = False
    timeout = run.workflow.definition.effective_timeout(node.step, run.limits.default_timeout)
    run._timers.set(node, max(started + timedelta(seconds=timeout), now))
    run._journal.emit(
        now,
        "step.handed_off",
        StepStatus.RUNNING,
        from_status=StepStatus.RUNNING,
        step_id=node.key,
        attempt_id=node.attempt_id,
        data={"step_id": node.key, "attempt": node.attempt},
    )


def _previous_attempt(run: Dispatching, node: Node) -> UUID | None:
    """The attempt before this one, for a beating step (its last beat goes to this one)."""
    step = node.step
    if node.attempt < 2 or not isinstance(step, TaskStep) or step.heartbeat_timeout is None:
        return None
    previous = node.attempt - 1
    return attempt_id(run.run_id, node.key, previous, node.generation, run._incarnation)


def heartbeat_missed(
    run: Dispatching, node: Node | None, attempt: UUID, silent: float, now: datetime
) -> bool:
    """The attempt's worker has not beaten for `silent` seconds, over its heartbeat_timeout:
    it fails with `heartbeat_timeout` (retried per policy) and is aborted on the worker.
    False if the attempt is no longer current or out with a worker."""
    if node is None or node.attempt_id != attempt or not node.with_worker:
        return False
    step = node.step
    assert isinstance(step, TaskStep) and step.heartbeat_timeout is not None
    error = StepError(
        f"step '{node.key}': attempt {node.attempt} sent no heartbeat for {silent:.1f}s "
        f"(heartbeat_timeout {step.heartbeat_timeout:g}s; did its worker stop?)",
        category="heartbeat_timeout",
        details={"heartbeat_timeout": step.heartbeat_timeout, "silent": round(silent, 3)},
    ).to_dict()
    run._journal.changes().aborts.append(attempt)
    fail(run, node, error, now, status=StepStatus.TIMED_OUT)
    return True


def timer_fired(run: Dispatching, node: Node, now: datetime) -> None:
    """A worker step's timer: a backoff ended (the next attempt goes out), the time to be
    picked up passed (is a worker on it? `probes`), or the deadline passed (timed out)."""
    if node.status is StepStatus.RETRYING:
        dispatch_new_attempt(run, node, now)
    elif node.probing:
        assert node.attempt_id is not None
        node.probing = False
        timeout = run.workflow.definition.effective_timeout(node.step, run.limits.default_timeout)
        run._timers.set(node, now + timedelta(seconds=timeout))
        run._journal.changes().probes.append((node.key, node.attempt_id, node.step.type))
    else:
        _timed_out(run, node, now)


def _timed_out(run: Dispatching, node: Node, now: datetime) -> None:
    assert node.attempt_id is not None
    timeout = run.workflow.definition.effective_timeout(node.step, run.limits.default_timeout)
    if node.handed_off:
        error = StepError(
            f"step '{node.key}': attempt {node.attempt} was handed off and not completed "
            f"within its timeout of {timeout:g}s",
            category="timeout",
            details={"timeout": timeout, "handed_off": True},
        ).to_dict()
        fail(run, node, error, now, status=StepStatus.TIMED_OUT)
        return
    waited = node.step.schedule_to_start or timeout
    error = StepError(
        f"step '{node.key}': attempt {node.attempt} had no result {waited + timeout:g}s "
        f"after it was dispatched (timeout {timeout:g}s plus {waited:g}s to be picked up;"
        " did its worker stop?)",
        category="timeout",
        details={"timeout": timeout, "schedule_to_start": waited},
    ).to_dict()
    run._journal.changes().aborts.append(node.attempt_id)
    fail(run, node, error, now, status=StepStatus.TIMED_OUT)


def not_picked_up(run: Dispatching, node: Node | None, attempt: UUID, now: datetime) -> bool:
    """No worker took the attempt within its schedule_to_start: it times out (and is
    retried per policy). False if the attempt is no longer current."""
    if node is None or node.attempt_id != attempt or node.status is not StepStatus.DISPATCHED:
        return False
    waited = node.step.schedule_to_start or 0
    error = StepError(
        f"step '{node.key}': no worker took attempt {node.attempt} within its "
        f"schedule_to_start of {waited:g}s (is a worker serving '{node.step.type}'?)",
        category="schedule_to_start_timeout",
        details={"schedule_to_start": waited},
    ).to_dict()
    run._journal.changes().aborts.append(attempt)
    fail(run, node, error, now, status=StepStatus.TIMED_OUT)
    return True
