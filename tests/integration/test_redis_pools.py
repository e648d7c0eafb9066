"""Opening a Redis pool leaves no connection open, however the opening ends.

arq's own `create_pool` left a connection open when it was cancelled right after its
connect (redis-py's zero-timeout read that checks a fresh connection, cancelled twice): a
worker stopped while starting gave an open socket to the garbage collector, which warned
inside whatever test ran next. Each test here cancels an opening at every point of its
first loop iterations, on a Redis of its own, and counts the clients the server sees.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions
from arq import func
from arq.connections import RedisSettings

from flowforge_orchestrator.core.tokens import AttemptTokens
from flowforge_orchestrator.errors import ConfigError
from flowforge_orchestrator.local_services import LocalRedis
from flowforge_orchestrator.queue.dispatch import Dispatcher, redis_settings
from flowforge_orchestrator.queue.pools import open_pool
from flowforge_orchestrator.queue.woken import WakeableWorker
from tests.helpers import free_port, wait_for
from tests.integration.test_queue_worker import claims_worker, enqueue_claims

# Iterations of the loop after which an opening is cancelled: the connect, the check of the
# fresh connection and the PING all happen within the first dozens.
STEPS = range(60)
ROUNDS = 3


@pytest.fixture
async def own_redis() -> AsyncIterator[tuple[str, redis.asyncio.Redis]]:
    """A Redis of this test's own, and a client that counts the others."""
    server = LocalRedis(durable=False).start()
    admin = redis.asyncio.Redis.from_url(server.url)
    try:
        yield server.url, admin
    finally:
        await admin.aclose()
        server.stop()


async def _others(admin: redis.asyncio.Redis) -> int:
    return int((await admin.info("clients"))["connected_clients"]) - 1


async def _none_open(admin: redis.asyncio.Redis) -> bool:
    return await _others(admin) == 0


async def test_a_cancelled_opening_leaves_no_connection_open(
    own_redis: tuple[str, redis.asyncio.Redis],
) -> None:
    url, admin = own_redis
    opened: list[Any] = []

    async def start() -> None:
        opened.append(await open_pool(redis_settings(url)))

    async def close() -> None:
        while opened:
            await opened.pop().aclose(close_connection_pool=True)

    await _cancel_every_way(admin, start, close)


async def test_a_worker_stopped_while_it_starts_leaves_no_connection_open(
    own_redis: tuple[str, redis.asyncio.Redis],
) -> None:
    url, admin = own_redis
    workers: list[WakeableWorker] = []

    async def start() -> None:
        worker = claims_worker(url, [func(_never_called, name="never")])
        workers.append(worker)
        await worker.main()

    async def close() -> None:
        while workers:
            await workers.pop().aclose()

    await _cancel_every_way(admin, start, close)


async def test_an_orchestrator_stopped_while_it_connects_leaves_no_connection_open(
    own_redis: tuple[str, redis.asyncio.Redis],
) -> None:
    url, admin = own_redis
    dispatchers: list[Dispatcher] = []

    async def start() -> None:
        dispatchers.append(await Dispatcher.connect(url, tokens=AttemptTokens(b"k" * 32)))

    async def close() -> None:
        while dispatchers:
            await dispatchers.pop().close()

    await _cancel_every_way(admin, start, close)


async def test_a_worker_stopped_while_a_job_finishes_closes_after_it(
    own_redis: tuple[str, redis.asyncio.Redis],
) -> None:
    # arq writes a job's result in a task shielded from the job's cancellation: stopped at
    # any step after the job's function returned, the worker's close must wait for it, or it
    # goes on with a closed pool (and may open a connection nobody closes).
    url, admin = own_redis
    unretrieved: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    try:
        for steps in range(15):
            await _stop_while_finishing(url, steps)
            gc.collect()  # an orphaned task that failed reports it when collected
            assert unretrieved == [], f"a job's finish failed after the close (step {steps})"
            await wait_for(
                lambda: _none_open(admin),
                timeout=5,
                message=f"a connection stayed open after a stop at loop step {steps}",
            )
    finally:
        loop.set_exception_handler(None)


async def _stop_while_finishing(url: str, steps: int) -> None:
    ran = asyncio.Event()

    async def quick(ctx: dict[str, Any], job_id: str) -> str:
        ran.set()
        return job_id

    worker = claims_worker(url, [func(quick, name="quick")])
    serving = asyncio.ensure_future(worker.main())
    await enqueue_claims(url, "quick", [f"job-{steps}"])
    await asyncio.wait_for(ran.wait(), 10)
    await _loop_steps(steps)
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    await worker.aclose()
    finishing = [
        t
        for t in asyncio.all_tasks()
        if not t.done()
        and t.get_coro().__qualname__.endswith((".finish_job", ".finish_failed_job"))  # type: ignore[union-attr]
    ]
    assert finishing == [], f"still finishing after the close (step {steps})"


async def _loop_steps(count: int) -> None:
    """Let the loop run `count` times: what is under way advances one step each time."""
    for _ in range(count):
        await asyncio.sleep(0)


async def _cancel_every_way(
    admin: redis.asyncio.Redis,
    start: Callable[[], Awaitable[None]],
    close: Callable[[], Awaitable[None]],
) -> None:
    for _ in range(ROUNDS):
        for steps in STEPS:
            task = asyncio.ensure_future(start())
            await _loop_steps(steps)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await close()
            await wait_for(
                lambda: _none_open(admin),
                timeout=5,
                message=f"a connection stayed open after a cancel at loop step {steps}",
            )


async def test_a_redis_that_does_not_answer_is_tried_again_then_given_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = redis_settings(f"redis://127.0.0.1:{free_port()}")
    settings.conn_retries, settings.conn_retry_delay = 2, 0
    with caplog.at_level(logging.WARNING, "flowforge_orchestrator.queue.pools"):
        with pytest.raises(redis.exceptions.ConnectionError):
            await open_pool(settings)
    tries = [r.getMessage().rsplit("; ", 1)[1] for r in caplog.records]
    assert tries == ["tries left: 2", "tries left: 1"]


async def _never_called(ctx: dict[str, Any]) -> None:
    raise AssertionError("no job was enqueued")


async def test_sentinel_settings_are_refused_before_any_connection() -> None:
    with pytest.raises(ConfigError, match="Sentinel"):
        await open_pool(RedisSettings(host=[("127.0.0.1", free_port())], sentinel=True))
