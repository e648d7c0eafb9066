"""A run's timers: each step's (a delay's end, an attempt's deadline or schedule-to-start
check, a retry's backoff) by node key, and the run's own deadline."""

from __future__ import annotations

from datetime import UTC, datetime

from flowforge_orchestrator.core.graph.nodes import Node

__all__ = ["RUN_TIMER", "Timers", "iso"]

RUN_TIMER = ""  # the run's own deadline, among the step timers (no step key is empty)


class Timers:
    """When each timer fires. A step's timer is also on its node (`fire_at`), which the
    checkpoint saves."""

    __slots__ = ("_at",)

    def __init__(self) -> None:
        self._at: dict[str, datetime] = {}  # node key (or RUN_TIMER) -> when it fires

    def set(self, node: Node, at: datetime) -> None:
        node.fire_at = at
        self._at[node.key] = at

    def clear(self, node: Node) -> None:
        node.fire_at, node.probing = None, False
        self._at.pop(node.key, None)

    def put(self, key: str, at: datetime) -> None:
        """Set a timer by key alone: the run's deadline, or a restored node's timer."""
        self._at[key] = at

    def drop(self, key: str) -> None:
        """Forget a timer whose node is gone."""
        self._at.pop(key, None)

    def take(self, key: str) -> bool:
        """Remove the timer; False if it was no longer set."""
        return self._at.pop(key, None) is not None

    def reset(self) -> None:
        """No timer at all: the run ended."""
        self._at.clear()

    @property
    def deadline(self) -> datetime | None:
        return self._at.get(RUN_TIMER)

    def next(self) -> datetime | None:
        return min(self._at.values(), default=None)

    def due(self, now: datetime) -> list[str]:
        """The keys of the timers due at `now`, earliest first (ties by key)."""
        return [key for _, key in sorted((at, key) for key, at in self._at.items() if at <= now)]


def iso(moment: datetime) -> str:
    """A moment as events show it: UTC, with a Z."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
