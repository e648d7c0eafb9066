"""Retention (engine/retention.py): finished runs past FLOWFORGE_RUN_RETENTION go with their
rows, open runs never; events wait for every registered consumer, at most
FLOWFORGE_OUTBOX_MAX_AGE more."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from uuid import UUID

import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.client import read_outbox, register_consumer
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.engine.retention import Retention
from flowforge_orchestrator.ops.metrics import OrchestratorMetrics, new_registry
from tests.helpers import poll, register_workflows, wait_for
from tests.integration.conftest import Engine

INLINE = """
name: inline
version: 1
steps:
  - {id: double, type: transform, output: "${{ input.n * 2 }}"}
"""

HELD = """
name: held
version: 1
max_concurrency: 1
steps:
  - {id: wait, type: hold, with: {}}
"""

ECHO = """
name: echoed
version: 1
steps:
  - {id: say, type: echo, with: {n: "${{ input.n }}"}}
"""


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The engine under test deletes finished runs two seconds after they end."""
    return settings.model_copy(update={"run_retention": 2.0, "outbox_max_age": 3600.0})


async def _rows(conn: store.Connection, run_id: UUID) -> dict[str, int]:
    row = await conn.fetchrow(
        """SELECT (SELECT count(*) FROM flowforge.runs WHERE id = $1) AS runs,
                  (SELECT count(*) FROM flowforge.outbox WHERE run_id = $1) AS outbox,
                  (SELECT count(*) FROM flowforge.step_results WHERE run_id = $1) AS results,
                  (SELECT count(*) FROM flowforge.cancel_requests WHERE run_id = $1) AS cancels
        """,
        run_id,
    )
    assert row is not None
    return dict(row)


async def _gone(conn: store.Connection, run_id: UUID) -> bool:
    return sum((await _rows(conn, run_id)).values()) == 0


def _is_gone(conn: store.Connection, run_id: UUID) -> Callable[[], Awaitable[bool]]:
    async def gone() -> bool:
        return await _gone(conn, run_id)

    return gone


async def test_finished_runs_go_with_their_rows_open_runs_stay(steps_engine: Engine) -> None:
    engine = steps_engine
    await engine.register(ECHO)
    await engine.register(HELD)
    running = await engine.submit("held")
    await wait_for(lambda: _status_is(engine, running, "running"), message="held run never started")
    pending = await engine.submit("held")  # waits for the concurrency slot
    done = [await engine.submit("echoed", {"n": n}) for n in range(5)]
    cancelled = await engine.submit("echoed", {"n": 9})
    await engine.conn.execute(
        "INSERT INTO flowforge.cancel_requests (run_id, reason) VALUES ($1, 'test')", cancelled
    )
    for run_id in [*done, cancelled]:
        await engine.finished(run_id)
        rows = await _rows(engine.conn, run_id)
        assert rows["runs"] == 1 and rows["outbox"] >= 2
    assert (await _rows(engine.conn, done[0]))["results"] == 1
    for run_id in [*done, cancelled]:
        await wait_for(_is_gone(engine.conn, run_id), timeout=10, message="run stayed")
    assert (await engine.run(running))["status"] == "running"
    assert (await engine.run(pending))["status"] == "pending"
    assert (await _rows(engine.conn, running))["outbox"] > 0


async def _status_is(engine: Engine, run_id: UUID, status: str) -> bool:
    return bool((await engine.run(run_id))["status"] == status)


async def test_events_stay_until_every_consumer_has_read_them(engine: Engine) -> None:
    await engine.register(INLINE)
    await register_consumer(engine.conn, "fast")
    await register_consumer(engine.conn, "slow")
    run_id = await engine.submit("inline", {"n": 1})
    await engine.finished(run_id)
    while await read_outbox(engine.conn, "fast", 100):
        pass
    # Retention is 2 s and ticks every 0.5 s: 4 s is twice what the run would need.
    assert not await poll(_is_gone(engine.conn, run_id), timeout=4)
    assert (await _rows(engine.conn, run_id))["outbox"] >= 3
    while await read_outbox(engine.conn, "slow", 1):
        pass
    await wait_for(_is_gone(engine.conn, run_id), timeout=5, message="read run stayed")


