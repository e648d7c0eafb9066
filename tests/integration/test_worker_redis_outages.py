"""Redis outages shorter than FLOWFORGE_WORKER_REDIS_GIVE_UP are ridden out by the worker, in
process, with a real Redis stopped and started again (tests/e2e/test_worker_redis_give_up.py:
a longer one ends the worker process with code 3)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.local_services import LocalRedis
from tests.helpers import stop_tasks, wait_for
from tests.integration.conftest import Engine, Steps, start_engine

GIVE_UP = 5.0
OUTAGE = 1.5  # seconds each outage lasts: four of them last longer than GIVE_UP in all
LATE = "name: late\nversion: 1\nsteps:\n  - {id: a, type: echo, with: {n: 1}}\n"


@pytest.fixture
def own_redis() -> Iterator[LocalRedis]:
    server = LocalRedis(durable=False).start()
    try:
        yield server
    finally:
        server.stop()


async def test_an_outage_shorter_than_the_give_up_is_ridden_out(
    settings: Settings, steps: Steps, own_redis: LocalRedis, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings.model_copy(
        update={"redis_url": own_redis.url, "worker_redis_give_up": GIVE_UP}
    )
    await store.apply_migrations(settings.database_url or "")
    conn = await store.connect(settings.database_url or "")
    stop, tasks = await start_engine(settings, {"echo": steps.echo})
    caplog.set_level(logging.WARNING, logger="flowforge_orchestrator.worker.runtime")
    try:
        engine = Engine(settings, conn)
        await engine.register(LATE)
        for outage in range(4):
            own_redis._stop_process()  # down, keeping the port
            await wait_for(lambda: not own_redis.pid, message="Redis did not stop")
            await asyncio.sleep(OUTAGE)  # the outage itself: what the worker must outlast
            own_redis.start()
            run = await engine.finished(await engine.submit("late"), timeout=10)
            assert run["status"] == "completed", (outage, run["error"])
        assert all(not task.done() for task in tasks)  # the worker did not give up
        assert "Redis failed" in caplog.text  # it did lose Redis
    finally:
        stop.set()
        try:
            await stop_tasks(tasks)
        finally:
            await conn.close()
