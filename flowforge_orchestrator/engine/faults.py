"""What the claimer and the committer do with a run the database refuses to store."""

from __future__ import annotations

import logging
from uuid import UUID

from flowforge_orchestrator.engine.owned import OwnedRuns
from flowforge_orchestrator.ops import metrics

__all__ = ["cause", "set_aside"]

log = logging.getLogger("flowforge_orchestrator.engine.orchestrator")


def cause(exc: BaseException) -> str:
    """The driver's message behind a store error (what the database said)."""
    inner = exc.__cause__ or exc
    return str(inner) or type(inner).__name__


def set_aside(
    runs: OwnedRuns,
    measures: metrics.OrchestratorMetrics,
    run_id: UUID,
    why: str,
    exc: BaseException,
) -> None:
    """Not even the run's failure can be stored: this replica leaves it as it is, and never
    claims it again."""
    runs.set_apart(run_id)
    measures.reconciled("set_apart")
    log.error(
        "run %s: %s; not even its failure can be stored (%s): this orchestrator leaves it as it is",
        run_id,
        why,
        cause(exc),
        extra={"run_id": str(run_id)},
    )
