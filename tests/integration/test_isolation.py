"""Blast radius of one: a run whose data the database refuses, whose row someone else
locks, or whose input cannot be used fails (or waits) alone; fifty good runs submitted with
it complete, and the daemon logs one error for it, not one per poll.

Real PostgreSQL, Redis and worker. The faults are real too: a trigger that refuses one
run's rows, a row lock held by another session, rows left behind by a deleted run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from uuid import UUID, uuid4

import asyncpg
import pytest

from flowforge_orchestrator import store
from tests.helpers import register_workflows, wait_for
from tests.integration.conftest import Engine, Steps

GOOD = """
name: good
version: 1
steps:
  - {id: a, type: echo, with: {n: "${{ input.n }}"}}
  - {id: b, type: transform, depends_on: [a], output: "${{ steps.a.output.n }}"}
"""

# The same shape under another name: the bad run and the good ones share nothing but the
# engine (the good runs are of this workflow and of `good`).
OTHER = GOOD.replace("name: good", "name: other")

# Runs of these must never reach a step: their input is refused at claim.
NEVER_STARTS = """
name: {name}
version: 1
steps:
  - {{id: never, type: echo, with: {{}}}}
"""

HOLD = """
name: held
version: 1
steps:
  - {id: h, type: hold, with: {}}
  - {id: after, type: transform, depends_on: [h], output: done}
"""

GATED = """
name: gated
version: 1
steps:
  - {id: a, type: gate, with: {n: "${{ input.n }}"}}
  - {id: b, type: transform, depends_on: [a], output: "${{ steps.a.output.n }}"}
