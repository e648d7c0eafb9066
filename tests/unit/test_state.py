"""Run and step state machines: every legal and every illegal transition, final statuses."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from enum import StrEnum

import pytest

from flowforge_orchestrator.core.state import (
    IllegalTransition,
    RunStatus,
    StepStatus,
    check_run,
    check_step,
)

R = RunStatus
S = StepStatus

# The oracle, written out by hand from the design (not derived from state.py's tables).
RUN_LEGAL: set[tuple[RunStatus, RunStatus]] = {
    (R.PENDING, R.RUNNING),
    (R.PENDING, R.FAILED),  # a run the engine cannot build is failed before it starts
    (R.PENDING, R.CANCELLED),
    (R.RUNNING, R.COMPLETED),
    (R.RUNNING, R.FAILED),
    (R.RUNNING, R.CANCELLED),
}

STEP_LEGAL: set[tuple[StepStatus, StepStatus]] = {
    (S.PENDING, S.DISPATCHED),
    (S.PENDING, S.RUNNING),
    (S.PENDING, S.SUCCEEDED),  # an inline step finishes in one move
    (S.PENDING, S.FAILED),  # e.g. its parameters cannot be rendered
    (S.PENDING, S.SKIPPED),
    (S.PENDING, S.CANCELLED),
    (S.DISPATCHED, S.RUNNING),
    (S.DISPATCHED, S.RETRYING),  # the attempt failed and another follows after a backoff
    (S.DISPATCHED, S.FAILED),
    (S.DISPATCHED, S.TIMED_OUT),
    (S.DISPATCHED, S.CANCELLED),
    (S.RUNNING, S.RETRYING),
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.TIMED_OUT),
    (S.RUNNING, S.CANCELLED),
    (S.RETRYING, S.DISPATCHED),  # the next attempt
    (S.RETRYING, S.FAILED),  # e.g. its parameters cannot be rendered any more
    (S.RETRYING, S.CANCELLED),
}

RUN_PAIRS = list(itertools.product(RunStatus, repeat=2))
STEP_PAIRS = list(itertools.product(StepStatus, repeat=2))


def _ids(pairs: Sequence[tuple[StrEnum, ...]]) -> list[str]:
    return ["->".join(pair) for pair in pairs]


@pytest.mark.parametrize(("current", "target"), sorted(RUN_LEGAL), ids=_ids(sorted(RUN_LEGAL)))
def test_legal_run_transitions_pass(current: RunStatus, target: RunStatus) -> None:
    check_run(current, target)


ILLEGAL_RUN = [p for p in RUN_PAIRS if p not in RUN_LEGAL]


@pytest.mark.parametrize(("current", "target"), ILLEGAL_RUN, ids=_ids(ILLEGAL_RUN))
def test_illegal_run_transitions_raise(current: RunStatus, target: RunStatus) -> None:
    with pytest.raises(IllegalTransition) as info:
        check_run(current, target)
    assert str(info.value) == f"run cannot go from {current} to {target}"


@pytest.mark.parametrize(("current", "target"), sorted(STEP_LEGAL), ids=_ids(sorted(STEP_LEGAL)))
def test_legal_step_transitions_pass(current: StepStatus, target: StepStatus) -> None:
    check_step("charge", current, target)


ILLEGAL_STEP = [p for p in STEP_PAIRS if p not in STEP_LEGAL]


@pytest.mark.parametrize(("current", "target"), ILLEGAL_STEP, ids=_ids(ILLEGAL_STEP))
def test_illegal_step_transitions_raise_naming_the_step(
    current: StepStatus, target: StepStatus
) -> None:
    with pytest.raises(IllegalTransition) as info:
        check_step("charge", current, target)
    assert str(info.value) == f"step 'charge' cannot go from {current} to {target}"


def test_the_oracle_covers_every_pair() -> None:
    # Guards the parametrization itself: legal + illegal is every pair, nothing twice.
    assert len(RUN_LEGAL) + len(ILLEGAL_RUN) == len(RunStatus) ** 2 == 25
    assert len(STEP_LEGAL) + len(ILLEGAL_STEP) == len(StepStatus) ** 2 == 81


@pytest.mark.parametrize("status", [R.COMPLETED, R.FAILED, R.CANCELLED])
def test_a_finished_run_goes_nowhere(status: RunStatus) -> None:
    assert status.finished
    for target in RunStatus:
        with pytest.raises(IllegalTransition):
            check_run(status, target)


@pytest.mark.parametrize("status", [S.SUCCEEDED, S.FAILED, S.TIMED_OUT, S.SKIPPED, S.CANCELLED])
def test_a_finished_step_goes_nowhere(status: StepStatus) -> None:
    assert status.finished
    for target in StepStatus:
        with pytest.raises(IllegalTransition):
            check_step("s", status, target)


def test_finished_properties() -> None:
    assert {s for s in RunStatus if s.finished} == {R.COMPLETED, R.FAILED, R.CANCELLED}
    assert {s for s in StepStatus if s.finished} == {
        S.SUCCEEDED,
        S.FAILED,
        S.TIMED_OUT,
        S.SKIPPED,
        S.CANCELLED,
    }


def test_statuses_are_their_stored_strings() -> None:
    # The database CHECK constraints and the checkpoint use these exact values.
    assert [s.value for s in RunStatus] == [
        "pending",
        "running",
        "completed",
        "failed",
        "cancelled",
    ]
    assert [s.value for s in StepStatus] == [
        "pending",
        "dispatched",
        "running",
        "retrying",
        "succeeded",
        "failed",
        "timed_out",
        "skipped",
        "cancelled",
    ]
    assert RunStatus("running") is R.RUNNING
    assert StepStatus("timed_out") is S.TIMED_OUT


def test_illegal_transition_is_a_runtime_error() -> None:
    # An engine bug, not a user error: not part of the FlowForgeError tree.
    assert issubclass(IllegalTransition, RuntimeError)
