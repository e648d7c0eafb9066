"""Workers wake when a job is enqueued, not only when their poll comes round."""

from __future__ import annotations

import asyncio

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from tests.integration.conftest import Engine, Steps, start_engine


async def test_a_worker_with_a_long_poll_delay_still_starts_a_step_at_once(
    settings: Settings, steps: Steps
) -> None:
    # A poll every 30 s: only the wake message can explain a prompt start.
    settings = settings.model_copy(update={"worker_poll_delay": 30.0})
    await store.apply_migrations(settings.database_url or "")
    stop, tasks = await start_engine(settings, {"echo": steps.echo})
    conn = await store.connect(settings.database_url or "")
    try:
        engine = Engine(settings, conn)
        await engine.register(
            "name: quick\nversion: 1\nsteps:\n  - {id: a, type: echo, with: {}}\n"
            "  - {id: b, type: echo, depends_on: [a], with: {}}\n"
        )
        # Polling alone needs a 30 s poll per handoff; the deadline is 20 s for both.
        run = await engine.finished(await engine.submit("quick"), timeout=20)
        assert run["status"] == "completed", run["error"]
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await conn.close()
