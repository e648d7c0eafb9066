"""Conditions, fork/join, fan-out and delays through real PostgreSQL, Redis and a worker."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from flowforge_orchestrator import store
from tests.helpers import wait_for
from tests.integration.conftest import Engine, Steps


def _by_step(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for event in events:
        step_id = event["data"].get("step_id")
        if step_id:
            out.setdefault(step_id, []).append(event["type"])
    return out


ROUTE = """
name: route
version: 1
steps:
  - id: order
    type: echo
    with: {total: "${{ input.total }}"}
  - id: route
    type: condition
    depends_on: [order]
    if: "steps.order.output.total > 1000"
    then:
      - {id: review, type: echo, with: {who: reviewer}}
      - id: notify
        type: parallel
        depends_on: [review]
        branches:
          - [{id: email, type: echo, with: {via: email}}]
          - [{id: sms, type: echo, with: {via: sms}}]
    else:
      - {id: approve, type: echo, with: {auto: true}}
      - {id: ship, type: echo, depends_on: [approve], with: {ship: true}}
  - id: after_ship
    type: transform
    depends_on: [route]
    output: {branch: "${{ steps.route.output.branch }}"}
"""


async def test_a_condition_runs_one_branch_and_records_the_other_as_skipped(
    steps_engine: Engine, steps: Steps
) -> None:
    await steps_engine.register(ROUTE)
    big = await steps_engine.submit("route", {"total": 5000})
    small = await steps_engine.submit("route", {"total": 10})

    run = await steps_engine.finished(big)
    assert run["status"] == "completed", run["error"]
    assert run["output"] == {"after_ship": {"branch": "then"}}
    events = _by_step(await steps_engine.events(big))
    assert events["approve"] == events["ship"] == ["step.skipped"]
    assert events["notify"] == ["step.started", "step.succeeded"]
    assert events["email"][-1] == events["sms"][-1] == "step.succeeded"

    run = await steps_engine.finished(small)
    assert run["status"] == "completed", run["error"]
    events = _by_step(await steps_engine.events(small))
    # Every step of the branch not taken is skipped, nested ones included.
    for skipped in ("review", "notify", "email", "sms"):
        assert events[skipped] == ["step.skipped"], skipped
    assert events["ship"][-1] == "step.succeeded"
    route = next(
        e
        for e in await steps_engine.events(small)
        if e["type"] == "step.started" and e["data"]["step_id"] == "route"
    )
    assert route["data"]["branch"] == "else"


RACE = """
name: race
version: 1
steps:
  - id: race
    type: parallel
    join: any
    branches:
      - [{id: fast, type: gate, with: {winner: true}}]
      - [{id: slow, type: hold, with: {}}]
      - [{id: later, type: hold, with: {}}, {id: never, type: echo, depends_on: [later]}]
"""


async def test_join_any_cancels_the_losers_and_aborts_them_on_the_worker(
    steps_engine: Engine, steps: Steps
) -> None:
    await steps_engine.register(RACE)
    run_id = await steps_engine.submit("race")
    # The fast branch is held on the worker until both slow ones run there too; the slow
    # ones are never released: only an abort can end them.
    await wait_for(
        lambda: {"fast", "slow", "later"} <= set(steps.started),
        message="the three branches never ran at once",
    )
    steps.gate_open.set()
    run = await steps_engine.finished(run_id)

    assert run["status"] == "completed", run["error"]
    branches = run["output"]["race"]
    assert branches[0] == {"status": "succeeded", "output": {"winner": True}}
    assert [b["status"] for b in branches[1:]] == ["cancelled", "cancelled"]
    events = _by_step(await steps_engine.events(run_id))
    assert events["never"] == ["step.cancelled"]  # pending: never dispatched
    assert events["slow"][-1] == events["later"][-1] == "step.cancelled"
    attempts = {
        r["step_id"]: r["status"] for r in await store.run_attempts(steps_engine.conn, run_id)
    }
    assert attempts["slow"] == attempts["later"] == "cancelled"
    # Both losers were running on the worker: each is aborted there, once.
    await wait_for(
        lambda: sorted(steps.aborted) == ["later", "slow"],
        message="the losers were not aborted on the worker",
    )
    assert steps.running == 0


FAN_OUT = """
name: fan
version: 1
steps:
  - id: items
    type: echo
    with: {list: "${{ input.items }}"}
  - id: each
    type: parallel
    depends_on: [items]
    for_each: "steps.items.output.list"
    max_parallel: 2
    step: {id: one, type: hold, with: {n: "${{ item * 10 }}", i: "${{ index }}"}}
