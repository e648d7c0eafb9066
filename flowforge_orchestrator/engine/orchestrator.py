"""The orchestrator daemon: claims runs, drives their graphs, group-commits, dispatches.

It is composed of parts, each with its own state, sharing one event loop and never
blocking each other:

* `OwnedRuns` (owned):      the runs owned here, their outstanding attempts, what waits;
* `Claimer` (claimer):      NOTIFY on `flowforge_runs` or the slow poll -> lock runs, build
                            their graphs, write their first transitions, take the lease;
* `ResultApplier` (results): NOTIFY on `flowforge_results` (payload: attempt ids) or the
                            slow poll -> fetch those results, apply them to the graphs;
* `Committer` (committer):  whatever the graphs changed since the last commit goes out in
                            ONE statement; only after it is durable are attempts enqueued;
* `Timekeeper` (timekeeper): the runs' next timers (`timers`), one loop sleeping until
                            the earliest;
* `EventDelivery` (eventing): NOTIFY on `flowforge_events` -> the wait steps the new
                            events concern take the oldest they may;
* `Hibernation` (hibernation): runs parked on a far timer or an event leave memory with
                            their commit; it wakes them when due, or called by an event
                            or a cancellation;
* `Liveness` (liveness):     holds this node's lock on a session of its own; ends the
                            leases of owners whose session died, so they fail over at once;
* `LeaseKeeper` (leases), `CancellationWatcher` (cancels), `Reconciler` (reconciler).

`run_orchestrator` is the process around it: pool, Redis, health and metrics endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from datetime import UTC, datetime
from uuid import UUID

from opentelemetry import trace
from prometheus_client import CollectorRegistry

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.expressions.cost import Budget
from flowforge_orchestrator.core.expressions.templates import Evaluator
from flowforge_orchestrator.core.records import Limits, RunChanges, StepResult
from flowforge_orchestrator.core.state import RunStatus
from flowforge_orchestrator.core.tokens import AttemptTokens, RefusedResult, ResultVerifier
from flowforge_orchestrator.engine.background import Background
from flowforge_orchestrator.engine.beats import HeartbeatWatcher
from flowforge_orchestrator.engine.cancels import CancellationWatcher
from flowforge_orchestrator.engine.children import end_child_spans
from flowforge_orchestrator.engine.claimer import Claimer
from flowforge_orchestrator.engine.committer import Committer
from flowforge_orchestrator.engine.eventing import EventDelivery
from flowforge_orchestrator.engine.hibernation import Hibernation
from flowforge_orchestrator.engine.leases import LeaseKeeper
from flowforge_orchestrator.engine.listener import Listener
from flowforge_orchestrator.engine.liveness import Liveness
from flowforge_orchestrator.engine.owned import Owned, OwnedRuns
from flowforge_orchestrator.engine.parking import park_until
from flowforge_orchestrator.engine.reconciler import Reconciler
from flowforge_orchestrator.engine.results import ResultApplier
from flowforge_orchestrator.engine.retention import Retention
from flowforge_orchestrator.engine.sampler import run_sampler
from flowforge_orchestrator.engine.sandbox.pool import BoundedEvaluator, Sandbox
from flowforge_orchestrator.engine.timekeeper import Timekeeper
from flowforge_orchestrator.errors import ConfigError, FlowForgeError
from flowforge_orchestrator.ops import health, metrics, sdnotify
from flowforge_orchestrator.queue.dispatch import Dispatcher
from flowforge_orchestrator.queue.jobs import JobKeys
from flowforge_orchestrator.store import events as store_events

__all__ = ["Orchestrator", "run_orchestrator"]

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


async def _supervised(name: str, loop: Callable[[], Awaitable[None]]) -> None:
    """Run a loop forever: a bug in one iteration is logged, never fatal to the daemon."""
    while True:
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the %s loop failed; restarting it", name)
            await asyncio.sleep(1.0)


class Orchestrator:
    """One replica. `run()` until `stop` is set; every run it owns is in `self.runs`."""

    def __init__(
        self,
        settings: Settings,
        pool: store.Pool,
        dispatcher: Dispatcher,
        *,
        tokens: AttemptTokens,
        clock: Callable[[], datetime] = _utcnow,
        measures: metrics.OrchestratorMetrics | None = None,
        evaluator: Evaluator | None = None,
    ) -> None:
        """`evaluator` bounds every CEL evaluation (`run_orchestrator` gives a sandboxed
        one); None evaluates in process, unbounded."""
        assert settings.database_url is not None
        self.settings = settings
        self.pool = pool
        self.dispatcher = dispatcher
        # Every read of results goes through it: only rows with their attempt's token count.
        self.verifier = ResultVerifier(tokens, on_refused=self._result_refused)
        self.tokens = tokens
        self.clock = clock
        self.node = settings.node_id
        self.metrics = measures or metrics.OrchestratorMetrics(metrics.new_registry(process=False))
        self.runs = OwnedRuns()
        self.metrics.active_runs.set_function(lambda: len(self.runs))
        self.background = Background()
        self._committing = False
        self._wake_commit = asyncio.Event()
        self._compose_writers(evaluator)
        self._compose_watchers()
        self.listener = Listener(
            settings.database_url,
            {
                "flowforge_runs": self._on_run_notify,
                "flowforge_results": self._on_result_notify,
                "flowforge_cancel": self._on_cancel_notify,
                "flowforge_completions": self._on_completion_notify,
                "flowforge_events": self._on_event_notify,
            },
            on_connect=self._reconnected,
        )
        self.ready = asyncio.Event()

    def _compose_writers(self, evaluator: Evaluator | None) -> None:
        """The parts that write the owned runs' rows: claims, commits, leases."""
        # The group commit and the lease renewal update the same run rows, each in its own
        # order: run at once, they can deadlock each other. One at a time, they cannot.
        owned_rows = asyncio.Lock()
        settings = self.settings
        limits = Limits(
            max_output_bytes=settings.max_output_bytes,
            max_context_bytes=settings.max_context_bytes,
            default_timeout=settings.step_timeout,
            max_child_depth=settings.max_child_depth,
        )
        self.claimer = Claimer(
            settings,
            self.pool,
            self.metrics,
            self.runs,
            verifier=self.verifier,
            limits=limits,
            evaluator=evaluator,
            clock=self.clock,
            claimed=self._claimed,
            may_claim=lambda: self.liveness.held,
        )
        self.committer = Committer(
            settings,
            self.pool,
            self.metrics,
            self.runs,
            owned_rows=owned_rows,
            clock=self.clock,
            committed=self._committed,
            changed=self._changed,
            drop=self._drop,
        )
        self.leases = LeaseKeeper(
            settings,
            self.pool,
            self.metrics,
            self.runs,
            owned_rows=owned_rows,
            drop=self._drop,
            wake_claim=self.claimer.wake.set,
        )
        self.liveness = Liveness(
            settings,
            self.metrics,
            owned=self.runs.ids,
            wake_claim=self.claimer.wake.set,
            regained=self._regained,
        )

    def _compose_watchers(self) -> None:
        """The parts that watch the owned runs: results, timers, cancellations, Redis."""
        clock, changed, drop = self.clock, self._changed, self._drop

        async def fetch(wanted: list[UUID]) -> list[tuple[UUID, StepResult]]:
            return await self._fetch(wanted)  # looked up at each call, not bound once

        self.results = ResultApplier(
            self.metrics, self.runs, fetch=fetch, clock=clock, changed=changed, drop=drop
        )
        self.timekeeper = Timekeeper(self.runs, clock=clock, changed=changed, drop=drop)
        self.heartbeats = HeartbeatWatcher(
            self.pool,
            self.dispatcher,
            self.metrics,
            self.runs,
            clock=clock,
            changed=changed,
            drop=drop,
        )
        self.reconciler = Reconciler(
            self.dispatcher,
            self.metrics,
            self.runs,
            poll_interval=self.settings.poll_interval,
            fetch=fetch,
            clock=clock,
            changed=changed,
            drop=drop,
            spawn=self.background.spawn,
            prepare=self.heartbeats.fill,
        )
        self.events = EventDelivery(
            self.pool,
            self.metrics,
            self.runs,
            retention=self.settings.event_retention,
            clock=clock,
            changed=changed,
            drop=drop,
        )
        self.hibernation = Hibernation(
            self.pool,
            self.metrics,
            self.runs,
            after=self.settings.hibernate_after,
            poll_interval=self.settings.poll_interval,
            event_retention=self.settings.event_retention,
            clock=clock,
            wake_claim=self.claimer.wake.set,
        )
        self.cancels = CancellationWatcher(
            self.pool,
            self.node,
            self.runs,
            clock=clock,
            changed=changed,
            drop=drop,
            spawn=self.background.spawn,
        )

    # -- notifications -------------------------------------------------------------------

    def _on_run_notify(self, _payload: str) -> None:
        self.claimer.wake.set()

    def _on_cancel_notify(self, payload: str) -> None:
        self.cancels.on_notify(payload)
        self.hibernation.on_cancel_notify(payload)  # a run not here may be hibernated

    def _on_event_notify(self, payload: str) -> None:
        self.events.on_notify(payload)
        self.hibernation.on_event_notify(payload)

    def _on_result_notify(self, payload: str) -> None:
        """Payload: the attempt ids of one statement's results, comma-separated (sql/0009)."""
        attempt_ids: list[UUID] = []
        for text in payload.split(","):
            with contextlib.suppress(ValueError):
                attempt_ids.append(UUID(text))
        if self.runs.notify(attempt_ids):
            self.results.wake.set()

    def _on_completion_notify(self, payload: str) -> None:
        """Payload: the attempt id a completion from outside names (sql/0013)."""
        with contextlib.suppress(ValueError):
            if self.runs.notify([UUID(payload)]):
                self.results.wake.set()

    def _reconnected(self) -> None:
        self.metrics.reconciled("caught_up")
        self._catch_up()
        self.events.look_again()

    def _catch_up(self) -> None:
        """After (re)connecting LISTEN: look for everything we may have missed."""
        self.runs.notify_all()
        self.results.wake.set()
        self.claimer.wake.set()

    async def _regained(self) -> None:
        """The node lock is held again after it was lost: learn at once which runs another
        replica adopted meanwhile (they are dropped), then claim again."""
        await self.leases.renew_once()
        self.claimer.wake.set()

    def _result_refused(self, refused: RefusedResult) -> None:
        """A result row that does not count (wrong token) or cannot be read; once per row."""
        self.metrics.results_refused.labels(refused.reason).inc()
        log.error(
            "result of attempt %s refused (%s): %s",
            refused.attempt_id,
            refused.reason,
            refused.detail,
            extra={"run_id": str(refused.run_id), "attempt_id": str(refused.attempt_id)},
        )

    # -- the daemon ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        loops = {
            "listener": self.listener.run,
            "claim": self.claimer.loop,
            "results": self.results.loop,
            "commit": self._commit_loop,
            "leases": self.leases.loop,
            "poll": self._poll_loop,
            "timers": self.timekeeper.loop,
            "events": self.events.loop,
            "heartbeats": self.heartbeats.loop,
            "hibernation": self.hibernation.loop,
            "liveness": self.liveness.loop,
        }
        # The node lock before the first claim: a run claimed here is never judged dead.
        await self.liveness.start()
        tasks = [
            asyncio.create_task(_supervised(name, loop), name=name) for name, loop in loops.items()
        ]
        await self.listener.connected.wait()
        self.ready.set()
        sdnotify.ready(f"orchestrator {self.node}: serving")  # Type=notify units start here
        log.info("orchestrator %s running", self.node)
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            stopper.cancel()
            await self._shut_down({task.get_name(): task for task in tasks})

    async def _shut_down(self, tasks: dict[str, asyncio.Task[None]]) -> None:
        """Stop claiming, commit and enqueue what is in hand (bounded), release the leases."""
        for name in ("claim", "poll", "leases"):
            tasks[name].cancel()
        deadline = asyncio.get_running_loop().time() + self.settings.shutdown_timeout
        while (self.runs.has_dirty or self._committing) and not tasks["commit"].done():
            if asyncio.get_running_loop().time() > deadline:
                log.warning("shutdown: runs with uncommitted changes are left to a replica")
                break
            self._wake_commit.set()
            await asyncio.sleep(0.01)
        await self.background.wait(max(0.1, deadline - asyncio.get_running_loop().time()))
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await self.leases.release_all()
        await self.liveness.close()  # the lock goes last: the leases are released already

    async def _poll_loop(self) -> None:
        """The slow path that covers lost notifications and undelivered jobs."""
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            self._catch_up()
            self.metrics.reconciled("redelivered", self.runs.undelivered_count)
            await self.reconciler.redeliver()
            await self.cancels.missed()
            await self.reconciler.reconcile_jobs()
            await self.events.poll()
            await self.hibernation.poll()

    # -- results and commits -------------------------------------------------------------

    async def _fetch(self, wanted: list[UUID]) -> list[tuple[UUID, StepResult]]:
        """The stored results of these attempts; for those handed off to another system
        (their `handed_off` result says so), their completion too, after it."""
        async with self.pool.acquire() as conn:
            found = await store.fetch_results(conn, wanted, self.verifier)
            handed = [r.attempt_id for _, r in found if r.outcome == "handed_off"]
            handed += [a for a in wanted if self.runs.is_handed_off(a) and a not in handed]
            if handed:
                found += await store_events.completions(conn, handed, self.tokens)
            return found

    async def _commit_loop(self) -> None:
        while True:
            await self._wake_commit.wait()
            self._wake_commit.clear()
            batch = self.runs.take_dirty()
            now = self.clock()
            for owned, _ in batch:  # whether each run hibernates with this commit
                owned.parking = park_until(owned.state, now, self.settings.hibernate_after)
            if batch:
                self._committing = True
                try:
                    await self.committer.commit(batch)
                finally:
                    self._committing = False

    def _changed(self, run_id: UUID) -> None:
        """The run has changes to commit."""
        self.runs.mark_dirty(run_id)
        self._wake_commit.set()

    def _claimed(
        self, owned: Owned, changes: RunChanges, answered: Collection[UUID], adopted: bool
    ) -> None:
        self._committed(owned, changes, answered)
        if owned.parking is not None and not changes.status.finished:
            return  # hibernated with its claim
        self.events.listen(changes.run_id, owned.state.waiting())
        if adopted:
            self.runs.handed_off(changes.run_id, owned.state.handed_off())
            self.runs.awaiting_children(changes.run_id, owned.state.children_out())
        if adopted and self.runs.notify(owned.state.outstanding()):
            self.results.wake.set()  # results may have arrived while it was unowned

    def _committed(
        self, owned: Owned, changes: RunChanges, answered: Collection[UUID] = ()
    ) -> None:
        """What may only happen once the transitions are durable: enqueue, abort, forget.
        `answered`: attempts of an adopted run whose result is stored already; they are
        applied by the results loop, not sent to a worker a second time."""
        run_id = changes.run_id
        going_on = self.runs.committed(owned, changes, answered)
        end_child_spans(owned, changes)
        self.events.committed(run_id, changes)
        if changes.aborts:
            self.background.spawn(self.reconciler.abort(changes.aborts))
        if changes.probes:
            self.background.spawn(self.reconciler.probe(run_id, changes.probes))
        if going_on and owned.parking is not None:
            self._hibernated(owned, run_id)
        elif going_on:
            self.timekeeper.schedule(run_id)
        else:
            self.timekeeper.discard(run_id)
            if changes.status is RunStatus.FAILED:
                owned.span.set_status(
                    trace.StatusCode.ERROR, str((changes.error or {}).get("message"))
                )
            owned.span.set_attribute("flowforge.status", changes.status.value)
            owned.span.end()
            log.debug("run %s %s", run_id, changes.status.value, extra={"run_id": str(run_id)})
        if self.runs.has_undelivered:
            self.background.spawn(self.reconciler.redeliver())

    def _hibernated(self, owned: Owned, run_id: UUID) -> None:
        """The run was released with its wake-up time: it leaves memory. What happened to
        it meanwhile and is not committed is forgotten; `Hibernation` wakes it if that was
        an event or a cancellation (they are still in the database)."""
        self.runs.finished(run_id)
        self.timekeeper.discard(run_id)
        self.events.forget(run_id)
        self.hibernation.parked(run_id)
        self.metrics.reconciled("hibernated")
        owned.span.set_attribute("flowforge.hibernated", True)
        owned.span.end()

    def _drop(self, run_id: UUID, why: str, *, give_back: bool = False) -> None:
        """Forget a run. `give_back`: we still own it but cannot go on (an error); expire
        its lease so it is resumed from its last checkpoint, and count the strike."""
        self.metrics.reconciled("released" if give_back else "dropped")
        owned = self.runs.drop(run_id, give_back=give_back)
        self.timekeeper.discard(run_id)
        self.events.forget(run_id)
        if give_back:
            self.background.spawn(self.leases.release_given_back())
        if owned is not None:
            end_child_spans(owned)
            owned.span.end()
            log.warning(
                "run %s dropped from this orchestrator: %s",
                run_id,
                why,
                extra={"run_id": str(run_id)},
            )


