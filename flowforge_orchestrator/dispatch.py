"""The arq adapter: queue names, job ids and payloads live here and nowhere else.

The rest of the engine says "dispatch this attempt"; this module turns it into an arq job on
the step type's queue, with the attempt id as the job id so arq drops a re-dispatch of an
attempt it already holds. Jobs are JSON, not pickle: a payload read from Redis must never be
able to run code in a worker.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import (
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
)
from arq.jobs import Job, JobStatus
from arq.utils import timestamp_ms

from flowforge_orchestrator.changes import Dispatch

__all__ = [
    "JOB_FUNCTION",
    "Dispatcher",
    "job_payload",
    "json_deserializer",
    "json_serializer",
    "queue_name",
    "redis_settings",
]

JOB_FUNCTION = "flowforge_step"
_QUEUE_PREFIX = "flowforge:queue:"


def queue_name(step_type: str) -> str:
    """One arq queue per step type, so workers serve exactly the types they register."""
    return _QUEUE_PREFIX + step_type


def json_serializer(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


def json_deserializer(data: bytes) -> dict[str, Any]:
    value = json.loads(data)
    assert isinstance(value, dict)
    return value


def redis_settings(url: str) -> RedisSettings:
    return RedisSettings.from_dsn(url)


def job_payload(dispatch: Dispatch, traceparent: str | None) -> dict[str, Any]:
    """What a worker receives: everything it needs, nothing it must look up."""
    return {
        "attempt_id": str(dispatch.attempt_id),
        "run_id": str(dispatch.run_id),
        "step_id": dispatch.step_id,
        "type": dispatch.step_type,
        "attempt": dispatch.attempt,
        "params": dispatch.params,
        "timeout": dispatch.timeout,
        "traceparent": traceparent,
        "secret_paths": dispatch.secret_paths,
    }


class Dispatcher:
    """Enqueues attempts on arq; one Redis pool per process."""

    def __init__(self, redis: ArqRedis) -> None:
        self.redis = redis

    @classmethod
    async def connect(cls, url: str) -> Dispatcher:
        pool = await create_pool(
            redis_settings(url),
            job_serializer=json_serializer,
            job_deserializer=json_deserializer,
        )
        return cls(pool)

    async def close(self) -> None:
        await self.redis.aclose(close_connection_pool=True)

    async def dispatch(self, dispatch: Dispatch, traceparent: str | None = None) -> bool:
        """Enqueue one attempt; False if arq already has a job or result with that id."""
        job = await self.redis.enqueue_job(
            JOB_FUNCTION,
            job_payload(dispatch, traceparent),
            _job_id=str(dispatch.attempt_id),
            _queue_name=queue_name(dispatch.step_type),
        )
        return job is not None

    async def dispatch_many(
        self, dispatches: Sequence[tuple[Dispatch, str | None]]
    ) -> list[BaseException | bool]:
        """Enqueue concurrently; failures are returned, not raised, so one bad job does not
        hold back the others (they stay dispatched in PostgreSQL and are re-sent later)."""
        return await asyncio.gather(
            *(self.dispatch(d, tp) for d, tp in dispatches), return_exceptions=True
        )

    async def abort(self, attempt_id: UUID) -> None:
        """Ask the worker running this attempt to cancel it (best effort)."""
        # What `Job.abort` does, without waiting for the job's result: a worker with
        # allow_abort_jobs cancels the task when it sees the id in this set.
        await self.redis.zadd(abort_jobs_ss, {str(attempt_id): timestamp_ms()})

    async def waiting(self, attempt_id: UUID, step_type: str) -> bool:
        """Whether the attempt's job is still in its queue, taken by no worker yet."""
        job = Job(str(attempt_id), self.redis, _queue_name=queue_name(step_type))
        return await job.status() in (JobStatus.queued, JobStatus.deferred)

    async def missing(self, attempt_ids: Sequence[UUID]) -> list[UUID]:
        """The attempts of which Redis knows nothing: no job, none in progress, no result."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for attempt in attempt_ids:
                pipe.exists(
                    job_key_prefix + str(attempt),
                    in_progress_key_prefix + str(attempt),
                    result_key_prefix + str(attempt),
                )
            found = await pipe.execute()
        return [a for a, count in zip(attempt_ids, found, strict=True) if not count]

    async def ping(self) -> bool:
        return bool(await self.redis.ping())
