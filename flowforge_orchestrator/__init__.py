"""FlowForge orchestrator: a durable workflow engine on PostgreSQL with arq workers."""

from flowforge_orchestrator.errors import (
    DefinitionError,
    ExpressionError,
    FlowForgeError,
    NotFound,
    PayloadTooLarge,
    StepError,
)

__all__ = [
    "DefinitionError",
    "ExpressionError",
    "FlowForgeError",
    "NotFound",
    "PayloadTooLarge",
    "StepError",
    "__version__",
]

__version__ = "0.1.0"
