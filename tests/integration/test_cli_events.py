"""`events send` and `events complete`: rows as the API would insert them, clear errors."""

from __future__ import annotations

import json
import uuid

from flowforge_orchestrator import store
from flowforge_orchestrator.client import enqueue
from flowforge_orchestrator.config import Settings
from tests.helpers import register_workflows, wait_for
from tests.integration.cli_helpers import Cli, cli
from tests.integration.conftest import Engine

__all__ = ["cli"]  # the fixture


async def test_events_send_by_run_and_by_key_and_refuses_what_cannot_be_sent(
    cli: Cli, settings: Settings
) -> None:
    conn = await store.connect(settings.database_url or "")
    try:
        await register_workflows(conn, "anything")
        run = (await enqueue(conn, "anything", {})).id
        sent = await cli("events", "send", "approved", "--run", str(run), "--data", '{"by": "ann"}')
        assert sent.code == 0 and sent.out.startswith("event ") and sent.out.endswith(" sent\n")
        keyed = await cli("events", "send", "paid", "--key", "order-9")
        assert keyed.code == 0
        rows = await conn.fetch(
            "SELECT run_id, name, key, payload::text FROM flowforge.events ORDER BY id"
        )
        assert [tuple(r) for r in rows] == [
            (run, "approved", None, '{"by": "ann"}'),
            (None, "paid", "order-9", "{}"),
        ]

        missing = uuid.uuid4()
        unknown = await cli("events", "send", "approved", "--run", str(missing))
        assert unknown.code == 2 and f"there is no run {missing}" in unknown.err
        both = await cli("events", "send", "x", "--run", str(run), "--key", "k")
        assert both.code == 2 and "one of them" in both.err
        bad = await cli("events", "send", "x", "--key", "k", "--data", "{oops")
        assert bad.code == 2 and "--data is not valid JSON" in bad.err

        attempt = uuid.uuid4()
        done = await cli("events", "complete", str(attempt), "ab" * 16, "--output", '{"n": 1}')
        assert done.code == 0 and "stored" in done.out
        failed = await cli(
            "events", "complete", str(attempt), "ab" * 16, "--error", '{"message": "declined"}'
        )
        assert failed.code == 0
        not_object = await cli("events", "complete", str(attempt), "t", "--error", '"declined"')
        assert not_object.code == 2 and "JSON object" in not_object.err
        stored = await conn.fetch(
            "SELECT output::text, error::text FROM flowforge.step_completions ORDER BY id"
        )
        assert [tuple(r) for r in stored] == [
            ('{"n": 1}', None),
            (None, json.dumps({"message": "declined"})),
        ]
    finally:
        await conn.close()


WAITING = """
name: waiting
version: 1
steps:
  - {id: approval, type: wait, event: approved, key: "input.ticket", timeout: 1h}
"""


async def test_runs_show_lists_open_waits_and_events_no_wait_took(
    steps_engine: Engine, cli: Cli
) -> None:
    await steps_engine.register(WAITING)
    run_id = await steps_engine.submit("waiting", {"ticket": "T-9"})

    async def waiting() -> bool:
        return any(e["type"] == "step.waiting" for e in await steps_engine.events(run_id))

    await wait_for(waiting, message="the run never waited")
    await cli("events", "send", "reminder", "--run", str(run_id), "--data", '{"n": 1}')
    shown = await cli("runs", "show", str(run_id))
    assert shown.code == 0
    waits = shown.out.split("waiting:\n", 1)[1]
    assert waits.startswith("  approval") and 'event approved key "T-9" until ' in waits
    assert "events not taken:" in shown.out and "reminder" in shown.out and '{"n": 1}' in shown.out