"""

GOOD_RUNS = 50


async def _submit_good(engine: Engine, count: int = GOOD_RUNS) -> list[UUID]:
    ids = []
    for n in range(count):
        ids.append(await engine.submit("good" if n % 2 else "other", {"n": n}))
    return ids


async def _all_completed(engine: Engine, ids: list[UUID], timeout: float = 30.0) -> float:
    """Wait until every run completed; return how long it took (for the log, not asserted)."""
    started = time.monotonic()

    async def done() -> bool:
        rows = await engine.conn.fetch(
            "SELECT status FROM flowforge.runs WHERE id = ANY($1::uuid[])", ids
        )
        return len(rows) == len(ids) and all(r["status"] == "completed" for r in rows)

    await wait_for(done, timeout=timeout, message="the good runs did not all complete")
    return time.monotonic() - started


def _errors_about(caplog: pytest.LogCaptureFixture, run_id: UUID) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR
        and (str(run_id) in r.getMessage() or getattr(r, "run_id", None) == str(run_id))
    ]


async def _register_all(engine: Engine) -> None:
    await engine.register(GOOD)
    await engine.register(OTHER)


async def _poison(conn: asyncpg.Connection, run_id: UUID, types: tuple[str, ...]) -> None:
    """Make the database refuse the outbox rows holding events of these types for one run
    (a row holds a commit's events of the run: sql/0017)."""
    await conn.execute(
        f"""
        CREATE FUNCTION flowforge.poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.run_id = '{run_id}' AND EXISTS (
                SELECT FROM flowforge.outbox_unpack(NEW.events, NEW.seq, NEW.position, NEW.time) u
                WHERE u.type = ANY(ARRAY{list(types)!r}::text[])) THEN
                RAISE EXCEPTION 'poisoned row of run %', NEW.run_id
                    USING ERRCODE = 'data_exception';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER poison BEFORE INSERT ON flowforge.outbox_packed
            FOR EACH ROW EXECUTE FUNCTION flowforge.poison();
        """
    )


async def test_a_run_refused_at_claim_fails_alone_and_the_others_complete(
    steps_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await _register_all(steps_engine)
    bad = uuid4()
    await _poison(steps_engine.conn, bad, ("workflow.started",))
    # The bad run is enqueued first, so the first claim batch holds it with the good ones.
    await steps_engine.submit("good", {"n": -1}, run_id=bad)
    good = await _submit_good(steps_engine)

    took = await _all_completed(steps_engine, good)

    run = await steps_engine.finished(bad)
    assert run["status"] == "failed"
    assert run["error"]["category"] == "storage_error"
    assert "poisoned row" in run["error"]["message"]
    assert [e["type"] for e in await steps_engine.events(bad)] == ["workflow.failed"]
    assert len(_errors_about(caplog, bad)) == 1, _errors_about(caplog, bad)
    logging.getLogger(__name__).info("good runs completed in %.2fs beside the bad one", took)


async def test_a_run_refused_mid_way_fails_after_its_last_stored_transition(
    steps_engine: Engine, steps: Steps, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await steps_engine.register(GATED)
    bad = uuid4()
    # Its transform's success cannot be stored; everything before it was.
    await _poison(steps_engine.conn, bad, ("step.succeeded",))
    await steps_engine.submit("gated", {"n": -1}, run_id=bad)
    good = [await steps_engine.submit("gated", {"n": n}) for n in range(20)]
    # Every first step held, then let go at once: their results arrive together, so the
    # commit that the bad run's refused write is part of holds good runs too.
    await wait_for(lambda: len(steps.started) == 21, message="not every step started")
    steps.gate_open.set()

    await _all_completed(steps_engine, good)

    run = await steps_engine.finished(bad)
    assert run["status"] == "failed", run
    assert run["error"]["category"] == "storage_error"
    events = await steps_engine.events(bad)
    assert [e["type"] for e in events] == [
        "workflow.started",
        "step.dispatched",
        "workflow.failed",
    ]
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert len(_errors_about(caplog, bad)) == 1, _errors_about(caplog, bad)


async def test_a_run_whose_failure_cannot_be_stored_is_set_apart(
    steps_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await _register_all(steps_engine)
    bad = uuid4()
    await _poison(steps_engine.conn, bad, ("step.succeeded", "workflow.failed"))
    await steps_engine.submit("good", {"n": -1}, run_id=bad)
    good = await _submit_good(steps_engine)

    await _all_completed(steps_engine, good)
    # Its one error says why, and that it is left alone: not one error per poll.
    await wait_for(lambda: _errors_about(caplog, bad), message="no error about the bad run")
    # As if its lease had run out: a claim could take it again, and must not. The late
    # runs are claimed after this, so a claim that took the bad run too would have moved
    # its epoch by the time they complete.
    epoch = await steps_engine.conn.fetchval(
        "UPDATE flowforge.runs SET lease_expires_at = now() - interval '1 second'"
        " WHERE id = $1 RETURNING epoch",
        bad,
    )
    late = await _submit_good(steps_engine, 4)  # the engine goes on serving
    await _all_completed(steps_engine, late)
    again = await steps_engine.conn.fetchval("SELECT epoch FROM flowforge.runs WHERE id = $1", bad)
    assert again == epoch, "the run set apart was claimed again"

    errors = _errors_about(caplog, bad)
    assert len(errors) == 1, errors
    assert "leaves it as it is" in errors[0]
    assert (await steps_engine.run(bad))["status"] == "running"


async def test_a_deleted_run_takes_its_rows_and_its_id_starts_afresh(
    steps_engine: Engine,
) -> None:
    await _register_all(steps_engine)
    run_id = uuid4()
    await steps_engine.submit("good", {"n": 1}, run_id=run_id)
    assert (await steps_engine.finished(run_id))["output"] == {"b": 1}

    await steps_engine.conn.execute("DELETE FROM flowforge.runs WHERE id = $1", run_id)
    left = await steps_engine.conn.fetchval(
        "SELECT (SELECT count(*) FROM flowforge.outbox WHERE run_id = $1)"
        " + (SELECT count(*) FROM flowforge.step_results WHERE run_id = $1)",
        run_id,
    )
    assert left == 0

    await steps_engine.submit("good", {"n": 2}, run_id=run_id)
    run = await steps_engine.finished(run_id)
    assert run["status"] == "completed"
    assert run["output"] == {"b": 2}  # its own output, not the deleted run's
    events = await steps_engine.events(run_id)
    assert [e["type"] for e in events].count("workflow.started") == 1
    assert events[0]["seq"] == 1


async def test_rows_left_by_another_run_under_the_same_id_fail_that_run_alone(
    steps_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """History rows the delete did not take (written around it by hand): the new run's
    first transition collides with them; it fails after them, the others go on."""
    caplog.set_level(logging.WARNING)
    await _register_all(steps_engine)
    bad = uuid4()
    await steps_engine.conn.execute(
        "INSERT INTO flowforge.outbox (run_id, seq, type, time, data, to_status)"
        " VALUES ($1, 1, 'workflow.started', now(), '{}', 'running')",
        bad,
    )
    await steps_engine.submit("good", {"n": -1}, run_id=bad)
    good = await _submit_good(steps_engine)

    await _all_completed(steps_engine, good)

    run = await steps_engine.finished(bad)
    assert run["status"] == "failed"
    assert run["error"]["category"] == "storage_error"
    assert "outbox_pkey" in run["error"]["message"]
    assert [e["seq"] for e in await steps_engine.events(bad)] == [1, 2]
    assert len(_errors_about(caplog, bad)) == 1


async def test_a_row_locked_by_another_session_delays_only_its_own_run(
    steps_engine: Engine, steps: Steps, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await _register_all(steps_engine)
    await steps_engine.register(HOLD)
    locked = await steps_engine.submit("held")
    await wait_for(lambda: "h" in steps.started, message="the held step never started")

    other = await store.connect(steps_engine.settings.database_url or "")
    try:
        lock = other.transaction()
        await lock.start()
        await other.execute("SELECT 1 FROM flowforge.runs WHERE id = $1 FOR UPDATE", locked)
        steps.release.set()  # its result now waits for the locked row
        good = await _submit_good(steps_engine)
        # Every good run completes while the row is still locked (and the locked run's
        # lease is renewed past the lock, or skipped without dropping it).
        await _all_completed(steps_engine, good)
        # The lease renewal met the lock too, and renewed the other leases without it.
        await wait_for(
            lambda: any("renewing the others" in r.getMessage() for r in caplog.records),
            message="the renewal never met the lock",
        )
        assert (await steps_engine.run(locked))["status"] == "running"
        await lock.rollback()
    finally:
        await other.close()

    run = await steps_engine.finished(locked)
    assert run["status"] == "completed", run["error"]
    seqs = [e["seq"] for e in await steps_engine.events(locked)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_input_over_the_context_limit_is_refused_before_any_step(
    steps_engine: Engine, steps: Steps
) -> None:
    await _register_all(steps_engine)
    await steps_engine.register(NEVER_STARTS.format(name="big"))
    limit = steps_engine.settings.max_context_bytes
    bad = await steps_engine.submit("big", {"blob": "x" * (limit + 10)})
    good = await _submit_good(steps_engine)

    await _all_completed(steps_engine, good)

    run = await steps_engine.finished(bad)
    assert run["status"] == "failed"
    assert run["error"]["category"] == "payload_too_large"
    assert "FLOWFORGE_MAX_CONTEXT_BYTES" in run["error"]["message"]
    assert "never" not in steps.started  # no step of it ran


@pytest.mark.parametrize("depth", [100, 3000])
async def test_an_input_nested_too_deep_is_refused_before_any_step(
    steps_engine: Engine, steps: Steps, depth: int
) -> None:
    await _register_all(steps_engine)
    await steps_engine.register(NEVER_STARTS.format(name="deep"))
    # Inserted as JSON text: the client's own encoder would recurse as deep.
    bad = await steps_engine.conn.fetchval(
        "INSERT INTO flowforge.runs (workflow_name, input) VALUES ('deep', $1::text::jsonb)"
        " RETURNING id",
        "[" * depth + "]" * depth,
    )
    good = await _submit_good(steps_engine)

    await _all_completed(steps_engine, good)

    run = await steps_engine.finished(bad)
    assert run["status"] == "failed"
    assert run["error"]["category"] == "invalid_input"
    assert "never" not in steps.started


async def test_a_run_is_inserted_pending_and_nothing_else(db_url: str) -> None:
    await store.apply_migrations(db_url)
    conn = await store.connect(db_url)
    try:
        await register_workflows(conn, "w")
        for columns, values in [
            ("status", "'running'"),
            ("owner", "'someone'"),
            ("checkpoint", "'{}'"),
            ("epoch", "7"),
        ]:
            with pytest.raises(asyncpg.CheckViolationError, match="inserted pending"):
                await conn.execute(
                    f"INSERT INTO flowforge.runs (workflow_name, {columns}) VALUES ('w', {values})"
                )
        await conn.execute("INSERT INTO flowforge.runs (workflow_name) VALUES ('w')")
    finally:
        await conn.close()


async def test_many_waits_do_not_pile_up(steps_engine: Engine) -> None:
    """Deferred commits are retried with a pause: a locked row costs no busy loop."""
    await _register_all(steps_engine)
    good = await _submit_good(steps_engine, 5)
    await asyncio.wait_for(_all_completed(steps_engine, good), timeout=30)
