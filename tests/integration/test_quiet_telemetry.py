"""Quiet when idle: the daemons' background work starts no trace; a run's trace holds its
steps' result writes. asyncpg is instrumented here as `configure()` does in the daemons."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest
import yaml
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from flowforge_orchestrator import store
from flowforge_orchestrator.client import enqueue
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.core.records import StepResult
from flowforge_orchestrator.errors import StoreError
from flowforge_orchestrator.ops import telemetry
from flowforge_orchestrator.store import feed
from flowforge_orchestrator.store import queries as q
from flowforge_orchestrator.worker.results import ResultWriter
from flowforge_orchestrator.worker.runtime import StepContext
from tests.helpers import stop_tasks, wait_for
from tests.integration.conftest import start_engine


class Queries:
    """Every query the asyncpg instrumentation was asked to trace, recorded or not."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    def note(self, attributes: Any) -> None:
        if attributes:
            self.seen[str(attributes.get("db.statement", ""))] += 1


@pytest.fixture
def queries(monkeypatch: pytest.MonkeyPatch) -> Iterator[Queries]:
    """asyncpg instrumented as the daemons do it, and every query it sees counted."""
    seen = Queries()
    original = telemetry.ChildSpansOnlyTracer.start_as_current_span

    def observed(self: telemetry.ChildSpansOnlyTracer, name: str, *args: Any, **kw: Any) -> Any:
        seen.note(kw.get("attributes"))
        return original(self, name, *args, **kw)

    monkeypatch.setattr(telemetry.ChildSpansOnlyTracer, "start_as_current_span", observed)
    # The instrumentor is a singleton with an unannotated __init__.
    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    was_instrumented = instrumentor.is_instrumented_by_opentelemetry
    telemetry.instrument_asyncpg()
    try:
        yield seen
    finally:
        if not was_instrumented:
            instrumentor.uninstrument()


async def test_an_idle_orchestrator_and_worker_export_no_span(
    settings: Settings, spans: InMemorySpanExporter, queries: Queries
) -> None:
    # Every background loop ticks several times a second: polls (with their claims that find
    # nothing), lease renewals, retention with its lag sample; the sampler once at start.
    fast = settings.model_copy(
        update={"poll_interval": 0.1, "lease_seconds": 0.6, "run_retention": 2.0}
    )
    await store.apply_migrations(fast.database_url or "")
    stop, tasks = await start_engine(fast)
    ticks = {
        "lease renewal": q.RENEW_LEASES,
        "claim finding nothing": q.SELECT_PENDING_RUNS,
        "retention": feed.CONSUMER_LAGS,
        "sampler": q.OUTBOX_BACKLOG,
    }
    try:

        def ticked() -> bool:
            counts = {what: queries.seen[sql] for what, sql in ticks.items()}
            return (
                min(counts.values()) >= 1
                and counts["retention"] >= 5
                and (min(counts["lease renewal"], counts["claim finding nothing"]) >= 10)
            )

        await wait_for(ticked, timeout=30, message=f"background loops did not tick: {queries.seen}")
    finally:
        stop.set()
        await stop_tasks(tasks)
    assert sum(queries.seen.values()) > 30
    assert [s.name for s in spans.get_finished_spans()] == []


CHAIN = """
name: traced
version: 1
steps:
  - {id: first, type: echo, with: {n: 1}}
  - {id: left, type: echo, depends_on: [first], with: {n: 2}}
  - {id: right, type: echo, depends_on: [first], with: {n: 3}}
"""


async def _echo(params: Any, ctx: StepContext) -> Any:
    return params


