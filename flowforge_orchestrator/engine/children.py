"""Child runs as the engine sees them: the span of the workflow step that starts one.

The span is started before the commit that inserts the child, so that the child's row
carries it as its traceparent: the child's run span (and everything under it) is a child
of the parent's step span, in the parent's trace. It ends when the step's attempt ends.
"""

from __future__ import annotations

from dataclasses import replace

from opentelemetry import trace

from flowforge_orchestrator.core.records import RunChanges
from flowforge_orchestrator.core.state import StepStatus
from flowforge_orchestrator.engine.owned import Owned
from flowforge_orchestrator.ops import telemetry

__all__ = ["end_child_spans", "trace_children"]


def trace_children(owned: Owned, changes: RunChanges) -> None:
    """Give each child run `changes` start a span of its step, as its traceparent."""
    if not changes.children or all(c.traceparent for c in changes.children):
        return
    parent = telemetry.context_from_traceparent(owned.traceparent)
    run_id = str(changes.run_id)
    traced = []
    for child in changes.children:
        if child.traceparent is None:
            span = telemetry.tracer().start_span(
                f"step {child.parent_step}",
                context=parent,
                kind=trace.SpanKind.INTERNAL,
                attributes={
                    "flowforge.run_id": run_id,
                    "flowforge.step_id": child.parent_step,
                    "flowforge.step_type": "workflow",
                    "flowforge.attempt_id": str(child.parent_attempt_id),
                    "flowforge.child_run_id": str(child.run_id),
                    "flowforge.workflow": child.workflow,
                },
            )
            owned.child_spans[child.parent_attempt_id] = span
            child = replace(child, traceparent=telemetry.traceparent_of(span))
        traced.append(child)
    changes.children = traced


def end_child_spans(owned: Owned, changes: RunChanges | None = None) -> None:
    """End the spans of the attempts `changes` finished, with how they ended; all of them
    when the run finished (or with None: the run left this orchestrator)."""
    if not owned.child_spans:
        return
    for finished in changes.attempts_finished if changes is not None else ():
        span = owned.child_spans.pop(finished.attempt_id, None)
        if span is None:
            continue
        span.set_attribute("flowforge.status", finished.status.value)
        if finished.status in (StepStatus.FAILED, StepStatus.TIMED_OUT):
            message = str((finished.error or {}).get("message"))
            span.set_status(trace.StatusCode.ERROR, message)
        span.end()
    if changes is None or changes.status.finished:
        for span in owned.child_spans.values():
            span.end()
        owned.child_spans.clear()
