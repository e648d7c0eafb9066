"""Recovery in process: Redis losing its data, PostgreSQL dropping connections."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import redis.asyncio as aioredis
from arq.constants import job_key_prefix

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.graph.nodes import attempt_id
from flowforge_orchestrator.core.records import StepResult
from flowforge_orchestrator.engine.orchestrator import run_orchestrator
from flowforge_orchestrator.local_services import LocalPostgres, LocalRedis
from flowforge_orchestrator.ops import metrics
from flowforge_orchestrator.worker.runtime import run_worker
from tests.helpers import dispatched_attempt, stop_tasks, verifier, wait_for
from tests.integration.conftest import Engine, Steps, start_engine

# A step that waits to be released, then one after it.
HELD = (
    "name: held\nversion: 1\nsteps:\n  - {id: h, type: hold, with: {}}\n"
    "  - {id: e, type: echo, depends_on: [h], with: {}}\n"
)

LATE = """
name: late
version: 1
steps:
  - {id: a, type: echo, with: {n: 1}}
"""


async def test_attempts_redis_lost_are_sent_again_and_runs_complete(
    settings: Settings, steps: Steps
) -> None:
    await store.apply_migrations(settings.database_url or "")
    conn = await store.connect(settings.database_url or "")
    client = aioredis.Redis.from_url(settings.redis_url or "")
    measures = metrics.OrchestratorMetrics(metrics.new_registry(process=False))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_orchestrator(settings, stop, measures=measures))]
    try:
        engine = Engine(settings, conn)
        await engine.register(LATE)
        run_id = await engine.submit("late")
        job = job_key_prefix + str(await dispatched_attempt(conn, run_id, "a"))

        # The job is in Redis (no worker runs yet to take it); now Redis loses everything.
        await wait_for(lambda: client.exists(job), message="the job never reached Redis")
        resent = _redelivered(measures)
        await client.flushall()
        await wait_for(lambda: client.exists(job), message="the reconciler did not send it again")
        assert _redelivered(measures) - resent == 1

        tasks.append(asyncio.create_task(run_worker(settings, {"echo": steps.echo}, stop=stop)))
        run = await engine.finished(run_id)
        assert run["status"] == "completed", run["error"]
        assert steps.started == ["a"]  # sent again under the same attempt id, run once
        attempts = await store.run_attempts(conn, run_id)
        assert [(a["attempt"], a["status"]) for a in attempts] == [(1, "succeeded")]
        assert _redelivered(measures) - resent == 1  # once: Redis knew the job from then on
    finally:
        stop.set()
        try:
            await stop_tasks(tasks)
        finally:
            await client.aclose()
            await conn.close()


def _redelivered(measures: metrics.OrchestratorMetrics) -> float:
    """Jobs the orchestrator sent again (the reconciler's, and failed dispatches')."""
    value = measures.registry.get_sample_value(
        "flowforge_reconciler_actions_total", {"action": "redelivered"}
    )
    return value or 0.0


async def test_a_redis_restart_that_loses_everything_loses_no_run(
    settings: Settings, steps: Steps
) -> None:
    """Redis goes away and comes back empty while a step waits to be released: the
    orchestrator and the worker reconnect, the attempt is sent again, both runs complete."""
    own_redis = LocalRedis(durable=False).start()
    settings = settings.model_copy(update={"redis_url": own_redis.url})
    await store.apply_migrations(settings.database_url or "")
    conn = await store.connect(settings.database_url or "")
    stop, tasks = await start_engine(settings, {"echo": steps.echo, "hold": steps.hold})
    try:
        engine = Engine(settings, conn)
        await engine.register(HELD)
        first = await engine.submit("held")
        await wait_for(lambda: "h" in steps.started, message="hold never started")

        own_redis.restart()  # not durable: it comes back empty
        steps.release.set()
        second = await engine.submit("held")
        for run_id in (first, second):
            run = await engine.finished(run_id, timeout=30)
            assert run["status"] == "completed", run["error"]
        assert all(not task.done() for task in tasks)  # neither process gave up
    finally:
        stop.set()
        try:
            await stop_tasks(tasks)
        finally:
            await conn.close()
            own_redis.stop()


def _half_closed(port: int) -> int:
    """TCP connections to `port` that the server closed and this machine's side did not
    (CLOSE_WAIT): sockets a client leaks when it keeps dead connections in a pool."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                remote, state = fields[2], fields[3]
                if state == "08" and int(remote.rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


async def test_after_each_redis_outage_steps_flow_within_seconds_and_no_socket_is_left(
    settings: Settings, steps: Steps
) -> None:
    """Three outages of Redis (down for a second each, back empty): after each, a new run's
    step reaches the worker within seconds, and no connection the server closed is kept."""
    own_redis = LocalRedis(durable=False).start()
    settings = settings.model_copy(update={"redis_url": own_redis.url})
    await store.apply_migrations(settings.database_url or "")
    conn = await store.connect(settings.database_url or "")
    stop, tasks = await start_engine(settings, {"echo": steps.echo, "hold": steps.hold})
    try:
        engine = Engine(settings, conn)
        await engine.register(LATE)
        steps.release.set()
        for outage in range(3):
            before = await engine.submit("late")
            assert (await engine.finished(before))["status"] == "completed"
            own_redis._stop_process()  # down, keeping the port
            await wait_for(lambda: not own_redis.pid, message="Redis did not stop")
            await asyncio.sleep(1.0)  # an outage of a second: the processes notice it
            own_redis.start()
            after = await engine.submit("late")
            # Within seconds (the worker retries at most a second apart), not a poll delay.
            run = await engine.finished(after, timeout=8)
            assert run["status"] == "completed", (outage, run["error"])
            await wait_for(
                lambda: _half_closed(own_redis.port) == 0,
                message=f"connections to Redis left half-closed after outage {outage + 1}",
            )
    finally:
        stop.set()
        try:
            await stop_tasks(tasks)
        finally:
            await conn.close()
            own_redis.stop()


async def test_a_postgres_restart_is_ridden_out_by_orchestrator_and_worker(
    settings: Settings, steps: Steps
) -> None:
    """PostgreSQL restarts while a step runs: the worker keeps its result and writes it
    once the database is back, the orchestrator reconnects and LISTENs again, runs finish."""
    own_pg = LocalPostgres(durable=False).start()
    try:
        dsn = own_pg.url
        settings = settings.model_copy(update={"database_url": dsn})
        await store.apply_migrations(dsn)
        stop, tasks = await start_engine(settings, {"echo": steps.echo, "hold": steps.hold})
        try:
            conn = await store.connect(dsn)
            engine = Engine(settings, conn)
            await engine.register(HELD)
            first = await engine.submit("held")
            await wait_for(lambda: "h" in steps.started, message="hold never started")
            await conn.close()

            own_pg.restart()
            steps.release.set()  # the result is written while connections are re-made

            conn = await store.retrying(lambda: store.connect(dsn), what="reconnecting")
            engine = Engine(settings, conn)
            second = await engine.submit("held")
            for run_id in (first, second):
                run = await engine.finished(run_id, timeout=30)
                assert run["status"] == "completed", run["error"]
            assert all(not task.done() for task in tasks)
            await conn.close()
        finally:
            stop.set()
            await stop_tasks(tasks)
    finally:
        own_pg.stop()


async def test_an_adopted_attempt_that_already_has_a_result_is_not_sent_again(
    settings: Settings, steps: Steps
) -> None:
    """A worker finished the attempt while no orchestrator ran, and Redis no longer knows
    the job (its result key expired, or Redis lost it): the adopting orchestrator applies
    the stored result instead of having the step run a second time."""
    await store.apply_migrations(settings.database_url or "")
    conn = await store.connect(settings.database_url or "")
    try:
        engine = Engine(settings, conn)
        await engine.register(
            "name: done_offline\nversion: 1\nsteps:\n  - {id: a, type: echo, with: {n: 1}}\n"
            "  - {id: b, type: echo, depends_on: [a], with: {n: 2}}\n"
        )
        run_id = await engine.submit("done_offline")
        # As a dead orchestrator left it: running, "a" dispatched, the lease expired.
        await conn.execute(
            "UPDATE flowforge.runs SET status = 'running', owner = 'dead', epoch = 1,"
            " lease_expires_at = now() - interval '1 minute', started_at = now(),"
            " checkpoint = $2 WHERE id = $1",
            run_id,
            {"v": 2, "seq": 2, "steps": {"a": "d1"}},
        )
        now = datetime.now(UTC)
        await store.insert_result(
            conn,
            StepResult(
                attempt_id=attempt_id(run_id, "a", 1),
                run_id=run_id,
                step_id="a",
                outcome="succeeded",
                output={"n": 1, "from": "the offline worker"},
                error=None,
                worker="w-gone",
                started_at=now,
                finished_at=now,
                token=(await verifier(conn)).tokens.token(attempt_id(run_id, "a", 1)),
            ),
        )
        stop, tasks = await start_engine(settings, {"echo": steps.echo})
        try:
            run = await engine.finished(run_id)
        finally:
            stop.set()
            await stop_tasks(tasks)
        assert run["status"] == "completed", run["error"]
        assert steps.started == ["b"]  # "a" ran once, before the crash
        assert run["output"] == {"b": {"n": 2}}
    finally:
        await conn.close()
