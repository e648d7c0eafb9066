"""The worker's batched result writes against a real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.core.records import StepResult
from flowforge_orchestrator.errors import StoreError
from flowforge_orchestrator.worker.results import Pending, ResultWriter

NOW = datetime(2024, 5, 1, tzinfo=UTC)


def result(
    output: object = None, attempt: UUID | None = None, token: bytes = bytes(16)
) -> StepResult:
    return StepResult(
        attempt or uuid4(), "s", "succeeded", output, None, NOW, NOW, "w-1", uuid4(), token
    )


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[store.Pool]:
    pool = await store.create_pool(db_url, size=4)
    yield pool
    await pool.close()


@pytest.fixture
def long_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """A coalescing window far longer than any test's deadline."""
    monkeypatch.setattr("flowforge_orchestrator.worker.results.COALESCE", 60.0)


async def test_results_finishing_together_share_transactions_and_each_waits_for_its_own(
    pool: store.Pool,
) -> None:
    writer = ResultWriter(pool)
    stored_on_return: list[bool] = []

    async def write(r: StepResult) -> None:
        await writer.write(r)
        async with pool.acquire() as conn:  # acknowledged: it must be durable already
            stored_on_return.append(
                bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM flowforge.step_results WHERE attempt_id = $1",
                        r.attempt_id,
                    )
                )
            )

    try:
        results = [result({"n": i}) for i in range(200)]
        await asyncio.gather(*(write(r) for r in results))
        async with pool.acquire() as conn:
            stored = await conn.fetchval("SELECT count(*) FROM flowforge.step_results")
            # Each row carries the id of the transaction that wrote it: count those.
            commits = await conn.fetchval(
                "SELECT count(DISTINCT xmin::text) FROM flowforge.step_results"
            )
        assert stored == 200
        assert stored_on_return == [True] * 200
        assert commits <= 4, f"{commits} transactions for 200 results written together"
    finally:
        await writer.close()


async def test_a_result_the_database_refuses_is_refused_alone(pool: store.Pool) -> None:
    writer = ResultWriter(pool)
    try:
        good = [result({"ok": i}) for i in range(5)]
        bad = result({"text": "nul \u0000 byte"})  # JSONB cannot hold a NUL character
        outcomes = await asyncio.gather(
            *(writer.write(r) for r in [*good, bad]), return_exceptions=True
        )
        assert outcomes[:5] == [None] * 5
        assert isinstance(outcomes[5], StoreError)
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM flowforge.step_results") == 5
    finally:
        await writer.close()


async def test_closing_fails_what_was_never_written(pool: store.Pool) -> None:
    writer = ResultWriter(pool)
    pending = Pending(result())
    writer._queue.append(pending)  # queued, never flushed: the writer task never started
    await writer.close()
    with pytest.raises(StoreError, match="stopped before writing"):
        await pending.done


async def test_a_result_nobody_else_can_join_is_written_at_once(
    pool: store.Pool, long_window: None
) -> None:
    # Only "nothing else is executing" can explain a prompt write.
    writer = ResultWriter(pool, in_progress=lambda: 1)  # its own job only
    try:
        await asyncio.wait_for(writer.write(result()), 10)
    finally:
        await writer.close()


async def test_a_result_waits_for_the_attempts_still_executing_and_shares_their_commit(
    pool: store.Pool, long_window: None
) -> None:
    # Two jobs held: this result's, and another one still executing.
    writer = ResultWriter(pool, in_progress=lambda: 2)
    try:
        first = asyncio.ensure_future(writer.write(result()))
        async with pool.acquire() as conn:  # a round trip: the writer had its chance
            assert await conn.fetchval("SELECT count(*) FROM flowforge.step_results") == 0
        assert not first.done()  # the other attempt may still join
        await asyncio.wait_for(asyncio.gather(first, writer.write(result())), 10)
        async with pool.acquire() as conn:
            commits = await conn.fetch("SELECT DISTINCT xmin::text FROM flowforge.step_results")
        assert len(commits) == 1  # one transaction for both
    finally:
        await writer.close()


async def test_a_row_under_another_token_never_stands_in_the_way_of_the_real_one(
    pool: store.Pool,
) -> None:
    writer = ResultWriter(pool)
    try:
        attempt = uuid4()
        forged, real = bytes(16), bytes(range(16))
        await writer.write(result({"forged": True}, attempt, forged))  # guessed the id first
        await writer.write(result({"real": True}, attempt, real))
        await writer.write(result({"again": True}, attempt, real))  # a duplicate delivery
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT token, output FROM flowforge.step_results WHERE attempt_id = $1"
                " ORDER BY token",
                attempt,
            )
        assert [(bytes(r["token"]), r["output"]) for r in rows] == [
            (forged, {"forged": True}),
            (real, {"real": True}),
        ]
    finally:
        await writer.close()
