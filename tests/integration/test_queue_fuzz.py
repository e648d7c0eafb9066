"""Whatever a Redis client pushes onto the queues, a worker runs only signed jobs, and lives.

A real worker (in process) serves a counting step type on a real Redis. Hypothesis pushes
random bytes, mutated real jobs (their envelope, their payload, their signature, their
bytes), odd queue members and scores; after each batch the counting step has never run,
the worker still serves, and a good job still runs, once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any
from uuid import UUID, uuid4

import pytest
import redis.asyncio
from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.expressions.templates import render_at
from flowforge_orchestrator.core.records import Dispatch
from flowforge_orchestrator.core.tokens import AttemptTokens
from flowforge_orchestrator.ops import metrics
from flowforge_orchestrator.queue.dispatch import (
    JOB_FUNCTION,
    Dispatcher,
    job_arguments,
    json_serializer,
    queue_name,
)
from flowforge_orchestrator.queue.jobs import JobKeys
from flowforge_orchestrator.queue.woken import wake_channel
from flowforge_orchestrator.worker.runtime import StepContext, run_worker
from tests.helpers import wait_for

log = logging.getLogger(__name__)

QUEUE = queue_name("count")
SECRETS = {"TOKEN": "fuzz-secret-value"}


@dataclass
class Served:
    """A running worker, what its step saw, and how to send it jobs."""

    settings: Settings
    keys: JobKeys
    tokens: AttemptTokens
    redis: redis.asyncio.Redis
    conn: store.Connection
    dispatcher: Dispatcher
    measures: metrics.WorkerMetrics
    task: asyncio.Task[None]
    ran: list[dict[str, Any]]
    sent: dict[UUID, Dispatch] = field(default_factory=dict)  # every job this test sealed

    def dispatch(
        self, params: Any = None, secret_paths: list[list[str | int]] | None = None
    ) -> Dispatch:
        return Dispatch(
            attempt_id=uuid4(),
            run_id=uuid4(),
            step_id="count",
            step_type="count",
            attempt=1,
            params=params if params is not None else {"n": 1},
            timeout=10.0,
            secret_paths=secret_paths or [],
        )

    def sealed(self, dispatch: Dispatch, queue: str = QUEUE) -> bytes:
        """The bytes arq keeps for a real job of `dispatch`."""
        args = job_arguments(dispatch, None, self.keys, self.tokens)
        return serialize_job(
            JOB_FUNCTION, args, {}, None, timestamp_ms(), serializer=json_serializer
        )

    async def push(self, job_id: bytes | str, value: bytes | None, score: float) -> None:
        """What any Redis client can do: a job key and a queue member, then the wake-up."""
        member = job_id.encode() if isinstance(job_id, str) else job_id
        if value is not None:
            await self.redis.set(job_key_prefix.encode() + member, value, px=60_000)
        await self.redis.zadd(QUEUE, {member: score})

    async def wake(self) -> None:
        await self.redis.publish(wake_channel(QUEUE), "")

    async def drained(self) -> bool:
        if self.task.done():  # fail at once, with the reason, rather than at the deadline
            raise AssertionError(f"the worker stopped: {self.task!r}")
        return bool(await self.redis.zcard(QUEUE) == 0)

    async def result_of(self, attempt: UUID) -> bool:
        count = await self.conn.fetchval(
            "SELECT count(*) FROM flowforge.step_results WHERE attempt_id = $1", attempt
        )
        return bool(count)

    async def good_job_runs(self) -> None:
        """A real job still runs, once, and its result is written."""
        before = len(self.ran)
        dispatch = self.dispatch()
        assert await self.dispatcher.dispatch(dispatch)
        await wait_for(lambda: self.result_of(dispatch.attempt_id), message="a good job never ran")
        assert len(self.ran) == before + 1
        assert not self.task.done(), self.task

    def refused(self, reason: str) -> float:
        value = self.measures.registry.get_sample_value(
            "flowforge_worker_jobs_refused_total", {"reason": reason}
        )
        return value or 0.0


@pytest.fixture
async def served(settings: Settings) -> AsyncIterator[Served]:
    ran: list[dict[str, Any]] = []

    async def count(params: Any, ctx: StepContext) -> Any:
        ran.append(
            {
                "params": params,
                "attempt": str(ctx.attempt_id),
                "seen": (ctx.run_id, ctx.step_id, ctx.attempt, ctx.timeout),
            }
        )
        return {"counted": len(ran)}

    keys = JobKeys.parse(settings.job_key.get_secret_value() if settings.job_key else "")
    measures = metrics.WorkerMetrics(metrics.new_registry(process=False))
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        run_worker(
            settings,
            {"count": count},
            stop=stop,
            ready=ready,
            secrets=SECRETS,
            measures=measures,
            serve_http=False,
        )
    )
    await asyncio.wait_for(ready.wait(), 20)
    conn = await store.connect(settings.database_url or "")
    tokens = AttemptTokens(await store.engine_secret(conn))
    client = redis.asyncio.Redis.from_url(settings.redis_url or "")
    dispatcher = await Dispatcher.connect(settings.redis_url or "", keys, tokens)
    try:
        yield Served(settings, keys, tokens, client, conn, dispatcher, measures, task, ran)
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await dispatcher.close()
        await client.aclose()
        await conn.close()


# -- what gets pushed --------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# For each field of a job's payload, values a forger would write.
WELL_TYPED: dict[str, st.SearchStrategy[Any]] = {
    "params": JSON | st.fixed_dictionaries({"url": st.just("https://attacker.test/")}),
    "step_id": st.text(min_size=1, max_size=10),
    "run_id": st.uuids().map(str),
    "attempt": st.integers(1, 10),
    "timeout": st.floats(0.5, 100),
    "secret_paths": st.lists(st.lists(st.text(max_size=8), max_size=3), max_size=2),
    "token": st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
    "type": st.sampled_from(["count", "http"]),
    "attempt_id": st.uuids().map(str),
    "traceparent": st.none() | st.text(max_size=60),
}
SCORES = st.sampled_from([float("-inf"), -1.0, 0.0, 1.0]) | st.just(None)  # None: now


@dataclass(frozen=True)
class Garbage:
    kind: str
    job_id: bytes | str
    value: bytes | None
    score: float | None
    # The attempt whose signed job this may still be (under its own id, the signed text
    # untouched: e.g. a flipped byte in arq's enqueue time): that one may run, nothing else.
    genuine: UUID | None = None


def _envelope(served: Served, dispatch: Dispatch) -> dict[str, Any]:
    envelope: dict[str, Any] = json.loads(served.sealed(dispatch))
    return envelope


@st.composite
def garbage(draw: st.DrawFn, served: Served) -> Garbage:
    kind = draw(
        st.sampled_from(
            ["bytes", "envelope", "payload", "signature", "flip", "new_id", "member", "queue"]
        )
    )
    score = draw(SCORES)
    new_id = str(uuid4())
    if draw(st.booleans()):  # with a secret to fill in, or without (its params show)
        dispatch = served.dispatch(
            {"n": 1, "headers": {"Authorization": "${{ secrets.TOKEN }}"}},
            [["headers", "Authorization"]],
        )
    else:
        dispatch = served.dispatch({"n": draw(st.integers())})
    served.sent[dispatch.attempt_id] = dispatch
    job_id = str(dispatch.attempt_id)
    genuine = dispatch.attempt_id
    if kind == "bytes":
        return Garbage(kind, new_id, draw(st.binary(max_size=200)), score)
    if kind == "member":  # an id that is not even text, with or without a job behind it
        raw = b"\xff\xfe" + draw(st.binary(max_size=20))
        return Garbage(kind, raw, draw(st.none() | st.binary(max_size=50)), score)
    if kind == "queue":  # a real job of another type, pushed onto this queue
        other = replace(dispatch, step_type="other")
        args = job_arguments(other, None, served.keys, served.tokens)
        value = serialize_job(
            JOB_FUNCTION, args, {}, None, timestamp_ms(), serializer=json_serializer
        )
        return Garbage(kind, job_id, value, score)
    envelope = _envelope(served, dispatch)
    if kind == "envelope":
        name = draw(st.sampled_from(["f", "a", "k", "t", "et"]))
        envelope[name] = draw(JSON | st.integers(min_value=2**47, max_value=2**80))
        return Garbage(kind, job_id, json.dumps(envelope).encode(), score, genuine)
    if kind == "payload":
        payload = json.loads(envelope["a"][0])
        name = draw(st.sampled_from(sorted(WELL_TYPED)))
        # Often a value of the right type: only the signature can tell the change.
        payload[name] = draw(WELL_TYPED[name] | JSON)
        envelope["a"][0] = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return Garbage(kind, job_id, json.dumps(envelope).encode(), score, genuine)
    if kind == "signature":
        envelope["a"][1:] = draw(
            st.lists(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), max_size=2)
        )
        return Garbage(kind, job_id, json.dumps(envelope).encode(), score, genuine)
    if kind == "flip":
        flipped = bytearray(served.sealed(dispatch))
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(flipped) - 1))
            flipped[i] = draw(st.integers(0, 255))
        return Garbage(kind, job_id, bytes(flipped), score, genuine)
    # new_id: the real job, untouched, under another id
    return Garbage(kind, new_id, served.sealed(dispatch), score)


@settings(
    database=None,
    derandomize=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_nothing_but_signed_jobs_ever_runs_and_the_worker_lives(
    served: Served, data: st.DataObject
) -> None:
    batch = data.draw(st.lists(garbage(served), min_size=1, max_size=5), label="batch")
    now = timestamp_ms()
    before = len(served.ran)
    for item in batch:
        score = now if item.score is None else item.score
        await served.push(item.job_id, item.value, score)
    await served.wake()
    await wait_for(served.drained, timeout=15, message=f"the queue kept {batch}")
    # Only a job whose signed text survived, under its own attempt id, may have run: the
    # job the orchestrator sent, with the parameters it sent.
    genuine = {item.genuine for item in batch if item.genuine is not None}
    for ran in served.ran[before:]:
        attempt = UUID(ran["attempt"])
        assert attempt in genuine, ran
        sent = served.sent[attempt]
        assert ran["seen"] == (sent.run_id, sent.step_id, sent.attempt, sent.timeout), ran
        assert ran["params"] == render_at(
            sent.params, [tuple(p) for p in sent.secret_paths], {"secrets": SECRETS}
        )
    assert len({r["attempt"] for r in served.ran[before:]}) == len(served.ran[before:])
    await served.good_job_runs()


async def test_a_real_job_altered_or_copied_under_a_new_id_is_refused(served: Served) -> None:
    """The probe: a real job copied in Redis, its URL and secret paths changed, enqueued
    again under a new id; and the real one, untouched, under a new id."""
    seed = random.randrange(2**32)
    log.info("seed %d", seed)
    rng = random.Random(seed)
    dispatch = served.dispatch({"url": "https://real.test/", "headers": {}}, [])
    original = served.sealed(dispatch)
    envelope = json.loads(original)
    payload = json.loads(envelope["a"][0])
    payload["params"] = {
        "url": f"https://attacker.test/{rng.randrange(10**6)}",
        "headers": {"Authorization": "${{ secrets.TOKEN }}"},
    }
    payload["secret_paths"] = [["headers", "Authorization"]]
    envelope["a"][0] = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    altered_id, copied_id = str(uuid4()), str(uuid4())
    payload_at_new_id = dict(payload, attempt_id=altered_id)
    envelope_at_new_id = dict(envelope, a=[json.dumps(payload_at_new_id), envelope["a"][1]])
    now = timestamp_ms()
    await served.push(altered_id, json.dumps(envelope_at_new_id).encode(), now)
    await served.push(copied_id, original, now)
    await served.wake()
    await wait_for(served.drained, message="the forged jobs stayed queued")
    assert served.ran == []
    assert served.refused("bad_signature") == 1
    assert served.refused("wrong_job_id") == 1
    await served.good_job_runs()
