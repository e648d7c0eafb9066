"""The packed outbox (sql/0017): an upgraded database keeps its old events, ids, positions
and consumers' cursors; what the engine packs reads back through `flowforge.outbox` exactly
as it was written."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.client import read_outbox, register_consumer
from flowforge_orchestrator.core.records import Event
from flowforge_orchestrator.store.migrations import load_migrations
from flowforge_orchestrator.store.outbox_packing import MAX_EVENTS_PER_ROW, WORDS, pack_events
from tests.conftest import Services, _admin, database_dsn

COMPACT = 17  # the migration under test: every one before it makes the old schema

OLD_ROW = """
INSERT INTO flowforge.outbox (run_id, seq, type, time, data, traceparent, step_id,
                              attempt_id, from_status, to_status, xid)
VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, coalesce($11, pg_current_xact_id()))
"""

SNAPSHOT = {
    "events": "SELECT run_id, seq, position, xid::text, published_at, event"
    " FROM flowforge.outbox_cloudevents ORDER BY run_id, seq",
    "transitions": "SELECT * FROM flowforge.transitions ORDER BY run_id, seq",
    "attempts": "SELECT * FROM flowforge.step_attempts ORDER BY run_id, id",
}


@pytest.fixture
async def empty_dsn(services: Services) -> AsyncIterator[str]:
    name = f"compact_{uuid.uuid4().hex}"
    await _admin(services.database_url, f"CREATE DATABASE {name}")
    try:
        yield database_dsn(services.database_url, name)
    finally:
        await _admin(services.database_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def _apply(conn: asyncpg.Connection, keep: Callable[[int], bool]) -> None:
    for migration in load_migrations():
        if keep(migration.version):
            async with conn.transaction():
                await conn.execute(migration.sql)


async def _snapshot(conn: asyncpg.Connection) -> dict[str, list[dict[str, Any]]]:
    return {name: [dict(r) for r in await conn.fetch(sql)] for name, sql in SNAPSHOT.items()}


async def _old_rows(conn: asyncpg.Connection) -> tuple[UUID, UUID]:
    """Rows as the one-row-per-event table held them: some from before the feed (xid 0),
    every kind of column, and a later run written by the engine's usual transactions."""
    legacy, run = uuid4(), uuid4()
    t0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    attempt = uuid4()
    rows: list[tuple[Any, ...]] = [
        (
            legacy,
            1,
            "workflow.started",
            t0,
            '{"workflow": "w", "version": 1}',
            None,
            None,
            None,
            "pending",
            "running",
            0,
        ),
        (
            legacy,
            2,
            "step.dispatched",
            t0,
            '{"step_id": "a", "attempt": 1, "type": "t"}',
            None,
            "a",
            attempt,
            "pending",
            "dispatched",
            0,
        ),
        (
            run,
            1,
            "workflow.started",
            t0,
            "{}",
            "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
            None,
            None,
            "pending",
            "running",
            None,
        ),
        (
            run,
            2,
            "step.dispatched",
            t0 + timedelta(seconds=1),
            '{"step_id": "a", "attempt": 1, "type": "t"}',
            None,
            "a",
            attempt,
            "pending",
            "dispatched",
            None,
        ),
        (
            run,
            3,
            "step.started",
            t0 + timedelta(seconds=2),
            '{"step_id": "a", "worker": "w\\tq \\"é\\""}',
            None,
            "a",
            attempt,
            "dispatched",
            "running",
            None,
        ),
        (
            run,
            4,
            "step.failed",
            t0 + timedelta(seconds=3),
            '{"step_id": "a", "error": {"message": "bad\\nline", "n": [1, 2.5, null]}}',
            None,
            "a",
            attempt,
            "running",
            "failed",
            None,
        ),
        (
            run,
            5,
            "workflow.some_future_type",
            t0 + timedelta(seconds=4),
            "[1, 2]",
            None,
            None,
            None,
            None,
            "failed",
            None,
        ),
    ]
    for row in rows:
        await conn.execute(OLD_ROW, *row)
    await conn.execute("UPDATE flowforge.outbox SET published_at = $1 WHERE seq = 1", t0)
    return legacy, run


async def test_an_upgraded_database_keeps_its_events_and_cursors(empty_dsn: str) -> None:
    conn = await asyncpg.connect(empty_dsn)
    try:
        await _apply(conn, lambda version: version < COMPACT)
        legacy, run = await _old_rows(conn)
        await register_consumer(conn, "halfway")
        await register_consumer(conn, "fresh")
        async with conn.transaction():
            first = await read_outbox(conn, "halfway", 3)
        before = await _snapshot(conn)

        await _apply(conn, lambda version: version == COMPACT)

        assert await _snapshot(conn) == before
        assert await conn.fetchval("SELECT count(*) FROM flowforge.outbox_packed") == 7
        rest = await read_outbox(conn, "halfway", 100)
        everything = await read_outbox(conn, "fresh", 100)
        assert [(e.run_id, e.seq) for e in first + rest] == [(e.run_id, e.seq) for e in everything]
        assert [(e.run_id, e.seq) for e in everything] == [(legacy, 1), (legacy, 2)] + [
            (run, s) for s in range(1, 6)
        ]
        # A row written after the upgrade takes positions above every old one, and is read.
        old_top = max(e.position for e in everything)
        await conn.execute(
            "INSERT INTO flowforge.outbox (run_id, seq, type, time, data, to_status)"
            " VALUES ($1, 6, 'workflow.failed', now(), '{}', 'failed')",
            run,
        )
        [new] = await read_outbox(conn, "fresh", 100)
        assert (new.run_id, new.seq, new.type) == (run, 6, "workflow.failed")
        assert new.position > old_top
        assert [(e.run_id, e.seq) for e in await read_outbox(conn, "halfway", 100)] == [(run, 6)]
    finally:
        await conn.close()


