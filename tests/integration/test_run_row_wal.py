"""The run row's WAL: an everyday update of a run writes its new version and nothing more.

Any BEFORE UPDATE row trigger on `flowforge.runs`, whatever its column list or WHEN, makes
PostgreSQL lock every row an UPDATE touches first: a lock record per run per group commit
(sql/0008, sql/0018)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg

from flowforge_orchestrator import store
from flowforge_orchestrator.core.records import RunChanges, StepResult
from flowforge_orchestrator.core.state import RunStatus
from flowforge_orchestrator.store import OwnedChanges

A_DEFINITION = (
    "INSERT INTO flowforge.workflow_definitions (name, version, spec) VALUES ('one', 1, '{}')"
)
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


def _result(run_id: uuid.UUID) -> StepResult:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return StepResult(uuid.uuid4(), "a", "succeeded", 1, None, at, at, "w", run_id, bytes(16))


async def test_a_new_result_is_inserted_without_a_speculative_insert(db_url: str) -> None:
    """`INSERT ... ON CONFLICT` writes a confirmation record per row (48 B a step); a
    worker's result is almost always new, so it is inserted plainly first."""
    conn = await store.connect(db_url)  # the admin DSN: pg_walinspect needs a superuser
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        start = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
        await conn.execute("SET synchronous_commit = on")  # pg_walinspect reads flushed WAL
        assert await store.insert_results(conn, [_result(uuid.uuid4())]) == 1
        xid = await conn.fetchval(
            "SELECT xmin::text FROM flowforge.step_results ORDER BY finished_at LIMIT 1"
        )
        records = [r["record_type"] for r in await conn.fetch(RECORDS_OF_XID, start, xid)]
        assert records == ["INSERT"] or records == ["INSERT+INIT"], records
    finally:
        await conn.close()


async def test_a_duplicate_result_is_still_skipped_and_the_others_stored(db_url: str) -> None:
    conn = await store.connect(db_url)
    try:
        run_id = uuid.uuid4()
        first, second = _result(run_id), _result(run_id)
        assert await store.insert_results(conn, [first]) == 1
        assert await store.insert_results(conn, [first, second]) == 1  # first: a duplicate
        assert await store.insert_result(conn, second) is False
        stored = await conn.fetchval(
            "SELECT count(*) FROM flowforge.step_results WHERE run_id = $1", run_id
        )
        assert stored == 2
        async with conn.transaction():  # inside a caller's transaction too
            assert await store.insert_results(conn, [first, _result(run_id)]) == 1
    finally:
        await conn.close()


async def test_a_run_without_an_idempotency_key_is_inserted_plainly(db_url: str) -> None:
    """Nothing can conflict on a key it has not got: no confirmation record for it."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        await conn.execute(A_DEFINITION)
        start = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
        await conn.execute("SET synchronous_commit = on")  # pg_walinspect reads flushed WAL
        run_id, created = await store.enqueue_run(conn, "one", {})
        assert created
        xid = await conn.fetchval("SELECT xmin::text FROM flowforge.runs WHERE id = $1", run_id)
        records = [r["record_type"] for r in await conn.fetch(RECORDS_OF_XID, start, xid)]
        assert records in (["INSERT"], ["INSERT+INIT"]), records
        # With a key, the second enqueue still finds the first run.
        first = await store.enqueue_run(conn, "one", {}, idempotency_key="k")
        assert await store.enqueue_run(conn, "one", {"n": 2}, idempotency_key="k") == (
            first[0],
            False,
        )
    finally:
        await conn.close()


# The one heap record a transaction wrote, with its length (pg_walinspect, PostgreSQL 15).
RECORD_OF_XID = """
SELECT record_type, record_length - fpi_length AS record_length
FROM pg_get_wal_records_info($1::text::pg_lsn, pg_current_wal_flush_lsn())
WHERE xid::text = $2 AND resource_manager = 'Heap'
"""
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def _commit(
    conn: asyncpg.Connection, changes: RunChanges, epoch: int, *, claimed: bool = False
) -> tuple[str, int]:
    """Write `changes` as the orchestrator's group commit does, flushed; its heap record."""
    start = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
    async with conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit = on")
        xid = await conn.fetchval("SELECT pg_current_xact_id()::text")
        owned = OwnedChanges(changes, epoch, epoch + int(claimed), claimed, TRACEPARENT)
        assert await store.write_changes(conn, "orchestrator-a", 30, [owned]) == {changes.run_id}
    [record] = await conn.fetch(RECORD_OF_XID, start, xid)
    return record["record_type"], record["record_length"]


