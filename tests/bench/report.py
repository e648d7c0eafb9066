"""Figures from the repeats: median and range, ratio to the baseline, target, met or not.

`figures(results)` turns what the workloads returned (per workload: `engine` and `baseline`
repeats, and the error that stopped either) into one `Figure` per line of the report.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Figure", "Series", "Target", "figures", "format_table", "percentile"]

Repeat = dict[str, Any]


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Series:
    """One figure's value in each repeat."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def text(self) -> str:
        if len(self.values) == 1:
            return _num(self.values[0])
        return f"{_num(self.median)} [{_num(min(self.values))}..{_num(max(self.values))}]"

    def to_json(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": min(self.values),
            "max": max(self.values),
            "values": self.values,
        }


@dataclass(frozen=True)
class Target:
    """What the issue asks of a figure: `check(engine, baseline)` on the medians."""

    text: str
    check: Callable[[float, float | None], bool]


def ratio_at_least(x: float) -> Target:
    return Target(f">= {x:g}x raw arq", lambda e, b: b is not None and e >= x * b)


def ratio_at_most(x: float) -> Target:
    return Target(f"<= {x:g}x raw arq", lambda e, b: b is not None and e <= x * b)


def within(ms: float) -> Target:
    return Target(f"<= raw arq + {ms:g} ms", lambda e, b: b is not None and e - b <= ms)


def at_most(limit: float, unit: str) -> Target:
    return Target(f"<= {limit:g} {unit}", lambda e, _b: e <= limit)


@dataclass(frozen=True)
class Figure:
    name: str
    unit: str
    engine: Series | None
    baseline: Series | None
    target: Target | None
    error: str | None = None  # why the engine (or the baseline) has no value
    compared: bool = False  # the line has a baseline (which may have failed)

    @property
    def ratio(self) -> float | None:
        if self.engine is None or self.baseline is None or self.baseline.median == 0:
            return None
        return self.engine.median / self.baseline.median

    @property
    def met(self) -> bool | None:
        """None: no target. False also when a value is missing."""
        if self.target is None:
            return None
        if self.engine is None:
            return False
        baseline = self.baseline.median if self.baseline is not None else None
        return self.target.check(self.engine.median, baseline)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "engine": self.engine.to_json() if self.engine else None,
            "baseline": self.baseline.to_json() if self.baseline else None,
            "ratio": self.ratio,
            "target": self.target.text if self.target else None,
            "met": self.met,
            "error": self.error,
        }


def _num(value: float) -> str:
    if math.isnan(value):
        return "nan"
    size = abs(value)
    if size >= 100:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if size >= 0.1 else f"{value:.3g}"


# -- what each line reads from the repeats ---------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    name: str
    unit: str
    workload: str
    engine: Callable[[Repeat], float] | None  # None: the line has no engine value
    baseline: tuple[str, Callable[[Repeat], float]] | None  # (which baseline, reader)
    target: Target | None


def _pct(key: str, pct: float) -> Callable[[Repeat], float]:
    return lambda r: percentile(r[key], pct)


def _get(*path: str) -> Callable[[Repeat], float]:
    def read(repeat: Repeat) -> float:
        value: Any = repeat
        for key in path:
            value = value[key]
        return float(value)

    return read


