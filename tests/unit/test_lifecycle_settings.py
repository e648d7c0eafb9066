"""The data lifecycle's settings: durations in words, checked at start, and the retention
tick they imply."""

from __future__ import annotations

from typing import Any, cast

import pytest
from pydantic import ValidationError

from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.engine.retention import Retention
from flowforge_orchestrator.ops.metrics import OrchestratorMetrics, new_registry


def test_retention_and_max_age_take_durations() -> None:
    defaults = Settings()
    assert defaults.run_retention == 30 * 86400 and defaults.outbox_max_age == 7 * 86400
    s = Settings(run_retention="2s", outbox_max_age="PT1H")  # type: ignore[arg-type]
    assert (s.run_retention, s.outbox_max_age) == (2.0, 3600.0)
    assert Settings(run_retention="0").run_retention == 0  # type: ignore[arg-type]
    assert Settings(run_retention=90).run_retention == 90


@pytest.mark.parametrize("value", ["2x", "-1s", "soon"])
def test_a_bad_retention_names_the_variable(value: str) -> None:
    with pytest.raises(ValidationError, match="FLOWFORGE_RUN_RETENTION: invalid duration"):
        Settings(run_retention=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("retention", "tick"),
    [(2.0, 0.5), (1.0, 0.5), (60.0, 15.0), (30 * 86400.0, 60.0), (0.0, 60.0)],
)
def test_retention_ticks_a_quarter_of_the_period_within_bounds(
    retention: float, tick: float
) -> None:
    metrics = OrchestratorMetrics(new_registry(process=False))
    pool = cast(Any, None)  # not touched until a tick
    assert Retention(pool, Settings(run_retention=retention), metrics).interval == tick
