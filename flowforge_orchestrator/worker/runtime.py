"""The worker: an arq worker per step-type queue, reporting results through PostgreSQL.

One attempt = one arq job. The worker first verifies the job (its signature, that its id
is the attempt's, that it came off its type's queue: `queue.jobs`) and refuses one that
does not verify: not run, no result written, logged and counted. It runs the step function
under the attempt's deadline, fills in `${{ secrets.X }}` only there, then writes exactly
one result row with the attempt's token (`ON CONFLICT DO NOTHING`, NOTIFY by trigger), with
every secret value and credential header redacted from it (`redaction`). A result that
cannot be written because PostgreSQL is away is kept and the write retried: a finished
attempt is never silently lost.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import ModuleType
from typing import Any, TypeVar, cast
from uuid import UUID

import httpx
from arq.typing import WorkerCoroutine
from arq.worker import Worker, func
from opentelemetry import trace
from redis.exceptions import RedisError

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core import jsonb
from flowforge_orchestrator.core.destinations import DestinationPolicy
from flowforge_orchestrator.core.expressions.templates import render_at
from flowforge_orchestrator.core.jsonb import value_problem
from flowforge_orchestrator.core.records import StepResult, json_size
from flowforge_orchestrator.errors import (
    ConfigError,
    ExpressionError,
    JobRefused,
    PayloadTooLarge,
    ServiceUnavailable,
    StepError,
    StoreError,
)
from flowforge_orchestrator.ops import health, logs, metrics, telemetry
from flowforge_orchestrator.queue.dispatch import (
    JOB_FUNCTION,
    job_deserializer,
    json_serializer,
    queue_name,
    redis_settings,
)
from flowforge_orchestrator.queue.jobs import Job, JobKeys
from flowforge_orchestrator.queue.woken import WakeableWorker
from flowforge_orchestrator.store import events as store_events
from flowforge_orchestrator.worker.heartbeats import Beat, Heartbeats
from flowforge_orchestrator.worker.redaction import (
    Redactor,
    attempt_redaction,
    check_secrets,
    credential_values,
    redact_logs,
)
from flowforge_orchestrator.worker.results import ResultWriter
from flowforge_orchestrator.worker.steps.http import run_http_step
from flowforge_orchestrator.worker.steps.http_client import make_http_client

__all__ = [
    "HAND_OFF",
    "HandOff",
    "StepContext",
    "StepFunction",
    "WorkerRuntime",
    "load_step_types",
    "run_worker",
    "step_type",
]

log = logging.getLogger(__name__)


class HandOff:
    """What a step returns (`return ctx.hand_off()`) when another system finishes its work:
    the attempt stays running until that system inserts its completion (`complete_attempt`
    with the attempt id and `ctx.completion_token`), or until the step's timeout."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "HAND_OFF"


HAND_OFF = HandOff()


@dataclass(frozen=True)
class StepContext:
    """What a step function knows about the attempt it runs.

    `last_heartbeat` is the details of the last heartbeat the previous attempt of this step
    sent (None on a first attempt): a retried long job resumes where it was."""

    run_id: UUID
    step_id: str
    attempt_id: UUID
    attempt: int
    timeout: float
    http: httpx.AsyncClient
    settings: Settings
    token: bytes = field(default=b"", repr=False)
    heartbeat_timeout: float | None = None
    last_heartbeat: Any = None
    beats: Heartbeats | None = field(default=None, repr=False, compare=False)

    @property
    def completion_token(self) -> str:
        """What the system this step hands its work to must send with its completion."""
        return self.token.hex()

    async def heartbeat(self, details: Any = None) -> None:
        """Say the step is alive, with `details` of its progress (JSON). Cheap: the worker
        writes each attempt's last beat in batches, not one write per call."""
        if self.beats is None:
            return
        problem = value_problem(details)
        if problem is not None:
            raise StepError(
                f"heartbeat details: {problem}", category="invalid_output", retryable=False
            )
        self.beats.beat(
            Beat(self.run_id, self.attempt_id, self.token, details), self.heartbeat_timeout
        )

    def hand_off(self) -> HandOff:
        """`return ctx.hand_off()`: another system completes this attempt (see HandOff)."""
        return HAND_OFF


StepFunction = Callable[[Any, StepContext], Awaitable[Any]]
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
_MARK = "__flowforge_step_type__"


