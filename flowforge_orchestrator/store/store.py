"""The store: every read and write of the engine, as functions over a connection.

Functions take a connection, not a pool, so a caller composes them into one transaction
("claim 50 runs, checkpoint them, append 300 events" is a single commit).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from flowforge_orchestrator.core.definition.models import WorkflowDefinition
from flowforge_orchestrator.core.graph.checkpoint import with_parts
from flowforge_orchestrator.core.records import RunChanges, StepResult
from flowforge_orchestrator.core.tokens import ResultVerifier, StoredResult
from flowforge_orchestrator.errors import NotFound, StoreError
from flowforge_orchestrator.store import queries as q
from flowforge_orchestrator.store.db import json_texts
from flowforge_orchestrator.store.migrations import pending_on
from flowforge_orchestrator.store.outbox_packing import columns, pack_events

__all__ = [
    "ClaimedRun",
    "Definition",
    "acquire_concurrency",
    "answers",
    "claim_runs",
    "definition_spec",
    "engine_secret",
    "enqueue_run",
    "existing_runs",
    "fetch_results",
    "fetch_run_results",
    "get_definition",
    "insert_definition",
    "insert_result",
    "last_seq",
    "missing_migrations",
    "register_definition",
    "write_changes",
    "write_changes_skip_locked",
]


@dataclass(frozen=True)
class Definition:
    name: str
    version: int
    spec: dict[str, Any]
    max_concurrency: int | None


@dataclass(frozen=True)
class ClaimedRun:
    id: UUID
    workflow_name: str
    workflow_version: int | None
    status: str
    input_text: str  # JSON, decoded by the claimer run by run (one bad input fails one run)
    checkpoint: dict[str, Any] | None
    epoch: int  # the epoch read under the row lock; the claim writes epoch + 1
    traceparent: str | None
    cancel_requested: bool = False
    created_at: datetime | None = None
    depth: int = 0  # how deep a child run is nested (0: started on its own)
    wake_at: datetime | None = None  # set: it was hibernated (sql/0016), now due or called


@dataclass(frozen=True)
class OwnedChanges:
    """A run's changes and the fence they are written under."""

    changes: RunChanges
    epoch: int
    new_epoch: int
    claimed: bool = False
    traceparent: str | None = None
    # Hibernate the run with this write (sql/0016): released, to be claimed again at
    # `wake_at` (None: only an event or a cancellation wakes it), or when one of its
    # `waits` (event name, key) is sent an event.
    parked: bool = False
    wake_at: datetime | None = None
    waits: tuple[tuple[str, str | None], ...] = ()


# -- definitions ---------------------------------------------------------------------------


def _definition(row: asyncpg.Record | None) -> Definition | None:
    if row is None:
        return None
    return Definition(row["name"], row["version"], row["spec"], row["max_concurrency"])


async def get_definition(
    conn: asyncpg.Connection, name: str, version: int | None = None
) -> Definition | None:
    if version is None:
        return _definition(await conn.fetchrow(q.GET_LATEST_DEFINITION, name))
    return _definition(await conn.fetchrow(q.GET_DEFINITION, name, version))


async def insert_definition(
    conn: asyncpg.Connection,
    name: str,
    version: int,
    spec: dict[str, Any],
    max_concurrency: int | None,
) -> bool:
    """Register a version; False if that version already exists."""
    return (
        await conn.fetchval(q.INSERT_DEFINITION, name, version, spec, max_concurrency) is not None
    )


async def register_definition(
    conn: asyncpg.Connection, definition: WorkflowDefinition
) -> tuple[bool, Definition | None]:
    """Register a validated definition as its stored JSON spec.

    Returns (created, existing): when that version is already registered, `existing` is the
    stored row, whose spec the caller may compare with `definition_spec(definition)`.
    """
    spec = definition_spec(definition)
    created = await insert_definition(
        conn, definition.name, definition.version, spec, definition.max_concurrency
    )
    if created:
        return True, None
    return False, await get_definition(conn, definition.name, definition.version)


