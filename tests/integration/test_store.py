"""The store against a real PostgreSQL: migrations, enqueue, NOTIFY, claims, fenced writes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.client import enqueue
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.core.graph.run import CompiledWorkflow, RunState
from flowforge_orchestrator.core.records import Limits, RunChanges, StepResult
from flowforge_orchestrator.core.state import RunStatus
from flowforge_orchestrator.errors import MigrationError, NotFound, StoreError
from flowforge_orchestrator.store import OwnedChanges
from tests.conftest import Services, _admin, database_dsn
from tests.helpers import migration_names, verifier, wait_for

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
LIMITS = Limits(max_output_bytes=10_000, max_context_bytes=100_000, default_timeout=30.0)
DEFAULT_RETRY_ON = "timeout, connection_error, http_5xx, http_429"  # retry_on unless set
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TABLES = {
    "workflow_definitions",
    "runs",
    "step_results",
    "outbox_packed",  # `outbox` is a view over it (sql/0017)
    "step_types",
    "schema_migrations",
    "concurrency_slots",
    "concurrency_queue",
    "engine_secret",
    "cancel_requests",
    "events",
    "event_consumptions",
    "step_completions",
    "heartbeats",
    "outbox_consumers",
    "parked_waits",
    "run_parts",  # big fan-outs' element states (sql/0019)
}
WF = CompiledWorkflow(
    parse_definition(
        {
            "name": "orders",
            "version": 1,
            "steps": [
                {"id": "fetch", "type": "http", "with": {"url": "https://svc.test/${{ input.n }}"}}
            ],
        }
    )
)


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    c = await store.connect(db_url)
    try:
        await store.insert_definition(c, "orders", 1, {"v": 1}, None)  # runs need a workflow
        yield c
    finally:
        await c.close()


@pytest.fixture
async def conn2(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    c = await store.connect(db_url)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def new_database(services: Services) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """Makes brand-new EMPTY databases (no template), dropped at the end of the test."""
    names: list[str] = []

    async def make() -> str:
        name = f"empty_{uuid.uuid4().hex}"
        await _admin(services.database_url, f"CREATE DATABASE {name}")
        names.append(name)
        return database_dsn(services.database_url, name)

    yield make
    for name in names:
        await _admin(services.database_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def _fetchval(dsn: str, sql: str, *args: Any) -> Any:
    c = await asyncpg.connect(dsn)
    try:
        return await c.fetchval(sql, *args)
    finally:
        await c.close()


# -- migrations ----------------------------------------------------------------------------


async def test_migrations_create_the_schema_on_an_empty_database(
    new_database: Callable[[], Awaitable[str]],
) -> None:
    dsn = await new_database()
    assert await _fetchval(dsn, "SELECT to_regnamespace('flowforge') IS NULL")
    names = migration_names()
    assert [m.version for m in await store.pending_migrations(dsn)] == [int(n[:4]) for n in names]

    assert await store.apply_migrations(dsn) == names

    c = await asyncpg.connect(dsn)
    try:
        tables = {
            r["table_name"]
            for r in await c.fetch(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = 'flowforge' AND table_type = 'BASE TABLE'"
            )
        }
        assert tables == TABLES
        for view in ("outbox", "outbox_cloudevents", "transitions", "step_attempts"):
            assert await c.fetchval(f"SELECT to_regclass('flowforge.{view}') IS NOT NULL")
        rows = await c.fetch(
            "SELECT version, name, checksum FROM flowforge.schema_migrations ORDER BY version"
        )
        expected = []
        for name in names:
            sql = (REPO / "sql" / f"{name}.sql").read_text(encoding="utf-8")
            expected.append((int(name[:4]), name[5:], hashlib.sha256(sql.encode()).hexdigest()))
        assert [tuple(r) for r in rows] == expected
    finally:
        await c.close()
    assert await store.pending_migrations(dsn) == []

    assert await store.apply_migrations(dsn) == []  # a no-op the second time
    count = await _fetchval(dsn, "SELECT count(*) FROM flowforge.schema_migrations")
    assert count == len(names)


async def test_concurrent_migrations_apply_once(
    new_database: Callable[[], Awaitable[str]],
) -> None:
    dsn = await new_database()
    first, second = await asyncio.gather(store.apply_migrations(dsn), store.apply_migrations(dsn))
    assert sorted([first, second]) == [[], migration_names()]
    count = await _fetchval(dsn, "SELECT count(*) FROM flowforge.schema_migrations")
    assert count == len(migration_names())
    assert await store.pending_migrations(dsn) == []


async def test_an_altered_migration_is_refused(db_url: str) -> None:
    c = await asyncpg.connect(db_url)
    try:
        await c.execute("UPDATE flowforge.schema_migrations SET checksum = 'x'")
    finally:
        await c.close()
    with pytest.raises(MigrationError, match=r"0001_initial\.sql was changed"):
        await store.apply_migrations(db_url)
    with pytest.raises(MigrationError, match=r"0001_initial\.sql"):
        await store.pending_migrations(db_url)


async def test_a_migration_unknown_to_this_code_is_refused(db_url: str) -> None:
    c = await asyncpg.connect(db_url)
    try:
        await c.execute(
            "INSERT INTO flowforge.schema_migrations (version, name, checksum)"
            " VALUES (9999, 'future', 'y')"
        )
    finally:
        await c.close()
    with pytest.raises(MigrationError, match="9999"):
        await store.apply_migrations(db_url)


# -- enqueue -------------------------------------------------------------------------------


async def _two_versions(conn: asyncpg.Connection) -> None:
    await store.insert_definition(conn, "orders", 1, {"v": 1}, None)  # the fixture's
    assert await store.insert_definition(conn, "orders", 2, {"v": 2}, 5)
    assert not await store.insert_definition(conn, "orders", 2, {"v": "again"}, None)


async def test_enqueue_pins_the_latest_definition_version(conn: asyncpg.Connection) -> None:
    await _two_versions(conn)
    run = await enqueue(conn, "orders", {"order_id": 7})
    assert run.created is True
    row = await store.get_run(conn, run.id)
    assert row is not None
    assert row["status"] == "pending"
    assert (row["workflow_name"], row["workflow_version"]) == ("orders", 2)
    assert row["input"] == {"order_id": 7}
    assert (row["epoch"], row["owner"], row["started_at"]) == (0, None, None)
    definition = await store.get_definition(conn, "orders")
    assert definition is not None
    assert (definition.version, definition.spec, definition.max_concurrency) == (2, {"v": 2}, 5)
    plain = await conn.fetchrow(
        "INSERT INTO flowforge.runs (workflow_name) VALUES ('orders')"
        " RETURNING workflow_version, status, input"
    )
    assert tuple(plain) == (2, "pending", {})  # the trigger pins it for plain INSERTs too


async def test_enqueue_with_an_explicit_version_and_run_id(conn: asyncpg.Connection) -> None:
    await _two_versions(conn)
    mine = uuid.uuid4()
    run = await enqueue(conn, "orders", None, run_id=mine, version=1)
    assert (run.id, run.created) == (mine, True)
    row = await store.get_run(conn, mine)
    assert row is not None
    assert row["workflow_version"] == 1
    assert row["input"] == {}  # no input is an empty object


async def test_an_idempotency_key_returns_the_first_run(
    conn: asyncpg.Connection, conn2: asyncpg.Connection
) -> None:
    first = await enqueue(conn, "orders", {"n": 1}, idempotency_key="order-1")
    again = await enqueue(conn, "orders", {"n": 2}, idempotency_key="order-1")
    elsewhere = await enqueue(conn2, "orders", {"n": 3}, idempotency_key="order-1")
    other = await enqueue(conn, "orders", {"n": 4}, idempotency_key="order-2")
    assert first.created and other.created
    assert (again.id, again.created) == (first.id, False)
    assert (elsewhere.id, elsewhere.created) == (first.id, False)
    assert other.id != first.id
    assert await conn.fetchval("SELECT count(*) FROM flowforge.runs") == 2
    row = await store.get_run(conn, first.id)
    assert row is not None and row["input"] == {"n": 1}


async def test_a_racing_idempotent_enqueue_waits_for_the_first_and_returns_it(
    conn: asyncpg.Connection, conn2: asyncpg.Connection, db_url: str
) -> None:
    tx = conn.transaction()
    await tx.start()
    first = await enqueue(conn, "orders", {"n": 1}, idempotency_key="k")
    racer = asyncio.create_task(enqueue(conn2, "orders", {"n": 2}, idempotency_key="k"))
    observer = await asyncpg.connect(db_url)
    try:
        await wait_for(
            lambda: observer.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            ),
            message="the second enqueue never waited on the first",
        )
    finally:
        await observer.close()
    assert not racer.done()
    await tx.commit()
    second = await asyncio.wait_for(racer, 10)
    assert (second.id, second.created) == (first.id, False)


async def test_an_enqueue_rolled_back_leaves_no_run(conn: asyncpg.Connection) -> None:
    run_id = uuid.uuid4()
    with pytest.raises(RuntimeError, match="order failed"):
        async with conn.transaction():
            run = await enqueue(conn, "orders", {"n": 1}, run_id=run_id, idempotency_key="rb")
            assert run.created
            assert await store.get_run(conn, run_id) is not None  # visible inside
            raise RuntimeError("order failed")
    assert await store.get_run(conn, run_id) is None
    again = await enqueue(conn, "orders", {"n": 1}, idempotency_key="rb")  # the key is free
    assert again.created


async def test_a_run_of_an_unknown_workflow_is_refused_in_the_inserting_transaction(
    conn: asyncpg.Connection,
) -> None:
    await store.insert_definition(conn, "no-such-workflo", 1, {"v": 1}, None)
    with pytest.raises(NotFound, match=r"'no-such-workflow' is not registered.*'no-such-workflo'"):
        async with conn.transaction():
            await enqueue(conn, "no-such-workflow", {"n": 1})
    with pytest.raises(NotFound, match="'orders' version 9 is not registered"):
        await enqueue(conn, "orders", {"n": 1}, version=9)
    assert await conn.fetchval("SELECT count(*) FROM flowforge.runs") == 0


async def test_enqueue_works_on_a_plain_connection_without_codecs(
    db_url: str, conn: asyncpg.Connection
) -> None:
    await _two_versions(conn)
    plain = await asyncpg.connect(db_url)
    try:
        payload = {"name": "Zoë", "items": [1, 2.5, None, {"deep": True}]}
        run = await enqueue(plain, "orders", payload, idempotency_key="plain")
        assert run.created
        assert (
            json.loads(
                await plain.fetchval("SELECT input::text FROM flowforge.runs WHERE id = $1", run.id)
            )
            == payload
        )
        again = await enqueue(plain, "orders", payload, idempotency_key="plain")
        assert (again.id, again.created) == (run.id, False)
    finally:
        await plain.close()
    row = await store.get_run(conn, run.id)
    assert row is not None and row["input"] == payload and row["workflow_version"] == 2


# -- NOTIFY --------------------------------------------------------------------------------


async def _listen(conn: asyncpg.Connection, channel: str) -> asyncio.Queue[str]:
    received: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener(channel, lambda _c, _pid, _ch, payload: received.put_nowait(payload))
    return received


async def test_inserting_a_run_notifies_at_commit(
    db_url: str, conn: asyncpg.Connection, conn2: asyncpg.Connection
) -> None:
    listener = await store.connect(db_url)
    try:
        received = await _listen(listener, "flowforge_runs")
        async with conn.transaction():
            # A plain INSERT, as an API or psql would write it: the trigger is the contract.
            await conn.execute("INSERT INTO flowforge.runs (workflow_name) VALUES ('orders')")
            # Notifications arrive in commit order: a marker sent now, while the insert is
            # uncommitted, must come first; the insert's own one only after its commit.
            await conn2.execute("SELECT pg_notify('flowforge_runs', 'marker')")
            assert await asyncio.wait_for(received.get(), 5) == "marker"
        assert await asyncio.wait_for(received.get(), 5) == ""
        assert received.empty()
    finally:
        await listener.close()


async def test_a_rolled_back_insert_does_not_notify(
    db_url: str, conn: asyncpg.Connection, conn2: asyncpg.Connection
) -> None:
    listener = await store.connect(db_url)
    try:
        received = await _listen(listener, "flowforge_runs")
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await enqueue(conn, "orders", {"n": 1})
                raise RuntimeError("rollback")
        await conn2.execute("SELECT pg_notify('flowforge_runs', 'marker')")
        assert await asyncio.wait_for(received.get(), 5) == "marker"
        assert received.empty()
    finally:
        await listener.close()


async def test_a_stored_result_notifies_its_attempt_id(
    db_url: str, conn: asyncpg.Connection
) -> None:
    listener = await store.connect(db_url)
    try:
        received = await _listen(listener, "flowforge_results")
        attempt_id = uuid.uuid4()
        await _insert_result(conn, attempt_id, uuid.uuid4(), {"ok": True})
        assert await asyncio.wait_for(received.get(), 5) == str(attempt_id)
    finally:
        await listener.close()


async def test_results_stored_together_are_notified_together_in_bounded_payloads(
    db_url: str, conn: asyncpg.Connection
) -> None:
    # One notification per 200 results of a statement, not one each: a payload stays under
    # PostgreSQL's 8000-byte limit, and the listener wakes once per batch.
    listener = await store.connect(db_url)
    try:
        received = await _listen(listener, "flowforge_results")
        run_id = uuid.uuid4()
        rows = [
            StepResult(uuid.uuid4(), f"s{i}", "succeeded", i, None, T0, T0, "w", run_id, bytes(16))
            for i in range(450)
        ]
        assert await store.insert_results(conn, rows) == 450
        payloads = [await asyncio.wait_for(received.get(), 5) for _ in range(3)]
        await conn.execute("SELECT pg_notify('flowforge_results', 'marker')")
        assert await asyncio.wait_for(received.get(), 5) == "marker"  # and nothing else
        assert all(len(p) < 8000 for p in payloads)
        notified = [UUID(i) for p in payloads for i in p.split(",")]
        assert sorted(notified) == sorted(r.attempt_id for r in rows)
    finally:
        await listener.close()


# -- claims and the fenced group commit ----------------------------------------------------


async def _pending_runs(conn: asyncpg.Connection, n: int) -> list[UUID]:
    """n pending runs, the first the oldest (created_at set explicitly, 1 minute apart)."""
    ids = []
    for i in range(n):
        run = await enqueue(conn, "orders", {"n": i})
        await conn.execute(
            "UPDATE flowforge.runs SET created_at = $2 WHERE id = $1",
            run.id,
            T0 + timedelta(minutes=i),
        )
        ids.append(run.id)
    return ids


async def test_claims_are_fifo_and_skip_rows_locked_elsewhere(
    conn: asyncpg.Connection, conn2: asyncpg.Connection
) -> None:
    oldest, middle, newest = await _pending_runs(conn, 3)
    # Make the newest row the oldest: order is by created_at, not by insertion.
    await conn.execute(
        "UPDATE flowforge.runs SET created_at = $2 WHERE id = $1", newest, T0 - timedelta(hours=1)
    )
    async with conn.transaction():
        first = await store.claim_runs(conn, 1)
        assert [r.id for r in first] == [newest]
        async with conn2.transaction():
            rest = await store.claim_runs(conn2, 10)
            assert [r.id for r in rest] == [oldest, middle]  # the locked row is skipped
        claimed = rest[0]
        assert (claimed.status, claimed.epoch, claimed.checkpoint) == ("pending", 0, None)
        assert claimed.workflow_name == "orders"
        assert json.loads(claimed.input_text) == {"n": 0}
    async with conn2.transaction():
        assert [r.id for r in await store.claim_runs(conn2, 10)] == [newest, oldest, middle]


async def test_expired_leases_are_claimed_before_pending_runs(
    conn: asyncpg.Connection,
) -> None:
    pending, expired, live = await _pending_runs(conn, 3)
    await conn.execute(
        "UPDATE flowforge.runs SET status = 'running', owner = 'gone', epoch = 4,"
        " lease_expires_at = now() - interval '1 minute' WHERE id = $1",
        expired,
    )
    await conn.execute(
        "UPDATE flowforge.runs SET status = 'running', owner = 'alive', epoch = 2,"
        " lease_expires_at = now() + interval '1 hour' WHERE id = $1",
        live,
    )
    async with conn.transaction():
        claimed = await store.claim_runs(conn, 10)
    assert [(r.id, r.status, r.epoch) for r in claimed] == [
        (expired, "running", 4),
        (pending, "pending", 0),
    ]


def _start(run_id: UUID) -> tuple[RunState, RunChanges]:
    state = RunState(run_id=run_id, workflow=WF, version=1, input={"n": 1}, limits=LIMITS)
    state.start(T0)
    changes = state.take_changes()
    assert changes is not None
    return state, changes


async def _count(conn: asyncpg.Connection, table: str, run_id: UUID) -> int:
    sql = f"SELECT count(*) FROM flowforge.{table} WHERE run_id = $1"  # table: a constant
    return int(await conn.fetchval(sql, run_id))


async def test_write_changes_is_fenced_by_the_epoch(conn: asyncpg.Connection) -> None:
    [run_id] = await _pending_runs(conn, 1)
    _, changes = _start(run_id)

    async with conn.transaction():
        stale = OwnedChanges(changes, epoch=7, new_epoch=8, claimed=True)
        assert await store.write_changes(conn, "orch-a", 30, [stale]) == set()
    row = await store.get_run(conn, run_id)
    assert row is not None
    assert (row["status"], row["epoch"], row["owner"]) == ("pending", 0, None)
    for table in ("transitions", "outbox", "step_attempts"):
        assert await _count(conn, table, run_id) == 0


async def test_a_claim_writes_run_history_outbox_and_attempts_together(
    conn: asyncpg.Connection,
) -> None:
    [run_id, other_id] = await _pending_runs(conn, 2)
    state, changes = _start(run_id)
    _, other = _start(other_id)

    async with conn.transaction():
        [claimed, _] = await store.claim_runs(conn, 2)
        assert claimed.id == run_id
        batch = [
            OwnedChanges(changes, claimed.epoch, claimed.epoch + 1, True, TRACEPARENT),
            OwnedChanges(other, epoch=41, new_epoch=42, claimed=True),  # lost: not ours
        ]
        assert await store.write_changes(conn, "orch-a", 30, batch) == {run_id}

    row = await conn.fetchrow(
        "SELECT *, lease_expires_at - now() AS lease_left FROM flowforge.runs WHERE id = $1",
        run_id,
    )
    assert (row["status"], row["epoch"], row["owner"]) == ("running", 1, "orch-a")
    assert timedelta(seconds=20) < row["lease_left"] <= timedelta(seconds=30)
    assert row["checkpoint"] == changes.checkpoint
    assert row["traceparent"] == TRACEPARENT
    assert row["started_at"] is not None and row["finished_at"] is None

    transitions = await store.run_transitions(conn, run_id)
    assert [(t["seq"], t["step_id"], t["from_status"], t["to_status"]) for t in transitions] == [
        (1, None, "pending", "running"),
        (2, "fetch", "pending", "dispatched"),
    ]
    [attempt_id] = [d.attempt_id for d in changes.dispatches]
    assert transitions[1]["attempt_id"] == attempt_id
    assert transitions[0]["at"] == T0
    events = await store.run_events(conn, run_id)
    assert [(e["seq"], e["type"]) for e in events] == [
        (1, "workflow.started"),
        (2, "step.dispatched"),
    ]
    assert events[1]["data"] == {"step_id": "fetch", "attempt": 1, "type": "http"}
    [attempt] = await store.run_attempts(conn, run_id)
    assert (attempt["id"], attempt["step_id"], attempt["attempt"]) == (attempt_id, "fetch", 1)
    assert (attempt["status"], attempt["step_type"]) == ("dispatched", "http")
    other_row = await store.get_run(conn, other_id)
    assert other_row is not None and other_row["status"] == "pending"
    assert await _count(conn, "outbox", other_id) == 0

    # The owner applies the result under its epoch: the run completes and lets go its lease.
    result = await _insert_result(conn, attempt_id, run_id, {"body": "ok"})
    assert state.apply_result(result, T0 + timedelta(seconds=5))
    done = state.take_changes()
    assert done is not None and done.status is RunStatus.COMPLETED
    async with conn.transaction():
        assert await store.write_changes(conn, "orch-a", 30, [OwnedChanges(done, 1, 1)]) == {run_id}
    row = await store.get_run(conn, run_id)
    assert row is not None
    assert (row["status"], row["epoch"], row["lease_expires_at"]) == ("completed", 1, None)
    assert row["output"] == {"fetch": {"body": "ok"}}
    assert row["finished_at"] == T0 + timedelta(seconds=5)
    [attempt] = await store.run_attempts(conn, run_id)
    assert (attempt["status"], attempt["worker"]) == ("succeeded", "w-1")
    assert [e["seq"] for e in await store.run_events(conn, run_id)] == [1, 2, 3, 4, 5]


async def test_a_duplicate_event_sequence_is_rejected(conn: asyncpg.Connection) -> None:
    [run_id] = await _pending_runs(conn, 1)
    _, changes = _start(run_id)
    async with conn.transaction():
        await store.write_changes(conn, "orch-a", 30, [OwnedChanges(changes, 0, 1, True)])
    with pytest.raises(asyncpg.UniqueViolationError):
        async with conn.transaction():
            await store.write_changes(conn, "orch-a", 30, [OwnedChanges(changes, 1, 1)])
    with pytest.raises(asyncpg.UniqueViolationError, match="outbox"):
        await conn.execute(
            "INSERT INTO flowforge.outbox (run_id, seq, type, time, data, to_status)"
            " VALUES ($1, 1, 'workflow.started', now(), '{}', 'running')",
            run_id,
        )
    assert await _count(conn, "transitions", run_id) == 2
    assert await _count(conn, "outbox", run_id) == 2


async def test_a_group_commit_is_one_statement_all_or_nothing(conn: asyncpg.Connection) -> None:
    # No BEGIN/COMMIT of its own (one round trip): a refused event must still undo the
    # run row's update made by the same call.
    [run_id] = await _pending_runs(conn, 1)
    _, changes = _start(run_id)
    await store.write_changes(conn, "orch-a", 30, [OwnedChanges(changes, 0, 1, True)])
    assert await _count(conn, "outbox", run_id) == 2
    replay = RunChanges(
        run_id=run_id,
        status=RunStatus.FAILED,
        checkpoint={"v": 2, "seq": 2, "steps": {}},
        events=changes.events,  # seq 1 and 2 again: refused
    )
    with pytest.raises(asyncpg.UniqueViolationError):
        await store.write_changes(conn, "orch-a", 30, [OwnedChanges(replay, 1, 1)])
    row = await store.get_run(conn, run_id)
    assert row is not None and row["status"] == "running"


async def test_the_outbox_view_renders_cloudevents(conn: asyncpg.Connection) -> None:
    [run_id] = await _pending_runs(conn, 1)
    _, changes = _start(run_id)
    async with conn.transaction():
        await store.write_changes(
            conn, "orch-a", 30, [OwnedChanges(changes, 0, 1, True, TRACEPARENT)]
        )
    rows = await conn.fetch(
        "SELECT seq, event FROM flowforge.outbox_cloudevents WHERE run_id = $1 ORDER BY seq",
        run_id,
    )
    assert [r["seq"] for r in rows] == [1, 2]
    event = rows[0]["event"]
    assert event == {
        "specversion": "1.0",
        "id": f"{run_id}/1",
        "source": "flowforge-orchestrator",
        "type": "workflow.started",
        "subject": str(run_id),
        "time": "2024-05-01T12:00:00.000000Z",
        "datacontenttype": "application/json",
        "sequence": "1",
        "traceparent": TRACEPARENT,
        "data": {"workflow": "orders", "version": 1},
    }
    assert rows[1]["event"]["id"] == f"{run_id}/2"
    assert rows[1]["event"]["type"] == "step.dispatched"


async def test_the_outbox_view_keeps_nulls_inside_the_data(conn: asyncpg.Connection) -> None:
    [run_id] = await _pending_runs(conn, 1)
    state, changes = _start(run_id)
    attempt_id = changes.dispatches[0].attempt_id
    result = await _insert_result(conn, attempt_id, run_id, {"status": 204, "body": None})
    state.apply_result(result, T0 + timedelta(seconds=3))
    done = state.take_changes()
    assert done is not None and done.output == {"fetch": {"status": 204, "body": None}}
    async with conn.transaction():
        await store.write_changes(conn, "orch-a", 30, [OwnedChanges(changes, 0, 1, True)])
        await store.write_changes(conn, "orch-a", 30, [OwnedChanges(done, 1, 1)])
    [event] = await conn.fetch(
        "SELECT event FROM flowforge.outbox_cloudevents"
        " WHERE run_id = $1 AND event->>'type' = 'workflow.completed'",
        run_id,
    )
    assert "traceparent" not in event["event"]  # absent attributes are omitted, as intended
    assert event["event"]["data"] == {"output": {"fetch": {"status": 204, "body": None}}}


async def test_inline_results_and_cancelled_attempts_are_written(
    conn: asyncpg.Connection,
) -> None:
    wf = CompiledWorkflow(
        parse_definition(
            {
                "name": "orders",
                "version": 1,
                "steps": [
                    {"id": "a", "type": "http", "with": {"url": "https://svc.test/a"}},
                    {"id": "b", "type": "http", "with": {"url": "https://svc.test/b"}},
                    {"id": "c", "type": "http", "with": {"url": "https://svc.test/c"}},
                    {"id": "t", "type": "transform", "depends_on": ["a"], "output": "${{ 1 }}"},
                ],
            }
        )
    )
    [run_id] = await _pending_runs(conn, 1)
    state = RunState(run_id=run_id, workflow=wf, version=1, input={}, limits=LIMITS)
    state.start(T0)
    started = state.take_changes()
    assert started is not None
    d = {x.step_id: x for x in started.dispatches}
    await _insert_result(conn, d["a"].attempt_id, run_id, "A", step_id="a")
    [(_, result)] = await store.fetch_results(conn, [d["a"].attempt_id], await verifier(conn))
    state.apply_result(result, T0 + timedelta(seconds=3))
    failure = StepResult(
        d["b"].attempt_id, "b", "failed", None, {"message": "no"}, None, T0 + timedelta(seconds=4)
    )
    state.apply_result(failure, T0 + timedelta(seconds=4))
    later = state.take_changes()
    assert later is not None and later.status is RunStatus.FAILED
    [inline] = later.inline_results
    async with conn.transaction():
        await store.write_changes(conn, "o", 30, [OwnedChanges(started, 0, 1, True)])
        await store.write_changes(conn, "o", 30, [OwnedChanges(later, 1, 1)])

    stored = await store.fetch_run_results(conn, [run_id], await verifier(conn))
    assert stored[run_id][inline.attempt_id].output == 1  # its token made in SQL verifies
    assert stored[run_id][inline.attempt_id].worker == "orchestrator"
    attempts = {a["step_id"]: a for a in await store.run_attempts(conn, run_id)}
    assert set(attempts) == {"a", "b", "c"}  # inline steps have results, not attempts
    assert attempts["a"]["status"] == "succeeded"
    assert attempts["b"]["status"] == "failed"
    assert attempts["c"]["status"] == "cancelled"  # open when the run failed
    assert attempts["c"]["finished_at"] == T0 + timedelta(seconds=4)
    decided = {"retry_decision": f"not retried: error is not in retry_on [{DEFAULT_RETRY_ON}]"}
    assert attempts["b"]["error"] == {"message": "no", **decided}
    row = await store.get_run(conn, run_id)
    assert row is not None
    assert (row["status"], row["error"]) == ("failed", {"message": "no", **decided, "step_id": "b"})


async def test_renew_and_release_only_touch_this_owners_running_runs(
    conn: asyncpg.Connection,
) -> None:
    mine, mine_too, given_back, theirs, finished = await _pending_runs(conn, 5)
    owners = {
        mine: ("a", "running"),
        mine_too: ("a", "running"),
        given_back: ("a", "running"),  # a's row, but no longer in a's memory
        theirs: ("b", "running"),
        finished: ("a", "completed"),
    }
    for run_id, (owner, status) in owners.items():
        await conn.execute(
            "UPDATE flowforge.runs SET owner = $2, status = $3, epoch = 3,"
            " lease_expires_at = now() + interval '2 seconds' WHERE id = $1",
            run_id,
            owner,
            status,
        )

    held = [mine, mine_too, theirs, finished]
    assert await store.renew_leases(conn, "a", 60, held) == {mine: 3, mine_too: 3}
    leases = {
        r["id"]: r["left"]
        for r in await conn.fetch("SELECT id, lease_expires_at - now() AS left FROM flowforge.runs")
    }
    assert leases[mine] > timedelta(seconds=50) and leases[mine_too] > timedelta(seconds=50)
    for untouched in (given_back, theirs, finished):
        assert leases[untouched] <= timedelta(seconds=2)

    await store.release_leases(conn, "a", [mine, theirs, finished])
    expired = set(
        await conn.fetchval(
            "SELECT array_agg(id) FROM flowforge.runs WHERE lease_expires_at <= now()"
        )
    )
    assert expired == {mine}  # "theirs" is b's: a cannot release it; "finished" is over
    async with conn.transaction():
        claimable = [r.id for r in await store.claim_runs(conn, 10) if r.status == "running"]
    assert claimable == [mine]


async def test_a_renewal_rewrites_only_the_leases_that_need_it(conn: asyncpg.Connection) -> None:
    """A lease is indexed, so renewing it is a non-HOT update (~170 B of WAL a run): a lease
    with more than `renew_below` seconds left is not written again, but still reported held."""
    old, young, theirs = await _pending_runs(conn, 3)
    for run_id, owner, left in ((old, "a", 10), (young, "a", 55), (theirs, "b", 10)):
        await conn.execute(
            "UPDATE flowforge.runs SET owner = $2, status = 'running', epoch = 3,"
            " lease_expires_at = now() + make_interval(secs => $3) WHERE id = $1",
            run_id,
            owner,
            left,
        )
    versions = {r["id"]: r["xmin"] for r in await conn.fetch("SELECT id, xmin FROM flowforge.runs")}

    held = await store.renew_leases(conn, "a", 60, [old, young, theirs], renew_below=40)
    assert held == {old: 3, young: 3}
    rows = {
        r["id"]: r
        for r in await conn.fetch(
            "SELECT id, xmin, lease_expires_at - now() AS left FROM flowforge.runs"
        )
    }
    assert rows[old]["left"] > timedelta(seconds=50) and rows[old]["xmin"] != versions[old]
    assert rows[young]["xmin"] == versions[young]  # not written: 55 s left
    assert rows[theirs]["xmin"] == versions[theirs]
    # Without a threshold every lease is renewed (the statement after a lock timeout too).
    for skip_locked in (False, True):
        assert await store.renew_leases(conn, "a", 60, [young], skip_locked=skip_locked) == {
            young: 3
        }


# -- results -------------------------------------------------------------------------------


async def _insert_result(
    conn: asyncpg.Connection, attempt_id: UUID, run_id: UUID, output: Any, step_id: str = "fetch"
) -> StepResult:
    check = await verifier(conn)
    written = StepResult(
        attempt_id=attempt_id,
        run_id=run_id,
        step_id=step_id,
        outcome="succeeded",
        output=output,
        error=None,
        worker="w-1",
        started_at=T0 + timedelta(seconds=1),
        finished_at=T0 + timedelta(seconds=2),
        token=check.tokens.token(attempt_id),
    )
    await store.insert_result(conn, written)
    [(stored_run, result)] = await store.fetch_results(conn, [attempt_id], check)
    assert stored_run == run_id
    return result


async def test_a_result_is_stored_once_per_attempt(conn: asyncpg.Connection) -> None:
    attempt_id, run_id = uuid.uuid4(), uuid.uuid4()
    check = await verifier(conn)
    first = StepResult(
        attempt_id=attempt_id,
        run_id=run_id,
        step_id="fetch",
        outcome="succeeded",
        output={"n": 1},
        error=None,
        worker="w-1",
        started_at=T0,
        finished_at=T0 + timedelta(seconds=1),
        token=check.tokens.token(attempt_id),
    )
    assert await store.insert_result(conn, first)
    assert not await store.insert_result(conn, replace(first, outcome="failed", output={"n": 2}))
    assert await conn.fetchval("SELECT count(*) FROM flowforge.step_results") == 1
    [(_, result)] = await store.fetch_results(conn, [attempt_id], check)
    assert (result.outcome, result.output, result.worker) == ("succeeded", {"n": 1}, "w-1")
    assert (result.started_at, result.finished_at) == (T0, T0 + timedelta(seconds=1))
    assert await store.fetch_run_results(conn, [run_id], check) == {run_id: {attempt_id: result}}


async def test_a_result_without_its_run_or_token_is_refused_by_name_and_nothing_is_written(
    conn: asyncpg.Connection,
) -> None:
    # A result as the orchestrator reads it (no run id, no token) cannot be filed.
    attempt_id = uuid.uuid4()
    filed = StepResult(
        attempt_id, "fetch", "succeeded", 1, None, T0, T0, "w-1", uuid.uuid4(), bytes(16)
    )
    for unfiled, missing in (
        (replace(filed, run_id=None), "run id"),
        (replace(filed, token=None), "token"),
    ):
        with pytest.raises(StoreError, match=f"result of attempt {attempt_id} has no {missing}"):
            await store.insert_results(conn, [filed, unfiled])
    assert await conn.fetchval("SELECT count(*) FROM flowforge.step_results") == 0


async def test_a_row_that_cannot_be_decoded_fails_no_fetch_of_the_others(
    conn: asyncpg.Connection,
) -> None:
    # JSONB holds nesting far deeper than a decoder can follow: read as text, row by row.
    check = await verifier(conn)
    run_id, deep, fine, forged = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    nested = "[" * 5000 + "]" * 5000
    await conn.execute(
        "INSERT INTO flowforge.step_results (attempt_id, run_id, step_id, outcome, output,"
        " token) VALUES ($1, $2, 'deep', 'succeeded', $3::text::jsonb, $4),"
        " ($5, $2, 'forged', 'succeeded', $3::text::jsonb, $6)",
        deep,
        run_id,
        nested,
        check.tokens.token(deep),
        forged,
        bytes(16),
    )
    await _insert_result(conn, fine, run_id, {"ok": True})
    refused: list[Any] = []
    check.on_refused = refused.append
    by_attempt = {
        r.attempt_id: r for _, r in await store.fetch_results(conn, [deep, fine, forged], check)
    }
    assert set(by_attempt) == {deep, fine}
    assert by_attempt[fine].output == {"ok": True}
    assert by_attempt[deep].outcome == "failed"
    error = by_attempt[deep].error
    assert error is not None
    assert error["category"] == "unreadable_result"
    assert {(r.attempt_id, r.reason) for r in refused} == {
        (deep, "unreadable"),
        (forged, "bad_token"),
    }
    restored = await store.fetch_run_results(conn, [run_id], check)
    assert set(restored[run_id]) == {deep, fine}


async def test_tokens_made_in_sql_are_the_orchestrators(conn: asyncpg.Connection) -> None:
    check = await verifier(conn)
    attempts = [uuid.uuid4() for _ in range(5)]
    made = await conn.fetch(
        "SELECT a, flowforge.attempt_token(a) AS t FROM unnest($1::uuid[]) AS a", attempts
    )
    assert {r["a"]: bytes(r["t"]) for r in made} == {a: check.tokens.token(a) for a in attempts}


async def test_a_pooled_connection_comes_back_without_the_transaction_left_open(
    db_url: str,
) -> None:
    # Releases skip asyncpg's reset query; an open transaction must still be rolled back.
    pool = await store.create_pool(db_url, size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.execute("CREATE TEMP TABLE left_open (x int)")
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('pg_temp.left_open')") is None
    finally:
        await pool.close()
