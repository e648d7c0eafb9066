"""Orchestrators' liveness, read through PostgreSQL.

Each orchestrator holds a session-level advisory lock named by its node id on a connection of
its own, for its whole life. The server releases that lock the moment the session ends: when
the process dies (its socket is closed by the kernel), or when the server's TCP keepalive
gives up on a vanished host. Another orchestrator finds, in one statement, the owners of
running runs whose lock nobody holds, and expires those runs' leases in the same statement,
so that a claim adopts them at once instead of after the lease. A paused or partitioned
owner that still holds its session is not revealed here: its lease and the epoch fence are.
"""

from __future__ import annotations

from uuid import UUID

import asyncpg

from flowforge_orchestrator.store.db import wrap

__all__ = [
    "EXPIRE_LIMIT",
    "LIVENESS_LOCK_CLASS",
    "LOCK_SESSION_SETTINGS",
    "connect_lock_session",
    "expire_dead_owners",
    "release_leftovers",
    "try_lock_node",
    "wake_claimers",
]

# The first key of every orchestrator's lock ("LIVE"); the second is hashtext(node id). Two
# int4 keys, so no single-key advisory lock of the engine (migrations, retention) shares it.
LIVENESS_LOCK_CLASS = 0x4C495645

# The lock session's server-side TCP settings: a host that vanished without closing its
# socket is given up on (and its lock released) after about 2 + 3 x 1 s of silence, or 5 s
# of unacknowledged data, instead of the kernel's two hours. No effect over a Unix socket.
LOCK_SESSION_SETTINGS = {
    "tcp_keepalives_idle": "2",
    "tcp_keepalives_interval": "1",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "5000",
    "application_name": "flowforge liveness",
}

TRY_LOCK_NODE = "SELECT pg_try_advisory_lock($1::integer, hashtext($2))"

EXPIRE_LIMIT = 1000  # leases ended per statement (about 0.1 s of work on a busy server)

# The owners of running runs, one index probe each (a loose scan of `runs_running_owner`,
# however many runs they hold); those other than $1 whose lock no session of this database
# holds are dead: their unexpired leases end now, in this statement, and every orchestrator
# is woken to claim. Rows locked by a claim in progress are skipped (that claim moves them
# on). At most $4 leases per statement, so that each stays short (the claims adopt fewer
# per second anyway). Runs are looked up per dead owner, by `runs_running_owner`: with no
# owner dead, the statement reads one index entry per owner and nothing else. Nobody is
# judged while the server started less than $3 seconds ago: every lock went with the
# restart, and the live owners need a moment to take theirs again. The answer: how many
# leases of each dead owner were ended (none: no row).
EXPIRE_DEAD_OWNERS = """
WITH RECURSIVE owners(owner) AS (
    (SELECT owner FROM flowforge.runs
     WHERE status = 'running' AND owner IS NOT NULL ORDER BY owner LIMIT 1)
    UNION ALL
    SELECT (SELECT r.owner FROM flowforge.runs r
            WHERE r.status = 'running' AND r.owner > o.owner ORDER BY r.owner LIMIT 1)
    FROM owners o WHERE o.owner IS NOT NULL
),
held AS MATERIALIZED (
    SELECT objid FROM pg_locks
    WHERE locktype = 'advisory' AND classid = $2::integer::oid AND objsubid = 2 AND granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
),
dead AS MATERIALIZED (
    SELECT owner FROM owners
    WHERE owner IS NOT NULL AND owner <> $1
      AND hashtext(owner)::oid NOT IN (SELECT objid FROM held)
      AND pg_postmaster_start_time() < now() - make_interval(secs => $3)
),
doomed AS MATERIALIZED (
    SELECT x.id FROM dead d CROSS JOIN LATERAL (
        SELECT id FROM flowforge.runs
        WHERE status = 'running' AND owner = d.owner AND lease_expires_at > now()
        LIMIT $4
        FOR NO KEY UPDATE SKIP LOCKED
    ) x
    LIMIT $4
),
expired AS (
    UPDATE flowforge.runs r SET lease_expires_at = now()
    WHERE r.id = ANY (ARRAY(SELECT id FROM doomed))
    RETURNING r.owner
),
counted AS (SELECT owner, count(*) AS runs FROM expired GROUP BY owner)
SELECT owner, runs, (SELECT pg_notify('flowforge_runs', '')) IS NULL AS woken FROM counted
"""

# At start, once this node's lock is held: leases still running under this node id belong
# to an earlier process of the same name (a restarted pod), which is dead since its lock
# was free. They end now, so a claim resumes them, rather than after their lease.
RELEASE_LEFTOVERS = """
WITH released AS (
    UPDATE flowforge.runs SET lease_expires_at = now()
    WHERE id IN (SELECT id FROM flowforge.runs
                 WHERE owner = $1 AND status = 'running' AND lease_expires_at > now()
                   AND NOT id = ANY($2::uuid[])
                 FOR NO KEY UPDATE SKIP LOCKED)
    RETURNING id
)
SELECT count(*) AS runs,
       (SELECT pg_notify('flowforge_runs', '') WHERE EXISTS (SELECT FROM released)) AS woken
FROM released
"""

NOTIFY_RUNS = "SELECT pg_notify('flowforge_runs', '')"


async def connect_lock_session(dsn: str) -> asyncpg.Connection:
    """A connection of its own for the node's lock (never a pooled one: its session is
    the lock), with keepalives short enough to reveal a vanished host in seconds."""
    try:
        return await asyncpg.connect(dsn, server_settings=LOCK_SESSION_SETTINGS)
    except Exception as exc:
        raise wrap(exc) from exc


async def try_lock_node(conn: asyncpg.Connection, node: str) -> bool:
    """Take this node's lock on `conn`'s session; False if another session holds it (an
    earlier process of the same name whose session the server has not closed yet)."""
    return bool(await conn.fetchval(TRY_LOCK_NODE, LIVENESS_LOCK_CLASS, node))


async def expire_dead_owners(
    conn: asyncpg.Connection, node: str, grace: float, limit: int = EXPIRE_LIMIT
) -> dict[str, int]:
    """End the leases of every owner other than `node` whose lock is free (unless the
    server started less than `grace` seconds ago), `limit` at most; wakes the claimers
    when it ended any. Returns dead owner -> leases ended (when they add up to `limit`,
    there may be more)."""
    rows = await conn.fetch(EXPIRE_DEAD_OWNERS, node, LIVENESS_LOCK_CLASS, grace, limit)
    return {row["owner"]: int(row["runs"]) for row in rows}


async def release_leftovers(conn: asyncpg.Connection, node: str, keep: list[UUID]) -> int:
    """End the leases held under `node` except `keep` (the runs this process owns);
    returns how many."""
    row = await conn.fetchrow(RELEASE_LEFTOVERS, node, keep)
    assert row is not None
    return int(row["runs"])


async def wake_claimers(conn: asyncpg.Connection) -> None:
    """NOTIFY every orchestrator that runs may be claimable (leases given back)."""
    await conn.execute(NOTIFY_RUNS)
