"""A big fan-out's element states in parts: a commit carries the parts that changed, the
run row's checkpoint keeps the fan-out's entry without its letters, and a restore from
the parts (or from letters saved inline before parts existed) gives the same state."""

from __future__ import annotations

import json
import random
from typing import Any
from uuid import UUID

from flowforge_orchestrator.core.graph.checkpoint import with_parts
from flowforge_orchestrator.core.graph.packing import LETTERS, PART_SIZE
from flowforge_orchestrator.core.graph.run import RunState
from flowforge_orchestrator.core.records import CheckpointPart, Dispatch, Limits, RunChanges
from flowforge_orchestrator.core.state import RunStatus, StepStatus
from tests.unit.test_graph import (
    RUN_ID,
    Recorder,
    at,
    failed,
    http,
    ok,
    workflow,
)

RETRY = {"max_retries": 1, "initial_interval": "10s", "jitter": False}
BUSY = {"message": "busy", "category": "http_503", "retryable": True}
BROKEN = {"message": "broken", "category": "http_4xx", "retryable": False}
# Room for the input of a big fan-out in the run's context.
BIG = Limits(max_output_bytes=10_000_000, max_context_bytes=10_000_000, default_timeout=30.0)


def fan_out(
    count: int, step: dict[str, Any] | None = None, **extra: Any
) -> tuple[RunState, Recorder]:
    each = {
        "id": "fe",
        "type": "parallel",
        "for_each": "input.items",
        "step": step or http("el", retry=RETRY, continue_on_failure=True),
        **extra,
    }
    run = RunState(
        run_id=RUN_ID,
        workflow=workflow(each),
        version=3,
        input={"items": list(range(count))},
        limits=BIG,
    )
    rec = Recorder()
    run.start(at(0))
    rec.drain(run)
    return run, rec


def reference(run: RunState) -> dict[str, Any]:
    """The fan-out's entry and its elements saved alone, packed from every element as the
    checkpoint did before parts (the whole fan-out at each commit)."""
    packing = run._packed["fe"]
    saved = run.checkpoint()["steps"]
    codes, attempts, alone = [], {}, {}
    for index, element in enumerate(packing.node.elements):
        if element.status is StepStatus.PENDING:
            codes.append("p")
        elif element.error is not None or element.status is StepStatus.RETRYING:
            codes.append("p")
            alone[element.key] = saved[element.key]
        else:
            codes.append(LETTERS[element.status])
            if element.attempt != 1:
                attempts[str(index)] = element.attempt
    return {"i": "".join(codes), "na": attempts, "alone": alone}


def joined_entry(rec: Recorder) -> dict[str, Any]:
    entry = rec.checkpoint["steps"]["fe"]
    alone = {k: v for k, v in rec.checkpoint["steps"].items() if k.startswith("el[")}
    return {"i": entry["i"], "na": entry.get("na", {}), "alone": alone}


def test_a_big_fan_out_stores_its_letters_in_parts_not_in_the_run_row() -> None:
    count = 2 * PART_SIZE + 100
    run, rec = fan_out(count)
    assert len(rec.dispatches) == count
    entry = rec.checkpoint["steps"]["fe"]
    assert entry["ic"] == PART_SIZE and entry["i"] == "d" * count
    assert sorted(rec.parts) == [("fe", 0), ("fe", 1), ("fe", 2)]
    assert [len(p.letters) for p in rec.parts.values()] == [PART_SIZE, PART_SIZE, 100]

    by_key = {d.step_id: d for d in rec.dispatches}
    run.apply_result(ok(by_key[f"el[{PART_SIZE + 5}]"], None), at(1))
    changes = run.take_changes()
    assert changes is not None
    stored = changes.checkpoint["steps"]["fe"]
    assert "i" not in stored and "na" not in stored and stored["x"] == count
    assert [(p.step, p.part, p.new) for p in changes.parts] == [("fe", 1, False)]
    assert changes.parts[0].letters == "d" * 5 + "S" + "d" * (PART_SIZE - 6)


