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

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar
from uuid import UUID

__all__ = ["Wait", "Waits"]

_K = TypeVar("_K")
_M = TypeVar("_M")


@dataclass(frozen=True)
class Wait:
    """One started wait step: `step` is its key in the run (e.g. `approve` or `each[3]`)."""

    run_id: UUID
    step: str
    attempt_id: UUID
    name: str
    key: str | None


class Waits:
    """Waits by run and name, and by name and key; events held for uncommitted takes."""

    def __init__(self) -> None:
        self._by_run: dict[UUID, dict[str, Wait]] = {}
        self._by_run_name: dict[tuple[UUID, str], dict[str, Wait]] = defaultdict(dict)
        self._by_key: dict[tuple[str, str], dict[tuple[UUID, str], Wait]] = defaultdict(dict)
        self._held: dict[UUID, set[int]] = {}

    def __len__(self) -> int:
        return sum(len(steps) for steps in self._by_run.values())

    def __iter__(self) -> Iterator[Wait]:
        for steps in self._by_run.values():
            yield from steps.values()

    def add(self, wait: Wait) -> None:
        """Start listening for `wait` (again, after an adoption: the same wait replaces
        itself)."""
        self.remove(wait.run_id, wait.step)
        self._by_run.setdefault(wait.run_id, {})[wait.step] = wait
        self._by_run_name[(wait.run_id, wait.name)][wait.step] = wait
        if wait.key is not None:
            self._by_key[(wait.name, wait.key)][(wait.run_id, wait.step)] = wait

    def get(self, run_id: UUID, step: str) -> Wait | None:
        return self._by_run.get(run_id, {}).get(step)

    def remove(self, run_id: UUID, step: str) -> Wait | None:
        """Stop listening for one wait (it took an event, timed out, or was cancelled)."""
        steps = self._by_run.get(run_id)
        wait = steps.pop(step, None) if steps is not None else None
        if wait is None:
            return None
        if not steps:
            del self._by_run[run_id]
        _discard(self._by_run_name, (run_id, wait.name), step)
        if wait.key is not None:
            _discard(self._by_key, (wait.name, wait.key), (run_id, step))
        return wait

    def drop_run(self, run_id: UUID) -> list[Wait]:
        """Forget a run's waits and held events (it ended, or is no longer owned here)."""
        self._held.pop(run_id, None)
        dropped = []
        for step in list(self._by_run.get(run_id, {})):
            wait = self.remove(run_id, step)
            if wait is not None:
                dropped.append(wait)
        return dropped

    def of_run(self, run_id: UUID) -> list[Wait]:
        return list(self._by_run.get(run_id, {}).values())

    def concerned(self, run_id: UUID | None, name: str, key: str | None) -> list[Wait]:
        """The waits an event (addressed to `run_id`, or to `name` and `key`) may wake."""
        if run_id is not None:
            return list(self._by_run_name.get((run_id, name), {}).values())
        if key is None:
            return []
        return list(self._by_key.get((name, key), {}).values())

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


def _discard(index: dict[_K, dict[_M, Wait]], key: _K, member: _M) -> None:
    members = index.get(key)
    if members is None:
        return
    members.pop(member, None)
    if not members:
        del index[key]