async def test_a_commit_that_changes_only_the_checkpoint_logs_only_the_checkpoint(
    db_url: str,
) -> None:
    """PostgreSQL logs an update's new row from its first changed byte to its last: an
    `updated_at` (the row's last column but a few) set by every commit made each HOT record
    carry owner, lease, epoch, traceparent and the times again (~100 B a commit). It moves
    with the status, the owner and the lease's holder only."""
    conn = await store.connect(db_url)  # the admin DSN: pg_walinspect needs a superuser
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        await conn.execute(A_DEFINITION)
        run_id = await conn.fetchval(A_RUN)
        steps = {f"step_{i}": "S1" for i in range(20)}

        def changes(seq: int, status: RunStatus = RunStatus.RUNNING) -> RunChanges:
            checkpoint = {"v": 3, "seq": seq, "steps": {**steps, "last": f"d{seq}"}}
            at = datetime(2026, 1, 1, tzinfo=UTC)
            finished = at if status.finished else None
            return RunChanges(run_id, status, checkpoint, started_at=at, finished_at=finished)

        await _commit(conn, changes(1), 0, claimed=True)
        claimed_at = await conn.fetchval(
            "SELECT updated_at FROM flowforge.runs WHERE id = $1", run_id
        )
        record_type, length = await _commit(conn, changes(2), 1)
        row = await conn.fetchrow(
            "SELECT updated_at, pg_column_size(checkpoint) AS size FROM flowforge.runs"
            " WHERE id = $1",
            run_id,
        )
        assert row["updated_at"] == claimed_at
        assert record_type == "HOT_UPDATE"
        # Headers and the changed bytes, all within the checkpoint now (its start, before
        # `seq`, is not logged): 388 B for a 408 B checkpoint here; 542 B when `updated_at`
        # moved with every commit.
        assert length < row["size"] + 40, (length, row["size"])

        await _commit(conn, changes(3, RunStatus.COMPLETED), 1)
        ended = await conn.fetchval("SELECT updated_at FROM flowforge.runs WHERE id = $1", run_id)
        assert ended > claimed_at
    finally:
        await conn.close()


# Columns only ever read whole, by key: their statistics are never used by a plan.
UNPLANNED = {
    "runs": {"input", "output", "error", "checkpoint", "traceparent"},
    "step_results": {"output", "error", "token"},
    "outbox_packed": {"events", "traceparent"},
    "run_parts": {"letters", "attempts"},
    "events": {"payload"},
}


async def test_analyze_keeps_no_statistics_of_payload_columns(db_url: str) -> None:
    """Each ANALYZE stored the most common checkpoints, inputs and outputs whole in
    `pg_statistic` (WAL, and a TOAST table); the planner never filters on these columns."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(A_DEFINITION)
        for n in range(50):
            await conn.execute(
                "INSERT INTO flowforge.runs (workflow_name, input) VALUES ('one', $1::jsonb)",
                f'{{"n": {n}, "padding": "{"x" * 200}"}}',
            )
        await conn.execute(
            "UPDATE flowforge.runs SET checkpoint = jsonb_build_object('seq', 1, 'id', id),"
            " traceparent = '00-' || md5(id::text) || '-00f067aa0ba902b7-01'"
        )
        await conn.execute("ANALYZE flowforge.runs")
        analyzed = {
            r["attname"]
            for r in await conn.fetch(
                "SELECT attname FROM pg_stats WHERE schemaname = 'flowforge' AND tablename = 'runs'"
            )
        }
        assert "workflow_name" in analyzed and not analyzed & UNPLANNED["runs"]
        for table, columns in UNPLANNED.items():
            targets = await conn.fetch(
                "SELECT attname, attstattarget FROM pg_attribute"
                " WHERE attrelid = ('flowforge.' || $1)::regclass AND attname = ANY($2)",
                table,
                list(columns),
            )
            assert {r["attname"]: r["attstattarget"] for r in targets} == dict.fromkeys(
                columns, 0
            ), table
    finally:
        await conn.close()
