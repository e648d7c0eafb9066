"""Retry arithmetic: which errors are retried, the backoff, jitter and Retry-After."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowforge_orchestrator.core.definition.models import (
    DEFAULT_RETRY_ON,
    RetryPolicy,
    definition_json_schema,
)
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.core.retry import (
    RetryDecision,
    backoff,
    decide,
    matching_entry,
    next_delay,
    parse_retry_after,
    should_retry,
)
from flowforge_orchestrator.errors import DefinitionError, PayloadTooLarge, StepError

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
YEAR = 365 * 86400.0
# No example database: nothing is written to the working tree, and every run is the same.
properties = settings(database=None, derandomize=True, deadline=None)


def error(category: str, *, retryable: bool = True, **details: Any) -> dict[str, Any]:
    return StepError("failed", category=category, retryable=retryable, details=details).to_dict()


def policy(**fields: Any) -> RetryPolicy:
    return RetryPolicy(**{"max_retries": 3, **fields})


# Which errors are retried -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_on", "category", "entry"),
    [
        (["http_5xx"], "http_503", "http_5xx"),
        (["http_5xx"], "http_500", "http_5xx"),
        (["http_5xx"], "http_599", "http_5xx"),
        (["http_5xx"], "http_429", None),
        (["http_4xx"], "http_429", "http_4xx"),
        (["http_503"], "http_503", "http_503"),
        (["http_503"], "http_502", None),
        (["http_429", "http_5xx"], "http_429", "http_429"),
        (["timeout"], "timeout", "timeout"),
        (["timeout"], "start_to_close_timeout", "timeout"),
        (["timeout"], "TimeoutError", None),
        (["connection_error"], "connection_error", "connection_error"),
        (["RateLimited"], "RateLimited", "RateLimited"),
        (["RateLimited"], "ratelimited", None),
        (["http_5xx"], "http_5xx", "http_5xx"),  # an odd category matches itself, no more
        ([], "timeout", None),
    ],
)
def test_matching_entry(retry_on: list[str], category: str, entry: str | None) -> None:
    assert matching_entry(retry_on, category) == entry


def test_max_retries_counts_retries_after_the_first_attempt() -> None:
    p = policy(max_retries=2)
    assert [should_retry(p, error("timeout"), n) for n in (1, 2, 3, 4)] == [
        True,
        True,
        False,
        False,
    ]
    assert not should_retry(policy(max_retries=0), error("timeout"), 1)


def test_not_retryable_is_never_retried() -> None:
    everything = policy(retry_on=["payload_too_large", "http_4xx", "expression_error"])
    too_large = PayloadTooLarge(step_id="s", what="its output", size=9, limit=1).to_dict()
    assert not should_retry(everything, too_large, 1)
    assert not should_retry(everything, error("http_404", retryable=False), 1)
    assert not should_retry(everything, error("expression_error", retryable=False), 1)


def test_missing_fields_leave_the_decision_to_retry_on() -> None:
    assert should_retry(policy(retry_on=["timeout"]), {"category": "timeout"}, 1)
    assert not should_retry(policy(), {"message": "no category"}, 1)
    assert should_retry(policy(retry_on=["error"]), {"message": "no category"}, 1)


def test_default_retry_on() -> None:
    p = policy()
    assert p.retry_on == list(DEFAULT_RETRY_ON)
    retried = ["timeout", "connection_error", "http_500", "http_503", "http_429"]
    assert all(should_retry(p, error(c), 1) for c in retried)
    assert not any(should_retry(p, error(c), 1) for c in ("http_400", "http_408", "ValueError"))


def test_attempts_start_at_one() -> None:
    with pytest.raises(ValueError, match="start at 1"):
        should_retry(policy(), error("timeout"), 0)
    with pytest.raises(ValueError, match="start at 1"):
        backoff(policy(), 0)


# Backoff and jitter -------------------------------------------------------------------------


def test_exponential_backoff_capped() -> None:
    p = policy(initial_interval=1, backoff_factor=2, max_interval=60, jitter=False)
    delays = [next_delay(p, n, rand=0.5, retry_after=None) for n in range(1, 10)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


@pytest.mark.parametrize(
    ("fields", "attempt", "expected"),
    [
        ({"initial_interval": 0.5, "backoff_factor": 3}, 3, 4.5),
        ({"backoff_factor": 1}, 50, 1.0),  # constant
        ({"initial_interval": 0}, 7, 0.0),  # retry at once
        ({"initial_interval": 120, "max_interval": 60}, 1, 60.0),  # the cap wins
        ({"backoff_factor": 2}, 10**6, 60.0),  # 2.0 ** 999999 overflows: capped, no error
        ({"initial_interval": 0, "backoff_factor": 2}, 10**6, 0.0),  # not 0 * inf
    ],
)
def test_backoff_edges(fields: dict[str, Any], attempt: int, expected: float) -> None:
    assert backoff(policy(**fields), attempt) == expected


def test_full_jitter_spans_zero_to_the_backoff() -> None:
    p = policy(initial_interval=10, jitter=True)
    assert next_delay(p, 2, rand=0.0, retry_after=None) == 0.0
    assert next_delay(p, 2, rand=0.25, retry_after=None) == 5.0
    assert next_delay(p, 2, rand=0.999, retry_after=None) == pytest.approx(19.98)
    for bad in (1.0, -0.1, math.nan):
        with pytest.raises(ValueError, match="rand"):
            next_delay(p, 1, rand=bad, retry_after=None)


def test_retry_after_takes_precedence_without_jitter_and_is_capped() -> None:
    p = policy(initial_interval=1, max_interval=60, jitter=True)
    assert next_delay(p, 1, rand=0.1, retry_after=30.0) == 30.0
    assert next_delay(p, 1, rand=0.1, retry_after=0.0) == 0.0
    assert next_delay(p, 5, rand=0.1, retry_after=3600.0) == 60.0
    for unusable in (-1.0, math.nan, math.inf):
        assert next_delay(p, 1, rand=0.5, retry_after=unusable) == 0.5


# Retry-After --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        ("3600", 3600.0),
        (" 120 ", 120.0),
        ("9" * 400, YEAR),  # bounded, and finite so the error dict stays valid JSON
        ("Wed, 01 Jan 2025 12:00:30 GMT", 30.0),  # IMF-fixdate
        ("Wednesday, 01-Jan-25 12:00:30 GMT", 30.0),  # obsolete RFC 850
        ("Wed Jan  1 12:00:30 2025", 30.0),  # obsolete asctime, GMT by definition
        ("Wed, 01 Jan 2025 11:00:00 GMT", 0.0),  # past
        ("Fri, 31 Dec 9999 23:59:59 GMT", YEAR),
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("+5", None),
        ("1.5", None),
        ("1e3", None),
        ("²", None),  # str.isdigit() says yes; RFC 9110 means ASCII digits
        ("١٢", None),
        ("Wed, 99 Foo 2025", None),
        ("Sat, 01 Jan 10000 00:00:00 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


# One decision -------------------------------------------------------------------------------


def test_decide_retries_with_backoff() -> None:
    p = policy(max_retries=2, initial_interval=2, jitter=False)
    assert decide(p, error("http_503"), 1, rand=0.3, now=NOW) == RetryDecision(
        retry=True, delay=2.0, reason="http_503 matches http_5xx: attempt 2 of 3 in 2s (backoff)"
    )
    second = decide(p, error("connection_error"), 2, rand=0.3, now=NOW)
    assert (second.retry, second.delay) == (True, 4.0)
    assert second.reason == "connection_error: attempt 3 of 3 in 4s (backoff)"


def test_decide_gives_up_and_says_why() -> None:
    p = policy(max_retries=1, retry_on=["timeout", "http_5xx", "http_429"])
    cases = {
        "retries exhausted: attempt 2 of 2 failed": (error("timeout"), 2),
        "not retried: the error (payload_too_large) is not retryable": (
            error("payload_too_large", retryable=False),
            1,
        ),
        "not retried: http_402 is not in retry_on [timeout, http_5xx, http_429]": (
            error("http_402", retryable=True),
            1,
        ),
    }
    for reason, (err, attempt) in cases.items():
        assert decide(p, err, attempt, rand=0.5, now=NOW) == RetryDecision(False, 0.0, reason)


def test_decide_says_when_a_listed_error_is_not_retried_for_want_of_retries() -> None:
    none = policy(max_retries=0)  # the default: no retry policy
    assert decide(none, error("http_503"), 1, rand=0.5, now=NOW).reason == (
        "not retried: http_503 matches http_5xx in retry_on, but the step allows no retries "
        "(max_retries: 0)"
    )
    assert decide(none, error("timeout"), 1, rand=0.5, now=NOW).reason == (
        "not retried: timeout in retry_on, but the step allows no retries (max_retries: 0)"
    )


def test_decide_honours_retry_after_from_the_error_details() -> None:
    p = policy(max_interval=120, jitter=True)
    seconds = decide(p, error("http_429", retry_after=45.0), 1, rand=0.5, now=NOW)
    assert (seconds.delay, seconds.reason.endswith("(Retry-After)")) == (45.0, True)
    # A header value as the server sent it (a custom step type may pass it on unparsed).
    header = error("http_503", retry_after="Wed, 01 Jan 2025 12:01:00 GMT")
    assert decide(p, header, 1, rand=0.5, now=NOW).delay == 60.0
    assert decide(p, error("http_503", retry_after=7200), 1, rand=0.5, now=NOW).delay == 120.0
    # Unusable values fall back to the backoff: 0.5 * initial_interval of 1s.
    for unusable in (True, -3, "later", None, [5]):
        decision = decide(p, error("http_503", retry_after=unusable), 1, rand=0.5, now=NOW)
        assert (decision.delay, decision.reason.endswith("(backoff)")) == (0.5, True)


def test_retry_after_does_not_make_an_error_retryable() -> None:
    not_listed = decide(policy(), error("http_400", retry_after=5), 1, rand=0.5, now=NOW)
    assert not not_listed.retry


# Validation of retry_on ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry", ["timeout", "http_5xx", "http_4xx", "http_503", "http_100", "RateLimited", "_E2"]
)
def test_valid_retry_on_entries(entry: str) -> None:
    assert RetryPolicy(retry_on=[entry]).retry_on == [entry]


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("HTTP_503", "is not an HTTP category"),
        ("http_5XX", "is not an HTTP category"),
        ("http_600", "is not an HTTP category"),
        ("http_50", "is not an HTTP category"),
        ("http_server_error", "is not an HTTP category"),
        ("errors.RateLimited", "without its module"),
        ("", "is not an error category"),
        ("5xx", "is not an error category"),
    ],
)
def test_invalid_retry_on_entries_are_located(entry: str, says: str) -> None:
    data = {
        "name": "wf",
        "version": 1,
        "steps": [
            {
                "id": "a",
                "type": "http",
                "with": {"url": "https://x.test/"},
                "retry": {"retry_on": ["timeout", entry]},
            }
        ],
    }
    with pytest.raises(DefinitionError) as info:
        parse_definition(data)
    (found,) = info.value.problems
    assert (found.step_id, found.field) == ("a", "retry.retry_on[1]")
    assert says in found.message


def test_backoff_factor_must_be_finite() -> None:
    # Definitions are stored as JSONB, which cannot hold Infinity.
    with pytest.raises(ValueError, match="finite"):
        RetryPolicy(backoff_factor=math.inf)


def test_retry_on_pattern_in_the_json_schema() -> None:
    retry = definition_json_schema()["$defs"]["RetryPolicy"]["properties"]["retry_on"]
    assert retry["items"]["pattern"].startswith("^(http_[1-5]")


# Properties ---------------------------------------------------------------------------------

policies = st.builds(
    RetryPolicy,
    max_retries=st.integers(0, 50),
    initial_interval=st.floats(0, 1e4),
    backoff_factor=st.floats(1, 100),
    max_interval=st.floats(0, 1e6),
    jitter=st.booleans(),
)
attempts = st.integers(1, 10_000)
rands = st.floats(0, 1, exclude_max=True)
any_retry_after = st.none() | st.floats(allow_nan=True, allow_infinity=True)
categories = st.sampled_from(
    ["timeout", "connection_error", "http_429", "http_500", "http_503", "http_404", "Boom"]
) | st.integers(100, 599).map(lambda s: f"http_{s}")


@properties
@given(policies, attempts, rands, any_retry_after)
def test_delay_is_never_negative_nor_over_max_interval(
    p: RetryPolicy, attempt: int, rand: float, retry_after: float | None
) -> None:
    delay = next_delay(p, attempt, rand=rand, retry_after=retry_after)
    assert 0.0 <= delay <= p.max_interval
    assert math.isfinite(delay)


@properties
@given(policies.map(lambda p: p.model_copy(update={"jitter": False})), attempts, rands)
def test_delay_without_jitter_is_monotone_and_exponential(
    p: RetryPolicy, attempt: int, rand: float
) -> None:
    delay = next_delay(p, attempt, rand=rand, retry_after=None)
    assert delay <= next_delay(p, attempt + 1, rand=rand, retry_after=None)
    assert delay == backoff(p, attempt)
    if attempt <= 20:
        expected = min(p.initial_interval * p.backoff_factor ** (attempt - 1), p.max_interval)
        assert delay == pytest.approx(expected)


@properties
@given(policies.map(lambda p: p.model_copy(update={"jitter": True})), attempts, rands)
def test_jittered_delay_is_the_backoff_scaled_by_rand(
    p: RetryPolicy, attempt: int, rand: float
) -> None:
    ceiling = backoff(p, attempt)
    delay = next_delay(p, attempt, rand=rand, retry_after=None)
    assert 0.0 <= delay <= ceiling
    assert delay == pytest.approx(rand * ceiling)


@properties
@given(policies, attempts, rands, st.floats(0, 1e9))
def test_retry_after_is_honoured_up_to_max_interval(
    p: RetryPolicy, attempt: int, rand: float, retry_after: float
) -> None:
    assert next_delay(p, attempt, rand=rand, retry_after=retry_after) == min(
        retry_after, p.max_interval
    )


@properties
@given(policies, categories, st.booleans(), attempts)
def test_should_retry_respects_max_retries_retryable_and_retry_on(
    p: RetryPolicy, category: str, retryable: bool, attempt: int
) -> None:
    err = error(category, retryable=retryable)
    expected = (
        retryable and attempt <= p.max_retries and matching_entry(p.retry_on, category) is not None
    )
    assert should_retry(p, err, attempt) is expected


@properties
@given(policies, categories, st.booleans(), attempts, rands, any_retry_after)
def test_decide_agrees_with_should_retry_and_next_delay(
    p: RetryPolicy,
    category: str,
    retryable: bool,
    attempt: int,
    rand: float,
    retry_after: float | None,
) -> None:
    err = error(category, retryable=retryable, retry_after=retry_after)
    decision = decide(p, err, attempt, rand=rand, now=NOW)
    assert decision.retry is should_retry(p, err, attempt)
    expected = next_delay(p, attempt, rand=rand, retry_after=retry_after)
    assert decision.delay == (expected if decision.retry else 0.0)
    assert decision.reason


@properties
@given(st.integers(100, 599), st.integers(1, 5))
def test_http_class_matches_exactly_its_statuses(status: int, klass: int) -> None:
    matched = matching_entry([f"http_{klass}xx"], f"http_{status}") is not None
    assert matched is (status // 100 == klass)


@properties
@given(st.text())
def test_parse_retry_after_never_fails_and_is_bounded(value: str) -> None:
    seconds = parse_retry_after(value, NOW)
    assert seconds is None or 0.0 <= seconds <= YEAR


@properties
@given(st.integers(0, 10**12))
def test_parse_retry_after_delta_seconds(n: int) -> None:
    assert parse_retry_after(str(n), NOW) == min(float(n), YEAR)


@properties
@given(st.integers(-(10**8), 10**8))
def test_parse_retry_after_http_date(offset: int) -> None:
    when = format_datetime(NOW + timedelta(seconds=offset), usegmt=True)
    assert parse_retry_after(when, NOW) == min(max(0.0, float(offset)), YEAR)
