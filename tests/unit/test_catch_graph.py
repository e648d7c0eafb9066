"""`catch`, `switch` and `fail` in one run's graph: which handler takes a failure (after the
retries), what the caught step's dependents see, the history kept, and restores mid-handler.
Pure: no services."""

from __future__ import annotations

from typing import Any

from flowforge_orchestrator.core.state import RunStatus, StepStatus
from tests.unit.test_control_flow import Live, adopt, parallel
from tests.unit.test_graph import at, failed, http, kinds, ok, transform, workflow

E503 = {"message": "unavailable", "category": "http_503"}
E400 = {"message": "bad request", "category": "http_400", "retryable": False}


def catching(*handlers: tuple[list[str] | None, list[Any]]) -> list[dict[str, Any]]:
    return [
        {"steps": steps} | ({"errors": errors} if errors is not None else {})
        for errors, steps in handlers
    ]


def step_events(live: Live, key: str) -> list[str]:
    return [e.type for e in live.rec.events if e.step_id == key]


def test_a_matching_handler_runs_after_the_retries_and_dependents_see_its_output() -> None:
    wf = workflow(
        http(
            "charge",
            retry={"max_retries": 1, "initial_interval": 1, "jitter": False},
            catch=catching(
                (["http_400"], [transform("never", 1)]),
                (
                    ["http_5xx"],
                    [transform("fallback", {"why": "${{ error.category }}: ${{ error.message }}"})],
                ),
            ),
        ),
        transform("after", "${{ steps.charge.output.why }}", "charge"),
    )
    live = Live.start(wf)
    live.fail("charge", now=1, error=E503)
    # Not caught while a retry is left.
    assert live.status("charge") is StepStatus.RETRYING
    assert "step.caught" not in step_events(live, "charge")
    live.fire(2)
    live.fail("charge", now=3, error=E503)

    assert step_events(live, "charge") == [
        "step.dispatched",
        "step.started",
        "step.retrying",
        "step.dispatched",
        "step.started",
        "step.failed",
        "step.caught",
        "step.succeeded",
    ]
    failed_event = next(e for e in live.rec.events if e.type == "step.failed")
    assert failed_event.data["caught"] is True and failed_event.to_status == "failed"
    assert live.event("step.caught", "charge").data["handler"] == 1
    assert live.status("never") is StepStatus.PENDING  # the other handler never ran
    assert live.run.status is RunStatus.COMPLETED
    assert live.rec.output == {"after": "http_503: unavailable"}


def test_a_catch_all_takes_any_error_and_an_unmatched_one_fails_as_before() -> None:
    def wf_with(errors: list[str] | None) -> Any:
        return workflow(http("a", catch=catching((errors, [transform("h", "handled")]))))

    caught = Live.start(wf_with(None))
    caught.fail("a", error=E400)
    assert caught.run.status is RunStatus.COMPLETED
    assert caught.rec.output == {"a": "handled"}

    unmatched = Live.start(wf_with(["timeout", "RateLimited"]))
    unmatched.fail("a", error=E400)
    assert unmatched.run.status is RunStatus.FAILED
    assert unmatched.status("h") is StepStatus.PENDING
    assert step_events(unmatched, "a")[-1] == "step.failed"
    assert "step.caught" not in step_events(unmatched, "a")


def test_a_handler_that_fails_fails_the_step_and_it_catches_only_once() -> None:
    wf = workflow(
        http("a", catch=catching((None, [http("h1"), http("h2", "h1")]))),
        http("b", "a"),
    )
    live = Live.start(wf)
    live.fail("a", error=E400)
    live.ok("h1")
    live.fail("h2", error=E400)
    assert live.status("a") is StepStatus.FAILED
    assert step_events(live, "a")[-3:] == ["step.failed", "step.caught", "step.failed"]
    error = live.run.error
    assert error is not None and error["category"] == "handler_failed"
    assert error["details"]["failed_step"] == "h2"
    assert live.status("b") is StepStatus.CANCELLED
    assert "b" not in live.dispatched()


def test_catch_on_a_parallel_step_whose_branch_failed() -> None:
    wf = workflow(
        parallel(
            "fan",
            [http("x")],
            [http("y")],
            catch=catching((["join_failed"], [transform("h", "${{ error.details.branches }}")])),
        )
    )
    live = Live.start(wf)
    live.fail("x", error=E400)
    assert live.status("fan") is StepStatus.SUCCEEDED
    assert live.run.status is RunStatus.COMPLETED
    branches = live.rec.output["fan"]
    assert branches[0]["status"] == "failed" and branches[1]["status"] == "cancelled"


def test_a_restore_mid_handler_resumes_it_with_error_and_the_output() -> None:
    wf = workflow(
        http(
            "a",
            catch=catching(
                (
                    None,
                    [
                        http("h1"),
                        transform(
                            "h2",
                            "${{ error.message }} (${{ error.step_id }}/${{ error.attempt }})",
                            "h1",
                        ),
                    ],
                )
            ),
        ),
        transform("after", "${{ steps.a.output }}", "a"),
    )
    live = Live.start(wf)
    live.fail("a", error=E503 | {"retryable": False})
    assert live.dispatched()[-1] == "h1"
    adopted, changes = adopt(live.run, live.rec, 11)
    assert changes.events == []
    assert [d.step_id for d in changes.dispatches] == ["h1"]
    assert adopted.step_status("a") is StepStatus.RUNNING
    assert adopted.outstanding() == [live.dispatch("h1").attempt_id]
    live.run = adopted
    live.ok("h1", now=12)
    assert live.run.status is RunStatus.COMPLETED
    assert live.rec.output == {"after": "unavailable (a/1)"}
    # And once it has ended, a restore gives the caught step its handler's output again.
    again = live.rec.restore(live.run)
    assert again.checkpoint() == live.rec.checkpoint


