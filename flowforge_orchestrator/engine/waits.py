"""The wait steps of the runs this orchestrator owns, indexed by what wakes them.

A wait listens for events of its name sent to its run, and, when it has a key, for events
of its name sent to that key. A notification names the new events' ids; the orchestrator
reads those few rows and asks this index which waits they may concern, so an event nobody
here waits for costs no further query, and parked waits cost none at all. Which event a
wait takes is the database's answer (the oldest its run has not taken), asked only for the
concerned waits; events handed to a wait but not yet committed as taken are held here per
run, so a second wait of the same run does not take the same event meanwhile.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

__all__ = ["Wait", "Waits"]


@dataclass(frozen=True, slots=True)
class Wait:
    """One started wait step: `step` is its key in the run (e.g. `approve` or `each[3]`)."""

    run_id: UUID
    step: str
    attempt_id: UUID
    name: str
    key: str | None


# A run has a wait or a few, and a key usually one waiting run: the index keeps a lone
# member as itself and only a crowd in a dict, so a million parked waits cost a million
# small entries, not a million dicts (the parked-runs benchmark measures it).
_Slot = Wait | dict[Any, Wait]


class Waits:
    """Waits by run, and by name and key; events held for uncommitted takes."""

    def __init__(self) -> None:
        self._by_run: dict[UUID, _Slot] = {}  # member key: the step
        self._by_key: dict[tuple[str, str], _Slot] = {}  # member key: (run, step)
        self._held: dict[UUID, set[int]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Wait]:
        for slot in list(self._by_run.values()):
            yield from _members(slot)

    def add(self, wait: Wait) -> None:
        """Start listening for `wait` (again, after an adoption: the same wait replaces
        itself)."""
        self.remove(wait.run_id, wait.step)
        _put(self._by_run, wait.run_id, wait.step, wait, lambda w: w.step)
        if wait.key is not None:
            _put(self._by_key, (wait.name, wait.key), (wait.run_id, wait.step), wait, _run_step)
        self._count += 1

    def get(self, run_id: UUID, step: str) -> Wait | None:
        return _get(self._by_run.get(run_id), step, lambda w: w.step)

    def remove(self, run_id: UUID, step: str) -> Wait | None:
        """Stop listening for one wait (it took an event, timed out, or was cancelled)."""
        wait = _take(self._by_run, run_id, step, lambda w: w.step)
        if wait is None:
            return None
        if wait.key is not None:
            _take(self._by_key, (wait.name, wait.key), (run_id, step), _run_step)
        self._count -= 1
        return wait

    def drop_run(self, run_id: UUID) -> list[Wait]:
        """Forget a run's waits and held events (it ended, or is no longer owned here)."""
        self._held.pop(run_id, None)
        dropped = []
        for wait in self.of_run(run_id):
            if self.remove(run_id, wait.step) is not None:
                dropped.append(wait)
        return dropped

    def of_run(self, run_id: UUID) -> list[Wait]:
        slot = self._by_run.get(run_id)
        return list(_members(slot)) if slot is not None else []

    def concerned(self, run_id: UUID | None, name: str, key: str | None) -> list[Wait]:
        """The waits an event (addressed to `run_id`, or to `name` and `key`) may wake."""
        if run_id is not None:
            return [w for w in self.of_run(run_id) if w.name == name]
        if key is None:
            return []
        slot = self._by_key.get((name, key))
        return list(_members(slot)) if slot is not None else []

    def hold(self, run_id: UUID, event_id: int) -> None:
        """`event_id` was handed to a wait of `run_id`; its take is not committed yet."""
        self._held.setdefault(run_id, set()).add(event_id)

    def held(self, runs: Iterable[UUID]) -> set[int]:
        """Events handed to waits of these runs and not committed yet."""
        found: set[int] = set()
        for run_id in runs:
            found |= self._held.get(run_id, set())
        return found

    def release(self, run_id: UUID, event_ids: Iterable[int]) -> None:
        """These takes are committed (the database now knows them) or abandoned."""
        held = self._held.get(run_id)
        if held is None:
            return
        held.difference_update(event_ids)
        if not held:
            del self._held[run_id]


def _run_step(wait: Wait) -> tuple[UUID, str]:
    return (wait.run_id, wait.step)


def _members(slot: _Slot) -> Iterator[Wait]:
    if isinstance(slot, Wait):
        yield slot
    else:
        yield from slot.values()


def _put(
    index: dict[Any, _Slot], key: Any, member: Any, wait: Wait, member_of: Callable[[Wait], Any]
) -> None:
    slot = index.get(key)
    if slot is None:
        index[key] = wait
    elif isinstance(slot, Wait):
        index[key] = {member_of(slot): slot, member: wait}
    else:
        slot[member] = wait


def _get(slot: _Slot | None, member: Any, member_of: Callable[[Wait], Any]) -> Wait | None:
    if slot is None:
        return None
    if isinstance(slot, Wait):
        return slot if member_of(slot) == member else None
    return slot.get(member)


def _take(
    index: dict[Any, _Slot], key: Any, member: Any, member_of: Callable[[Wait], Any]
) -> Wait | None:
    slot = index.get(key)
    if slot is None:
        return None
    if isinstance(slot, Wait):
        if member_of(slot) != member:
            return None
        del index[key]
        return slot
    wait = slot.pop(member, None)
    if len(slot) == 1:
        (index[key],) = slot.values()
    elif not slot:
        del index[key]
    return wait
