"""The arq adapter: queue names, job ids and payloads live here and nowhere else.

The rest of the engine says "dispatch this attempt"; this module turns it into an arq job on
the step type's queue, with the attempt id as the job id so arq drops a re-dispatch of an
attempt it already holds. Jobs are JSON, not pickle: a payload read from Redis must never be
able to run code in a worker. Each job is signed, and carries its attempt's result token
(`queue.jobs`, `core.tokens`): its arguments are (payload text, signature).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from arq.connections import ArqRedis, RedisSettings
from arq.constants import (
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
)
from arq.jobs import serialize_job
from arq.utils import timestamp_ms

from flowforge_orchestrator.core.records import Dispatch
from flowforge_orchestrator.core.tokens import AttemptTokens
from flowforge_orchestrator.errors import ConfigError
from flowforge_orchestrator.queue.jobs import Job, JobKeys
from flowforge_orchestrator.queue.pools import open_pool

__all__ = [
    "JOB_FUNCTION",
    "Dispatcher",
    "job_arguments",
    "job_deserializer",
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


# Enqueue times arq can turn into a datetime (milliseconds; up to the year 6400).
_MAX_TIME_MS = 2**47


def job_deserializer(data: bytes) -> dict[str, Any]:
    """A worker's reading of a job: JSON whose envelope has the types arq relies on. What
    fails here is a job arq refuses cleanly (it records the failure and goes on); a field of
    the wrong type would otherwise break arq inside its job runner, beyond our reach."""
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("a job is a JSON object")
    function, args, kwargs = value.get("f"), value.get("a"), value.get("k")
    tries, enqueued = value.get("t"), value.get("et")
    if not isinstance(function, str) or not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError("a job's function, args and kwargs are a string, a list and an object")
    if tries is not None and (not isinstance(tries, int) or isinstance(tries, bool)):
        raise ValueError("a job's try count is an integer")
    if not isinstance(enqueued, int) or isinstance(enqueued, bool):
        raise ValueError("a job's enqueue time is an integer")
    if not 0 <= enqueued < _MAX_TIME_MS:
        raise ValueError("a job's enqueue time is out of range")
    return value


def redis_settings(url: str) -> RedisSettings:
    return RedisSettings.from_dsn(url)


def job_arguments(
    dispatch: Dispatch, traceparent: str | None, keys: JobKeys, tokens: AttemptTokens
) -> tuple[str, str]:
    """What a worker receives, signed: everything it needs, nothing it must look up."""
    job = Job(
        attempt_id=dispatch.attempt_id,
        run_id=dispatch.run_id,
        step_id=dispatch.step_id,
        type=dispatch.step_type,
        attempt=dispatch.attempt,
        params=dispatch.params,
        timeout=dispatch.timeout,
        traceparent=traceparent,
        secret_paths=tuple(tuple(path) for path in dispatch.secret_paths),
        token=tokens.token(dispatch.attempt_id),
        heartbeat_timeout=dispatch.heartbeat_timeout,
        last_heartbeat=dispatch.last_heartbeat,
    )
    return keys.seal(job, queue_name(dispatch.step_type))


_BATCH = 500  # jobs per script call: bounded, so Redis is never blocked for long

# KEYS: (job key, result key, queue) per job; ARGV: (job id, payload, score, expires ms).
# Each queue that got a job is told on its wake channel (queue.woken.wake_channel).
_ENQUEUE = """
local created, woken = {}, {}
for i = 0, #KEYS / 3 - 1 do
    local job, result, queue = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
    local id, payload = ARGV[4 * i + 1], ARGV[4 * i + 2]
    local score, expires = ARGV[4 * i + 3], ARGV[4 * i + 4]
    if redis.call('EXISTS', job, result) == 0 then
        redis.call('PSETEX', job, expires, payload)
        redis.call('ZADD', queue, score, id)
        created[i + 1] = 1
        woken[queue] = true
    else
        created[i + 1] = 0
    end
