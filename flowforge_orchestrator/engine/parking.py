"""Whether a run hibernates, and until when: pure, `now` is passed in.

A running run hibernates (leaves memory, sql/0016) when nothing can happen to it before a
timer further away than `after`, or an event: it has no attempt out with a worker or with
another system (a result or a completion would find no one), and its next timer (a delay,
a retry's backoff, a wait's or the workflow's timeout) is more than `after` away, or it has
none and waits for an event. A run with neither a timer nor a wait is left in memory: no
wake-up is known for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from flowforge_orchestrator.core.graph.run import RunState
from flowforge_orchestrator.core.state import RunStatus

__all__ = ["WAKE_AHEAD", "Parking", "park_until", "wake_ahead"]

# A hibernated run is claimed this long before its timer is due, so that it is in memory,
# its timer in the heap, when the timer fires: claiming many at once takes a moment.
WAKE_AHEAD = 5.0


@dataclass(frozen=True)
class Parking:
    """A run's hibernation: its next timer (None: only an event or a cancellation wakes
    it) and the (event name, key) of each wait step it listens with."""

    wake_at: datetime | None
    waits: tuple[tuple[str, str | None], ...]


def wake_ahead(after: float) -> float:
    """How early a due run is claimed: WAKE_AHEAD, and at most half of `after`, so that a
    run claimed early is never far enough from its timer to hibernate again at once."""
    return min(WAKE_AHEAD, after / 2)


def park_until(state: RunState, now: datetime, after: float) -> Parking | None:
    """The run's hibernation if it may hibernate now (see the module); `after` <= 0: never."""
    if after <= 0 or state.status is not RunStatus.RUNNING or state.has_outstanding():
        return None
    waits = tuple((w.event, w.key) for w in state.waiting())
    timer = state.next_timer()
    if timer is None and not waits:
        return None
    if timer is not None and timer - now <= timedelta(seconds=after):
        return None
    return Parking(timer, waits)
