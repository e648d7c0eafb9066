"""The follow-up queue's records: what is left to decide after a step or a list moved.

Every entry point of `RunState` changes some nodes; each change that may set more in motion
queues one of these, and `flow.drain` works them off in order until nothing is left.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flowforge_orchestrator.core.graph.nodes import Node, Scope

__all__ = ["Check", "Finished", "FollowUp", "FollowUps", "Launch"]


@dataclass(frozen=True, slots=True)
class Finished:
    """A step reached a final status: start its dependents, or close its list."""

    node: Node


@dataclass(frozen=True, slots=True)
class Launch:
    """A parallel step may start its next branch (as `max_parallel` allows)."""

    node: Node


@dataclass(frozen=True, slots=True)
class Check:
    """A list started or was restored: start what is ready, close it if nothing is left."""

    scope: Scope


FollowUp = Finished | Launch | Check


class FollowUps:
    """The queue itself: first in, first out. A list with a moving head rather than a
    `deque`, whose first block costs ~700 bytes even empty: a run parked for a month (on a
    delay or an event) holds an empty queue all that time, and a million parked runs would
    pay it a million times."""

    __slots__ = ("_head", "_items")

    def __init__(self) -> None:
        self._items: list[FollowUp] = []
        self._head = 0

    def __bool__(self) -> bool:
        return self._head < len(self._items)

    def __len__(self) -> int:
        return len(self._items) - self._head

    def append(self, item: FollowUp) -> None:
        self._items.append(item)

    def extend(self, items: Iterable[FollowUp]) -> None:
        self._items.extend(items)

    def popleft(self) -> FollowUp:
        if self._head >= len(self._items):
            raise IndexError("pop from an empty follow-up queue")
        item = self._items[self._head]
        self._head += 1
        if self._head == len(self._items):
            self.clear()  # drained: give the list's memory back
        elif self._head > 1024 and self._head * 2 > len(self._items):
            del self._items[: self._head]  # a long drain: drop what was worked off
            self._head = 0
        return item

    def clear(self) -> None:
        self._items = []
        self._head = 0
