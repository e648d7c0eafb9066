"""What a claimed run must pass before any of its steps runs: its input is JSON this
engine can read, within the context limit; a run that does not pass fails at once, with
the reason."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from uuid import UUID

from flowforge_orchestrator import store
from flowforge_orchestrator.core import jsonb
from flowforge_orchestrator.core.records import RunChanges, json_size, rejected_run
from flowforge_orchestrator.core.state import RunStatus

__all__ = ["read_inputs", "reject"]

log = logging.getLogger("flowforge_orchestrator.engine.orchestrator")


def reject(
    row: store.ClaimedRun, message: str, now: datetime, *, category: str = "internal_error"
) -> RunChanges:
    """The run fails at once, after its last stored transition, with `message`."""
    seq = int((row.checkpoint or {}).get("seq", 0))
    error = {"message": jsonb.storable(message), "category": category, "retryable": False}
    return rejected_run(row.id, RunStatus(row.status), seq, error, now)


def read_inputs(
    rows: list[store.ClaimedRun], limit: int, now: datetime
) -> tuple[dict[UUID, object], dict[UUID, tuple[None, RunChanges]]]:
    """Each claimed run's input, decoded and checked before any step runs: a run whose
    input is over the context limit, nested too deep or not JSON is failed at once."""
    inputs: dict[UUID, object] = {}
    refused: dict[UUID, tuple[None, RunChanges]] = {}
    for row in rows:
        text = row.input_text
        problem, category = None, "invalid_input"
        if len(text.encode()) > 2 * limit:  # jsonb's text has a space after each , and :
            problem, category = f"the input is over {limit} bytes", "payload_too_large"
        else:
            try:
                value = json.loads(text)
            except (ValueError, RecursionError):
                problem = "the input is not JSON this engine can read (nested too deep?)"
            else:
                problem = jsonb.depth_problem(value)
                size = json_size(value) if problem is None else 0
                if size > limit:
                    problem, category = (
                        f"the input is {size} bytes, over the run context limit of "
                        f"{limit} bytes (FLOWFORGE_MAX_CONTEXT_BYTES)",
                        "payload_too_large",
                    )
                elif problem is not None:
                    problem = f"the input cannot be used: {problem}"
                else:
                    inputs[row.id] = value
        if problem is not None:
            log.warning("run %s rejected: %s", row.id, problem, extra={"run_id": str(row.id)})
            refused[row.id] = None, reject(row, problem, now, category=category)
    return inputs, refused
