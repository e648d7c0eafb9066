"""Join policies of a parallel step: when its branches have decided the step's outcome.

Pure arithmetic over counts, so the rules are tested without a graph:

* `all` needs every branch, `any` one, `{at_least: n}` n successful branches;
* the join is *satisfied* as soon as enough branches succeeded (the others are cancelled);
* it is *impossible* as soon as too many failed for it to be satisfied; with `fail_fast`
  the step fails then (the others are cancelled), otherwise once every branch has finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from flowforge_orchestrator.core.definition.models import AtLeast

__all__ = ["JoinState", "JoinVerdict", "needed"]


class JoinVerdict(Enum):
    WAIT = "wait"
    SUCCEED = "succeed"
    FAIL = "fail"


def needed(join: str | AtLeast, total: int) -> int:
    """Successful branches the policy needs out of `total` (may exceed `total`)."""
    if isinstance(join, AtLeast):
        return join.at_least
    return total if join == "all" else 1


@dataclass
class JoinState:
    """Counts of a parallel step's branches; `verdict()` says what they decide."""

    total: int
    need: int
    fail_fast: bool
    succeeded: int = 0
    failed: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed

    def verdict(self) -> JoinVerdict:
        if self.succeeded >= self.need:
            return JoinVerdict.SUCCEED
        impossible = self.total - self.failed < self.need
        if impossible and (self.fail_fast or self.finished == self.total):
            return JoinVerdict.FAIL
        return JoinVerdict.WAIT
