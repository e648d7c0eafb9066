"""On the worker: a step that hands its work off reports `handed_off` (its completion token is
its attempt's token), and a beating step's heartbeats reach PostgreSQL, the first as it
starts, with the previous attempt's details handed to the next."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.tokens import AttemptTokens
from flowforge_orchestrator.queue.jobs import Job, JobKeys
from flowforge_orchestrator.worker.runtime import StepContext, WorkerRuntime
from tests.conftest import TEST_JOB_KEY
from tests.helpers import wait_for

seen: list[StepContext] = []


async def _handing_off(params: Any, ctx: StepContext) -> Any:
    seen.append(ctx)
    return ctx.hand_off()


async def _beating(params: Any, ctx: StepContext) -> Any:
    seen.append(ctx)
    start = ctx.last_heartbeat or {"page": 0}
    for page in range(start["page"] + 1, start["page"] + 4):
        await ctx.heartbeat({"page": page})
    return {"pages": page}


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[WorkerRuntime]:
    seen.clear()
    pool = await store.create_pool(settings.database_url or "", size=2)
    types = {"handing_off": _handing_off, "beating": _beating}
    worker = WorkerRuntime(settings, pool, types, JobKeys.parse(TEST_JOB_KEY))
    worker.start()
    try:
        yield worker
    finally:
        await worker.close()
        await pool.close()


async def _job(runtime: WorkerRuntime, step_type: str, **extra: Any) -> Job:
    attempt = uuid4()
    async with runtime.pool.acquire() as conn:
        tokens = AttemptTokens(await store.engine_secret(conn))
    return Job(
        attempt_id=attempt,
        run_id=uuid4(),
        step_id="s",
        type=step_type,
        attempt=1,
        params={},
        timeout=5.0,
        traceparent=None,
        secret_paths=(),
        token=tokens.token(attempt),
        **extra,
    )


async def test_a_step_that_hands_off_is_reported_handed_off_with_its_token(
    runtime: WorkerRuntime,
) -> None:
    job = await _job(runtime, "handing_off")
    assert await runtime.execute(job) == "handed_off"
    assert seen[0].completion_token == job.token.hex() and len(job.token.hex()) == 32
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT outcome, output, error FROM flowforge.step_results WHERE attempt_id = $1",
            job.attempt_id,
        )
    assert row is not None and tuple(row) == ("handed_off", None, None)


async def test_heartbeats_are_written_and_the_last_details_go_to_the_next_attempt(
    runtime: WorkerRuntime,
) -> None:
    job = await _job(runtime, "beating", heartbeat_timeout=0.4, last_heartbeat={"page": 10})
    assert await runtime.execute(job) == "succeeded"
    assert seen[0].last_heartbeat == {"page": 10}

    async def details() -> Any:
        async with runtime.pool.acquire() as conn:
            return await conn.fetchval(
                "SELECT details FROM flowforge.heartbeats WHERE attempt_id = $1", job.attempt_id
            )

    # The last beat is written even after the step ended: a retry would resume from it.
    async def last_written() -> bool:
        return bool(await details() == {"page": 13})

    await wait_for(last_written, message="the last heartbeat was not written")


async def test_a_step_without_a_heartbeat_timeout_may_beat_and_nothing_breaks(
    runtime: WorkerRuntime,
) -> None:
    job = await _job(runtime, "beating")
    assert await runtime.execute(job) == "succeeded"
