"""The engine's background work ends with the shutdown: waited for, bounded, then cancelled."""

from __future__ import annotations

import asyncio

from flowforge_orchestrator.engine.background import Background


async def test_what_ends_in_time_is_waited_for_and_dropped() -> None:
    background, done = Background(), asyncio.Event()

    async def quick() -> None:
        await asyncio.sleep(0)
        done.set()

    background.spawn(quick())
    assert background
    await background.wait(5.0)
    assert done.is_set()
    assert not background


async def test_what_is_still_running_at_the_deadline_is_cancelled_and_has_ended() -> None:
    background, cleaned = Background(), asyncio.Event()
    started = asyncio.Event()

    async def stuck() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()  # its own cleanup ran before wait() returned

    background.spawn(stuck())
    await started.wait()
    await background.wait(0.01)
    assert cleaned.is_set()
    assert not background


async def test_nothing_in_flight_returns_at_once() -> None:
    await Background().wait(0.0)
