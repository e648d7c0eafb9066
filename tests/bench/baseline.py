"""The baseline: a raw arq worker running no-op jobs, and the enqueuer that measures it.

The worker is a process of its own (`python -m tests.bench.baseline --redis-url URL
--poll-delay S --max-jobs N`), built with the same `Worker` arguments as the engine's worker
(`flowforge_orchestrator.worker.run_worker`: JSON jobs, `max_tries=1`, aborts allowed, results
kept 60 s), on the same Redis, so the two differ only by what the engine adds.

Every job returns the wall-clock time (`time.time()`) at which it ran; the harness and the
worker share the machine's clock, so durations are read from those stamps, not from arq's
millisecond `JobResult` times.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any
from uuid import uuid4

from arq.connections import ArqRedis, create_pool
from arq.constants import result_key_prefix
from arq.jobs import deserialize_result
from arq.utils import timestamp_ms
from arq.worker import Worker, func

from flowforge_orchestrator.queue.dispatch import json_deserializer, json_serializer, redis_settings
from tests.bench.processes import WorkloadFailed, until

__all__ = ["RAW_QUEUE", "RawArq", "serve"]

RAW_QUEUE = "bench:raw"
_ENQUEUE_CONCURRENCY = 100  # enqueue_job calls in flight: each holds a Redis connection
_WAIT_INTERVAL = 0.002  # how often the enqueuer looks for a result, seconds


# -- the worker process ----------------------------------------------------------------------


async def noop(ctx: dict[str, Any], payload: Any) -> float:
    return time.time()


async def chain(ctx: dict[str, Any], prefix: str, remaining: int) -> list[float]:
    """A job that enqueues its successor, as a step's result leads to the next step."""
    started = time.time()
    if remaining > 0:
        redis: ArqRedis = ctx["redis"]
        await redis.enqueue_job(
            "chain",
            prefix,
            remaining - 1,
            _job_id=f"{prefix}-{remaining - 1}",
            _queue_name=RAW_QUEUE,
        )
    return [started, time.time()]


def _worker(redis_url: str, poll_delay: float, max_jobs: int) -> Worker:
    return Worker(
        [func(noop, name="noop", max_tries=1), func(chain, name="chain", max_tries=1)],
        queue_name=RAW_QUEUE,
        redis_settings=redis_settings(redis_url),
        handle_signals=False,
        max_jobs=max_jobs,
        poll_delay=poll_delay,
        job_timeout=24 * 3600,
        # Read back once the whole batch is done: a batch of 100,000 jobs takes minutes,
        # so its first results must outlive it (they expired at 60 s).
        keep_result=3600,
        allow_abort_jobs=True,
        job_serializer=json_serializer,
        job_deserializer=json_deserializer,
        log_results=False,
    )


async def serve(redis_url: str, poll_delay: float, max_jobs: int) -> None:
    """Run the worker until SIGTERM or SIGINT. Ready once `<queue>:health-check` exists."""
    worker = _worker(redis_url, poll_delay, max_jobs)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    main = asyncio.create_task(worker.main())
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([main, waiter], return_when=asyncio.FIRST_COMPLETED)
    for task in (main, waiter):
        task.cancel()
    await asyncio.gather(main, waiter, return_exceptions=True)
    if worker.tasks:
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
    await worker.pool.delete(worker.health_check_key)
    await worker.pool.aclose(close_connection_pool=True)


# -- the enqueuer (in the harness) -----------------------------------------------------------


