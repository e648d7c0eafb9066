"""Wait steps and events, on a real orchestrator and worker: an event sent by run id or by
key wakes exactly its runs and its payload reaches the next step; an event sent before
the wait started is taken when it starts; a wait without an event fails with
`event_timeout`; an event in a rolled-back transaction delivers nothing; each event is
taken once per run, recorded in the step's commit."""

from __future__ import annotations

import asyncio
import functools
from uuid import UUID

from flowforge_orchestrator.client import send_event
from tests.helpers import wait_for
from tests.integration.conftest import Engine, Steps

ORDER = """
name: order
version: 1
steps:
  - {id: reserve, type: echo, with: {order: "${{ input.order }}"}}
  - id: paid
    type: wait
    depends_on: [reserve]
    event: payment.confirmed
    key: "'order-' + string(input.order)"
    timeout: 1m
  - id: receipt
    type: transform
    depends_on: [paid]
    output: "${{ steps.paid.output.payload.amount * 2 }}"
"""

APPROVAL = """
name: approval
version: 1
steps:
  - {id: slow, type: gate, with: {}}
  - {id: approved, type: wait, depends_on: [slow], event: approved}
  - {id: after, type: transform, depends_on: [approved], output: "${{ steps.approved.output }}"}
"""

DEADLINE = """
name: deadline
version: 1
steps:
  - {id: approved, type: wait, event: approved, timeout: 2s}
"""


async def _waiting(engine: Engine, run_id: UUID, step: str) -> bool:
    return any(
        e["type"] == "step.waiting" and e["data"]["step_id"] == step
        for e in await engine.events(run_id)
    )


async def test_an_event_by_key_wakes_exactly_the_runs_waiting_on_that_key(
    steps_engine: Engine,
) -> None:
    await steps_engine.register(ORDER)
    seven = await steps_engine.submit("order", {"order": 7})
    other_seven = await steps_engine.submit("order", {"order": 7})
    eight = await steps_engine.submit("order", {"order": 8})
    for run in (seven, other_seven, eight):
        await wait_for(functools.partial(_waiting, steps_engine, run, "paid"), message="no wait")

    await send_event(steps_engine.conn, "payment.confirmed", {"amount": 21}, key="order-7")
    for run in (seven, other_seven):
        finished = await steps_engine.finished(run)
        assert finished["status"] == "completed" and finished["output"] == {"receipt": 42}
    assert (await steps_engine.run(eight))["status"] == "running"

    events = await steps_engine.events(seven)
    kinds = [e["type"] for e in events if e["data"].get("step_id") == "paid"]
    assert kinds == ["step.waiting", "step.event_received", "step.succeeded"]
    taken = await steps_engine.conn.fetch(
        "SELECT run_id, step_id FROM flowforge.event_consumptions ORDER BY run_id"
    )
    assert sorted((r["run_id"], r["step_id"]) for r in taken) == sorted(
        [(seven, "paid"), (other_seven, "paid")]
    )

    await send_event(steps_engine.conn, "payment.confirmed", {"amount": 1}, key="order-8")
    assert (await steps_engine.finished(eight))["output"] == {"receipt": 2}


async def test_an_event_sent_before_the_wait_started_is_taken_when_it_starts(
    steps_engine: Engine, steps: Steps
) -> None:
    await steps_engine.register(APPROVAL)
    run_id = await steps_engine.submit("approval")
    await wait_for(lambda: "slow" in steps.started, message="the slow step never started")
    await send_event(steps_engine.conn, "approved", {"by": "first"}, run_id=run_id)
    await send_event(steps_engine.conn, "approved", {"by": "second"}, run_id=run_id)
    steps.gate_open.set()
    run = await steps_engine.finished(run_id)
    assert run["status"] == "completed"
    assert run["output"]["after"]["payload"] == {"by": "first"}  # in insertion order
    assert run["output"]["after"]["name"] == "approved"
    # The second is kept, not taken: one event per wait step.
    left = await steps_engine.conn.fetchval(
        "SELECT count(*) FROM flowforge.events e WHERE NOT EXISTS"
        " (SELECT FROM flowforge.event_consumptions c WHERE c.event_id = e.id)"
    )
    assert left == 1


async def test_a_rolled_back_event_delivers_nothing_and_a_wait_times_out(
    steps_engine: Engine,
) -> None:
    await steps_engine.register(DEADLINE)
    run_id = await steps_engine.submit("deadline")
    await wait_for(lambda: _waiting(steps_engine, run_id, "approved"), message="no wait")
    started = asyncio.get_running_loop().time()
    tx = steps_engine.conn.transaction()
    await tx.start()
    await send_event(steps_engine.conn, "approved", {"by": "nobody"}, run_id=run_id)
    await tx.rollback()
    run = await steps_engine.finished(run_id)
    waited = asyncio.get_running_loop().time() - started
    assert run["status"] == "failed" and run["error"]["category"] == "event_timeout"
    assert 1.0 <= waited < 10.0  # about the 2 s timeout, counted from the wait's start
    failed = [e for e in await steps_engine.events(run_id) if e["type"] == "step.failed"]
    assert failed[0]["data"]["error"]["category"] == "event_timeout"
