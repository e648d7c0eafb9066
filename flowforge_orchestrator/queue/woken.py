"""arq's Worker, woken when a job arrives instead of only when its poll comes round.

arq polls its queue every `poll_delay`: a step dispatched just after a poll waits for the
next one, which makes the worker choose between latency (a short delay) and idle cost (a
long one). The dispatcher publishes on the queue's wake channel in the same script that
enqueues (see `dispatch`), and this worker waits for that message or its poll delay,
whichever comes first: a handoff costs one Redis round trip, and an idle worker polls
rarely. A lost message only costs the poll delay: the poll still runs.

It also claims the jobs a poll read in one script call (`_CLAIM`: for each id, the
in-progress key is set unless it exists, and only for a job still due in the queue), where
arq spends WATCH, EXISTS, ZSCORE and MULTI/EXEC round trips on each job in turn; the keys
and their meaning are arq's own, so plain arq workers can share the queue.

A full worker wakes its own poll when a slot frees, since it no longer waits on a
semaphore in the middle of one. A poll counts its free slots before its claim goes out: a
slot that frees while the claim is on its way was not counted, and the worker is not full
then, so the poll wakes another itself if its claim left due jobs behind. One wake is sent
per poll: the next poll serves every slot freed until it counts its own.

A named worker keeps its entry in the queue's presence set while it polls and removes it
when it closes (`presence`): what `doctor` reads to know which queues a worker serves now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any

from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker
from redis.asyncio.client import PubSub
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from flowforge_orchestrator.queue import presence
from flowforge_orchestrator.queue.pools import open_pool

__all__ = ["WakeableWorker", "wake_channel"]

log = logging.getLogger(__name__)


_FINISH_TIMEOUT = 5.0  # seconds `aclose` waits for the jobs arq is finishing


def wake_channel(queue: str) -> str:
    return f"flowforge:wake:{queue}"


# KEYS[1]: the queue. ARGV: in-progress key prefix, now (ms), in-progress ttl (ms), how many
# to claim at most, then the job ids in queue order. Returns [id, score, id, score, ...].
_CLAIM = """
local queue, prefix = KEYS[1], ARGV[1]
local now, ttl, wanted = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local claimed, count = {}, 0
for i = 5, #ARGV do
    if count >= wanted then break end
    local id = ARGV[i]
    local key = prefix .. id
    if redis.call('EXISTS', key) == 0 then
        local score = redis.call('ZSCORE', queue, id)
        if score and tonumber(score) <= now then
            redis.call('PSETEX', key, ttl, '1')
            claimed[#claimed + 1] = id
            claimed[#claimed + 1] = score
            count = count + 1
        end
    end
end
return claimed
"""


def _score_ms(score: bytes) -> int:
    """A queue score as arq's job runner takes it; anyone may write one (`-inf`): a score
    that is no time reads as now (it only dates the job in arq's log)."""
    try:
        return int(float(score))
    except (OverflowError, ValueError):
        return timestamp_ms()


class WakeableWorker(Worker):
    _last_abort_check = 0.0
    _claim: AsyncScript | None = None
    _freed_meanwhile = False  # a slot freed since the current poll counted its free ones
    _wake_sent = False  # a wake of our own poll is on its way, no poll has counted since
    _waking: set[asyncio.Task[None]] | None = None  # held: the loop keeps weak references
    _announced_at: float | None = None  # when the presence entry was last refreshed
    last_polled: float | None = None  # loop time of the last poll that reached Redis

    def __init__(self, *args: Any, worker_name: str | None = None, **kwargs: Any) -> None:
        """arq's Worker; `worker_name`: the name this worker announces in the queue's
        presence set (None: it announces nothing)."""
        super().__init__(*args, **kwargs)
        self.worker_name = worker_name
        self.presence_ttl = presence.presence_ttl(self.poll_delay_s)
        self._finishing: set[asyncio.Task[Any]] = set()

    # arq ends a job (its result, its in-progress key) in a task shielded from the job's
    # cancellation: it can outlive the job's task, so `aclose` waits for these before it
    # closes the pool they use (one let run on would open a connection on a closed pool).

    async def finish_job(self, *args: Any, **kwargs: Any) -> None:
        await self._counted(super().finish_job(*args, **kwargs))

    async def finish_failed_job(self, *args: Any, **kwargs: Any) -> None:
        await self._counted(super().finish_failed_job(*args, **kwargs))

    async def _counted(self, finishing: Awaitable[None]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._finishing.add(task)
        try:
            await finishing
        finally:
            self._finishing.discard(task)

    async def record_health(self) -> None:
        """arq's health-check key (hourly), and this worker's presence entry, refreshed a
        third of its TTL apart: the worker polls at least that often."""
        await super().record_health()
        if self.worker_name is None:
            return
        now = self.loop.time()
        if self._announced_at is not None and now - self._announced_at < self.presence_ttl / 3:
            return
        await presence.announce(self.pool, self.queue_name, self.worker_name, self.presence_ttl)
        self._announced_at = now

    async def _cancel_aborted_jobs(self) -> None:
        """arq looks for aborted jobs at every poll; woken polls come many times a second
        under load, so look at most once per poll delay (aborts are best effort anyway)."""
        now = asyncio.get_running_loop().time()
        if now - self._last_abort_check < self.poll_delay_s:
            return
        self._last_abort_check = now
        await super()._cancel_aborted_jobs()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Claim as many of `job_ids` as there are free slots, in one round trip, and run
        them. Jobs this worker runs already (they stay in the queue until they end) are not
        even sent."""
        # From here on, this poll counts every slot freed so far: the wakes sent for them
        # are served, and a slot that frees later is for the next poll.
        self._wake_sent = self._freed_meanwhile = False
        free = self.max_jobs - self.job_counter
        running = self.tasks
        ids = [i for i in await self._job_ids(job_ids) if (t := running.get(i)) is None or t.done()]
        if free <= 0 or not ids:
            return
        claimed = await self._claim_due(ids, free)
        for job, score in claimed:
            await self.sem.acquire()  # a permit per running job, as arq's own start takes
            self.job_counter += 1
            task = self.loop.create_task(self.run_job(job, score))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job] = task
        # The script tries every id until it has claimed `free`: only then may due jobs
        # remain, among the ids it did not reach or beyond the ids the poll read. A slot
        # freed meanwhile was not counted, and the worker is not full: wake for it now.
        left_behind = len(claimed) >= free and (
            len(ids) > free or len(job_ids) >= self.queue_read_limit
        )
        if left_behind and self._freed_meanwhile:
            self._wake_own_poll()

    async def _claim_due(self, ids: list[str], wanted: int) -> list[tuple[str, int]]:
        """Mark up to `wanted` of `ids` in progress, those still due and taken by no one:
        (job id, score) of each, in queue order."""
        if self._claim is None or self._claim.registered_client is not self.pool:
            # EVALSHA from then on; redis-py loads the script again if Redis lost it.
            self._claim = self.pool.register_script(_CLAIM)
        ttl = int(self.in_progress_timeout_s * 1000)
        claimed = await self._claim(
            keys=[self.queue_name],
            args=[in_progress_key_prefix, timestamp_ms(), ttl, wanted, *ids],
        )
        return [
            (job_id.decode(), _score_ms(score))
            for job_id, score in zip(claimed[0::2], claimed[1::2], strict=True)
        ]

    async def _job_ids(self, members: list[bytes]) -> list[str]:
        """The queue's members as job ids. Anyone may write the queue: a member that is not
        text can never be a job (arq's ids are text), and would be read at every poll, so
        it is taken off the queue."""
        ids: list[str] = []
        for member in members:
            try:
                ids.append(member.decode())
            except UnicodeDecodeError:
                log.error("queue %s: removed a member that is not a job id", self.queue_name)
                await self.pool.zrem(self.queue_name, member)
        return ids

    def _release_sem_dec_counter_on_complete(self) -> None:
        # Full: the last claim took every slot it counted and may have left jobs behind,
        # or a poll since found no slot at all. That poll will not come back before its
        # delay: call it now. (A slot freed during a claim is seen by start_jobs.)
        full = self.job_counter >= self.max_jobs
        super()._release_sem_dec_counter_on_complete()
        self._freed_meanwhile = True
        if full:
            self._wake_own_poll()

    def _wake_own_poll(self) -> None:
        if self._wake_sent or self._pool is None:
            return  # the coming poll counts this slot too
        self._wake_sent = True
        if self._waking is None:
            self._waking = set()
        task = self.loop.create_task(self._publish_wake())
        self._waking.add(task)
        task.add_done_callback(self._waking.discard)

    async def _publish_wake(self) -> None:
        try:
            await self.pool.publish(wake_channel(self.queue_name), "slot")
        except Exception as exc:  # the poll delay still brings it round
            log.debug("waking the poll of %s failed: %s", self.queue_name, exc)
            self._wake_sent = False  # none is on its way: the next freed slot tries again

    async def drop_idle_connections(self) -> None:
        """Close the pool's idle connections (after Redis failed, they are dead: the server
        closed them); the next command opens a new one."""
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await self._pool.connection_pool.disconnect(inuse_connections=False)

    async def aclose(self) -> None:
        """`Worker.close` without its deprecated redis `close()` call; the pool is closed
        even when Redis is gone (the presence entry then expires on its own). arq's
        health-check key is the queue's, not this worker's: it goes with the last worker."""
        pending = [*self.tasks.values(), *(self._waking or ())]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        finishing = list(self._finishing)  # bounded: a Redis that is gone fails them anyway
        if finishing:
            await asyncio.wait(finishing, timeout=_FINISH_TIMEOUT)
            for task in finishing:
                task.cancel()
            await asyncio.gather(*finishing, return_exceptions=True)
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            if self.worker_name is not None:
                await presence.leave(pool, self.queue_name, self.worker_name, self.health_check_key)
        except (OSError, RedisError) as exc:
            log.debug("could not leave the presence set of %s: %s", self.queue_name, exc)
        finally:
            await pool.aclose(close_connection_pool=True)

    async def main(self) -> None:
        """arq's `Worker.main`, with the wait between polls cut short by a wake message."""
        if self._pool is None:
            self._pool = await open_pool(
                self.redis_settings,
                job_deserializer=self.job_deserializer,
                job_serializer=self.job_serializer,
                default_queue_name=self.queue_name,
                expires_extra_ms=self.expires_extra_ms,
            )
        self.ctx["redis"] = self.pool
        self._announced_at = None  # (again) polling: announce at once
        if self.on_startup:
            await self.on_startup(self.ctx)
        pubsub = self.pool.pubsub()
        await pubsub.subscribe(wake_channel(self.queue_name))
        try:
            while True:
                await self._poll_iteration()
                self.last_polled = self.loop.time()
                await self._wait(pubsub)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _wait(self, pubsub: PubSub) -> None:
        message = await pubsub.get_message(
            ignore_subscribe_messages=True, timeout=self.poll_delay_s
        )
        while message is not None:  # one poll serves every job that woke us meanwhile
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
