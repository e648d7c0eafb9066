"""The outbox feed (sql/0012): every registered consumer gets every event exactly once, in
per-run seq order, with no gap, even when an event's transaction commits late; a rolled-back
read comes again; idle reads write nothing."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID, uuid4

import asyncpg
import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.client import drop_consumer, read_outbox, register_consumer
from flowforge_orchestrator.errors import NotFound
from tests.conftest import _admin
from tests.integration.conftest import Engine

log = logging.getLogger(__name__)

FAN_OUT = """
name: fan
version: 1
steps:
  - id: first
    type: echo
    with: {n: "${{ input.n }}"}
  - id: each
    type: parallel
    depends_on: [first]
    for_each: "[1, 2, 3]"
    step: {id: leaf, type: echo, with: {item: "${{ item }}"}}
"""

INSERT_EVENT = """
INSERT INTO flowforge.outbox (run_id, seq, type, time, data, to_status)
VALUES ($1, $2, 'workflow.started', now(), '{}', 'started')
"""


async def _connect(engine: Engine) -> store.Connection:
    return await store.connect(engine.settings.database_url or "")


async def _all_ids(conn: store.Connection) -> list[str]:
    rows = await conn.fetch("SELECT event ->> 'id' AS id FROM flowforge.outbox_cloudevents")
    return sorted(r["id"] for r in rows)


async def test_an_event_committed_late_is_not_skipped(engine: Engine) -> None:
    """A holds a lower position open while B commits a higher one: readers wait for A
    instead of passing it, then get both."""
    late, early = await _connect(engine), await _connect(engine)
    try:
        await register_consumer(engine.conn, "a")
        await register_consumer(engine.conn, "b")
        held = late.transaction()
        await held.start()
        await late.execute(INSERT_EVENT, uuid4(), 1)
        run_b = uuid4()
        await early.execute(INSERT_EVENT, run_b, 1)  # commits; a higher position
        positions = await engine.conn.fetch("SELECT position FROM flowforge.outbox")
        assert len(positions) == 1  # only B's is visible, A's is in flight
        # Both consumers read while A is open: nothing yet (B's is behind A in feed order).
        assert await read_outbox(engine.conn, "a", 10) == []
        assert await read_outbox(engine.conn, "b", 10) == []
        await held.commit()
        for consumer in ("a", "b"):
            got = await read_outbox(engine.conn, consumer, 10)
            assert [e.event["id"] for e in got] == await _late_then_early(engine.conn)
            assert got[1].run_id == run_b
            assert await read_outbox(engine.conn, consumer, 10) == []
    finally:
        await late.close()
        await early.close()


async def _late_then_early(conn: store.Connection) -> list[str]:
    rows = await conn.fetch(
        "SELECT event ->> 'id' AS id FROM flowforge.outbox_cloudevents ORDER BY position"
    )
    return [r["id"] for r in rows]


async def test_a_rolled_back_read_returns_the_same_events(engine: Engine) -> None:
    await register_consumer(engine.conn, "relay")
    run = uuid4()
    for seq in (1, 2, 3):
        await engine.conn.execute(INSERT_EVENT, run, seq)
    tx = engine.conn.transaction()
    await tx.start()
    first = await read_outbox(engine.conn, "relay", 2)
    await tx.rollback()  # the broker refused: nothing was published
    again = await read_outbox(engine.conn, "relay", 2)
    assert [e.event["id"] for e in again] == [e.event["id"] for e in first]
    assert [e.seq for e in again] == [1, 2]
    rest = await read_outbox(engine.conn, "relay", 2)
    assert [e.seq for e in rest] == [3]
    lag = {c.name: c for c in await store.consumer_lags(engine.conn)}["relay"]
    assert (lag.events_read, lag.events_behind, lag.seconds_behind) == (3, 0, None)


async def test_reads_write_one_row_per_batch_and_nothing_when_idle(engine: Engine) -> None:
    await register_consumer(engine.conn, "relay")
    run = uuid4()
    await engine.conn.executemany(INSERT_EVENT, [(run, seq) for seq in range(1, 201)])
    async with engine.conn.transaction():
        assert len(await read_outbox(engine.conn, "relay", 1000)) == 200
        # one UPDATE of the cursor row, however many events
        assert (
            await engine.conn.fetchval(
                "SELECT n_tup_upd FROM pg_stat_xact_user_tables WHERE relname = 'outbox_consumers'"
            )
            == 1
        )
    async with engine.conn.transaction():
        assert await read_outbox(engine.conn, "relay", 1000) == []
        # an empty read takes no transaction id: it wrote nothing at all
        assert await engine.conn.fetchval("SELECT pg_current_xact_id_if_assigned()") is None


async def test_consumers_are_registered_by_name(engine: Engine) -> None:
    with pytest.raises(NotFound, match="'ghost' is not registered"):
        await read_outbox(engine.conn, "ghost", 10)
    with pytest.raises(ValueError, match="max_events must be at least 1"):
        await read_outbox(engine.conn, "ghost", 0)
    assert await register_consumer(engine.conn, "relay") is True
    assert await register_consumer(engine.conn, "relay") is False
    with pytest.raises(ValueError, match="consumer name 'bad name; drop table'"):
        await register_consumer(engine.conn, "bad name; drop table")
    await engine.conn.execute(INSERT_EVENT, uuid4(), 1)
    assert await register_consumer(engine.conn, "newcomer", from_now=True) is True
    assert await read_outbox(engine.conn, "newcomer", 10) == []
    assert len(await read_outbox(engine.conn, "relay", 10)) == 1
    await engine.conn.execute(INSERT_EVENT, uuid4(), 1)
    assert len(await read_outbox(engine.conn, "newcomer", 10)) == 1
    assert await drop_consumer(engine.conn, "relay") is True
    assert await drop_consumer(engine.conn, "relay") is False


async def test_the_outbox_notifies_waiting_relays(engine: Engine) -> None:
    woken = asyncio.Event()
    listener = await _connect(engine)
    try:
        await listener.add_listener("flowforge_outbox", lambda *_: woken.set())
        await engine.conn.execute(INSERT_EVENT, uuid4(), 1)
        await asyncio.wait_for(woken.wait(), timeout=5)
    finally:
        await listener.close()


async def _consume(
    engine: Engine,
    name: str,
    max_events: int,
    got: list[tuple[UUID, int, str]],
    done: asyncio.Event,
    rng: random.Random,
) -> None:
    """A relay: read in a transaction, sometimes roll back (the broker failed), else keep."""
    conn = await _connect(engine)
    try:
        while True:
            finished = done.is_set()
            tx = conn.transaction()
            await tx.start()
            events = await read_outbox(conn, name, max_events)
            if events and rng.random() < 0.2:
                await tx.rollback()
                continue
            await tx.commit()
            got.extend((e.run_id, e.seq, e.event["id"]) for e in events)
            if finished and not events:
                return
            if not events:
                await asyncio.sleep(0.01)
    finally:
        await conn.close()


async def test_two_consumers_get_every_event_once_in_order_while_runs_complete(
    steps_engine: Engine,
) -> None:
    engine = steps_engine
    seed = random.randrange(1 << 30)
    log.info("seed %d", seed)
    await engine.register(FAN_OUT)
    await register_consumer(engine.conn, "one")
    await register_consumer(engine.conn, "two")
    got: dict[str, list[tuple[UUID, int, str]]] = {"one": [], "two": []}
    done = asyncio.Event()
    readers = [
        asyncio.create_task(_consume(engine, "one", 3, got["one"], done, random.Random(seed))),
        asyncio.create_task(_consume(engine, "two", 7, got["two"], done, random.Random(~seed))),
    ]
    # An event whose transaction stays open across several reads of both consumers.
    late = await _connect(engine)
    late_tx = late.transaction()
    await late_tx.start()
    late_run = uuid4()
    await late.execute(INSERT_EVENT, late_run, 1)
    try:
        run_ids = [await engine.submit("fan", {"n": n}) for n in range(20)]
        for run_id in run_ids[:5]:
            assert (await engine.finished(run_id, timeout=30))["status"] == "completed"
        await late_tx.commit()
        for run_id in run_ids:
            assert (await engine.finished(run_id, timeout=30))["status"] == "completed"
        done.set()
        await asyncio.wait_for(asyncio.gather(*readers), timeout=30)
    finally:
        done.set()
        await late.close()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    expected = await _all_ids(engine.conn)
    assert f"{late_run}/1" in expected
    assert len(expected) >= 20 * 8
    for name, events in got.items():
        ids = [event_id for _, _, event_id in events]
        assert len(ids) == len(set(ids)), f"{name} got an event twice (seed {seed})"
        assert sorted(ids) == expected, f"{name} missed events (seed {seed})"
        by_run: dict[UUID, list[int]] = defaultdict(list)
        for run_id, seq, _ in events:
            by_run[run_id].append(seq)
        for run_id, seqs in by_run.items():
            assert seqs == list(range(1, len(seqs) + 1)), f"{name}: run {run_id} out of order"


RELAY_REFUSED = [
    "SELECT id FROM flowforge.runs",
    "SELECT * FROM flowforge.step_results",
    "SELECT data FROM flowforge.outbox",
    "SELECT secret FROM flowforge.engine_secret",
    "INSERT INTO flowforge.outbox (run_id, seq, type, time, data, to_status)"
    " VALUES (gen_random_uuid(), 1, 'workflow.failed', now(), '{}', 'failed')",
    "DELETE FROM flowforge.outbox",
    "INSERT INTO flowforge.outbox_consumers (name) VALUES ('mine')",
    "DELETE FROM flowforge.outbox_consumers",
    "UPDATE flowforge.outbox_consumers SET lost_events = 0",
    "INSERT INTO flowforge.runs (workflow_name) VALUES ('x')",
]


async def test_the_relay_role_reads_the_feed_and_nothing_else(engine: Engine) -> None:
    dsn = engine.settings.database_url or ""
    await store.apply_roles(dsn)
    user, password = f"ff_relay_{uuid4().hex[:10]}", uuid4().hex
    await _admin(dsn, f"CREATE ROLE {user} LOGIN PASSWORD '{password}' IN ROLE flowforge_relay")
    parts = urlsplit(dsn)
    login = urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}"))
    await register_consumer(engine.conn, "relay")
    await engine.conn.execute(INSERT_EVENT, uuid4(), 1)
    conn = await store.connect(login)
    try:
        async with conn.transaction():
            assert len(await read_outbox(conn, "relay", 10)) == 1
        assert await read_outbox(conn, "relay", 10) == []
        await conn.execute("UPDATE flowforge.outbox SET published_at = now()")  # still allowed
        allowed = []
        for sql in RELAY_REFUSED:
            try:
                async with conn.transaction():
                    await conn.execute(sql)
            except asyncpg.InsufficientPrivilegeError:
                continue
            allowed.append(sql)
        assert allowed == []
    finally:
        await conn.close()
        await _admin(
            dsn,
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{user}'",
            f"DROP OWNED BY {user}",
            f"DROP ROLE {user}",
        )


async def test_events_from_before_the_feed_come_first_in_position_order(engine: Engine) -> None:
    """Rows written before sql/0012 read as xid 0 (all committed): a consumer registered
    from the start gets them first, by position, then the feed's, each once."""
    await register_consumer(engine.conn, "relay")
    old_run, new_run = uuid4(), uuid4()
    for seq in (1, 2, 3):
        await engine.conn.execute(INSERT_EVENT, new_run, seq)
    await engine.conn.executemany(
        "INSERT INTO flowforge.outbox (run_id, seq, type, time, data, to_status, xid)"
        " VALUES ($1, $2, 'workflow.started', now() - interval '1 hour', '{}', 'started', '0')",
        [(old_run, seq) for seq in (1, 2, 3, 4, 5)],
    )
    lag = {c.name: c for c in await store.consumer_lags(engine.conn)}["relay"]
    assert lag.events_behind == 8 and (lag.seconds_behind or 0) >= 3600
    got: list[tuple[UUID, int]] = []
    while batch := await read_outbox(engine.conn, "relay", 2):
        got.extend((e.run_id, e.seq) for e in batch)
    assert got == [(old_run, s) for s in range(1, 6)] + [(new_run, s) for s in (1, 2, 3)]
    lag = {c.name: c for c in await store.consumer_lags(engine.conn)}["relay"]
    assert (lag.events_behind, lag.seconds_behind, lag.events_read) == (0, None, 8)
