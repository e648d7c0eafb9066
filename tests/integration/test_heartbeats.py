"""Heartbeats on a real orchestrator and worker: a step that beats outlives its heartbeat
timeout many times over; one that goes silent is timed out at about its heartbeat timeout
(long before its own timeout) and retried with the last details it sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.worker.runtime import StepContext
from tests.helpers import stop_tasks
from tests.integration.conftest import Engine, start_engine

LONG = """
name: long
version: 1
steps:
  - id: crunch
    type: crunch
    heartbeat_timeout: 1s
    timeout: 1m
    retry: {max_retries: 1, initial_interval: 0.1s, jitter: false}
"""


class Crunch:
    """Beats every 0.1 s through `pages` pages; the first attempt goes silent at `stall`."""

    def __init__(self, pages: int, stall: int | None) -> None:
        self.pages, self.stall = pages, stall
        self.resumed_from: list[Any] = []

    async def crunch(self, params: Any, ctx: StepContext) -> Any:
        self.resumed_from.append(ctx.last_heartbeat)
        start = (ctx.last_heartbeat or {}).get("page", 0)
        for page in range(start + 1, self.pages + 1):
            if ctx.attempt == 1 and page == self.stall:
                await asyncio.sleep(3600)  # silent: as if its process were stopped
            await asyncio.sleep(0.1)
            await ctx.heartbeat({"page": page})
        return {"pages": self.pages, "attempt": ctx.attempt}


async def _engine(settings: Settings, crunch: Crunch) -> AsyncIterator[Engine]:
    await store.apply_migrations(settings.database_url or "")
    stop, tasks = await start_engine(settings, {"crunch": crunch.crunch})
    conn = await store.connect(settings.database_url or "")
    try:
        engine = Engine(settings, conn)
        await engine.register(LONG)
        yield engine
    finally:
        await conn.close()
        stop.set()
        await stop_tasks(tasks)


@pytest.fixture
async def beating(settings: Settings) -> AsyncIterator[tuple[Engine, Crunch]]:
    crunch = Crunch(pages=30, stall=None)
    async for engine in _engine(settings, crunch):
        yield engine, crunch


@pytest.fixture
async def stalling(settings: Settings) -> AsyncIterator[tuple[Engine, Crunch]]:
    crunch = Crunch(pages=12, stall=6)
    async for engine in _engine(settings, crunch):
        yield engine, crunch


async def test_a_step_that_beats_outlives_its_heartbeat_timeout(
    beating: tuple[Engine, Crunch],
) -> None:
    engine, crunch = beating
    run = await engine.finished(await engine.submit("long"), timeout=30)
    assert run["status"] == "completed"
    assert run["output"] == {"crunch": {"pages": 30, "attempt": 1}}  # 3 s of a 1 s timeout
    assert crunch.resumed_from == [None]


async def test_a_silent_step_times_out_and_its_retry_resumes_from_the_last_beat(
    stalling: tuple[Engine, Crunch],
) -> None:
    engine, crunch = stalling
    started = asyncio.get_running_loop().time()
    run_id = await engine.submit("long")
    run = await engine.finished(run_id, timeout=30)
    took = asyncio.get_running_loop().time() - started
    assert run["status"] == "completed"
    assert run["output"] == {"crunch": {"pages": 12, "attempt": 2}}
    assert crunch.resumed_from == [None, {"page": 5}]
    retrying = [e for e in await engine.events(run_id) if e["type"] == "step.retrying"]
    assert retrying[0]["data"]["error"]["category"] == "heartbeat_timeout"
    assert took < 20  # far from the step's 1 min timeout
