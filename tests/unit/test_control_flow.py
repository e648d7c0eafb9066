"""Control flow in one run's graph: conditions, parallel joins, for_each, delays, transforms,
skips, continue_on_failure, and restoring any of them from a checkpoint. Pure: no services."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest

from flowforge_orchestrator.core.graph.nodes import attempt_id
from flowforge_orchestrator.core.graph.run import CompiledWorkflow, RunState
from flowforge_orchestrator.core.records import Dispatch, RunChanges, StepResult
from flowforge_orchestrator.core.state import RunStatus, StepStatus
from flowforge_orchestrator.errors import DefinitionError
from tests.unit.test_graph import (
    RUN_ID,
    Recorder,
    at,
    drain,
    failed,
    http,
    kinds,
    new_run,
    ok,
    transform,
    workflow,
)

BOOM = {"message": "boom", "category": "http_5xx", "retryable": False}
# Items that depend on whether step `x` has finished (see the for_each tests).
LATE = "has(steps.x) ? ['late0', 'late1'] : ['early0', 'early1']"


def condition(
    step_id: str,
    if_: str,
    then: list[Any],
    else_: list[Any] | None = None,
    *deps: str,
    **extra: Any,
) -> dict[str, Any]:
    step = {"id": step_id, "type": "condition", "if": if_, "then": then, "depends_on": list(deps)}
    if else_ is not None:
        step["else"] = else_
    return step | extra


def parallel(step_id: str, *branches: list[Any], deps: tuple[str, ...] = (), **extra: Any) -> Any:
    return {
        "id": step_id,
        "type": "parallel",
        "branches": list(branches),
        "depends_on": list(deps),
        **extra,
    }


def for_each(step_id: str, items: str, step: dict[str, Any], *deps: str, **extra: Any) -> Any:
    return {
        "id": step_id,
        "type": "parallel",
        "for_each": items,
        "step": step,
        "depends_on": list(deps),
        **extra,
    }


def delay(step_id: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "delay", "depends_on": list(deps), **extra}


@dataclass
class Live:
    """A run with what its store holds; answers workers' results by step key."""

    run: RunState
    rec: Recorder = field(default_factory=Recorder)
    last: RunChanges | None = None

    @classmethod
    def start(cls, wf: CompiledWorkflow, input: Any = None) -> Live:
        live = cls(new_run(wf, input))
        live.run.start(at(0))
        live.last = live.rec.drain(live.run)
        return live

    def dispatch(self, key: str) -> Dispatch:
        return [d for d in self.rec.dispatches if d.step_id == key][-1]

    def dispatched(self) -> list[str]:
        return [d.step_id for d in self.rec.dispatches]

    def ok(self, key: str, output: Any = None, now: float = 10) -> RunChanges:
        result = ok(self.dispatch(key), {"from": key} if output is None else output)
        return self._apply(result, now)

    def fail(self, key: str, now: float = 10, error: dict[str, Any] = BOOM) -> RunChanges:
        return self._apply(failed(self.dispatch(key), error), now)

    def _apply(self, result: StepResult, now: float) -> RunChanges:
        self.rec.results[result.attempt_id] = result  # the worker stored it first
        assert self.run.apply_result(result, at(now))
        return self._last()

    def fire(self, now: float) -> bool:
        fired = self.run.fire_timers(at(now))
        self.last = self.rec.drain(self.run)
        return fired

    def _last(self) -> RunChanges:
        self.last = self.rec.drain(self.run)
        assert self.last is not None
        return self.last

    def status(self, key: str) -> StepStatus:
        return self.run.step_status(key)

    def event(self, type_: str, key: str | None) -> Any:
        [found] = [e for e in self.rec.events if (e.type, e.step_id) == (type_, key)]
        return found


def adopt(run: RunState, rec: Recorder, now: float) -> tuple[RunState, RunChanges]:
    """Another orchestrator takes the run over and resumes it."""
    adopted = rec.restore(run)
    adopted.resume(at(now))
    changes = rec.drain(adopted)
    assert changes is not None
    return adopted, changes


@dataclass
class Played:
    rec: Recorder
    actions: int


def play(
    wf: CompiledWorkflow,
    input: Any = None,
    *,
    fail: Collection[str] = (),
    outputs: Mapping[str, Any] | None = None,
    restore_at: Collection[int] = (),
) -> Played:
    """Drive a run to its end deterministically: answer the outstanding attempt with the
    smallest key (failing those in `fail`), or fire the next timer; before each action
    numbered in `restore_at`, hand the run to a new RunState built from the checkpoint."""
    run, rec = new_run(wf, input), Recorder()
    run.start(at(0))
    rec.drain(run)
    now, actions = 0.0, 0
    while run.status is RunStatus.RUNNING:
        actions += 1
        assert actions < 200, "the run does not end"
        sent = {d.attempt_id: d for d in rec.dispatches}
        if actions in restore_at:
            outstanding = [a for a in run.outstanding() if a in sent]
            timer, checkpoint = run.next_timer(), rec.checkpoint
            run, resumed = adopt(run, rec, now)
            assert resumed.events == []
            assert sorted(d.attempt_id for d in resumed.dispatches) == sorted(outstanding)
            assert resumed.checkpoint == checkpoint
            if not outstanding:  # a worker attempt's deadline restarts on adoption
                assert run.next_timer() == timer
        pending = sorted((sent[a] for a in run.outstanding() if a in sent), key=lambda d: d.step_id)
        if pending:
            d, now = pending[0], now + 1
            if d.step_id in fail:
                result = failed(d, {**BOOM, "message": f"{d.step_id} broke"}, finished=now)
            else:
                output = (outputs or {}).get(d.step_id, {"from": d.step_id})
                result = ok(d, output, started=now, finished=now)
            assert rec.apply(run, result, at(now))
        else:
            when = run.next_timer()
            assert when is not None, "a running run waits on nothing"
            now = max(now, (when - at(0)).total_seconds())
            assert run.fire_timers(when)
            rec.drain(run)
    return Played(rec, actions)


