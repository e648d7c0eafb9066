"""A live owner keeps its runs: its lease moves on while it holds them, and no other
replica claims them, however long a step takes."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.engine.orchestrator import run_orchestrator
from tests.chaos.audit import audit
from tests.helpers import stop_tasks, wait_for
from tests.integration.conftest import Engine, Steps, start_engine

HELD = "name: held\nversion: 1\nsteps:\n  - {id: h, type: hold, with: {}}\n"
LEASE = 2  # seconds; renewed every LEASE / 6 (those with under 2/3 left)


async def test_a_live_owner_renews_its_lease_and_no_other_replica_takes_the_run(
    settings: Settings, steps: Steps
) -> None:
    await store.apply_migrations(settings.database_url or "")
    owner = settings.model_copy(update={"lease_seconds": LEASE, "node_id": "a"})
    other = settings.model_copy(update={"lease_seconds": LEASE, "node_id": "b"})
    conn = await store.connect(settings.database_url or "")
    stop, tasks = await start_engine(owner, {"hold": steps.hold})
    try:
        engine = Engine(settings, conn)
        await engine.register(HELD)
        run_id = await engine.submit("held")
        await wait_for(lambda: "h" in steps.started, message="the step never started")
        first = await engine.run(run_id)
        assert (first["owner"], first["epoch"]) == ("a", 1)

        # A second replica, ready to adopt any run whose lease expires.
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(run_orchestrator(other, stop, ready=ready)))
        await asyncio.wait_for(ready.wait(), 20)

        # The step runs on for more than two lease lengths: only renewals keep the lease.
        async def renewed_past_two_leases() -> bool:
            row = await engine.run(run_id)
            moved = row["lease_expires_at"] - first["lease_expires_at"]
            return bool(moved > timedelta(seconds=2 * LEASE))

        await wait_for(renewed_past_two_leases, timeout=4 * LEASE + 10, message="not renewed")
        held = await engine.run(run_id)
        assert (held["status"], held["owner"], held["epoch"]) == ("running", "a", 1)

        steps.release.set()
        run = await engine.finished(run_id)
        assert (run["status"], run["owner"], run["epoch"]) == ("completed", "a", 1), run["error"]
        assert steps.started == ["h"]
        found = await audit(conn)
        assert (found.duplicate_events, found.broken_histories) == (0, 0)
    finally:
        steps.release.set()
        stop.set()
        try:
            await stop_tasks(tasks)
        finally:
            await conn.close()
