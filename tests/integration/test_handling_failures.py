"""catch, compensation (sagas), switch and fail through real PostgreSQL, Redis and a worker:
what runs, in which order, what the history and `runs show` keep."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.core.graph.run import CompiledWorkflow
from flowforge_orchestrator.engine.orchestrator import run_orchestrator
from flowforge_orchestrator.views.render import build_tree, render_tree
from flowforge_orchestrator.worker.runtime import load_step_types, run_worker
from tests.helpers import stop_tasks, wait_for
from tests.integration.conftest import Engine, Steps


def step_events(events: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(e["type"], e["data"].get("step_id")) for e in events]


def of(events: list[dict[str, Any]], key: str) -> list[str]:
    return [t for t, k in step_events(events) if k == key]


CATCHING = """
name: catching
version: 1
steps:
  - id: pay
    type: refuse
    catch:
      - errors: [http_5xx]
        steps: [{id: never, type: echo, with: {}}]
      - errors: ["${ERRORS}"]
        steps:
          - id: fallback
            type: echo
            with: {why: "${{ error.category }}", step: "${{ error.step_id }}"}
  - id: after
    type: transform
    depends_on: [pay]
    output: "${{ steps.pay.output.why }}"
"""


async def test_catch_by_category_catch_all_and_an_unmatched_error(steps_engine: Engine) -> None:
    for name, errors in (("by_category", "ValueError"), ("unmatched", "timeout")):
        text = CATCHING.replace('"${ERRORS}"', errors).replace("name: catching", f"name: {name}")
        await steps_engine.register(text)
    await steps_engine.register(
        CATCHING.replace('      - errors: ["${ERRORS}"]\n', "      - \n").replace(
            "name: catching", "name: catch_all"
        )
    )
    caught = await steps_engine.submit("by_category")
    unmatched = await steps_engine.submit("unmatched")
    anything = await steps_engine.submit("catch_all")

    run = await steps_engine.finished(caught)
    assert run["status"] == "completed", run["error"]
    assert run["output"] == {"after": "ValueError"}
    events = await steps_engine.events(caught)
    assert of(events, "pay")[-3:] == ["step.failed", "step.caught", "step.succeeded"]
    assert "never" not in {k for _, k in step_events(events)}
    caught_event = next(e for e in events if e["type"] == "step.caught")
    assert caught_event["data"]["handler"] == 1
    assert caught_event["data"]["error"]["category"] == "ValueError"

    run = await steps_engine.finished(anything)
    assert run["status"] == "completed", run["error"]
    assert run["output"] == {"after": "ValueError"}

    run = await steps_engine.finished(unmatched)
    assert run["status"] == "failed"
    assert run["error"]["category"] == "ValueError" and run["error"]["step_id"] == "pay"
    assert "step.caught" not in of(await steps_engine.events(unmatched), "pay")


HANDLER_FAILS = """
name: handler_fails
version: 1
steps:
  - id: fan
    type: parallel
    branches:
      - [{id: good, type: echo, with: {}}]
      - [{id: bad, type: refuse, with: {}}]
    catch:
      - errors: [join_failed]
        steps: [{id: cleanup, type: refuse, with: {}}]
"""

CAUGHT_FAN = """
name: caught_fan
version: 1
steps:
  - id: fan
    type: parallel
    fail_fast: false
    branches:
      - [{id: good, type: echo, with: {n: 1}}]
      - [{id: bad, type: refuse, with: {}}]
    catch:
      - errors: [join_failed]
        steps:
          - id: salvage
            type: transform
            output: "${{ error.details.branches[0].output }}"
"""


async def test_catch_on_a_parallel_step_and_a_handler_that_fails(steps_engine: Engine) -> None:
    await steps_engine.register(CAUGHT_FAN)
    await steps_engine.register(HANDLER_FAILS)
    salvaged = await steps_engine.submit("caught_fan")
    broken = await steps_engine.submit("handler_fails")

    run = await steps_engine.finished(salvaged)
    assert run["status"] == "completed", run["error"]
    assert run["output"] == {"fan": {"n": 1}}

    run = await steps_engine.finished(broken)
    assert run["status"] == "failed"
    assert run["error"]["category"] == "handler_failed"
    assert run["error"]["details"]["failed_step"] == "cleanup"
    assert of(await steps_engine.events(broken), "fan")[-3:] == [
        "step.failed",
        "step.caught",
        "step.failed",
    ]


SAGA = """
name: saga
version: 1
steps:
  - id: reserve
    type: echo
    with: {item: "${{ input.item }}"}
    compensate:
      - {id: release, type: echo, with: {item: "${{ steps.reserve.output.item }}"}}
  - id: charge
    type: echo
    depends_on: [reserve]
    with: {amount: 10}
    compensate:
      - id: refund
        type: ${REFUND}
        retry: {max_retries: 1, initial_interval: 0.05, retry_on: [ValueError]}
        with: {amount: "${{ steps.charge.output.amount }}", why: "${{ error.message }}"}
  - id: ship
    type: ${SHIP}
    depends_on: [charge]
    with: {}
  - id: notify
    type: echo
    depends_on: [ship]
    with: {}
    compensate: [{id: unnotify, type: echo, with: {}}]