def assert_restores_anywhere(wf: CompiledWorkflow, input: Any = None, **kw: Any) -> Played:
    """Adopting the run before any action changes nothing: same events, same output."""
    reference = play(wf, input, **kw)
    for n in range(1, reference.actions + 1):
        adopted = play(wf, input, restore_at={n}, **kw)
        assert adopted.rec.events == reference.rec.events, f"restored before action {n}"
        assert [e.seq for e in adopted.rec.events] == list(range(1, len(adopted.rec.events) + 1))
        assert (adopted.rec.status, adopted.rec.output) == (
            reference.rec.status,
            reference.rec.output,
        )
    return reference


def error_of(changes: RunChanges, key: str) -> dict[str, Any]:
    [event] = [e for e in changes.events if (e.type, e.step_id) == ("step.failed", key)]
    error: dict[str, Any] = event.data["error"]
    return error


# -- keys and attempt ids ----------------------------------------------------------------------


def test_keys_carry_the_for_each_indexes_and_attempt_ids_are_derived() -> None:
    inner = for_each("inner", "[10, 20]", http("leaf"))
    wf = workflow(http("a"), for_each("outer", "[1, 2]", inner, "a"), transform("t", 1, "outer"))
    live = Live.start(wf)
    assert live.dispatch("a").attempt_id == attempt_id(RUN_ID, "a", 1)
    live.ok("a")
    keys = ["leaf[0][0]", "leaf[0][1]", "leaf[1][0]", "leaf[1][1]"]
    assert live.dispatched() == ["a", *keys]
    for key in keys:
        d = live.dispatch(key)
        assert d.attempt_id == attempt_id(RUN_ID, key, 1)
        assert live.event("step.dispatched", key).attempt_id == d.attempt_id
    assert live.event("step.started", "inner[1]").attempt_id == attempt_id(RUN_ID, "inner[1]", 1)
    for key in keys:
        live.ok(key, key)
    assert live.last is not None and live.last.status is RunStatus.COMPLETED
    # Inline steps' outputs are stored like results, under their derived attempt ids.
    stored = {r.step_id: a for a, r in live.rec.results.items()}
    for key in ("outer", "inner[0]", "inner[1]", "t"):
        assert stored[key] == attempt_id(RUN_ID, key, 1)
    outer = live.rec.results[attempt_id(RUN_ID, "outer", 1)].output
    assert [b["output"] for b in outer] == [
        [
            {"status": "succeeded", "output": "leaf[0][0]"},
            {"status": "succeeded", "output": "leaf[0][1]"},
        ],
        [
            {"status": "succeeded", "output": "leaf[1][0]"},
            {"status": "succeeded", "output": "leaf[1][1]"},
        ],
    ]


# -- condition ---------------------------------------------------------------------------------


ELSE_TREE = [
    http("e1"),
    http("e2", "e1"),
    parallel("ep", [http("pb1")], [condition("ec", "true", [http("deep")], [http("deeper")])]),
    for_each("efe", "[1, 2]", http("el")),
]
ELSE_KEYS = ["e1", "e2", "ep", "pb1", "ec", "deep", "deeper", "efe"]


def test_a_true_condition_runs_then_and_skips_every_step_of_else_at_any_depth() -> None:
    wf = workflow(condition("c", "input.n > 2", [http("t1"), http("t2", "t1")], ELSE_TREE))
    live = Live.start(wf, {"n": 3})
    assert live.last is not None
    assert kinds(live.last.events) == [
        ("workflow.started", None),
        ("step.started", "c"),
        *[("step.skipped", key) for key in ELSE_KEYS],
        ("step.dispatched", "t1"),
    ]
    assert live.event("step.started", "c").data["branch"] == "then"
    assert live.last.checkpoint["steps"]["c"] == {"s": "r", "n": 1, "b": "then"}
    assert all(live.status(key) is StepStatus.SKIPPED for key in ELSE_KEYS)
    assert live.dispatched() == ["t1"]
    live.ok("t1")
    assert live.status("c") is StepStatus.RUNNING  # t2 is still to run
    changes = live.ok("t2", {"v": 2})
    assert kinds(changes.events)[-2:] == [("step.succeeded", "c"), ("workflow.completed", None)]
    assert changes.output == {"c": {"branch": "then", "output": {"v": 2}}}


def test_a_false_condition_runs_else_and_skips_then() -> None:
    wf = workflow(
        condition("c", "input.n > 2", [http("t1"), http("t2", "t1")], [transform("e", "low")]),
        transform("after", "${{ steps.c.output }}", "c"),
    )
    live = Live.start(wf, {"n": 1})
    assert live.last is not None
    assert kinds(live.last.events) == [
        ("workflow.started", None),
        ("step.started", "c"),
        ("step.skipped", "t1"),
        ("step.skipped", "t2"),
        ("step.succeeded", "e"),
        ("step.succeeded", "c"),
        ("step.succeeded", "after"),
        ("workflow.completed", None),
    ]
    assert live.last.output == {"after": {"branch": "else", "output": "low"}}


@pytest.mark.parametrize(
    ("then", "expected"),
    [
        ([transform("x", 1)], 1),  # one final step: its output
        ([transform("x", 1), transform("y", 2)], {"x": 1, "y": 2}),  # several: by id
        ([transform("x", 1), transform("y", 2, "x")], 2),  # y depends on x: y is final
        ([transform("x", 1), transform("y", 2), transform("z", 3, "x")], {"y": 2, "z": 3}),
    ],
)
def test_the_condition_output_is_its_chosen_list_output(then: list[Any], expected: Any) -> None:
    live = Live.start(workflow(condition("c", "true", then)))
    assert live.last is not None and live.last.output == {
        "c": {"branch": "then", "output": expected}
    }


def test_an_empty_chosen_list_gives_a_null_output() -> None:
    live = Live.start(workflow(condition("c", "false", [http("t")]), http("after", "c")))
    assert live.last is not None
    assert kinds(live.last.events)[1:] == [
        ("step.started", "c"),
        ("step.skipped", "t"),
        ("step.succeeded", "c"),
        ("step.dispatched", "after"),
    ]
    assert live.rec.results[attempt_id(RUN_ID, "c", 1)].output == {"branch": "else", "output": None}


def test_the_branch_steps_read_outer_steps_and_input() -> None:
    wf = workflow(
        http("a"),
        condition(
            "c",
            "steps.a.output.total > input.limit",
            [http("review", params={"url": "https://svc.test/r", "json": "${{ steps.a.output }}"})],
            [],
            "a",
        ),
    )
    live = Live.start(wf, {"limit": 100})
    live.ok("a", {"total": 150})
    assert live.dispatch("review").params["json"] == {"total": 150}