async def test_the_word_list_is_the_databases(db_url: str) -> None:
    await store.apply_migrations(db_url)
    conn = await asyncpg.connect(db_url)
    try:
        words = await conn.fetch(
            "SELECT flowforge.outbox_word(n::text) AS w FROM generate_series(1, $1) n ORDER BY n",
            len(WORDS) + 1,
        )
        assert tuple(r["w"] for r in words) == (*WORDS, None)
    finally:
        await conn.close()


def _events(start: int, n: int, t0: datetime) -> list[Event]:
    kinds: list[dict[str, Any]] = [
        {
            "type": "step.dispatched",
            "from_status": "pending",
            "to_status": "dispatched",
            "step_id": "leaf[7]",
            "attempt_id": uuid4(),
            "data": {"step_id": "leaf[7]", "attempt": 2, "type": "noop"},
        },
        {
            "type": "step.started",
            "from_status": "dispatched",
            "to_status": "running",
            "step_id": "s",
            "attempt_id": uuid4(),
            "data": {"step_id": "s", "worker": 'host\t1 "q" \\ é ☃ \n'},
        },
        {"type": "workflow.compensating", "to_status": "compensating", "data": {}},
        {
            "type": "step.caught",
            "from_status": "failed",
            "to_status": "succeeded",
            "step_id": "s",
            "data": {"step_id": "another", "nested": {"a": [1, None, True]}},
        },
    ]
    return [
        Event(
            seq=start + i,
            at=t0 + timedelta(microseconds=(-1) ** i * i * 1_000_003),
            **kinds[i % len(kinds)],
        )
        for i in range(n)
    ]


async def test_packed_events_read_back_as_written(db_url: str) -> None:
    """Every field of every event, through the view, for rows of one event, of a few, of a
    full block and past it, and after a gap in seq."""
    await store.apply_migrations(db_url)
    conn = await store.connect(db_url)
    run, tp = uuid4(), "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    t0 = datetime(2026, 5, 6, 7, 8, 9, 101112, tzinfo=UTC)
    written = _events(1, 1, t0) + _events(2, 5, t0) + _events(7, MAX_EVENTS_PER_ROW + 3, t0)
    written += _events(MAX_EVENTS_PER_ROW + 20, 2, t0)  # a gap
    try:
        for commit in (written[:1], written[1:6], written[6:]):
            rows = pack_events(run, tp, commit)
            await conn.execute(
                "INSERT INTO flowforge.outbox_packed (run_id, seq, time, traceparent, events)"
                " SELECT * FROM unnest($1::uuid[], $2::integer[], $3::timestamptz[],"
                " $4::text[], $5::text[])",
                [r.run_id for r in rows],
                [r.seq for r in rows],
                [r.time for r in rows],
                [r.traceparent for r in rows],
                [r.events for r in rows],
            )
        got = await conn.fetch("SELECT * FROM flowforge.outbox WHERE run_id = $1 ORDER BY seq", run)
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM flowforge.outbox_packed WHERE run_id = $1", run
            )
            == 5
        )
        assert [
            (
                r["seq"],
                r["type"],
                r["time"],
                r["data"],
                r["step_id"],
                r["attempt_id"],
                r["from_status"],
                r["to_status"],
                r["traceparent"],
            )
            for r in got
        ] == [
            (e.seq, e.type, e.at, e.data, e.step_id, e.attempt_id, e.from_status, e.to_status, tp)
            for e in written
        ]
        positions = [r["position"] for r in got]
        assert positions == sorted(set(positions))
        event = await conn.fetchval(
            "SELECT event FROM flowforge.outbox_cloudevents WHERE run_id = $1 AND seq = 2", run
        )
        assert event["id"] == f"{run}/2" and event["traceparent"] == tp
        assert event["data"] == written[1].data
    finally:
        await conn.close()


async def test_the_view_refuses_to_change_an_event(db_url: str) -> None:
    await store.apply_migrations(db_url)
    conn = await asyncpg.connect(db_url)
    run = uuid4()
    try:
        await conn.execute(
            "INSERT INTO flowforge.outbox (run_id, seq, type, time, data, to_status)"
            " VALUES ($1, 1, 'workflow.started', now(), '{}', 'running')",
            run,
        )
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="only published_at"):
            await conn.execute("UPDATE flowforge.outbox SET type = 'x' WHERE run_id = $1", run)
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="deleted with their run"):
            await conn.execute("DELETE FROM flowforge.outbox WHERE run_id = $1", run)
        await conn.execute(
            "UPDATE flowforge.outbox SET published_at = now() WHERE run_id = $1", run
        )
        assert await conn.fetchval(
            "SELECT published_at IS NOT NULL FROM flowforge.outbox WHERE run_id = $1", run
        )
    finally:
        await conn.close()
