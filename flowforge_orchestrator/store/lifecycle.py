"""The end of a run's life: deletion by retention, in small batches, and export before it.

A batch deletes the oldest finished runs past the retention period whose events every
registered outbox consumer has read (or that waited `max_age` more for one that did not);
the trigger of sql/0010 takes their history, results and cancellation requests with them.
One transaction per batch, runs locked with SKIP LOCKED (a redrive or an operator holding a
run delays only that run), behind a transaction advisory lock: one orchestrator at a time.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

__all__ = ["RetentionBatch", "delete_finished_runs", "expired_runs", "export_runs"]

RETENTION_LOCK = "SELECT pg_try_advisory_xact_lock(hashtextextended('flowforge_retention', 0))"

# The oldest finished runs past retention ($1 s) whose events every registered consumer has
# read, or that waited the outbox max age ($2 s) more (`overdue`); $3 at most, none of $4,
# only among $5 when given.
EXPIRED_RUNS = """
SELECT r.id, r.finished_at < now() - make_interval(secs => $1::float8 + $2::float8) AS overdue
FROM flowforge.runs r
WHERE r.status IN ('completed', 'failed', 'cancelled')
  AND r.finished_at < now() - make_interval(secs => $1::float8)
  AND r.id <> ALL ($4::uuid[])
  AND ($5::uuid[] IS NULL OR r.id = ANY ($5::uuid[]))
  AND (r.finished_at < now() - make_interval(secs => $1::float8 + $2::float8)
       OR NOT EXISTS (
           SELECT FROM flowforge.outbox o
           JOIN flowforge.outbox_consumers c
             ON o.xid >= c.last_xid AND (o.xid, o.position) > (c.last_xid, c.last_position)
           WHERE o.run_id = r.id))
ORDER BY r.finished_at
LIMIT $3
FOR UPDATE OF r SKIP LOCKED
"""

# Delete the runs $1 (locked above); $2: the overdue ones, whose unread events are counted
# as lost for each consumer that had not read them. The counts are read before the delete
# (same snapshot); the dependent rows go in the statement's trigger (sql/0010, sql/0012).
DELETE_RUNS = """
WITH unread AS (
    SELECT c.name, count(*) AS n
    FROM flowforge.outbox o
    JOIN flowforge.outbox_consumers c
      ON o.xid >= c.last_xid AND (o.xid, o.position) > (c.last_xid, c.last_position)
    WHERE o.run_id = ANY ($2::uuid[])
    GROUP BY c.name
),
lost AS (
    UPDATE flowforge.outbox_consumers c
    SET lost_events = c.lost_events + u.n, lost_at = now()
    FROM unread u WHERE c.name = u.name
    RETURNING c.name, u.n
),
gone AS (
    DELETE FROM flowforge.runs r WHERE r.id = ANY ($1::uuid[]) RETURNING r.id
)
SELECT (SELECT count(*) FROM gone) AS runs,
       (SELECT count(*) FROM flowforge.outbox o WHERE o.run_id = ANY ($1::uuid[])) AS outbox,
       (SELECT count(*) FROM flowforge.step_results s WHERE s.run_id = ANY ($1::uuid[]))
           AS step_results,
       (SELECT coalesce(jsonb_object_agg(name, n), '{}') FROM lost) AS lost
"""

# Finished runs before $1, after the key ($2, $3) in (finished_at, id) order, with their
# history as CloudEvents and their results (tokens left out: they prove nothing later).
EXPORT_RUNS = """
SELECT r.id, r.workflow_name, r.workflow_version, r.status, r.input, r.output, r.error,
       r.idempotency_key, r.traceparent, r.redrives, r.created_at, r.started_at,
       r.finished_at,
       coalesce((SELECT jsonb_agg(e.event ORDER BY e.seq)
                 FROM flowforge.outbox_cloudevents e WHERE e.run_id = r.id), '[]') AS events,
       coalesce((SELECT jsonb_agg(jsonb_build_object(
                     'attempt_id', s.attempt_id, 'step_id', s.step_id, 'outcome', s.outcome,
                     'output', s.output, 'error', s.error, 'worker', s.worker,
                     'started_at', s.started_at, 'finished_at', s.finished_at)
                     ORDER BY s.finished_at, s.attempt_id)
                 FROM flowforge.step_results s WHERE s.run_id = r.id), '[]') AS results
