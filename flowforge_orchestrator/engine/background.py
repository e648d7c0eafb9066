"""Work the engine starts and does not wait for (aborts, probes, deliveries, releases):
kept referenced until done, and waited for, bounded, at shutdown, then cancelled: each is
work that PostgreSQL still records as to do, which the next poll (of this replica or the
one that adopts its runs) does again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine

__all__ = ["Background", "Spawn"]

# Start a coroutine in the background (`Background.spawn`): what a part is given.
Spawn = Callable[[Coroutine[object, None, None]], None]


class Background:
    """The tasks in flight; a task is dropped once done (its errors are its own to log)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def __bool__(self) -> bool:
        return bool(self._tasks)

    def spawn(self, coro: Coroutine[object, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

    async def wait(self, timeout: float) -> None:
        """Wait for what is in flight, at most `timeout` seconds, then cancel what is left
        and wait for it to end: nothing of it may outlive the pools it uses, which the
        shutdown closes next (a task still running would hold a database connection the
        pool's close waits for, or open a Redis connection on a closed pool)."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
        left = list(self._tasks)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