async def run_orchestrator(
    settings: Settings,
    stop: asyncio.Event,
    *,
    ready: asyncio.Event | None = None,
    measures: metrics.OrchestratorMetrics | None = None,
) -> None:
    """Connect, serve until `stop` is set, release everything. With an HTTP port set, also
    serve /healthz, /readyz and /metrics (`measures`' registry, a new one by default)."""
    if not settings.database_url or not settings.redis_url:
        raise FlowForgeError("the orchestrator needs a database URL and a Redis URL")
    secret = settings.job_key.get_secret_value() if settings.job_key else None
    keys = JobKeys.required(secret, "orchestrator")
    measures = measures or metrics.OrchestratorMetrics(metrics.new_registry())
    pool = await store.retrying(
        lambda: store.create_pool(
            settings.database_url or "",
            size=settings.db_pool_size,
            lock_timeout=settings.lock_timeout,
        ),
        what="connecting to PostgreSQL",
        attempts=30,
    )
    budget = Budget(
        timeout=settings.expression_timeout,
        memory_bytes=settings.expression_memory_bytes,
        max_result_bytes=settings.max_context_bytes,
    )
    sandbox = Sandbox(budget)
    try:

        async def read_secret() -> bytes:
            async with pool.acquire() as conn:
                return await store.engine_secret(conn)

        tokens = AttemptTokens(await store.retrying(read_secret, what="reading the engine secret"))
        if not await asyncio.to_thread(sandbox.warm, 60.0):
            log.error("the expression sandbox did not start; costly expressions will fail")
        dispatcher = await Dispatcher.connect(settings.redis_url, keys, tokens)
        try:
            orchestrator = Orchestrator(
                settings,
                pool,
                dispatcher,
                tokens=tokens,
                measures=measures,
                evaluator=BoundedEvaluator(sandbox),
            )
            if ready is not None:
                waiter = asyncio.create_task(orchestrator.ready.wait())
                waiter.add_done_callback(lambda _: ready.set())
            checks = {
                "database": health.database_check(functools.partial(store.answers, pool)),
                "redis": health.redis_check(dispatcher.ping),
                "listen": health.listening_check(orchestrator.listener.connected),
                "migrations": health.migrations_check(
                    functools.partial(store.missing_migrations, pool)
                ),
            }
            sampler = asyncio.create_task(run_sampler(pool, measures))
            # Data lifecycle: retention and outbox consumer lag (engine/retention.py).
            retention = asyncio.create_task(Retention(pool, settings, measures).run())
            try:
                async with _health_server(settings, measures.registry, checks):
                    await orchestrator.run(stop)
            finally:
                sampler.cancel()
                retention.cancel()
                await asyncio.gather(sampler, retention, return_exceptions=True)
        finally:
            await dispatcher.close()
    finally:
        sandbox.close()
        await pool.close()


@contextlib.asynccontextmanager
async def _health_server(
    settings: Settings, registry: CollectorRegistry, checks: dict[str, health.ReadinessCheck]
) -> AsyncIterator[None]:
    """The probes and metrics endpoint; a port that cannot be bound is logged, not fatal:
    the engine's work matters more than its dashboard."""
    try:
        server = health.serve_health(settings, registry, checks)
        await server.__aenter__()
    except (OSError, ConfigError) as exc:  # the port is taken
        log.error("%s", exc)
        yield
        return
    try:
        yield
    finally:
        await server.__aexit__(None, None, None)
