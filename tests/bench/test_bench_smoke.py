"""The benchmark harness still works: `python -m tests.bench --quick` on the session's servers.

Tiny sizes, one repeat, real processes. Nothing here is timed: the test checks that every
figure got a value and that the runs completed (the harness reports a run that did not).
Workers poll every 50 ms instead of 500: the raw arq baselines wait for a poll at each of
their jobs' handoffs, which took 18 s of the test's 60 at the default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.bench.harness import WORKLOADS
from tests.conftest import Services

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_produces_every_figure(
    services: Services, redis_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWFORGE_", "OTEL_"))}
    command = [sys.executable, "-m", "tests.bench", "--quick", "--repeat", "1"]
    command += ["--timeout", "60", "--poll-delay", "0.05", "--out", str(out)]
    command += ["--database-url", services.database_url, "--redis-url", redis_url]
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=110, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"results: {out}" in done.stdout
    report = json.loads(out.read_text())

    workloads = report["workloads"]
    assert set(workloads) == set(WORKLOADS)
    for name, result in workloads.items():
        errors = {k: v for k, v in result.items() if k.endswith("_error") and v}
        assert not errors, f"{name}: {errors}"  # every run completed, every baseline ran
        assert result["engine"], name
    for figure in report["figures"]:
        assert figure["engine"] is not None, figure["name"]
        if figure["target"] is not None:
            assert figure["met"] in (True, False), figure["name"]
    lines = done.stdout.splitlines()
    assert all(any(line.startswith(f["name"]) for line in lines) for f in report["figures"])
    assert report["config"]["sizes"]["throughput_runs"] < 1000