end
for queue in pairs(woken) do
    redis.call('PUBLISH', 'flowforge:wake:' .. queue, '')
end
return created
"""


class Dispatcher:
    """Enqueues attempts on arq, signed with `keys` and carrying their `tokens`; one Redis
    pool per process. (Without keys and tokens it only reads Redis: probes, checks.)"""

    def __init__(
        self, redis: ArqRedis, keys: JobKeys | None = None, tokens: AttemptTokens | None = None
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.tokens = tokens
        self._script = redis.register_script(_ENQUEUE)

    @classmethod
    async def connect(
        cls, url: str, keys: JobKeys | None = None, tokens: AttemptTokens | None = None
    ) -> Dispatcher:
        pool = await open_pool(
            redis_settings(url),
            job_serializer=json_serializer,
            job_deserializer=json_deserializer,
        )
        return cls(pool, keys, tokens)

    async def close(self) -> None:
        await self.redis.aclose(close_connection_pool=True)

    async def dispatch(self, dispatch: Dispatch, traceparent: str | None = None) -> bool:
        """Enqueue one attempt; False if arq already has a job or result with that id."""
        (outcome,) = await self.dispatch_many([(dispatch, traceparent)])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def dispatch_many(
        self, dispatches: Sequence[tuple[Dispatch, str | None]]
    ) -> list[BaseException | bool]:
        """Enqueue a batch in one round trip per `_BATCH` jobs; for each, whether it was new
        (False: arq holds a job or a result with that id already). A batch Redis refuses is
        returned as its exception for each of its jobs, not raised: they stay dispatched in
        PostgreSQL and are sent again later."""
        outcomes: list[BaseException | bool] = []
        for start in range(0, len(dispatches), _BATCH):
            chunk = dispatches[start : start + _BATCH]
            try:
                created = await self._enqueue(chunk)
            except Exception as exc:
                outcomes.extend(exc for _ in chunk)
            else:
                outcomes.extend(bool(flag) for flag in created)
        return outcomes

    async def _enqueue(self, chunk: Sequence[tuple[Dispatch, str | None]]) -> list[int]:
        """What `ArqRedis.enqueue_job` does (a job key unless it or a result exists, and the
        id on the queue), for many jobs in one script: arq's own takes three round trips and
        a connection per job."""
        if self.keys is None or self.tokens is None:
            raise ConfigError("this dispatcher has no job key and attempt tokens to send jobs")
        now = timestamp_ms()
        keys: list[str] = []
        args: list[str | bytes | int] = []
        for dispatch, traceparent in chunk:
            job_id = str(dispatch.attempt_id)
            keys += [
                job_key_prefix + job_id,
                result_key_prefix + job_id,
                queue_name(dispatch.step_type),
            ]
            payload = serialize_job(
                JOB_FUNCTION,
                job_arguments(dispatch, traceparent, self.keys, self.tokens),
                {},
                None,
                now,
                serializer=json_serializer,
            )
            args += [job_id, payload, now, self.redis.expires_extra_ms]
        return list(await self._script(keys=keys, args=args))

    async def abort(self, *attempt_ids: UUID) -> None:
        """Ask the workers running these attempts to cancel them (best effort)."""
        # What `Job.abort` does, without waiting for the jobs' results: a worker with
        # allow_abort_jobs cancels the task when it sees the id in this set.
        now = timestamp_ms()
        await self.redis.zadd(abort_jobs_ss, {str(a): now for a in attempt_ids})

    async def waiting(self, attempts: Sequence[tuple[UUID, str]]) -> list[bool]:
        """For each (attempt, step type): whether its job is still in its queue, taken by
        no worker yet (arq's `Job.status` queued or deferred, for all in one round trip)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for attempt, step_type in attempts:
                pipe.exists(result_key_prefix + str(attempt), in_progress_key_prefix + str(attempt))
                pipe.zscore(queue_name(step_type), str(attempt))
            found = await pipe.execute()
        return [
            not taken and score is not None
            for taken, score in zip(found[0::2], found[1::2], strict=True)
        ]

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