def test_a_commit_costs_the_parts_it_changed_whatever_the_fan_out_size() -> None:
    sizes = []
    for count in (3 * PART_SIZE, 12 * PART_SIZE):
        run, rec = fan_out(count)
        by_key = {d.step_id: d for d in rec.dispatches}
        run.apply_result(ok(by_key["el[7]"], None), at(1))
        changes = run.take_changes()
        assert changes is not None
        assert [p.part for p in changes.parts] == [0]
        sizes.append(len(json.dumps(changes.checkpoint)) + len(changes.parts[0].letters))
    assert sizes[1] - sizes[0] == 2  # the digits of `seq` and `x`, not 37 parts more


def test_a_small_fan_out_keeps_its_letters_inline() -> None:
    run, rec = fan_out(3)
    by_key = {d.step_id: d for d in rec.dispatches}
    rec.apply(run, ok(by_key["el[1]"], None), at(1))
    assert rec.checkpoint["steps"]["fe"]["i"] == "dSd"
    assert "ic" not in rec.checkpoint["steps"]["fe"]
    assert rec.parts == {}


def test_elements_with_a_retry_or_an_error_are_still_saved_on_their_own() -> None:
    run, rec = fan_out(2 * PART_SIZE)
    by_key = {d.step_id: d for d in rec.dispatches}
    run.apply_result(failed(by_key["el[3]"], BUSY), at(2))
    run.apply_result(failed(by_key[f"el[{PART_SIZE}]"], BROKEN), at(2))
    changes = run.take_changes()
    assert changes is not None
    steps = changes.checkpoint["steps"]
    assert steps["el[3]"]["s"] == "w" and steps[f"el[{PART_SIZE}]"]["s"] == "F"
    assert {p.part: p.letters[:4] for p in changes.parts} == {0: "dddp", 1: "pddd"}
    run.fire_timers(at(12))  # el[3] tries again: its own entry goes, its attempt is packed
    again = run.take_changes()
    assert again is not None
    assert "el[3]" not in again.checkpoint["steps"]
    assert [(p.part, p.letters[:4], p.attempts) for p in again.parts] == [(0, "dddd", {"3": 2})]


def test_an_element_caught_when_its_deadline_passes_is_saved_on_its_own() -> None:
    # The timeout moves the element without a status change of its own (`catch`).
    run, rec = fan_out(3, http("el", timeout="5s", catch=[{"steps": [http("h")]}]))
    by_key = {d.step_id: d for d in rec.dispatches}
    rec.apply(run, ok(by_key["el[0]"], None), at(1))
    run.fire_timers(at(10))
    rec.drain(run)
    assert rec.checkpoint["steps"]["fe"]["i"] == "Spp"
    assert rec.checkpoint["steps"]["el[1]"]["c"] == 0
    assert run.checkpoint() == rec.checkpoint


def test_a_run_saved_with_letters_inline_restores_and_then_writes_parts() -> None:
    count = 2 * PART_SIZE + 3
    run, rec = fan_out(count)
    by_key = {d.step_id: d for d in rec.dispatches}
    rec.apply(run, ok(by_key["el[2]"], None), at(1))
    old_form = run.checkpoint()
    del old_form["steps"]["fe"]["ic"]  # as saved before parts: everything inline
    adopted = RunState(
        run_id=RUN_ID,
        workflow=run.workflow,
        version=3,
        input=run.input,
        limits=BIG,
        status=RunStatus.RUNNING,
        checkpoint=old_form,
        results=rec.results,
    )
    assert adopted.step_status("el[2]") is StepStatus.SUCCEEDED
    assert sorted(adopted.outstanding()) == sorted(run.outstanding())
    adopted.resume(at(3))
    changes = adopted.take_changes()
    assert changes is not None
    assert changes.checkpoint["steps"]["fe"]["ic"] == PART_SIZE
    assert "i" not in changes.checkpoint["steps"]["fe"]
    assert [(p.part, p.new) for p in changes.parts] == [(0, True), (1, True), (2, True)]
    rows = [(p.step, p.part, p.letters, p.attempts) for p in changes.parts]
    assert with_parts(changes.checkpoint, rows) == run.checkpoint() | {
        "seq": changes.checkpoint["seq"]
    }


