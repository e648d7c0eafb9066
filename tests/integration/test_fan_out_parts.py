"""A big fan-out's element states in `flowforge.run_parts` (sql/0019), on the real
database: written with the group commit under its epoch fence, only the parts that
changed; joined back in when another orchestrator adopts the run; gone with the run."""

from __future__ import annotations

import json
import random
import statistics
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from flowforge_orchestrator import store
from flowforge_orchestrator.client import enqueue
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.core.graph.run import CompiledWorkflow, RunState
from flowforge_orchestrator.core.records import Dispatch, Limits, StepResult
from flowforge_orchestrator.core.state import RunStatus
from flowforge_orchestrator.store import reads
from flowforge_orchestrator.store.redrives import lock_run_to_redrive

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LIMITS = Limits(max_output_bytes=10_000_000, max_context_bytes=10_000_000, default_timeout=30.0)
SPEC = {
    "name": "many",
    "version": 1,
    "steps": [
        {
            "id": "fe",
            "type": "parallel",
            "for_each": "input.items",
            "step": {"id": "el", "type": "http", "with": {"url": "https://svc.test/"}},
        }
    ],
}
WORKFLOW = CompiledWorkflow(parse_definition(SPEC))

PARTS = "SELECT part, letters, attempts FROM flowforge.run_parts WHERE run_id = $1 ORDER BY part"

# What one transaction wrote to the WAL, full-page images left out (they depend on when the
# last checkpoint was, not on the statement): pg_walinspect, PostgreSQL 15.
WAL_OF_XID = """
SELECT coalesce(sum(record_length - fpi_length), 0)::int
FROM pg_get_wal_records_info($1::text::pg_lsn, pg_current_wal_flush_lsn())
WHERE xid::text = $2
"""


class Holder:
    """One orchestrator's hold on a run: its graph, and its epoch for the fence."""

    def __init__(self, conn: asyncpg.Connection, state: RunState, epoch: int) -> None:
        self.conn, self.state, self.epoch = conn, state, epoch
        self.sent: dict[UUID, Dispatch] = {}

    async def commit(self, *, epoch: int | None = None) -> bool:
        changes = self.state.take_changes()
        assert changes is not None
        self.sent.update((d.attempt_id, d) for d in changes.dispatches)
        fence = self.epoch if epoch is None else epoch
        write = store.OwnedChanges(changes, epoch=fence, new_epoch=fence)
        written = await store.write_changes(self.conn, "node-a", 30, [write])
        return self.state.run_id in written

    def succeed(self, attempt: UUID, at: datetime) -> None:
        dispatch = self.sent[attempt]
        result = StepResult(attempt, dispatch.step_id, "succeeded", None, None, at, at, "w")
        assert self.state.apply_result(result, at)


async def claim(conn: asyncpg.Connection, now: datetime) -> Holder:
    """Claim the one claimable run, start or resume it, and write the claim's commit."""
    async with conn.transaction():
        (row,) = await store.claim_runs(conn, 1)
        status = RunStatus(row.status)
        state = RunState(
            run_id=row.id,
            workflow=WORKFLOW,
            version=1,
            input=json.loads(row.input_text),
            limits=LIMITS,
            status=status,
            checkpoint=row.checkpoint,
        )
        if status is RunStatus.PENDING:
            state.start(now)
        else:
            state.resume(now)
        changes = state.take_changes()
        assert changes is not None
        write = store.OwnedChanges(changes, epoch=row.epoch, new_epoch=row.epoch + 1, claimed=True)
        assert row.id in await store.write_changes(conn, "node-a", 30, [write])
    holder = Holder(conn, state, row.epoch + 1)
    holder.sent.update((d.attempt_id, d) for d in changes.dispatches)
    return holder


async def new_run(conn: asyncpg.Connection, count: int) -> UUID:
    await store.register_definition(conn, WORKFLOW.definition)
    return (await enqueue(conn, "many", {"items": list(range(count))})).id


async def parts(conn: asyncpg.Connection, run_id: UUID) -> list[tuple[int, str, Any]]:
    return [(r["part"], r["letters"], r["attempts"]) for r in await conn.fetch(PARTS, run_id)]


async def test_a_fan_out_writes_each_part_when_it_changes_and_only_then(db_url: str) -> None:
    conn = await store.connect(db_url)
    try:
        run_id = await new_run(conn, 2500)
        holder = await claim(conn, T0)
        assert [(p, len(letters)) for p, letters, _ in await parts(conn, run_id)] == [
            (0, 1024),
            (1, 1024),
            (2, 452),
        ]
        stored = await conn.fetchval("SELECT checkpoint FROM flowforge.runs WHERE id = $1", run_id)
        assert stored["steps"]["fe"] == {"s": "r", "n": 1, "x": 2500, "ic": 1024}

        before = await conn.fetch("SELECT part, xmin::text AS x FROM flowforge.run_parts")
        by_key = {d.step_id: a for a, d in holder.sent.items()}
        holder.succeed(by_key["el[1030]"], T0 + timedelta(seconds=1))
        assert await holder.commit()
        after = await conn.fetch("SELECT part, xmin::text AS x FROM flowforge.run_parts")
        changed = sorted(r["part"] for r in after if r["x"] not in {b["x"] for b in before})
        assert changed == [1]  # only the part of el[1030] was written
        (_, letters, _) = (await parts(conn, run_id))[1]
        assert letters[5:8] == "dSd"
    finally:
        await conn.close()