@pytest.mark.parametrize(
    ("if_", "input", "reason"),
    [
        ("input.n", {"n": 1}, "`if` must give true or false, got int"),
        ("input.name", {"name": "yes"}, "`if` must give true or false, got str"),
        ("input.missing > 1", {}, "no such key: missing"),
        ("input.n > 'a'", {"n": 1}, ""),  # CEL's own message: no such overload
    ],
)
def test_an_if_that_is_not_a_bool_fails_the_condition_with_an_expression_error(
    if_: str, input: Any, reason: str
) -> None:
    live = Live.start(workflow(condition("c", if_, [http("t")]), http("after", "c")), input)
    changes = live.last
    assert changes is not None
    error = error_of(changes, "c")
    assert error["category"] == "expression_error"
    assert error["retryable"] is False
    assert error["details"] == {"expression": if_, "field": "if"}
    assert error["message"].startswith(f"step 'c', field 'if': expression {if_!r}: ")
    assert reason in error["message"]
    assert [e.type for e in changes.events if e.step_id == "c"] == ["step.failed"]
    assert live.dispatched() == []
    assert changes.status is RunStatus.FAILED
    assert changes.error == {**error, "step_id": "c"}
    assert live.status("after") is StepStatus.CANCELLED
    # The condition never chose: its list never ran, and ends cancelled with it.
    assert [e.type for e in changes.events if e.step_id == "t"] == ["step.cancelled"]


@pytest.mark.parametrize("keep_going", [False, True])
def test_no_step_of_a_condition_that_never_chose_is_left_pending(keep_going: bool) -> None:
    wf = workflow(
        condition("c", "input.n", [http("t")], [http("e")], continue_on_failure=keep_going)
    )
    live = Live.start(wf, {"n": 1})
    assert live.last is not None and live.last.status.finished
    assert live.status("t").finished and live.status("e").finished


def test_a_failure_in_the_chosen_branch_cancels_its_rest_and_fails_the_condition() -> None:
    wf = workflow(
        condition("c", "true", [http("a"), http("b"), http("b2", "b"), delay("w", duration="1m")]),
        http("after", "c"),
    )
    live = Live.start(wf)
    assert live.rec.checkpoint["steps"]["w"]["t"] == at(60).isoformat()
    changes = live.fail("a")
    assert kinds(changes.events) == [
        ("step.started", "a"),
        ("step.failed", "a"),
        ("step.cancelled", "b"),
        ("step.cancelled", "b2"),
        ("step.cancelled", "w"),
        ("step.failed", "c"),
        ("step.cancelled", "after"),
        ("workflow.failed", None),
    ]
    assert changes.aborts == [live.dispatch("b").attempt_id]
    assert live.event("step.cancelled", "b2").from_status == "pending"
    assert live.event("step.cancelled", "w").from_status == "running"
    assert live.run.next_timer() is None
    error = error_of(changes, "c")
    assert error["category"] == "branch_failed"
    assert error["retryable"] is False
    assert error["message"] == "step 'c': step 'a' of its then branch failed: boom"
    assert error["details"] == {"failed_step": "a", "cause": BOOM}
    assert changes.error == {**error, "step_id": "c"}
    assert live.dispatched() == ["a", "b"]


def test_a_condition_with_continue_on_failure_lets_the_run_go_on() -> None:
    wf = workflow(
        condition("c", "true", [http("a")], continue_on_failure=True),
        transform(
            "report",
            {"status": "${{ steps.c.status }}", "why": "${{ steps.c.error.details.failed_step }}"},
            "c",
        ),
    )
    live = Live.start(wf)
    changes = live.fail("a")
    assert changes.status is RunStatus.COMPLETED
    assert changes.output == {"report": {"status": "failed", "why": "a"}}


def test_a_step_with_continue_on_failure_in_a_branch_lets_the_branch_succeed() -> None:
    wf = workflow(
        condition(
            "c",
            "true",
            [
                http("a", continue_on_failure=True),
                transform("t", "${{ steps.a.error.message }}", "a"),
            ],
        )
    )
    changes = Live.start(wf).fail("a")
    assert changes.status is RunStatus.COMPLETED
    assert changes.output == {"c": {"branch": "then", "output": "boom"}}


# -- parallel: joins and failure policies ------------------------------------------------------


THREE = ([http("a")], [http("b"), http("b2", "b")], [http("c")])


def entry(status: str, output: Any = None, error: Any = None) -> dict[str, Any]:
    found = {"status": status, "output": output}
    return found if error is None else found | {"error": error}


def test_join_all_waits_for_every_branch_and_keeps_branch_order() -> None:
    wf = workflow(parallel("p", *THREE), http("after", "p"))
    live = Live.start(wf)
    assert live.dispatched() == ["a", "b", "c"]
    assert live.event("step.started", "p").data["branches"] == 3
    live.ok("c", "C")
    live.ok("b", "B")
    live.ok("a", "A")
    assert live.status("p") is StepStatus.RUNNING
    changes = live.ok("b2", "B2")
    assert kinds(changes.events)[-2:] == [("step.succeeded", "p"), ("step.dispatched", "after")]
    output = live.rec.results[attempt_id(RUN_ID, "p", 1)].output
    assert output == [entry("succeeded", "A"), entry("succeeded", "B2"), entry("succeeded", "C")]


def test_join_any_succeeds_at_the_first_branch_and_cancels_the_others() -> None:
    wf = workflow(parallel("p", *THREE, join="any"), http("after", "p"))
    live = Live.start(wf)
    changes = live.ok("c", "C")
    assert kinds(changes.events) == [
        ("step.started", "c"),
        ("step.succeeded", "c"),
        ("step.cancelled", "a"),
        ("step.cancelled", "b"),
        ("step.cancelled", "b2"),
        ("step.succeeded", "p"),
        ("step.dispatched", "after"),
    ]
    a, b = live.dispatch("a").attempt_id, live.dispatch("b").attempt_id
    assert live.event("step.cancelled", "a").from_status == "dispatched"
    assert live.event("step.cancelled", "a").attempt_id == a
    assert live.event("step.cancelled", "b2").from_status == "pending"
    assert "b2" not in live.dispatched()  # never dispatched
    assert changes.aborts == [a, b]
    assert [(f.attempt_id, f.status) for f in changes.attempts_finished] == [
        (live.dispatch("c").attempt_id, StepStatus.SUCCEEDED),
        (a, StepStatus.CANCELLED),
        (b, StepStatus.CANCELLED),
    ]
    output = live.rec.results[attempt_id(RUN_ID, "p", 1)].output
    assert output == [entry("cancelled"), entry("cancelled"), entry("succeeded", "C")]
    # The loser's late answer changes nothing.
    assert live.run.apply_result(ok(live.dispatch("a"), "late"), at(20)) is False
    assert live.run.take_changes() is None


