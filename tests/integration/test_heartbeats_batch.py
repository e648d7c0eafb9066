"""Heartbeats are written in batches: the last details of each attempt, at most once per
interval, never one write per beat."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import asyncpg

from flowforge_orchestrator import store
from flowforge_orchestrator.core.tokens import AttemptTokens
from flowforge_orchestrator.store.events import record_heartbeats
from flowforge_orchestrator.worker.heartbeats import Beat, Heartbeats
from tests.helpers import wait_for


async def test_many_beats_of_many_attempts_cost_few_statements_and_keep_the_last(
    db_url: str,
) -> None:
    conn = await store.connect(db_url)
    # The writer has a connection of its own: the test reads on `conn` while it writes.
    writer = await store.connect(db_url)
    statements = 0

    async def write(rows: Sequence[tuple[UUID, UUID, bytes, Any]]) -> int:
        nonlocal statements
        statements += 1
        return await record_heartbeats(writer, rows)

    beats = Heartbeats(write)
    task = asyncio.create_task(beats.run())
    try:
        tokens = AttemptTokens(await store.engine_secret(conn))
        run = uuid.uuid4()
        attempts = [uuid.uuid4() for _ in range(20)]
        started = asyncio.get_running_loop().time()
        for page in range(50):
            for attempt in attempts:
                beats.beat(Beat(run, attempt, tokens.token(attempt), {"page": page}), 2.0)
            await asyncio.sleep(0.01)

        async def all_at_the_last_page() -> bool:
            rows = await conn.fetch("SELECT (details->>'page')::int FROM flowforge.heartbeats")
            return len(rows) == 20 and {r[0] for r in rows} == {49}

        await wait_for(all_at_the_last_page, timeout=10, message="the last beats were written")
        elapsed = asyncio.get_running_loop().time() - started
        # 1,000 beats, written at most every 0.5 s (a quarter of the 2 s timeout), plus the
        # first write and the last.
        assert 1 <= statements <= elapsed / 0.5 + 2, (statements, elapsed)
        assert await conn.fetchval("SELECT count(*) FROM flowforge.heartbeats") == 20
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await writer.close()
        await conn.close()


async def test_a_failed_write_keeps_the_newest_beat_for_the_next(db_url: str) -> None:
    calls: list[list[Any]] = []

    async def flaky(rows: Sequence[tuple[UUID, UUID, bytes, Any]]) -> int:
        calls.append([r[3] for r in rows])
        if len(calls) == 1:
            raise asyncpg.exceptions.ConnectionDoesNotExistError("gone")
        return len(rows)

    beats = Heartbeats(flaky)
    attempt = uuid.uuid4()
    beats.beat(Beat(uuid.uuid4(), attempt, b"t" * 16, 1), None)
    try:
        await beats.flush()
    except asyncpg.exceptions.ConnectionDoesNotExistError:
        pass
    beats.beat(Beat(uuid.uuid4(), attempt, b"t" * 16, 2), None)
    await beats.flush()
    assert calls == [[1], [2]] and beats.written == 1
    await beats.flush()
    assert len(calls) == 2  # nothing new: nothing written
