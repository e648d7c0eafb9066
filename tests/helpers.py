"""Test helpers shared by every tier. Tests wait for state with `wait_for`, never with sleep."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar, cast

__all__ = ["migration_names", "wait_for"]

T = TypeVar("T")

SQL_DIR = Path(__file__).resolve().parents[1] / "sql"


def migration_names() -> list[str]:
    """The numbered migrations of sql/, in order (`0001_initial`, ...)."""
    return sorted(p.stem for p in SQL_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))


async def wait_for(
    predicate: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition was not met",
) -> T:
    """Call `predicate` (sync or async) until it returns something truthy, and return that.

    Raises AssertionError with `message` and the last value after `timeout` seconds. An
    exception raised by the predicate propagates at once.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return cast(T, value)
        if loop.time() >= deadline:
            raise AssertionError(f"{message} (waited {timeout:g} s; last value: {value!r})")
        await asyncio.sleep(interval)
