"""Events, outside completions and heartbeats (sql/0013): the rows, and every query on them.

The senders' side (`send_event`, `complete_attempt`) runs in the caller's transaction on any
asyncpg connection, like `enqueue_run`: values travel as JSON text, so no type codec is
needed. The orchestrator's side reads events by id range (a notification) or by the waits
it holds (after a claim, a missed notification), and writes consumptions in its group commit.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from flowforge_orchestrator.core.jsonb import value_problem
from flowforge_orchestrator.core.records import StepResult
from flowforge_orchestrator.core.tokens import AttemptTokens
from flowforge_orchestrator.errors import InvalidEvent, NotFound, StepError

__all__ = [
    "Completion",
    "Event",
    "EventAddress",
    "complete_attempt",
    "completions",
    "delete_expired",
    "events_by_ids",
    "events_for_waits",
    "heartbeat_ages",
    "last_heartbeats",
    "recent_events",
    "record_heartbeats",
    "run_events_not_taken",
    "run_heartbeats",
    "run_waits",
    "send_event",
]

MAX_NAME = 200
MAX_KEY = 1000

_SEND_EVENT = """
INSERT INTO flowforge.events (run_id, name, key, payload)
VALUES ($1, $2, $3, $4::text::jsonb)
RETURNING id
"""

_COMPLETE_ATTEMPT = """
INSERT INTO flowforge.step_completions (attempt_id, token, output, error)
VALUES ($1, $2, $3::text::jsonb, $4::text::jsonb)
RETURNING id
"""

_EVENT_COLUMNS = "e.id, e.run_id, e.name, e.key, e.payload::text AS payload, e.created_at"

_RECENT_EVENTS = f"""
SELECT {_EVENT_COLUMNS} FROM flowforge.events e
WHERE e.created_at > now() - make_interval(secs => $1) ORDER BY e.id
"""

_EVENTS_BETWEEN = f"""
SELECT {_EVENT_COLUMNS} FROM flowforge.events e WHERE e.id BETWEEN $1 AND $2 ORDER BY e.id
"""

# The oldest event each wait may take: addressed to its run, or to its name and key, and
# not taken by that run yet (keyed events only within the retention window). One query for
# every wait of a batch; a wait may see an event another wait of its run takes first, so
# the caller hands out events in order and asks again for what was left without one.
_EVENTS_FOR_WAITS = f"""
SELECT w.ord, {_EVENT_COLUMNS}
FROM unnest($1::uuid[], $2::text[], $3::text[]) WITH ORDINALITY AS w(run_id, name, key, ord)
CROSS JOIN LATERAL (
    SELECT e.* FROM flowforge.events e
    WHERE e.name = w.name
      AND (e.run_id = w.run_id
           OR (w.key IS NOT NULL AND e.key = w.key
               AND e.created_at > now() - make_interval(secs => $4)))
      AND NOT EXISTS (
          SELECT FROM flowforge.event_consumptions c
          WHERE c.run_id = w.run_id AND c.event_id = e.id)
      AND e.id <> ALL ($5::bigint[])
    ORDER BY e.id
    LIMIT 1
) e
"""

# What `runs show` tells of a run: the waits still open (their `step.waiting` event with no
# later end of the same step), the events sent to it that no wait took, the last heartbeats.
_RUN_WAITS = """
SELECT w.step_id, w.data ->> 'event' AS event, w.data ->> 'key' AS key,
       w.data ->> 'deadline' AS deadline, w.time AS since
FROM flowforge.outbox w
WHERE w.run_id = $1 AND w.type = 'step.waiting'
  AND NOT EXISTS (
      SELECT FROM flowforge.outbox o
      WHERE o.run_id = w.run_id AND o.step_id = w.step_id AND o.seq > w.seq
        AND o.type IN ('step.succeeded', 'step.failed', 'step.timed_out', 'step.cancelled',
                       'step.skipped', 'step.retrying'))
