"""The benchmark's step type: `noop`, served by `worker --types-module tests.bench.steps`.

It does nothing, so a workload measures the engine's cost around a step, as the raw arq
baseline's no-op job measures arq's.
"""

from __future__ import annotations

from typing import Any

from flowforge_orchestrator.worker.runtime import StepContext, step_type

__all__ = ["noop"]


@step_type("noop")
async def noop(params: Any, ctx: StepContext) -> None:
    return None
