"""Test helpers shared by every tier. Tests wait for state with `wait_for`, never with sleep."""

from __future__ import annotations

import asyncio
import inspect
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar, cast

from flowforge_orchestrator import store
from flowforge_orchestrator.attempt_tokens import AttemptTokens, ResultVerifier

__all__ = ["free_port", "migration_names", "poll", "verifier", "wait_for"]

T = TypeVar("T")

SQL_DIR = Path(__file__).resolve().parents[1] / "sql"


def migration_names() -> list[str]:
    """The numbered migrations of sql/, in order (`0001_initial`, ...)."""
    return sorted(p.stem for p in SQL_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def poll(
    predicate: Callable[[], T | Awaitable[T]], *, timeout: float, interval: float = 0.02
) -> T:
    """Call `predicate` (sync or async) until it returns something truthy or `timeout`
    seconds pass; returns its last value either way. An exception it raises propagates."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value or loop.time() >= deadline:
            return cast(T, value)
        await asyncio.sleep(interval)


async def wait_for(
    predicate: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition was not met",
) -> T:
    """`poll`, and AssertionError with `message` and the last value if it never held."""
    value = await poll(predicate, timeout=timeout, interval=interval)
    if not value:
        raise AssertionError(f"{message} (waited {timeout:g} s; last value: {value!r})")
    return value


async def verifier(conn: store.Connection) -> ResultVerifier:
    """What the orchestrator checks results with, for the database of `conn` (which must
    be allowed to read the engine secret); `.tokens.token(attempt)` is an attempt's token."""
    return ResultVerifier(AttemptTokens(await store.engine_secret(conn)))
