"""The chaos run, small: 40 runs, one kill of each kind, one Redis and one PostgreSQL restart.

Real processes and servers of its own (it restarts them, so not the session's). Nothing is
timed: the figures must say that nothing was lost, duplicated or wrong. The seed is random
and printed (set CHAOS_SEED to replay one).
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

from tests.chaos.harness import ChaosConfig, run, smoke


def test_nothing_is_lost_or_duplicated_when_processes_and_servers_die(tmp_path: Path) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(2**32))
    print(
        f"chaos seed {seed} (replay: CHAOS_SEED={seed}, or python -m tests.chaos --smoke "
        f"--seed {seed})"
    )
    config = smoke(ChaosConfig(seed=seed, work_dir=tmp_path))
    figures = asyncio.run(run(config, tmp_path))

    print(figures.line())
    report = "\n".join([figures.line(), *figures.details, f"logs: {tmp_path}"])
    assert figures.ok, report
    assert figures.submitted == config.runs, report
    assert figures.lost == 0 and figures.duplicate_transitions == 0, report
    assert figures.duplicate_events == 0 and figures.broken_histories == 0, report
    assert figures.completed + figures.designed_failures == figures.submitted, report
    assert figures.faults["orchestrator_kills"] >= 1, report
    assert figures.faults["worker_kills"] >= 1, report
    assert figures.faults["redis_restarts"] == 1, report
    assert figures.faults["postgres_restarts"] == 1, report