class RawArq:
    """Measures the raw worker: throughput, single-job latency, chained handoffs."""

    def __init__(
        self, redis: ArqRedis, poll_delay: float, alive: Callable[[], None] = lambda: None
    ) -> None:
        """`alive` raises if the worker process died (checked while waiting)."""
        self.redis = redis
        self.poll_delay = poll_delay
        self.alive = alive

    @classmethod
    async def connect(
        cls, redis_url: str, poll_delay: float, alive: Callable[[], None] = lambda: None
    ) -> RawArq:
        pool = await create_pool(
            redis_settings(redis_url),
            job_serializer=json_serializer,
            job_deserializer=json_deserializer,
            default_queue_name=RAW_QUEUE,
        )
        return cls(pool, poll_delay, alive)

    async def _until(self, done: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
        await until(done, timeout, f"raw arq: {what}", interval=_WAIT_INTERVAL, alive=self.alive)

    async def close(self) -> None:
        await self.redis.aclose(close_connection_pool=True)

    async def _results(self, job_ids: Sequence[str]) -> list[Any]:
        raw = await self.redis.mget([result_key_prefix + job_id for job_id in job_ids])
        missing = sum(1 for value in raw if value is None)
        if missing:
            raise WorkloadFailed(f"raw arq: {missing} of {len(job_ids)} results are missing")
        return [deserialize_result(v, deserializer=json_deserializer).result for v in raw]

    async def batch(self, jobs: int, timeout: float) -> dict[str, Any]:
        """`jobs` no-op jobs released at once; wall time from the release to the last job.

        They are enqueued deferred by an hour, then made due by one ZADD, so the worker sees
        all of them at the same moment, as the engine's runs appear at their commit.
        """
        prefix = f"raw-{uuid4().hex[:12]}"
        ids = [f"{prefix}-{i}" for i in range(jobs)]
        later = datetime.now(UTC) + timedelta(hours=1)
        for start in range(0, jobs, _ENQUEUE_CONCURRENCY):
            await asyncio.gather(
                *(
                    self.redis.enqueue_job(
                        "noop",
                        {"n": i},
                        _job_id=job_id,
                        _queue_name=RAW_QUEUE,
                        _defer_until=later,
                    )
                    for i, job_id in enumerate(ids[start : start + _ENQUEUE_CONCURRENCY], start)
                )
            )
        released = time.time()
        await self.redis.zadd(RAW_QUEUE, dict.fromkeys(ids, timestamp_ms()), xx=True)

        async def drained() -> bool:
            return int(await self.redis.zcard(RAW_QUEUE)) == 0

        await self._until(drained, timeout, f"{jobs} jobs not finished")
        stamps = await self._results(ids)
        wall = max(stamps) - released
        return {"jobs": jobs, "wall_s": wall, "jobs_per_s": jobs / wall}

    async def singles(self, jobs: int, timeout: float) -> dict[str, Any]:
        """Enqueue-to-run latency of `jobs` jobs, one at a time on an idle worker.

        Each enqueue waits a random part of `poll_delay` first, so it lands anywhere in the
        worker's poll cycle, as an independent request would (otherwise every job would
        arrive just after the worker's last poll and wait a whole `poll_delay`).
        """
        latencies: list[float] = []
        deadline = time.monotonic() + timeout
        for i in range(jobs):
            await asyncio.sleep(random.uniform(0, self.poll_delay))
            job_id = f"raw-{uuid4().hex}"
            key = result_key_prefix + job_id
            enqueued = time.time()
            await self.redis.enqueue_job("noop", {"n": i}, _job_id=job_id, _queue_name=RAW_QUEUE)

            async def finished(key: str = key) -> bool:
                return bool(await self.redis.exists(key))

            left = max(0.0, deadline - time.monotonic())
            await self._until(finished, left, "a single job lagged")
            (ran,) = await self._results([job_id])
            latencies.append((ran - enqueued) * 1000)
        return {"jobs": jobs, "latency_ms": latencies}

    async def chained(self, jobs: int, timeout: float) -> dict[str, Any]:
        """Handoffs of `jobs` jobs each enqueued by the one before: the end of job N to the
        start of job N+1, the raw arq form of the engine's step-to-step handoff."""
        prefix = f"chain-{uuid4().hex[:12]}"
        await self.redis.enqueue_job(
            "chain", prefix, jobs - 1, _job_id=f"{prefix}-{jobs - 1}", _queue_name=RAW_QUEUE
        )
        last = result_key_prefix + f"{prefix}-0"

        async def finished() -> bool:
            return bool(await self.redis.exists(last))

        await self._until(finished, timeout, f"a chain of {jobs} jobs not finished")
        stamps = await self._results([f"{prefix}-{n}" for n in range(jobs - 1, -1, -1)])
        handoffs = [(nxt[0] - cur[1]) * 1000 for cur, nxt in pairwise(stamps)]
        return {"jobs": jobs, "handoff_ms": handoffs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A raw arq worker of no-op jobs (the baseline).")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--poll-delay", type=float, required=True)
    parser.add_argument("--max-jobs", type=int, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.redis_url, args.poll_delay, args.max_jobs))


if __name__ == "__main__":
    main()
