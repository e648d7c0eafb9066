"""What a run's graph hands over for one commit, and what workers report back.

Plain records, no behaviour: the graph produces them, the store writes them, the
orchestrator dispatches what they say to dispatch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from flowforge_orchestrator.core.state import RunStatus, StepStatus, check_run

__all__ = [
    "CHECKPOINT_VERSION",
    "AttemptFinished",
    "CheckpointPart",
    "ChildStart",
    "Dispatch",
    "Event",
    "EventTaken",
    "InlineResult",
    "Limits",
    "RunChanges",
    "StepResult",
    "WaitStarted",
    "json_size",
    "rejected_run",
]

CHECKPOINT_VERSION = 3  # 3: attempt ids carry the run's incarnation


def json_size(value: Any) -> int:
    """Bytes of the compact JSON form: what the limits are measured in."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


@dataclass(frozen=True)
class Limits:
    max_output_bytes: int
    max_context_bytes: int
    default_timeout: float
    max_child_depth: int = 16  # how deep child runs may nest (the top run is depth 0)


@dataclass(frozen=True)
class Event:
    """One transition: a history row and an outbox row share it."""

    seq: int
    type: str
    at: datetime
    to_status: str
    from_status: str | None = None
    step_id: str | None = None
    attempt_id: UUID | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Dispatch:
    """A job for the queue; sent only after the commit that records it."""

    attempt_id: UUID
    run_id: UUID
    step_id: str
    step_type: str
    attempt: int
    params: Any
    timeout: float
    secret_paths: list[list[str | int]] = field(default_factory=list)
    heartbeat_timeout: float | None = None  # the step's, when it must beat
    # The attempt before this one, whose last heartbeat the engine hands to this one.
    previous_attempt_id: UUID | None = None
    last_heartbeat: Any = None  # the previous attempt's last heartbeat details


@dataclass(frozen=True)
class ChildStart:
    """A workflow step's attempt starts a child run: inserted (once: its id is derived from
    the attempt) in the commit that records the attempt. When it ends, its final commit
    writes the result of `parent_attempt_id`, which wakes the parent like a worker's."""

    run_id: UUID  # the child's
    parent_step: str  # the step's key in the parent
    parent_attempt_id: UUID
    workflow: str
    version: int | None  # None: the latest registered, pinned on the child's row
    input: Any
    depth: int  # the parent's depth + 1
    traceparent: str | None = None  # the parent's step span, set by the engine


@dataclass(frozen=True)
class AttemptFinished:
    attempt_id: UUID
    status: StepStatus
    at: datetime
    error: dict[str, Any] | None


@dataclass(frozen=True)
class InlineResult:
    """Output of a step the orchestrator ran itself, stored like a worker's result."""

    attempt_id: UUID
    step_id: str
    outcome: str
    output: Any
    error: dict[str, Any] | None
    at: datetime


@dataclass(frozen=True)
class StepResult:
    """What a worker reported for one attempt: the one record of an attempt's outcome, as
    the worker builds it, the store writes it (`step_results`, a row per attempt) and the
    orchestrator applies it."""

    attempt_id: UUID
    step_id: str
    outcome: str  # succeeded | failed
    output: Any
    error: dict[str, Any] | None
    started_at: datetime | None
    finished_at: datetime
    worker: str | None = None
    # What the row is filed under when a worker writes it: its run, and the attempt's
    # token from the signed job (without it the orchestrator ignores the row).
    run_id: UUID | None = None
    token: bytes | None = None


@dataclass(frozen=True)
class WaitStarted:
    """A wait step began listening: for events `event` sent to its run, or to `key`."""

    step_id: str
    attempt_id: UUID
    event: str
    key: str | None


@dataclass(frozen=True)
class EventTaken:
    """A wait step took event `event_id`: written with the step's transition, so an event
    is taken once by a run however often the commit is replayed."""

    event_id: int
    step_id: str
    attempt_id: UUID


@dataclass(frozen=True)
class CheckpointPart:
    """One part of a big fan-out's packed element states (`flowforge.run_parts`): letters
    `part * size ..` of the fan-out at `step`, and their attempts past 1 by element index.
    Written with the commit after it changes; `new`: not stored yet (inserted)."""

    step: str
    part: int
    letters: str
    attempts: dict[str, int] | None
    new: bool = False


