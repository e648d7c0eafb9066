"""`python -m tests.bench.lifecycle`: what the outbox feed and retention cost on this machine.

Measures, on a private PostgreSQL (or `--dsn`, a database this may fill and empty):
* feed reads: events/s and WAL bytes per event for a consumer reading a backlog with
  `max_events` 100 and 1000, each read in its own transaction;
* retention: runs, outbox rows and results deleted per second by `delete_finished_runs`
  batches of 500 runs, and WAL per deleted row.
Prints one JSON object. Rows are synthetic (SQL-generated), written as the engine writes
them: one transaction per group of runs, ten events and three results per run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import asyncpg

from flowforge_orchestrator import store
from flowforge_orchestrator.local_services.postgres import LocalPostgres
from tests.helpers import register_workflows

EVENTS_PER_RUN = 10
RESULTS_PER_RUN = 3

WRITE_RUNS = """
WITH runs AS (
    INSERT INTO flowforge.runs (workflow_name) SELECT 'bench' FROM generate_series(1, $1)
    RETURNING id
),
events AS (
    INSERT INTO flowforge.outbox (run_id, seq, type, time, data, to_status)
    SELECT r.id, s, 'step.succeeded', now(), '{"step": "a", "attempt": 1}', 'succeeded'
    FROM runs r, generate_series(1, $2) s
),
results AS (
    INSERT INTO flowforge.step_results (attempt_id, run_id, step_id, outcome, output, token)
    SELECT gen_random_uuid(), r.id, 'step' || s, 'succeeded', '{"ok": true}',
           decode(md5(r.id::text || s), 'hex')
    FROM runs r, generate_series(1, $3) s
)
SELECT count(*) FROM runs
"""

FINISH_ALL = """
UPDATE flowforge.runs SET status = 'completed', finished_at = now() - interval '40 days'
"""


async def _wal(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn"))


async def _fill(conn: asyncpg.Connection, runs: int, per_tx: int) -> None:
    await register_workflows(conn, "bench")  # a run of an unknown workflow is refused
    for _ in range(runs // per_tx):
        await conn.fetchval(WRITE_RUNS, per_tx, EVENTS_PER_RUN, RESULTS_PER_RUN)


async def measure_feed(conn: asyncpg.Connection, max_events: int) -> dict[str, Any]:
    name = f"bench-{max_events}"
    await store.register_consumer(conn, name)
    await conn.execute("CHECKPOINT")  # full-page images of the cursor row counted once
    events = reads = 0
    wal = await _wal(conn)
    started = time.perf_counter()
    while True:
        async with conn.transaction():
            got = await store.read_outbox(conn, name, max_events)
        reads += 1
        events += len(got)
        if not got:
            break
    took = time.perf_counter() - started
    wal = await _wal(conn) - wal
    return {
        "max_events": max_events,
        "events": events,
        "reads": reads,
        "seconds": round(took, 3),
        "events_per_s": round(events / took),
        "wal_bytes_per_event": round(wal / events, 2),
        "wal_bytes_per_read": round(wal / reads, 1),
    }


async def measure_retention(conn: asyncpg.Connection, runs: int) -> dict[str, Any]:
    await conn.execute("DELETE FROM flowforge.outbox_consumers")
    await conn.execute(FINISH_ALL)
    await conn.execute("VACUUM ANALYZE flowforge.runs")
    await conn.execute("CHECKPOINT")
    wal = await _wal(conn)
    totals = {"runs": 0, "outbox": 0, "step_results": 0}
    batches = []
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        batch = await store.delete_finished_runs(
            conn, retention=30 * 86400, max_age=7 * 86400, batch=500
        )
        batches.append(time.perf_counter() - t0)
        for key in totals:
            totals[key] += getattr(batch, key)
        if batch.runs < 500:
            break
    took = time.perf_counter() - started
    wal = await _wal(conn) - wal
    rows = sum(totals.values())
    assert totals["runs"] == runs, totals
    return {
        **totals,
        "seconds": round(took, 3),
        "runs_per_s": round(totals["runs"] / took),
        "rows_per_s": round(rows / took),
        "batch_ms_max": round(1000 * max(batches), 1),
        "wal_bytes_per_row": round(wal / rows, 1),
    }


@contextlib.contextmanager
def _database(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    server = LocalPostgres(durable=True).start()
    try:
        yield server.url
    finally:
        server.stop()


async def run(dsn: str, runs: int) -> dict[str, Any]:
    await store.apply_migrations(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "TRUNCATE flowforge.runs, flowforge.outbox_packed, flowforge.step_results,"
            " flowforge.run_parts"
        )
        await conn.execute("DELETE FROM flowforge.outbox_consumers")
        await _fill(conn, runs, per_tx=50)
        await conn.execute("VACUUM ANALYZE flowforge.outbox_packed")
        feed = [await measure_feed(conn, n) for n in (100, 1000)]
        retention = await measure_retention(conn, runs)
        return {"runs": runs, "events": runs * EVENTS_PER_RUN, "feed": feed, "retention": retention}
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="a database to use (default: a private server)")
    parser.add_argument("--runs", type=int, default=20_000)
    args = parser.parse_args()
    with _database(args.dsn) as dsn:
        print(json.dumps(asyncio.run(run(dsn, args.runs)), indent=2))


if __name__ == "__main__":
    main()