FROM flowforge.runs r
WHERE r.status IN ('completed', 'failed', 'cancelled') AND r.finished_at < $1
  AND ($2::timestamptz IS NULL OR (r.finished_at, r.id) > ($2, $3::uuid))
ORDER BY r.finished_at, r.id
LIMIT $4
"""


@dataclass(frozen=True)
class RetentionBatch:
    """What one batch deleted (`ids`); `locked_out` when another orchestrator holds the
    lock."""

    ids: list[UUID] = field(default_factory=list)
    outbox: int = 0
    step_results: int = 0
    lost: dict[str, int] = field(default_factory=dict)  # consumer -> events it never read
    locked_out: bool = False

    @property
    def runs(self) -> int:
        return len(self.ids)


async def delete_finished_runs(
    conn: asyncpg.Connection,
    *,
    retention: float,
    max_age: float,
    batch: int,
    skip: Sequence[UUID] = (),
    among: Sequence[UUID] | None = None,
) -> RetentionBatch:
    """Delete up to `batch` finished runs older than `retention` seconds, none of `skip`,
    only `among` these when given (one transaction). A failure names no run: list the
    candidates (`expired_runs`) and delete them one by one to find the one at fault."""
    async with conn.transaction():
        if not await conn.fetchval(RETENTION_LOCK):
            return RetentionBatch(locked_out=True)
        rows = await conn.fetch(
            EXPIRED_RUNS,
            retention,
            max_age,
            batch,
            list(skip),
            None if among is None else list(among),
        )
        if not rows:
            return RetentionBatch()
        ids = [r["id"] for r in rows]
        overdue = [r["id"] for r in rows if r["overdue"]]
        row = await conn.fetchrow(DELETE_RUNS, ids, overdue)
    assert row is not None
    lost = row["lost"]
    lost = json.loads(lost) if isinstance(lost, str) else lost
    return RetentionBatch(
        ids=ids,
        outbox=row["outbox"],
        step_results=row["step_results"],
        lost={str(k): int(v) for k, v in lost.items()},
    )


async def expired_runs(
    conn: asyncpg.Connection, *, retention: float, max_age: float, batch: int, skip: Sequence[UUID]
) -> list[UUID]:
    """The runs the next batch would take, none of `skip` (locked only while reading)."""
    async with conn.transaction():
        rows = await conn.fetch(EXPIRED_RUNS, retention, max_age, batch, list(skip), None)
    return [r["id"] for r in rows]


async def export_runs(
    conn: asyncpg.Connection, *, before: datetime, page: int = 200
) -> AsyncIterator[dict[str, Any]]:
    """Every finished run that ended before `before`, oldest first, as one JSON-ready dict
    each (run fields, `events` as CloudEvents, `results`); read by pages on a keyset."""
    key: tuple[datetime | None, UUID | None] = (None, None)
    while True:
        rows = await conn.fetch(EXPORT_RUNS, before, key[0], key[1], page)
        for row in rows:
            yield _run_record(row)
        if len(rows) < page:
            return
        key = (rows[-1]["finished_at"], rows[-1]["id"])


def _run_record(row: asyncpg.Record) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for name, value in row.items():
        if isinstance(value, str) and name in ("input", "output", "error", "events", "results"):
            value = json.loads(value)
        if isinstance(value, datetime):
            value = value.isoformat()
        if isinstance(value, UUID):
            value = str(value)
        record[name] = value
    return record
