"""Start a run from your own code, inside your own transaction.

    async with conn.transaction():
        order_id = await conn.fetchval("INSERT INTO orders ... RETURNING id")
        run = await enqueue(conn, "order-fulfilment", {"order_id": order_id},
                            idempotency_key=f"order-{order_id}")

The run exists only if your transaction commits; the trigger wakes the orchestrators then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from flowforge_orchestrator import store

__all__ = ["EnqueuedRun", "enqueue"]


@dataclass(frozen=True)
class EnqueuedRun:
    id: UUID
    created: bool  # False: the idempotency key matched an existing run, returned instead


async def enqueue(
    conn: store.Connection,
    workflow: str,
    input: Any = None,
    *,
    run_id: UUID | None = None,
    version: int | None = None,
    idempotency_key: str | None = None,
) -> EnqueuedRun:
    """Insert a pending run of `workflow` (latest version unless `version` is given)."""
    run, created = await store.enqueue_run(
        conn,
        workflow,
        input,
        run_id=run_id,
        version=version,
        idempotency_key=idempotency_key,
    )
    return EnqueuedRun(run, created)