SPECS: list[_Spec] = [
    _Spec(
        "throughput",
        "steps/s vs jobs/s",
        "throughput",
        _get("steps_per_s"),
        ("baseline", _get("jobs_per_s")),
        ratio_at_least(0.6),
    ),
    _Spec(
        "handoff p50",
        "ms",
        "latency",
        _pct("handoff_ms", 50),
        ("baseline", _pct("latency_ms", 50)),
        within(3),
    ),
    _Spec(
        "handoff p99",
        "ms",
        "latency",
        _pct("handoff_ms", 99),
        ("baseline", _pct("latency_ms", 99)),
        within(10),
    ),
    _Spec(
        "fan-out wall time",
        "s",
        "fanout",
        _get("wall_s"),
        ("baseline", _get("wall_s")),
        ratio_at_most(1.5),
    ),
    _Spec(
        "scale: orchestrator RSS per active run",
        "KiB",
        "scale",
        _get("rss_per_run_kib"),
        None,
        at_most(16, "KiB"),
    ),
    _Spec("scale: claiming all runs", "s", "scale", _get("claim_s"), None, None),
    _Spec(
        "event delivery p50 vs a step's handoff",
        "ms",
        "events",
        _pct("event_to_dispatch_ms", 50),
        ("engine", _pct("result_to_dispatch_ms", 50)),
        within(3),
    ),
    _Spec(
        "event delivery p99 vs a step's handoff",
        "ms",
        "events",
        _pct("event_to_dispatch_ms", 99),
        ("engine", _pct("result_to_dispatch_ms", 99)),
        None,
    ),
    _Spec(
        "parked on events: orchestrator RSS per run",
        "KiB",
        "parked",
        _get("rss_per_run_kib"),
        None,
        at_most(4, "KiB"),
    ),
    _Spec(
        "parked on events: transactions per poll",
        "",
        "parked",
        _get("transactions_per_poll"),
        None,
        None,
    ),
    _Spec(
        "hibernated: orchestrator RSS, highest",
        "MB",
        "hibernated",
        _get("rss_peak_mb"),
        None,
        at_most(300, "MB"),
    ),
    _Spec("hibernated: claimed and parked", "runs/s", "hibernated", _get("park_rate"), None, None),
    _Spec(
        "hibernated: transactions per poll",
        "",
        "hibernated",
        _get("transactions_per_poll"),
        None,
        None,
    ),
    _Spec("hibernated: timer late, p50", "ms", "hibernated", _pct("late_ms", 50), None, None),
    _Spec(
        "hibernated: timer late, p99",
        "ms",
        "hibernated",
        _pct("late_ms", 99),
        None,
        at_most(1000, "ms"),
    ),
    _Spec("hibernated: timer late, max", "ms", "hibernated", _pct("late_ms", 100), None, None),
    _Spec("fan-out: WAL bytes per item", "B", "fanout", _get("wal_bytes_per_item"), None, None),
    _Spec(
        "child runs/s vs plain fan-out steps/s",
        "/s",
        "children",
        _get("children_per_s"),
        ("steps", _get("steps_per_s")),
        None,
    ),
    _Spec(
        "child runs: WAL bytes per child", "B", "children", _get("wal_bytes_per_child"), None, None
    ),
    _Spec(
        "fan-out: write transactions per item",
        "",
        "fanout",
        _get("write_transactions_per_item"),
        None,
        None,
    ),
    _Spec(
        "db: write transactions per step",
        "",
        "throughput",
        _get("write_transactions_per_step"),
        None,
        at_most(1, ""),
    ),
    _Spec(
        "db: WAL bytes per step",
        "B",
        "throughput",
        _get("wal_bytes_per_step"),
        None,
        at_most(1536, "B"),
    ),
    _Spec(
        "failover: kill -> replica's commit, p50",
        "s",
        "failover",
        _get("p50_s"),
        None,
        at_most(1, "s"),
    ),
    _Spec(
        "failover: kill -> replica's commit, max",
        "s",
        "failover",
        _get("max_s"),
        None,
        at_most(2, "s"),
    ),
    _Spec(
        "replicas: steps/s, 2+2 (raw arq col.: 1+1)",
        "",
        "replicas",
        _get("steps_per_s"),
        ("single", _get("steps_per_s")),
        None,
    ),
    _Spec(
        "replicas: orchestrators' CPU/step, 2+2 vs 1+1",
        "ms",
        "replicas",
        _get("orchestrators_cpu_ms_per_step"),
        ("single", _get("orchestrators_cpu_ms_per_step")),
        None,
    ),
    _Spec(
        "replicas: workers' CPU/step, 2+2 vs 1+1",
        "ms",
        "replicas",
        _get("workers_cpu_ms_per_step"),
        ("single", _get("workers_cpu_ms_per_step")),
        None,
    ),
    # Context for whoever makes it faster (no targets).
    _Spec(
        "handoff p50 vs arq job enqueuing the next",
        "ms",
        "latency",
        _pct("handoff_ms", 50),
        ("chained", _pct("handoff_ms", 50)),
        None,
    ),
    _Spec(
        "handoff p50: result -> next dispatched",
        "ms",
        "latency",
        _pct("result_to_dispatch_ms", 50),
        None,
        None,
    ),
    _Spec(
        "handoff p50: dispatched -> started",
        "ms",
        "latency",
        _pct("dispatch_to_start_ms", 50),
        None,
        None,
    ),
    _Spec(
        "CPU per step: worker vs raw arq worker",
        "ms",
        "throughput",
        _get("cpu_ms_per_step", "worker"),
        ("baseline", _get("cpu_ms_per_job")),
        None,
    ),
    _Spec(
        "CPU per step: orchestrator",
        "ms",
        "throughput",
        _get("cpu_ms_per_step", "orchestrator"),
        None,
        None,
    ),
]


def _series(repeats: list[Repeat], read: Callable[[Repeat], float]) -> Series | None:
    return Series([read(r) for r in repeats]) if repeats else None


def figures(results: dict[str, dict[str, Any]]) -> list[Figure]:
    """One Figure per spec whose workload was run."""
    out = []
    for spec in SPECS:
        result = results.get(spec.workload)
        if result is None:
            continue
        engine = _series(result["engine"], spec.engine) if spec.engine else None
        errors = [result.get("engine_error")]
        baseline = None
        if spec.baseline is not None:
            which, read = spec.baseline
            baseline = _series(result.get(which, []), read)
            errors.append(result.get(f"{which}_error"))
        error = "; ".join(e for e in errors if e) or None
        compared = spec.baseline is not None
        out.append(Figure(spec.name, spec.unit, engine, baseline, spec.target, error, compared))
    return out


def format_table(rows: list[Figure]) -> str:
    """One line per figure: name, engine, raw arq, ratio, target, met (median [min..max])."""
    lines = [
        f"{'figure':<46} {'engine':>24} {'raw arq':>24} {'ratio':>6}  {'target':<22} met",
    ]
    for f in rows:
        name = f"{f.name} ({f.unit})" if f.unit else f.name
        engine = f.engine.text() if f.engine else "FAILED"
        baseline = f.baseline.text() if f.baseline else ("FAILED" if f.compared else "-")
        ratio = f"{f.ratio:.2f}" if f.ratio is not None else "-"
        met = {None: "-", True: "yes", False: "no"}[f.met]
        line = f"{name:<46} {engine:>24} {baseline:>24} {ratio:>6}  "
        line += f"{f.target.text if f.target else '-':<22} {met}"
        if f.error:
            first = f.error.splitlines()[0] if f.error.strip() else f.error
            line += f"  error: {first}"
        lines.append(line)
    return "\n".join(lines)
