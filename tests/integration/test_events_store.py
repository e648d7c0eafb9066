"""Events as rows (sql/0013): sent in the sender's transaction, refused for unknown runs,
found for waits in order, each taken once per run; heartbeats only with their token."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.client import complete_attempt, enqueue, send_event
from flowforge_orchestrator.core.tokens import AttemptTokens
from flowforge_orchestrator.errors import InvalidEvent, NotFound
from flowforge_orchestrator.store.events import (
    EventAddress,
    delete_expired,
    events_by_ids,
    events_for_waits,
    record_heartbeats,
)
from tests.helpers import register_workflows, wait_for
from tests.integration.test_roles import Logins, _refusals, logins

__all__ = ["logins"]  # the role logins fixture, shared with the roles tests

WEEK = 7 * 24 * 3600.0


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    c = await store.connect(db_url)
    try:
        await register_workflows(c, "any-workflow")
        yield c
    finally:
        await c.close()


async def _run(conn: asyncpg.Connection) -> uuid.UUID:
    return (await enqueue(conn, "any-workflow", {})).id


async def test_an_event_for_an_unknown_run_is_refused_in_the_senders_transaction(
    conn: asyncpg.Connection,
) -> None:
    missing = uuid.uuid4()
    with pytest.raises(NotFound, match=f"there is no run {missing}"):
        async with conn.transaction():
            await send_event(conn, "approved", {"ok": True}, run_id=missing)
    assert await conn.fetchval("SELECT count(*) FROM flowforge.events") == 0


async def test_an_event_needs_exactly_one_address_and_a_storable_payload(
    conn: asyncpg.Connection,
) -> None:
    run = await _run(conn)
    with pytest.raises(InvalidEvent, match="not both or neither"):
        await send_event(conn, "x", run_id=run, key="k")
    with pytest.raises(InvalidEvent, match="not both or neither"):
        await send_event(conn, "x")
    with pytest.raises(InvalidEvent, match="the payload"):
        await send_event(conn, "x", {"a": "nul\x00"}, run_id=run)
    with pytest.raises(InvalidEvent, match="1 to 200 characters"):
        await send_event(conn, "", run_id=run)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("INSERT INTO flowforge.events (name) VALUES ('no-address')")


async def test_a_rolled_back_event_is_neither_stored_nor_announced(
    conn: asyncpg.Connection, db_url: str
) -> None:
    run = await _run(conn)
    listener = await store.connect(db_url)
    heard: list[str] = []
    await listener.add_listener("flowforge_events", lambda *a: heard.append(str(a[3])))
    try:
        tx = conn.transaction()
        await tx.start()
        await send_event(conn, "approved", run_id=run)
        await tx.rollback()
        async with conn.transaction():
            first = await send_event(conn, "approved", {"n": 1}, run_id=run)
            last = await send_event(conn, "approved", {"n": 2}, run_id=run)
        await wait_for(lambda: len(heard) >= 2, timeout=5, message="no notification")
        assert heard == [f"{first}-{first}", f"{last}-{last}"]
        found = await events_by_ids(conn, first, last)
        assert [e.payload for e in found] == [{"n": 1}, {"n": 2}]
        assert await conn.fetchval("SELECT count(*) FROM flowforge.events") == 2
    finally:
        await listener.close()


async def test_waits_find_the_oldest_event_not_taken_by_their_run(
    conn: asyncpg.Connection,
) -> None:
    a, b = await _run(conn), await _run(conn)
    early = await send_event(conn, "approved", {"n": 1}, run_id=a)
    later = await send_event(conn, "approved", {"n": 2}, run_id=a)
    keyed = await send_event(conn, "paid", {"amount": 5}, key="order-7")
    await send_event(conn, "paid", {"amount": 6}, key="order-8")
    waits = [
        EventAddress(a, "approved", None),
        EventAddress(b, "approved", None),
        EventAddress(a, "paid", "order-7"),
        EventAddress(b, "paid", "order-7"),
    ]
    found = await events_for_waits(conn, waits, retention_seconds=WEEK)
    assert {i: e.id for i, e in found.items()} == {0: early, 2: keyed, 3: keyed}
    assert found[2].as_output()["payload"] == {"amount": 5}

    # Taken by run a (its wait step finished): the next wait of a gets the next event;
    # a keyed event taken by a is still there for b.
    await conn.execute(
        "INSERT INTO flowforge.event_consumptions (run_id, event_id, step_id, attempt_id)"
        " VALUES ($1, $2, 'w', $3), ($1, $4, 'p', $3)",
        a,
        early,
        uuid.uuid4(),
        keyed,
    )
    found = await events_for_waits(conn, waits, retention_seconds=WEEK)
    assert {i: e.id for i, e in found.items()} == {0: later, 3: keyed}
    # An event handed to another wait of the same batch is skipped.
    found = await events_for_waits(conn, waits[:1], retention_seconds=WEEK, taken=[later])
    assert found == {}
    # Keyed events older than the retention are not found.
    await conn.execute("UPDATE flowforge.events SET created_at = now() - interval '2 days'")
    found = await events_for_waits(conn, waits, retention_seconds=3600)
    assert {i: e.id for i, e in found.items()} == {0: later}


async def test_a_deleted_run_takes_its_events_and_consumptions_with_it(
    conn: asyncpg.Connection,
) -> None:
    run = await _run(conn)
    event = await send_event(conn, "approved", run_id=run)
    await conn.execute(
        "INSERT INTO flowforge.event_consumptions (run_id, event_id, step_id, attempt_id)"
        " VALUES ($1, $2, 'w', $3)",
        run,
        event,
        uuid.uuid4(),
    )
    await conn.execute("DELETE FROM flowforge.runs WHERE id = $1", run)
    assert await conn.fetchval("SELECT count(*) FROM flowforge.events") == 0
    assert await conn.fetchval("SELECT count(*) FROM flowforge.event_consumptions") == 0


async def test_heartbeats_count_only_with_their_attempts_token(conn: asyncpg.Connection) -> None:
    tokens = AttemptTokens(await store.engine_secret(conn))
    run, good, forged = await _run(conn), uuid.uuid4(), uuid.uuid4()
    recorded = await record_heartbeats(
        conn,
        [
            (run, good, tokens.token(good), {"page": 1}),
            (run, forged, tokens.token(good), {"page": 99}),
        ],
    )
    assert recorded == 1
    await record_heartbeats(conn, [(run, good, tokens.token(good), {"page": 2})])
    rows = await conn.fetch("SELECT attempt_id, details::text FROM flowforge.heartbeats")
    assert [(r[0], r[1]) for r in rows] == [(good, '{"page": 2}')]


async def test_completions_are_stored_as_given(conn: asyncpg.Connection) -> None:
    attempt = uuid.uuid4()
    first = await complete_attempt(conn, attempt, "ab" * 16, output={"shipped": True})
    second = await complete_attempt(conn, attempt, "ab" * 16, error={"message": "late"})
    assert second > first
    with pytest.raises(InvalidEvent, match="an output or an error"):
        await complete_attempt(conn, attempt, "t", output=1, error={"message": "x"})


API_REFUSED_EVENTS = [
    "SELECT * FROM flowforge.events",
    "UPDATE flowforge.events SET payload = '{}'",
    "DELETE FROM flowforge.events",
    "INSERT INTO flowforge.events (name, key, created_at) VALUES ('x', 'k', now())",
    "INSERT INTO flowforge.event_consumptions (run_id, event_id, step_id, attempt_id)"
    " VALUES (gen_random_uuid(), 1, 's', gen_random_uuid())",
    "SELECT * FROM flowforge.step_completions",
    "DELETE FROM flowforge.step_completions",
    "SELECT * FROM flowforge.heartbeats",
    "SELECT flowforge.heartbeat(ARRAY[gen_random_uuid()], ARRAY[gen_random_uuid()],"
    " ARRAY['\\x00'::bytea], ARRAY['{}'::jsonb])",
]

WORKER_REFUSED_EVENTS = [
    "SELECT * FROM flowforge.events",
    "INSERT INTO flowforge.events (name, key) VALUES ('x', 'k')",
    "SELECT * FROM flowforge.heartbeats",
    "INSERT INTO flowforge.heartbeats (attempt_id, run_id)"
    " VALUES (gen_random_uuid(), gen_random_uuid())",
    "UPDATE flowforge.heartbeats SET details = '{}'",
    "INSERT INTO flowforge.step_completions (attempt_id, token) VALUES (gen_random_uuid(), 't')",
    "SELECT * FROM flowforge.event_consumptions",
]


async def test_the_api_sends_events_and_completions_and_the_worker_only_heartbeats(
    logins: Logins,
) -> None:
    admin = await store.connect(logins.admin)
    api = await store.connect(logins.api)
    worker = await store.connect(logins.worker)
    try:
        await register_workflows(admin, "any-workflow")
        run = await _run(admin)
        await send_event(api, "approved", {"by": "ann"}, run_id=run)
        await send_event(api, "paid", {"amount": 3}, key="order-1")
        await complete_attempt(api, uuid.uuid4(), "00" * 16, output={"ok": True})
        with pytest.raises(NotFound):
            await send_event(api, "approved", run_id=uuid.uuid4())
        tokens = AttemptTokens(await store.engine_secret(admin))
        attempt = uuid.uuid4()
        assert await record_heartbeats(worker, [(run, attempt, tokens.token(attempt), [1])]) == 1
        assert await admin.fetchval("SELECT count(*) FROM flowforge.events") == 2
    finally:
        for c in (admin, api, worker):
            await c.close()
    assert await _refusals(logins.api, API_REFUSED_EVENTS) == []
    assert await _refusals(logins.worker, WORKER_REFUSED_EVENTS) == []


async def test_retention_deletes_expired_keyed_events_and_old_completions_only(
    conn: asyncpg.Connection,
) -> None:
    run = await _run(conn)
    for_run = await send_event(conn, "approved", run_id=run)
    await send_event(conn, "paid", key="k-old")
    fresh = await send_event(conn, "paid", key="k-new")
    await complete_attempt(conn, uuid.uuid4(), "00" * 16, output=1)
    await conn.execute(
        "UPDATE flowforge.events SET created_at = now() - interval '8 days' WHERE id <> $1",
        fresh,
    )
    await conn.execute(
        "UPDATE flowforge.step_completions SET created_at = now() - interval '40 days'"
    )
    assert await delete_expired(
        conn, event_retention=7 * 86400, run_retention=30 * 86400, batch=1
    ) == (1, 1)
    left = {r[0] for r in await conn.fetch("SELECT id FROM flowforge.events")}
    assert left == {for_run, fresh}  # an event sent to a run goes with its run
    assert await delete_expired(
        conn, event_retention=7 * 86400, run_retention=30 * 86400, batch=10
    ) == (0, 0)