def test_join_at_least_succeeds_at_the_nth_success() -> None:
    wf = workflow(parallel("p", *THREE, join={"at_least": 2}))
    live = Live.start(wf)
    live.ok("a", "A")
    live.fail("c")  # 1 success + 1 left can still make 2
    assert live.status("p") is StepStatus.RUNNING
    live.ok("b")
    changes = live.ok("b2", "B2")
    assert changes.status is RunStatus.COMPLETED
    assert changes.output == {
        "p": [
            entry("succeeded", "A"),
            entry("succeeded", "B2"),
            entry("failed", error=BOOM),
        ]
    }


@pytest.mark.parametrize(
    ("join", "need", "fails_at"),
    [("all", 3, ["a"]), ({"at_least": 2}, 2, ["a", "c"]), ("any", 1, ["a", "c", "b"])],
)
def test_fail_fast_fails_when_the_join_becomes_impossible(
    join: Any, need: int, fails_at: list[str]
) -> None:
    wf = workflow(parallel("p", *THREE, join=join), http("after", "p"))
    live = Live.start(wf)
    for key in fails_at[:-1]:
        live.fail(key)
        assert live.status("p") is StepStatus.RUNNING
    changes = live.fail(fails_at[-1])
    open_keys = [k for k in ("a", "b", "b2", "c") if k not in fails_at]
    assert kinds(changes.events) == [
        ("step.started", fails_at[-1]),
        ("step.failed", fails_at[-1]),
        *[("step.cancelled", k) for k in open_keys],
        ("step.failed", "p"),
        ("step.cancelled", "after"),
        ("workflow.failed", None),
    ]
    error = error_of(changes, "p")
    assert error["category"] == "join_failed"
    assert error["message"] == (
        f"step 'p': {len(fails_at)} of 3 branches failed; the join needs {need} to succeed"
    )
    assert error["details"]["first_error"]["message"] == "boom"
    statuses = [b["status"] for b in error["details"]["branches"]]
    assert statuses == ["failed" if k in fails_at else "cancelled" for k in ("a", "b", "c")]
    assert sorted(changes.aborts) == sorted(
        live.dispatch(k).attempt_id for k in open_keys if k in live.dispatched()
    )


def test_wait_all_runs_every_branch_to_its_end_before_failing() -> None:
    wf = workflow(parallel("p", *THREE, fail_fast=False))
    live = Live.start(wf)
    live.fail("a")
    live.ok("c", "C")
    live.ok("b")
    assert live.status("p") is StepStatus.RUNNING
    changes = live.ok("b2", "B2")
    assert kinds(changes.events)[-2:] == [("step.failed", "p"), ("workflow.failed", None)]
    assert not any(e.type == "step.cancelled" for e in live.rec.events)
    error = error_of(changes, "p")
    assert error["details"]["branches"] == [
        entry("failed", error=BOOM),
        entry("succeeded", "B2"),
        entry("succeeded", "C"),
    ]


def test_wait_all_with_join_any_succeeds_when_one_branch_does() -> None:
    live = Live.start(workflow(parallel("p", *THREE, join="any", fail_fast=False)))
    live.fail("a")
    live.fail("c")
    changes = live.ok("b")
    assert changes.status is RunStatus.RUNNING  # b2 still runs: the join needs a branch
    changes = live.ok("b2", "B2")
    assert changes.status is RunStatus.COMPLETED
    assert [b["status"] for b in changes.output["p"]] == ["failed", "succeeded", "failed"]


def test_a_branch_that_finished_with_the_winner_is_not_reported_cancelled() -> None:
    twins = parallel("p", [delay("d1", duration="1m")], [delay("d2", duration="1m")], join="any")
    live = Live.start(workflow(twins))
    assert live.fire(60)  # both timers fire in the same move
    assert live.last is not None
    assert not any(e.type == "step.cancelled" for e in live.rec.events)
    assert [b["status"] for b in live.last.output["p"]] == ["succeeded", "succeeded"]


def test_branches_start_one_by_one_so_an_inline_win_starts_no_other() -> None:
    live = Live.start(workflow(for_each("fe", "[1, 2]", transform("t", "${{ item }}"), join="any")))
    assert live.last is not None
    assert live.event("step.cancelled", "t[1]").from_status == "pending"
    assert live.last.output == {
        "fe": [entry("succeeded", 1), {"status": "cancelled", "output": None}]
    }


def test_a_join_satisfied_inline_dispatches_no_other_branch() -> None:
    live = Live.start(workflow(parallel("p", [transform("t", 1)], [http("a")], join="any")))
    assert live.last is not None
    assert live.last.dispatches == [] and live.last.aborts == []
    assert live.event("step.cancelled", "a").from_status == "pending"


def test_a_failed_step_with_continue_on_failure_does_not_fail_its_branch() -> None:
    branch = [http("a", continue_on_failure=True), transform("t", "${{ steps.a.status }}", "a")]
    live = Live.start(workflow(parallel("p", branch, [transform("u", "U")])))
    changes = live.fail("a")
    assert changes.output == {"p": [entry("succeeded", "failed"), entry("succeeded", "U")]}


def test_outstanding_lists_only_attempts_handed_to_workers() -> None:
    wf = workflow(condition("c", "true", [parallel("p", [http("a")], [delay("w", duration="1m")])]))
    live = Live.start(wf)
    assert live.run.outstanding() == [live.dispatch("a").attempt_id]


# -- parallel: for_each and max_parallel -------------------------------------------------------


