"""Hibernation (sql/0016): a run parked on a far timer or on an event leaves the
orchestrator's memory with its commit, and comes back when its timer is due, when its event
arrives, or when its cancellation is asked for; claiming many parked runs never holds them
all; an event that arrives while the run is leaving memory is not lost."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.client import send_event
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.engine.orchestrator import run_orchestrator
from flowforge_orchestrator.ops import metrics
from flowforge_orchestrator.worker.runtime import load_step_types, run_worker
from tests.chaos.audit import audit
from tests.helpers import stop_tasks, wait_for
from tests.integration.conftest import SECRETS, Engine, Steps

AFTER = 1.0  # FLOWFORGE_HIBERNATE_AFTER here: runs claimed again 0.5 s before their timer
DELAY = 4.0

DELAYED = f"""
name: delayed
version: 1
steps:
  - {{id: a, type: echo, with: {{n: "${{{{ input.n }}}}"}}}}
  - {{id: pause, type: delay, duration: {DELAY:g}s, depends_on: [a]}}
  - {{id: b, type: echo, depends_on: [pause], with: {{done: true}}}}
"""

APPROVAL = """
name: approval
version: 1
steps:
  - {id: first, type: hold, with: {}}
  - {id: approved, type: wait, depends_on: [first], event: approved}
  - id: after
    type: transform
    depends_on: [approved]
    output: "${{ steps.approved.output.payload }}"
"""

KEYED = """
name: keyed
version: 1
steps:
  - id: paid
    type: wait
    event: paid
    key: "'order-' + string(input.order)"
    timeout: 1h
"""

PARKED = """
name: parked
version: 1
steps:
  - {id: pause, type: delay, duration: 1h}
"""


@dataclass
class Hibernating(Engine):
    measures: metrics.OrchestratorMetrics

    def gauge(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.measures.registry.get_sample_value(name, labels or {}) or 0.0

    def action(self, name: str) -> float:
        return self.gauge("flowforge_reconciler_actions_total", {"action": name})

    @property
    def in_memory(self) -> float:
        """How many runs the orchestrator's `OwnedRuns` holds (the gauge reads its len)."""
        return self.gauge("flowforge_active_runs")

    async def wake_at(self, run_id: UUID) -> datetime | None:
        found: datetime | None = await self.conn.fetchval(
            "SELECT wake_at FROM flowforge.runs WHERE id = $1", run_id
        )
        return found

    async def hibernated(self, run_id: UUID) -> bool:
        row = await self.conn.fetchrow(
            "SELECT status, owner, lease_expires_at, wake_at FROM flowforge.runs WHERE id = $1",
            run_id,
        )
        assert row is not None
        parked = row["wake_at"] is not None and row["owner"] is None
        return parked and row["status"] == "running" and row["lease_expires_at"] is None


@pytest.fixture
async def engine(settings: Settings, steps: Steps) -> AsyncIterator[Hibernating]:
    """An orchestrator (HIBERNATE_AFTER of 1 s, claims of 20 runs) and a worker."""
    await store.apply_migrations(settings.database_url or "")
    settings = settings.model_copy(update={"hibernate_after": AFTER, "claim_batch": 20})
    measures = metrics.OrchestratorMetrics(metrics.new_registry(process=False))
    stop = asyncio.Event()
    ready_o, ready_w = asyncio.Event(), asyncio.Event()
    types = {**load_step_types([]), "echo": steps.echo, "hold": steps.hold}
    tasks = [
        asyncio.create_task(run_orchestrator(settings, stop, ready=ready_o, measures=measures)),
        asyncio.create_task(run_worker(settings, types, stop=stop, ready=ready_w, secrets=SECRETS)),
    ]
    await asyncio.wait_for(asyncio.gather(ready_o.wait(), ready_w.wait()), timeout=20)
    conn = await store.connect(settings.database_url or "")
    try:
        yield Hibernating(settings, conn, measures)
    finally:
        steps.release.set()
        stop.set()
        await conn.close()
        await stop_tasks(tasks)


async def _step_time(engine: Engine, run_id: UUID, step: str, kind: str) -> float:
    for event in await engine.events(run_id):
        if event["type"] == kind and event["data"].get("step_id") == step:
            return float(event["time"].timestamp())
    raise AssertionError(f"no {kind} of {step} in run {run_id}")


async def test_a_run_parked_on_a_far_delay_leaves_memory_and_fires_on_time(
    engine: Hibernating,
) -> None:
    await engine.register(DELAYED)
    run_id = await engine.submit("delayed", {"n": 1})

    await wait_for(lambda: engine.hibernated(run_id), message="the run never hibernated")
    # It leaves OwnedRuns once the commit that parked it has returned (a moment after the
    # row shows it): it is never in memory again until it is claimed.
    await wait_for(lambda: engine.in_memory == 0, message="the run stayed in memory")
    row = await engine.run(run_id)
    assert row["status"] == "running" and row["owner"] is None

    finished = await engine.finished(run_id, timeout=DELAY + 10)
    assert finished["status"] == "completed", finished["error"]
    started = await _step_time(engine, run_id, "pause", "step.started")
    fired = await _step_time(engine, run_id, "pause", "step.succeeded")
    assert DELAY <= fired - started < DELAY + 1.0  # on time: claimed ahead, fired in memory
    assert engine.action("hibernated") == 1 and engine.action("woken") == 1
    assert await engine.wake_at(run_id) is None
    found = await audit(engine.conn)
    assert (found.duplicate_events, found.broken_histories) == (0, 0)


