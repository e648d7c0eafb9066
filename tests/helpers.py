"""Test helpers shared by every tier. Tests wait for state with `wait_for`, never with sleep."""

from __future__ import annotations

import asyncio
import inspect
import socket
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, cast, overload
from uuid import UUID

from flowforge_orchestrator import store
from flowforge_orchestrator.core.tokens import AttemptTokens, ResultVerifier

__all__ = [
    "cancel_tasks",
    "dispatched_attempt",
    "free_port",
    "migration_names",
    "poll",
    "register_workflows",
    "stop_tasks",
    "verifier",
    "wait_for",
]

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


async def dispatched_attempt(
    conn: store.Connection, run_id: UUID, step_id: str, attempt: int = 1
) -> UUID:
    """The id of an attempt once it is dispatched (ids are derived from the run's row,
    creation time included: read them, do not compute them)."""

    async def found() -> UUID | None:
        value: UUID | None = await conn.fetchval(
            "SELECT attempt_id FROM flowforge.outbox WHERE run_id = $1 AND step_id = $2"
            " AND type = 'step.dispatched' AND (data ->> 'attempt')::int = $3",
            run_id,
            step_id,
            attempt,
        )
        return value

    return await wait_for(found, message=f"attempt {attempt} of {step_id} never dispatched")


@overload
async def poll(
    predicate: Callable[[], Awaitable[T]], *, timeout: float, interval: float = 0.02
) -> T: ...


@overload
async def poll(predicate: Callable[[], T], *, timeout: float, interval: float = 0.02) -> T: ...


async def poll(
    predicate: Callable[[], object], *, timeout: float, interval: float = 0.02
) -> object:
    """Call `predicate` (sync or async) until it returns something truthy or `timeout`
    seconds pass; returns its last value either way. An exception it raises propagates."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value or loop.time() >= deadline:
            return value
        await asyncio.sleep(interval)


@overload
async def wait_for(
    predicate: Callable[[], Awaitable[T | None]],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition was not met",
) -> T: ...


@overload
async def wait_for(
    predicate: Callable[[], T | None],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition was not met",
) -> T: ...


async def wait_for(
    predicate: Callable[[], object],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition was not met",
) -> object:
    """`poll`, and AssertionError with `message` and the last value if it never held (so
    what it returns is never None)."""
    value = await poll(predicate, timeout=timeout, interval=interval)
    if not value:
        raise AssertionError(f"{message} (waited {timeout:g} s; last value: {value!r})")
    return value


async def verifier(conn: store.Connection) -> ResultVerifier:
    """What the orchestrator checks results with, for the database of `conn` (which must
    be allowed to read the engine secret); `.tokens.token(attempt)` is an attempt's token."""
    return ResultVerifier(AttemptTokens(await store.engine_secret(conn)))


def _raise_outcomes(tasks: list[asyncio.Task[Any]], *, cancelled_ok: bool) -> None:
    errors: list[BaseException] = []
    for task in tasks:
        if task.cancelled():
            if not cancelled_ok:
                errors.append(AssertionError(f"task {task.get_name()} was cancelled"))
        elif task.exception() is not None:
            errors.append(cast(BaseException, task.exception()))
    if len(errors) == 1:
        raise errors[0]
    if errors:
        exceptions = [e if isinstance(e, Exception) else RuntimeError(repr(e)) for e in errors]
        raise ExceptionGroup("tasks of the engine under test failed", exceptions)


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], *, timeout: float = 30.0) -> None:
    """Wait for tasks that were told to stop (their stop event is set) and raise what any of
    them ended with: a crash of the engine under test fails the test instead of vanishing in
    its teardown. A task still running after `timeout`, or cancelled, is a failure too."""
    tasks = list(tasks)
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if pending:
        names = ", ".join(t.get_name() for t in pending)
        raise AssertionError(f"task(s) {names} did not stop within {timeout:g} s")
    _raise_outcomes(tasks, cancelled_ok=False)


async def cancel_tasks(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel loops that end only by cancellation, and raise what any of them ended with
    other than that cancellation."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    _raise_outcomes(tasks, cancelled_ok=True)


async def register_workflows(conn: store.Connection, *names: str) -> None:
    """A one-step definition (version 1) for each workflow name a test enqueues without
    caring what it runs: the insert trigger refuses a run of an unknown workflow."""
    for name in names:
        spec = {
            "name": name,
            "version": 1,
            "steps": [{"id": "a", "type": "transform", "output": 1}],
        }
        await store.insert_definition(conn, name, 1, spec, None)
