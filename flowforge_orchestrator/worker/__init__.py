"""The worker process: runs one attempt of a leaf step per job and reports its result
through PostgreSQL.

Step types are plain async functions marked with `step_type`::

    from flowforge_orchestrator.worker import StepContext, step_type
"""

from flowforge_orchestrator.worker.runtime import (
    StepContext,
    StepFunction,
    WorkerRuntime,
    load_step_types,
    run_worker,
    step_type,
)

__all__ = [
    "StepContext",
    "StepFunction",
    "WorkerRuntime",
    "load_step_types",
    "run_worker",
    "step_type",
]