def step_type(name: str) -> Callable[[F], F]:
    """Mark an async function `fn(params, ctx) -> output` as the handler of a step type."""

    def mark(fn: F) -> F:
        # Through Any: iscoroutinefunction is a TypeGuard that would narrow `fn` away from F.
        if not inspect.iscoroutinefunction(cast(Any, fn)):
            raise ConfigError(f"step type '{name}': {fn!r} must be an async function")
        setattr(fn, _MARK, name)
        return fn

    return mark


async def http_step(params: Any, ctx: StepContext) -> Any:
    """The built-in `http` type."""
    return await run_http_step(
        params,
        client=ctx.http,
        default_timeout=ctx.timeout,
        max_body_bytes=ctx.settings.max_output_bytes,
    )


BUILTIN_WORKER_TYPES: dict[str, StepFunction] = {"http": http_step}


def load_step_types(module_names: list[str]) -> dict[str, StepFunction]:
    """The built-in types plus every `@step_type` function of the named modules."""
    types = dict(BUILTIN_WORKER_TYPES)
    for name in module_names:
        try:
            module: ModuleType = importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"cannot import step module '{name}': {exc}") from exc
        found = 0
        for value in vars(module).values():
            type_name = getattr(value, _MARK, None)
            if isinstance(type_name, str):
                types[type_name] = value
                found += 1
        if not found:
            raise ConfigError(f"step module '{name}' defines no @step_type function")
    return types


def _now() -> datetime:
    return datetime.now(UTC)


def _output_size(output: object) -> int:
    """The output's size in JSON bytes; StepError (`invalid_output`, not retried) when it is
    not JSON or is nested deeper than the engine reads (`jsonb.MAX_DEPTH`)."""
    try:
        text = json.dumps(output, separators=(",", ":"), ensure_ascii=False)
        size = len(text.encode())
    except RecursionError:
        problem: str | None = f"it is nested more than {jsonb.MAX_DEPTH} levels deep"
    except (TypeError, ValueError) as exc:
        raise StepError(
            f"the step's output is not JSON: {exc}", category="invalid_output", retryable=False
        ) from exc
    else:
        problem = jsonb.text_depth_problem(text, output)
    if problem is not None:
        raise StepError(
            f"the step's output cannot be used: {problem}",
            category="invalid_output",
            retryable=False,
        )
    return size


def _error_of(exc: BaseException, timeout: float) -> dict[str, Any]:
    if isinstance(exc, StepError):
        return exc.to_dict()
    if isinstance(exc, ExpressionError):  # a missing secret: another attempt will not help
        return StepError(str(exc), category="expression_error", retryable=False).to_dict()
    if isinstance(exc, TimeoutError):
        return StepError(
            f"the attempt ran past its timeout of {timeout:g}s", category="timeout"
        ).to_dict()
    return StepError(
        f"{type(exc).__name__}: {exc}", category=type(exc).__name__, retryable=True
    ).to_dict()


