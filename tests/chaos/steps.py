"""The chaos run's worker step type: `worker --types-module tests.chaos.steps`.

`tracked_http` is the engine's own HTTP step (`run_http_step`, what the built-in `http` type
runs) with the attempt in request headers, so the chaos server can count how many times each
attempt was executed: the built-in type sends nothing that tells one attempt from another.
"""

from __future__ import annotations

from typing import Any

from flowforge_orchestrator.worker.runtime import StepContext, step_type
from flowforge_orchestrator.worker.steps.http import run_http_step

__all__ = ["ATTEMPT_HEADER", "RUN_HEADER", "STEP_HEADER", "TRY_HEADER", "tracked_http"]

ATTEMPT_HEADER = "x-chaos-attempt"
RUN_HEADER = "x-chaos-run"
STEP_HEADER = "x-chaos-step"
TRY_HEADER = "x-chaos-try"


@step_type("tracked_http")
async def tracked_http(params: dict[str, Any], ctx: StepContext) -> Any:
    headers = {
        **(params.get("headers") or {}),
        ATTEMPT_HEADER: str(ctx.attempt_id),
        RUN_HEADER: str(ctx.run_id),
        STEP_HEADER: ctx.step_id,
        TRY_HEADER: str(ctx.attempt),
    }
    return await run_http_step(
        {**params, "headers": headers},
        client=ctx.http,
        default_timeout=ctx.timeout,
        max_body_bytes=ctx.settings.max_output_bytes,
    )
