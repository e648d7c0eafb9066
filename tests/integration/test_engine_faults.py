"""The orchestrator's error paths, each run for real: a bug on one run's path, the epoch
moved on under a commit, a lease lost, a renewal PostgreSQL refuses, Redis refusing a
dispatch or a reconcile. Each test asserts what users care about: the run resumes exactly
once, a poison run fails after its strikes with a clear error, the others are untouched.

Faults come from the real servers (a trigger, another session's UPDATE, Redis' memory
limit and ACLs). Two paths can only be reached by a bug or a failure PostgreSQL cannot be
made to produce on one statement alone; those inject it into our own code (never into a
driver): `RunState.apply_result`/`start` raising, and `Orchestrator._fetch` failing once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import UUID, uuid4

import pytest
import redis.asyncio as aioredis

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.graph.run import RunState
from flowforge_orchestrator.engine.orchestrator import Orchestrator, run_orchestrator
from flowforge_orchestrator.errors import StoreError
from flowforge_orchestrator.ops import metrics
from flowforge_orchestrator.store import liveness as store_liveness
from flowforge_orchestrator.worker.runtime import load_step_types, run_worker
from tests.helpers import dispatched_attempt, stop_tasks, wait_for
from tests.integration.conftest import SECRETS, Engine, Steps

CHAIN = """
name: chain
version: 1
steps:
  - {id: a, type: echo, with: {n: "${{ input.n }}"}}
  - {id: b, type: echo, depends_on: [a], with: {n: "${{ steps.a.output.n }}"}}
"""

HELD = """
name: held
version: 1
steps:
  - {id: h, type: hold, with: {}}
  - {id: after, type: echo, depends_on: [h], with: {done: true}}
"""


class Faults(Engine):
    measures: metrics.OrchestratorMetrics

    def action(self, name: str) -> float:
        value = self.measures.registry.get_sample_value(
            "flowforge_reconciler_actions_total", {"action": name}
        )
        return value or 0.0


@pytest.fixture
async def faults(settings: Settings, steps: Steps) -> AsyncIterator[Faults]:
    """An orchestrator and a worker in this process (leases of 2 s: a run dropped by its
    owner is adopted soon); `_engine` may give the orchestrator a Redis URL of its own, so
    that a test can take rights away from it alone."""
    async with _engine(settings.model_copy(update={"lease_seconds": 2.0}), steps) as engine:
        yield engine


def _engine(settings: Settings, steps: Steps, orchestrator_redis: str | None = None) -> Any:
    class Starter:
        async def __aenter__(self) -> Faults:
            await store.apply_migrations(settings.database_url or "")
            measures = metrics.OrchestratorMetrics(metrics.new_registry(process=False))
            stop = asyncio.Event()
            ready_o, ready_w = asyncio.Event(), asyncio.Event()
            types = {
                **load_step_types([]),
                "echo": steps.echo,
                "hold": steps.hold,
                "fail": steps.fail,
            }
            orch = settings.model_copy(
                update={"redis_url": orchestrator_redis or settings.redis_url}
            )
            self.tasks = [
                asyncio.create_task(run_orchestrator(orch, stop, ready=ready_o, measures=measures)),
                asyncio.create_task(
                    run_worker(settings, types, stop=stop, ready=ready_w, secrets=SECRETS)
                ),
            ]
            await asyncio.wait_for(asyncio.gather(ready_o.wait(), ready_w.wait()), timeout=20)
            conn = await store.connect(settings.database_url or "")
            self.engine = Faults(settings, conn)
            self.engine.measures = measures
            self.stop = stop
            return self.engine

        async def __aexit__(self, *exc: object) -> None:
            steps.release.set()
            self.stop.set()
            await self.engine.conn.close()
            await stop_tasks(self.tasks)  # bounded, and what the engine ended with is raised

    return Starter()


def _fail_for(run_id: UUID, original: Callable[..., Any]) -> Callable[..., Any]:
    def faulty(self: RunState, *args: Any, **kwargs: Any) -> Any:
        if self.run_id == run_id:
            raise RuntimeError(f"a bug on the path of run {run_id}")
        return original(self, *args, **kwargs)

    return faulty


async def _history_is_exactly_once(engine: Engine, run_id: UUID) -> list[dict[str, Any]]:
    events = await engine.events(run_id)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    return events


async def test_a_bug_while_starting_one_run_fails_that_run_only(
    faults: Faults, monkeypatch: pytest.MonkeyPatch
) -> None:
    await faults.register(CHAIN)
    bad = uuid4()
    monkeypatch.setattr(RunState, "start", _fail_for(bad, RunState.start))
    await faults.submit("chain", {"n": -1}, run_id=bad)
    good = [await faults.submit("chain", {"n": n}) for n in range(5)]

    for run_id in good:
        assert (await faults.finished(run_id))["status"] == "completed"
    run = await faults.finished(bad)
    assert run["status"] == "failed"
    assert run["error"]["category"] == "internal_error"
    assert "a bug on the path of run" in run["error"]["message"]


async def test_a_run_whose_results_cannot_be_applied_fails_after_its_strikes(
    faults: Faults, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each failure gives the run back (its lease expires at once, so it is claimed again
    without waiting); after MAX_STRIKES the claim fails it with a clear error."""
    await faults.register(CHAIN)
    bad = uuid4()
    monkeypatch.setattr(RunState, "apply_result", _fail_for(bad, RunState.apply_result))
    await faults.submit("chain", {"n": -1}, run_id=bad)
    good = [await faults.submit("chain", {"n": n}) for n in range(5)]

    run = await faults.finished(bad, timeout=30)

    assert run["status"] == "failed"
    assert "failed on this run 3 times" in run["error"]["message"]
    assert faults.action("released") >= 3
    assert faults.action("adopted") >= 2  # claimed again after each give-back
    for run_id in good:
        assert (await faults.finished(run_id))["status"] == "completed"
    await _history_is_exactly_once(faults, bad)


