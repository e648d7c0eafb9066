"""An in-process engine (orchestrator + worker as tasks) on the real servers of the session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import pytest
import yaml
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flowforge_orchestrator import store
from flowforge_orchestrator.client import enqueue
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.engine.orchestrator import run_orchestrator
from flowforge_orchestrator.ops import telemetry
from flowforge_orchestrator.worker.runtime import (
    StepContext,
    StepFunction,
    load_step_types,
    run_worker,
)
from tests.helpers import stop_tasks, wait_for

SECRETS = {"TOKEN": "s3cret-value"}
_EXPORTER = InMemorySpanExporter()
telemetry.add_span_processor(SimpleSpanProcessor(_EXPORTER))


@pytest.fixture(autouse=True)
def tracing_outlives_daemon_commands(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The tracer provider of this process is the session's (the exporter above). A daemon
    command run in-process (`main(["worker"])`) would shut it down on its way out, and
    instrument asyncpg: every later test would lose its spans, and each span end would log
    a warning into the stderr a later command's test reads. Both are undone here."""
    monkeypatch.setattr(telemetry, "shutdown_tracing", lambda: None)
    # The instrumentor is a singleton with an unannotated __init__.
    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    instrumented = instrumentor.is_instrumented_by_opentelemetry
    yield
    if instrumentor.is_instrumented_by_opentelemetry and not instrumented:
        instrumentor.uninstrument()


@pytest.fixture
def spans() -> InMemorySpanExporter:
    _EXPORTER.clear()
    return _EXPORTER


@dataclass
class Engine:
    settings: Settings
    conn: store.Connection

    async def register(self, text: str) -> None:
        definition = parse_definition(yaml.safe_load(text), source="test")
        await store.register_definition(self.conn, definition)

    async def submit(self, workflow: str, input: Any = None, **kw: Any) -> UUID:
        return (await enqueue(self.conn, workflow, input or {}, **kw)).id

    async def run(self, run_id: UUID) -> dict[str, Any]:
        row = await store.get_run(self.conn, run_id)
        assert row is not None
        return dict(row)

    async def finished(self, run_id: UUID, timeout: float = 15.0) -> dict[str, Any]:
        async def done() -> bool:
            return (await self.run(run_id))["status"] in ("completed", "failed", "cancelled")

        await wait_for(done, timeout=timeout, message=f"run {run_id} did not finish")
        return await self.run(run_id)

    async def events(self, run_id: UUID) -> list[dict[str, Any]]:
        return [dict(r) for r in await store.run_events(self.conn, run_id)]

    async def transitions(self, run_id: UUID) -> list[dict[str, Any]]:
        return [dict(r) for r in await store.run_transitions(self.conn, run_id)]


async def start_engine(
    settings: Settings, extra_types: Mapping[str, StepFunction] | None = None
) -> tuple[asyncio.Event, list[asyncio.Task[None]]]:
    stop = asyncio.Event()
    ready_o, ready_w = asyncio.Event(), asyncio.Event()
    types = {**load_step_types([]), **(extra_types or {})}
    tasks = [
        asyncio.create_task(run_orchestrator(settings, stop, ready=ready_o)),
        asyncio.create_task(run_worker(settings, types, stop=stop, ready=ready_w, secrets=SECRETS)),
    ]
    await asyncio.wait_for(asyncio.gather(ready_o.wait(), ready_w.wait()), timeout=20)
    return stop, tasks


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[Engine]:
    await store.apply_migrations(settings.database_url or "")
    stop, tasks = await start_engine(settings)
    conn = await store.connect(settings.database_url or "")
    try:
        yield Engine(settings, conn)
    finally:
        await conn.close()
        stop.set()
        await stop_tasks(tasks)


class Steps:
    """Worker step types whose behaviour the test controls, and what they saw."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.gate_open = asyncio.Event()
        self.started: list[str] = []
        self.aborted: list[str] = []
        self.running = 0
        self.most_running = 0

    async def echo(self, params: Any, ctx: StepContext) -> Any:
        self.started.append(ctx.step_id)
        return params

    async def hold(self, params: Any, ctx: StepContext) -> Any:
        """Runs until released; counts how many run at once; notes being aborted."""
        self.started.append(ctx.step_id)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.aborted.append(ctx.step_id)
            raise
        finally:
            self.running -= 1
        return params

    async def gate(self, params: Any, ctx: StepContext) -> Any:
        """Runs until `gate_open` is set (apart from `release`, so a test can let this one
        finish while `hold` steps go on)."""
        self.started.append(ctx.step_id)
        await self.gate_open.wait()
        return params

    async def fail(self, params: Any, ctx: StepContext) -> Any:
        raise ValueError(f"{ctx.step_id} refuses")


@pytest.fixture
def steps() -> Steps:
    return Steps()


@pytest.fixture
async def steps_engine(settings: Settings, steps: Steps) -> AsyncIterator[Engine]:
    """An engine whose worker also serves the `Steps` types: echo, hold, gate, refuse (`fail`
    is a built-in step type)."""
    await store.apply_migrations(settings.database_url or "")
    types = {"echo": steps.echo, "hold": steps.hold, "refuse": steps.fail, "gate": steps.gate}
    stop, tasks = await start_engine(settings, types)
    conn = await store.connect(settings.database_url or "")
    try:
        yield Engine(settings, conn)
    finally:
        steps.release.set()
        steps.gate_open.set()
        await conn.close()
        stop.set()
        await stop_tasks(tasks)
