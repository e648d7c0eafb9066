"""One run's graph, driven purely: deterministic ids, explicit clocks, no services."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest

from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.core.graph.checkpoint import with_parts
from flowforge_orchestrator.core.graph.run import CompiledWorkflow, RunState
from flowforge_orchestrator.core.records import (
    CheckpointPart,
    Dispatch,
    Event,
    Limits,
    RunChanges,
    StepResult,
    json_size,
    rejected_run,
)
from flowforge_orchestrator.core.state import IllegalTransition, RunStatus, StepStatus

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
RUN_ID = UUID("00000000-0000-4000-8000-00000000abcd")
LIMITS = Limits(max_output_bytes=10_000, max_context_bytes=100_000, default_timeout=30.0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def http(step_id: str, *deps: str, params: Any = None, **extra: Any) -> dict[str, Any]:
    """An http step; `params` is its `with` (a URL of its own by default)."""
    params = params if params is not None else {"url": f"https://svc.test/{step_id}"}
    return {"id": step_id, "type": "http", "depends_on": list(deps), "with": params, **extra}


def transform(step_id: str, output: Any, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "transform", "depends_on": list(deps), "output": output, **extra}


def workflow(*steps: dict[str, Any], **extra: Any) -> CompiledWorkflow:
    definition = parse_definition({"name": "wf", "version": 3, "steps": list(steps), **extra})
    return CompiledWorkflow(definition)


def new_run(
    wf: CompiledWorkflow,
    input: Any = None,
    *,
    limits: Limits = LIMITS,
) -> RunState:
    return RunState(
        run_id=RUN_ID,
        workflow=wf,
        version=3,
        input={} if input is None else input,
        limits=limits,
    )


def ok(d: Dispatch, output: Any, *, started: float = 1, finished: float = 2) -> StepResult:
    return StepResult(
        attempt_id=d.attempt_id,
        step_id=d.step_id,
        outcome="succeeded",
        output=output,
        error=None,
        started_at=at(started),
        finished_at=at(finished),
        worker="w-1",
    )


def failed(d: Dispatch, error: dict[str, Any], *, finished: float = 2) -> StepResult:
    return StepResult(
        attempt_id=d.attempt_id,
        step_id=d.step_id,
        outcome="failed",
        output=None,
        error=error,
        started_at=at(1),
        finished_at=at(finished),
        worker="w-1",
    )


def drain(run: RunState) -> RunChanges:
    changes = run.take_changes()
    assert changes is not None
    return changes


def by_step(changes: RunChanges) -> dict[str, Dispatch]:
    return {d.step_id: d for d in changes.dispatches}


def kinds(events: list[Event]) -> list[tuple[str, str | None]]:
    return [(e.type, e.step_id) for e in events]


@dataclass
class Recorder:
    """What the store would hold: every event, every result, the latest checkpoint."""

    events: list[Event] = field(default_factory=list)
    dispatches: list[Dispatch] = field(default_factory=list)
    results: dict[UUID, StepResult] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)  # with its parts joined in
    status: RunStatus = RunStatus.PENDING
    output: Any = None
    parts: dict[tuple[str, int], CheckpointPart] = field(default_factory=dict)

    def drain(self, run: RunState) -> RunChanges | None:
        changes = run.take_changes()
        if changes is None:
            return None
        self.events += changes.events
        self.dispatches += changes.dispatches
        for r in changes.inline_results:
            self.results[r.attempt_id] = StepResult(
                r.attempt_id, r.step_id, r.outcome, r.output, r.error, r.at, r.at, "orchestrator"
            )
        for step in changes.parts_dropped:
            self.parts = {k: p for k, p in self.parts.items() if k[0] != step}
        for part in changes.parts:
            assert part.new == ((part.step, part.part) not in self.parts)
            self.parts[(part.step, part.part)] = part
        rows = [(p.step, p.part, p.letters, p.attempts) for p in self.parts.values()]
        self.checkpoint = with_parts(changes.checkpoint, rows) or {}
        self.status = changes.status
        self.output = changes.output
        return changes

    def apply(self, run: RunState, result: StepResult, now: datetime) -> bool:
        self.results[result.attempt_id] = result  # the worker stored it before the NOTIFY
        applied = run.apply_result(result, now)
        self.drain(run)
        return applied

    def restore(self, run: RunState, *, with_results: bool = True) -> RunState:
        """`run` as another orchestrator rebuilds it from the last checkpoint and, unless
        told otherwise, the stored results."""
        return RunState(
            run_id=run.run_id,
            workflow=run.workflow,
            version=run.version,
            input=run.input,
            limits=run.limits,
            status=RunStatus.RUNNING,
            checkpoint=self.checkpoint,
            results=dict(self.results) if with_results else {},
        )


# -- start ---------------------------------------------------------------------------------


def test_start_emits_workflow_started_and_dispatches_every_root() -> None:
    wf = workflow(
        http("user", params={"url": "https://svc.test/u/${{ input.user }}"}),
        http(
            "order",
            **{
                "with": {
                    "method": "POST",
                    "url": "https://svc.test/orders",
                    "json": {"id": "${{ input.order }}", "tag": "o-${{ input.order }}"},
                }
            },
        ),
        http("join", "user", "order"),
    )
    run = new_run(wf, {"user": "ada", "order": 7})
    run.start(at(0))
    changes = drain(run)

    assert changes.status is RunStatus.RUNNING and run.status is RunStatus.RUNNING
    assert kinds(changes.events) == [
        ("workflow.started", None),
        ("step.dispatched", "user"),
        ("step.dispatched", "order"),
    ]
    started = changes.events[0]
    assert (started.seq, started.from_status, started.to_status) == (1, "pending", "running")
    assert started.data == {"workflow": "wf", "version": 3}
    assert [e.seq for e in changes.events] == [1, 2, 3]
    assert all(e.at == at(0) for e in changes.events)

    d = by_step(changes)
    assert set(d) == {"user", "order"}
    assert d["user"].params == {"url": "https://svc.test/u/ada"}
    assert d["order"].params["json"] == {"id": 7, "tag": "o-7"}  # whole expression keeps int
    for ev in changes.events[1:]:
        dispatch = d[ev.step_id or ""]
        assert ev.attempt_id == dispatch.attempt_id
        assert (ev.from_status, ev.to_status) == ("pending", "dispatched")
        assert ev.data == {"step_id": ev.step_id, "attempt": 1, "type": "http"}
        assert (dispatch.run_id, dispatch.step_type, dispatch.attempt) == (RUN_ID, "http", 1)
    dispatched = [e for e in changes.events if e.type == "step.dispatched"]
    assert [(e.attempt_id, e.step_id, e.data["attempt"]) for e in dispatched] == [
        (d["user"].attempt_id, "user", 1),
        (d["order"].attempt_id, "order", 1),
    ]
    assert d["user"].attempt_id != d["order"].attempt_id
    assert run.step_status("join") is StepStatus.PENDING
    assert sorted(run.outstanding()) == sorted([d["user"].attempt_id, d["order"].attempt_id])
    assert changes.checkpoint == {"v": 2, "seq": 3, "steps": {"user": "d1", "order": "d1"}}


@pytest.mark.parametrize(
    ("step_timeout", "defaults", "expected"),
    [
        (None, {}, 30.0),  # Limits.default_timeout
        (None, {"timeout": "10s"}, 10.0),  # defaults.timeout
        ("2m", {"timeout": "10s"}, 120.0),  # the step's own timeout wins
    ],
)
def test_dispatch_timeout_comes_from_step_then_defaults_then_limits(
    step_timeout: str | None, defaults: dict[str, Any], expected: float
) -> None:
    extra = {"timeout": step_timeout} if step_timeout else {}
    run = new_run(workflow(http("a", **extra), defaults=defaults))
    run.start(at(0))
    assert drain(run).dispatches[0].timeout == expected


def test_start_twice_is_an_illegal_transition() -> None:
    run = new_run(workflow(http("a")))
    run.start(at(0))
    with pytest.raises(IllegalTransition):
        run.start(at(1))


# -- results -------------------------------------------------------------------------------


CHAIN = (
    http("user", params={"url": "https://svc.test/users/${{ input.user }}"}),
    http(
        "account",
        "user",
        **{
            "with": {
                "method": "POST",
                "url": "https://svc.test/accounts",
                "json": {"user_id": "${{ steps.user.output.id }}"},
            }
        },
    ),
)


def test_a_success_starts_and_succeeds_the_step_and_dispatches_the_next() -> None:
    run = new_run(workflow(*CHAIN), {"user": 42})
    run.start(at(0))
    user = drain(run).dispatches[0]

    assert run.apply_result(ok(user, {"id": 7}, started=1, finished=2), at(3)) is True
    changes = drain(run)

    assert kinds(changes.events) == [
        ("step.started", "user"),
        ("step.succeeded", "user"),
        ("step.dispatched", "account"),
    ]
    started, succeeded, dispatched = changes.events
    assert started.at == at(1)  # the worker's started_at, not the orchestrator's now
    assert (started.from_status, started.to_status) == ("dispatched", "running")
    assert started.data == {"step_id": "user", "attempt": 1, "worker": "w-1"}
    assert (succeeded.at, succeeded.from_status, succeeded.to_status) == (
        at(3),
        "running",
        "succeeded",
    )
    assert started.attempt_id == succeeded.attempt_id == user.attempt_id
    assert dispatched.at == at(3)
    assert [e.seq for e in changes.events] == [3, 4, 5]
    [account] = changes.dispatches
    assert account.params["json"] == {"user_id": 7}
    assert [(a.attempt_id, a.status) for a in changes.attempts_finished] == [
        (user.attempt_id, StepStatus.SUCCEEDED)
    ]
    assert changes.status is RunStatus.RUNNING
    assert changes.output is None and changes.finished_at is None


def test_the_last_success_completes_the_run_with_the_sink_outputs() -> None:
    run = new_run(workflow(*CHAIN), {"user": 42})
    run.start(at(0))
    user = drain(run).dispatches[0]
    run.apply_result(ok(user, {"id": 7}), at(3))
    account = drain(run).dispatches[0]

    assert run.apply_result(ok(account, {"account": "acc-7"}), at(5))
    changes = drain(run)

    assert kinds(changes.events)[-1] == ("workflow.completed", None)
    done = changes.events[-1]
    assert (done.from_status, done.to_status, done.at) == ("running", "completed", at(5))
    assert done.data == {"output": {"account": {"account": "acc-7"}}}
    assert changes.status is RunStatus.COMPLETED and run.status is RunStatus.COMPLETED
    assert changes.output == run.output == {"account": {"account": "acc-7"}}
    assert changes.finished_at == at(5)
    assert changes.error is None
    assert run.outstanding() == []


def test_the_definition_output_template_shapes_the_run_output() -> None:
    wf = workflow(
        *CHAIN,
        output={
            "account": "${{ steps.account.output.account }}",
            "user_id": "${{ steps.user.output.id }}",
            "label": "user ${{ input.user }}",
        },
    )
    run = new_run(wf, {"user": 42})
    run.start(at(0))
    run.apply_result(ok(drain(run).dispatches[0], {"id": 7}), at(1))
    run.apply_result(ok(drain(run).dispatches[0], {"account": "acc-7"}), at(2))
    changes = drain(run)
    assert changes.output == {"account": "acc-7", "user_id": 7, "label": "user 42"}
    assert changes.events[-1].data == {"output": changes.output}


def test_a_failing_output_template_fails_the_run_with_an_expression_error() -> None:
    run = new_run(workflow(http("a"), output="${{ steps.a.output.missing }}"))
    run.start(at(0))
    run.apply_result(ok(drain(run).dispatches[0], {"x": 1}), at(1))
    changes = drain(run)
    assert changes.status is RunStatus.FAILED
    assert changes.events[-1].type == "workflow.failed"
    assert changes.error is not None
    assert changes.error["category"] == "expression_error"
    assert changes.error["details"]["expression"] == "steps.a.output.missing"
    assert run.step_status("a") is StepStatus.SUCCEEDED


def test_parallel_roots_are_dispatched_together_and_a_join_waits_for_both() -> None:
    wf = workflow(
        http("a"),
        http("b"),
        http(
            "join",
            "a",
            "b",
            params={"url": "https://svc.test/j", "json": "${{ [steps.a.output, steps.b.output] }}"},
        ),
    )
    run = new_run(wf)
    run.start(at(0))
    d = by_step(drain(run))
    assert set(d) == {"a", "b"}

    assert run.apply_result(ok(d["b"], "B"), at(1))
    changes = drain(run)
    assert changes.dispatches == []
    assert run.step_status("join") is StepStatus.PENDING
    assert kinds(changes.events) == [("step.started", "b"), ("step.succeeded", "b")]

    assert run.apply_result(ok(d["a"], "A"), at(2))
    changes = drain(run)
    [join] = changes.dispatches
    assert join.step_id == "join"
    assert join.params["json"] == ["A", "B"]

    run.apply_result(ok(join, {"joined": True}), at(3))
    assert drain(run).output == {"join": {"joined": True}}


def test_independent_sinks_all_appear_in_the_output() -> None:
    run = new_run(workflow(http("a"), http("b"), http("c", "a")))
    run.start(at(0))
    d = by_step(drain(run))
    run.apply_result(ok(d["a"], 1), at(1))
    d.update(by_step(drain(run)))
    run.apply_result(ok(d["c"], 3), at(2))
    run.apply_result(ok(d["b"], 2), at(3))
    changes = drain(run)
    assert changes.status is RunStatus.COMPLETED
    assert changes.output == {"b": 2, "c": 3}  # "a" feeds "c": not a sink


def _started_two_roots() -> tuple[RunState, dict[str, Dispatch]]:
    run = new_run(workflow(http("a"), http("b")))
    run.start(at(0))
    return run, by_step(drain(run))


def test_a_result_for_an_unknown_attempt_changes_nothing() -> None:
    run, d = _started_two_roots()
    before = run.checkpoint()
    for result in (
        StepResult(UUID(int=999_999), "a", "succeeded", 1, None, at(1), at(2)),
        StepResult(d["a"].attempt_id, "nope", "succeeded", 1, None, at(1), at(2)),
        StepResult(d["b"].attempt_id, "a", "succeeded", 1, None, at(1), at(2)),  # b's id
    ):
        assert run.apply_result(result, at(3)) is False
        assert run.take_changes() is None
    assert run.checkpoint() == before
    assert run.seq == 3
    assert run.step_status("a") is StepStatus.DISPATCHED


def test_a_stale_attempt_is_ignored() -> None:
    # Step "a" is on its 2nd attempt (a retry): the 1st attempt's late result is stale.
    first, second = UUID(int=501), UUID(int=502)
    checkpoint = {"v": 1, "seq": 5, "steps": {"a": {"s": "dispatched", "n": 2, "a": str(second)}}}
    run = RunState(
        run_id=RUN_ID,
        workflow=workflow(http("a")),
        version=3,
        input={},
        limits=LIMITS,
        status=RunStatus.RUNNING,
        checkpoint=checkpoint,
    )
    stale = StepResult(first, "a", "succeeded", "old", None, at(1), at(2))
    assert run.apply_result(stale, at(3)) is False
    assert run.take_changes() is None
    assert run.step_status("a") is StepStatus.DISPATCHED

    fresh = StepResult(second, "a", "succeeded", "new", None, at(1), at(2))
    assert run.apply_result(fresh, at(4)) is True
    changes = drain(run)
    assert changes.events[0].seq == 6
    assert changes.events[0].data["attempt"] == 2
    assert changes.output == {"a": "new"}


def test_the_same_result_twice_is_applied_once() -> None:
    run, d = _started_two_roots()
    result = ok(d["a"], {"n": 1})
    assert run.apply_result(result, at(1)) is True
    first = drain(run)
    assert run.apply_result(result, at(2)) is False
    assert run.take_changes() is None
    assert run.seq == first.checkpoint["seq"] == 5


def test_results_after_the_run_finished_are_ignored() -> None:
    run, d = _started_two_roots()
    run.apply_result(failed(d["a"], {"message": "no", "retryable": False}), at(1))
    drain(run)
    assert run.status is RunStatus.FAILED
    assert run.apply_result(ok(d["b"], 2), at(2)) is False
    assert run.take_changes() is None


# -- failure -------------------------------------------------------------------------------


def test_a_failed_step_fails_the_run_and_cancels_every_open_step() -> None:
    wf = workflow(http("a"), http("b"), http("c", "a"), http("d", "c"))
    run = new_run(wf)
    run.start(at(0))
    d = by_step(drain(run))
    error = {"message": "HTTP 404", "category": "http_4xx", "retryable": False}

    assert run.apply_result(failed(d["a"], error), at(5)) is True
    changes = drain(run)

    assert kinds(changes.events) == [
        ("step.started", "a"),
        ("step.failed", "a"),
        ("step.cancelled", "b"),
        ("step.cancelled", "c"),
        ("step.cancelled", "d"),
        ("workflow.failed", None),
    ]
    step_failed = changes.events[1]
    assert (step_failed.from_status, step_failed.to_status) == ("running", "failed")
    assert step_failed.data["error"] == error
    cancelled = {e.step_id: e for e in changes.events if e.type == "step.cancelled"}
    assert cancelled["b"].from_status == "dispatched"
    assert cancelled["b"].attempt_id == d["b"].attempt_id
    assert cancelled["c"].from_status == "pending"
    assert changes.events[-1].data == {"error": {**error, "step_id": "a"}}
    assert changes.events[-1].from_status == "running"
    assert changes.status is RunStatus.FAILED
    assert changes.error == {**error, "step_id": "a"}
    assert changes.finished_at == at(5)
    assert changes.dispatches == []
    assert [(a.attempt_id, a.status, a.error) for a in changes.attempts_finished] == [
        (d["a"].attempt_id, StepStatus.FAILED, error),
        (d["b"].attempt_id, StepStatus.CANCELLED, None),
    ]
    assert run.outstanding() == []
    assert {sid: run.step_status(sid) for sid in "abcd"} == {
        "a": StepStatus.FAILED,
        "b": StepStatus.CANCELLED,
        "c": StepStatus.CANCELLED,
        "d": StepStatus.CANCELLED,
    }


def test_a_failed_result_without_an_error_gets_a_generic_one() -> None:
    run = new_run(workflow(http("a")))
    run.start(at(0))
    d = drain(run).dispatches[0]
    run.apply_result(StepResult(d.attempt_id, "a", "failed", None, None, None, at(1)), at(2))
    changes = drain(run)
    assert changes.error == {
        "message": "step failed",
        "step_id": "a",
        "retry_decision": "not retried: error is not in retry_on "
        "[timeout, connection_error, http_5xx, http_429]",
    }
    assert changes.events[0].at == at(1)  # no started_at: the finish time stands in


def test_continue_on_failure_lets_dependents_run_and_see_the_failure() -> None:
    wf = workflow(
        http("charge", continue_on_failure=True),
        transform(
            "report",
            {
                "status": "${{ steps.charge.status }}",
                "charged": "${{ steps.charge.status != 'failed' }}",
                "why": "${{ steps.charge.error.message }}",
            },
            "charge",
        ),
        http(
            "notify",
            "charge",
            params={"url": "https://svc.test/n", "json": "${{ steps.charge.status }}"},
        ),
    )
    run = new_run(wf)
    run.start(at(0))
    charge = drain(run).dispatches[0]
    error = {"message": "card declined", "category": "http_4xx", "retryable": False}

    assert run.apply_result(failed(charge, error), at(1))
    changes = drain(run)

    assert run.status is RunStatus.RUNNING
    assert ("workflow.failed", None) not in kinds(changes.events)
    assert run.step_status("charge") is StepStatus.FAILED
    [report] = changes.inline_results
    assert report.output == {"status": "failed", "charged": False, "why": "card declined"}
    [notify] = changes.dispatches
    assert notify.params["json"] == "failed"

    run.apply_result(ok(notify, "sent"), at(2))
    done = drain(run)
    assert done.status is RunStatus.COMPLETED
    assert done.output == {"report": report.output, "notify": "sent"}


# -- inline transforms ---------------------------------------------------------------------


def test_transform_steps_run_inline_and_keep_types() -> None:
    wf = workflow(
        http("a"),
        transform(
            "t",
            {
                "n": "${{ steps.a.output.n }}",
                "double": "${{ steps.a.output.n * 2 }}",
                "items": "${{ steps.a.output.items }}",
                "flag": "${{ steps.a.output.n > 1 }}",
                "text": "n=${{ steps.a.output.n }}",
                "nothing": "${{ null }}",
                "literal": [1, "two"],
            },
            "a",
        ),
        transform("u", "${{ steps.t.output.double + input.bonus }}", "t"),
    )
    run = new_run(wf, {"bonus": 100})
    run.start(at(0))
    a = drain(run).dispatches[0]
    run.apply_result(ok(a, {"n": 3, "items": [{"k": "x"}]}), at(4))
    changes = drain(run)

    expected_t = {
        "n": 3,
        "double": 6,
        "items": [{"k": "x"}],
        "flag": True,
        "text": "n=3",
        "nothing": None,
        "literal": [1, "two"],
    }
    assert [(r.step_id, r.outcome, r.output, r.at) for r in changes.inline_results] == [
        ("t", "succeeded", expected_t, at(4)),
        ("u", "succeeded", 106, at(4)),
    ]
    assert all(r.attempt_id is not None for r in changes.inline_results)
    assert changes.dispatches == []
    inline = [e for e in changes.events if e.step_id in ("t", "u")]
    assert [(e.type, e.from_status) for e in inline] == [
        ("step.succeeded", "pending"),
        ("step.succeeded", "pending"),
    ]
    assert changes.status is RunStatus.COMPLETED
    assert changes.output == {"u": 106}


def test_a_workflow_of_transforms_completes_inside_start() -> None:
    run = new_run(workflow(transform("only", {"v": "${{ input.v }}"})), {"v": [1, 2]})
    run.start(at(0))
    changes = drain(run)
    assert kinds(changes.events) == [
        ("workflow.started", None),
        ("step.succeeded", "only"),
        ("workflow.completed", None),
    ]
    assert changes.output == {"only": {"v": [1, 2]}}
    assert changes.finished_at == at(0)


# -- limits --------------------------------------------------------------------------------


def test_an_output_over_the_limit_fails_the_step_without_retry() -> None:
    limits = Limits(max_output_bytes=50, max_context_bytes=100_000, default_timeout=30.0)
    run = new_run(workflow(http("big")), limits=limits)
    run.start(at(0))
    d = drain(run).dispatches[0]
    output = {"blob": "x" * 100}
    size = json_size(output)

    run.apply_result(ok(d, output), at(1))
    changes = drain(run)

    [step_failed] = [e for e in changes.events if e.type == "step.failed"]
    error = step_failed.data["error"]
    assert error["category"] == "payload_too_large"
    assert error["retryable"] is False
    assert error["message"] == (
        f"step 'big': the output is {size} bytes, over the limit of 50 bytes"
    )
    assert error["details"]["size"] == size == 111
    assert error["details"]["limit"] == 50
    assert changes.status is RunStatus.FAILED
    assert changes.error == {**error, "step_id": "big"}
    assert [a.status for a in changes.attempts_finished] == [StepStatus.FAILED]


def test_a_run_context_over_the_limit_fails_the_step_that_overflows_it() -> None:
    limits = Limits(max_output_bytes=1_000, max_context_bytes=100, default_timeout=30.0)
    run = new_run(workflow(http("a"), http("b", "a")), limits=limits)  # input {}: 2 bytes
    run.start(at(0))
    payload = "y" * 50  # 52 bytes as JSON
    run.apply_result(ok(drain(run).dispatches[0], payload), at(1))
    b = drain(run).dispatches[0]
    assert run.step_status("a") is StepStatus.SUCCEEDED  # 2 + 52 fits

    run.apply_result(ok(b, payload), at(2))
    changes = drain(run)

    error = changes.error
    assert error is not None
    assert error["category"] == "payload_too_large"
    assert error["retryable"] is False
    assert error["step_id"] == "b"
    assert error["message"] == (
        "step 'b': the run context with this output is 106 bytes, over the limit of 100 bytes"
    )
    assert changes.status is RunStatus.FAILED


def test_a_transform_output_over_the_limit_fails_inline() -> None:
    limits = Limits(max_output_bytes=20, max_context_bytes=100_000, default_timeout=30.0)
    run = new_run(workflow(transform("t", "${{ input.text }}")), {"text": "z" * 40}, limits=limits)
    run.start(at(0))
    changes = drain(run)
    [inline] = changes.inline_results
    assert (inline.step_id, inline.outcome, inline.output) == ("t", "failed", None)
    assert inline.error is not None and inline.error["category"] == "payload_too_large"
    assert "step 't': the output is 42 bytes" in inline.error["message"]
    assert changes.status is RunStatus.FAILED


def test_a_template_that_fails_at_render_time_is_an_expression_error() -> None:
    wf = workflow(http("a", params={"url": "https://svc.test/${{ input.missing.x }}"}))
    run = new_run(wf, {"present": 1})
    run.start(at(0))
    changes = drain(run)

    [step_failed] = [e for e in changes.events if e.type == "step.failed"]
    assert step_failed.from_status == "pending"
    error = step_failed.data["error"]
    assert error["category"] == "expression_error"
    assert error["retryable"] is False
    assert "input.missing.x" in error["message"]
    assert "step 'a'" in error["message"]
    assert error["details"] == {"expression": "input.missing.x", "field": "with.url"}
    assert changes.dispatches == []
    assert changes.status is RunStatus.FAILED
    assert changes.error == {**error, "step_id": "a"}


def test_a_transform_that_fails_at_render_time_records_a_failed_inline_result() -> None:
    run = new_run(workflow(transform("t", "${{ input.nope }}")), {})
    run.start(at(0))
    changes = drain(run)
    [inline] = changes.inline_results
    assert inline.outcome == "failed"
    assert inline.error is not None
    assert inline.error["category"] == "expression_error"
    assert inline.error["details"]["expression"] == "input.nope"


# -- checkpoint and resume -----------------------------------------------------------------


DIAMOND = (
    http("a", params={"url": "https://svc.test/a/${{ input.k }}"}),
    http("b"),
    transform("t", {"a": "${{ steps.a.output.v }}"}, "a"),
    http("c", "t", params={"url": "https://svc.test/c", "json": "${{ steps.t.output }}"}),
    http("d", "b", "c", params={"url": "https://svc.test/d", "json": "${{ steps.b.output }}"}),
)


WF_DIAMOND = workflow(*DIAMOND)


def _finish(run: RunState, rec: Recorder, outputs: dict[str, Any], now: float) -> None:
    """Answer every outstanding attempt, in step order, until the run is over."""
    while run.status is RunStatus.RUNNING:
        sent = {d.attempt_id: d for d in rec.dispatches}
        for attempt_id in sorted(run.outstanding(), key=lambda a: sent[a].step_id):
            d = sent[attempt_id]
            now += 1
            assert rec.apply(run, ok(d, outputs[d.step_id]), at(now))


OUTPUTS = {"a": {"v": 1}, "b": "B", "c": {"c": True}, "d": "D"}


def test_a_checkpoint_and_stored_results_resume_the_run_where_it_was() -> None:
    # Uninterrupted reference run.
    ref, ref_rec = new_run(WF_DIAMOND, {"k": 9}), Recorder()
    ref.start(at(0))
    ref_rec.drain(ref)
    _finish(ref, ref_rec, OUTPUTS, 10)

    # The same run, interrupted after "a" (and the inline "t") finished.
    run, rec = new_run(WF_DIAMOND, {"k": 9}), Recorder()
    run.start(at(0))
    rec.drain(run)
    a = next(d for d in rec.dispatches if d.step_id == "a")
    rec.apply(run, ok(a, OUTPUTS["a"]), at(1))
    outstanding = {d.step_id: d for d in rec.dispatches if d.attempt_id in run.outstanding()}
    assert set(outstanding) == {"b", "c"}
    checkpoint, seq = rec.checkpoint, run.seq
    assert checkpoint["seq"] == seq

    adopted = rec.restore(run)
    assert adopted.seq == seq
    assert {s: adopted.step_status(s) for s in "abcd"} | {"t": adopted.step_status("t")} == {
        "a": StepStatus.SUCCEEDED,
        "b": StepStatus.DISPATCHED,
        "c": StepStatus.DISPATCHED,
        "d": StepStatus.PENDING,
        "t": StepStatus.SUCCEEDED,
    }
    adopted.resume(at(50))
    resumed = drain(adopted)

    assert resumed.events == []  # nothing new happened: only the queue is fed again
    assert {d.step_id: d for d in resumed.dispatches} == outstanding  # same ids, same params
    assert resumed.checkpoint == checkpoint
    assert adopted.seq == seq

    rec2 = Recorder(dispatches=list(resumed.dispatches), results=dict(rec.results))
    _finish(adopted, rec2, OUTPUTS, 60)
    assert rec2.events[0].seq == seq + 1
    assert [e.seq for e in rec.events + rec2.events] == list(range(1, len(ref_rec.events) + 1))
    assert kinds(rec.events + rec2.events) == kinds(ref_rec.events)
    assert rec2.status is RunStatus.COMPLETED
    assert rec2.output == ref_rec.output == {"d": "D"}
    # "d" was rendered from the restored output of "b", "c" from the restored transform.
    d_params = next(d.params for d in rec2.dispatches if d.step_id == "d")
    assert d_params["json"] == "B"
    assert outstanding["c"].params["json"] == {"a": 1}


def test_resume_of_a_run_that_lost_nothing_dispatches_nothing() -> None:
    run, rec = new_run(workflow(http("a"), http("b", "a"))), Recorder()
    run.start(at(0))
    rec.drain(run)
    adopted = rec.restore(run, with_results=False)
    adopted.resume(at(1))
    changes = adopted.take_changes()
    assert changes is not None
    assert [d.attempt_id for d in changes.dispatches] == [rec.dispatches[0].attempt_id]
    assert changes.events == []


def test_restored_outputs_count_toward_the_context_limit() -> None:
    limits = Limits(max_output_bytes=1_000, max_context_bytes=100, default_timeout=30.0)
    run, rec = new_run(workflow(http("a"), http("b", "a")), limits=limits), Recorder()
    run.start(at(0))
    rec.drain(run)
    rec.apply(run, ok(rec.dispatches[0], "y" * 50), at(1))
    adopted = rec.restore(run)
    adopted.resume(at(2))
    b = drain(adopted).dispatches[0]
    adopted.apply_result(ok(b, "y" * 50), at(3))
    changes = drain(adopted)
    assert changes.status is RunStatus.FAILED
    assert changes.error is not None and "106 bytes" in changes.error["message"]


@pytest.mark.parametrize("cause", ["payload_too_large", "expression_error"])
def test_an_orchestrator_decided_failure_survives_adoption(cause: str) -> None:
    limits = Limits(max_output_bytes=50, max_context_bytes=100_000, default_timeout=30.0)
    params = (
        {"url": "https://svc.test/${{ input.missing.x }}"}
        if cause == "expression_error"
        else {"url": "https://svc.test/big"}
    )
    wf = workflow(
        http("big", continue_on_failure=True, params=params),
        http("slow"),
        transform(
            "report",
            {"why": "${{ steps.big.error.category }}", "out": "${{ steps.big.output }}"},
            "big",
            "slow",
        ),
    )

    def final_output(adopt: bool) -> Any:
        run, rec = new_run(wf, limits=limits), Recorder()
        run.start(at(0))
        rec.drain(run)
        d = {x.step_id: x for x in rec.dispatches}
        if "big" in d:
            rec.apply(run, ok(d["big"], {"blob": "x" * 100}), at(1))
        assert run.step_status("big") is StepStatus.FAILED
        if adopt:
            run = rec.restore(run)
            run.resume(at(2))
            rec.drain(run)
        rec.apply(run, ok(d["slow"], 1), at(3))
        assert rec.status is RunStatus.COMPLETED
        return rec.output

    assert final_output(adopt=False) == {"report": {"why": cause, "out": None}}
    assert final_output(adopt=True) == final_output(adopt=False)


# -- sequence and changes ------------------------------------------------------------------


def test_take_changes_drains_and_carries_the_latest_checkpoint_and_status() -> None:
    run = new_run(workflow(http("a")))
    assert run.take_changes() is None  # nothing happened yet
    run.start(at(0))
    first = run.take_changes()
    assert first is not None
    assert run.take_changes() is None
    assert (first.run_id, first.status) == (RUN_ID, RunStatus.RUNNING)
    assert first.checkpoint == run.checkpoint()
    assert first.checkpoint["steps"]["a"] == "d1"  # dispatched, attempt 1

    run.apply_result(ok(first.dispatches[0], 1), at(1))
    second = run.take_changes()
    assert second is not None and run.take_changes() is None
    assert second.status is RunStatus.COMPLETED
    assert second.checkpoint == {"v": 2, "seq": 5, "steps": {"a": "S1"}}
    assert [e.seq for e in first.events + second.events] == [1, 2, 3, 4, 5]


def test_rejected_run_is_a_single_workflow_failed_event() -> None:
    error = {"message": "workflow 'nope' has no definition", "category": "definition"}
    changes = rejected_run(RUN_ID, RunStatus.PENDING, 0, error, at(7))
    [event] = changes.events
    assert (event.seq, event.type, event.from_status, event.to_status, event.at) == (
        1,
        "workflow.failed",
        "pending",
        "failed",
        at(7),
    )
    assert event.data == {"error": error}
    assert event.step_id is None
    assert changes.status is RunStatus.FAILED
    assert changes.error == error
    assert changes.finished_at == at(7)
    assert changes.checkpoint == {"v": 3, "seq": 1, "steps": {}}
    assert changes.dispatches == []
    assert not [e for e in changes.events if e.type == "step.dispatched"]
    assert changes.inline_results == []

    adopted = rejected_run(RUN_ID, RunStatus.RUNNING, 6, error, at(8))
    assert [e.seq for e in adopted.events] == [7]
    assert adopted.checkpoint["seq"] == 7
    with pytest.raises(IllegalTransition):
        rejected_run(RUN_ID, RunStatus.COMPLETED, 9, error, at(9))


def test_json_size_is_compact_utf8() -> None:
    assert json_size({"a": [1, 2]}) == len('{"a":[1,2]}')
    assert json_size("é") == 4  # two quotes + two UTF-8 bytes
    assert json_size(None) == 4


# -- property: random DAGs -----------------------------------------------------------------


def _random_workflow(rng: random.Random) -> CompiledWorkflow:
    n = rng.randint(1, 12)
    steps = []
    for i in range(n):
        earlier = [f"s{j}" for j in range(i)]
        deps = rng.sample(earlier, rng.randint(0, min(len(earlier), 3)))
        steps.append(
            http(
                f"s{i}",
                *deps,
                params={
                    "url": "https://svc.test/x",
                    "json": {d: f"${{{{ steps.{d}.output }}}}" for d in deps},
                },
            )
        )
    return workflow(*steps)


@pytest.mark.parametrize("seed", range(150))
def test_random_dags_always_complete_in_dependency_order(seed: int) -> None:
    rng = random.Random(seed)
    wf = _random_workflow(rng)
    run, rec = new_run(wf), Recorder()
    run.start(at(0))
    rec.drain(run)
    now = 0
    while run.status is RunStatus.RUNNING:
        outstanding = run.outstanding()
        assert outstanding, "a running run with nothing outstanding is stuck"
        if rng.random() < 0.1:  # now and then, another orchestrator adopts the run
            run = rec.restore(run)
            run.resume(at(now))
            resumed = drain(run)
            assert resumed.events == []
            assert sorted(d.attempt_id for d in resumed.dispatches) == sorted(outstanding)
            continue
        attempt_id = rng.choice(outstanding)
        d = next(x for x in rec.dispatches if x.attempt_id == attempt_id)
        now += 1
        assert rec.apply(run, ok(d, {"step": d.step_id}), at(now))
    steps = [s.id for s in wf.definition.steps]
    assert rec.status is RunStatus.COMPLETED
    assert [e.seq for e in rec.events] == list(range(1, len(rec.events) + 1))
    dispatched = [e.step_id or "" for e in rec.events if e.type == "step.dispatched"]
    assert sorted(dispatched) == sorted(steps)  # each step exactly once
    position = {(e.type, e.step_id): i for i, e in enumerate(rec.events)}
    for sid, step in ((s.id, s) for s in wf.definition.steps):
        for dep in step.depends_on:
            assert position[("step.succeeded", dep)] < position[("step.dispatched", sid)]
    for d in rec.dispatches:
        assert d.params["json"] == {
            dep: {"step": dep} for dep in wf.definition.step(d.step_id).depends_on
        }
    assert rec.output == {sid: {"step": sid} for sid in wf.root.sinks}
    assert kinds(rec.events)[-1] == ("workflow.completed", None)
