"""Attempt tokens and the checking of stored results, one row at a time."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from uuid import UUID, uuid4

from flowforge_orchestrator.core.jsonb import MAX_DEPTH
from flowforge_orchestrator.core.tokens import (
    AttemptTokens,
    RefusedResult,
    ResultVerifier,
    StoredResult,
)

SECRET = bytes(range(32))
NOW = datetime(2024, 5, 1, tzinfo=UTC)
TOKENS = AttemptTokens(SECRET)


def row(
    attempt: UUID, token: bytes | None, output: str | None = '{"ok":true}', error: str | None = None
) -> StoredResult:
    return StoredResult(
        attempt_id=attempt,
        run_id=UUID(int=1),
        step_id="s",
        outcome="succeeded" if error is None else "failed",
        output=output,
        error=error,
        token=token,
        started_at=NOW,
        finished_at=NOW,
        worker="w",
    )


def test_a_token_is_the_first_16_bytes_of_the_hmac_of_the_attempt_id() -> None:
    attempt = uuid4()
    expected = hmac.new(SECRET, attempt.bytes, hashlib.sha256).digest()[:16]
    assert TOKENS.token(attempt) == expected
    assert TOKENS.verify(attempt, expected)
    assert not TOKENS.verify(uuid4(), expected)
    assert not TOKENS.verify(attempt, None)
    assert not AttemptTokens(bytes(32)).verify(attempt, expected)


def test_only_rows_with_their_attempts_token_are_accepted_and_each_refusal_is_heard_once() -> None:
    refused: list[RefusedResult] = []
    verifier = ResultVerifier(TOKENS, refused.append)
    real, forged = uuid4(), uuid4()
    rows = [
        row(real, TOKENS.token(real)),
        row(real, bytes(16), output='{"forged":true}'),
        row(forged, TOKENS.token(real)),  # another attempt's token
        row(forged, None),
    ]
    accepted = verifier.check(rows)
    assert [(run, r.attempt_id, r.output) for run, r in accepted] == [
        (UUID(int=1), real, {"ok": True})
    ]
    assert [(r.attempt_id, r.reason) for r in refused] == [
        (real, "bad_token"),
        (forged, "bad_token"),
        (forged, "bad_token"),
    ]
    verifier.check(rows)  # fetched again: not reported again
    assert len(refused) == 3


def test_a_verified_row_that_cannot_be_decoded_fails_its_attempt_alone() -> None:
    refused: list[RefusedResult] = []
    verifier = ResultVerifier(TOKENS, refused.append)
    deep, bad_error, fine = uuid4(), uuid4(), uuid4()
    too_deep = json.dumps(json.loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)))
    very_deep = "[" * 100_000 + "]" * 100_000  # past any recursion limit
    accepted = verifier.check(
        [
            row(deep, TOKENS.token(deep), output=too_deep),
            row(deep, TOKENS.token(deep), output=very_deep),
            row(bad_error, TOKENS.token(bad_error), output=None, error='"just text"'),
            row(fine, TOKENS.token(fine)),
        ]
    )
    results = {r.attempt_id: r for _, r in accepted}
    assert results[fine].outcome == "succeeded"
    for attempt in (deep, bad_error):
        error = results[attempt].error
        assert results[attempt].outcome == "failed"
        assert error is not None
        assert (error["category"], error["retryable"]) == ("unreadable_result", False)
    assert "nested more than" in str(accepted[0][1].error)
    assert {r.reason for r in refused} == {"unreadable"}
