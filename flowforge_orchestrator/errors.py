"""The one error hierarchy of FlowForge.

    FlowForgeError
    ├── ConfigError               bad settings or command-line arguments
    ├── DefinitionError           a workflow definition is invalid (names file, step id, field)
    ├── ExpressionError           a CEL expression failed to compile or to evaluate
    ├── StoreError                PostgreSQL failed
    │   ├── TransientStoreError   connection lost, serialization failure: retry the transaction
    │   └── OwnershipLost         the run's epoch moved on: another replica owns it now
    ├── MigrationError            a migration file is missing, altered or failed
    ├── NotFound                  a run or definition that does not exist
    ├── ServiceUnavailable        a server cannot be used: Redis unreachable, no schema
    ├── WaitTimedOut              a command gave up waiting (`--timeout`)
    ├── InvalidEvent              an event or outside completion that cannot be sent as given
    ├── JobRefused                a job from the queue failed verification: it is not run
    └── StepError                 one attempt of a step failed (carries `category`, `retryable`)
        ├── PayloadTooLarge       an output or the run context is over its byte limit
        └── DestinationDenied     the destination policy refused an http step's address

Retryability is an attribute, not a type: a `StepError` says whether another attempt may help.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "ConfigError",
    "DefinitionError",
    "DefinitionProblem",
    "DestinationDenied",
    "ExpressionError",
    "FlowForgeError",
    "InvalidEvent",
    "JobRefused",
    "MigrationError",
    "NotFound",
    "OwnershipLost",
    "PayloadTooLarge",
    "ServiceUnavailable",
    "StepError",
    "StoreError",
    "TransientStoreError",
    "WaitTimedOut",
]


class FlowForgeError(Exception):
    """Root of every error FlowForge raises on purpose."""


class ConfigError(FlowForgeError):
    """Settings or arguments that cannot work."""


@dataclass(frozen=True)
class DefinitionProblem:
    """One thing wrong with a definition, located as precisely as we can."""

    message: str
    source: str | None = None
    step_id: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = [f"file {self.source}"] if self.source else []
        if self.step_id:
            where.append(f"step '{self.step_id}'")
        if self.field:
            where.append(f"field '{self.field}'")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class DefinitionError(FlowForgeError):
    """A workflow definition failed validation; `problems` lists every issue found."""

    def __init__(self, problems: list[DefinitionProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class ExpressionError(FlowForgeError):
    """A CEL expression failed; names the expression and where it is used."""

    def __init__(
        self,
        message: str,
        *,
        expression: str,
        step_id: str | None = None,
        field: str | None = None,
    ) -> None:
        self.expression = expression
        self.step_id = step_id
        self.field = field
        self.reason = message
        where = ", ".join(
            part
            for part in (
                f"step '{step_id}'" if step_id else "",
                f"field '{field}'" if field else "",
            )
            if part
        )
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}expression {expression!r}: {message}")


class StoreError(FlowForgeError):
    """PostgreSQL refused or failed a statement."""


class TransientStoreError(StoreError):
    """A failure that a new connection or a new transaction may not have."""


class OwnershipLost(StoreError):
    """This orchestrator no longer owns the run (its epoch is stale)."""


class MigrationError(FlowForgeError):
    """Migrations could not be applied."""


class NotFound(FlowForgeError):
    """A run or definition that does not exist."""


class InvalidEvent(FlowForgeError):
    """An event or an outside completion that cannot be sent as given (address, payload)."""


class JobRefused(FlowForgeError):
    """A job a worker will not run: unsigned, altered, or not the job it claims to be.

    `reason` is a short label for logs and metrics (one of `REASONS`); the message never
    quotes the job's parameters.
    """

    REASONS = ("malformed", "bad_signature", "wrong_job_id", "wrong_queue")

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RedriveError(FlowForgeError):
    """A run cannot be run again as asked (not failed or cancelled, no such step, ...)."""


class ServiceUnavailable(FlowForgeError):
    """A server a command needs cannot be used as it is: Redis unreachable or refusing us,
    a database without the schema this code expects."""


class WaitTimedOut(FlowForgeError):
    """A command gave up waiting (`--timeout`) for what it follows: nothing is wrong with it."""


class StepError(FlowForgeError):
    """One attempt of a step failed.

    `category` is what `retry_on` matches (`timeout`, `connection_error`, `http_5xx`, `http_503`,
    an exception type name, ...); `retryable=False` forbids any further attempt.
    """

    def __init__(
        self,
        message: str,
        *,
        category: str = "error",
        retryable: bool = True,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.category = category
        self.retryable = retryable
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in results, runs and events."""
        out: dict[str, Any] = {
            "message": self.message,
            "category": self.category,
            "retryable": self.retryable,
        }
        if self.details:
            out["details"] = self.details
        return out


class PayloadTooLarge(StepError):
    """An output or the run context is over its configured byte limit; never retried."""

    def __init__(self, *, step_id: str, what: str, size: int, limit: int) -> None:
        super().__init__(
            f"step '{step_id}': {what} is {size} bytes, over the limit of {limit} bytes",
            category="payload_too_large",
            retryable=False,
            details={"step_id": step_id, "what": what, "size": size, "limit": limit},
        )


class DestinationDenied(StepError):
    """The destination policy refused where an http step would connect; never retried."""

    def __init__(self, *, host: str, address: str, reason: str) -> None:
        where = host if host == address else f"{host} ({address})"
        super().__init__(
            f"destination {where} is denied: {reason}",
            category="destination_denied",
            retryable=False,
            details={"host": host, "address": address, "reason": reason},
        )