class WorkerRuntime:
    """Shared state of one worker process: the database pool, HTTP client and step types."""

    def __init__(
        self,
        settings: Settings,
        pool: store.Pool,
        types: Mapping[str, StepFunction],
        keys: JobKeys,
        secrets: Mapping[str, str] | None = None,
        measures: metrics.WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = measures or metrics.WorkerMetrics(metrics.new_registry(process=False))
        self.pool = pool
        self.types = dict(types)
        self.keys = keys
        self.secrets = dict(secrets or {})
        check_secrets(self.secrets)
        self.redactor = Redactor(self.secrets.values())
        policy = DestinationPolicy.parse(settings.http_deny, settings.http_allow)
        self.http = make_http_client(policy)
        self.node = settings.node_id
        self.queues: list[Worker] = []  # arq's workers, one per step type (set once built)
        self.results = ResultWriter(pool, in_progress=self._in_progress)
        self.heartbeats = Heartbeats(self._write_beats)
        self._beating: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start writing heartbeats in the background (until `close`)."""
        if self._beating is None:
            self._beating = asyncio.create_task(self.heartbeats.run(), name="heartbeats")

    async def _write_beats(self, rows: Sequence[tuple[UUID, UUID, bytes, Any]]) -> int:
        async with self.pool.acquire() as conn:
            return await store_events.record_heartbeats(conn, rows)

    def _in_progress(self) -> int:
        """Jobs the arq workers took and have not finished: those whose results may join
        a batch. arq's own count, kept as jobs start and end: this runs at every result."""
        return sum(w.job_counter for w in self.queues)

    async def close(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
            await asyncio.gather(self._beating, return_exceptions=True)
        await self.results.close()
        await self.http.aclose()

    def open_job(
        self, job_id: str, queue: str, args: Sequence[object], kwargs: Mapping[str, object]
    ) -> Job | None:
        """The verified job behind arq's arguments (job `job_id` taken from `queue`), or
        None: refused, logged and counted."""
        try:
            return self.keys.open(job_id, queue, args, kwargs, queue_name)
        except JobRefused as exc:
            self.metrics.jobs_refused.labels(exc.reason).inc()
            # The job id (quoted and bounded: anyone may have written it) and the reason;
            # never the payload.
            log.error("job %.80r refused (%s): %s", job_id, exc.reason, exc)
            return None

    async def execute(self, job: Job) -> str:
        """Run one attempt of a verified job and report it; returns the outcome."""
        started = _now()
        redactor = self.redactor.with_values(credential_values(job.params))
        parent = telemetry.context_from_traceparent(job.traceparent)
        with telemetry.tracer().start_as_current_span(
            f"step {job.step_id}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "flowforge.run_id": str(job.run_id),
                "flowforge.step_id": job.step_id,
                "flowforge.step_type": job.type,
                "flowforge.attempt": job.attempt,
            },
        ) as span:
            context = logs.log_context(
                run_id=str(job.run_id),
                step_id=job.step_id,
                attempt=job.attempt,
                attempt_id=str(job.attempt_id),
            )
            with (
                context,
                attempt_redaction(redactor),
                self.metrics.attempt(job.type) as timer,
            ):
                outcome, output, error = self._redacted(redactor, job, *await self._run(job))
                timer.outcome = outcome
            if error is not None:
                span.set_status(trace.StatusCode.ERROR, error.get("message", ""))
            result = StepResult(
                attempt_id=job.attempt_id,
                step_id=job.step_id,
                outcome=outcome,
                output=output,
                error=error,
                started_at=started,
                finished_at=_now(),
                worker=self.node,
                run_id=job.run_id,
                token=job.token,
            )
            # Under the step's span: its result's write is a child of it, in the run's trace.
            await self._report(redactor, result)
        return outcome

    def _redacted(
        self,
        redactor: Redactor,
        job: Job,
        outcome: str,
        output: Any,
        error: dict[str, Any] | None,
    ) -> tuple[str, Any, dict[str, Any] | None]:
        """The outcome, with no secret value left in its output or error (the output's size
        checked again: `[REDACTED]` may be longer than what it replaced)."""
        if redactor.empty:
            return outcome, output, error
        # Outputs nested deeper than jsonb.MAX_DEPTH were refused already: this recursion
        # is bounded.
        output, error = redactor.value(output), redactor.value(error)
        too_large = self._too_large(job, json_size(output)) if output is not None else None
        if too_large is not None:
            return "failed", None, too_large
        return outcome, output, error

    def _too_large(self, job: Job, size: int) -> dict[str, Any] | None:
        """The failure of an output of `size` bytes over the limit (None: within it)."""
        if size > self.settings.max_output_bytes:
            too_large = PayloadTooLarge(
                step_id=job.step_id,
                what="the output",
                size=size,
                limit=self.settings.max_output_bytes,
            )
            return too_large.to_dict()
        return None

    async def _run(self, job: Job) -> tuple[str, Any, dict[str, Any] | None]:
        fn = self.types.get(job.type)
        if fn is None:
            error = StepError(
                f"this worker has no step type '{job.type}'",
                category="unknown_step_type",
                retryable=False,
            )
            return "failed", None, error.to_dict()
        timeout = job.timeout or self.settings.step_timeout
        ctx = StepContext(
            run_id=job.run_id,
            step_id=job.step_id,
            attempt_id=job.attempt_id,
            attempt=job.attempt,
            timeout=timeout,
            http=self.http,
            settings=self.settings,
            token=job.token,
            heartbeat_timeout=job.heartbeat_timeout,
            last_heartbeat=job.last_heartbeat,
            beats=self.heartbeats,
        )
        if job.heartbeat_timeout is not None:
            await ctx.heartbeat(job.last_heartbeat)  # started: the first beat
        try:
            params = job.params
            if job.secret_paths:  # only ever from a verified job: see open_job
                params = render_at(
                    params,
                    job.secret_paths,
                    {"secrets": self.secrets},
                    step_id=job.step_id,
                    field="with",
                )
            async with asyncio.timeout(timeout):
                output = await fn(params, ctx)
            size = 0 if output is HAND_OFF else _output_size(output)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return "failed", None, _error_of(exc, timeout)
        if output is HAND_OFF:
            return "handed_off", None, None
        too_large = self._too_large(job, size)
        if too_large is not None:
            return "failed", None, too_large
        return "succeeded", output, None

    async def _report(self, redactor: Redactor, result: StepResult) -> None:
        """Store the result with those that finish at the same time, in one transaction."""
        try:
            await self.results.write(result)
        except StoreError as exc:
            # The database refused this result (e.g. a NUL character, which JSONB cannot
            # hold): report the attempt as failed, so the run records why and goes on. The
            # database's message may quote the value: it is redacted like the rest.
            reason = redactor.text(str(exc))
            log.error("result of attempt %s refused: %s", result.attempt_id, reason)
            error = StepError(
                f"the step's result could not be stored: {reason}",
                category="unstorable_result",
                retryable=False,
            )
            failed = replace(
                result, outcome="failed", output=None, error=error.to_dict(), finished_at=_now()
            )
            await self.results.write(failed)


def _job_function(runtime: WorkerRuntime, queue: str) -> WorkerCoroutine:
    """arq's entry point for one queue: whatever the queue holds arrives here, and is
    verified first. From arq's context it reads only the job's id and enqueue time."""

    async def run(ctx: Mapping[str, object], *args: object, **kwargs: object) -> str:
        job = runtime.open_job(str(ctx.get("job_id")), queue, args, kwargs)
        if job is None:
            return "refused"  # no result row: the orchestrator's deadline or reconciler acts
        enqueued = ctx.get("enqueue_time")
        if isinstance(enqueued, datetime):
            runtime.metrics.observe_queue_wait(job.type, enqueued, _now())
        return await runtime.execute(job)

    return run


async def _serve_health(
    settings: Settings, measures: metrics.WorkerMetrics, checks: Mapping[str, health.ReadinessCheck]
) -> health.HealthServer | None:
    """The worker's probes and metrics, or None (port 0, or a port that is taken: logged,
    not fatal, as for the orchestrator)."""
    if settings.http_port == 0:
        return None
    server = health.HealthServer(
        host=settings.http_host, port=settings.http_port, registry=measures.registry, checks=checks
    )
    try:
        await server.__aenter__()
    except (OSError, ConfigError) as exc:  # the port is taken
        log.error("%s", exc)
        return None
    return server


REDIS_RETRY_MAX = 1.0  # seconds: a Redis that is back is used within about this


async def _serve_queue(worker: WakeableWorker, give_up: float) -> None:
    """arq's poll loop, started again when Redis goes away (arq lets the error out): a
    restarted or failed-over Redis must not end the worker. Attempts in flight go on; their
    results go to PostgreSQL, which needs no Redis. Tries again at most a second apart, and
    warns once per outage; the pool's idle connections, which the server closed, are
    dropped rather than kept half-closed.

    An outage (failures with no poll that reached Redis in between) that lasts `give_up`
    seconds (0: no limit) is a Redis that moved or is gone for good: ServiceUnavailable
    then, so the process exits and says so (code 3), where polling on would wait forever
    for a server that is not coming back."""
    loop = asyncio.get_running_loop()
    delay, failed_at = 0.1, None
    began, polled = 0.0, worker.last_polled  # when this outage began; the poll before it
    while True:
        try:
            await worker.main()
            return
        except (OSError, RedisError) as exc:
            now = loop.time()
            if failed_at is None or now - failed_at > 5 * REDIS_RETRY_MAX:  # a new outage
                delay = 0.1
                log.warning(
                    "queue %s: Redis failed (%s); trying again until it answers%s",
                    worker.queue_name,
                    exc,
                    f" (for up to {give_up:g}s)" if give_up else "",
                )
            if failed_at is None or worker.last_polled != polled:  # Redis was reached since
                began, polled = now, worker.last_polled
            failed_at = now
            unreached = now - began
            if give_up and unreached >= give_up:
                raise ServiceUnavailable(
                    f"Redis not reached for {unreached:.0f}s ({exc}); the worker gives up "
                    f"(FLOWFORGE_WORKER_REDIS_GIVE_UP={give_up:g}): check FLOWFORGE_REDIS_URL, "
                    "then start it again"
                ) from exc
            await worker.drop_idle_connections()
            await asyncio.sleep(delay)
            delay = min(delay * 2, REDIS_RETRY_MAX)


async def run_worker(
    settings: Settings,
    types: Mapping[str, StepFunction],
    *,
    queues: list[str] | None = None,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
    secrets: Mapping[str, str] | None = None,
    measures: metrics.WorkerMetrics | None = None,
    serve_http: bool = True,
) -> None:
    """Serve the given step types until `stop` is set (or cancellation); with an HTTP port
    and `serve_http`, also /healthz, /readyz and /metrics."""
    if not settings.database_url or not settings.redis_url:
        raise ConfigError("the worker needs FLOWFORGE_DATABASE_URL and FLOWFORGE_REDIS_URL")
    keys = JobKeys.required(
        settings.job_key.get_secret_value() if settings.job_key else None, "worker"
    )
    check_secrets(secrets or {})
    served = sorted(queues or types)
    unknown = [t for t in served if t not in types]
    if unknown:
        raise ConfigError(f"no step function for type(s): {', '.join(unknown)}")
    # A worker (re)started while PostgreSQL restarts waits for it, as the orchestrator does,
    # rather than exiting and leaving its restart to the supervisor's backoff.
    dsn, size = settings.database_url, max(2, settings.worker_max_jobs // 2)
    pool = await store.retrying(
        lambda: store.create_pool(dsn, size=size), what="connecting to PostgreSQL", attempts=30
    )
    measures = measures or metrics.WorkerMetrics(metrics.new_registry())
    measures.serves(served)
    runtime = WorkerRuntime(settings, pool, types, keys, secrets, measures)
    runtime.start()
    stop_redacting = redact_logs(runtime.redactor)
    try:

        async def register() -> None:
            async with pool.acquire() as conn:
                await store.register_step_types(conn, served, settings.node_id)

        await store.retrying(register, what="registering step types", attempts=30)
        workers = [
            WakeableWorker(
                [func(_job_function(runtime, queue_name(t)), name=JOB_FUNCTION, max_tries=1)],
                queue_name=queue_name(t),
                redis_settings=redis_settings(settings.redis_url),
                handle_signals=False,
                max_jobs=settings.worker_max_jobs,
                poll_delay=settings.worker_poll_delay,
                job_timeout=24 * 3600,  # the attempt's own deadline applies inside the job
                keep_result=60,
                allow_abort_jobs=True,
                job_serializer=json_serializer,
                job_deserializer=job_deserializer,
                log_results=False,
                worker_name=settings.node_id,
            )
            for t in served
        ]
        runtime.queues = list(workers)
        stop = stop or asyncio.Event()
        give_up = settings.worker_redis_give_up
        tasks = [asyncio.create_task(_serve_queue(w, give_up)) for w in workers]
        checks = {
            "database": health.database_check(functools.partial(store.answers, pool)),
            "redis": health.redis_check(lambda: workers[0].pool.ping()),  # None until up
            "migrations": health.migrations_check(
                functools.partial(store.missing_migrations, pool)
            ),
        }
        served_http = await _serve_health(settings, measures, checks) if serve_http else None
        log.info("worker %s serving step types: %s", settings.node_id, ", ".join(served))
        if ready is not None:
            ready.set()
        try:
            waiter = asyncio.create_task(stop.wait())
            await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            for task in tasks:
                if task.done() and task.exception():
                    raise task.exception()  # type: ignore[misc]
        finally:
            # Stop picking, let in-flight attempts finish (bounded), then close: cancelling
            # a job mid-pipeline would leak its Redis connection and waste the attempt.
            for w in workers:
                w.allow_pick_jobs = False
            running = [t for w in workers for t in w.tasks.values() if not t.done()]
            if running:
                await asyncio.wait(running, timeout=settings.worker_shutdown_grace)
            # Probes are answered through the drain; not once the pools close (a readiness
            # check under way would open a connection on a closed pool).
            if served_http is not None:
                await served_http.__aexit__(None, None, None)
            for task in tasks:  # the poll loops first, so nothing reopens a connection
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(w.aclose() for w in workers), return_exceptions=True)
    finally:
        stop_redacting()
        await runtime.close()
        await pool.close()
