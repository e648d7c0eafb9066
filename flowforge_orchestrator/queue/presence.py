"""Which workers serve a queue now, as `doctor` reads it.

arq's own health-check key is one per queue: every worker of the queue writes it (hourly),
and a worker that stops deletes it, so with two workers one stopping made the queue look
unserved while the other served on. Here each worker keeps its own entry in the queue's
presence set (a sorted set scored by expiry, in Redis's own clock): it refreshes it while it
polls, and removes only its own entry when it stops. An entry not refreshed within its TTL
(a worker killed, or cut off from Redis) no longer counts, and is trimmed by the next write.

A stopping worker deletes arq's key only when no other live worker remains, so arq's tools
(`arq --check`) read it rightly too.
"""

from __future__ import annotations

from redis.asyncio import Redis

__all__ = ["PRESENCE_TTL", "announce", "leave", "live_workers", "presence_key", "presence_ttl"]

PRESENCE_TTL = 30.0  # seconds an entry counts after its last refresh (at least)

# The time in ms of Redis's clock, for every script here: workers and doctor may run on
# machines whose clocks disagree.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1]: the presence set. ARGV: the worker's name, its TTL (ms).
_ANNOUNCE = (
    _NOW
    + """
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""
)

# KEYS[1]: the presence set, KEYS[2]: arq's health-check key. ARGV[1]: the worker's name.
_LEAVE = (
    _NOW
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf') == 0 then
    redis.call('DEL', KEYS[1], KEYS[2])
end
return 1
"""
)

# KEYS[1]: the presence set. Returns the names of the live workers.
_LIVE = (
    _NOW
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
"""
)


def presence_key(queue: str) -> str:
    return f"{queue}:workers"


def presence_ttl(poll_delay: float) -> float:
    """The TTL of a worker's entry: long enough for three refreshes, each at most a poll
    apart (a worker refreshes as it polls)."""
    return max(PRESENCE_TTL, 3 * poll_delay)


async def announce(client: Redis, queue: str, worker: str, ttl: float) -> None:
    """`worker` serves `queue`, for `ttl` seconds from now."""
    await client.eval(_ANNOUNCE, 1, presence_key(queue), worker, str(int(ttl * 1000)))  # type: ignore[misc]


async def leave(client: Redis, queue: str, worker: str, health_key: str) -> None:
    """`worker` no longer serves `queue`; arq's `health_key` goes with the last one."""
    await client.eval(_LEAVE, 2, presence_key(queue), health_key, worker)  # type: ignore[misc]


async def live_workers(client: Redis, queue: str) -> list[str]:
    """The names of the workers serving `queue` now."""
    names = await client.eval(_LIVE, 1, presence_key(queue))  # type: ignore[misc]
    return sorted(n.decode() if isinstance(n, bytes) else str(n) for n in names)
