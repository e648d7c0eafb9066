"""Concurrency slots in the database (sql/0003_concurrency.sql): acquire, release, FIFO,
all or nothing, and connections racing for the same key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg
import pytest

from flowforge_orchestrator import store
from tests.helpers import register_workflows, wait_for

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
K, J = "key:1", "key:2"


Sessions = Callable[[], Awaitable[asyncpg.Connection]]


@pytest.fixture
async def sessions(db_url: str) -> AsyncIterator[Sessions]:
    """Opens database sessions of this test's own, closed at its end."""
    opened: list[asyncpg.Connection] = []

    async def open_session() -> asyncpg.Connection:
        opened.append(await store.connect(db_url))
        return opened[-1]

    try:
        yield open_session
    finally:
        for c in opened:
            await c.close()


@pytest.fixture
async def conn(sessions: Sessions) -> asyncpg.Connection:
    return await sessions()


@pytest.fixture
async def other(sessions: Sessions) -> asyncpg.Connection:
    """A second session, for races."""
    return await sessions()


class Runs:
    """Pending runs with chosen creation times, and the claims an orchestrator would make."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.count = 0

    async def new(self) -> UUID:
        run_id, _ = await store.enqueue_run(self.conn, "wf", {})
        self.count += 1
        created = T0 + timedelta(seconds=self.count)  # FIFO order = order of creation here
        await self.conn.execute(
            "UPDATE flowforge.runs SET created_at = $2 WHERE id = $1", run_id, created
        )
        return run_id

    async def claim(
        self, wanted: dict[UUID, dict[str, int]], conn: asyncpg.Connection | None = None
    ) -> set[UUID]:
        """Lock these runs, take their slots, start the admitted ones: one transaction."""
        c = conn or self.conn
        async with c.transaction():
            admitted = await self.acquire(c, wanted)
        return admitted

    @staticmethod
    async def acquire(c: asyncpg.Connection, wanted: dict[UUID, dict[str, int]]) -> set[UUID]:
        """The claim's statements, in the caller's transaction."""
        await c.execute(
            "SELECT 1 FROM flowforge.runs WHERE id = ANY($1::uuid[]) FOR UPDATE", list(wanted)
        )
        admitted = await store.acquire_concurrency(c, wanted)
        await c.execute(
            "UPDATE flowforge.runs SET status = 'running' WHERE id = ANY($1::uuid[])",
            list(admitted),
        )
        return admitted

    async def end(self, run_id: UUID, status: str = "completed") -> None:
        await self.conn.execute(
            "UPDATE flowforge.runs SET status = $2 WHERE id = $1", run_id, status
        )

    async def waiting(self, *run_ids: UUID) -> list[bool]:
        rows = await self.conn.fetch(
            "SELECT id, waiting FROM flowforge.runs WHERE id = ANY($1::uuid[])", list(run_ids)
        )
        by_id = {row["id"]: row["waiting"] for row in rows}
        return [by_id[r] for r in run_ids]

    async def claimable(self) -> list[UUID]:
        """What the claim query would hand an orchestrator now."""
        async with self.conn.transaction():
            return [row.id for row in await store.claim_runs(self.conn, 100)]


@pytest.fixture
async def runs(conn: asyncpg.Connection) -> Runs:
    await register_workflows(conn, "wf")
    return Runs(conn)


async def test_a_limit_admits_that_many_and_queues_the_rest_in_order(
    conn: asyncpg.Connection, runs: Runs
) -> None:
    ids = [await runs.new() for _ in range(5)]

    admitted = await runs.claim({r: {K: 2} for r in ids})

    assert admitted == set(ids[:2])
    assert await store.concurrency_slots(conn, K) == sorted(ids[:2])
    assert await store.concurrency_queue(conn, K) == ids[2:]
    assert await runs.waiting(*ids) == [False, False, True, True, True]
    keys = await conn.fetchval("SELECT concurrency_keys FROM flowforge.runs WHERE id = $1", ids[4])
    assert keys == [K]
    assert await runs.claimable() == []  # blocked runs never fill a claim batch


async def test_a_run_that_ends_frees_its_slot_for_the_oldest_waiting_run_and_notifies(
    conn: asyncpg.Connection, other: asyncpg.Connection, runs: Runs
) -> None:
    ids = [await runs.new() for _ in range(4)]
    await runs.claim({r: {K: 2} for r in ids})
    notified: asyncio.Queue[str] = asyncio.Queue()
    await other.add_listener("flowforge_runs", lambda *args: notified.put_nowait(args[3]))

    await runs.end(ids[0], "failed")

    await asyncio.wait_for(notified.get(), timeout=5)
    assert await runs.waiting(*ids[2:]) == [False, True]  # one slot: the oldest only
    assert await store.concurrency_slots(conn, K) == [ids[1]]
    assert await runs.claimable() == [ids[2]]
    assert await runs.claim({ids[2]: {K: 2}}) == {ids[2]}
    assert await store.concurrency_queue(conn, K) == [ids[3]]

    for run_id, status in ((ids[1], "completed"), (ids[2], "cancelled")):
        await runs.end(run_id, status)
    assert await runs.claim({ids[3]: {K: 2}}) == {ids[3]}
    await runs.end(ids[3])
    assert await store.concurrency_slots(conn, K) == []
    assert await store.concurrency_queue(conn, K) == []


async def test_a_run_takes_every_key_or_none(conn: asyncpg.Connection, runs: Runs) -> None:
    holder, both, k_only, j_only = [await runs.new() for _ in range(4)]
    assert await runs.claim({holder: {J: 1}}) == {holder}

    admitted = await runs.claim({both: {K: 1, J: 1}, k_only: {K: 1}, j_only: {J: 1}})

    # `both` is refused on J, so it takes no K slot either; but it is older than `k_only`,
    # so `k_only` may not overtake it on K (FIFO): nobody starts.
    assert admitted == set()
    assert await store.concurrency_slots(conn, K) == []
    assert await store.concurrency_queue(conn, K) == [both, k_only]
    assert await store.concurrency_queue(conn, J) == [both, j_only]

    await runs.end(holder)  # frees J: the head of J's queue, `both`, is woken

    assert await runs.waiting(both, k_only, j_only) == [False, True, True]
    assert await runs.claim({both: {K: 1, J: 1}}) == {both}
    assert await store.concurrency_slots(conn, K) == [both]
    assert await store.concurrency_slots(conn, J) == [both]
    assert await store.concurrency_queue(conn, K) == [k_only]

    await runs.end(both)  # frees K and J: each queue's head is woken

    assert await runs.waiting(k_only, j_only) == [False, False]
    assert await runs.claim({k_only: {K: 1}, j_only: {J: 1}}) == {k_only, j_only}


async def test_a_new_run_does_not_overtake_a_woken_one_that_is_not_claimed_yet(
    runs: Runs,
) -> None:
    holder, older = await runs.new(), await runs.new()
    await runs.claim({holder: {K: 1}, older: {K: 1}})
    await runs.end(holder)
    assert await runs.waiting(older) == [False]
    newer = await runs.new()

    assert await runs.claim({newer: {K: 1}}) == set()  # `older` is ahead in K's queue
    assert await runs.claim({older: {K: 1}}) == {older}


async def test_a_limit_leaves_room_for_new_runs_beyond_the_queue(runs: Runs) -> None:
    ids = [await runs.new() for _ in range(3)]
    blocker = await runs.new()
    await runs.claim({blocker: {J: 1}})
    # The oldest waits on J and holds its place in K's queue; K has room for it and one more.
    await runs.claim({ids[0]: {K: 2, J: 1}})

    assert await runs.claim({ids[1]: {K: 2}, ids[2]: {K: 2}}) == {ids[1]}


async def test_a_waiting_run_that_ends_lets_the_next_one_in(
    conn: asyncpg.Connection, runs: Runs
) -> None:
    holder, blocker, first, second = [await runs.new() for _ in range(4)]
    await runs.claim({holder: {K: 1}, blocker: {J: 1}})
    await runs.claim({first: {K: 1, J: 1}, second: {K: 1}})
    await runs.end(holder)  # wakes `first` (head of K), which is still refused on J
    assert await runs.claim({first: {K: 1, J: 1}}) == set()
    assert await runs.waiting(first, second) == [True, True]

    await runs.end(first, "cancelled")  # its place in the queues is gone

    assert await runs.waiting(first, second) == [False, False]
    assert await store.concurrency_queue(conn, J) == []
    assert await runs.claim({second: {K: 1}}) == {second}


async def test_a_cancel_request_unblocks_a_waiting_run(
    conn: asyncpg.Connection, runs: Runs
) -> None:
    holder, waiter, other = await runs.new(), await runs.new(), await runs.new()
    await runs.claim({holder: {K: 1}, waiter: {K: 1}, other: {K: 1}})

    assert (await store.request_cancel(conn, waiter))[0]
    # The request (the API's INSERT) leaves the run row alone: the orchestrator un-blocks.
    assert await runs.waiting(waiter) == [True]
    assert await store.unblock_cancelled(conn, [other]) == 0  # asked for no cancellation
    assert await store.unblock_cancelled(conn, None) == 1

    assert await runs.waiting(waiter, other) == [False, True]
    assert await runs.claimable() == [waiter]  # the claim cancels it


async def test_deleting_a_run_frees_its_slot(conn: asyncpg.Connection, runs: Runs) -> None:
    holder, waiter = await runs.new(), await runs.new()
    await runs.claim({holder: {K: 1}, waiter: {K: 1}})

    await conn.execute("DELETE FROM flowforge.runs WHERE id = $1", holder)

    assert await store.concurrency_slots(conn, K) == []
    assert await runs.waiting(waiter) == [False]


async def test_claims_racing_on_two_connections_never_exceed_the_limit(
    conn: asyncpg.Connection, other: asyncpg.Connection, runs: Runs
) -> None:
    ids = [await runs.new() for _ in range(12)]
    batches = [ids[i : i + 3] for i in range(0, 12, 3)]
    admitted: set[UUID] = set()

    async def claimer(c: asyncpg.Connection, mine: list[list[UUID]]) -> None:
        for batch in mine:
            admitted.update(await runs.claim({r: {K: 3, J: 5} for r in batch}, c))

    await asyncio.gather(claimer(conn, batches[0::2]), claimer(other, batches[1::2]))

    assert len(admitted) == 3
    assert len(await store.concurrency_slots(conn, K)) == 3
    assert len(await store.concurrency_queue(conn, K)) == 9


async def _blocked_on_a_lock(conn: asyncpg.Connection, pid: int) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
        )
    )


async def test_a_slot_freed_while_a_claim_is_refused_still_wakes_the_claimed_run(
    sessions: Sessions, conn: asyncpg.Connection, other: asyncpg.Connection, runs: Runs
) -> None:
    # The claim refuses `waiter` and holds K's lock; the holder ends meanwhile. Its release
    # waits for the claim to commit, then sees `waiter` queued and wakes it: no lost wake-up.
    holder, waiter = await runs.new(), await runs.new()
    await runs.claim({holder: {K: 1}})
    ender = await sessions()
    async with other.transaction():
        assert await Runs.acquire(other, {waiter: {K: 1}}) == set()
        end = asyncio.create_task(
            ender.execute("UPDATE flowforge.runs SET status = 'completed' WHERE id = $1", holder)
        )
        await wait_for(lambda: _blocked_on_a_lock(conn, ender.get_server_pid()))
    await end

    assert await runs.waiting(waiter) == [False]
    assert await runs.claim({waiter: {K: 1}}) == {waiter}


async def test_a_claim_racing_a_release_sees_the_freed_slot(
    conn: asyncpg.Connection, other: asyncpg.Connection, runs: Runs
) -> None:
    # The release holds K's lock until it commits; the claim waits, then finds the slot free.
    holder, waiter = await runs.new(), await runs.new()
    await runs.claim({holder: {K: 1}})
    async with conn.transaction():
        await conn.execute("UPDATE flowforge.runs SET status = 'failed' WHERE id = $1", holder)
        claim = asyncio.create_task(runs.claim({waiter: {K: 1}}, other))
        await wait_for(lambda: _blocked_on_a_lock(conn, other.get_server_pid()))
    assert await claim == {waiter}