async def test_a_stuck_consumer_holds_back_at_most_the_max_age(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    await engine.register(INLINE)
    await register_consumer(engine.conn, "stuck")
    run_id = await engine.submit("inline", {"n": 1})
    await engine.finished(run_id)
    events = (await _rows(engine.conn, run_id))["outbox"]
    metrics = OrchestratorMetrics(new_registry(process=False))
    pool = await store.create_pool(engine.settings.database_url or "", size=2)
    # The engine's own retention (2 s, max age 1 h) waits for "stuck"; this one gives up
    # after 2 s + 1 s.
    strict = engine.settings.model_copy(update={"run_retention": 2.0, "outbox_max_age": 1.0})
    retention = Retention(pool, strict, metrics, interval=0.1)
    try:
        await retention.tick()
        assert (await _rows(engine.conn, run_id))["runs"] == 1  # too young
        with caplog.at_level(logging.WARNING, logger="flowforge_orchestrator.engine.retention"):

            async def deleted() -> bool:
                await retention.tick()
                return await _gone(engine.conn, run_id)

            await wait_for(deleted, timeout=10, interval=0.1, message="run was never deleted")
        assert "'stuck' had not read" in caplog.text
        lag = {c.name: c for c in await store.consumer_lags(engine.conn)}["stuck"]
        assert lag.lost_events == events and lag.lost_at is not None
        assert lag.events_behind == 0  # nothing left to read: it is gone
        lost = metrics.registry.get_sample_value(
            "flowforge_outbox_consumer_lost_events_total", {"consumer": "stuck"}
        )
        assert lost == events
        assert (
            metrics.registry.get_sample_value(
                "flowforge_retention_deleted_rows_total", {"table": "runs"}
            )
            == 1
        )
        assert (
            metrics.registry.get_sample_value(
                "flowforge_outbox_consumer_lag_events", {"consumer": "stuck"}
            )
            == 0
        )
    finally:
        await pool.close()


async def test_zero_keeps_everything_and_lag_is_sampled(settings: Settings) -> None:
    """No engine here: a run made finished long ago by hand, and retention set to 0."""
    metrics = OrchestratorMetrics(new_registry(process=False))
    pool = await store.create_pool(settings.database_url or "", size=2)
    forever = settings.model_copy(update={"run_retention": 0.0})
    try:
        async with pool.acquire() as conn:
            await register_workflows(conn, "x")
            run_id = await conn.fetchval(
                "INSERT INTO flowforge.runs (workflow_name) VALUES ('x') RETURNING id"
            )
            await conn.execute(
                "UPDATE flowforge.runs SET status = 'completed',"
                " finished_at = now() - interval '1000 days' WHERE id = $1",
                run_id,
            )
            await register_consumer(conn, "relay")
            retention = Retention(pool, forever, metrics)
            assert await retention.tick() == 0
            assert (await _rows(conn, run_id))["runs"] == 1
            behind = metrics.registry.get_sample_value(
                "flowforge_outbox_consumer_lag_events", {"consumer": "relay"}
            )
            assert behind == 0
            await conn.execute("DELETE FROM flowforge.outbox_consumers")
            await retention.tick()
            gone = metrics.registry.get_sample_value(
                "flowforge_outbox_consumer_lag_events", {"consumer": "relay"}
            )
            assert gone is None
            # The same run under a 1 s retention goes at the first tick.
            brief = settings.model_copy(update={"run_retention": 1.0})
            assert await Retention(pool, brief, metrics).tick() == 1
            assert await _gone(conn, run_id)
    finally:
        await pool.close()


async def test_a_run_whose_rows_are_locked_delays_only_itself(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone holds a lock on one finished run's history: retention deletes the other runs,
    names the one it could not delete, and deletes it once the lock is gone."""
    metrics = OrchestratorMetrics(new_registry(process=False))
    pool = await store.create_pool(settings.database_url or "", size=2, lock_timeout=0.2)
    holder = await store.connect(settings.database_url or "")
    brief = settings.model_copy(update={"run_retention": 1.0})
    try:
        async with pool.acquire() as conn:
            await register_workflows(conn, "x")
            run_ids = [
                await conn.fetchval(
                    "INSERT INTO flowforge.runs (workflow_name) VALUES ('x') RETURNING id"
                )
                for _ in range(3)
            ]
            await conn.execute(
                "UPDATE flowforge.runs SET status = 'completed',"
                " finished_at = now() - interval '1 day'"
            )
            await conn.executemany(
                "INSERT INTO flowforge.outbox (run_id, seq, type, time, data, to_status)"
                " VALUES ($1, 1, 'workflow.completed', now(), '{}', 'completed')",
                [(r,) for r in run_ids],
            )
        locked = run_ids[1]
        held = holder.transaction()
        await held.start()
        await holder.execute("SELECT * FROM flowforge.outbox WHERE run_id = $1 FOR UPDATE", locked)
        retention = Retention(pool, brief, metrics)
        with caplog.at_level(logging.WARNING, logger="flowforge_orchestrator.engine.retention"):
            assert await retention.tick() == 2
        assert f"could not delete run {locked}" in caplog.text
        async with pool.acquire() as conn:
            assert [await _gone(conn, r) for r in run_ids] == [True, False, True]
            await held.rollback()
            assert await retention.tick() == 1
            assert await _gone(conn, locked)
    finally:
        await holder.close()
        await pool.close()