async def test_a_commit_of_one_result_writes_little_wal_whatever_the_fan_out_size(
    db_url: str,
) -> None:
    """Packing every element into the run row at every commit wrote O(n) bytes per commit
    (8.8 KB of WAL per element over a 5,000-element run): a commit of one result writes
    its part, the run row and its event, whatever the size."""
    conn = await store.connect(db_url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        await conn.execute("SET synchronous_commit = on")  # pg_walinspect reads flushed WAL
        await new_run(conn, 5000)
        holder = await claim(conn, T0)
        # Workers finish in no particular order: half of the elements, at random (the
        # letters then compress poorly, as in a real run).
        seed = random.randrange(2**32)
        print(f"seed {seed}")
        attempts = list(holder.sent)
        random.Random(seed).shuffle(attempts)
        for index, attempt in enumerate(attempts[:2500]):
            holder.succeed(attempt, T0 + timedelta(seconds=1))
            if index % 500 == 499:
                assert await holder.commit()
        written = []
        for index, attempt in enumerate(attempts[2500:2520]):
            holder.succeed(attempt, T0 + timedelta(seconds=index + 2))
            start = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
            async with conn.transaction():
                xid = await conn.fetchval("SELECT pg_current_xact_id()::text")
                assert await holder.commit()
            written.append(await conn.fetchval(WAL_OF_XID, start, xid))
        print(f"WAL per commit of one result, 5,000 elements: {written}")
        # The median: an update that finds no room on its page writes its whole row once.
        # Before parts: ~1,800 B at 5,000 elements (compressed), growing with n.
        assert statistics.median(written) < 1300, (seed, written)
    finally:
        await conn.close()


async def test_a_fenced_commit_writes_no_part(db_url: str) -> None:
    conn = await store.connect(db_url)
    try:
        run_id = await new_run(conn, 1500)
        holder = await claim(conn, T0)
        before = await parts(conn, run_id)
        holder.succeed(next(iter(holder.sent)), T0 + timedelta(seconds=1))
        assert not await holder.commit(epoch=holder.epoch - 1)  # another owner claimed it
        assert await parts(conn, run_id) == before
    finally:
        await conn.close()


async def test_an_adopted_big_fan_out_restores_exactly_and_runs_every_element_once(
    db_url: str,
) -> None:
    conn = await store.connect(db_url)
    try:
        run_id = await new_run(conn, 2100)
        first = await claim(conn, T0)
        attempts = list(first.sent)
        for index, attempt in enumerate(attempts[::3]):  # a third, across every part
            first.succeed(attempt, T0 + timedelta(seconds=1))
            if index % 100 == 0:
                assert await first.commit()
        assert await first.commit()
        # Its owner is gone: its lease expires, and another orchestrator adopts it.
        await conn.execute("UPDATE flowforge.runs SET lease_expires_at = now() - interval '1s'")
        second = await claim(conn, T0 + timedelta(seconds=60))
        assert second.state.checkpoint() | {"seq": 0} == first.state.checkpoint() | {"seq": 0}
        assert sorted(second.state.outstanding()) == sorted(first.state.outstanding())
        for attempt in second.state.outstanding():
            second.succeed(attempt, T0 + timedelta(seconds=61))
        assert await second.commit()
        assert second.state.status is RunStatus.COMPLETED
        succeeded = [
            e["data"]["step_id"]
            for e in await store.run_events(conn, run_id)
            if e["type"] == "step.succeeded" and e["data"]["step_id"].startswith("el[")
        ]
        assert sorted(succeeded) == sorted(f"el[{i}]" for i in range(2100))
        assert await parts(conn, run_id) == []  # the fan-out ended: its parts went
    finally:
        await conn.close()


async def test_deleting_a_run_deletes_its_parts(db_url: str) -> None:
    conn = await store.connect(db_url)
    try:
        run_id = await new_run(conn, 1100)
        await claim(conn, T0)
        assert len(await parts(conn, run_id)) == 2
        # It ended without its fan-out's end being written (a run the database refused).
        await conn.execute(
            "UPDATE flowforge.runs SET status = 'failed', finished_at = now() - interval '2 days'"
        )
        batch = await store.delete_finished_runs(conn, retention=3600, max_age=86400, batch=10)
        assert batch.ids == [run_id]
        assert await conn.fetchval("SELECT count(*) FROM flowforge.run_parts") == 0
    finally:
        await conn.close()


async def test_the_views_and_a_redrive_read_the_parts_joined_in(db_url: str) -> None:
    conn = await store.connect(db_url)
    try:
        run_id = await new_run(conn, 1500)
        holder = await claim(conn, T0)
        by_key = {d.step_id: a for a, d in holder.sent.items()}
        holder.succeed(by_key["el[1200]"], T0 + timedelta(seconds=1))
        assert await holder.commit()
        expected = holder.state.checkpoint()
        assert expected["steps"]["fe"]["i"][1199:1202] == "dSd"
        state = await reads.run_checkpoint(conn, run_id)
        assert state is not None and state["checkpoint"] == expected
        async with conn.transaction():
            locked = await lock_run_to_redrive(conn, run_id)
        assert locked is not None and locked.checkpoint == expected
    finally:
        await conn.close()