def test_for_each_runs_its_step_per_element_with_item_and_index() -> None:
    charge = http("charge", params={"url": "https://pay.test/${{ index }}", "json": "${{ item }}"})
    wf = workflow(
        http("order"),
        for_each("charge_all", "steps.order.output.items", charge, "order"),
        transform("sum", "${{ steps.charge_all.output.map(b, b.output.n) }}", "charge_all"),
    )
    live = Live.start(wf)
    live.ok("order", {"items": [{"sku": "x"}, {"sku": "y"}, {"sku": "z"}]})
    assert live.event("step.started", "charge_all").data["branches"] == 3
    assert [(d.step_id, d.params) for d in live.rec.dispatches[1:]] == [
        (f"charge[{i}]", {"url": f"https://pay.test/{i}", "json": {"sku": sku}})
        for i, sku in enumerate("xyz")
    ]
    for i in (2, 0, 1):
        changes = live.ok(f"charge[{i}]", {"n": i})
    assert changes.status is RunStatus.COMPLETED
    assert changes.output == {"sum": [0, 1, 2]}
    # The elements left memory and the checkpoint; the fan-out's output stayed.
    assert live.status("charge_all") is StepStatus.SUCCEEDED
    for i in range(3):
        with pytest.raises(KeyError):
            live.status(f"charge[{i}]")
    assert set(changes.checkpoint["steps"]) == {"order", "charge_all", "sum"}


def test_inline_elements_finish_inside_the_move_that_starts_them() -> None:
    wf = workflow(for_each("fe", "input.xs", transform("t", "${{ item * 10 + index }}")))
    live = Live.start(wf, {"xs": [1, 2]})
    assert live.last is not None
    assert live.last.output == {"fe": [entry("succeeded", 10), entry("succeeded", 21)]}


def test_for_each_may_read_only_steps_finished_before_it_starts() -> None:
    # Elements are not stored: an adopting replica evaluates for_each again, so it must not
    # read a step that may finish while the fan-out runs.
    el = http("el", params={"url": "https://svc.test/${{ item }}"})
    with pytest.raises(DefinitionError, match=r"step 'fe', field 'for_each': reads steps.x"):
        workflow(http("x"), for_each("fe", LATE, el, max_parallel=1))
    with pytest.raises(DefinitionError, match="must name the steps it reads"):
        workflow(http("x"), for_each("fe", "steps['x'].output", el, "x"))
    workflow(http("x"), for_each("fe", LATE, el, "x"))  # a dependency: fine
    nested = condition("c", "true", [for_each("fe", "steps.x.output", el)], None, "x")
    workflow(http("x"), nested)  # the condition waited for x


def test_for_each_over_an_empty_list_succeeds_with_an_empty_output() -> None:
    wf = workflow(for_each("fe", "input.xs", http("el")), http("after", "fe"))
    live = Live.start(wf, {"xs": []})
    assert live.last is not None
    assert kinds(live.last.events)[1:] == [
        ("step.started", "fe"),
        ("step.succeeded", "fe"),
        ("step.dispatched", "after"),
    ]
    assert live.rec.results[attempt_id(RUN_ID, "fe", 1)].output == []


@pytest.mark.parametrize(
    ("items", "join", "need", "total"), [("[]", "any", 1, 0), ("[1, 2]", {"at_least": 3}, 3, 2)]
)
def test_a_join_needing_more_than_the_branches_fails_at_once(
    items: str, join: Any, need: int, total: int
) -> None:
    wf = workflow(for_each("fe", items, http("el"), join=join))
    live = Live.start(wf)
    changes = live.last
    assert changes is not None
    assert kinds(changes.events)[1:] == [
        ("step.started", "fe"),
        *[("step.cancelled", f"el[{i}]") for i in range(total)],  # never started
        ("step.failed", "fe"),
        ("workflow.failed", None),
    ]
    assert live.dispatched() == []
    error = error_of(changes, "fe")
    assert error["category"] == "join_failed"
    assert error["message"] == (
        f"step 'fe': the join needs {need} successful branches but there are only {total}"
    )


def test_max_parallel_starts_the_next_element_when_one_finishes() -> None:
    wf = workflow(for_each("fe", "[0, 1, 2, 3, 4]", http("el"), max_parallel=2))
    live = Live.start(wf)
    assert live.dispatched() == ["el[0]", "el[1]"]
    live.ok("el[1]")
    assert live.dispatched() == ["el[0]", "el[1]", "el[2]"]
    live.ok("el[0]")
    live.ok("el[2]")
    assert live.dispatched() == ["el[0]", "el[1]", "el[2]", "el[3]", "el[4]"]
    assert live.status("el[3]") is StepStatus.DISPATCHED
    live.ok("el[4]")
    changes = live.ok("el[3]")
    assert changes.status is RunStatus.COMPLETED
    assert [b["output"] for b in changes.output["fe"]] == [{"from": f"el[{i}]"} for i in range(5)]


def test_max_parallel_counts_whole_branches_and_unlaunched_ones_are_cancelled() -> None:
    wf = workflow(
        parallel(
            "p", [http("a"), http("a2", "a")], [http("b")], [http("c")], max_parallel=1, join="any"
        )
    )
    live = Live.start(wf)
    assert live.dispatched() == ["a"]
    live.ok("a")
    assert live.dispatched() == ["a", "a2"]  # a's branch is not done: b waits
    changes = live.ok("a2", "A2")
    assert kinds(changes.events)[2:] == [
        ("step.cancelled", "b"),
        ("step.cancelled", "c"),
        ("step.succeeded", "p"),
        ("workflow.completed", None),
    ]
    assert live.dispatched() == ["a", "a2"]
    assert changes.aborts == []


def test_an_element_failure_with_wait_all_and_max_parallel_still_runs_the_rest() -> None:
    wf = workflow(for_each("fe", "[0, 1, 2]", http("el"), max_parallel=1, fail_fast=False))
    live = Live.start(wf)
    live.fail("el[0]")
    live.ok("el[1]")
    changes = live.ok("el[2]")
    assert live.dispatched() == ["el[0]", "el[1]", "el[2]"]
    assert changes.status is RunStatus.FAILED
    assert [b["status"] for b in error_of(changes, "fe")["details"]["branches"]] == [
        "failed",
        "succeeded",
        "succeeded",
    ]


# -- nesting -----------------------------------------------------------------------------------


