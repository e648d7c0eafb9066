"""The queue's presence set in a real Redis: entries expire in Redis's clock, a worker that
leaves takes only its own entry, and arq's shared health-check key goes with the last."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from flowforge_orchestrator.queue import presence
from tests.helpers import wait_for

QUEUE = "flowforge:queue:http"
HEALTH = QUEUE + ":health-check"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_leaving_worker_takes_only_its_own_entry(client: redis.asyncio.Redis) -> None:
    await client.set(HEALTH, "arq's own")
    await presence.announce(client, QUEUE, "w1", 30)
    await presence.announce(client, QUEUE, "w2", 30)
    assert await presence.live_workers(client, QUEUE) == ["w1", "w2"]

    await presence.leave(client, QUEUE, "w1", HEALTH)

    assert await presence.live_workers(client, QUEUE) == ["w2"]
    assert await client.exists(HEALTH) == 1  # w2 still serves the queue

    await presence.leave(client, QUEUE, "w2", HEALTH)

    assert await presence.live_workers(client, QUEUE) == []
    assert await client.exists(HEALTH, presence.presence_key(QUEUE)) == 0


async def test_an_entry_not_refreshed_within_its_ttl_no_longer_counts(
    client: redis.asyncio.Redis,
) -> None:
    await presence.announce(client, QUEUE, "killed", 0.2)
    await presence.announce(client, QUEUE, "alive", 30)
    assert await presence.live_workers(client, QUEUE) == ["alive", "killed"]

    async def only_alive() -> bool:
        return await presence.live_workers(client, QUEUE) == ["alive"]

    await wait_for(only_alive, timeout=5, message="the unrefreshed entry still counts")
    await presence.announce(client, QUEUE, "alive", 30)  # a write trims what expired
    assert await client.zrange(presence.presence_key(QUEUE), 0, -1) == [b"alive"]
    # The set itself lives as long as its longest entry.
    assert 25_000 < await client.pttl(presence.presence_key(QUEUE)) <= 30_000


def test_the_ttl_outlasts_three_polls() -> None:
    assert presence.presence_ttl(0.5) == presence.PRESENCE_TTL
    assert presence.presence_ttl(20) == 60
