"""What a run's graph hands to its next commit: the events, in sequence, and everything
else the commit must write (`records.RunChanges`), gathered as the graph moves."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from flowforge_orchestrator.core.records import Event, RunChanges
from flowforge_orchestrator.core.state import RunStatus

__all__ = ["Journal"]


class Journal:
    """The changes since the last commit, and the run's event sequence numbers."""

    __slots__ = ("_changes", "run_id", "seq")

    def __init__(self, run_id: UUID) -> None:
        self.run_id = run_id
        self.seq = 0  # the last event's
        self._changes: RunChanges | None = None

    def changes(self) -> RunChanges:
        """The changes being gathered (started on first use). Their status, checkpoint,
        output and error are the run's when they are taken (`RunState.take_changes`)."""
        if self._changes is None:
            self._changes = RunChanges(self.run_id, RunStatus.PENDING, {})
        return self._changes

    def take(self) -> RunChanges | None:
        """The changes gathered so far (None: nothing happened); the next start afresh."""
        changes, self._changes = self._changes, None
        return changes

    def emit(
        self,
        at: datetime,
        type_: str,
        to_status: str,
        *,
        from_status: str | None = None,
        step_id: str | None = None,
        attempt_id: UUID | None = None,
        data: dict[str, object] | None = None,
    ) -> None:
        """One transition: a history row and an outbox event, numbered in order."""
        self.seq += 1
        self.changes().events.append(
            Event(
                seq=self.seq,
                type=type_,
                at=at,
                to_status=str(to_status),
                from_status=str(from_status) if from_status is not None else None,
                step_id=step_id,
                attempt_id=attempt_id,
                data=data or {},
            )
        )
