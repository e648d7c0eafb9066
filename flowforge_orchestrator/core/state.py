"""Run and step state machines: the statuses and which transitions between them are legal.

Pure: the graph asks `check_run`/`check_step` before every change, so an illegal transition
is a bug caught at once rather than a corrupt history.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "IllegalTransition",
    "RunStatus",
    "StepStatus",
    "check_caught",
    "check_run",
    "check_step",
]


class RunStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _RUN_FINAL


class StepStatus(StrEnum):
    PENDING = "pending"
    DISPATCHED = "dispatched"  # committed and handed to the queue (leaf steps)
    RUNNING = "running"  # a worker picked it up, or an inline step is in progress
    RETRYING = "retrying"  # an attempt failed; the next waits for its backoff (a timer)
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _STEP_FINAL


_RUN_FINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})
_STEP_FINAL = frozenset(
    {
        StepStatus.SUCCEEDED,
        StepStatus.FAILED,
        StepStatus.TIMED_OUT,
        StepStatus.SKIPPED,
        StepStatus.CANCELLED,
    }
)

_RUN_EDGES: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.PENDING: frozenset({RunStatus.RUNNING, RunStatus.FAILED, RunStatus.CANCELLED}),
    RunStatus.RUNNING: _RUN_FINAL,
}

_STEP_EDGES: dict[StepStatus, frozenset[StepStatus]] = {
    StepStatus.PENDING: frozenset(
        {
            StepStatus.DISPATCHED,
            StepStatus.RUNNING,
            StepStatus.SUCCEEDED,  # inline steps finish in one move
            StepStatus.FAILED,
            StepStatus.SKIPPED,
            StepStatus.CANCELLED,
        }
    ),
    StepStatus.DISPATCHED: frozenset(
        {
            StepStatus.RUNNING,
            StepStatus.RETRYING,
            StepStatus.FAILED,
            StepStatus.TIMED_OUT,
            StepStatus.CANCELLED,
        }
    ),
    StepStatus.RUNNING: frozenset(
        {
            StepStatus.SUCCEEDED,
            StepStatus.FAILED,
            StepStatus.TIMED_OUT,
            StepStatus.CANCELLED,
            StepStatus.RETRYING,
        }
    ),
    StepStatus.RETRYING: frozenset(
        {StepStatus.DISPATCHED, StepStatus.FAILED, StepStatus.CANCELLED}
    ),
}


class IllegalTransition(RuntimeError):
    """A transition the state machine forbids: always a bug in the engine."""


def check_run(current: RunStatus, target: RunStatus) -> None:
    if target not in _RUN_EDGES.get(current, frozenset()):
        raise IllegalTransition(f"run cannot go from {current} to {target}")


def check_step(step_id: str, current: StepStatus, target: StepStatus) -> None:
    if target not in _STEP_EDGES.get(current, frozenset()):
        raise IllegalTransition(f"step '{step_id}' cannot go from {current} to {target}")


def check_caught(step_id: str, current: StepStatus) -> None:
    """A step whose failure a `catch` handler takes goes from any open status (through its
    `step.failed` event) back to running, for as long as the handler runs."""
    if current.finished:
        raise IllegalTransition(f"step '{step_id}' cannot be caught once {current}")
