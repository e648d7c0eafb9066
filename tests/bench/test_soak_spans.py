"""The soak's span counts: the counting processor, its file, and the arithmetic (no servers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import TracerProvider

from tests.bench.soak import Spans, per_step, verdict
from tests.bench.spancount import SpanCounter, read_counts


def test_the_counter_writes_totals_roots_and_names(tmp_path: Path) -> None:
    path = tmp_path / "worker.json"
    counter = SpanCounter(path)
    provider = TracerProvider()
    provider.add_span_processor(counter)
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("step a"):
        with tracer.start_as_current_span("write result"):
            pass
    with tracer.start_as_current_span("step b"):
        pass
    provider.shutdown()  # writes the last counts
    assert read_counts(path) == {
        "total": 3,
        "roots": 2,
        "by_name": {"write result": 1, "step a": 1, "step b": 1},
    }
    assert not path.with_suffix(".tmp").exists()


def test_counts_of_a_process_not_started_yet_are_zero(tmp_path: Path) -> None:
    assert read_counts(tmp_path / "run.json") == {"total": 0, "roots": 0, "by_name": {}}


def _counts(total: int, roots: int, by_name: dict[str, int]) -> dict[str, Any]:
    return {"total": total, "roots": roots, "by_name": by_name}


def test_a_delta_groups_runs_and_steps_and_gives_spans_per_step() -> None:
    before = {
        "orchestrator": _counts(1, 1, {"workflow chain": 1}),
        "worker": _counts(2, 0, {"step a": 1, "write result": 1}),
    }
    after = {
        "orchestrator": _counts(3, 3, {"workflow chain": 2, "workflow fanout": 1}),
        "worker": _counts(12, 0, {"step a": 3, "step b": 2, "write result": 5, "INSERT": 2}),
    }
    delta = Spans.delta(before, after)
    assert delta == {
        "total": 12,
        "roots": 2,
        "per_process": {"orchestrator": 2, "worker": 10},
        "by_kind": {"INSERT": 2, "step": 4, "workflow": 2, "write result": 4},
    }
    assert per_step(delta) == 3.0  # 12 spans over 4 steps
    assert per_step(Spans.delta(after, after)) is None  # no step ran: no ratio


def test_spans_in_an_idle_window_fail_the_verdict() -> None:
    samples = [
        {"minute": m, "total_bytes": 100, "rss_kb": {"orchestrator": 10, "worker": 10}, "p99_ms": 5}
        for m in (1, 2, 3, 4)
    ]
    checks = {"duplicates": 0, "gaps": 0, "unfinished_reads": 0}
    assert verdict(samples, 0, checks, idle_spans=0)["pass"]
    quiet_failed = verdict(samples, 0, checks, idle_spans=3)
    assert not quiet_failed["pass"] and quiet_failed["failed"] == ["idle_spans"]
