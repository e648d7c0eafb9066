"""The outbox feed (sql/0012): registered consumers, each reading the CloudEvents after its
own cursor, gap-free, in the caller's transaction; and how far behind each consumer is.

A relay reads, publishes, then commits:

    async with conn.transaction():
        events = await read_outbox(conn, "billing-relay", 500)
        await broker.publish_all([e.event for e in events])

A rollback (or a crash before the commit) leaves the cursor where it was: the same events
come again, with the same ids, for the broker's consumers to de-duplicate.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from flowforge_orchestrator.errors import NotFound

__all__ = [
    "ConsumerLag",
    "FeedEvent",
    "consumer_lags",
    "drop_consumer",
    "read_outbox",
    "register_consumer",
]

# What sql/0012 accepts as a consumer name (checked here first, for a clearer error).
CONSUMER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")

# The NOTIFY channel the outbox's insert trigger signals (payload empty).
OUTBOX_CHANNEL = "flowforge_outbox"

OUTBOX_NEXT = 'SELECT "position", run_id, seq, type, event FROM flowforge.outbox_next($1, $2)'

# From now: the cursor at the oldest transaction still in flight, so whatever it (or a later
# one) commits is read, and everything already committed before is not.
REGISTER_CONSUMER = """
INSERT INTO flowforge.outbox_consumers (name, last_xid)
VALUES ($1, CASE WHEN $2 THEN pg_snapshot_xmin(pg_current_snapshot()) ELSE '0'::xid8 END)
ON CONFLICT (name) DO NOTHING
RETURNING name
"""

DROP_CONSUMER = "DELETE FROM flowforge.outbox_consumers WHERE name = $1 RETURNING name"

# Events after each cursor (counted over at most $1 rows, so a huge backlog costs a bounded
# scan of the feed index), and the age of the first of them in feed order; read from the
# packed rows without unpacking them (sql/0017, `outbox_lag`).
CONSUMER_LAGS = """
SELECT c.name, c.registered_at, c.read_at, c.events_read, c.lost_events, c.lost_at,
       l.events AS events_behind,
       extract(epoch FROM now() - l.oldest)::float8 AS seconds_behind
FROM flowforge.outbox_consumers c
CROSS JOIN LATERAL flowforge.outbox_lag(c.last_xid, c.last_position, $1) l
ORDER BY c.name
"""


@dataclass(frozen=True)
class FeedEvent:
    """One outbox event as a relay publishes it: `event` is the CloudEvents 1.0 envelope,
    whose `id` (`<run id>/<seq>`) is stable across re-reads."""

    position: int
    run_id: UUID
    seq: int
    type: str
    event: dict[str, Any]


@dataclass(frozen=True)
class ConsumerLag:
    name: str
    registered_at: datetime
    read_at: datetime | None
    events_read: int
    events_behind: int  # capped at the count asked for
    seconds_behind: float | None  # age of the next unread event; None when none is waiting
    lost_events: int  # deleted by retention past FLOWFORGE_OUTBOX_MAX_AGE before it read them
    lost_at: datetime | None


async def register_consumer(conn: asyncpg.Connection, name: str, *, from_now: bool = False) -> bool:
    """Register consumer `name` (False if it already was): it reads every event still in
    the outbox, or with `from_now` only those committed from now on. From then on retention
    keeps each event until this consumer has read it (FLOWFORGE_OUTBOX_MAX_AGE at most)."""
    if not CONSUMER_NAME.fullmatch(name):
        raise ValueError(
            f"consumer name {name!r}: use 1 to 100 letters, digits and _ . : - "
            "(starting with a letter or digit)"
        )
    return await conn.fetchval(REGISTER_CONSUMER, name, from_now) is not None


async def drop_consumer(conn: asyncpg.Connection, name: str) -> bool:
    """Forget consumer `name`: retention stops waiting for it. False if it was not there."""
    return await conn.fetchval(DROP_CONSUMER, name) is not None


async def read_outbox(conn: asyncpg.Connection, consumer: str, max_events: int) -> list[FeedEvent]:
    """The next events (at most `max_events`) for `consumer`, moving its cursor in the
    caller's transaction (READ COMMITTED): commit after publishing them."""
    try:
        rows = await conn.fetch(OUTBOX_NEXT, consumer, max_events)
    except asyncpg.NoDataFoundError as exc:
        raise NotFound(f"outbox consumer {consumer!r} is not registered") from exc
    return [
        FeedEvent(r["position"], r["run_id"], r["seq"], r["type"], _json(r["event"])) for r in rows
    ]


async def consumer_lags(
    conn: asyncpg.Connection, *, count_up_to: int = 1_000_000
) -> list[ConsumerLag]:
    """Every registered consumer and how far behind it is."""
    rows = await conn.fetch(CONSUMER_LAGS, count_up_to)
    return [
        ConsumerLag(
            name=r["name"],
            registered_at=r["registered_at"],
            read_at=r["read_at"],
            events_read=r["events_read"],
            events_behind=r["events_behind"],
            seconds_behind=r["seconds_behind"],
            lost_events=r["lost_events"],
            lost_at=r["lost_at"],
        )
        for r in rows
    ]


def _json(value: Any) -> dict[str, Any]:
    # Pools may or may not register a jsonb codec; accept both forms.
    decoded = json.loads(value) if isinstance(value, str) else value
    assert isinstance(decoded, dict)
    return decoded
