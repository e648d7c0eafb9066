"""The arq adapter against a real Redis: batched enqueue of signed jobs, arq's view of the
jobs, abort."""

from __future__ import annotations

from uuid import uuid4

from arq.constants import abort_jobs_ss
from arq.jobs import Job, JobStatus

from flowforge_orchestrator.core.records import Dispatch
from flowforge_orchestrator.core.tokens import AttemptTokens
from flowforge_orchestrator.queue.dispatch import (
    Dispatcher,
    job_arguments,
    json_deserializer,
    queue_name,
)
from flowforge_orchestrator.queue.jobs import JobKeys
from tests.conftest import TEST_JOB_KEY

KEYS = JobKeys.parse(TEST_JOB_KEY)
TOKENS = AttemptTokens(bytes(range(32)))


def _dispatch(step_type: str = "http") -> Dispatch:
    return Dispatch(
        attempt_id=uuid4(),
        run_id=uuid4(),
        step_id="s",
        step_type=step_type,
        attempt=1,
        params={"url": "https://x.test/"},
        timeout=30.0,
    )


async def test_a_batch_is_enqueued_once_and_arq_reads_it_as_its_own(redis_url: str) -> None:
    dispatcher = await Dispatcher.connect(redis_url, KEYS, TOKENS)
    try:
        first, second = _dispatch(), _dispatch("sms")
        outcomes = await dispatcher.dispatch_many([(first, "00-tp"), (second, None)])
        assert outcomes == [True, True]
        # Sent again (after a crash, by the reconciler): arq already holds them.
        assert await dispatcher.dispatch_many([(first, "00-tp"), (second, None)]) == [
            False,
            False,
        ]
        assert not await dispatcher.dispatch(first)

        job = Job(
            str(first.attempt_id),
            dispatcher.redis,
            _queue_name=queue_name("http"),
            _deserializer=json_deserializer,
        )
        assert await job.status() is JobStatus.queued
        info = await job.info()
        assert info is not None
        assert info.function == "flowforge_step"
        assert list(info.args) == list(job_arguments(first, "00-tp", KEYS, TOKENS))
        # What a worker opens: the attempt as dispatched, with its token.
        opened = KEYS.open(str(first.attempt_id), queue_name("http"), info.args, {}, queue_name)
        assert (opened.attempt_id, opened.run_id, opened.params, opened.traceparent) == (
            first.attempt_id,
            first.run_id,
            first.params,
            "00-tp",
        )
        assert opened.token == TOKENS.token(first.attempt_id)
        assert await dispatcher.waiting([(second.attempt_id, "sms")]) == [True]

        await dispatcher.abort(first.attempt_id)
        assert await dispatcher.redis.zscore(abort_jobs_ss, str(first.attempt_id)) is not None
    finally:
        await dispatcher.close()


async def test_missing_names_the_attempts_redis_knows_nothing_of(redis_url: str) -> None:
    dispatcher = await Dispatcher.connect(redis_url, KEYS, TOKENS)
    try:
        known, unknown = _dispatch(), uuid4()
        await dispatcher.dispatch(known)
        assert await dispatcher.missing([known.attempt_id, unknown]) == [unknown]
    finally:
        await dispatcher.close()
