"""The run row's WAL: an everyday update of a run writes its new version and nothing more.

Any BEFORE UPDATE row trigger on `flowforge.runs`, whatever its column list or WHEN, makes
PostgreSQL lock every row an UPDATE touches first: a lock record per run per group commit
(sql/0008, sql/0018)."""

from __future__ import annotations

import asyncpg


A_DEFINITION = "INSERT INTO flowforge.workflow_definitions (name, version, spec) VALUES ('one', 1, '{}')"
A_RUN = "INSERT INTO flowforge.runs (workflow_name) VALUES ('one') RETURNING id"

# pg_trigger.tgtype bits (PostgreSQL's trigger.h): ROW 1, BEFORE 2, UPDATE 16.
BEFORE_ROW_UPDATE = """
SELECT tgname FROM pg_trigger
WHERE tgrelid = 'flowforge.runs'::regclass AND NOT tgisinternal
  AND tgtype & 1 = 1 AND tgtype & 2 = 2 AND tgtype & 16 = 16
ORDER BY tgname
"""

# The heap records one transaction wrote (pg_walinspect, PostgreSQL 15).
RECORDS_OF_XID = """
SELECT record_type FROM pg_get_wal_records_info($1::text::pg_lsn, pg_current_wal_flush_lsn())
WHERE xid::text = $2 AND resource_manager = 'Heap'
ORDER BY start_lsn
"""


async def test_runs_have_no_before_update_row_trigger(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        assert [r["tgname"] for r in await conn.fetch(BEFORE_ROW_UPDATE)] == []
    finally:
        await conn.close()


async def test_an_update_of_a_run_writes_no_lock_record(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)  # the admin DSN: pg_walinspect needs a superuser
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        await conn.execute(A_DEFINITION)
        run_id = await conn.fetchval(A_RUN)
        start = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
        async with conn.transaction():
            # A flushed commit: pg_walinspect reads only up to the flush position.
            await conn.execute("SET LOCAL synchronous_commit = on")
            xid = await conn.fetchval("SELECT pg_current_xact_id()::text")
            await conn.execute(
                "UPDATE flowforge.runs SET checkpoint = '{}', updated_at = now() WHERE id = $1",
                run_id,
            )
        records = [r["record_type"] for r in await conn.fetch(RECORDS_OF_XID, start, xid)]
        assert records in (["HOT_UPDATE"], ["UPDATE"]), records
    finally:
        await conn.close()
