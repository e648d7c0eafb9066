"""Failures the graph decides itself, not a worker: an expression that fails, a value
PostgreSQL cannot store, an output over a byte limit, a branch that failed its condition.
Pure: each takes values and returns the error as stored (`StepError.to_dict()`)."""

from __future__ import annotations

import json
from typing import Any

from flowforge_orchestrator.core.jsonb import MAX_DEPTH, depth_problem, storable, text_problem
from flowforge_orchestrator.core.records import Limits
from flowforge_orchestrator.errors import ExpressionError, PayloadTooLarge, StepError

__all__ = [
    "branch_failed",
    "expression_error",
    "handler_failed",
    "invalid_output",
    "measure",
    "run_timed_out",
    "too_large",
]


def expression_error(exc: ExpressionError) -> dict[str, Any]:
    # The message may quote data (a key, a value): mended so that PostgreSQL can store it.
    return StepError(
        storable(str(exc)),
        category="expression_error",
        retryable=False,
        details=storable({"expression": exc.expression, "field": exc.field}),
    ).to_dict()


def measure(value: object) -> tuple[int, str | None]:
    """Bytes of the compact JSON of a value the orchestrator computed, and why PostgreSQL
    could not store it (a NUL, a lone surrogate, nesting past jsonb.MAX_DEPTH), or None.
    One encoding serves both; the nesting is walked only when the text has brackets enough."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:
        return 0, f"it is nested more than {MAX_DEPTH} levels deep"
    problem = text_problem(text)
    if problem is None and text.count("[") + text.count("{") > MAX_DEPTH:
        problem = depth_problem(value)
    if problem is not None:
        return len(text), problem
    return len(text.encode()), None


def invalid_output(step_id: str | None, what: str, problem: str) -> dict[str, Any]:
    """The error of a computed value that cannot be stored: never retried."""
    where = f"step '{step_id}': " if step_id else ""
    return StepError(
        f"{where}{what} cannot be stored: {problem}",
        category="invalid_output",
        retryable=False,
        details={"step_id": step_id, "what": what} if step_id else {"what": what},
    ).to_dict()


def too_large(limits: Limits, context_bytes: int, key: str, size: int) -> dict[str, Any] | None:
    """The error of an output of `size` bytes that breaks a limit, alone or added to the
    `context_bytes` the run's outputs hold already; None if it fits."""
    if size > limits.max_output_bytes:
        return PayloadTooLarge(
            step_id=key, what="the output", size=size, limit=limits.max_output_bytes
        ).to_dict()
    total = context_bytes + size
    if total > limits.max_context_bytes:
        return PayloadTooLarge(
            step_id=key,
            what="the run context with this output",
            size=total,
            limit=limits.max_context_bytes,
        ).to_dict()
    return None


def branch_failed(
    owner: str, branch: str | None, culprit: str, cause: dict[str, Any]
) -> dict[str, Any]:
    """A condition fails with the step of its chosen branch that failed the branch."""
    message = f"step '{culprit}' of its {branch} branch failed"
    return StepError(
        f"step '{owner}': {message}: {cause.get('message', 'no message')}",
        category="branch_failed",
        retryable=False,
        details={"failed_step": culprit, "cause": cause},
    ).to_dict()


def handler_failed(owner: str, culprit: str, cause: dict[str, Any]) -> dict[str, Any]:
    """A caught step fails with the step of its catch handler that failed the handler."""
    return StepError(
        f"step '{owner}': step '{culprit}' of its catch handler failed: "
        f"{cause.get('message', 'no message')}",
        category="handler_failed",
        retryable=False,
        details={"failed_step": culprit, "cause": cause},
    ).to_dict()


def run_timed_out(timeout: float) -> dict[str, Any]:
    """The error of a run that did not finish within its own timeout."""
    return StepError(
        f"the run did not finish within its timeout of {timeout:g}s",
        category="run_timeout",
        retryable=False,
        details={"timeout": timeout},
    ).to_dict()