def test_the_parts_join_back_into_the_entry_padding_what_is_missing() -> None:
    saved = {"v": 3, "seq": 4, "steps": {"fe": {"s": "r", "n": 1, "x": 5, "ic": 2}, "a": "S1"}}
    rows = [("fe", 0, "SS", {"1": 3}), ("fe", 2, "d", None), ("fe", 7, "zz", None)]
    assert with_parts(saved, rows) == {
        "v": 3,
        "seq": 4,
        "steps": {
            "fe": {"s": "r", "n": 1, "x": 5, "ic": 2, "i": "SSppd", "na": {"1": 3}},
            "a": "S1",
        },
    }
    assert with_parts(None, rows) is None
    assert with_parts({"v": 3, "steps": {"a": "S1"}}, rows) == {"v": 3, "steps": {"a": "S1"}}


def part(step: str, index: int, letters: str, *, new: bool = False) -> CheckpointPart:
    return CheckpointPart(step, index, letters, None, new)


def test_commits_written_as_one_keep_the_later_part_and_its_insert() -> None:
    first = RunChanges(RUN_ID, RunStatus.RUNNING, {}, parts=[part("a", 0, "d", new=True)])
    later = RunChanges(RUN_ID, RunStatus.RUNNING, {}, parts=[part("a", 0, "S"), part("a", 1, "p")])
    assert first.then(later).parts == [part("a", 0, "S", new=True), part("a", 1, "p")]

    ended = RunChanges(RUN_ID, RunStatus.RUNNING, {}, parts_dropped=["a"])
    both = first.then(ended)
    assert (both.parts, both.parts_dropped) == ([], ["a"])
    again = RunChanges(RUN_ID, RunStatus.RUNNING, {}, parts=[part("a", 0, "d", new=True)])
    assert (ended.then(again).parts_dropped, ended.then(again).parts) == ([], again.parts)


def test_a_finished_big_fan_out_drops_its_parts() -> None:
    run, rec = fan_out(PART_SIZE + 1)
    for dispatch in list(rec.dispatches):
        run.apply_result(ok(dispatch, None), at(1))
    changes = rec.drain(run)
    assert changes is not None and changes.parts_dropped == ["fe"]
    assert rec.status is RunStatus.COMPLETED and rec.parts == {}


def test_random_moves_keep_the_parts_equal_to_packing_every_element() -> None:
    seed = random.randrange(1, 2**32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    count = PART_SIZE + 277  # two parts, the second partial
    run, rec = fan_out(count, max_parallel=300)
    clock = 1.0
    out: dict[UUID, Dispatch] = {}
    for step in range(4000):
        if rec.status is not RunStatus.RUNNING:
            break
        clock += 1
        out.update((d.attempt_id, d) for d in rec.dispatches[len(out) :])
        pending = [out[a] for a in run.outstanding()]
        roll = rng.random()
        if roll < 0.01:
            run = rec.restore(run)
            run.resume(at(clock))
            rec.drain(run)
        elif roll < 0.1 or not pending:
            run.fire_timers(at(clock + 20))
            rec.drain(run)
        else:
            dispatch = rng.choice(pending)
            result = (ok(dispatch, None), failed(dispatch, BUSY), failed(dispatch, BROKEN))[
                rng.choice((0, 0, 0, 0, 1, 2))
            ]
            rec.apply(run, result, at(clock))
        if rec.status is RunStatus.RUNNING and step % 7 == 0:
            assert joined_entry(rec) == reference(run), f"seed {seed}, step {step}"
            assert run.checkpoint() == rec.checkpoint, f"seed {seed}, step {step}"
    assert rec.status is RunStatus.COMPLETED, f"seed {seed}"
