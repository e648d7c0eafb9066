"""Retry arithmetic: whether a failed attempt is tried again, and after how long.

Pure: no I/O, no clock, no global random. The caller passes `now` and a uniform `rand` in
[0, 1), so a decision is reproducible (and testable) from its inputs alone.

Which errors are retried (`should_retry`), checked in this order:

1. An error that says `"retryable": false` is never retried, whatever `retry_on` says: it
   marks what another attempt cannot fix (payload too large, expression errors, invalid
   params). A missing `retryable` counts as true: `retry_on` then decides.
2. Its `category` must match an entry of `retry_on`:
   * `http_5xx` (any `http_Nxx`) matches every `http_5NN`; `http_503` matches only 503;
   * `timeout` matches `timeout` (the worker's and the http step's deadline) and every
     category ending in `_timeout` (the orchestrator's own deadlines, such as
     `start_to_close_timeout`; whether one may be retried is its `retryable` flag);
   * anything else matches exactly: `connection_error`, or the class name of an exception
     a custom step function raised (`RateLimited`), case-sensitive like Python names.
3. `attempt` (1-based, the attempt that just failed) must be at most `max_retries`: a
   policy allows `max_retries + 1` attempts in all.

How long to wait (`next_delay`): `initial_interval * backoff_factor ** (attempt - 1)`, capped
at `max_interval`, then "full jitter" when `jitter` is on. A `Retry-After` (in the error's
`details.retry_after`) replaces that, bounded by `max_interval` and never jittered: the
server said when it will be ready. It counts for any error that is retried, not only 429
and 503, so a custom step type may set it too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowforge_orchestrator.core.definition.models import RetryPolicy

__all__ = [
    "RetryDecision",
    "backoff",
    "decide",
    "matching_entry",
    "next_delay",
    "parse_retry_after",
    "should_retry",
]

_HTTP_CLASS = re.compile(r"http_([1-5])xx")
_HTTP_STATUS = re.compile(r"http_([1-5])\d\d")
_DELTA_SECONDS = re.compile(r"[0-9]+")  # RFC 9110: 1*DIGIT, ASCII only
# A Retry-After further out than this is as good as "later than any max_interval"; keeping
# it finite keeps the error dict storable as JSON (JSONB refuses Infinity).
_RETRY_AFTER_CEILING = 365 * 86400.0


@dataclass(frozen=True)
class RetryDecision:
    """What to do after a failed attempt: retry after `delay` seconds, or give up; `reason`
    says why in words fit for a run's history."""

    retry: bool
    delay: float
    reason: str


def matching_entry(retry_on: list[str], category: str) -> str | None:
    """The first entry of `retry_on` that matches `category`, or None."""
    for entry in retry_on:
        if entry == category:
            return entry
        if entry == "timeout" and category.endswith("_timeout"):
            return entry
        http_class = _HTTP_CLASS.fullmatch(entry)
        status = _HTTP_STATUS.fullmatch(category)
        if http_class and status and http_class[1] == status[1]:
            return entry
    return None


def _refusal(policy: RetryPolicy, error: dict[str, Any], attempt: int) -> str | None:
    """Why the attempt must not be retried, or None when it may be. The words name what
    decided it, since an error's own `retryable: true` only means it may be retried."""
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, not {attempt}")
    category = str(error.get("category", "error"))
    if error.get("retryable", True) is False:
        return f"not retried: the error ({category}) is not retryable"
    entry = matching_entry(policy.retry_on, category)
    if entry is None:
        return f"not retried: {category} is not in retry_on [{', '.join(policy.retry_on)}]"
    if policy.max_retries == 0:
        why = category if entry == category else f"{category} matches {entry}"
        return f"not retried: {why} in retry_on, but the step allows no retries (max_retries: 0)"
    if attempt > policy.max_retries:
        return f"retries exhausted: attempt {attempt} of {policy.max_retries + 1} failed"
    return None


def should_retry(policy: RetryPolicy, error: dict[str, Any], attempt: int) -> bool:
    """Whether attempt number `attempt` (1-based), which failed with `error`, is retried."""
    return _refusal(policy, error, attempt) is None


def backoff(policy: RetryPolicy, attempt: int) -> float:
    """The delay before the retry of attempt `attempt` without jitter: the exponential
    backoff capped at `max_interval`. The ceiling that jitter draws below."""
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, not {attempt}")
    if policy.initial_interval == 0:
        return 0.0
    try:
        raw = policy.initial_interval * policy.backoff_factor ** (attempt - 1)
    except OverflowError:
        raw = math.inf
    return min(raw, policy.max_interval)


def next_delay(
    policy: RetryPolicy, attempt: int, *, rand: float, retry_after: float | None
) -> float:
    """Seconds to wait before the next attempt, after attempt `attempt` failed.

    `rand` is uniform in [0, 1). With `jitter`, the delay is `rand * backoff(policy, attempt)`.
    A finite, non-negative `retry_after` takes precedence, bounded by `max_interval`.
    """
    if not 0.0 <= rand < 1.0:
        raise ValueError(f"rand must be in [0, 1), not {rand}")
    if retry_after is not None and _usable(retry_after):
        return min(retry_after, policy.max_interval)
    ceiling = backoff(policy, attempt)
    # Full jitter, not equal jitter: AWS's "Exponential Backoff And Jitter" measured both
    # against many clients retrying one contended service and found equal jitter the loser
    # (more work and longer completion than full jitter). Spreading retries over the whole
    # [0, ceiling) is what breaks up the herd of steps that failed together on one outage.
    return rand * ceiling if policy.jitter else ceiling


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a `Retry-After` value, delta-seconds or HTTP-date; None if unusable.

    A date in the past gives 0; negative, fractional or garbage values give None. `now` must
    be timezone-aware.
    """
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return min(float(value), _RETRY_AFTER_CEILING)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # HTTP-dates are GMT
    return min(max(0.0, (when - now).total_seconds()), _RETRY_AFTER_CEILING)


def _retry_after(error: dict[str, Any], now: datetime) -> float | None:
    """`details.retry_after` of an error: seconds (the http step's form) or a header value;
    None when absent or unusable (negative, not finite, another type)."""
    details = error.get("details")
    value = details.get("retry_after") if isinstance(details, dict) else None
    if isinstance(value, str):
        return parse_retry_after(value, now)
    if isinstance(value, int | float) and not isinstance(value, bool) and _usable(value):
        return float(value)
    return None


def _usable(retry_after: float) -> bool:
    return retry_after >= 0 and math.isfinite(retry_after)


def decide(
    policy: RetryPolicy, error: dict[str, Any], attempt: int, *, rand: float, now: datetime
) -> RetryDecision:
    """Retry or give up after attempt `attempt` (1-based) failed with `error` (a
    `StepError.to_dict()`); `rand` uniform in [0, 1), `now` timezone-aware. The step's
    error carries `reason` as its `retry_decision`."""
    refusal = _refusal(policy, error, attempt)
    if refusal is not None:
        return RetryDecision(retry=False, delay=0.0, reason=refusal)
    retry_after = _retry_after(error, now)
    delay = next_delay(policy, attempt, rand=rand, retry_after=retry_after)
    category = str(error.get("category", "error"))
    entry = matching_entry(policy.retry_on, category)
    why = category if entry == category else f"{category} matches {entry}"
    source = "Retry-After" if retry_after is not None else "backoff"
    return RetryDecision(
        retry=True,
        delay=delay,
        reason=f"{why}: attempt {attempt + 1} of {policy.max_retries + 1} "
        f"in {round(delay, 3):g}s ({source})",
    )
