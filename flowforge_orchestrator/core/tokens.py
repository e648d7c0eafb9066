"""Attempt tokens: a result counts only when it carries its attempt's unguessable token.

Attempt ids are derived (UUIDv5 of run, step, attempt), so anyone who may insert into
`step_results` could guess one. Each attempt also has a token, the first 16 bytes of
HMAC-SHA256(engine secret, attempt id), where the engine secret is a random value of the
database that only the orchestrator's role can read (sql/0011). The token goes to the
worker inside the signed job, and comes back in the result row; results are keyed by
(attempt id, token), so a forged row never displaces the real one, and the orchestrator
applies a row only when its token verifies.

Rows are decoded here, one by one, from the JSON text the store read: a row that cannot be
decoded is refused alone, it never fails the fetch of the others.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from flowforge_orchestrator.core import jsonb
from flowforge_orchestrator.core.records import StepResult

__all__ = [
    "TOKEN_BYTES",
    "AttemptTokens",
    "RefusedResult",
    "ResultVerifier",
    "StoredResult",
]

TOKEN_BYTES = 16
_REMEMBERED = 10_000  # refused rows remembered, so each is reported once


class AttemptTokens:
    """Tokens of attempts under one engine secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the engine secret is shorter than 16 bytes")
        self._secret = secret

    def token(self, attempt_id: UUID) -> bytes:
        digest = hmac.new(self._secret, attempt_id.bytes, hashlib.sha256).digest()
        return digest[:TOKEN_BYTES]

    def verify(self, attempt_id: UUID, token: bytes | None) -> bool:
        return token is not None and hmac.compare_digest(self.token(attempt_id), bytes(token))


@dataclass(frozen=True)
class StoredResult:
    """A `step_results` row as read, not trusted yet: output and error as JSON text."""

    attempt_id: UUID
    run_id: UUID
    step_id: str
    outcome: str
    output: str | None
    error: str | None
    token: bytes | None
    started_at: datetime | None
    finished_at: datetime
    worker: str | None


@dataclass(frozen=True)
class RefusedResult:
    attempt_id: UUID
    run_id: UUID
    reason: str  # bad_token | unreadable
    detail: str


def _decode(text: str | None) -> Any:
    """The value of a JSON text; ValueError naming why it cannot be used."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"it is nested more than {jsonb.MAX_DEPTH} levels deep") from None
    problem = jsonb.text_depth_problem(text, value)
    if problem is not None:
        raise ValueError(problem)
    return value


class ResultVerifier:
    """Turns stored rows into results the orchestrator may apply.

    A row whose token is wrong is refused. A row with the right token whose output or
    error cannot be decoded (too deep, not an object) becomes a failed result saying so,
    so its run fails with the reason instead of waiting for the attempt's deadline.
    `on_refused` hears of each refused row once.
    """

    def __init__(
        self, tokens: AttemptTokens, on_refused: Callable[[RefusedResult], None] = lambda _: None
    ) -> None:
        self.tokens = tokens
        self.on_refused = on_refused
        self._reported: OrderedDict[tuple[UUID, bytes | None], None] = OrderedDict()

    def check(self, rows: Iterable[StoredResult]) -> list[tuple[UUID, StepResult]]:
        """(run id, result) for each row that verifies."""
        accepted: list[tuple[UUID, StepResult]] = []
        for row in rows:
            if not self.tokens.verify(row.attempt_id, row.token):
                self._refuse(row, "bad_token", "the result's token does not verify")
                continue
            accepted.append((row.run_id, self._result(row)))
        return accepted

    def _result(self, row: StoredResult) -> StepResult:
        try:
            output = _decode(row.output)
            error = _decode(row.error)
            if error is not None and not isinstance(error, dict):
                raise ValueError("its error is not a JSON object")
        except ValueError as exc:
            self._refuse(row, "unreadable", str(exc))
            return StepResult(
                attempt_id=row.attempt_id,
                step_id=row.step_id,
                outcome="failed",
                output=None,
                error={
                    "message": f"the stored result of this attempt cannot be read: {exc}",
                    "category": "unreadable_result",
                    "retryable": False,
                },
                started_at=row.started_at,
                finished_at=row.finished_at,
                worker=row.worker,
            )
        return StepResult(
            attempt_id=row.attempt_id,
            step_id=row.step_id,
            outcome=row.outcome,
            output=output,
            error=error,
            started_at=row.started_at,
            finished_at=row.finished_at,
            worker=row.worker,
        )

    def _refuse(self, row: StoredResult, reason: str, detail: str) -> None:
        key = (row.attempt_id, row.token)
        if key in self._reported:
            return
        self._reported[key] = None
        if len(self._reported) > _REMEMBERED:
            self._reported.popitem(last=False)
        self.on_refused(RefusedResult(row.attempt_id, row.run_id, reason, detail))