async def test_results_that_cannot_be_fetched_are_fetched_on_the_next_poll(
    faults: Faults, steps: Steps, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    await faults.register(CHAIN)
    failures: list[int] = []
    original = Orchestrator._fetch

    async def fetch_failing_once(self: Orchestrator, wanted: list[UUID]) -> Any:
        if not failures:
            failures.append(len(wanted))
            raise StoreError("database error: the results could not be read")
        return await original(self, wanted)

    monkeypatch.setattr(Orchestrator, "_fetch", fetch_failing_once)
    run_id = await faults.submit("chain", {"n": 1})

    run = await faults.finished(run_id)

    assert run["status"] == "completed"
    assert failures
    assert any("fetching results failed" in r.getMessage() for r in caplog.records)
    events = await _history_is_exactly_once(faults, run_id)
    assert [e["type"] for e in events].count("step.succeeded") == 2


async def test_a_commit_after_the_epoch_moved_on_is_refused_and_the_run_resumes_once(
    faults: Faults, steps: Steps
) -> None:
    """Another replica's claim is simulated by moving the epoch on: this orchestrator's
    next write is fenced off, it drops the run; once the lease expires the run is adopted
    from its checkpoint and completes, each transition written once."""
    await faults.register(HELD)
    run_id = await faults.submit("held")
    await wait_for(lambda: "h" in steps.started, message="the held step never started")
    dropped = faults.action("dropped")

    await faults.conn.execute("UPDATE flowforge.runs SET epoch = epoch + 1 WHERE id = $1", run_id)
    steps.release.set()

    await wait_for(lambda: faults.action("dropped") > dropped, message="the run was not dropped")
    run = await faults.finished(run_id, timeout=30)
    assert run["status"] == "completed"
    events = await _history_is_exactly_once(faults, run_id)
    succeeded = [e["data"]["step_id"] for e in events if e["type"] == "step.succeeded"]
    assert sorted(succeeded) == ["after", "h"]
    assert faults.action("adopted") >= 1


async def test_a_lease_lost_to_another_owner_is_dropped_and_the_run_adopted(
    faults: Faults, steps: Steps, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await faults.register(HELD)
    run_id = await faults.submit("held")
    await wait_for(lambda: "h" in steps.started, message="the held step never started")

    # Another replica took the run (owner and epoch) and then stopped: the renewal finds
    # the run no longer ours. While that replica lives it holds its node lock (else this
    # one's liveness would take the run back at once, before any renewal).
    elsewhere = await store_liveness.connect_lock_session(faults.settings.database_url or "")
    assert await store_liveness.try_lock_node(elsewhere, "elsewhere")
    try:
        await faults.conn.execute(
            "UPDATE flowforge.runs SET owner = 'elsewhere', epoch = epoch + 1,"
            " lease_expires_at = now() + interval '2 seconds' WHERE id = $1",
            run_id,
        )
        await wait_for(
            lambda: any("lease lost" in r.getMessage() for r in caplog.records),
            message="the lost lease was not noticed",
        )
    finally:
        await elsewhere.close()
    steps.release.set()

    run = await faults.finished(run_id, timeout=30)
    assert run["status"] == "completed"
    await _history_is_exactly_once(faults, run_id)


async def test_a_renewal_the_database_refuses_is_retried_and_runs_go_on(
    faults: Faults, steps: Steps, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    await faults.register(HELD)
    run_id = await faults.submit("held")
    await wait_for(lambda: "h" in steps.started, message="the held step never started")
    # Refuse updates that touch nothing but the lease: the renewal.
    await faults.conn.execute(
        """
        CREATE FUNCTION flowforge.no_renewal() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'renewals refused' USING ERRCODE = 'data_exception'; END $$;
        CREATE TRIGGER no_renewal BEFORE UPDATE OF lease_expires_at ON flowforge.runs
            FOR EACH ROW WHEN (OLD.checkpoint IS NOT DISTINCT FROM NEW.checkpoint
                               AND OLD.epoch = NEW.epoch)
            EXECUTE FUNCTION flowforge.no_renewal();
        """
    )
    await wait_for(
        lambda: any("renewing leases failed" in r.getMessage() for r in caplog.records),
        message="the refused renewal was not reported",
    )
    await faults.conn.execute("DROP TRIGGER no_renewal ON flowforge.runs")
    steps.release.set()

    run = await faults.finished(run_id, timeout=30)
    assert run["status"] == "completed"
    await _history_is_exactly_once(faults, run_id)


async def test_dispatches_redis_refuses_are_enqueued_again_later(
    faults: Faults, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await faults.register(CHAIN)
    client = aioredis.Redis.from_url(faults.settings.redis_url or "")
    failures = faults.measures.registry.get_sample_value("flowforge_dispatch_failures_total")
    try:
        # Over its memory limit, Redis refuses every write: the enqueue script fails.
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", 1)
        run_id = await faults.submit("chain", {"n": 3})
        await wait_for(
            lambda: (
                (
                    faults.measures.registry.get_sample_value("flowforge_dispatch_failures_total")
                    or 0
                )
                > (failures or 0)
            ),
            message="no dispatch was refused",
        )
    finally:
        await client.config_set("maxmemory", 0)
        await client.aclose()

    run = await faults.finished(run_id, timeout=20)
    assert run["status"] == "completed"
    assert run["output"]["b"] == {"n": 3}
    assert any("dispatch(es) failed" in r.getMessage() for r in caplog.records)
    await _history_is_exactly_once(faults, run_id)


async def test_a_reconciler_without_redis_rights_waits_for_them(
    settings: Settings, steps: Steps, caplog: pytest.LogCaptureFixture
) -> None:
    """The orchestrator's Redis user loses the right to look jobs up: the reconciler says
    so and changes nothing; with the right back, the run completes once."""
    caplog.set_level(logging.WARNING)
    url = settings.redis_url or ""
    admin = aioredis.Redis.from_url(url)
    user = f"orch{uuid4().hex[:8]}"
    await admin.acl_setuser(
        user, enabled=True, passwords=["+pw"], keys=["*"], channels=["*"], commands=["+@all"]
    )
    orch_url = url.replace("redis://", f"redis://{user}:pw@", 1)
    try:
        async with _engine(settings, steps, orchestrator_redis=orch_url) as engine:
            await engine.register(HELD)
            run_id = await engine.submit("held")
            await wait_for(lambda: "h" in steps.started, message="the held step never started")
            await admin.acl_setuser(user, commands=["-exists"])
            await wait_for(
                lambda: any("could not check the jobs" in r.getMessage() for r in caplog.records),
                message="the reconciler did not report Redis refusing it",
                timeout=15,
            )
            await admin.acl_setuser(user, commands=["+exists"])
            steps.release.set()
            run = await engine.finished(run_id, timeout=20)
            assert run["status"] == "completed"
            await _history_is_exactly_once(engine, run_id)
            assert steps.started.count("h") == 1  # not sent again while Redis could not tell
    finally:
        await admin.acl_deluser(user)
        await admin.aclose()


DELAYED = """
name: delayed
version: 1
steps:
  - {id: pause, type: delay, duration: 0.2s}
  - {id: after, type: echo, depends_on: [pause], with: {n: 1}}
"""

UNSERVED = """
name: unserved
version: 1
steps:
  - id: orphan
    type: nobody_serves_this
    timeout: 1s
    schedule_to_start: 0.3s
    with: {n: 1}
"""


async def test_a_bug_while_cancelling_gives_the_run_back_and_it_ends_alone(
    faults: Faults, steps: Steps, monkeypatch: pytest.MonkeyPatch
) -> None:
    await faults.register(HELD)
    await faults.register(CHAIN)
    bad = await faults.submit("held")
    await wait_for(lambda: "h" in steps.started, message="the held step never started")
    monkeypatch.setattr(RunState, "cancel", _fail_for(bad, RunState.cancel))
    released = faults.action("released")

    await store.request_cancel(faults.conn, bad)

    await wait_for(lambda: faults.action("released") > released, message="not given back")
    good = [await faults.submit("chain", {"n": n}) for n in range(3)]
    for run_id in good:
        assert (await faults.finished(run_id))["status"] == "completed"
    run = await faults.finished(bad, timeout=30)  # claimed again; its cancel fails it
    assert run["status"] == "failed"
    assert run["error"]["category"] == "internal_error"


async def test_a_bug_while_firing_a_timer_fails_that_run_after_its_strikes(
    faults: Faults, monkeypatch: pytest.MonkeyPatch
) -> None:
    await faults.register(DELAYED)
    await faults.register(CHAIN)
    bad = uuid4()
    monkeypatch.setattr(RunState, "fire_timers", _fail_for(bad, RunState.fire_timers))
    await faults.submit("delayed", run_id=bad)
    good = [await faults.submit("delayed") for _ in range(3)]

    run = await faults.finished(bad, timeout=30)

    assert run["status"] == "failed"
    assert "failed on this run 3 times" in run["error"]["message"]
    for run_id in good:
        assert (await faults.finished(run_id))["status"] == "completed"


async def test_a_bug_while_timing_out_an_untaken_attempt_gives_the_run_back(
    faults: Faults, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    await faults.register(UNSERVED)
    bad = uuid4()
    monkeypatch.setattr(RunState, "not_picked_up", _fail_for(bad, RunState.not_picked_up))
    await faults.submit("unserved", run_id=bad)

    run = await faults.finished(bad, timeout=30)

    assert run["status"] == "failed"
    assert any("timing out attempts failed" in r.getMessage() for r in caplog.records)
    assert faults.action("released") >= 1


async def test_an_untaken_attempt_is_timed_out_by_its_deadline_when_redis_cannot_tell(
    settings: Settings, steps: Steps, caplog: pytest.LogCaptureFixture
) -> None:
    """At schedule_to_start the orchestrator asks Redis whether a worker took the attempt;
    Redis refusing to answer leaves the attempt to its deadline, which still ends it."""
    caplog.set_level(logging.WARNING)
    url = settings.redis_url or ""
    admin = aioredis.Redis.from_url(url)
    user = f"orch{uuid4().hex[:8]}"
    await admin.acl_setuser(
        user, enabled=True, passwords=["+pw"], keys=["*"], channels=["*"], commands=["+@all"]
    )
    orch_url = url.replace("redis://", f"redis://{user}:pw@", 1)
    try:
        async with _engine(settings, steps, orchestrator_redis=orch_url) as engine:
            await engine.register(UNSERVED)
            run_id = await engine.submit("unserved")
            await dispatched_attempt(engine.conn, run_id, "orphan")
            await admin.acl_setuser(user, commands=["-exists"])
            run = await engine.finished(run_id, timeout=20)
            assert run["status"] == "failed"
            assert run["error"]["category"] == "timeout"  # the deadline, not the probe
            assert any("could not check" in r.getMessage() for r in caplog.records)
            await admin.acl_setuser(user, commands=["+exists"])
    finally:
        await admin.acl_deluser(user)
        await admin.aclose()
