"""Redrive's statements on any asyncpg connection: JSON travels as text, so they work on a
connection with other type codecs (an API's SQLAlchemy connection) as on the engine's."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from flowforge_orchestrator.core.graph.checkpoint import with_parts
from flowforge_orchestrator.store import queries as q

__all__ = ["RunToRedrive", "lock_run_to_redrive", "redrive_run_text"]

_LOCK = f"""
SELECT r.status, r.workflow_name, r.workflow_version, r.checkpoint::text AS checkpoint,
       d.spec::text AS spec,
       {q.parts_of("r")}::text AS parts
FROM flowforge.runs r
LEFT JOIN flowforge.workflow_definitions d
    ON d.name = r.workflow_name AND d.version = r.workflow_version
WHERE r.id = $1
FOR UPDATE OF r
"""

_REDRIVE = """
UPDATE flowforge.runs SET
    status = 'pending', checkpoint = $2::text::jsonb, output = NULL, error = NULL,
    finished_at = NULL, cancel_requested = false, owner = NULL, lease_expires_at = NULL,
    redrives = redrives + 1, updated_at = now()
WHERE id = $1 AND status IN ('failed', 'cancelled')
RETURNING redrives
"""


@dataclass(frozen=True)
class RunToRedrive:
    status: str
    workflow_name: str
    workflow_version: int | None
    checkpoint: dict[str, Any]
    spec: dict[str, Any] | None  # None: that version is not registered


async def lock_run_to_redrive(conn: asyncpg.Connection, run_id: UUID) -> RunToRedrive | None:
    """The run with its checkpoint and definition, its row locked until the transaction ends."""
    row = await conn.fetchrow(_LOCK, run_id)
    if row is None:
        return None
    return RunToRedrive(
        status=row["status"],
        workflow_name=row["workflow_name"],
        workflow_version=row["workflow_version"],
        checkpoint=with_parts(
            json.loads(row["checkpoint"]) if row["checkpoint"] else {},
            json.loads(row["parts"]) if row["parts"] else (),
        )
        or {},
        spec=json.loads(row["spec"]) if row["spec"] else None,
    )


async def redrive_run_text(conn: asyncpg.Connection, run_id: UUID, checkpoint: Any) -> int:
    """Make a failed or cancelled run pending again with `checkpoint`; its redrive count."""
    text = json.dumps(checkpoint, separators=(",", ":"))
    redrives = await conn.fetchval(_REDRIVE, run_id, text)
    await conn.execute(q.HANDLE_CANCEL_REQUESTS, run_id)
    await conn.execute(q.NOTIFY_RUNS)
    return int(redrives)
