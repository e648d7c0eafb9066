"""arq's Worker, woken when a job arrives instead of only when its poll comes round.

arq polls its queue every `poll_delay`: a step dispatched just after a poll waits for the
next one, which makes the worker choose between latency (a short delay) and idle cost (a
long one). The dispatcher publishes on the queue's wake channel in the same script that
enqueues (see `dispatch`), and this worker waits for that message or its poll delay,
whichever comes first: a handoff costs one Redis round trip, and an idle worker polls
rarely. A lost message only costs the poll delay: the poll still runs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from arq.connections import create_pool
from arq.worker import Worker

__all__ = ["WakeableWorker", "wake_channel"]

log = logging.getLogger(__name__)


def wake_channel(queue: str) -> str:
    return f"flowforge:wake:{queue}"


class WakeableWorker(Worker):
    _last_abort_check = 0.0

    async def _cancel_aborted_jobs(self) -> None:
        """arq looks for aborted jobs at every poll; woken polls come many times a second
        under load, so look at most once per poll delay (aborts are best effort anyway)."""
        now = asyncio.get_running_loop().time()
        if now - self._last_abort_check < self.poll_delay_s:
            return
        self._last_abort_check = now
        await super()._cancel_aborted_jobs()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq asks Redis (WATCH, EXISTS, ZSCORE) about every id its poll read, even a job
        this worker is running: a job stays in the queue until it ends, so each woken poll
        re-checked up to `max_jobs` of them. Those are skipped here without a round trip."""
        running = self.tasks
        await super().start_jobs(
            [j for j in job_ids if (t := running.get(j.decode())) is None or t.done()]
        )

    async def aclose(self) -> None:
        """`Worker.close` without its deprecated redis `close()` call."""
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        pool = self._pool
        if pool is not None:
            await pool.delete(self.health_check_key)
            await pool.aclose(close_connection_pool=True)
            self._pool = None

    async def main(self) -> None:
        """arq's `Worker.main`, with the wait between polls cut short by a wake message."""
        if self._pool is None:
            self._pool = await create_pool(
                self.redis_settings,
                job_deserializer=self.job_deserializer,
                job_serializer=self.job_serializer,
                default_queue_name=self.queue_name,
                expires_extra_ms=self.expires_extra_ms,
            )
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        pubsub = self.pool.pubsub()
        await pubsub.subscribe(wake_channel(self.queue_name))
        try:
            while True:
                await self._poll_iteration()
                await self._wait(pubsub)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _wait(self, pubsub: Any) -> None:
        message = await pubsub.get_message(
            ignore_subscribe_messages=True, timeout=self.poll_delay_s
        )
        while message is not None:  # one poll serves every job that woke us meanwhile
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