def test_a_caught_wait_step_stops_listening() -> None:
    wf = workflow(
        {
            "id": "w",
            "type": "wait",
            "event": "approved",
            "timeout": 5,
            "catch": catching((["event_timeout"], [transform("h", "no answer")])),
        }
    )
    live = Live.start(wf)
    assert live.run.waiting()
    live.fire(5)
    assert live.run.status is RunStatus.COMPLETED
    assert live.rec.output == {"w": "no answer"}
    assert step_events(live, "w") == [
        "step.waiting",
        "step.failed",
        "step.caught",
        "step.succeeded",
    ]


# -- switch -------------------------------------------------------------------------------------


def switch(step_id: str, cases: list[tuple[str, list[Any]]], default: list[Any], *deps: str) -> Any:
    return {
        "id": step_id,
        "type": "switch",
        "depends_on": list(deps),
        "cases": [{"when": when, "steps": steps} for when, steps in cases],
        "default": default,
    }


def three_way() -> Any:
    return switch(
        "route",
        [
            ("input.n == 1", [transform("one", "one")]),
            ("input.n == 2", [http("two")]),
            (
                "input.n == 3",
                [parallel("three", [transform("three_a", "a")], [transform("three_b", "b")])],
            ),
        ],
        [transform("other", "other")],
    )


def test_switch_runs_the_first_true_case_and_skips_every_other_list_at_every_depth() -> None:
    live = Live.start(workflow(parallel("outer", [three_way()], [transform("side", 1)])), {"n": 3})
    assert live.run.status is RunStatus.COMPLETED
    out = live.rec.output["outer"][0]["output"]
    assert out == {
        "case": 2,
        "output": [{"status": "succeeded", "output": "a"}, {"status": "succeeded", "output": "b"}],
    }
    skipped = {e.step_id for e in live.rec.events if e.type == "step.skipped"}
    assert skipped == {"one", "two", "other"}

    default = Live.start(workflow(three_way()), {"n": 9})
    assert default.rec.output == {"route": {"case": "default", "output": "other"}}
    assert {e.step_id for e in default.rec.events if e.type == "step.skipped"} == {
        "one",
        "two",
        "three",
        "three_a",
        "three_b",
    }


def test_a_switch_case_that_fails_fails_the_switch_and_a_restore_keeps_the_choice() -> None:
    live = Live.start(workflow(three_way()), {"n": 2})
    adopted, changes = adopt(live.run, live.rec, 5)
    assert changes.events == [] and [d.step_id for d in changes.dispatches] == ["two"]
    live.run = adopted
    live.fail("two", error=E400)
    assert live.run.status is RunStatus.FAILED
    assert live.run.error is not None and live.run.error["category"] == "branch_failed"


def test_a_when_that_is_not_boolean_fails_with_expression_error() -> None:
    wf = workflow(switch("s", [("input.n", [transform("x", 1)])], []))
    live = Live.start(wf, {"n": 1})
    assert live.run.status is RunStatus.FAILED
    error = live.run.error
    assert error is not None and error["category"] == "expression_error"
    assert "`when` must give true or false, got int" in error["message"]
    assert error["details"]["field"] == "cases.0.when"


# -- fail ---------------------------------------------------------------------------------------


def fail_step(step_id: str, *deps: str, **error: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "fail", "depends_on": list(deps), "error": error}


def test_fail_ends_with_its_templated_error_and_is_caught_by_category() -> None:
    check = fail_step(
        "check",
        message="order ${{ input.order }} is invalid",
        category="InvalidOrder",
        details={"order": "${{ input.order }}"},
    )
    alone = Live.start(workflow(check), {"order": 7})
    assert alone.run.status is RunStatus.FAILED
    assert alone.run.error == {
        "message": "order 7 is invalid",
        "category": "InvalidOrder",
        "retryable": False,
        "details": {"order": 7},
        "step_id": "check",
    }

    caught = Live.start(
        workflow(
            check
            | {"catch": catching((["InvalidOrder"], [transform("h", "${{ error.message }}")]))}
        ),
        {"order": 8},
    )
    assert caught.run.status is RunStatus.COMPLETED
    assert caught.rec.output == {"check": "order 8 is invalid"}
    assert kinds(caught.rec.events)[1:4] == [
        ("step.failed", "check"),
        ("step.caught", "check"),
        ("step.succeeded", "h"),
    ]


def test_a_fail_whose_message_renders_empty_fails_with_expression_error() -> None:
    live = Live.start(workflow(fail_step("f", message="${{ input.m }}")), {"m": ""})
    error = live.run.error
    assert error is not None and error["category"] == "expression_error"
    assert error["details"]["field"] == "error.message"
    assert live.run.next_timer() is None


def test_the_failed_attempt_of_a_caught_step_delivered_again_changes_nothing() -> None:
    wf = workflow(http("a", catch=catching((None, [http("h")]))))
    live = Live.start(wf)
    live.fail("a", error=E400)
    again = failed(live.dispatch("a"), E400)
    assert live.run.apply_result(again, at(20)) is False
    assert live.run.apply_result(ok(live.dispatch("a"), {"late": True}), at(21)) is False
    assert live.run.take_changes() is None
    assert live.status("a") is StepStatus.RUNNING
    live.ok("h", {"done": 1})
    assert live.rec.output == {"a": {"done": 1}}
