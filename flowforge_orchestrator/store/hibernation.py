"""Hibernated runs (sql/0016): when the next one is due, and waking those an event or a
cancellation concerns.

A hibernated run is `running` with no owner and a `wake_at`; waking it sets `wake_at` to now
and NOTIFYs `flowforge_runs`, so that whichever replica claims first takes it. Rows being
claimed are skipped (`SKIP LOCKED`): the claim that holds them wakes them anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

import asyncpg

__all__ = [
    "next_wake",
    "wake_cancelled",
    "wake_for_events",
    "wake_for_recent_events",
    "wake_if_called",
]

# The earliest finite wake-up time ('infinity': only an event wakes the run).
_NEXT_WAKE = """
SELECT min(wake_at) FROM flowforge.runs WHERE wake_at IS NOT NULL AND wake_at < 'infinity'
"""

# Wake the runs of `due` (ids of hibernated runs, locked here) and tell the claimers.
_WAKE = """
, woken AS (
    UPDATE flowforge.runs r SET wake_at = now() FROM due WHERE r.id = due.id RETURNING r.id
)
SELECT count(*) AS woken,
       (SELECT pg_notify('flowforge_runs', '') WHERE EXISTS (SELECT FROM woken)) AS notified
FROM woken
"""

# Hibernated runs with a wait that one of the events `e` is for (by run id and name, or by
# name and key) and that the run has not taken yet.
_WAKE_FOR = (
    """
WITH e AS ({events}),
hit AS (
    SELECT p.run_id, e.id AS event_id
    FROM e JOIN flowforge.parked_waits p ON p.run_id = e.run_id AND p.name = e.name
    UNION ALL
    SELECT p.run_id, e.id
    FROM e JOIN flowforge.parked_waits p ON p.name = e.name AND p.key = e.key
    WHERE e.key IS NOT NULL
),
due AS (
    SELECT r.id FROM flowforge.runs r
    WHERE r.wake_at > now()
      AND r.id IN (SELECT h.run_id FROM hit h WHERE NOT EXISTS (
          SELECT FROM flowforge.event_consumptions c
          WHERE c.run_id = h.run_id AND c.event_id = h.event_id))
    FOR NO KEY UPDATE SKIP LOCKED
)"""
    + _WAKE
)

_WAKE_FOR_EVENTS = _WAKE_FOR.format(
    events="SELECT id, run_id, name, key FROM flowforge.events WHERE id BETWEEN $1 AND $2"
)

_WAKE_FOR_RECENT_EVENTS = _WAKE_FOR.format(
    events="SELECT id, run_id, name, key FROM flowforge.events "
    "WHERE created_at > now() - make_interval(secs => $1)"
)

# These runs, if hibernated, when they have a reason to wake: a cancellation asked for, or an
# event for one of their waits not taken yet (keyed ones within the retention, `$2` s).
_WAKE_IF_CALLED = (
    """
WITH due AS (
    SELECT r.id FROM flowforge.runs r
    WHERE r.id = ANY($1::uuid[]) AND r.wake_at > now()
      AND (r.cancel_requested
           OR EXISTS (SELECT FROM flowforge.cancel_requests c
                      WHERE c.run_id = r.id AND c.handled_at IS NULL)
           OR EXISTS (
               SELECT FROM flowforge.parked_waits p
               JOIN flowforge.events e ON e.name = p.name
                   AND (e.run_id = p.run_id
                        OR (p.key IS NOT NULL AND e.key = p.key
                            AND e.created_at > now() - make_interval(secs => $2)))
               WHERE p.run_id = r.id
                 AND NOT EXISTS (SELECT FROM flowforge.event_consumptions c
                                 WHERE c.run_id = r.id AND c.event_id = e.id)))
    FOR NO KEY UPDATE SKIP LOCKED
)"""
    + _WAKE
)

# Hibernated runs with an open cancellation request (the slow poll: a missed notification).
_WAKE_CANCELLED = (
    """
WITH due AS (
    SELECT r.id FROM flowforge.runs r
    JOIN flowforge.cancel_requests c ON c.run_id = r.id AND c.handled_at IS NULL
    WHERE r.wake_at > now()
    FOR NO KEY UPDATE OF r SKIP LOCKED
)"""
    + _WAKE
)


async def next_wake(conn: asyncpg.Connection) -> datetime | None:
    """When the earliest hibernated run is due (None: none has a timer)."""
    found: datetime | None = await conn.fetchval(_NEXT_WAKE)
    return found


async def _woken(conn: asyncpg.Connection, query: str, *args: object) -> int:
    return int(await conn.fetchval(query, *args))


async def wake_for_events(conn: asyncpg.Connection, first: int, last: int) -> int:
    """Wake the hibernated runs that the events with ids `first`..`last` are for; how many."""
    return await _woken(conn, _WAKE_FOR_EVENTS, first, last)


async def wake_for_recent_events(conn: asyncpg.Connection, seconds: float) -> int:
    """The same for the events of the last `seconds` (a notification may have been missed)."""
    return await _woken(conn, _WAKE_FOR_RECENT_EVENTS, seconds)


async def wake_if_called(
    conn: asyncpg.Connection, run_ids: Sequence[UUID], retention_seconds: float
) -> int:
    """Wake those of these runs that are hibernated and have an event to take or a
    cancellation asked for; how many."""
    return await _woken(conn, _WAKE_IF_CALLED, list(run_ids), retention_seconds)


async def wake_cancelled(conn: asyncpg.Connection) -> int:
    """Wake every hibernated run with an open cancellation request; how many."""
    return await _woken(conn, _WAKE_CANCELLED)
