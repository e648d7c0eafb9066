"""The worker's error paths, on a real PostgreSQL: a custom step's output over the limit, a
job for a type this worker does not serve, redaction that makes an output too large or
cannot walk it, a result write that fails for a reason nobody foresaw, and bounded retries
that give up.

`WorkerRuntime.execute` is called with a job as the queue would hand it over (verified
already: verification has tests of its own); the result it writes is read back.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID, uuid4

import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.errors import StoreError, TransientStoreError
from flowforge_orchestrator.queue.jobs import Job, JobKeys
from flowforge_orchestrator.worker.runtime import StepContext, WorkerRuntime
from tests.conftest import TEST_JOB_KEY
from tests.helpers import free_port

SECRET = "s3cr3t-8"  # shorter than "[REDACTED]": redaction makes text longer


async def _big(params: Any, ctx: StepContext) -> Any:
    return {"blob": "x" * (ctx.settings.max_output_bytes + 1)}


async def _echo_secret(params: Any, ctx: StepContext) -> Any:
    # Just under the limit, but holding the secret many times: redaction makes it longer.
    room = ctx.settings.max_output_bytes - 100
    return {"text": (SECRET + " ") * (room // (len(SECRET) + 1))}


async def _deep(params: Any, ctx: StepContext) -> Any:
    value: Any = SECRET
    for _ in range(5000):
        value = [value]
    return value


async def _fine(params: Any, ctx: StepContext) -> Any:
    return {"ok": True}


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[WorkerRuntime]:
    await store.apply_migrations(settings.database_url or "")
    pool = await store.create_pool(settings.database_url or "", size=2)
    types = {"big": _big, "echo_secret": _echo_secret, "deep": _deep, "fine": _fine}
    worker = WorkerRuntime(
        settings, pool, types, JobKeys.parse(TEST_JOB_KEY), secrets={"TOKEN": SECRET}
    )
    try:
        yield worker
    finally:
        await worker.close()
        await pool.close()


def _job(step_type: str) -> Job:
    return Job(
        attempt_id=uuid4(),
        run_id=uuid4(),
        step_id="s",
        type=step_type,
        attempt=1,
        params={},
        timeout=5.0,
        traceparent=None,
        secret_paths=(),
        token=bytes(16),
    )


async def _stored(runtime: WorkerRuntime, attempt: UUID) -> dict[str, Any]:
    async with runtime.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT outcome, output, error FROM flowforge.step_results WHERE attempt_id = $1",
            attempt,
        )
    assert row is not None
    return dict(row)


async def test_a_custom_steps_output_over_the_limit_fails_its_attempt(
    runtime: WorkerRuntime,
) -> None:
    job = _job("big")
    assert await runtime.execute(job) == "failed"
    stored = await _stored(runtime, job.attempt_id)
    assert stored["output"] is None
    assert stored["error"]["category"] == "payload_too_large"
    assert stored["error"]["retryable"] is False


async def test_a_job_for_a_type_this_worker_lacks_fails_without_retry(
    runtime: WorkerRuntime,
) -> None:
    job = _job("not_here")
    assert await runtime.execute(job) == "failed"
    error = (await _stored(runtime, job.attempt_id))["error"]
    assert (error["category"], error["retryable"]) == ("unknown_step_type", False)
    assert "not_here" in error["message"]


async def test_an_output_that_redaction_makes_too_large_fails(runtime: WorkerRuntime) -> None:
    job = _job("echo_secret")
    assert await runtime.execute(job) == "failed"
    stored = await _stored(runtime, job.attempt_id)
    assert stored["error"]["category"] == "payload_too_large"
    assert SECRET not in str(stored)


async def test_an_output_too_deep_to_check_for_secrets_fails(runtime: WorkerRuntime) -> None:
    job = _job("deep")
    assert await runtime.execute(job) == "failed"
    stored = await _stored(runtime, job.attempt_id)
    assert stored["error"]["category"] == "invalid_output"
    assert SECRET not in str(stored)


async def test_a_result_write_failing_for_an_unforeseen_reason_is_tried_again(
    runtime: WorkerRuntime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug or a driver error nobody foresaw while writing results: the batch is kept and
    written again; the attempt's result is stored once."""
    caplog.set_level(logging.ERROR)
    original = store.insert_results
    failures: list[int] = []

    async def fails_once(conn: store.Connection, rows: Any) -> int:
        if not failures:
            failures.append(len(rows))
            raise RuntimeError("an unforeseen failure")
        return await original(conn, rows)

    monkeypatch.setattr(store, "insert_results", fails_once)
    job = _job("fine")
    assert await runtime.execute(job) == "succeeded"
    assert (await _stored(runtime, job.attempt_id))["output"] == {"ok": True}
    assert failures == [1]
    assert any("trying again" in r.getMessage() for r in caplog.records)


async def test_bounded_retries_give_up_with_a_transient_store_error() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    calls = 0

    async def connect() -> None:
        nonlocal calls
        calls += 1
        await store.connect(url)

    with pytest.raises(TransientStoreError, match="database unavailable"):
        await store.retrying(connect, what="connecting", attempts=3, base=0.001)
    assert calls == 3


async def test_a_database_error_that_is_not_transient_is_not_retried(db_url: str) -> None:
    conn = await store.connect(db_url)
    calls = 0

    async def bad_sql() -> None:
        nonlocal calls
        calls += 1
        await conn.execute("SELECT * FROM no_such_table")

    try:
        with pytest.raises(StoreError, match="no_such_table") as caught:
            await store.retrying(bad_sql, what="reading", attempts=5)
    finally:
        await conn.close()
    assert calls == 1
    assert not isinstance(caught.value, TransientStoreError)
