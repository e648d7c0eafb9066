"""What the operator's command line reads, and nothing writes: run checkpoints, runs by
time, definition versions, the outbox as CloudEvents, step type registrations, and the state
of the least-privilege roles. Named statements, bound parameters, as in `queries.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from flowforge_orchestrator.core.graph.checkpoint import with_parts
from flowforge_orchestrator.store.queries import RUN_PARTS

__all__ = [
    "RoleState",
    "child_runs",
    "definition_versions",
    "find_runs",
    "latest_specs",
    "outbox_events",
    "outbox_head",
    "role_state",
    "run_checkpoint",
    "server_version",
    "step_type_registrations",
]

RUN_CHECKPOINT = f"""
SELECT checkpoint, redrives, waiting,
       (cancel_requested OR EXISTS (
           SELECT FROM flowforge.cancel_requests c
           WHERE c.run_id = runs.id AND c.handled_at IS NULL)) AS cancel_requested,
       {RUN_PARTS}
FROM flowforge.runs WHERE id = $1
"""

FIND_RUNS = """
SELECT id, workflow_name, workflow_version, status, created_at, started_at, finished_at
FROM flowforge.runs
WHERE ($1::text IS NULL OR workflow_name = $1)
  AND ($2::text IS NULL OR status = $2)
  AND ($3::timestamptz IS NULL OR created_at >= $3)
  AND ($4::timestamptz IS NULL OR created_at < $4)
  AND ($6::uuid IS NULL OR parent_run_id = $6)
ORDER BY created_at DESC
LIMIT $5
"""

# A run's child runs (sql/0015), oldest first; those one commit started in step order
# (`each[2]` before `each[10]`).
CHILD_RUNS = """
SELECT id, parent_step, parent_attempt_id, workflow_name, workflow_version, status,
       created_at, finished_at
FROM flowforge.runs WHERE parent_run_id = $1
ORDER BY created_at, length(parent_step), parent_step, id
"""

DEFINITION_VERSIONS = """
SELECT name, version, max_concurrency, created_at
FROM flowforge.workflow_definitions
WHERE ($1::text IS NULL OR name = $1)
ORDER BY name, version
"""

LATEST_SPECS = """
SELECT DISTINCT ON (name) name, version, spec
FROM flowforge.workflow_definitions ORDER BY name, version DESC
"""

# The newest `$2` events (of run `$1`, or of all runs), oldest first.
OUTBOX_TAIL = """
SELECT position, run_id, seq, published_at, event FROM (
    SELECT position, run_id, seq, published_at, event FROM flowforge.outbox_cloudevents
    WHERE ($1::uuid IS NULL OR run_id = $1)
    ORDER BY position DESC LIMIT $2
) AS newest ORDER BY position
"""

OUTBOX_AFTER = """
SELECT position, run_id, seq, published_at, event FROM flowforge.outbox_cloudevents
WHERE position > $1 AND ($2::uuid IS NULL OR run_id = $2)
ORDER BY position LIMIT $3
"""

OUTBOX_HEAD = "SELECT coalesce(max(position), 0) FROM flowforge.outbox"

STEP_TYPE_REGISTRATIONS = "SELECT name, worker, last_seen FROM flowforge.step_types ORDER BY name"

SERVER_VERSION = "SELECT current_user, current_setting('server_version') AS version"

# Which of the group roles exist; tables and views of the schema that the orchestrator's
# role does not own (a migration applied after roles.sql last ran); the two grants every
# other process depends on.
ROLE_STATE = """
SELECT
    array(SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1::text[]) ORDER BY 1)
        AS existing,
    CASE WHEN to_regrole($2) IS NULL THEN NULL ELSE array(
        SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'flowforge' AND c.relkind IN ('r', 'v', 'p')
          AND c.relowner <> to_regrole($2)
        ORDER BY 1) END AS not_owned,
    CASE WHEN to_regrole($3) IS NULL THEN NULL
         ELSE has_any_column_privilege($3, 'flowforge.step_results', 'INSERT') END
        AS worker_inserts,
    CASE WHEN to_regrole($4) IS NULL THEN NULL
         ELSE has_any_column_privilege($4, 'flowforge.runs', 'INSERT') END AS api_enqueues
"""


async def run_checkpoint(conn: asyncpg.Connection, run_id: UUID) -> dict[str, Any] | None:
    """The run's graph state (`checkpoint`, with its parts joined in; `redrives`,
    `cancel_requested`, `waiting`)."""
    row = await conn.fetchrow(RUN_CHECKPOINT, run_id)
    if row is None:
        return None
    state = dict(row)
    state["checkpoint"] = with_parts(state["checkpoint"], state.pop("parts") or ())
    return state


async def find_runs(
    conn: asyncpg.Connection,
    *,
    workflow: str | None = None,
    status: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 20,
    parent: UUID | None = None,
) -> list[asyncpg.Record]:
    """Newest first; `since` inclusive, `until` exclusive, both on `created_at`;
    `parent`: only the child runs of that run."""
    return list(await conn.fetch(FIND_RUNS, workflow, status, since, until, limit, parent))


async def child_runs(conn: asyncpg.Connection, run_id: UUID) -> list[asyncpg.Record]:
    """The child runs the run's workflow steps started, oldest first."""
    return list(await conn.fetch(CHILD_RUNS, run_id))


async def definition_versions(
    conn: asyncpg.Connection, name: str | None = None
) -> list[asyncpg.Record]:
    return list(await conn.fetch(DEFINITION_VERSIONS, name))


async def latest_specs(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """The newest version of each workflow, with its spec."""
    return list(await conn.fetch(LATEST_SPECS))


async def outbox_events(
    conn: asyncpg.Connection,
    *,
    run_id: UUID | None = None,
    after: int | None = None,
    limit: int = 1000,
) -> list[asyncpg.Record]:
    """CloudEvents in outbox order: the newest `limit` ones, or those after `after`."""
    if after is None:
        return list(await conn.fetch(OUTBOX_TAIL, run_id, limit))
    return list(await conn.fetch(OUTBOX_AFTER, after, run_id, limit))


async def outbox_head(conn: asyncpg.Connection) -> int:
    """The position of the newest event (0 when the outbox is empty)."""
    return int(await conn.fetchval(OUTBOX_HEAD))


async def step_type_registrations(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await conn.fetch(STEP_TYPE_REGISTRATIONS))


async def server_version(conn: asyncpg.Connection) -> tuple[str, str]:
    """(the login this connection uses, PostgreSQL's version)."""
    row = await conn.fetchrow(SERVER_VERSION)
    assert row is not None
    return str(row["current_user"]), str(row["version"])


@dataclass(frozen=True)
class RoleState:
    existing: list[str]
    not_owned: list[str] | None  # None: the orchestrator's role does not exist
    worker_inserts: bool | None  # None: the role does not exist
    api_enqueues: bool | None


async def role_state(conn: asyncpg.Connection, roles: Sequence[str]) -> RoleState:
    """`roles` are the orchestrator's, the worker's and the API's group role, in that order."""
    orchestrator, worker, api = roles
    row = await conn.fetchrow(ROLE_STATE, list(roles), orchestrator, worker, api)
    assert row is not None
    values: dict[str, Any] = dict(row)
    return RoleState(
        existing=list(values["existing"]),
        not_owned=None if values["not_owned"] is None else list(values["not_owned"]),
        worker_inserts=values["worker_inserts"],
        api_enqueues=values["api_enqueues"],
    )