@dataclass
class RunChanges:
    """Everything one commit must write for one run, in order."""

    run_id: UUID
    status: RunStatus
    checkpoint: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    attempts_finished: list[AttemptFinished] = field(default_factory=list)
    inline_results: list[InlineResult] = field(default_factory=list)
    dispatches: list[Dispatch] = field(default_factory=list)
    aborts: list[UUID] = field(default_factory=list)  # attempts to cancel on the workers
    # Attempts whose schedule_to_start passed: is a worker on them? (key, attempt, type)
    probes: list[tuple[str, UUID, str]] = field(default_factory=list)
    waits: list[WaitStarted] = field(default_factory=list)  # to listen for, once committed
    events_taken: list[EventTaken] = field(default_factory=list)
    children: list[ChildStart] = field(default_factory=list)  # child runs to insert
    child_cancels: list[UUID] = field(default_factory=list)  # child runs to cancel
    # The checkpoint's parts that changed, and the fan-outs whose parts go (they ended).
    parts: list[CheckpointPart] = field(default_factory=list)
    parts_dropped: list[str] = field(default_factory=list)
    output: Any = None
    error: dict[str, Any] | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    def then(self, later: RunChanges | None) -> RunChanges:
        """These changes (not written yet) followed by `later`, as one commit: the events
        of both in order, the state of the later. A dispatch (or a child run) whose attempt
        `later` already ends is dropped: it was never sent, and must not be."""
        if later is None:
            return self
        ended = {a.attempt_id for a in later.attempts_finished}
        # A child never inserted needs no cancelling either.
        unborn = {c.run_id for c in self.children if c.parent_attempt_id in ended}
        return RunChanges(
            run_id=self.run_id,
            status=later.status,
            checkpoint=later.checkpoint,
            events=self.events + later.events,
            attempts_finished=self.attempts_finished + later.attempts_finished,
            inline_results=self.inline_results + later.inline_results,
            dispatches=[d for d in self.dispatches if d.attempt_id not in ended] + later.dispatches,
            aborts=self.aborts + later.aborts,
            probes=self.probes + later.probes,
            waits=self.waits + later.waits,
            events_taken=self.events_taken + later.events_taken,
            children=[c for c in self.children if c.parent_attempt_id not in ended]
            + later.children,
            child_cancels=[c for c in self.child_cancels + later.child_cancels if c not in unborn],
            **_merged_parts(self, later),
            output=later.output,
            error=later.error,
            started_at=self.started_at or later.started_at,
            finished_at=later.finished_at or self.finished_at,
        )


def _merged_parts(first: RunChanges, later: RunChanges) -> dict[str, Any]:
    """The parts of two commits written as one: the later body of a part wins (still `new`
    if either was); the parts of a fan-out `later` drops are not written, and a fan-out
    `later` writes again is not dropped (one statement must not touch a row twice)."""
    gone = set(later.parts_dropped)
    merged: dict[tuple[str, int], CheckpointPart] = {
        (p.step, p.part): p for p in first.parts if p.step not in gone
    }
    for part in later.parts:
        before = merged.get((part.step, part.part))
        if before is not None and before.new and not part.new:
            part = CheckpointPart(part.step, part.part, part.letters, part.attempts, new=True)
        merged[(part.step, part.part)] = part
    rewritten = {p.step for p in later.parts}
    dropped = [s for s in first.parts_dropped if s not in rewritten and s not in gone]
    return {"parts": list(merged.values()), "parts_dropped": dropped + later.parts_dropped}


def rejected_run(
    run_id: UUID, status: RunStatus, seq: int, error: dict[str, Any], now: datetime
) -> RunChanges:
    """Changes that fail a run the engine cannot even build (its definition is missing or
    invalid): the run records why, and nothing else is touched."""
    check_run(status, RunStatus.FAILED)
    event = Event(
        seq=seq + 1,
        type="workflow.failed",
        at=now,
        to_status=RunStatus.FAILED.value,
        from_status=status.value,
        data={"error": error},
    )
    return RunChanges(
        run_id=run_id,
        status=RunStatus.FAILED,
        checkpoint={"v": CHECKPOINT_VERSION, "seq": seq + 1, "steps": {}},
        events=[event],
        error=error,
        finished_at=now,
    )
