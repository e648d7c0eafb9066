"""The report's arithmetic and its handling of a failed workload (pure: no servers)."""

from __future__ import annotations

import pytest

from tests.bench.report import figures, format_table, percentile


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert percentile([5.0], 99) == 5.0


def test_figures_take_medians_ratios_and_targets() -> None:
    results = {
        "throughput": {
            "engine": [
                {
                    "steps_per_s": s,
                    "write_transactions_per_step": 1.2,
                    "wal_bytes_per_step": 900,
                    "cpu_ms_per_step": {"orchestrator": 1.0, "worker": 1.0},
                }
                for s in (500.0, 700.0, 600.0)
            ],
            "engine_error": None,
            "baseline": [{"jobs_per_s": j, "cpu_ms_per_job": 0.5} for j in (1000.0, 900.0, 1100.0)],
            "baseline_error": None,
        }
    }
    by_name = {f.name: f for f in figures(results)}
    throughput = by_name["throughput"]
    assert throughput.engine is not None and throughput.engine.median == 600.0
    assert throughput.ratio == pytest.approx(0.6)
    assert throughput.met is True
    assert by_name["db: write transactions per step"].met is False
    assert by_name["db: WAL bytes per step"].met is True
    assert "600 [500..700]" in format_table([throughput])


def test_a_failed_workload_is_a_failed_line_with_its_error() -> None:
    error = "1 failed of 1 runs (expected all completed); run x is failed: boom\nmore detail"
    results = {
        "fanout": {
            "engine": [],
            "engine_error": error,
            "baseline": [{"wall_s": 1.0}],
            "baseline_error": None,
        }
    }
    fanout, *database = figures(results)  # the wall time, then the fan-out's database cost
    assert all(f.error == error for f in database)
    assert fanout.engine is None and fanout.met is False and fanout.error == error
    line = format_table([fanout]).splitlines()[1]
    assert "FAILED" in line and "run x is failed: boom" in line and "more detail" not in line
