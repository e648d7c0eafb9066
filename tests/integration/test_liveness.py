"""Fast failover through PostgreSQL sessions: an owner whose node lock no session holds has
its leases ended in one statement; a live one, this node, finished runs and leases already
ended are left alone; the lock is taken again after its session is killed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from uuid import UUID

import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.engine.liveness import Liveness
from flowforge_orchestrator.engine.orchestrator import run_orchestrator
from flowforge_orchestrator.ops import metrics
from flowforge_orchestrator.store import liveness as store_liveness
from tests.helpers import poll, stop_tasks, wait_for
from tests.integration.conftest import Engine

PARK = "name: park\nversion: 1\nsteps:\n  - {id: p, type: delay, duration: 1h}\n"


@pytest.fixture
async def conn(settings: Settings) -> AsyncIterator[store.Connection]:
    connection = await store.connect(settings.database_url or "")
    try:
        yield connection
    finally:
        await connection.close()


async def _running(
    engine: Engine, owner: str, count: int, *, status: str = "running"
) -> list[UUID]:
    """Runs made to look owned by `owner` with a lease an hour long (no orchestrator runs)."""
    ids = [await engine.submit("park") for _ in range(count)]
    await engine.conn.execute(
        "UPDATE flowforge.runs SET status = $2, owner = $3, epoch = 1,"
        " lease_expires_at = CASE WHEN $2 = 'running' THEN now() + interval '1 hour' END,"
        " finished_at = CASE WHEN $2 = 'running' THEN NULL ELSE now() END"
        " WHERE id = ANY($1::uuid[])",
        ids,
        status,
        owner,
    )
    return ids


async def _leases_ended(conn: store.Connection, ids: list[UUID]) -> int:
    value = await conn.fetchval(
        "SELECT count(*) FROM flowforge.runs WHERE id = ANY($1::uuid[])"
        " AND lease_expires_at <= now()",
        ids,
    )
    return int(value)


async def _hold(settings: Settings, node: str) -> store.Connection:
    session = await store_liveness.connect_lock_session(settings.database_url or "")
    assert await store_liveness.try_lock_node(session, node)
    return session


async def test_a_dead_owner_s_leases_end_in_one_statement_and_the_claimers_are_woken(
    settings: Settings, conn: store.Connection
) -> None:
    engine = Engine(settings, conn)
    await engine.register(PARK)
    dead = await _running(engine, "dead", 3)
    alive = await _running(engine, "alive", 2)
    mine = await _running(engine, "me", 2)
    dead_finished = await _running(engine, "dead", 1, status="completed")
    dead_session = await _hold(settings, "dead")
    alive_session = await _hold(settings, "alive")
    woken: asyncio.Queue[str] = asyncio.Queue()
    listener = await store.connect(settings.database_url or "")
    await listener.add_listener("flowforge_runs", lambda *args: woken.put_nowait(args[2]))
    try:
        # Every owner holds its session: nobody is dead, nothing changes.
        assert await store_liveness.expire_dead_owners(conn, "me", 0) == {}
        assert await _leases_ended(conn, dead + alive + mine) == 0

        await dead_session.close()  # the process died: the server drops its lock with it
        assert await store_liveness.expire_dead_owners(conn, "me", 0) == {"dead": 3}
        assert await _leases_ended(conn, dead) == 3
        assert await _leases_ended(conn, alive + mine) == 0  # a live owner, and this node
        finished = await conn.fetchrow(
            "SELECT status, lease_expires_at FROM flowforge.runs WHERE id = $1", dead_finished[0]
        )
        assert finished is not None and tuple(finished) == ("completed", None)
        assert await asyncio.wait_for(woken.get(), 5) == "flowforge_runs"

        # Leases already ended are not ended again (and nobody is woken for nothing).
        assert await store_liveness.expire_dead_owners(conn, "me", 0) == {}
        # The claim that adopts a run moves it to the claimer: the owner is gone from it.
        rows = await store.claim_runs(conn, 10)
        assert {row.id for row in rows} == set(dead)
    finally:
        await alive_session.close()
        await listener.close()


async def test_no_owner_is_judged_while_the_server_has_just_started(
    settings: Settings, conn: store.Connection
) -> None:
    engine = Engine(settings, conn)
    await engine.register(PARK)
    dead = await _running(engine, "dead", 2)
    started = await conn.fetchval("SELECT now() - pg_postmaster_start_time()")
    assert isinstance(started, timedelta)
    # A grace longer than the server has been up: every lock may still come back.
    grace = started.total_seconds() + 3600
    assert await store_liveness.expire_dead_owners(conn, "me", grace) == {}
    assert await _leases_ended(conn, dead) == 0


async def test_a_node_lock_is_held_by_one_session_and_freed_with_it(settings: Settings) -> None:
    first = await _hold(settings, "a")
    second = await store_liveness.connect_lock_session(settings.database_url or "")
    try:
        assert not await store_liveness.try_lock_node(second, "a")
        assert await store_liveness.try_lock_node(second, "b")
        await first.close()
        assert await store_liveness.try_lock_node(second, "a")
    finally:
        await second.close()


async def test_an_earlier_process_s_leases_are_released_at_start_except_this_process_s(
    settings: Settings, conn: store.Connection
) -> None:
    engine = Engine(settings, conn)
    await engine.register(PARK)
    leftovers = await _running(engine, "me", 3)
    kept = await _running(engine, "me", 1)
    others = await _running(engine, "other", 1)
    session = await _hold(settings, "me")
    try:
        assert await store_liveness.release_leftovers(session, "me", kept) == 3
        assert await _leases_ended(conn, leftovers) == 3
        assert await _leases_ended(conn, kept + others) == 0
    finally:
        await session.close()


def _liveness(settings: Settings, regained: list[float], woken: list[int]) -> Liveness:
    async def renew() -> None:
        regained.append(time.time())

    return Liveness(
        settings.model_copy(update={"node_id": "me", "liveness_interval": 0.1}),
        metrics.OrchestratorMetrics(metrics.new_registry(process=False)),
        owned=list,
        wake_claim=lambda: woken.append(1),
        regained=renew,
    )


async def test_the_lock_is_taken_again_after_its_session_is_killed_and_others_judged_after_grace(
    settings: Settings, conn: store.Connection
) -> None:
    engine = Engine(settings, conn)
    await engine.register(PARK)
    regained: list[float] = []
    woken: list[int] = []
    liveness = _liveness(settings, regained, woken)
    await liveness.start()
    ghost = await _hold(settings, "ghost")
    ghosts = await _running(engine, "ghost", 2)
    task = asyncio.create_task(liveness.loop())
    try:
        assert liveness.held and liveness.watching
        # Every lock session killed at once, as a database restart does: the ghost never
        # comes back; this replica takes its lock again...
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'flowforge liveness' AND datname = current_database()"
        )
        assert killed == 2
        await wait_for(lambda: bool(regained), timeout=10, message="the lock was not taken again")
        assert liveness.held

        # ... and judges the others only once it has held it again for the grace (the
        # live ones need that long to take theirs back): then the ghost's leases end.
        async def ended() -> bool:
            return await _leases_ended(conn, ghosts) == 2

        await wait_for(ended, timeout=10, message="the ghost's leases did not end")
        await wait_for(lambda: bool(woken), timeout=10, message="the claim was not woken")
        assert liveness.watching
        ended_at = await conn.fetchval(
            "SELECT extract(epoch FROM max(lease_expires_at))::float8 FROM flowforge.runs"
            " WHERE id = ANY($1::uuid[])",
            ghosts,
        )
        assert ended_at - regained[0] >= liveness.grace - 0.05, (ended_at, regained)
        # Only one session holds this node's lock: the liveness's own.
        assert not await _free(settings, "me")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await liveness.close()
        ghost.terminate()
    # Closed: the lock is free for the next process of this node id.
    assert await poll(lambda: _free(settings, "me"), timeout=5)


async def _free(settings: Settings, node: str) -> bool:
    session = await store_liveness.connect_lock_session(settings.database_url or "")
    try:
        return await store_liveness.try_lock_node(session, node)
    finally:
        await session.close()


async def test_a_process_whose_lock_another_session_holds_retries_until_it_is_free(
    settings: Settings, conn: store.Connection
) -> None:
    engine = Engine(settings, conn)
    await engine.register(PARK)
    earlier = await _hold(settings, "me")  # the session of an earlier process, not yet ended
    leftovers = await _running(engine, "me", 2)
    regained: list[float] = []
    woken: list[int] = []
    liveness = _liveness(settings, regained, woken)
    await liveness.start()
    task = asyncio.create_task(liveness.loop())
    try:
        assert not liveness.held and not liveness.watching
        # Its runs are not released while the earlier session may still be driving them.
        assert await _leases_ended(conn, leftovers) == 0
        await earlier.close()
        await wait_for(lambda: bool(regained), timeout=10, message="the lock was never taken")
        assert liveness.held and liveness.watching
        # The earlier process is gone for sure now: its leases are released for adoption.
        assert await _leases_ended(conn, leftovers) == 2
        assert woken
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await liveness.close()


async def test_at_start_an_earlier_process_s_leases_are_released_and_the_claim_woken(
    settings: Settings, conn: store.Connection
) -> None:
    engine = Engine(settings, conn)
    await engine.register(PARK)
    leftovers = await _running(engine, "me", 2)
    woken: list[int] = []
    liveness = _liveness(settings, [], woken)
    await liveness.start()
    try:
        assert liveness.held and liveness.watching
        assert await _leases_ended(conn, leftovers) == 2
        assert woken == [1]
    finally:
        await liveness.close()


async def test_an_orchestrator_claims_nothing_until_it_holds_its_node_lock(
    settings: Settings, conn: store.Connection
) -> None:
    engine = Engine(settings, conn)
    await engine.register(PARK)
    earlier = await _hold(settings, "me")
    # hibernate_after 0: the run on its 1-hour delay stays owned (in memory), as the check
    # of its owner below needs; a hibernating orchestrator would release it at once.
    node = settings.model_copy(
        update={"node_id": "me", "liveness_interval": 0.1, "hibernate_after": 0}
    )
    stop = asyncio.Event()
    ready = asyncio.Event()
    task = asyncio.create_task(run_orchestrator(node, stop, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 20)
        run_id = await engine.submit("park")

        async def claimed() -> bool:
            return bool((await engine.run(run_id))["status"] != "pending")

        # Three slow polls' worth: it would be claimed in milliseconds by a replica that may.
        assert not await poll(claimed, timeout=3 * settings.poll_interval)
        await earlier.close()
        await wait_for(
            claimed, timeout=10, message="the run was not claimed once the lock was free"
        )
        run = await engine.run(run_id)
        assert (run["status"], run["owner"]) == ("running", "me")
    finally:
        stop.set()
        await stop_tasks([task])
        await earlier.close()


async def test_a_dead_owner_s_many_leases_end_a_bounded_batch_per_statement(
    settings: Settings, conn: store.Connection
) -> None:
    engine = Engine(settings, conn)
    await engine.register(PARK)
    first = await _running(engine, "dead-1", 3)
    second = await _running(engine, "dead-2", 2)
    batches = []
    while batch := await store_liveness.expire_dead_owners(conn, "me", 0, limit=2):
        assert sum(batch.values()) <= 2
        batches.append(batch)
    assert len(batches) == 3
    ended: dict[str, int] = {}
    for batch in batches:
        for owner, runs in batch.items():
            ended[owner] = ended.get(owner, 0) + runs
    assert ended == {"dead-1": 3, "dead-2": 2}
    assert await _leases_ended(conn, first + second) == 5