ORDER BY w.seq
"""

_RUN_EVENTS_NOT_TAKEN = """
SELECT e.id, e.name, e.payload::text AS payload, e.created_at
FROM flowforge.events e
WHERE e.run_id = $1
  AND NOT EXISTS (SELECT FROM flowforge.event_consumptions c
                  WHERE c.run_id = e.run_id AND c.event_id = e.id)
ORDER BY e.id
"""

_RUN_HEARTBEATS = """
SELECT attempt_id, details::text AS details, at FROM flowforge.heartbeats WHERE run_id = $1
"""

# Completions of attempts a worker handed off (its `handed_off` row is there), in order.
_COMPLETIONS = """
SELECT c.id, c.attempt_id, c.token, c.output::text AS output, c.error::text AS error,
       c.created_at, r.run_id, r.step_id, r.started_at, r.token AS result_token
FROM flowforge.step_completions c
JOIN flowforge.step_results r ON r.attempt_id = c.attempt_id AND r.outcome = 'handed_off'
WHERE c.attempt_id = ANY($1::uuid[])
ORDER BY c.id
"""

# Seconds since each attempt's last heartbeat, on the database's clock (the one that
# stamped it), and the details of the last one.
_HEARTBEAT_AGES = """
SELECT attempt_id, extract(epoch FROM now() - at)::float8 AS age
FROM flowforge.heartbeats WHERE attempt_id = ANY($1::uuid[])
"""

_LAST_HEARTBEATS = """
SELECT attempt_id, details::text AS details
FROM flowforge.heartbeats WHERE attempt_id = ANY($1::uuid[])
"""

# Retention (engine/retention.py): keyed events past FLOWFORGE_EVENT_RETENTION (events sent
# to a run go with their run), and completions older than the run retention (their attempt's
# run is gone or has its result by then). In batches, oldest first.
_DELETE_EXPIRED_EVENTS = """
WITH doomed AS (
    SELECT id FROM flowforge.events
    WHERE run_id IS NULL AND created_at < now() - make_interval(secs => $1)
    ORDER BY created_at LIMIT $2
), gone AS (
    DELETE FROM flowforge.events e USING doomed d WHERE e.id = d.id RETURNING e.id
), taken AS (
    DELETE FROM flowforge.event_consumptions c USING gone g WHERE c.event_id = g.id
)
SELECT count(*) FROM gone
"""

_DELETE_OLD_COMPLETIONS = """
WITH doomed AS (
    SELECT id FROM flowforge.step_completions
    WHERE created_at < now() - make_interval(secs => $1)
    ORDER BY created_at LIMIT $2
)
DELETE FROM flowforge.step_completions c USING doomed d WHERE c.id = d.id
"""

_RECORD_HEARTBEATS = (
    "SELECT flowforge.heartbeat($1::uuid[], $2::uuid[], $3::bytea[], $4::text[]::jsonb[])"
)


@dataclass(frozen=True)
class Event:
    """One event row: addressed to `run_id`, or to every run waiting on (`name`, `key`)."""

    id: int
    run_id: UUID | None
    name: str
    key: str | None
    payload: Any
    created_at: datetime

    def as_output(self) -> dict[str, Any]:
        """What a wait step that took this event gives its dependents."""
        return {
            "name": self.name,
            "key": self.key,
            "payload": self.payload,
            "id": self.id,
            "received_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class EventAddress:
    """What one wait step listens for: its run's events of `name`, and those sent by key."""

    run_id: UUID
    name: str
    key: str | None


@dataclass(frozen=True)
class Completion:
    """A step completed from outside: an output, or an error (a dict with a category)."""

    id: int
    attempt_id: UUID
    token: str
    output: Any
    error: Any


def _event(row: asyncpg.Record) -> Event:
    return Event(
        id=row["id"],
        run_id=row["run_id"],
        name=row["name"],
        key=row["key"],
        payload=json.loads(row["payload"]),
        created_at=row["created_at"],
    )


def _json_text(what: str, value: Any) -> str:
    problem = value_problem(value)
    if problem is not None:
        raise InvalidEvent(f"{what}: {problem}")
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(f"{what} is not JSON: {exc}") from None


