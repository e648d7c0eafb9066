"""The checkpoint format read on its own: entries, version rules, packed fan-outs, redrive."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from flowforge_orchestrator.core.graph.checkpoint import (
    CHECKPOINT_VERSION,
    carries_incarnation,
    for_redrive,
    read_checkpoint,
    unpack,
)
from flowforge_orchestrator.core.graph.run import CompiledWorkflow, RunState
from flowforge_orchestrator.core.state import StepStatus
from tests.unit.test_graph import LIMITS, RUN_ID, T0, at, http, ok, workflow


def test_a_run_that_never_started_reads_as_empty() -> None:
    nothing: tuple[dict[str, Any] | None, ...] = (None, {})
    for saved in nothing:
        empty = read_checkpoint(saved)
        assert (empty.seq, empty.generation, empty.deadline, empty.steps) == (0, 0, None, {})


def test_short_and_full_entries_read_back_every_field() -> None:
    error = {"message": "boom", "category": "join_failed"}
    saved = read_checkpoint(
        {
            "v": 3,
            "seq": 12,
            "g": 1,
            "deadline": "2024-05-01T13:00:00+00:00",
            "steps": {
                "order": "S1",
                "again": "p2",
                "route": {"s": "r", "n": 1, "b": "then", "t": "2024-05-01T12:00:30+00:00"},
                "charge": {"s": "F", "n": 3, "e": error, "g": 1, "x": 4},
            },
        }
    )
    assert (saved.seq, saved.generation, saved.deadline) == (12, 1, at(3600))
    steps = saved.steps
    assert (steps["order"].status, steps["order"].attempt) == (StepStatus.SUCCEEDED, 1)
    assert (steps["again"].status, steps["again"].attempt) == (StepStatus.PENDING, 2)
    assert (steps["route"].branch, steps["route"].fire_at) == ("then", at(30))
    charge = steps["charge"]
    assert (charge.status, charge.error, charge.generation, charge.items) == (
        StepStatus.FAILED,
        error,
        1,
        4,
    )


def test_a_version_1_entry_keeps_its_stored_attempt_id_and_full_status_name() -> None:
    attempt = UUID("00000000-0000-4000-8000-000000000002")
    saved = read_checkpoint(
        {"v": 1, "steps": {"a": {"s": "dispatched", "n": 2, "a": str(attempt)}}}
    )
    entry = saved.steps["a"]
    assert (entry.status, entry.attempt, entry.attempt_id) == (StepStatus.DISPATCHED, 2, attempt)


def test_only_a_fresh_run_or_one_saved_at_the_current_version_carries_its_incarnation() -> None:
    assert CHECKPOINT_VERSION == 3
    assert carries_incarnation(None) and carries_incarnation({})
    assert carries_incarnation({"v": 3, "seq": 1, "steps": {}})
    assert not carries_incarnation({"v": 2, "seq": 1, "steps": {}})
    assert not carries_incarnation({"v": 1, "seq": 1, "steps": {}})


def test_the_version_written_follows_the_incarnation_and_stays_through_a_restore() -> None:
    wf = workflow(http("a"))
    fresh = new_state(wf, incarnation="2024-05-01T12:00:00")
    fresh.start(T0)
    assert fresh.checkpoint()["v"] == 3
    older = new_state(wf, checkpoint={"v": 2, "seq": 0, "steps": {}}, incarnation="x")
    assert older.checkpoint()["v"] == 2  # its attempt ids lack the incarnation: so do new ones


def test_packed_elements_unpack_to_what_the_run_holds() -> None:
    wf = workflow({"id": "fe", "type": "parallel", "for_each": "[1, 2, 3, 4]", "step": http("el")})
    run = new_state(wf)
    run.start(T0)
    changes = run.take_changes()
    assert changes is not None
    first = {d.step_id: d for d in changes.dispatches}["el[1]"]
    assert run.apply_result(ok(first, "one"), at(2))
    fan_out = read_checkpoint(run.checkpoint()).steps["fe"]
    assert fan_out.elements == "dSdd"
    for index in range(4):
        element = unpack(fan_out, index, generation=0)
        assert element is not None
        assert element.status is run.step_status(f"el[{index}]")
        assert element.attempt == 1
    assert unpack(fan_out, 4, generation=0) is None  # past the end


def test_a_pending_letter_unpacks_to_nothing_and_attempts_past_one_come_from_na() -> None:
    saved = read_checkpoint(
        {"v": 3, "steps": {"fe": {"s": "r", "n": 1, "x": 3, "i": "pdS", "na": {"2": 4}}}}
    )
    fan_out = saved.steps["fe"]
    assert unpack(fan_out, 0, generation=1) is None
    running = unpack(fan_out, 1, generation=1)
    done = unpack(fan_out, 2, generation=1)
    assert running is not None and done is not None
    assert (running.status, running.attempt, running.generation) == (StepStatus.DISPATCHED, 1, 1)
    assert (done.status, done.attempt) == (StepStatus.SUCCEEDED, 4)


def test_for_redrive_drops_resets_moves_the_generation_on_and_leaves_the_original_alone() -> None:
    saved = {
        "v": 3,
        "seq": 9,
        "g": 1,
        "deadline": "2024-05-01T13:00:00+00:00",
        "steps": {"a": "S1", "b": "F2", "c": "C0", "fe": {"s": "F", "n": 1}, "el[0]": "F1"},
    }
    before = repr(saved)
    out = for_redrive(saved, dropped={"el[0]"}, rerun={"b": 2, "c": 0, "fe": 1})
    assert out == {"v": 3, "seq": 9, "g": 2, "steps": {"a": "S1", "b": "p2", "fe": "p1"}}
    assert repr(saved) == before


def new_state(
    wf: CompiledWorkflow,
    *,
    checkpoint: dict[str, Any] | None = None,
    incarnation: str | None = None,
) -> RunState:
    return RunState(
        run_id=RUN_ID,
        workflow=wf,
        version=3,
        input={},
        limits=LIMITS,
        checkpoint=checkpoint,
        incarnation=incarnation,
    )