def definition_spec(definition: WorkflowDefinition) -> dict[str, Any]:
    """The JSON form stored in `workflow_definitions.spec` (field names as written)."""
    spec: dict[str, Any] = definition.model_dump(mode="json", by_alias=True, exclude_none=True)
    return spec


async def list_definitions(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await conn.fetch(q.LIST_DEFINITIONS))


# -- enqueue -------------------------------------------------------------------------------


async def enqueue_run(
    conn: asyncpg.Connection,
    workflow: str,
    input: Any,
    *,
    run_id: UUID | None = None,
    version: int | None = None,
    idempotency_key: str | None = None,
) -> tuple[UUID, bool]:
    """Insert a pending run; with a known idempotency key, return the existing run instead.

    Returns (run id, created). Runs in the caller's transaction, on any asyncpg connection:
    the input travels as JSON text, so it needs none of our type codecs.
    """
    text = json.dumps(input if input is not None else {}, separators=(",", ":"))
    try:
        query = q.ENQUEUE_RUN if idempotency_key is not None else q.ENQUEUE_RUN_WITHOUT_KEY
        new_id = await conn.fetchval(query, run_id, workflow, version, text, idempotency_key)
    except asyncpg.ForeignKeyViolationError as exc:  # sql/0014: an unknown workflow
        message, hint = getattr(exc, "message", str(exc)), getattr(exc, "hint", None)
        raise NotFound(f"{message}: {hint}" if hint else message) from exc
    if new_id is not None:
        return new_id, True
    # The conflicting row is visible to this new statement (READ COMMITTED takes a new
    # snapshot per statement), even if its transaction committed after ours began.
    existing = await conn.fetchval(q.RUN_BY_IDEMPOTENCY_KEY, idempotency_key)
    return existing, False


# -- claiming and leases -------------------------------------------------------------------


def _claimed(row: asyncpg.Record) -> ClaimedRun:
    return ClaimedRun(
        id=row["id"],
        workflow_name=row["workflow_name"],
        workflow_version=row["workflow_version"],
        status=row["status"],
        input_text=row["input"],
        checkpoint=with_parts(row["checkpoint"], row["parts"] or ()),
        epoch=row["epoch"],
        traceparent=row["traceparent"],
        cancel_requested=row["cancel_requested"],
        created_at=row["created_at"],
        depth=row["depth"],
        wake_at=row["wake_at"],
    )


async def claim_runs(
    conn: asyncpg.Connection,
    limit: int,
    *,
    among: Sequence[UUID] | None = None,
    set_apart: Sequence[UUID] = (),
    wake_ahead: float = 0.0,
) -> list[ClaimedRun]:
    """Lock runs to take over (expired leases first, then hibernated runs due within
    `wake_ahead` seconds, then pending FIFO) in this transaction.

    `among`: only these runs (those of them that can be claimed now); `set_apart`: runs
    never to claim. The rows stay locked until the transaction that writes their first
    changes commits; `write_changes(..., claimed=True)` moves the epoch and takes the lease.
    """
    if among is not None:
        rows = await conn.fetch(q.SELECT_CLAIMABLE_AMONG, list(among), wake_ahead)
        return [_claimed(row) for row in rows]
    apart = list(set_apart)
    rows = list(await conn.fetch(q.SELECT_EXPIRED_RUNS, limit, apart))
    if len(rows) < limit:
        rows += await conn.fetch(q.SELECT_WOKEN_RUNS, limit - len(rows), apart, wake_ahead)
    if len(rows) < limit:
        rows += await conn.fetch(q.SELECT_PENDING_RUNS, limit - len(rows), apart)
    return [_claimed(row) for row in rows]


