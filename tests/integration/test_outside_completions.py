"""Steps completed from outside (a real orchestrator and worker): a step hands its work to
another system and returns; the attempt stays running until that system inserts its
completion with the attempt's token, or the step's timeout ends it. A late, duplicate or
forged completion changes nothing; an orchestrator that adopts the run keeps waiting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.client import complete_attempt
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.worker.runtime import StepContext
from tests.helpers import stop_tasks, wait_for
from tests.integration.conftest import Engine, start_engine

SHIP = """
name: ship
version: 1
steps:
  - {id: carrier, type: hand_off, timeout: 30s, retry: {max_retries: 0}}
  - {id: done, type: transform, depends_on: [carrier], output: "${{ steps.carrier.output }}"}
"""

SHORT = """
name: short
version: 1
steps:
  - {id: carrier, type: hand_off, timeout: 1s, retry: {max_retries: 0}}
"""


class Carrier:
    """The other system: what each handed-off attempt gave it (attempt id, token)."""

    def __init__(self) -> None:
        self.handed: asyncio.Queue[tuple[UUID, str]] = asyncio.Queue()

    async def hand_off(self, params: Any, ctx: StepContext) -> Any:
        await self.handed.put((ctx.attempt_id, ctx.completion_token))
        return ctx.hand_off()


@pytest.fixture
async def carrier_engine(settings: Settings) -> AsyncIterator[tuple[Engine, Carrier]]:
    await store.apply_migrations(settings.database_url or "")
    carrier = Carrier()
    stop, tasks = await start_engine(settings, {"hand_off": carrier.hand_off})
    conn = await store.connect(settings.database_url or "")
    try:
        yield Engine(settings, conn), carrier
    finally:
        await conn.close()
        stop.set()
        await stop_tasks(tasks)


async def _status(engine: Engine, run_id: UUID) -> str:
    return str((await engine.run(run_id))["status"])


async def test_a_handed_off_step_completes_when_its_completion_arrives(
    carrier_engine: tuple[Engine, Carrier],
) -> None:
    engine, carrier = carrier_engine
    await engine.register(SHIP)
    run_id = await engine.submit("ship")
    attempt, token = await asyncio.wait_for(carrier.handed.get(), 10)
    await wait_for(
        lambda: _has_event(engine, run_id, "step.handed_off"), message="never handed off"
    )
    assert await _status(engine, run_id) == "running"

    await complete_attempt(engine.conn, attempt, "00" * 16, output={"forged": True})
    await complete_attempt(engine.conn, attempt, token, output={"tracking": "T-1"})
    await complete_attempt(engine.conn, attempt, token, output={"late": True})
    run = await engine.finished(run_id)
    assert run["status"] == "completed"
    assert run["output"] == {"done": {"tracking": "T-1"}}
    stored = await engine.conn.fetchrow(
        "SELECT outcome, output, worker FROM flowforge.step_results WHERE attempt_id = $1",
        attempt,
    )
    assert stored is not None
    assert (stored["outcome"], stored["output"], stored["worker"]) == (
        "succeeded",
        {"tracking": "T-1"},
        "orchestrator",  # stored by the orchestrator, in place of the worker's handed_off row
    )
    assert carrier.handed.empty()  # handed off once, never sent to a worker again


async def test_an_error_completion_fails_the_step_and_a_missing_one_times_it_out(
    carrier_engine: tuple[Engine, Carrier],
) -> None:
    engine, carrier = carrier_engine
    await engine.register(SHIP)
    await engine.register(SHORT)
    declined = await engine.submit("ship")
    attempt, token = await asyncio.wait_for(carrier.handed.get(), 10)
    await complete_attempt(
        engine.conn, attempt, token, error={"message": "card declined", "category": "Declined"}
    )
    run = await engine.finished(declined)
    assert run["status"] == "failed"
    assert "card declined" in str(run["error"]) and "Declined" in str(run["error"])

    silent = await engine.submit("short")
    await asyncio.wait_for(carrier.handed.get(), 10)
    run = await engine.finished(silent, timeout=20)
    assert run["status"] == "failed"
    assert "was handed off and not completed within its timeout of 1s" in str(run["error"])


async def test_an_adopting_orchestrator_keeps_waiting_for_the_completion(
    settings: Settings,
) -> None:
    await store.apply_migrations(settings.database_url or "")
    carrier = Carrier()
    stop, tasks = await start_engine(settings, {"hand_off": carrier.hand_off})
    conn = await store.connect(settings.database_url or "")
    engine = Engine(settings, conn)
    try:
        await engine.register(SHIP)
        run_id = await engine.submit("ship")
        attempt, token = await asyncio.wait_for(carrier.handed.get(), 10)
        await wait_for(
            lambda: _has_event(engine, run_id, "step.handed_off"), message="never handed off"
        )
        stop.set()
        await stop_tasks(tasks)  # the leases are released: a new orchestrator adopts

        await complete_attempt(conn, attempt, token, output={"tracking": "T-2"})
        stop, tasks = await start_engine(settings, {"hand_off": carrier.hand_off})
        run = await engine.finished(run_id)
        assert run["output"] == {"done": {"tracking": "T-2"}}
        assert carrier.handed.empty()
    finally:
        await conn.close()
        stop.set()
        await stop_tasks(tasks)


async def _has_event(engine: Engine, run_id: UUID, kind: str) -> bool:
    return any(e["type"] == kind for e in await engine.events(run_id))