"""


async def test_for_each_bounds_the_branches_running_at_once_and_keeps_their_order(
    steps_engine: Engine, steps: Steps
) -> None:
    await steps_engine.register(FAN_OUT)
    run_id = await steps_engine.submit("fan", {"items": [1, 2, 3, 4, 5]})
    await wait_for(lambda: steps.running == 2, message="two branches should run")
    steps.release.set()

    run = await steps_engine.finished(run_id)
    assert run["status"] == "completed", run["error"]
    assert run["output"]["each"] == [
        {"status": "succeeded", "output": {"n": 10 * i, "i": i - 1}} for i in range(1, 6)
    ]
    assert steps.most_running == 2
    assert sorted(steps.started[1:]) == [f"one[{i}]" for i in range(5)]


async def test_for_each_over_an_empty_list_completes_with_an_empty_output(
    steps_engine: Engine,
) -> None:
    await steps_engine.register(FAN_OUT)
    run = await steps_engine.finished(await steps_engine.submit("fan", {"items": []}))
    assert run["status"] == "completed", run["error"]
    assert run["output"] == {"each": []}


FAIL_FAST = """
name: all_or_nothing
version: 1
steps:
  - id: all
    type: parallel
    fail_fast: ${fail_fast}
    branches:
      - [{id: bad, type: refuse, with: {}}]
      - [{id: good, type: hold, with: {}}]
"""


@pytest.mark.parametrize("fail_fast", [True, False])
async def test_fail_fast_cancels_the_rest_and_wait_all_lets_them_finish(
    steps_engine: Engine, steps: Steps, fail_fast: bool
) -> None:
    await steps_engine.register(FAIL_FAST.replace("${fail_fast}", str(fail_fast).lower()))
    run_id = await steps_engine.submit("all_or_nothing")
    if not fail_fast:
        # The join is already impossible, but the run waits for the other branch.
        await wait_for(lambda: "good" in steps.started, message="good never started")

        async def bad_failed() -> bool:
            return "step.failed" in _by_step(await steps_engine.events(run_id)).get("bad", [])

        await wait_for(bad_failed, message="bad did not fail")
        assert (await steps_engine.run(run_id))["status"] == "running"
        steps.release.set()

    run = await steps_engine.finished(run_id)
    assert run["status"] == "failed"
    assert run["error"]["category"] == "join_failed"
    assert run["error"]["step_id"] == "all"
    assert "1 of 2 branches failed" in run["error"]["message"]
    good = _by_step(await steps_engine.events(run_id))["good"]
    assert good[-1] == ("step.cancelled" if fail_fast else "step.succeeded")


WAIT = """
name: wait
version: 1
steps:
  - {id: first, type: echo, with: {}}
  - {id: pause, type: delay, duration: 1s, depends_on: [first]}
  - {id: after, type: echo, depends_on: [pause], with: {}}
"""


async def test_a_delay_holds_the_next_step_until_its_time(steps_engine: Engine) -> None:
    await steps_engine.register(WAIT)
    run_id = await steps_engine.submit("wait")
    run = await steps_engine.finished(run_id)
    assert run["status"] == "completed", run["error"]
    events = await steps_engine.events(run_id)
    started = next(
        e for e in events if e["type"] == "step.started" and e["data"]["step_id"] == "pause"
    )
    due = datetime.fromisoformat(started["data"]["until"])
    dispatched = next(
        e for e in events if e["type"] == "step.dispatched" and e["data"]["step_id"] == "after"
    )
    assert dispatched["time"] >= due


BAD_IF = """
name: bad_if
version: 1
steps:
  - {id: first, type: echo, with: {n: 1}}
  - id: check
    type: condition
    depends_on: [first]
    if: "steps.first.output.missing > 1"
    then: [{id: x, type: echo, with: {}}]
"""


async def test_an_expression_failing_at_run_time_fails_the_step_and_names_it(
    steps_engine: Engine,
) -> None:
    await steps_engine.register(BAD_IF)
    run = await steps_engine.finished(await steps_engine.submit("bad_if"))
    assert run["status"] == "failed"
    error = run["error"]
    assert error["category"] == "expression_error"
    assert error["retryable"] is False
    assert error["step_id"] == "check"
    assert error["details"]["expression"] == "steps.first.output.missing > 1"
    assert "missing" in error["message"]


BIG_FAN = """
name: big_fan
version: 1
steps:
  - id: each
    type: parallel
    for_each: "input.items"
    step: {id: one, type: echo, with: {n: "${{ item }}"}}
  - id: total
    type: transform
    depends_on: [each]
    output: {count: "${{ size(steps.each.output) }}"}
"""


async def test_a_fan_out_of_a_thousand_items_completes(steps_engine: Engine) -> None:
    await steps_engine.register(BIG_FAN)
    run_id = await steps_engine.submit("big_fan", {"items": list(range(1000))})
    run = await steps_engine.finished(run_id, timeout=60)
    assert run["status"] == "completed", run["error"]
    assert run["output"] == {"total": {"count": 1000}}
    # A finished fan-out leaves only its own entry in the checkpoint.
    checkpoint = await steps_engine.conn.fetchval(
        "SELECT checkpoint FROM flowforge.runs WHERE id = $1", run_id
    )
    assert set(checkpoint["steps"]) == {"each", "total"}