async def renew_leases(
    conn: asyncpg.Connection,
    owner: str,
    lease_seconds: float,
    run_ids: Sequence[UUID],
    *,
    renew_below: float | None = None,
    skip_locked: bool = False,
) -> dict[UUID, int]:
    """Extend the leases of these runs in one statement; returns those still ours -> epoch.
    `renew_below`: only leases with fewer seconds left are written (None: all);
    `skip_locked`: rows locked by someone else are not waited for (nor renewed this time),
    and every lease that can be locked is renewed."""
    if skip_locked:
        rows = await conn.fetch(q.RENEW_LEASES_SKIP_LOCKED, owner, lease_seconds, list(run_ids))
    else:
        below = lease_seconds if renew_below is None else renew_below
        rows = await conn.fetch(q.RENEW_LEASES, owner, lease_seconds, list(run_ids), below)
    return {row["id"]: row["epoch"] for row in rows}


async def last_seq(conn: asyncpg.Connection, run_id: UUID) -> int:
    """The highest transition number stored for the run (0: none)."""
    return int(await conn.fetchval(q.LAST_SEQ, run_id))


async def existing_runs(conn: asyncpg.Connection, run_ids: Sequence[UUID]) -> set[UUID]:
    """Which of these runs still have a row."""
    return {row["id"] for row in await conn.fetch(q.EXISTING_RUNS, list(run_ids))}


async def release_leases(conn: asyncpg.Connection, owner: str, run_ids: Sequence[UUID]) -> None:
    """Expire our leases now so another replica adopts the runs at once."""
    await conn.execute(q.RELEASE_LEASES, owner, list(run_ids))


# -- cancellation --------------------------------------------------------------------------


async def request_cancel(
    conn: asyncpg.Connection, run_id: UUID, reason: str | None = None
) -> tuple[bool, str | None]:
    """Ask for a run to be cancelled (a `cancel_requests` row; no run row is locked):
    (requested, its status); status None if there is no such run. A finished run gets no
    request."""
    row = await conn.fetchrow(q.REQUEST_CANCEL, run_id, reason)
    if row is None:
        return False, None
    return row["requested"], row["status"]


async def cancel_requested(conn: asyncpg.Connection, owner: str) -> list[UUID]:
    """Running runs of this owner whose cancellation was asked for."""
    return [row["id"] for row in await conn.fetch(q.CANCEL_REQUESTED, owner)]


async def unblock_cancelled(conn: asyncpg.Connection, run_ids: Sequence[UUID] | None) -> int:
    """Make pending runs that wait for a concurrency slot and have a cancellation request
    claimable again (these runs, or all with None), so a claim cancels them; wakes the
    orchestrators if any was. Returns how many."""
    ids = None if run_ids is None else list(run_ids)
    return int(await conn.fetchval(q.UNBLOCK_CANCELLED, ids))


async def settle_cancel_requests(conn: asyncpg.Connection) -> int:
    """Mark handled the requests whose run has ended (or never appeared); returns how many."""
    status = await conn.execute(q.SETTLE_CANCEL_REQUESTS)
    return int(status.rsplit(" ", 1)[-1])


# -- concurrency limits --------------------------------------------------------------------


async def acquire_concurrency(
    conn: asyncpg.Connection, wanted: Mapping[UUID, Mapping[str, int]]
) -> set[UUID]:
    """Take concurrency slots for claimed pending runs (run -> {key: limit}), in the claim
    transaction that holds their rows; returns the runs that got all their keys.

    Each run gets every key or none, oldest first; a refused run joins each key's FIFO queue
    and is marked `waiting` until a slot frees up (sql/0003_concurrency.sql).
    """
    triples = [(run, key, limit) for run, keys in wanted.items() for key, limit in keys.items()]
    if not triples:
        return set()
    rows = await conn.fetch(
        q.ACQUIRE_CONCURRENCY,
        [run for run, _, _ in triples],
        [key for _, key, _ in triples],
        [limit for _, _, limit in triples],
    )
    return {row["run_id"] for row in rows if row["admitted"]}


async def concurrency_slots(conn: asyncpg.Connection, key: str) -> list[UUID]:
    """The runs holding a slot of `key`."""
    return [row["run_id"] for row in await conn.fetch(q.CONCURRENCY_SLOTS, key)]