def test_a_parallel_inside_a_condition_branch() -> None:
    wf = workflow(
        condition(
            "c",
            "input.go",
            [parallel("p", [http("a")], [http("b")], join="any"), transform("t", "done", "p")],
            [http("no")],
        )
    )
    live = Live.start(wf, {"go": True})
    assert live.dispatched() == ["a", "b"]
    changes = live.ok("b", "B")
    assert kinds(changes.events)[2:] == [
        ("step.cancelled", "a"),
        ("step.succeeded", "p"),
        ("step.succeeded", "t"),
        ("step.succeeded", "c"),
        ("workflow.completed", None),
    ]
    assert changes.output == {"c": {"branch": "then", "output": "done"}}


def test_a_failing_parallel_inside_a_condition_fails_the_condition() -> None:
    wf = workflow(condition("c", "true", [parallel("p", [http("a")], [http("b")])]))
    live = Live.start(wf)
    changes = live.fail("a")
    assert kinds(changes.events)[2:] == [
        ("step.cancelled", "b"),
        ("step.failed", "p"),
        ("step.failed", "c"),
        ("workflow.failed", None),
    ]
    error = error_of(changes, "c")
    assert error["category"] == "branch_failed"
    assert error["details"]["failed_step"] == "p"
    assert error["details"]["cause"]["category"] == "join_failed"


def test_a_condition_inside_a_parallel_branch() -> None:
    wf = workflow(
        parallel(
            "p",
            [condition("c1", "input.x == 1", [http("one")], [http("other")])],
            [condition("c2", "input.x == 2", [http("two")], [transform("not_two", "n")])],
        )
    )
    live = Live.start(wf, {"x": 1})
    assert live.dispatched() == ["one"]
    assert live.status("other") is StepStatus.SKIPPED
    assert live.status("two") is StepStatus.SKIPPED
    changes = live.ok("one", 1)
    assert changes.output == {
        "p": [
            entry("succeeded", {"branch": "then", "output": 1}),
            entry("succeeded", {"branch": "else", "output": "n"}),
        ]
    }


def test_a_condition_inside_a_for_each_template_chooses_per_element() -> None:
    step = condition(
        "big",
        "item > 10",
        [http("review", params={"url": "https://r/${{ item }}"})],
        [transform("auto", "${{ item }}")],
    )
    wf = workflow(for_each("fe", "input.xs", step))
    live = Live.start(wf, {"xs": [5, 50, 7]})
    assert live.dispatched() == ["review[1]"]
    assert live.dispatch("review[1]").params == {"url": "https://r/50"}
    for key, status in {
        "big[0]": StepStatus.SUCCEEDED,
        "auto[0]": StepStatus.SUCCEEDED,
        "review[0]": StepStatus.SKIPPED,
        "big[1]": StepStatus.RUNNING,
        "auto[1]": StepStatus.SKIPPED,
        "review[2]": StepStatus.SKIPPED,
    }.items():
        assert live.status(key) is status, key
    skipped = [e.step_id for e in live.rec.events if e.type == "step.skipped"]
    assert skipped == ["review[0]", "auto[1]", "review[2]"]
    changes = live.ok("review[1]", "R")
    assert [b["output"] for b in changes.output["fe"]] == [
        {"branch": "else", "output": 5},
        {"branch": "then", "output": "R"},
        {"branch": "else", "output": 7},
    ]


def test_a_failing_element_of_a_for_each_inside_a_condition_cancels_the_siblings() -> None:
    wf = workflow(condition("c", "true", [for_each("fe", "[1, 2, 3]", http("el"))]))
    live = Live.start(wf)
    changes = live.fail("el[1]")
    assert kinds(changes.events)[2:] == [
        ("step.cancelled", "el[0]"),
        ("step.cancelled", "el[2]"),
        ("step.failed", "fe"),
        ("step.failed", "c"),
        ("workflow.failed", None),
    ]
    assert sorted(changes.aborts) == sorted(live.dispatch(k).attempt_id for k in ("el[0]", "el[2]"))


# -- delay ---------------------------------------------------------------------------------------


def test_a_delay_waits_its_duration_then_succeeds() -> None:
    wf = workflow(http("a"), delay("wait", "a", duration="1m30s"), http("b", "wait"))
    live = Live.start(wf)
    changes = live.ok("a", now=10)
    assert kinds(changes.events)[-1] == ("step.started", "wait")
    assert live.event("step.started", "wait").data == {
        "step_id": "wait",
        "attempt": 1,
        "until": "2024-05-01T12:01:40Z",
    }
    assert changes.checkpoint["steps"]["wait"] == {"s": "r", "n": 1, "t": at(100).isoformat()}
    assert live.run.next_timer() == at(100)
    assert live.fire(99.9) is False
    assert live.last is None
    assert live.status("wait") is StepStatus.RUNNING
    assert live.fire(100) is True
    assert live.last is not None
    assert kinds(live.last.events) == [("step.succeeded", "wait"), ("step.dispatched", "b")]
    assert live.rec.results[attempt_id(RUN_ID, "wait", 1)].output == {
        "waited_until": "2024-05-01T12:01:40Z"
    }
    assert live.fire(100) is False  # fired once
    assert live.status("wait") is StepStatus.SUCCEEDED


@pytest.mark.parametrize(
    ("until", "input", "fires_at"),
    [
        ("timestamp('2024-05-01T12:05:00Z')", {}, 300),
        ("timestamp(input.when) + duration('30s')", {"when": "2024-05-01T14:00:00+02:00"}, 30),
        ("input.when", {"when": "2024-05-01T12:00:45Z"}, 45),
        ("input.when", {"when": "2024-05-01T12:00:45"}, 45),  # naive: UTC
    ],
)
def test_a_delay_until_a_timestamp_or_an_rfc3339_string(
    until: str, input: Any, fires_at: float
) -> None:
    live = Live.start(workflow(delay("w", until=until)), input)
    assert live.run.next_timer() == at(fires_at)
    assert live.fire(fires_at - 1) is False
    assert live.fire(fires_at) is True
    assert live.last is not None
    expected = at(fires_at).isoformat().replace("+00:00", "Z")
    assert live.last.output == {"w": {"waited_until": expected}}


def test_a_delay_whose_time_has_passed_succeeds_at_once() -> None:
    live = Live.start(workflow(delay("w", until="timestamp('2024-05-01T11:00:00Z')")))
    assert live.last is not None
    assert kinds(live.last.events)[1:] == [
        ("step.started", "w"),
        ("step.succeeded", "w"),
        ("workflow.completed", None),
    ]
    assert live.run.next_timer() is None


