"""Event delivery: the owned runs' wait steps take the events sent to them (sql/0013).

* A wait step that starts (in a commit, or found running when a run is claimed or adopted)
  is listened for (`waits.Waits`), and the events already there are looked up at once: an
  event sent before its run reached the wait is not lost.
* NOTIFY `flowforge_events` names the ids of new events: they are read (a few rows), and
  only the waits they concern ask the database for their oldest event not taken yet.
* On the slow poll, events of the last minutes are read again (a notification missed while
  LISTEN was down); after LISTEN reconnects, every wait looks again.

Which event a wait takes is the database's answer; the take is written in the run's next
group commit with the step's transition (`RunChanges.events_taken`), and held here until
then, so two waits of one run never take the same event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from uuid import UUID

from flowforge_orchestrator import store
from flowforge_orchestrator.core.records import RunChanges, WaitStarted
from flowforge_orchestrator.engine.owned import Drop, OwnedRuns
from flowforge_orchestrator.engine.waits import Wait, Waits
from flowforge_orchestrator.ops import metrics
from flowforge_orchestrator.store import events as store_events
from flowforge_orchestrator.store.events import Event, EventAddress

__all__ = ["EventDelivery"]

log = logging.getLogger("flowforge_orchestrator.engine.orchestrator")

LOOKUP_BATCH = 1000  # waits per lookup query
RECENT = 120.0  # seconds of events the slow poll reads again


class EventDelivery:
    """Listens for the owned runs' wait steps and hands them their events."""

    def __init__(
        self,
        pool: store.Pool,
        measures: metrics.OrchestratorMetrics,
        runs: OwnedRuns,
        *,
        retention: float,
        clock: Callable[[], datetime],
        changed: Callable[[UUID], None],
        drop: Drop,
    ) -> None:
        """`retention`: how old a keyed event may be and still be taken (seconds)."""
        self.pool = pool
        self.metrics = measures
        self._runs = runs
        self._retention = retention
        self._clock = clock
        self._changed = changed
        self._drop = drop
        self.waits = Waits()
        self._to_look: dict[tuple[UUID, str], Wait] = {}  # waits to look up events for
        self._ranges: list[tuple[int, int]] = []  # notified event ids, not read yet
        self.wake = asyncio.Event()
        measures.waiting_steps.set_function(lambda: len(self.waits))

    # -- what the orchestrator tells it --------------------------------------------------

    def listen(self, run_id: UUID, started: Iterable[WaitStarted]) -> None:
        """These wait steps of an owned run listen now: look up their events."""
        for s in started:
            wait = Wait(run_id, s.step_id, s.attempt_id, s.event, s.key)
            self.waits.add(wait)
            self._to_look[(run_id, s.step_id)] = wait
            self.wake.set()

    def committed(self, run_id: UUID, changes: RunChanges) -> None:
        """The run's changes are durable: its takes are the database's to remember now, and
        waits that ended (took an event, timed out, cancelled) stop listening."""
        if changes.events_taken:
            self.waits.release(run_id, (t.event_id for t in changes.events_taken))
        owned = self._runs.get(run_id)
        if owned is None or changes.status.finished:
            self.forget(run_id)
            return
        for wait in self.waits.of_run(run_id):
            if not owned.state.is_waiting(wait.step, wait.attempt_id):
                self.waits.remove(run_id, wait.step)
        if changes.waits:
            self.listen(run_id, changes.waits)

    def forget(self, run_id: UUID) -> None:
        """The run ended or is no longer owned here."""
        self.waits.drop_run(run_id)
        for key in [k for k in self._to_look if k[0] == run_id]:
            del self._to_look[key]

    def on_notify(self, payload: str) -> None:
        """Payload: `first-last`, the ids one inserting statement gave its events."""
        first, _, last = payload.partition("-")
        try:
            self._ranges.append((int(first), int(last or first)))
        except ValueError:
            return
        if len(self.waits):
            self.wake.set()

    def look_again(self) -> None:
        """Notifications may have been missed (LISTEN reconnected): every wait looks."""
        for wait in self.waits:
            self._to_look[(wait.run_id, wait.step)] = wait
        if self._to_look:
            self.wake.set()

    # -- the loop ------------------------------------------------------------------------

    async def loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            try:
                await self._deliver()
            except Exception as exc:  # the database away: try again shortly
                log.warning("delivering events failed (%s); trying again", exc)
                await asyncio.sleep(1.0)
                self.wake.set()

    async def poll(self) -> None:
        """The slow path: events of the last minutes, read again."""
        if not len(self.waits):
            return
        try:
            async with self.pool.acquire() as conn:
                recent = await store_events.recent_events(conn, RECENT)
        except Exception as exc:
            log.warning("could not look for recent events: %s", exc)
            return
        self._concerned_by(recent)
        if self._to_look:
            self.wake.set()

    async def _deliver(self) -> None:
        ranges, self._ranges = self._ranges, []
        async with self.pool.acquire() as conn:
            for first, last in _merged(ranges):
                if len(self.waits):
                    self._concerned_by(await store_events.events_by_ids(conn, first, last))
            while self._to_look:
                batch = list(self._to_look.values())[:LOOKUP_BATCH]
                for wait in batch:
                    del self._to_look[(wait.run_id, wait.step)]
                await self._look_up(conn, batch)

    def _concerned_by(self, events: Sequence[Event]) -> None:
        for event in events:
            for wait in self.waits.concerned(event.run_id, event.name, event.key):
                self._to_look[(wait.run_id, wait.step)] = wait

    async def _look_up(self, conn: store.Connection, batch: list[Wait]) -> None:
        live = [w for w in batch if self.waits.get(w.run_id, w.step) == w]
        if not live:
            return
        found = await store_events.events_for_waits(
            conn,
            [EventAddress(w.run_id, w.name, w.key) for w in live],
            retention_seconds=self._retention,
            taken=sorted(self.waits.held({w.run_id for w in live})),
        )
        handed: set[tuple[UUID, int]] = set()
        for index, event in sorted(found.items()):
            wait = live[index]
            if (wait.run_id, event.id) in handed:
                # Another wait of the run takes it in this batch: look again after.
                self._to_look[(wait.run_id, wait.step)] = wait
                self.wake.set()
                continue
            if self._take(wait, event):
                handed.add((wait.run_id, event.id))

    def _take(self, wait: Wait, event: Event) -> bool:
        owned = self._runs.get(wait.run_id)
        if owned is None:
            self.forget(wait.run_id)
            return False
        try:
            took = owned.state.take_event(
                wait.step, wait.attempt_id, event.id, event.as_output(), self._clock()
            )
        except Exception:  # a bug must not take the daemon down with it
            log.exception(
                "run %s: taking an event failed", wait.run_id, extra={"run_id": str(wait.run_id)}
            )
            self._drop(wait.run_id, "internal error while taking an event", give_back=True)
            return False
        self.waits.remove(wait.run_id, wait.step)
        if took:
            self.waits.hold(wait.run_id, event.id)
            self.metrics.events_received.inc()
            self._changed(wait.run_id)
        return took


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping or adjacent id ranges as one, so a burst of inserts costs few reads."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged
