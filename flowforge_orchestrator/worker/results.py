"""A worker's results, written in batches: the worker's half of the group commit.

Every attempt still waits until its own result is durable before its arq job completes
(at-least-once: a result is never acknowledged before it is stored). But the results of
the attempts that finish together share one transaction, so the database commit rate is
not the ceiling of the worker's throughput, and there are fewer write transactions than
steps.

A first result waits up to `COALESCE` for others, but only while the worker holds jobs
whose results are not handed over yet: a result no one else can join (a quiet system, a
chain of steps) is written at once, and a busy worker fills its batches.

A batch the database refuses (a value JSONB cannot hold) is written row by row, so only
the result at fault is refused; transient failures are retried forever, since a result is
the only copy of finished work.

Each result's write is a span in its step's trace ("write result", a child of the span
current when `write` was called); the batch's queries are recorded under the first one's.
The writer's own loop runs in an empty context, so it belongs to no step.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context

from flowforge_orchestrator import store
from flowforge_orchestrator.core.records import StepResult
from flowforge_orchestrator.errors import StoreError
from flowforge_orchestrator.ops import telemetry

__all__ = ["Pending", "ResultWriter"]

log = logging.getLogger(__name__)

MAX_BATCH = 500
# Seconds a first result may wait for the jobs the worker holds. A lone result does not
# wait at all, so this costs latency only under load (BENCHMARKS.md: 0.15 write
# transactions per step, handoff p50 2.9 ms).
COALESCE = 0.005


@dataclass(frozen=True)
class Pending:
    """A result handed to the writer, what its `write` call waits for, and the trace
    context of that call (its step's span)."""

    result: StepResult
    context: Context = field(default_factory=otel_context.get_current)
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class ResultWriter:
    """`await write(result)` returns once the result is stored (or raises StoreError if the
    database refuses that result). Each result carries its run id, token and worker."""

    def __init__(self, pool: store.Pool, *, in_progress: Callable[[], int] = lambda: 0) -> None:
        """`in_progress`: how many jobs the worker holds (taken, not finished), counting
        those waiting in `write`; the others may still join a batch."""
        self.pool = pool
        self._in_progress = in_progress
        self._handed = 0  # write() calls not returned yet
        self._queue: list[Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def write(self, result: StepResult) -> None:
        if self._task is None or self._task.done():
            # An empty context: a task copies its creator's, which is a step's span here.
            self._task = asyncio.get_running_loop().create_task(
                self._run(), context=contextvars.Context()
            )
        pending = Pending(result)
        self._queue.append(pending)
        self._wake.set()
        self._handed += 1
        try:
            await asyncio.shield(pending.done)
        finally:
            self._handed -= 1

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for pending in self._queue:
            if not pending.done.done():
                pending.done.set_exception(StoreError("the worker stopped before writing it"))

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            await self._gather()
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    await self._flush(batch)
                except asyncio.CancelledError:
                    self._queue[:0] = batch  # close() fails them: nothing is left waiting
                    raise
                except Exception:  # a bug, or a driver error nobody foresaw: keep them
                    log.exception("writing %d result(s) failed; trying again", len(batch))
                    self._queue[:0] = batch
                    await asyncio.sleep(1.0)

    async def _gather(self) -> None:
        """Let the attempts still executing join this commit, for at most COALESCE: what
        PostgreSQL's commit_delay does, paid only when someone may come."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COALESCE
        while len(self._queue) < MAX_BATCH and self._in_progress() > self._handed:
            self._wake.clear()
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                break
        self._wake.clear()

    async def _flush(self, batch: list[Pending]) -> None:
        try:
            await self._store(batch)
        except StoreError as exc:
            if len(batch) == 1:
                batch[0].done.set_exception(exc)
                return
            for pending in batch:  # find the one the database refuses
                await self._flush([pending])
            return
        for pending in batch:
            if not pending.done.done():
                pending.done.set_result(None)

    async def _store(self, batch: list[Pending]) -> None:
        async def write() -> None:
            async with self.pool.acquire() as conn:
                await store.insert_results(conn, [p.result for p in batch])

        what = f"writing {len(batch)} result(s)"
        with _write_spans(batch):
            await store.retrying(write, what=what)


@contextmanager
def _write_spans(batch: list[Pending]) -> Iterator[None]:
    """A "write result" span in each traced result's step trace, the first one current
    (the batch's queries are its children); ended with the write, failed if it fails."""
    spans = [
        telemetry.tracer().start_span(
            "write result",
            context=p.context,
            kind=trace.SpanKind.CLIENT,
            attributes={
                "flowforge.step_id": p.result.step_id,
                "flowforge.attempt_id": str(p.result.attempt_id),
                "flowforge.results_in_batch": len(batch),
            },
        )
        for p in batch
        if telemetry.has_parent_span(p.context)  # a result written outside a step: no span
    ]
    try:
        first = spans[0] if spans else trace.INVALID_SPAN
        with trace.use_span(first, record_exception=False, set_status_on_exception=False):
            yield
    except Exception as exc:
        for span in spans:
            # The error's type only: the database's message may quote the value, which is
            # redacted for the attempt's failure (runtime) but not here.
            span.set_status(trace.StatusCode.ERROR, type(exc).__name__)
        raise
    finally:
        for span in spans:
            span.end()