@pytest.mark.parametrize(
    ("when", "reason"),
    [
        (5, "`until` must give a timestamp, got int"),
        (None, "`until` must give a timestamp, got null"),
        ("next tuesday", "`until` gave 'next tuesday', not an RFC 3339 timestamp"),
    ],
)
def test_an_until_that_is_not_a_timestamp_is_an_expression_error(when: Any, reason: str) -> None:
    live = Live.start(workflow(delay("w", until="input.when")), {"when": when})
    assert live.last is not None
    error = error_of(live.last, "w")
    assert error["category"] == "expression_error"
    assert error["retryable"] is False
    assert error["message"] == f"step 'w', field 'until': expression 'input.when': {reason}"
    assert live.last.status is RunStatus.FAILED
    assert live.run.next_timer() is None


def test_a_restored_delay_keeps_its_time_and_fires_exactly_once() -> None:
    wf = workflow(delay("w", duration="10m"), transform("t", "${{ steps.w.output }}", "w"))
    live = Live.start(wf)
    assert live.last is not None
    assert live.last.checkpoint["steps"]["w"]["t"] == at(600).isoformat()
    adopted, resumed = adopt(live.run, live.rec, 30)
    assert resumed.events == [] and resumed.dispatches == []
    assert adopted.next_timer() == at(600)
    assert adopted.fire_timers(at(599)) is False
    assert adopted.take_changes() is None
    assert adopted.fire_timers(at(700)) is True  # a late orchestrator fires at once
    changes = drain(adopted)
    assert kinds(changes.events) == [
        ("step.succeeded", "w"),
        ("step.succeeded", "t"),
        ("workflow.completed", None),
    ]
    waited = datetime.fromisoformat(changes.output["t"]["waited_until"].replace("Z", "+00:00"))
    assert at(600) <= waited <= at(700)
    assert adopted.fire_timers(at(800)) is False
    assert adopted.take_changes() is None


def test_a_delay_cancelled_by_a_join_leaves_no_timer() -> None:
    wf = workflow(parallel("p", [delay("w", duration="1h")], [http("a")], join="any"))
    live = Live.start(wf)
    assert live.rec.checkpoint["steps"]["w"]["t"] == at(3600).isoformat()
    changes = live.ok("a")
    assert ("step.cancelled", "w") in kinds(changes.events)
    assert changes.aborts == []  # a delay is not on a worker
    assert live.run.next_timer() is None
    assert changes.checkpoint["steps"]["w"] == "C1"  # cancelled, its timer gone


# -- transform, DAG rules, run output ---------------------------------------------------------


def test_a_transform_renders_cel_templates_inline() -> None:
    wf = workflow(
        http("a"),
        transform(
            "t",
            {
                "prices": "${{ steps.a.output.items.map(i, i.price) }}",
                "n": "${{ size(steps.a.output.items) }}",
                "label": "order ${{ input.id }}",
            },
            "a",
        ),
    )
    live = Live.start(wf, {"id": 7})
    changes = live.ok("a", {"items": [{"price": 2}, {"price": 3}]})
    [inline] = changes.inline_results
    assert (inline.step_id, inline.outcome) == ("t", "succeeded")
    assert inline.output == {"prices": [2, 3], "n": 2, "label": "order 7"}
    assert changes.dispatches == []


def test_a_step_waits_for_every_dependency_of_any_kind() -> None:
    wf = workflow(
        http("a"),
        delay("w", duration="5s"),
        condition("c", "true", [http("inner")]),
        http("join", "a", "w", "c"),
    )
    live = Live.start(wf)
    live.ok("a")
    live.ok("inner")
    assert "join" not in live.dispatched()
    assert live.status("c") is StepStatus.SUCCEEDED
    live.fire(5)
    assert live.dispatched()[-1] == "join"


def test_skipping_propagates_through_a_dag_inside_the_branch_not_taken() -> None:
    # e2 and e3 only depend on skipped steps, and the whole nested tree under them too.
    wf = workflow(
        condition(
            "c",
            "false",
            [
                http("e1"),
                http("e2", "e1"),
                condition("e3", "true", [for_each("fe", "[1]", http("el"))], [], "e1", "e2"),
            ],
            [transform("x", 1)],
        ),
        http("after", "c"),
    )
    live = Live.start(wf)
    for key in ("e1", "e2", "e3", "fe"):
        assert live.status(key) is StepStatus.SKIPPED
    assert live.status("after") is StepStatus.DISPATCHED  # the condition itself succeeded
    assert not any(e.step_id == "el[0]" for e in live.rec.events)  # never expanded


def test_a_failed_dependency_fails_the_run_and_its_dependents_never_start() -> None:
    wf = workflow(http("a"), http("b", "a"), condition("c", "true", [http("x")], [], "b"))
    changes = Live.start(wf).fail("a")
    assert kinds(changes.events)[-4:] == [
        ("step.cancelled", "b"),
        ("step.cancelled", "x"),  # a cancelled condition cancels its lists first
        ("step.cancelled", "c"),
        ("workflow.failed", None),
    ]
    assert changes.status is RunStatus.FAILED
    assert changes.error is not None and changes.error["step_id"] == "a"


def test_continue_on_failure_of_a_parallel_exposes_its_error() -> None:
    wf = workflow(
        parallel("p", [http("a")], continue_on_failure=True),
        transform(
            "r",
            {
                "s": "${{ steps.p.status }}",
                "m": "${{ steps.p.error.message }}",
                "o": "${{ steps.p.output }}",
            },
            "p",
        ),
    )
    changes = Live.start(wf).fail("a")
    assert changes.output == {
        "r": {
            "s": "failed",
            "m": "step 'p': 1 of 1 branches failed; the join needs 1 to succeed",
            "o": None,
        }
    }


def test_the_run_output_template_reads_control_step_outputs() -> None:
    wf = workflow(
        condition("c", "true", [transform("x", 41)]),
        for_each("fe", "[1, 2]", transform("sq", "${{ item * item }}")),
        output={
            "x": "${{ steps.c.output.output + 1 }}",
            "sq": "${{ steps.fe.output.map(b, b.output) }}",
        },
    )
    live = Live.start(wf)
    assert live.last is not None
    assert live.last.output == {"x": 42, "sq": [1, 4]}


