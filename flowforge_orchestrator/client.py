"""Start a run from your own code, inside your own transaction (an asyncpg connection, or a
SQLAlchemy `AsyncSession` or `AsyncConnection` on the asyncpg driver); wake a waiting run; complete
a step handed to your system; run a failed one again; read the outbox as a registered
consumer (a relay), gap-free, in your transaction.

    async with conn.transaction():
        order_id = await conn.fetchval("INSERT INTO orders ... RETURNING id")
        run = await enqueue(conn, "order-fulfilment", {"order_id": order_id},
                            idempotency_key=f"order-{order_id}")

    async with conn.transaction():
        await conn.execute("UPDATE orders SET paid = true WHERE id = $1", order_id)
        await send_event(conn, "paid", {"amount": 42}, key=str(order_id))

A run exists, and an event is delivered, only if your transaction commits; the triggers wake
the orchestrators then.

    await register_consumer(conn, "billing-relay")       # once
    async with conn.transaction():
        for e in await read_outbox(conn, "billing-relay", 500):
            await broker.publish(e.event)                 # CloudEvents 1.0, id stable
    # committed: the cursor moved. Rolled back or crashed: the same events come again.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any
from uuid import UUID

from flowforge_orchestrator import store
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.core.definition.plan import CompiledWorkflow
from flowforge_orchestrator.core.redrive import redrive_checkpoint
from flowforge_orchestrator.errors import NotFound, RedriveError
from flowforge_orchestrator.store import events as store_events
from flowforge_orchestrator.store.foreign import AnyConnection, driver_connection
from flowforge_orchestrator.store.redrives import lock_run_to_redrive, redrive_run_text

if TYPE_CHECKING:
    from flowforge_orchestrator.store import tables

__all__ = [
    "AnyConnection",
    "EnqueuedRun",
    "FeedEvent",
    "complete_attempt",
    "drop_consumer",
    "enqueue",
    "read_outbox",
    "redrive",
    "register_consumer",
    "send_event",
    "tables",
]

FeedEvent = store.FeedEvent


def __getattr__(name: str) -> ModuleType:
    """`client.tables` (SQLAlchemy Core tables), imported when first used: commands that
    never touch it do not pay for importing SQLAlchemy."""
    if name == "tables":
        from flowforge_orchestrator.store import tables

        return tables
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class EnqueuedRun:
    id: UUID
    created: bool  # False: the idempotency key matched an existing run, returned instead


async def enqueue(
    conn: AnyConnection,
    workflow: str,
    input: Any = None,
    *,
    run_id: UUID | None = None,
    version: int | None = None,
    idempotency_key: str | None = None,
) -> EnqueuedRun:
    """Insert a pending run of `workflow` (latest version unless `version` is given), in the
    caller's transaction. `conn`: an asyncpg connection, or a SQLAlchemy `AsyncSession` or
    `AsyncConnection` on the asyncpg driver."""
    run, created = await store.enqueue_run(
        await driver_connection(conn),
        workflow,
        input,
        run_id=run_id,
        version=version,
        idempotency_key=idempotency_key,
    )
    return EnqueuedRun(run, created)


async def redrive(conn: AnyConnection, run_id: UUID, *, from_step: str | None = None) -> int:
    """Run a failed or cancelled run again from its failed steps (or from `from_step`),
    keeping the outputs of the steps that succeeded; returns how many times it was redriven.
    The run goes back to pending under its own id, and its history goes on."""
    driver = await driver_connection(conn)
    async with driver.transaction():  # a savepoint inside the caller's transaction
        run = await lock_run_to_redrive(driver, run_id)
        if run is None:
            raise NotFound(f"there is no run {run_id}")
        if run.status not in ("failed", "cancelled"):
            raise RedriveError(
                f"run {run_id} is {run.status}: only a failed or cancelled run runs again"
            )
        name, version = run.workflow_name, run.workflow_version
        if run.spec is None:
            raise RedriveError(f"run {run_id}: workflow '{name}' v{version} is not registered")
        workflow = CompiledWorkflow(parse_definition(run.spec, source=f"{name} v{version}"))
        checkpoint = redrive_checkpoint(workflow, run.checkpoint, from_step=from_step)
        return await redrive_run_text(driver, run_id, checkpoint)


async def send_event(
    conn: AnyConnection,
    name: str,
    payload: Any = None,
    *,
    run_id: UUID | None = None,
    key: str | None = None,
) -> int:
    """Send event `name` to one run (`run_id`) or to every run that waits, or will wait, on
    `name` with this correlation `key`; returns the event's id. An event that arrives before
    its run's wait step starts is kept and taken when it does; a keyed event is kept for
    FLOWFORGE_EVENT_RETENTION. An unknown run id raises NotFound (and aborts the caller's
    transaction, like any failed statement)."""
    driver = await driver_connection(conn)
    return await store_events.send_event(driver, name, payload, run_id=run_id, key=key)


async def complete_attempt(
    conn: AnyConnection,
    attempt_id: UUID,
    token: str,
    *,
    output: Any = None,
    error: Any = None,
) -> int:
    """Finish a step that handed its work to your system (`ctx.hand_off()`): `token` is the
    attempt's `ctx.completion_token`. An `error` is a dict with at least a `message` (and
    optionally `category`, `retryable`, `details`). The first valid completion counts; a
    late, duplicate or wrongly signed one changes nothing."""
    driver = await driver_connection(conn)
    return await store_events.complete_attempt(
        driver, attempt_id, token, output=output, error=error
    )


async def register_consumer(conn: store.Connection, name: str, *, from_now: bool = False) -> bool:
    """Register outbox consumer `name` (False if it already was). It reads every event still
    in the outbox, or with `from_now` only those committed from now on; retention keeps an
    event until every registered consumer has read it (FLOWFORGE_OUTBOX_MAX_AGE at most)."""
    return await store.register_consumer(conn, name, from_now=from_now)


async def drop_consumer(conn: store.Connection, name: str) -> bool:
    """Forget outbox consumer `name`, so retention no longer waits for it."""
    return await store.drop_consumer(conn, name)


async def read_outbox(
    conn: store.Connection, consumer: str, max_events: int = 100
) -> list[store.FeedEvent]:
    """The next events for `consumer`, in commit-safe order (a late-committing event is
    never skipped; one run's events in `seq` order), moving its cursor in your transaction:
    publish them, then commit. Outside a transaction the cursor moves at once (at-most-once
    on a crash). Raises NotFound for a consumer that is not registered."""
    if max_events < 1:
        raise ValueError(f"max_events must be at least 1, not {max_events}")
    return await store.read_outbox(conn, consumer, max_events)
