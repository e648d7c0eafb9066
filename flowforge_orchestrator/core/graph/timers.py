"""A run's timers: each step's (a delay's end, an attempt's deadline or schedule-to-start
check, a retry's backoff) by node key, and the run's own deadline."""

from __future__ import annotations

from datetime import UTC, datetime
from heapq import heapify, heappop, heappush

from flowforge_orchestrator.core.graph.nodes import Node

__all__ = ["RUN_TIMER", "Timers", "iso"]

RUN_TIMER = ""  # the run's own deadline, among the step timers (no step key is empty)


class Timers:
    """When each timer fires. A step's timer is also on its node (`fire_at`), which the
    checkpoint saves.

    A heap beside the map, its stale entries (a timer cleared or moved) dropped when they
    come to the top: `next` is asked after every commit, and a fan-out holds a deadline per
    element, so it must not take the minimum of them all (O(elements) per commit)."""

    __slots__ = ("_at", "_heap")

    def __init__(self) -> None:
        self._at: dict[str, datetime] = {}  # node key (or RUN_TIMER) -> when it fires
        self._heap: list[tuple[datetime, str]] = []  # (when, key), stale ones included

    def set(self, node: Node, at: datetime) -> None:
        node.fire_at = at
        self.put(node.key, at)

    def clear(self, node: Node) -> None:
        node.fire_at, node.probing = None, False
        self._at.pop(node.key, None)

    def put(self, key: str, at: datetime) -> None:
        """Set a timer by key alone: the run's deadline, or a restored node's timer."""
        if self._at.get(key) == at:
            return
        self._at[key] = at
        heappush(self._heap, (at, key))
        if len(self._heap) > 2 * len(self._at) + 64:  # mostly stale: start afresh
            self._heap = [(when, k) for k, when in self._at.items()]
            heapify(self._heap)

    def drop(self, key: str) -> None:
        """Forget a timer whose node is gone."""
        self._at.pop(key, None)

    def take(self, key: str) -> bool:
        """Remove the timer; False if it was no longer set."""
        return self._at.pop(key, None) is not None

    def reset(self) -> None:
        """No timer at all: the run ended."""
        self._at.clear()
        self._heap.clear()

    @property
    def deadline(self) -> datetime | None:
        return self._at.get(RUN_TIMER)

    def next(self) -> datetime | None:
        heap = self._heap
        while heap and self._at.get(heap[0][1]) != heap[0][0]:
            heappop(heap)
        return heap[0][0] if heap else None

    def due(self, now: datetime) -> list[str]:
        """The keys of the timers due at `now`, earliest first (ties by key); they stay
        set until taken."""
        heap, due = self._heap, list[tuple[datetime, str]]()
        while heap and heap[0][0] <= now:
            entry = heappop(heap)
            if self._at.get(entry[1]) == entry[0] and (not due or due[-1] != entry):
                due.append(entry)
        for entry in due:
            heappush(heap, entry)
        return [key for _, key in due]


def iso(moment: datetime) -> str:
    """A moment as events show it: UTC, with a Z."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