def _check_address(name: str, run_id: UUID | None, key: str | None) -> None:
    if not name or len(name) > MAX_NAME:
        raise InvalidEvent(f"an event's name has 1 to {MAX_NAME} characters (got {len(name)})")
    if (run_id is None) == (key is None):
        raise InvalidEvent(f"event {name!r}: give a run id or a key, not both or neither")
    if key is not None and len(key) > MAX_KEY:
        raise InvalidEvent(f"event {name!r}: a key has at most {MAX_KEY} characters")


async def send_event(
    conn: asyncpg.Connection,
    name: str,
    payload: Any = None,
    *,
    run_id: UUID | None = None,
    key: str | None = None,
) -> int:
    """Insert an event for one run or for a key; returns its id. Delivered when the caller's
    transaction commits; nothing is delivered if it rolls back."""
    _check_address(name, run_id, key)
    text = _json_text(f"event {name!r}: the payload", payload if payload is not None else {})
    try:
        event_id: int = await conn.fetchval(_SEND_EVENT, run_id, name, key, text)
    except asyncpg.ForeignKeyViolationError:
        raise NotFound(f"event {name!r}: there is no run {run_id}") from None
    return event_id


async def complete_attempt(
    conn: asyncpg.Connection,
    attempt_id: UUID,
    token: str,
    *,
    output: Any = None,
    error: Any = None,
) -> int:
    """Insert the completion of a handed-off attempt (an output, or an error); returns its
    id. A late, duplicate or wrongly signed completion is stored and changes nothing."""
    if output is not None and error is not None:
        raise InvalidEvent(f"attempt {attempt_id}: a completion has an output or an error")
    out = None if output is None else _json_text(f"attempt {attempt_id}: the output", output)
    err = None if error is None else _json_text(f"attempt {attempt_id}: the error", error)
    completion_id: int = await conn.fetchval(_COMPLETE_ATTEMPT, attempt_id, token, out, err)
    return completion_id


async def events_by_ids(conn: asyncpg.Connection, first: int, last: int) -> list[Event]:
    """The events whose ids a notification named (`first-last`), in order."""
    return [_event(row) for row in await conn.fetch(_EVENTS_BETWEEN, first, last)]


async def recent_events(conn: asyncpg.Connection, seconds: float) -> list[Event]:
    """The events sent in the last `seconds` (the slow poll's second look)."""
    return [_event(row) for row in await conn.fetch(_RECENT_EVENTS, seconds)]


async def events_for_waits(
    conn: asyncpg.Connection,
    waits: Sequence[EventAddress],
    *,
    retention_seconds: float,
    taken: Sequence[int] = (),
) -> dict[int, Event]:
    """For each wait (by its index in `waits`), the oldest event it may take, if any; events
    in `taken` are skipped (handed to another wait of the batch)."""
    if not waits:
        return {}
    rows = await conn.fetch(
        _EVENTS_FOR_WAITS,
        [w.run_id for w in waits],
        [w.name for w in waits],
        [w.key for w in waits],
        retention_seconds,
        list(taken),
    )
    return {row["ord"] - 1: _event(row) for row in rows}


async def completions(
    conn: asyncpg.Connection, attempt_ids: Sequence[UUID], tokens: AttemptTokens
) -> list[tuple[UUID, StepResult]]:
    """The first verified completion of each handed-off attempt among `attempt_ids`, as the
    attempt's result: (run id, result). A completion with a wrong token, or whose payload
    cannot be read, counts for nothing (it stays in the table, visible)."""
    if not attempt_ids:
        return []
    found: dict[UUID, tuple[UUID, StepResult]] = {}
    for row in await conn.fetch(_COMPLETIONS, list(attempt_ids)):
        attempt = row["attempt_id"]
        if attempt in found or not tokens.verify(attempt, bytes(row["result_token"])):
            continue
        expected = tokens.token(attempt).hex()
        if not hmac.compare_digest(expected, str(row["token"]).lower()):
            continue
        result = _completion_result(row)
        if result is not None:
            found[attempt] = (row["run_id"], result)
    return list(found.values())