# -- run-time expression errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "input", "reason"),
    [
        ("input.xs", {"xs": {"a": 1}}, "`for_each` must give a list, got dict"),
        ("input.xs", {"xs": 3}, "`for_each` must give a list, got int"),
        ("input.missing", {}, "no such key: missing"),
    ],
)
def test_a_for_each_that_is_not_a_list_is_an_expression_error(
    items: str, input: Any, reason: str
) -> None:
    live = Live.start(workflow(for_each("fe", items, http("el"))), input)
    assert live.last is not None
    error = error_of(live.last, "fe")
    assert error["category"] == "expression_error"
    assert error["retryable"] is False
    assert error["message"] == f"step 'fe', field 'for_each': expression {items!r}: {reason}"
    assert live.event("step.failed", "fe").from_status == "pending"
    assert live.last.inline_results[0].outcome == "failed"
    assert live.last.status is RunStatus.FAILED


def test_a_with_that_fails_inside_an_element_fails_the_element_and_the_join() -> None:
    el = http("el", params={"url": "https://svc.test/${{ item.id }}"})
    live = Live.start(workflow(for_each("fe", "input.xs", el, join="any")), {"xs": [{}, {"id": 2}]})
    assert live.last is not None
    error = error_of(live.last, "el[0]")
    assert error["category"] == "expression_error"
    assert error["details"] == {"expression": "item.id", "field": "with.url"}
    assert live.dispatched() == ["el[1]"]
    assert live.status("fe") is StepStatus.RUNNING  # any: the other element may still do
    changes = live.ok("el[1]", 2)
    assert changes.output == {"fe": [entry("failed", error=error), entry("succeeded", 2)]}


# -- restoring mid-flight ----------------------------------------------------------------------


MIXED = workflow(
    http("order"),
    condition(
        "route",
        "steps.order.output.total > 100",
        [http("review"), delay("cool", "review", duration="30s"), http("approve", "cool")],
        [transform("auto", "ok")],
        "order",
    ),
    for_each(
        "charge",
        "steps.order.output.items",
        condition("pick", "item % 2 == 0", [http("even")], [transform("odd", "${{ item }}")]),
        "order",
        max_parallel=2,
    ),
    parallel(
        "notify",
        [http("email")],
        [delay("d", duration="1m"), http("sms", "d")],
        join="any",
        deps=("route", "charge"),
    ),
)


@pytest.mark.parametrize("total", [50, 500])
def test_restoring_before_any_action_replays_the_same_run(total: int) -> None:
    played = assert_restores_anywhere(
        MIXED, outputs={"order": {"total": total, "items": [1, 2, 3, 4, 6]}}
    )
    assert played.rec.status is RunStatus.COMPLETED
    assert played.actions >= 5


def test_restoring_a_failing_fan_out_replays_the_same_failure() -> None:
    wf = workflow(
        for_each("fe", "[1, 2, 3, 4]", http("el"), max_parallel=2, fail_fast=False),
        http("after", "fe"),
    )
    played = assert_restores_anywhere(wf, fail={"el[1]"})
    assert played.rec.status is RunStatus.FAILED


def test_restoring_a_condition_whose_branch_fails_under_continue_on_failure() -> None:
    wf = workflow(
        condition("c", "true", [http("a"), http("b", "a")], continue_on_failure=True),
        transform("r", "${{ steps.c.status }}", "c"),
    )
    played = assert_restores_anywhere(wf, fail={"b"})
    assert played.rec.output == {"r": "failed"}


def test_restoring_mid_fan_out_re_dispatches_the_same_attempts() -> None:
    wf = workflow(
        for_each(
            "fe", "input.xs", http("el", params={"url": "https://x/${{ item }}"}), max_parallel=3
        )
    )
    live = Live.start(wf, {"xs": ["a", "b", "c", "d"]})
    live.ok("el[1]", "B")
    outstanding = {
        live.dispatch(k).attempt_id: live.dispatch(k) for k in ("el[0]", "el[2]", "el[3]")
    }
    # The elements' states are packed into the fan-out's entry, a letter each.
    assert live.rec.checkpoint["steps"] == {"fe": {"s": "r", "n": 1, "x": 4, "i": "dSdd"}}
    adopted, resumed = adopt(live.run, live.rec, 20)
    assert {d.attempt_id: d for d in resumed.dispatches} == outstanding
    assert adopted.step_status("el[1]") is StepStatus.SUCCEEDED
    live.run = adopted
    for key in ("el[3]", "el[0]", "el[2]"):
        changes = live.ok(key, key[-2])
    assert changes.output == {"fe": [entry("succeeded", o) for o in ("0", "B", "2", "3")]}


def test_a_run_restored_after_a_fan_out_finished_has_no_element_nodes() -> None:
    wf = workflow(for_each("fe", "[1, 2]", http("el")), http("after", "fe"))
    live = Live.start(wf)
    live.ok("el[0]", 0)
    live.ok("el[1]", 1)
    assert set(live.rec.checkpoint["steps"]) == {"fe", "after"}
    adopted, _ = adopt(live.run, live.rec, 20)
    with pytest.raises(KeyError):
        adopted.step_status("el[0]")
    assert adopted.step_status("fe") is StepStatus.SUCCEEDED
    live.run = adopted
    changes = live.ok("after", "A")
    assert changes.status is RunStatus.COMPLETED


# Should a for_each give another count on adoption all the same (a definition stored before
# the validation of what for_each may read), the fan-out fails and ends its elements.


def test_a_fan_out_failed_on_adoption_cancels_its_dispatched_elements() -> None:
    wf = workflow(for_each("fe", "[1, 2, 3]", http("el"), max_parallel=1))
    live = Live.start(wf)
    element = live.dispatch("el[0]").attempt_id
    live.rec.checkpoint["steps"]["fe"]["x"] = 1  # as if the list had been [1]
    _, resumed = adopt(live.run, live.rec, 20)
    error = error_of(resumed, "fe")
    assert error["category"] == "internal_error"
    assert "for_each gave 1 elements when the step started, but it now gives 3" in error["message"]
    assert resumed.status is RunStatus.FAILED
    assert ("step.cancelled", "el[0]") in kinds(resumed.events)
    assert resumed.aborts == [element]
