"""Rows the engine cannot use fail their own run, with the reason, and nothing else:
a run pinned to a version nobody registered, a stored definition that no longer parses,
a notification whose payload is not what the triggers send."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from tests.integration.conftest import Engine

OK = "name: ok\nversion: 1\nsteps:\n  - {id: a, type: transform, output: {n: 1}}\n"


async def test_a_run_pinned_to_an_unregistered_version_fails_alone(engine: Engine) -> None:
    await engine.register(OK)
    insert = (
        "INSERT INTO flowforge.runs (workflow_name, workflow_version, input)"
        " VALUES ('ok', 7, '{}') RETURNING id"
    )
    # The insert trigger refuses it (sql/0014)...
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="'ok' version 7 is not registered"):
        await engine.conn.fetchval(insert)
    # ...and a row written behind the triggers' back (a restore, a hand edit) still fails
    # alone at its claim.
    async with engine.conn.transaction():
        await engine.conn.execute("SET LOCAL session_replication_role = replica")
        lost = await engine.conn.fetchval(insert)
    fine = await engine.submit("ok")

    run = await engine.finished(lost)
    assert run["status"] == "failed"
    assert run["error"]["message"] == "workflow 'ok' version 7 is not registered"
    assert run["error"]["category"] == "definition_error"
    assert [e["type"] for e in await engine.events(lost)] == ["workflow.failed"]
    assert (await engine.finished(fine))["status"] == "completed"


async def test_a_stored_definition_that_no_longer_parses_fails_its_runs_with_the_reason(
    engine: Engine,
) -> None:
    await engine.register(OK)
    await engine.register(OK.replace("name: ok", "name: other"))
    # Written behind the engine's back (a hand edit, a bad migration): no longer valid.
    await engine.conn.execute(
        "UPDATE flowforge.workflow_definitions SET spec = jsonb_set(spec, '{steps}', '7')"
        " WHERE name = 'ok'"
    )
    broken = [await engine.submit("ok") for _ in range(2)]
    fine = await engine.submit("other")

    for run_id in broken:
        run = await engine.finished(run_id)
        assert run["status"] == "failed"
        assert run["error"]["category"] == "definition_error"
        message = run["error"]["message"]
        assert message.startswith("the stored definition of 'ok' version 1 is invalid:")
        assert "steps" in message  # names the field at fault
    assert (await engine.finished(fine))["status"] == "completed"


async def test_notifications_with_payloads_the_triggers_never_send_are_ignored(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await engine.register(OK)
    first = await engine.submit("ok")
    assert (await engine.finished(first))["status"] == "completed"
    # A handler that choked on these would be reported by asyncio (asyncpg runs it as a
    # callback) or by a loop of the orchestrator; either is logged.
    await engine.conn.execute("SELECT pg_notify('flowforge_results', 'not-a-uuid,,42')")
    await engine.conn.execute("SELECT pg_notify('flowforge_cancel', 'not-a-uuid')")
    await engine.conn.execute(
        "SELECT pg_notify('flowforge_cancel', '00000000-0000-0000-0000-000000000000')"
    )
    second = await engine.submit("ok")
    assert (await engine.finished(second))["status"] == "completed"
    assert [f"{r.name}: {r.getMessage()}" for r in caplog.records] == []