async def test_a_runs_trace_holds_its_steps_result_writes(
    settings: Settings, spans: InMemorySpanExporter, queries: Queries
) -> None:
    await store.apply_migrations(settings.database_url or "")
    stop, tasks = await start_engine(settings, {"echo": _echo})
    conn = await store.connect(settings.database_url or "")
    try:
        await store.register_definition(conn, parse_definition(yaml.safe_load(CHAIN), source="t"))
        await enqueue(conn, "traced", {})

        def ended() -> list[ReadableSpan] | None:
            finished = list(spans.get_finished_spans())
            runs = [s for s in finished if s.name == "workflow traced"]
            steps = [s for s in finished if s.name.startswith("step ")]
            writes = [s for s in finished if s.name == "write result"]
            return finished if runs and len(steps) == 3 and len(writes) >= 3 else None

        finished = await wait_for(ended, timeout=15, message="the run's spans did not end")
    finally:
        await conn.close()
        stop.set()
        await stop_tasks(tasks)
    run = next(s for s in finished if s.name == "workflow traced")
    assert run.context is not None
    # One trace: the run's. No query made by a loop, the enqueue or startup began another.
    assert {s.context.trace_id for s in finished if s.context} == {run.context.trace_id}
    steps = {s.context.span_id: s for s in finished if s.name.startswith("step ") and s.context}
    writes = [s for s in finished if s.name == "write result"]
    # Each step's result write is a child of that step's span, and names it.
    assert sorted(str((s.attributes or {})["flowforge.step_id"]) for s in writes) == [
        "first",
        "left",
        "right",
    ]
    for write in writes:
        assert write.parent is not None and write.parent.span_id in steps
        step = steps[write.parent.span_id]
        assert step.name == "step " + str((write.attributes or {})["flowforge.step_id"])
    # The INSERT of the results is recorded under a write span, as a database client span.
    write_ids = {s.context.span_id for s in writes if s.context}
    inserts = [
        s
        for s in finished
        if s.kind is SpanKind.CLIENT
        and (s.attributes or {}).get("db.statement") in (q.INSERT_NEW_RESULTS, q.INSERT_RESULTS)
    ]
    assert inserts and all(s.parent is not None and s.parent.span_id in write_ids for s in inserts)
    assert queries.seen[q.INSERT_NEW_RESULTS] + queries.seen[q.INSERT_RESULTS] >= 1


async def test_result_writes_are_spans_of_their_steps_and_a_refused_one_fails_alone(
    db_url: str, spans: InMemorySpanExporter, queries: Queries
) -> None:
    """`queries`: asyncpg instrumented, so the INSERT has a span to sit under."""
    pool = await store.create_pool(db_url, size=2)
    writer = ResultWriter(pool)
    tracer = telemetry.tracer()

    async def step(name: str, output: Any) -> None:
        with tracer.start_as_current_span(f"step {name}"):
            await writer.write(_result(name, output))

    try:
        secret = "nul \u0000 s3cret"  # JSONB cannot hold a NUL character
        outcomes = await asyncio.gather(
            step("good", {"ok": 1}),
            step("bad", {"text": secret}),
            writer.write(_result("untraced", {"ok": 2})),  # outside any span: no span
            return_exceptions=True,
        )
    finally:
        await writer.close()
        await pool.close()
    assert outcomes[0] is None and isinstance(outcomes[1], StoreError) and outcomes[2] is None
    finished = spans.get_finished_spans()
    steps = {s.name.removeprefix("step "): s for s in finished if s.name.startswith("step ")}
    writes = [s for s in finished if s.name == "write result"]
    by_step: dict[str, list[ReadableSpan]] = {}
    for write in writes:
        by_step.setdefault(str((write.attributes or {})["flowforge.step_id"]), []).append(write)
    assert sorted(by_step) == ["bad", "good"]
    for name, spans_of_step in by_step.items():
        step_span = steps[name].context
        assert step_span is not None
        for write in spans_of_step:
            assert write.parent is not None and write.parent.span_id == step_span.span_id
    # The refused result's last write failed, naming the error's type, never the value.
    last_bad = by_step["bad"][-1]
    assert last_bad.status.status_code is StatusCode.ERROR
    assert last_bad.status.description == "StoreError"
    assert by_step["good"][-1].status.status_code is not StatusCode.ERROR
    assert not any("s3cret" in str(s.status.description) for s in finished)


def _result(step_id: str, output: Any) -> StepResult:
    now = datetime.now(UTC)
    return StepResult(
        uuid4(), step_id, "succeeded", output, None, now, now, "w", uuid4(), bytes(16)
    )