async def test_an_event_wakes_a_hibernated_wait_and_is_taken_once(
    engine: Hibernating, steps: Steps
) -> None:
    await engine.register(APPROVAL)
    steps.release.set()
    run_id = await engine.submit("approval")
    await wait_for(lambda: engine.hibernated(run_id), message="the wait never hibernated")
    assert await engine.conn.fetchval(
        "SELECT wake_at = 'infinity' FROM flowforge.runs WHERE id = $1", run_id
    )  # no timer: only an event or a cancellation wakes it
    await wait_for(lambda: engine.in_memory == 0, message="the run stayed in memory")

    await send_event(engine.conn, "approved", {"by": "ann"}, run_id=run_id)
    finished = await engine.finished(run_id)
    assert finished["status"] == "completed" and finished["output"] == {"after": {"by": "ann"}}
    taken = await engine.conn.fetchval("SELECT count(*) FROM flowforge.event_consumptions")
    assert taken == 1


async def test_an_event_by_key_wakes_exactly_the_hibernated_runs_of_that_key(
    engine: Hibernating,
) -> None:
    await engine.register(KEYED)
    seven = await engine.submit("keyed", {"order": 7})
    eight = await engine.submit("keyed", {"order": 8})
    for run_id in (seven, eight):
        await wait_for(functools.partial(engine.hibernated, run_id), message="not hibernated")

    await send_event(engine.conn, "paid", {"amount": 3}, key="order-7")
    assert (await engine.finished(seven))["status"] == "completed"
    assert await engine.hibernated(eight)  # not its key: it sleeps on
    parked = await engine.conn.fetch("SELECT run_id FROM flowforge.parked_waits")
    assert [r["run_id"] for r in parked] == [eight]


async def test_an_event_sent_before_the_wait_parks_is_taken(
    engine: Hibernating, steps: Steps
) -> None:
    """The event is in the table before the run reaches its wait and hibernates: the check
    after the parking commit finds it and wakes the run."""
    await engine.register(APPROVAL)
    run_id = await engine.submit("approval")
    await wait_for(lambda: "first" in steps.started, message="the first step never started")
    await send_event(engine.conn, "approved", {"early": True}, run_id=run_id)
    steps.release.set()
    finished = await engine.finished(run_id)
    assert finished["status"] == "completed" and finished["output"] == {"after": {"early": True}}


@pytest.mark.parametrize("how", ["request", "flag"])
async def test_a_cancel_reaches_a_hibernated_run_promptly(engine: Hibernating, how: str) -> None:
    await engine.register(PARKED)
    run_id = await engine.submit("parked")
    await wait_for(lambda: engine.hibernated(run_id), message="the run never hibernated")

    if how == "request":  # the API's way: a request row, no run row locked
        await store.request_cancel(engine.conn, run_id, "changed my mind")
    else:  # the flag (sql/0002): its update wakes the run in the same statement
        await engine.conn.execute(
            "UPDATE flowforge.runs SET cancel_requested = true WHERE id = $1", run_id
        )
    finished = await engine.finished(run_id, timeout=5)
    assert finished["status"] == "cancelled"
    kinds = [e["type"] for e in await engine.events(run_id)]
    assert kinds[-2:] == ["step.cancelled", "workflow.cancelled"]


async def test_claiming_many_parked_runs_never_holds_them_all(engine: Hibernating) -> None:
    """300 runs on a 1-hour delay, claimed 20 at a time: each claim parks its runs again
    in the same statement, so memory holds at most a claim's worth, and at the end none."""
    await engine.register(PARKED)
    async with engine.conn.transaction():
        for _ in range(300):
            await store.enqueue_run(engine.conn, "parked", {})
    most = 0

    async def all_parked() -> bool:
        nonlocal most
        most = max(most, int(engine.in_memory))
        count = await engine.conn.fetchval(
            "SELECT count(*) FROM flowforge.runs WHERE wake_at IS NOT NULL AND owner IS NULL"
        )
        return bool(count == 300)

    await wait_for(all_parked, timeout=30, message="the runs were not all parked")
    # The last claim's commit is visible here before its claimer has counted it (and
    # before it ever held those runs in memory): wait for the count, then look at memory.
    await wait_for(
        lambda: engine.action("hibernated") == 300, message="not every run was hibernated"
    )
    await wait_for(lambda: engine.in_memory == 0, message="runs stayed in memory")
    assert most <= 20
    due = await engine.conn.fetchval("SELECT min(wake_at) - now() FROM flowforge.runs")
    assert due > timedelta(minutes=59)
