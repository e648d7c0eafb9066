"""The owned runs' next timers (delays, backoffs, deadlines) in one heap; pure, `now` is
passed in.

A run has at most one timer that counts: the one set last. Moving it pushes a new entry
and leaves the old one where it is; an entry that is no longer its run's timer is stale,
skipped when it reaches the top, and dropped for good when stale entries outgrow the live
ones. One loop sleeps until `next_due()`, so thousands of parked runs cost no query each.
"""

from __future__ import annotations

import heapq
from datetime import datetime
from uuid import UUID

__all__ = ["TimerHeap"]

# Stale entries kept before the heap is rebuilt from the live timers: a run whose timer
# moves at every step (each attempt's deadline) must not grow the heap without bound.
SLACK = 1024


class TimerHeap:
    """When each run's next timer is due, and which runs are due at a given time."""

    def __init__(self) -> None:
        self._heap: list[tuple[datetime, int, UUID]] = []
        # Each run's timer and the number of the entry that holds it; ties are served in
        # the order they were set (UUIDs are never compared).
        self._live: dict[UUID, tuple[datetime, int]] = {}
        self._seq = 0

    def __len__(self) -> int:
        """How many runs have a timer."""
        return len(self._live)

    def timer_of(self, run_id: UUID) -> datetime | None:
        live = self._live.get(run_id)
        return live[0] if live else None

    def set(self, run_id: UUID, when: datetime | None) -> bool:
        """Make `when` the run's timer (None: it has none). True if it is now the earliest
        of all: a loop sleeping until the previous earliest must wake (a loop that slept
        until an entry gone stale since wakes at that time, finds it stale, sleeps on)."""
        if when is None:
            self._live.pop(run_id, None)
            return False
        live = self._live.get(run_id)
        if live is not None and live[0] == when:
            return False
        self._seq += 1
        self._live[run_id] = (when, self._seq)
        self._skip_stale()
        heapq.heappush(self._heap, (when, self._seq, run_id))
        earliest = self._heap[0][1] == self._seq
        if len(self._heap) > 2 * len(self._live) + SLACK:
            self._compact()
        return earliest

    def discard(self, run_id: UUID) -> None:
        """The run has no timer any more (it finished, or left this replica)."""
        self._live.pop(run_id, None)

    def pop_due(self, now: datetime) -> list[UUID]:
        """The runs whose timer is due at `now`, earliest first; they no longer have one."""
        due: list[UUID] = []
        while self._skip_stale() and self._heap[0][0] <= now:
            _, _, run_id = heapq.heappop(self._heap)
            del self._live[run_id]
            due.append(run_id)
        return due

    def next_due(self) -> datetime | None:
        """The earliest timer of all (None: no run has one)."""
        return self._heap[0][0] if self._skip_stale() else None

    def _skip_stale(self) -> bool:
        """Pop stale entries off the top; True if a live one is left there."""
        while self._heap:
            when, seq, run_id = self._heap[0]
            if self._live.get(run_id) == (when, seq):
                return True
            heapq.heappop(self._heap)
        return False

    def _compact(self) -> None:
        self._heap = [(when, seq, run_id) for run_id, (when, seq) in self._live.items()]
        heapq.heapify(self._heap)
