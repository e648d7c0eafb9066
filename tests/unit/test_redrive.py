"""Redrive: which steps run again, and a redriven run picks up where it should (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from flowforge_orchestrator.core.graph.checkpoint import read_checkpoint
from flowforge_orchestrator.core.graph.nodes import attempt_id
from flowforge_orchestrator.core.graph.run import RunState
from flowforge_orchestrator.core.redrive import redrive_checkpoint
from flowforge_orchestrator.core.state import RunStatus, StepStatus
from flowforge_orchestrator.errors import RedriveError
from tests.unit.test_graph import LIMITS, RUN_ID, Recorder, at, failed, http, ok, workflow

CHAIN = workflow(http("a"), http("b", "a"), http("c", "b"))


def _failed_chain() -> tuple[Recorder, dict[str, Any]]:
    """a succeeded, b failed (c was cancelled with the run)."""
    run, rec = (
        RunState(run_id=RUN_ID, workflow=CHAIN, version=3, input={}, limits=LIMITS),
        Recorder(),
    )
    run.start(at(0))
    rec.drain(run)
    rec.apply(run, ok(rec.dispatches[-1], {"a": 1}), at(1))
    rec.apply(run, failed(rec.dispatches[-1], {"message": "b broke", "retryable": False}), at(2))
    assert rec.status is RunStatus.FAILED
    return rec, rec.checkpoint


def test_the_failed_steps_and_what_follows_run_again_and_the_rest_is_kept() -> None:
    _, checkpoint = _failed_chain()
    assert checkpoint["steps"]["a"] == "S1"
    redriven = redrive_checkpoint(CHAIN, checkpoint)
    assert redriven["steps"] == {"a": "S1", "b": "p1"}  # c had no attempt: just pending
    assert redriven["g"] == 1
    assert redriven["seq"] == checkpoint["seq"]


def test_from_a_step_runs_it_and_everything_after_it() -> None:
    _, checkpoint = _failed_chain()
    assert redrive_checkpoint(CHAIN, checkpoint, from_step="a")["steps"] == {
        "a": "p1",
        "b": "p1",
    }


def test_what_cannot_be_redriven_is_refused_with_the_reason() -> None:
    _, checkpoint = _failed_chain()
    with pytest.raises(RedriveError, match="no step 'zz'"):
        redrive_checkpoint(CHAIN, checkpoint, from_step="zz")
    with pytest.raises(RedriveError, match="no step failed"):
        redrive_checkpoint(CHAIN, {"v": 2, "seq": 3, "steps": {"a": "S1"}})


def test_a_condition_around_a_failure_runs_again_whole_and_a_parallel_keeps_good_branches() -> None:
    wf = workflow(
        {
            "id": "route",
            "type": "condition",
            "if": "true",
            "then": [http("x")],
            "else": [http("y")],
        },
        {
            "id": "both",
            "type": "parallel",
            "depends_on": ["route"],
            "branches": [[http("good")], [http("bad")]],
        },
    )
    checkpoint = {
        "v": 2,
        "seq": 9,
        "deadline": "2024-05-01T13:00:00+00:00",
        "steps": {
            "route": {"s": "S", "n": 1, "b": "then"},
            "x": "S1",
            "y": "K",
            "both": {"s": "F", "n": 1, "e": {"message": "join"}},
            "good": "S1",
            "bad": {"s": "F", "n": 2, "e": {"message": "no"}},
        },
    }
    redriven = redrive_checkpoint(wf, checkpoint)
    assert redriven["steps"] == {"route": {"s": "S", "n": 1, "b": "then"}, "x": "S1", "y": "K"} | {
        "both": "p1",
        "good": "S1",
        "bad": "p2",
    }
    assert "deadline" not in redriven  # the run timeout counts again from the new start
    from_route = redrive_checkpoint(wf, checkpoint, from_step="route")["steps"]
    assert from_route == {"route": "p1", "x": "p1", "both": "p1", "good": "S1", "bad": "p2"}


def test_a_redriven_run_reruns_only_the_reset_steps_under_new_attempt_ids() -> None:
    first, checkpoint = _failed_chain()
    run = RunState(
        run_id=RUN_ID,
        workflow=CHAIN,
        version=3,
        input={},
        limits=LIMITS,
        status=RunStatus.PENDING,
        checkpoint=redrive_checkpoint(CHAIN, checkpoint),
        results=first.results,
    )
    rec = Recorder(results=dict(first.results))
    run.start(at(10))
    rec.drain(run)
    started = rec.events[0]
    assert (started.type, started.seq, started.data["redrive"]) == (
        "workflow.started",
        checkpoint["seq"] + 1,
        1,
    )
    [b] = rec.dispatches
    assert (b.step_id, b.attempt) == ("b", 2)
    assert b.attempt_id == attempt_id(RUN_ID, "b", 2, 1)
    assert b.attempt_id not in first.results
    rec.apply(run, ok(b, {"b": 2}), at(11))
    [c] = [d for d in rec.dispatches if d.step_id == "c"]
    assert c.attempt_id == attempt_id(RUN_ID, "c", 1, 1)
    rec.apply(run, ok(c, "C"), at(12))
    assert rec.status is RunStatus.COMPLETED
    assert rec.output == {"c": "C"}
    assert rec.checkpoint["steps"] == {"a": "S1", "b": {"s": "S", "n": 2, "g": 1}} | {
        "c": {"s": "S", "n": 1, "g": 1}
    }


DIAMOND = workflow(http("a"), http("b"), http("c", "a", "b"))


def test_from_a_step_also_runs_again_the_cancelled_upstreams_its_dependents_need() -> None:
    """a failed, and the failure cancelled its sibling b: `--from a` must run b again too,
    or c (which needs a and b) would start while b is still cancelled."""
    run = RunState(run_id=RUN_ID, workflow=DIAMOND, version=1, input={}, limits=LIMITS)
    rec = Recorder()
    run.start(at(0))
    rec.drain(run)
    a = next(d for d in rec.dispatches if d.step_id == "a")
    rec.apply(run, failed(a, {"message": "a broke", "retryable": False}), at(1))
    assert rec.status is RunStatus.FAILED
    assert read_checkpoint(rec.checkpoint).steps["b"].status is StepStatus.CANCELLED
    for redriven in (
        redrive_checkpoint(DIAMOND, rec.checkpoint, from_step="a"),
        redrive_checkpoint(DIAMOND, rec.checkpoint),
    ):
        steps = read_checkpoint(redriven).steps
        assert steps["a"].status is StepStatus.PENDING
        assert steps["b"].status is StepStatus.PENDING, redriven
        assert "c" not in steps or steps["c"].status is StepStatus.PENDING