"""


async def saga_run(engine: Engine, ship: str, refund: str = "echo") -> UUID:
    name = f"saga_{ship}_{refund}"
    text = SAGA.replace("${SHIP}", ship).replace("${REFUND}", refund)
    await engine.register(text.replace("name: saga", f"name: {name}"))
    return await engine.submit(name, {"item": "book"})


async def test_a_failed_saga_compensates_in_reverse_order_and_ends_failed(
    steps_engine: Engine, steps: Steps
) -> None:
    run_id = await saga_run(steps_engine, ship="refuse")
    run = await steps_engine.finished(run_id)
    assert run["status"] == "failed"
    assert steps.started == ["reserve", "charge", "refund", "release"]  # unnotify: never
    assert run["error"]["step_id"] == "ship"
    assert run["error"]["compensation"] == {
        "steps": {"charge": "compensated", "reserve": "compensated"}
    }
    events = await steps_engine.events(run_id)
    phase = [(t, k) for t, k in step_events(events) if "compensat" in t]
    assert phase == [
        ("workflow.compensating", None),
        ("step.compensating", "charge"),
        ("step.compensated", "charge"),
        ("step.compensating", "reserve"),
        ("step.compensated", "reserve"),
    ]
    assert [e["type"] for e in events][-1] == "workflow.failed"
    refund = await steps_engine.conn.fetchval(
        "SELECT output FROM flowforge.step_results WHERE step_id = 'refund'"
    )
    assert refund == {"amount": 10, "why": "ValueError: ship refuses"}

    # `runs show` draws the compensations and how they went.
    defn = await store.get_definition(steps_engine.conn, "saga_refuse_echo", 1)
    assert defn is not None
    workflow = CompiledWorkflow(parse_definition(defn.spec))
    checkpoint = await steps_engine.conn.fetchval(
        "SELECT checkpoint FROM flowforge.runs WHERE id = $1", run_id
    )
    tree = render_tree(build_tree(workflow, checkpoint), datetime.now(UTC))
    assert tree.count("compensate (compensated)") == 2


async def test_a_saga_cancelled_mid_way_compensates_what_finished(
    steps_engine: Engine, steps: Steps
) -> None:
    run_id = await saga_run(steps_engine, ship="hold")
    await wait_for(lambda: "ship" in steps.started, message="ship never started")
    assert await store.request_cancel(steps_engine.conn, run_id, "customer asked") == (
        True,
        "running",
    )
    run = await steps_engine.finished(run_id)
    assert run["status"] == "cancelled"
    await wait_for(lambda: "ship" in steps.aborted, message="ship was not aborted")
    assert steps.started[-2:] == ["refund", "release"]
    end = (await steps_engine.events(run_id))[-1]
    assert end["type"] == "workflow.cancelled"
    assert end["data"]["compensation"] == {
        "steps": {"charge": "compensated", "reserve": "compensated"}
    }


async def test_a_compensation_that_fails_after_its_retries_does_not_stop_the_others(
    steps_engine: Engine, steps: Steps
) -> None:
    run_id = await saga_run(steps_engine, ship="refuse", refund="refuse")
    run = await steps_engine.finished(run_id)
    assert run["status"] == "failed"
    assert "release" in steps.started
    assert run["error"]["compensation_failed"] == ["charge"]
    assert run["error"]["compensation"]["steps"] == {
        "charge": "compensation_failed",
        "reserve": "compensated",
    }
    events = await steps_engine.events(run_id)
    assert of(events, "refund").count("step.retrying") == 1
    failed = next(e for e in events if e["type"] == "step.compensation_failed")
    assert failed["data"]["error"]["category"] == "ValueError"


SWITCH = """
name: routing
version: 1
steps:
  - id: fan
    type: parallel
    branches:
      - - id: route
          type: switch
          cases:
            - {when: "input.kind == 'a'", steps: [{id: on_a, type: echo, with: {case: a}}]}
            - {when: "input.kind == 'b'", steps: [{id: on_b, type: echo, with: {case: b}}]}
            - when: "input.kind == 'c'"
              steps:
                - {id: on_c, type: echo, with: {case: c}}
                - {id: on_c2, type: echo, depends_on: [on_c], with: {again: true}}
          default: [{id: other, type: echo, with: {case: other}}]
      - [{id: side, type: echo, with: {}}]
