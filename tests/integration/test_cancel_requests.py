"""Cancellation by request rows (sql/0011): no lock on the run, handled once the run ends,
spent by a redrive, and seen by an orchestrator that missed the notification."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.client import enqueue, redrive
from flowforge_orchestrator.config import Settings
from tests.helpers import register_workflows, wait_for
from tests.integration.conftest import Engine, Steps, start_engine

HOLD = "name: held\nversion: 1\nsteps:\n  - {id: busy, type: hold, with: {}}\n"


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    c = await store.connect(db_url)
    try:
        await register_workflows(c, "w")
        yield c
    finally:
        await c.close()


async def _open_requests(conn: asyncpg.Connection, run_id: uuid.UUID) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM flowforge.cancel_requests"
            " WHERE run_id = $1 AND handled_at IS NULL",
            run_id,
        )
    )


async def test_requests_are_settled_once_their_run_has_ended(conn: asyncpg.Connection) -> None:
    ended = (await enqueue(conn, "w", {})).id
    running = (await enqueue(conn, "w", {})).id
    assert await store.request_cancel(conn, ended) == (True, "pending")
    assert await store.request_cancel(conn, running) == (True, "pending")
    orphan = uuid.uuid4()  # no foreign key: anything may be asked for
    await conn.execute(
        "INSERT INTO flowforge.cancel_requests (run_id, requested_at)"
        " VALUES ($1, now() - interval '2 hours'), ($2, now())",
        orphan,
        uuid.uuid4(),
    )
    await conn.execute("UPDATE flowforge.runs SET status = 'failed' WHERE id = $1", ended)

    assert await store.settle_cancel_requests(conn) == 2  # the ended run's, the old orphan
    assert await _open_requests(conn, ended) == 0
    assert await _open_requests(conn, running) == 1
    assert await _open_requests(conn, orphan) == 0
    # A finished run gets no new request.
    assert await store.request_cancel(conn, ended) == (False, "failed")
    assert await _open_requests(conn, ended) == 0


async def test_a_run_redriven_right_after_its_cancellation_runs_again(
    steps_engine: Engine, steps: Steps
) -> None:
    await steps_engine.register(HOLD)
    run_id = await steps_engine.submit("held")
    await wait_for(lambda: steps.started == ["busy"], message="busy never started")
    assert await store.request_cancel(steps_engine.conn, run_id, "wrong order") == (
        True,
        "running",
    )
    assert (await steps_engine.finished(run_id))["status"] == "cancelled"

    # At once, before any poll could settle the request: the redrive spends it.
    steps.release.set()
    await redrive(steps_engine.conn, run_id)
    assert await _open_requests(steps_engine.conn, run_id) == 0
    run = await steps_engine.finished(run_id)
    assert run["status"] == "completed", run["error"]
    reason = await steps_engine.conn.fetchval(
        "SELECT reason FROM flowforge.cancel_requests WHERE run_id = $1", run_id
    )
    assert reason == "wrong order"  # kept: who asked, and why


async def test_a_request_whose_notification_was_missed_is_found_by_the_poll(
    settings: Settings, steps: Steps, conn: asyncpg.Connection
) -> None:
    stop, tasks = await start_engine(settings, {"hold": steps.hold})
    try:
        engine = Engine(settings, conn)
        await engine.register(HOLD)
        run_id = await engine.submit("held")
        await wait_for(lambda: steps.started == ["busy"], message="busy never started")
        # Inserted with the trigger off, as if LISTEN had been down: only the poll sees it.
        async with conn.transaction():
            await conn.execute(
                "ALTER TABLE flowforge.cancel_requests DISABLE TRIGGER cancel_requests_notify"
            )
            await conn.execute("INSERT INTO flowforge.cancel_requests (run_id) VALUES ($1)", run_id)
            await conn.execute(
                "ALTER TABLE flowforge.cancel_requests ENABLE TRIGGER cancel_requests_notify"
            )
        run = await engine.finished(run_id)
        assert run["status"] == "cancelled"
        await wait_for(lambda: steps.aborted == ["busy"], message="the worker was not told")
        # The poll after the end marks the request handled.
        await wait_for(lambda: _no_open_requests(conn, run_id), message="the request stayed open")
    finally:
        steps.release.set()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _no_open_requests(conn: asyncpg.Connection, run_id: uuid.UUID) -> bool:
    return await _open_requests(conn, run_id) == 0