async def concurrency_queue(conn: asyncpg.Connection, key: str) -> list[UUID]:
    """The runs queued for `key`, first in line first."""
    return [row["run_id"] for row in await conn.fetch(q.CONCURRENCY_QUEUE, key)]


# -- redrive -------------------------------------------------------------------------------


async def lock_run(conn: asyncpg.Connection, run_id: UUID) -> asyncpg.Record | None:
    """The run's row, locked until the caller's transaction ends."""
    return await conn.fetchrow(q.LOCK_RUN, run_id)


async def redrive_run(conn: asyncpg.Connection, run_id: UUID, checkpoint: dict[str, Any]) -> int:
    """Make a failed or cancelled run pending again with `checkpoint`; its redrive count."""
    redrives = await conn.fetchval(q.REDRIVE_RUN, run_id, checkpoint)
    await conn.execute(q.HANDLE_CANCEL_REQUESTS, run_id)
    await conn.execute(q.NOTIFY_RUNS)
    return int(redrives)


# -- the group commit ----------------------------------------------------------------------


async def write_changes(
    conn: asyncpg.Connection, owner: str, lease_seconds: float, batch: Sequence[OwnedChanges]
) -> set[UUID]:
    """Write many runs' changes in one statement; returns the runs still ours.

    The run rows are updated under the epoch fence; events and inline results are written
    only for the runs whose update matched. Atomic on its own (no BEGIN/COMMIT round trips),
    or part of the caller's transaction. Attempts need no write of their own:
    `step_attempts` is a view over their outbox events (sql/0007). A row locked by someone
    else is waited for, up to the connection's lock_timeout.
    """
    return set(await _write_changes(conn, q.WRITE_CHANGES, owner, lease_seconds, batch))


async def write_changes_skip_locked(
    conn: asyncpg.Connection, owner: str, lease_seconds: float, batch: Sequence[OwnedChanges]
) -> dict[UUID, bool]:
    """`write_changes` that skips the rows locked by someone else instead of waiting.

    Returns every run it could lock -> whether it was written (False: the epoch moved on).
    A run missing from the answer was locked elsewhere (write it later) or is gone.
    """
    return await _write_changes(conn, q.WRITE_CHANGES_SKIP_LOCKED, owner, lease_seconds, batch)


async def _write_changes(
    conn: asyncpg.Connection,
    query: str,
    owner: str,
    lease_seconds: float,
    batch: Sequence[OwnedChanges],
) -> dict[UUID, bool]:
    if not batch:
        return {}
    packed = columns(
        row
        for o in batch
        if o.changes.events
        for row in pack_events(o.changes.run_id, o.traceparent, o.changes.events)
    )
    inline = [(o.changes.run_id, r) for o in batch for r in o.changes.inline_results]
    taken = [(o.changes.run_id, t) for o in batch for t in o.changes.events_taken]
    children = [(o.changes.run_id, c) for o in batch for c in o.changes.children]
    cancels = [(o.changes.run_id, c) for o in batch for c in o.changes.child_cancels]
    waits = [(o.changes.run_id, name, key) for o in batch if o.parked for name, key in o.waits]
    parts = [(o.changes.run_id, p) for o in batch for p in o.changes.parts]
    dropped = [(o.changes.run_id, step) for o in batch for step in o.changes.parts_dropped]
    rows = await conn.fetch(
        query,
        owner,
        lease_seconds,
        [o.changes.run_id for o in batch],
        [o.epoch for o in batch],
        [o.new_epoch for o in batch],
        [o.claimed for o in batch],
        [o.changes.status.value for o in batch],
        json_texts(o.changes.checkpoint for o in batch),
        json_texts(o.changes.output for o in batch),
        json_texts(o.changes.error for o in batch),
        [o.changes.finished_at for o in batch],
        [o.traceparent for o in batch],
        [o.changes.started_at for o in batch],
        *packed,
        [r.attempt_id for _, r in inline],
        [run_id for run_id, _ in inline],
        [r.step_id for _, r in inline],
        [r.outcome for _, r in inline],
        json_texts(r.output for _, r in inline),
        json_texts(r.error for _, r in inline),
        [r.at for _, r in inline],
        [run_id for run_id, _ in taken],
        [t.event_id for _, t in taken],
        [t.step_id for _, t in taken],
        [t.attempt_id for _, t in taken],
        [c.run_id for _, c in children],
        [run_id for run_id, _ in children],
        [c.parent_step for _, c in children],
        [c.parent_attempt_id for _, c in children],
        [c.workflow for _, c in children],
        [c.version for _, c in children],
        [text or "null" for text in json_texts(c.input for _, c in children)],
        [c.depth for _, c in children],
        [c.traceparent for _, c in children],
        [run_id for run_id, _ in cancels],
        [child for _, child in cancels],
        [o.parked for o in batch],
        [o.wake_at for o in batch],
        [run_id for run_id, _, _ in waits],
        [name for _, name, _ in waits],
        [key for _, _, key in waits],
        [run_id for run_id, _ in parts],
        [p.step for _, p in parts],
        [p.part for _, p in parts],
        [p.letters for _, p in parts],
        json_texts(p.attempts for _, p in parts),
        [p.new for _, p in parts],
        [run_id for run_id, _ in dropped],
        [step for _, step in dropped],
    )
    return {row["id"]: row["written"] for row in rows}