"""


async def test_a_switch_in_a_parallel_branch_runs_one_case(steps_engine: Engine) -> None:
    await steps_engine.register(SWITCH)
    runs = {kind: await steps_engine.submit("routing", {"kind": kind}) for kind in "bcz"}
    expected = {
        "b": {"case": 1, "output": {"case": "b"}},
        "c": {"case": 2, "output": {"again": True}},
        "z": {"case": "default", "output": {"case": "other"}},
    }
    for kind, run_id in runs.items():
        run = await steps_engine.finished(run_id)
        assert run["status"] == "completed", run["error"]
        assert run["output"]["fan"][0]["output"] == expected[kind]
    skipped = {
        k for t, k in step_events(await steps_engine.events(runs["c"])) if t == "step.skipped"
    }
    assert skipped == {"on_a", "on_b", "other"}


FAIL = """
name: validate
version: 1
steps:
  - id: check
    type: fail
    error:
      message: "order ${{ input.order }} has no lines"
      category: InvalidOrder
      details: {order: "${{ input.order }}"}
    catch:
      - errors: [InvalidOrder]
        steps: [{id: reject, type: echo, with: {told: "${{ error.message }}"}}]
"""


async def test_fail_with_a_templated_message_caught_by_catch(steps_engine: Engine) -> None:
    await steps_engine.register(FAIL)
    run_id = await steps_engine.submit("validate", {"order": 42})
    run = await steps_engine.finished(run_id)
    assert run["status"] == "completed", run["error"]
    assert run["output"] == {"check": {"told": "order 42 has no lines"}}
    events = await steps_engine.events(run_id)
    failed = next(e for e in events if e["type"] == "step.failed")
    assert failed["data"]["error"] == {
        "message": "order 42 has no lines",
        "category": "InvalidOrder",
        "retryable": False,
        "details": {"order": 42},
    }
    assert of(events, "check") == ["step.failed", "step.caught", "step.succeeded"]


async def test_a_saga_cancelled_while_no_orchestrator_ran_compensates_when_claimed(
    settings: Settings, steps: Steps
) -> None:
    """The claim cancels it: the run compensates first, so the claim keeps it (owned,
    resumed) rather than handing it back as if it had ended."""
    await store.apply_migrations(settings.database_url or "")
    types = {**load_step_types([]), "echo": steps.echo, "hold": steps.hold}
    conn = await store.connect(settings.database_url or "")
    worker_stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, types, stop=worker_stop))
    try:
        engine = Engine(settings, conn)
        stop = asyncio.Event()
        first = asyncio.create_task(run_orchestrator(settings, stop))
        run_id = await saga_run(engine, ship="hold")
        await wait_for(lambda: "ship" in steps.started, message="ship never started")
        stop.set()  # the orchestrator stops (its lease released); ship stays on the worker
        await stop_tasks([first])
        assert (await engine.run(run_id))["status"] == "running"
        assert await store.request_cancel(conn, run_id, "while down") == (True, "running")

        stop = asyncio.Event()
        second = asyncio.create_task(run_orchestrator(settings, stop))
        try:
            run = await engine.finished(run_id, timeout=30)
        finally:
            stop.set()
            await stop_tasks([second])
        assert run["status"] == "cancelled"
        await wait_for(lambda: "ship" in steps.aborted, message="ship was not aborted")
        assert steps.started == ["reserve", "charge", "ship", "refund", "release"]
        end = (await engine.events(run_id))[-1]
        assert end["type"] == "workflow.cancelled"
        assert end["data"]["compensation"] == {
            "steps": {"charge": "compensated", "reserve": "compensated"}
        }
    finally:
        steps.release.set()
        worker_stop.set()
        await stop_tasks([worker])
        await conn.close()
