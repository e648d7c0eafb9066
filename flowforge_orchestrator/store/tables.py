"""SQLAlchemy Core tables of the public contract, for an API that reads with its own session:

    from sqlalchemy import select
    from flowforge_orchestrator.client import tables

    rows = await session.execute(
        select(tables.runs.c.id, tables.runs.c.status)
        .where(tables.runs.c.workflow_name == "order-fulfilment")
    )

`runs` (one row per run), `events` (sent events, until consumed and past retention),
`outbox_cloudevents` (the CloudEvents view of the outbox) and `step_attempts` (one row per
attempt of a step, a view). Read them; write only through `client` (enqueue, send_event,
redrive, ...), which keeps the engine's rules. A test checks them against the migrated
schema.
"""

from __future__ import annotations

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    Table,
    Text,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB

__all__ = ["events", "metadata", "outbox_cloudevents", "runs", "step_attempts"]

metadata = MetaData(schema="flowforge")


def _time(name: str, *, nullable: bool = True) -> Column[object]:
    return Column(name, DateTime(timezone=True), nullable=nullable)


runs = Table(
    "runs",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("workflow_name", Text, nullable=False),
    Column("workflow_version", Integer),
    Column("status", Text, nullable=False),  # pending, running, completed, failed, cancelled
    Column("input", JSONB, nullable=False),
    Column("output", JSONB),
    Column("error", JSONB),
    Column("checkpoint", JSONB),
    Column("owner", Text),
    _time("lease_expires_at"),
    Column("epoch", BigInteger, nullable=False),
    Column("idempotency_key", Text),
    Column("cancel_requested", Boolean, nullable=False),
    Column("traceparent", Text),
    _time("created_at", nullable=False),
    _time("started_at"),
    _time("finished_at"),
    _time("updated_at", nullable=False),  # the last change of status or holder, not of state
    Column("concurrency_keys", ARRAY(Text)),
    Column("waiting", Boolean, nullable=False),
    Column("redrives", Integer, nullable=False),
    # A child run (sql/0015): the run, step and attempt that started it, and how deep.
    Column("parent_run_id", Uuid),
    Column("parent_step", Text),
    Column("parent_attempt_id", Uuid),
    Column("depth", Integer, nullable=False),
    _time("wake_at"),  # set while the run hibernates (sql/0016); 'infinity': until an event
)

events = Table(
    "events",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("run_id", Uuid),
    Column("name", Text, nullable=False),
    Column("key", Text),
    Column("payload", JSONB, nullable=False),
    _time("created_at", nullable=False),
)

outbox_cloudevents = Table(
    "outbox_cloudevents",
    metadata,
    Column("position", BigInteger),
    Column("run_id", Uuid),
    Column("seq", Integer),
    _time("published_at"),
    Column("event", JSONB),  # the CloudEvents 1.0 JSON envelope
)

step_attempts = Table(
    "step_attempts",
    metadata,
    Column("id", Uuid),
    Column("run_id", Uuid),
    Column("step_id", Text),
    Column("attempt", Integer),
    Column("step_type", Text),
    Column("status", Text),
    _time("dispatched_at"),
    _time("finished_at"),
    Column("error", JSONB),
)