# -- results -------------------------------------------------------------------------------


def _stored(row: asyncpg.Record) -> StoredResult:
    return StoredResult(
        attempt_id=row["attempt_id"],
        run_id=row["run_id"],
        step_id=row["step_id"],
        outcome=row["outcome"],
        output=row["output"],
        error=row["error"],
        token=row["token"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        worker=row["worker"],
    )


async def fetch_results(
    conn: asyncpg.Connection, attempt_ids: Sequence[UUID], verifier: ResultVerifier
) -> list[tuple[UUID, StepResult]]:
    """The results of these attempts that carry their token, with their run ids (the
    others are reported to `verifier.on_refused`)."""
    rows = await conn.fetch(q.RESULTS_BY_ATTEMPT, list(attempt_ids))
    return verifier.check(_stored(row) for row in rows)


async def fetch_run_results(
    conn: asyncpg.Connection, run_ids: Sequence[UUID], verifier: ResultVerifier
) -> dict[UUID, dict[UUID, StepResult]]:
    """Every verified result of these runs, by run then attempt (to restore a checkpoint)."""
    out: dict[UUID, dict[UUID, StepResult]] = {}
    rows = await conn.fetch(q.RESULTS_BY_RUN, list(run_ids))
    for run_id, result in verifier.check(_stored(row) for row in rows):
        out.setdefault(run_id, {})[result.attempt_id] = result
    return out


async def engine_secret(conn: asyncpg.Connection) -> bytes:
    """The database's engine secret (sql/0011): attempt tokens are derived from it. Only
    the orchestrator's role may read it."""
    secret = await conn.fetchval(q.ENGINE_SECRET)
    if secret is None:
        raise StoreError("flowforge.engine_secret is empty: run `flowforge-orchestrator migrate`")
    return bytes(secret)


def _filed(result: StepResult) -> tuple[UUID, bytes]:
    """The run and the token a result is filed under; StoreError naming the attempt when
    the record lacks one (it was built for reading, not for writing)."""
    if result.run_id is None or result.token is None:
        missing = "run id" if result.run_id is None else "token"
        raise StoreError(f"the result of attempt {result.attempt_id} has no {missing}")
    return result.run_id, result.token


async def insert_results(conn: asyncpg.Connection, results: Sequence[StepResult]) -> int:
    """Many results in one statement (a duplicate (attempt id, token) is skipped); the
    statement's trigger NOTIFYs their attempt ids when the transaction commits. Each result
    needs its `run_id` and `token`. Returns the rows new."""
    filed = [_filed(r) for r in results]
    args = (
        [r.attempt_id for r in results],
        [run_id for run_id, _ in filed],
        [r.step_id for r in results],
        [r.outcome for r in results],
        json_texts(r.output for r in results),
        json_texts(r.error for r in results),
        [r.worker for r in results],
        [r.started_at for r in results],
        [r.finished_at for r in results],
        [token for _, token in filed],
    )
    # Plainly first (no confirmation record per row), unless a failed statement would abort
    # the caller's transaction.
    if not conn.is_in_transaction():
        try:
            status = await conn.execute(q.INSERT_NEW_RESULTS, *args)
            return int(status.rsplit(" ", 1)[-1])
        except asyncpg.UniqueViolationError:
            pass  # a duplicate delivery among them: skip it below
    status = await conn.execute(q.INSERT_RESULTS, *args)
    return int(status.rsplit(" ", 1)[-1])


async def insert_result(conn: asyncpg.Connection, result: StepResult) -> bool:
    """One result; False if this attempt already had one with this token (a duplicate)."""
    return await insert_results(conn, [result]) == 1


async def register_step_types(conn: asyncpg.Connection, types: Sequence[str], worker: str) -> None:
    await conn.execute(q.REGISTER_STEP_TYPES, list(types), worker)


async def list_step_types(conn: asyncpg.Connection) -> list[str]:
    return [row["name"] for row in await conn.fetch(q.LIST_STEP_TYPES)]


# -- reading runs --------------------------------------------------------------------------


async def get_run(conn: asyncpg.Connection, run_id: UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(q.GET_RUN, run_id)


async def list_runs(
    conn: asyncpg.Connection, *, workflow: str | None, status: str | None, limit: int
) -> list[asyncpg.Record]:
    return list(await conn.fetch(q.LIST_RUNS, workflow, status, limit))


async def run_attempts(conn: asyncpg.Connection, run_id: UUID) -> list[asyncpg.Record]:
    return list(await conn.fetch(q.RUN_ATTEMPTS, run_id))


async def run_transitions(
    conn: asyncpg.Connection, run_id: UUID, after_seq: int = 0
) -> list[asyncpg.Record]:
    return list(await conn.fetch(q.RUN_TRANSITIONS, run_id, after_seq))


async def run_events(
    conn: asyncpg.Connection, run_id: UUID, after_seq: int = 0
) -> list[asyncpg.Record]:
    return list(await conn.fetch(q.RUN_EVENTS, run_id, after_seq))


# -- operation (readiness, metrics) ----------------------------------------------------------


async def ping(conn: asyncpg.Connection) -> None:
    """A round trip: the database answers on this connection."""
    await conn.fetchval(q.PING)


async def answers(pool: asyncpg.Pool) -> None:
    """A round trip on a pooled connection (the readiness probe's)."""
    async with pool.acquire() as conn:
        await ping(conn)


async def missing_migrations(pool: asyncpg.Pool) -> list[str]:
    """The migrations this code knows that the database lacks (`0012_name`), on a pooled
    connection (the readiness probe's: it opens none of its own)."""
    async with pool.acquire() as conn:
        return [f"{m.version:04d}_{m.name}" for m in await pending_on(conn)]


@dataclass(frozen=True)
class OutboxBacklog:
    unpublished: int
    oldest_age: float | None  # seconds since the oldest unpublished event; None when none


async def outbox_backlog(conn: asyncpg.Connection) -> OutboxBacklog:
    """Outbox events the slowest registered consumer has not read yet, and how old the
    first of them is (0 and None without a registered consumer)."""
    row = await conn.fetchrow(q.OUTBOX_BACKLOG)
    assert row is not None
    return OutboxBacklog(row["unpublished"], row["oldest_age"])


async def count_open_runs(conn: asyncpg.Connection) -> dict[str, int]:
    """Runs by status, for the statuses that are not final: {"pending": n, "running": m}."""
    row = await conn.fetchrow(q.COUNT_OPEN_RUNS)
    assert row is not None
    return {"pending": row["pending"], "running": row["running"]}
