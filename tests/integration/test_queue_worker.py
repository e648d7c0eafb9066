"""Workers wake when a job is enqueued, not only when their poll comes round."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio
from arq.worker import func

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.local_services import LocalRedis
from flowforge_orchestrator.queue.dispatch import redis_settings
from flowforge_orchestrator.queue.pools import open_pool
from flowforge_orchestrator.queue.woken import WakeableWorker, wake_channel
from tests.helpers import cancel_tasks, stop_tasks, wait_for
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
        try:
            await stop_tasks(tasks)
        finally:
            await conn.close()


async def test_a_woken_poll_does_not_ask_redis_about_jobs_this_worker_already_runs(
    redis_url: str,
) -> None:
    # arq checks every id its poll reads (WATCH, EXISTS, ZSCORE) even when it runs that
    # job itself; a job stays in the queue until it ends, and wakes make polls frequent.
    release = asyncio.Event()

    async def hold(ctx: dict[str, Any]) -> None:
        await release.wait()

    worker = WakeableWorker(
        [func(hold, name="hold")],
        queue_name="test-hold",
        redis_settings=redis_settings(redis_url),
        handle_signals=False,
        poll_delay=30,  # only wake messages make it poll
    )
    client = redis.asyncio.Redis.from_url(redis_url)
    serving = asyncio.create_task(worker.main())
    try:
        await client.config_resetstat()
        pool = await open_pool(redis_settings(redis_url), default_queue_name="test-hold")
        await pool.enqueue_job("hold", _job_id="held")
        await pool.aclose()

        async def calls(command: str) -> int:
            stats = await client.info("commandstats")
            return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

        async def poll() -> None:
            before = await calls("zrangebyscore")
            await client.publish(wake_channel("test-hold"), "1")
            await wait_for(lambda: _more(calls("zrangebyscore"), before), message="no poll")

        await poll()
        await wait_for(lambda: "held" in worker.tasks, message="the job never started")
        watched = await calls("watch")
        for _ in range(5):
            await poll()
        assert await calls("watch") == watched
    finally:
        release.set()
        running = [t for t in worker.tasks.values() if not t.done()]
        if running:
            await asyncio.wait(running, timeout=10)
        try:
            await cancel_tasks([serving])
        finally:
            await worker.aclose()
        await client.aclose()


async def _more(count: Any, before: int) -> bool:
    return bool(await count > before)


def claims_worker(redis_url: str, functions: list[Any], **kw: Any) -> WakeableWorker:
    """A worker of the `test-claims` queue, woken by messages only (its poll delay is 30 s)."""
    options: dict[str, Any] = {"poll_delay": 30, "handle_signals": False}  # wakes only
    return WakeableWorker(
        functions,
        queue_name="test-claims",
        redis_settings=redis_settings(redis_url),
        **{**options, **kw},
    )


async def enqueue_claims(redis_url: str, function: str, ids: list[str]) -> None:
    """Jobs of `function` on `test-claims`, each given its id as argument; then a wake."""
    pool = await open_pool(redis_settings(redis_url), default_queue_name="test-claims")
    try:
        for job_id in ids:
            await pool.enqueue_job(function, job_id, _job_id=job_id)
        await pool.publish(wake_channel("test-claims"), "1")
    finally:
        await pool.aclose()


async def _stop(*workers: WakeableWorker, serving: list[asyncio.Task[None]]) -> None:
    try:
        await cancel_tasks(serving)
    finally:
        for worker in workers:
            await worker.aclose()


async def test_a_poll_claims_its_jobs_in_one_round_trip_and_two_workers_never_share_one(
    redis_url: str,
) -> None:
    ran: list[str] = []

    async def quick(ctx: dict[str, Any], job_id: str) -> None:
        ran.append(job_id)

    client = redis.asyncio.Redis.from_url(redis_url)
    ids = [f"job-{i}" for i in range(60)]
    await enqueue_claims(redis_url, "quick", ids)  # before the workers: only theirs is counted
    await client.config_resetstat()
    workers = [claims_worker(redis_url, [func(quick, name="quick")]) for _ in range(2)]
    serving = [asyncio.create_task(w.main()) for w in workers]
    try:
        await wait_for(lambda: len(ran) >= len(ids), message="not every job ran")
        stats = await client.info("commandstats")
        assert sorted(ran) == sorted(ids)  # each once, across both workers
        assert "cmdstat_watch" not in stats  # arq's per-job WATCH/EXISTS/ZSCORE is gone
    finally:
        await _stop(*workers, serving=serving)
        await client.aclose()


async def test_a_full_worker_takes_the_next_job_when_a_slot_frees_not_at_its_next_poll(
    redis_url: str,
) -> None:
    gates = {f"job-{i}": asyncio.Event() for i in range(3)}
    started: list[str] = []

    async def hold(ctx: dict[str, Any], job_id: str) -> None:
        started.append(job_id)
        await gates[job_id].wait()

    worker = claims_worker(redis_url, [func(hold, name="hold")], max_jobs=2)
    serving = [asyncio.create_task(worker.main())]
    try:
        await enqueue_claims(redis_url, "hold", list(gates))
        await wait_for(lambda: len(started) == 2, message="the first two never started")
        gates[started[0]].set()
        # The poll delay is 30 s: only the freed slot can start the third one in time.
        await wait_for(lambda: len(started) == 3, message="the third job waited for a poll")
    finally:
        for gate in gates.values():
            gate.set()
        await _stop(worker, serving=serving)


class _ClaimHook(WakeableWorker):
    """A worker that runs `during_claim` (once) after a poll has counted its free slots and
    before its claim returns: the window in which a running job may end."""

    during_claim: Callable[[], Awaitable[None]] | None = None

    async def _claim_due(self, ids: list[str], wanted: int) -> list[tuple[str, int]]:
        hook, self.during_claim = self.during_claim, None
        if hook is not None:
            await hook()
        return await super()._claim_due(ids, wanted)


async def test_a_slot_freed_while_a_poll_claims_wakes_another_poll(redis_url: str) -> None:
    # Two slots, four jobs, a poll every 30 s: only wakes make the worker poll. A job that
    # ends while a poll's claim is on its way frees a slot that claim did not count; the
    # jobs left in the queue must not wait for the next poll.
    gates = {f"job-{i}": asyncio.Event() for i in range(4)}
    started: list[str] = []

    async def hold(ctx: dict[str, Any], job_id: str) -> None:
        started.append(job_id)
        await gates[job_id].wait()

    await enqueue_claims(redis_url, "hold", list(gates))  # before the worker: no wake message
    worker = _ClaimHook(
        [func(hold, name="hold")],
        queue_name="test-claims",
        redis_settings=redis_settings(redis_url),
        handle_signals=False,
        poll_delay=30,
        max_jobs=2,
    )
    serving = [asyncio.create_task(worker.main())]
    try:
        await wait_for(lambda: len(started) == 2, message="the first two never started")
        first, second = started

        async def second_ends_meanwhile() -> None:
            gates[second].set()
            await wait_for(lambda: worker.job_counter == 0, message="the second never ended")

        worker.during_claim = second_ends_meanwhile
        gates[first].set()  # its freed slot wakes a poll, whose claim sees the second end
        await wait_for(lambda: worker.during_claim is None, message="no poll claimed")
        await wait_for(lambda: len(started) == 4, message="a job waited for the next poll")
        assert sorted(started) == sorted(gates)
    finally:
        for gate in gates.values():
            gate.set()
        await _stop(worker, serving=serving)


async def test_a_worker_closes_its_connections_even_when_redis_is_gone() -> None:
    # At shutdown arq deletes the worker's health key; with Redis gone that fails, and
    # the pool must be closed all the same (an unclosed connection is a ResourceWarning,
    # an error under this suite's filterwarnings, once collected).
    own = LocalRedis(durable=False).start()
    try:
        worker = WakeableWorker(
            [func(_never_called, name="never")],
            queue_name="test-gone",
            redis_settings=redis_settings(own.url),
            handle_signals=False,
            poll_delay=30,
        )
        serving = asyncio.create_task(worker.main())
        await wait_for(lambda: worker._pool is not None, message="the worker never connected")
        assert await worker.pool.ping()
        own.stop()
        serving.cancel()  # main ends cancelled, or with Redis' error: either is expected here
        await asyncio.gather(serving, return_exceptions=True)

        await worker.aclose()
        assert worker._pool is None
        gc.collect()  # a connection left open would warn now, inside this test
    finally:
        own.stop()


async def _never_called(ctx: dict[str, Any]) -> None:
    raise AssertionError("no job was enqueued")
