"""The runs this orchestrator owns, in one registry, so that what holds of them is kept in
one place.

For each owned run: its `Owned` record and its outstanding attempts (dispatched, no result
applied yet); and the index from attempt to run that routes a result to its run. The
invariant: the index holds exactly the owned runs' outstanding attempts. Only the methods
below change either, each keeping it (tests/unit/test_owned_runs.py).

What is waiting to be done is kept here too, and read back only for what is still owned:
dirty runs (changes to commit), notified attempts (results to fetch), undelivered
attempts (committed, not yet taken by Redis); runs given back after an error (leases to
release) with their strikes, and the runs set apart (never claimed here again).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Protocol
from uuid import UUID

from opentelemetry import trace

from flowforge_orchestrator.core.graph.run import RunState
from flowforge_orchestrator.core.records import Dispatch, RunChanges
from flowforge_orchestrator.engine.parking import Parking

__all__ = ["Drop", "Owned", "OwnedRuns", "Sent"]


@dataclass
class Owned:
    """A run this orchestrator owns, with the fence its writes carry."""

    state: RunState
    epoch: int
    span: trace.Span
    traceparent: str | None
    new_traceparent: str | None = None  # written with the next commit (fresh starts only)
    seq: int = 0  # the last transition written: a run that cannot be written fails after it
    # Changes a commit could not write because another session held the run's row: the
    # next commit writes them first. `deferrals` counts the tries, for the backoff.
    unwritten: RunChanges | None = None
    deferrals: int = 0
    # The spans of its workflow steps' attempts out with a child run (engine.children).
    child_spans: dict[UUID, trace.Span] = field(default_factory=dict)
    # Decided for the write in flight: the run hibernates with it (engine/parking.py).
    parking: Parking | None = None

    def take_changes(self) -> RunChanges | None:
        """What the next commit writes for this run: unwritten changes first, then new ones."""
        later = self.state.take_changes()
        earlier, self.unwritten = self.unwritten, None
        return later if earlier is None else earlier.then(later)


@dataclass(frozen=True)
class Sent:
    """An outstanding attempt: what was dispatched, and when (monotonic seconds), so that
    an attempt Redis lost can be sent again."""

    dispatch: Dispatch
    at: float


class Drop(Protocol):
    """Forget a run; `give_back`: it is still ours but cannot go on (an error)."""

    def __call__(self, run_id: UUID, why: str, *, give_back: bool = False) -> None: ...


class OwnedRuns:
    """The registry of owned runs and their outstanding attempts."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._runs: dict[UUID, Owned] = {}
        self._sent: dict[UUID, dict[UUID, Sent]] = {}  # run -> its outstanding attempts
        # run -> its attempts handed off to another system: outstanding too (a completion
        # is routed like a result), but never delivered or reconciled with Redis again.
        self._handed: dict[UUID, set[UUID]] = {}
        # Those of them that wait for a child run (a workflow step's): no completion to read.
        self._children: set[UUID] = set()
        self._beating: dict[UUID, UUID] = {}  # outstanding attempts that must beat -> run
        self._index: dict[UUID, UUID] = {}  # outstanding attempt -> its run
        self._dirty: set[UUID] = set()
        self._notified: set[UUID] = set()
        self._undelivered: dict[UUID, None] = {}  # attempts, in the order dispatched
        self._to_release: set[UUID] = set()
        self._strikes: dict[UUID, int] = {}  # runs given back after an error, by count
        self._set_apart: set[UUID] = set()  # runs whose failure could not even be written

    # -- the runs ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, run_id: UUID) -> bool:
        return run_id in self._runs

    def get(self, run_id: UUID) -> Owned | None:
        return self._runs.get(run_id)

    def ids(self) -> list[UUID]:
        return list(self._runs)

    def epochs(self) -> dict[UUID, int]:
        """Each owned run's epoch, as its writes are fenced now."""
        return {run_id: owned.epoch for run_id, owned in self._runs.items()}

    def adopt(self, run_id: UUID, owned: Owned) -> None:
        """The run is ours (again): its attempts, if any, are kept."""
        self._runs[run_id] = owned

    def finished(self, run_id: UUID) -> Owned | None:
        """The run ended: it leaves, with its attempts and whatever waited for it."""
        owned = self._runs.pop(run_id, None)
        for attempt_id in self._sent.pop(run_id, {}):
            del self._index[attempt_id]
            self._beating.pop(attempt_id, None)
        for attempt_id in self._handed.pop(run_id, ()):
            del self._index[attempt_id]
            self._children.discard(attempt_id)
        self._dirty.discard(run_id)
        return owned

    def drop(self, run_id: UUID, *, give_back: bool = False) -> Owned | None:
        """Forget the run. `give_back`: we own it still but cannot go on (an error): its
        lease is to be released now, so it is resumed from its last checkpoint, and the
        strike is counted."""
        if give_back:
            self._to_release.add(run_id)
            self._strikes[run_id] = self._strikes.get(run_id, 0) + 1
        return self.finished(run_id)

    def clear(self) -> list[Owned]:
        """Forget every run (they were released); returns them."""
        owned = list(self._runs.values())
        for run_id in list(self._runs):
            self.finished(run_id)
        return owned

    # -- attempts ------------------------------------------------------------------------

    def dispatched(
        self, run_id: UUID, dispatches: Iterable[Dispatch], *, answered: Collection[UUID] = ()
    ) -> None:
        """Committed attempts of an owned run are outstanding; each is to be delivered,
        unless `answered`: its result is stored already (an adopted run's), and is fetched
        rather than sent to a worker a second time. A run not owned keeps no attempt."""
        dispatches = list(dispatches)
        if run_id not in self._runs or not dispatches:
            return
        # Made at the first dispatch: a run parked on a delay or an event holds none.
        sent = self._sent.setdefault(run_id, {})
        now = self._monotonic()
        for dispatch in dispatches:
            sent[dispatch.attempt_id] = Sent(dispatch, now)
            self._index[dispatch.attempt_id] = run_id
            if dispatch.heartbeat_timeout is not None:
                self._beating[dispatch.attempt_id] = run_id
            if dispatch.attempt_id not in answered:
                self._undelivered[dispatch.attempt_id] = None

    def answered(self, run_id: UUID, attempt_id: UUID) -> Owned | None:
        """A result of the run's attempt is being applied: the attempt is no longer
        outstanding. Returns the run, if owned."""
        owned = self._runs.get(run_id)
        if owned is not None:
            self._forget(run_id, attempt_id)
        return owned

    def committed(self, owned: Owned, changes: RunChanges, answered: Collection[UUID] = ()) -> bool:
        """Changes of the run are durable: the attempts they end are answered, those they
        dispatch are outstanding, and a run they finish leaves. False if it finished."""
        run_id = changes.run_id
        if changes.status.finished:
            self.finished(run_id)
            return False
        self.adopt(run_id, owned)
        ended = set()
        for finished in changes.attempts_finished:
            ended.add(finished.attempt_id)
            self._forget(run_id, finished.attempt_id)
        self.dispatched(run_id, changes.dispatches, answered=answered)
        self.awaiting_children(
            run_id,
            [c.parent_attempt_id for c in changes.children if c.parent_attempt_id not in ended],
        )
        return True

    def handed_off(self, run_id: UUID, attempt_ids: Iterable[UUID]) -> None:
        """These attempts of an owned run wait for a completion from outside: outstanding,
        but no longer a worker's (nothing to deliver, nothing to look for in Redis)."""
        attempt_ids = list(attempt_ids)
        if run_id not in self._runs or not attempt_ids:
            return
        handed = self._handed.setdefault(run_id, set())
        for attempt_id in attempt_ids:
            self._sent.get(run_id, {}).pop(attempt_id, None)
            self._undelivered.pop(attempt_id, None)
            self._beating.pop(attempt_id, None)
            handed.add(attempt_id)
            self._index[attempt_id] = run_id

    def awaiting_children(self, run_id: UUID, attempt_ids: Iterable[UUID]) -> None:
        """These attempts of an owned run (workflow steps') wait for their child runs:
        outstanding, answered by the child's result, with no job to deliver or reconcile."""
        attempt_ids = list(attempt_ids)
        self.handed_off(run_id, attempt_ids)
        if run_id in self._runs:
            self._children.update(attempt_ids)

    def run_of(self, attempt_id: UUID) -> UUID | None:
        """The owned run whose attempt this is, if it is outstanding."""
        return self._index.get(attempt_id)

    def attempts_of(self, run_id: UUID) -> list[UUID]:
        """The run's outstanding attempts."""
        return [*self._sent.get(run_id, ()), *self._handed.get(run_id, ())]

    def is_handed_off(self, attempt_id: UUID) -> bool:
        """Whether the attempt waits for a completion from outside (not for a child run)."""
        run_id = self._index.get(attempt_id)
        return (
            run_id is not None
            and attempt_id in self._handed.get(run_id, ())
            and attempt_id not in self._children
        )

    def outstanding(self) -> dict[UUID, UUID]:
        """Every outstanding attempt -> its run (a copy of the index)."""
        return dict(self._index)

    def sent_before(self, moment: float) -> dict[UUID, tuple[Dispatch, str | None]]:
        """Outstanding attempts dispatched before `moment` (monotonic), with the trace
        context they are sent with."""
        return {
            attempt_id: (sent.dispatch, self._runs[run_id].traceparent)
            for run_id, attempts in self._sent.items()
            for attempt_id, sent in attempts.items()
            if sent.at < moment
        }

    def beating(self) -> list[tuple[UUID, Sent]]:
        """Outstanding attempts of steps with a heartbeat_timeout: (run id, what was sent)."""
        return [(run_id, self._sent[run_id][a]) for a, run_id in self._beating.items()]

    def _forget(self, run_id: UUID, attempt_id: UUID) -> None:
        self._beating.pop(attempt_id, None)
        attempts = self._sent.get(run_id)
        if attempts is not None and attempts.pop(attempt_id, None) is not None:
            del self._index[attempt_id]
            if not attempts:
                del self._sent[run_id]
        elif attempt_id in self._handed.get(run_id, ()):
            self._handed[run_id].discard(attempt_id)
            self._children.discard(attempt_id)
            del self._index[attempt_id]

    # -- what waits to be done -----------------------------------------------------------

    def mark_dirty(self, run_id: UUID) -> None:
        """The run has changes to commit."""
        if run_id in self._runs:
            self._dirty.add(run_id)

    @property
    def has_dirty(self) -> bool:
        return bool(self._dirty)

    def take_dirty(self) -> list[tuple[Owned, RunChanges]]:
        """The changes of every dirty run (still owned, with changes), for one commit."""
        batch: list[tuple[Owned, RunChanges]] = []
        for run_id in self._dirty:
            owned = self._runs.get(run_id)
            changes = owned.take_changes() if owned is not None else None
            if owned is not None and changes is not None:
                batch.append((owned, changes))
        self._dirty.clear()
        return batch

    def notify(self, attempt_ids: Iterable[UUID]) -> bool:
        """Results of these attempts may be stored; True if one of them is outstanding."""
        mine = [a for a in attempt_ids if a in self._index]
        self._notified.update(mine)
        return bool(mine)

    def notify_all(self) -> None:
        """Results of any outstanding attempt may be stored (notifications were missed)."""
        self._notified.update(self._index)

    def take_notified(self) -> list[UUID]:
        """The notified attempts still outstanding, whose results are to be fetched."""
        wanted = [a for a in self._notified if a in self._index]
        self._notified.clear()
        return wanted

    @property
    def has_undelivered(self) -> bool:
        return bool(self._undelivered)

    @property
    def undelivered_count(self) -> int:
        """How many dispatches wait to be delivered (some may be answered meanwhile)."""
        return len(self._undelivered)

    def take_undelivered(self) -> list[tuple[Dispatch, str | None]]:
        """The dispatches to enqueue (still outstanding), with their trace context."""
        taken, self._undelivered = self._undelivered, {}
        todo: list[tuple[Dispatch, str | None]] = []
        for attempt_id in taken:
            run_id = self._index.get(attempt_id)
            if run_id is not None:
                sent = self._sent[run_id][attempt_id]
                todo.append((sent.dispatch, self._runs[run_id].traceparent))
        return todo

    def undelivered(self, attempt_id: UUID) -> bool:
        """Whether the attempt waits to be enqueued (Redis has not seen it yet)."""
        return attempt_id in self._undelivered

    def deliver_again(self, attempt_ids: Iterable[UUID]) -> None:
        """These dispatches did not reach Redis (or Redis lost them): deliver them again."""
        self._undelivered.update((a, None) for a in attempt_ids if a in self._index)

    def to_release(self) -> list[UUID]:
        """Runs given back whose leases are still to be released."""
        return list(self._to_release)

    def released(self, run_ids: Iterable[UUID]) -> None:
        self._to_release.difference_update(run_ids)

    def strikes(self, run_id: UUID) -> int:
        """How many times this replica gave the run back after an error."""
        return self._strikes.get(run_id, 0)

    def set_apart(self, run_id: UUID) -> None:
        """Never claim this run here again (not even its failure can be written)."""
        self._set_apart.add(run_id)

    def apart(self) -> list[UUID]:
        return list(self._set_apart)