def _completion_result(row: asyncpg.Record) -> StepResult | None:
    try:
        output = json.loads(row["output"]) if row["output"] is not None else None
        error = json.loads(row["error"]) if row["error"] is not None else None
    except (ValueError, RecursionError):
        return None
    if error is not None:
        error = _completion_error(error)
    return StepResult(
        attempt_id=row["attempt_id"],
        step_id=row["step_id"],
        outcome="failed" if error is not None else "succeeded",
        output=None if error is not None else output,
        error=error,
        started_at=row["started_at"],
        finished_at=row["created_at"],
        worker="outside",
    )


def _completion_error(error: object) -> dict[str, Any]:
    """An error from outside, as a step failure: its message, category (default
    `completion_error`), retryable (default true: `retry_on` decides) and details."""
    given: dict[str, Any] = error if isinstance(error, dict) else {"message": error}
    category, details = given.get("category"), given.get("details")
    return StepError(
        str(given.get("message") or "the step was completed with an error"),
        category=category if isinstance(category, str) and category else "completion_error",
        retryable=given.get("retryable") is not False,
        details=details if isinstance(details, dict) else None,
    ).to_dict()


async def run_waits(conn: asyncpg.Connection, run_id: UUID) -> list[dict[str, object]]:
    """The run's wait steps still listening: step, event, key, deadline, since."""
    return [dict(row) for row in await conn.fetch(_RUN_WAITS, run_id)]


async def run_events_not_taken(conn: asyncpg.Connection, run_id: UUID) -> list[dict[str, object]]:
    """Events sent to the run (by its id) that no wait step of it has taken."""
    rows = await conn.fetch(_RUN_EVENTS_NOT_TAKEN, run_id)
    return [{**dict(row), "payload": json.loads(row["payload"])} for row in rows]


async def run_heartbeats(conn: asyncpg.Connection, run_id: UUID) -> dict[UUID, dict[str, object]]:
    """The last heartbeat of each of the run's attempts that beat: details and time."""
    rows = await conn.fetch(_RUN_HEARTBEATS, run_id)
    return {
        row["attempt_id"]: {"details": json.loads(row["details"] or "null"), "at": row["at"]}
        for row in rows
    }


async def heartbeat_ages(
    conn: asyncpg.Connection, attempt_ids: Sequence[UUID]
) -> dict[UUID, float]:
    """Seconds since the last heartbeat of each attempt that has beaten."""
    rows = await conn.fetch(_HEARTBEAT_AGES, list(attempt_ids))
    return {row["attempt_id"]: row["age"] for row in rows}


async def last_heartbeats(conn: asyncpg.Connection, attempt_ids: Sequence[UUID]) -> dict[UUID, Any]:
    """The details of each attempt's last heartbeat (attempts that never beat are absent)."""
    rows = await conn.fetch(_LAST_HEARTBEATS, list(attempt_ids))
    return {row["attempt_id"]: json.loads(row["details"] or "null") for row in rows}


async def delete_expired(
    conn: asyncpg.Connection, *, event_retention: float, run_retention: float, batch: int
) -> tuple[int, int]:
    """One batch of keyed events past their retention and of old completions: (events,
    completions) deleted."""
    events: int = await conn.fetchval(_DELETE_EXPIRED_EVENTS, event_retention, batch)
    status = await conn.execute(_DELETE_OLD_COMPLETIONS, run_retention, batch)
    return events, int(status.split()[-1])


async def record_heartbeats(
    conn: asyncpg.Connection,
    beats: Sequence[tuple[UUID, UUID, bytes, Any]],
) -> int:
    """Record many attempts' last heartbeats in one statement: (run id, attempt id, token,
    details). Heartbeats whose token does not match are dropped; returns how many counted."""
    if not beats:
        return 0
    recorded: int = await conn.fetchval(
        _RECORD_HEARTBEATS,
        [b[0] for b in beats],
        [b[1] for b in beats],
        [b[2] for b in beats],
        [json.dumps(b[3], separators=(",", ":")) for b in beats],
    )
    return recorded
