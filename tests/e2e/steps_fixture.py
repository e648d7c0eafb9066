"""Custom step types for worker subprocesses: `--types-module tests.e2e.steps_fixture`.

`slow` is controlled by the test through files, so nothing depends on timing:

* it appends one line to `params["calls"]` when it starts (the test counts executions, and
  waits for the file to know the worker has the attempt in hand);
* it then waits until the file `params["release"]` exists (a bounded wait loop, here in
  the step, never in the test), and returns its params.

`echo` returns its params.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from flowforge_orchestrator.worker.runtime import StepContext, step_type
from tests.helpers import poll

__all__ = ["beat", "echo", "slow"]

RELEASE_LIMIT = 60.0  # seconds a `slow` step waits for its release file before failing


@step_type("echo")
async def echo(params: Any, ctx: StepContext) -> Any:
    return params


@step_type("slow")
async def slow(params: dict[str, Any], ctx: StepContext) -> Any:
    with Path(params["calls"]).open("a", encoding="utf-8") as calls:
        calls.write(f"{ctx.attempt_id}\n")
    release = Path(params["release"])
    if not await poll(release.exists, timeout=float(params.get("limit", RELEASE_LIMIT))):
        raise TimeoutError(f"{release} was not created in time")
    return params


@step_type("beat")
async def beat(params: dict[str, Any], ctx: StepContext) -> Any:
    """Works through `params["pages"]` pages, 0.2 s each, beating after each; resumes from
    the last page its previous attempt reported. Appends `<worker> <attempt> <resumed from>`
    to `params["calls"]` as it starts, so the test knows which worker holds it."""
    start = int((ctx.last_heartbeat or {}).get("page", 0))
    with Path(params["calls"]).open("a", encoding="utf-8") as calls:
        calls.write(f"{ctx.settings.node_id} {ctx.attempt} {start}\n")
    for page in range(start + 1, int(params["pages"]) + 1):
        await asyncio.sleep(0.2)
        await ctx.heartbeat({"page": page})
    return {"pages": params["pages"], "attempt": ctx.attempt, "resumed_from": start}
