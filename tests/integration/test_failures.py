"""Retries, timeouts and cancellation through real PostgreSQL, Redis and a worker."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
import respx

from flowforge_orchestrator import store
from flowforge_orchestrator.client import redrive
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.records import StepResult
from flowforge_orchestrator.errors import NotFound, RedriveError
from flowforge_orchestrator.local_services import LocalRedis
from flowforge_orchestrator.worker.runtime import StepContext
from tests.helpers import dispatched_attempt, stop_tasks, verifier, wait_for
from tests.integration.cli_helpers import Cli, cli
from tests.integration.conftest import Engine, Steps, start_engine

__all__ = ["cli"]  # the fixture


def _types(events: list[dict[str, Any]], step_id: str) -> list[str]:
    return [e["type"] for e in events if e["data"].get("step_id") == step_id]


FLAKY = """
name: flaky
version: 1
steps:
  - id: call
    type: http
    with: {url: "http://svc.test/flaky"}
    retry: {max_retries: 3, initial_interval: 0.2s, backoff_factor: 2, jitter: false}
"""


async def test_a_503_twice_then_200_succeeds_on_the_third_attempt_after_the_backoffs(
    engine: Engine,
) -> None:
    with respx.mock(assert_all_called=True) as router:
        router.get("http://svc.test/flaky").mock(
            side_effect=[
                httpx.Response(503, text="busy"),
                httpx.Response(503, text="busy"),
                httpx.Response(200, json={"ok": True}),
            ]
        )
        await engine.register(FLAKY)
        run_id = await engine.submit("flaky")
        run = await engine.finished(run_id)

    assert run["status"] == "completed", run["error"]
    assert run["output"]["call"]["body"] == {"ok": True}
    attempts = await store.run_attempts(engine.conn, run_id)
    assert [(a["attempt"], a["status"]) for a in attempts] == [
        (1, "failed"),
        (2, "failed"),
        (3, "succeeded"),
    ]
    assert attempts[0]["error"]["category"] == "http_503"
    # Each retry waited at least its backoff: 0.2 s, then 0.4 s (no jitter).
    gaps = [attempts[i + 1]["dispatched_at"] - attempts[i]["finished_at"] for i in range(2)]
    assert gaps[0] >= timedelta(seconds=0.2)
    assert gaps[1] >= timedelta(seconds=0.4)
    events = await engine.events(run_id)
    retrying = [e for e in events if e["type"] == "step.retrying"]
    assert [e["data"]["next_attempt"] for e in retrying] == [2, 3]
    assert all("next_attempt_at" in e["data"] for e in retrying)


NOT_RETRIED = """
name: bad_request
version: 1
steps:
  - id: call
    type: http
    with: {url: "http://svc.test/bad"}
    retry: {max_retries: 3, initial_interval: 0.05s}
"""


async def test_a_400_is_not_retried(engine: Engine) -> None:
    with respx.mock() as router:
        route = router.get("http://svc.test/bad").respond(400, text="no")
        await engine.register(NOT_RETRIED)
        run = await engine.finished(await engine.submit("bad_request"))
    assert run["status"] == "failed"
    assert run["error"]["category"] == "http_400"
    assert route.call_count == 1


RATE_LIMITED = """
name: rate_limited
version: 1
steps:
  - id: call
    type: http
    with: {url: "http://svc.test/limited"}
    retry: {max_retries: 2, initial_interval: 0.01s, max_interval: 0.6s, jitter: false}
"""


async def test_retry_after_sets_the_next_delay_and_exhausted_retries_fail_the_run(
    engine: Engine,
) -> None:
    with respx.mock() as router:
        route = router.get("http://svc.test/limited").respond(
            429, headers={"Retry-After": "1"}, text="slow down"
        )
        await engine.register(RATE_LIMITED)
        run_id = await engine.submit("rate_limited")
        run = await engine.finished(run_id)
    assert run["status"] == "failed"
    assert run["error"]["category"] == "http_429"
    assert route.call_count == 3  # the first attempt and max_retries = 2
    attempts = await store.run_attempts(engine.conn, run_id)
    gap = attempts[1]["dispatched_at"] - attempts[0]["finished_at"]
    # Retry-After said 1 s; max_interval bounds it to 0.6 s (not 0.01 s of backoff).
    assert gap >= timedelta(seconds=0.6)
    assert _types(await engine.events(run_id), "call")[-1] == "step.failed"


HANGING = """
name: hanging
version: 1
steps:
  - id: wait
    type: hold
    timeout: 0.3s
    retry: {max_retries: 1, initial_interval: 0.01s, retry_on: [timeout]}
    with: {}
"""


async def test_a_hanging_step_times_out_on_the_worker_and_is_retried(
    steps_engine: Engine, steps: Steps
) -> None:
    await steps_engine.register(HANGING)
    run_id = await steps_engine.submit("hanging")
    run = await steps_engine.finished(run_id)
    assert run["status"] == "failed"
    assert run["error"]["category"] == "timeout"
    attempts = await store.run_attempts(steps_engine.conn, run_id)
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert steps.started == ["wait", "wait"]
    assert _types(await steps_engine.events(run_id), "wait").count("step.retrying") == 1


NOBODY = """
name: nobody
version: 1
steps:
  - id: orphan
    type: unserved
    timeout: 0.2s
    schedule_to_start: 0.2s
    retry: {max_retries: 1, initial_interval: 0.01s}
    with: {n: 1}
"""


async def test_an_attempt_no_worker_takes_times_out_and_a_late_result_is_ignored(
    steps_engine: Engine,
) -> None:
    await steps_engine.register(NOBODY)
    run_id = await steps_engine.submit("nobody")
    first = await dispatched_attempt(steps_engine.conn, run_id, "orphan")

    async def second_dispatched() -> bool:
        attempts = await store.run_attempts(steps_engine.conn, run_id)
        return [a["attempt"] for a in attempts] == [1, 2]

    await wait_for(second_dispatched, message="the first attempt never timed out")
    attempts = await store.run_attempts(steps_engine.conn, run_id)
    assert attempts[0]["status"] == "timed_out"
    assert attempts[0]["error"]["category"] == "schedule_to_start_timeout"
    assert "no worker took attempt 1" in attempts[0]["error"]["message"]
    # A worker reports the first attempt late: it is recorded, never applied.
    late_at = attempts[1]["dispatched_at"]
    assert await store.insert_result(
        steps_engine.conn,
        StepResult(
            attempt_id=first,
            run_id=run_id,
            step_id="orphan",
            outcome="succeeded",
            output={"late": True},
            error=None,
            worker="late-worker",
            started_at=late_at,
            finished_at=late_at,
            token=(await verifier(steps_engine.conn)).tokens.token(first),
        ),
    )
    run = await steps_engine.finished(run_id)
    assert run["status"] == "failed"
    assert run["error"]["category"] == "schedule_to_start_timeout"
    assert run["output"] is None
    events = await steps_engine.events(run_id)
    assert _types(events, "orphan") == [
        "step.dispatched",
        "step.retrying",
        "step.dispatched",
        "step.timed_out",
    ]


LONG = """
name: long
version: 1
steps:
  - {id: busy, type: hold, with: {}}
  - {id: next, type: echo, depends_on: [busy], with: {}}
"""


async def test_cancelling_a_running_run_aborts_its_steps_and_ends_it_cancelled(
    steps_engine: Engine, steps: Steps
) -> None:
    await steps_engine.register(LONG)
    run_id = await steps_engine.submit("long")
    await wait_for(lambda: "busy" in steps.started, message="busy never started")

    assert await store.request_cancel(steps_engine.conn, run_id) == (True, "running")
    run = await steps_engine.finished(run_id)
    assert run["status"] == "cancelled"
    events = await steps_engine.events(run_id)
    assert _types(events, "busy")[-1] == _types(events, "next")[-1] == "step.cancelled"
    assert events[-1]["type"] == "workflow.cancelled"
    await wait_for(lambda: steps.aborted == ["busy"], message="the worker was not told")
    # A finished run is left as it is.
    assert await store.request_cancel(steps_engine.conn, run_id) == (False, "cancelled")


async def test_a_run_cancelled_while_pending_never_starts(settings: Settings, steps: Steps) -> None:
    await store.apply_migrations(settings.database_url or "")
    conn = await store.connect(settings.database_url or "")
    try:
        engine = Engine(settings, conn)
        await engine.register("name: once\nversion: 1\nsteps: [{id: a, type: echo, with: {}}]")
        run_id = await engine.submit("once")
        assert await store.request_cancel(conn, run_id) == (True, "pending")
        stop, tasks = await start_engine(settings, {"echo": steps.echo})
        try:
            run = await engine.finished(run_id)
        finally:
            stop.set()
            await stop_tasks(tasks)
        assert run["status"] == "cancelled"
        assert steps.started == []
        assert [e["type"] for e in await engine.events(run_id)] == [
            "step.cancelled",
            "workflow.cancelled",
        ]
    finally:
        await conn.close()


@pytest.mark.parametrize("timeout", ["0.5s"])
async def test_a_run_timeout_cancels_what_runs_and_fails_the_run(
    steps_engine: Engine, steps: Steps, timeout: str
) -> None:
    await steps_engine.register(
        f"""
name: bounded
version: 1
timeout: {timeout}
steps:
  - {{id: busy, type: hold, with: {{}}}}
"""
    )
    run_id = await steps_engine.submit("bounded")
    run = await steps_engine.finished(run_id)
    assert run["status"] == "failed"
    assert run["error"]["category"] == "run_timeout"
    events = await steps_engine.events(run_id)
    assert _types(events, "busy")[-1] == "step.cancelled"
    assert events[-1]["type"] == "workflow.failed"
    assert events[-1]["data"]["error"]["category"] == "run_timeout"


CHAIN = """
name: chain
version: 1
steps:
  - {id: a, type: http, with: {url: "http://svc.test/a"}}
  - id: b
    type: http
    depends_on: [a]
    with: {url: "http://svc.test/b", json: "${{ steps.a.output.body }}"}
  - {id: c, type: transform, depends_on: [b], output: "${{ steps.b.output.body.n + 1 }}"}
"""


async def test_redrive_runs_the_failed_step_again_and_reuses_earlier_outputs(
    engine: Engine,
) -> None:
    with respx.mock() as router:
        a = router.get("http://svc.test/a").respond(json={"n": 1})
        b = router.get("http://svc.test/b").mock(
            side_effect=[httpx.Response(500, text="down"), httpx.Response(200, json={"n": 41})]
        )
        await engine.register(CHAIN)
        run_id = await engine.submit("chain")
        failed = await engine.finished(run_id)
        assert failed["status"] == "failed"
        assert failed["error"]["step_id"] == "b"

        assert await redrive(engine.conn, run_id) == 1
        run = await engine.finished(run_id)

        assert run["status"] == "completed", run["error"]
        assert run["output"] == {"c": 42}
        assert a.call_count == 1  # its output was reused
        assert b.call_count == 2
        assert b.calls[1].request.content == b'{"n":1}'
        attempts = await store.run_attempts(engine.conn, run_id)
        assert [(x["step_id"], x["attempt"], x["status"]) for x in attempts] == [
            ("a", 1, "succeeded"),
            ("b", 1, "failed"),
            ("b", 2, "succeeded"),
        ]
        events = await engine.events(run_id)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert [e["type"] for e in events if e["type"].startswith("workflow.")] == [
            "workflow.started",
            "workflow.failed",
            "workflow.started",
            "workflow.completed",
        ]
        assert events[-1]["data"]["output"] == {"c": 42}

        with pytest.raises(RedriveError, match="completed"):
            await redrive(engine.conn, run_id, from_step="a")


async def test_redrive_refuses_what_it_cannot_do(engine: Engine) -> None:
    with pytest.raises(NotFound):
        await redrive(engine.conn, uuid.uuid4())
    await engine.register(NOT_RETRIED)
    with respx.mock() as router:
        router.get("http://svc.test/bad").respond(400, text="no")
        run_id = await engine.submit("bad_request")
        assert (await engine.finished(run_id))["status"] == "failed"
    with pytest.raises(RedriveError, match="no step 'nope'"):
        await redrive(engine.conn, run_id, from_step="nope")


async def test_a_cancellation_whose_notification_was_missed_is_found_by_the_slow_poll(
    steps_engine: Engine, steps: Steps
) -> None:
    await steps_engine.register(LONG)
    run_id = await steps_engine.submit("long")
    await wait_for(lambda: "busy" in steps.started, message="busy never started")

    # The request, with the trigger that NOTIFYs the owner switched off for this session:
    # as if the owner's LISTEN connection was down when it was made.
    async with steps_engine.conn.transaction():
        await steps_engine.conn.execute("SET LOCAL session_replication_role = replica")
        await steps_engine.conn.execute(
            "UPDATE flowforge.runs SET cancel_requested = true WHERE id = $1", run_id
        )
    run = await steps_engine.finished(run_id)
    assert run["status"] == "cancelled"
    events = await steps_engine.events(run_id)
    assert _types(events, "busy")[-1] == _types(events, "next")[-1] == "step.cancelled"
    await wait_for(lambda: steps.aborted == ["busy"], message="the worker was not told")


async def test_a_run_cancelled_while_redis_is_down_still_ends_cancelled(
    settings: Settings, steps: Steps
) -> None:
    """The abort cannot reach the worker (best effort): the run ends cancelled anyway,
    and the result the worker writes later is stored and ignored."""
    own_redis = LocalRedis(durable=False).start()
    settings = settings.model_copy(update={"redis_url": own_redis.url})
    await store.apply_migrations(settings.database_url or "")
    conn = await store.connect(settings.database_url or "")
    stop, tasks = await start_engine(settings, {"hold": steps.hold, "echo": steps.echo})
    try:
        engine = Engine(settings, conn)
        await engine.register(LONG)
        run_id = await engine.submit("long")
        await wait_for(lambda: "busy" in steps.started, message="busy never started")

        own_redis.stop()
        assert await store.request_cancel(conn, run_id) == (True, "running")
        run = await engine.finished(run_id)
        assert run["status"] == "cancelled"
        assert steps.aborted == []  # no abort could reach it: it still runs

        steps.release.set()
        stored = "SELECT outcome FROM flowforge.step_results WHERE attempt_id = $1"
        busy = await dispatched_attempt(conn, run_id, "busy")
        await wait_for(lambda: conn.fetchval(stored, busy), message="no result stored")
        assert await conn.fetchval(stored, busy) == "succeeded"
        # The late result changes nothing.
        assert (await engine.run(run_id))["status"] == "cancelled"
        assert _types(await engine.events(run_id), "next") == ["step.cancelled"]
    finally:
        steps.release.set()
        stop.set()
        try:
            await stop_tasks(tasks)
        finally:
            await conn.close()
            own_redis.stop()


async def test_a_step_whose_output_is_not_json_fails_once_with_the_reason(
    settings: Settings,
) -> None:
    async def odd(params: Any, ctx: StepContext) -> Any:
        return {"when": {1, 2}}  # a set: JSON has no such thing

    await store.apply_migrations(settings.database_url or "")
    conn = await store.connect(settings.database_url or "")
    stop, tasks = await start_engine(settings, {"odd": odd})
    try:
        engine = Engine(settings, conn)
        await engine.register(
            "name: odd\nversion: 1\nsteps:\n  - id: a\n    type: odd\n    with: {}\n"
            "    retry: {max_retries: 3, initial_interval: 0.05s, retry_on: [TypeError]}\n"
        )
        run = await engine.finished(await engine.submit("odd"))
        assert run["status"] == "failed"
        attempts = await store.run_attempts(conn, run["id"])
        assert [(a["attempt"], a["status"]) for a in attempts] == [(1, "failed")]  # not retried
        error = attempts[0]["error"]
        assert (error["category"], error["retryable"]) == ("invalid_output", False)
        assert "not JSON" in error["message"]
    finally:
        stop.set()
        try:
            await stop_tasks(tasks)
        finally:
            await conn.close()


PAYMENT = """
name: payment
version: 1
steps:
  - id: charge
    type: http
    with: {url: "http://svc.test/charge"}
    retry: {max_retries: 3, initial_interval: 0.05s, retry_on: [http_5xx, timeout]}
"""


async def test_a_402_not_in_retry_on_says_what_decided_in_runs_show_and_the_outbox(
    engine: Engine, cli: Cli
) -> None:
    with respx.mock() as router:
        route = router.get("http://svc.test/charge").respond(402, text="pay first")
        await engine.register(PAYMENT)
        run_id = await engine.submit("payment")
        run = await engine.finished(run_id)

    decision = "not retried: http_402 is not in retry_on [http_5xx, timeout]"
    assert route.call_count == 1
    assert run["status"] == "failed"
    # The error keeps its shape ("retryable": the error may be retried) and says what decided.
    assert (run["error"]["retryable"], run["error"]["retry_decision"]) == (True, decision)
    shown = await cli("runs", "show", str(run_id), "--json")
    assert shown.code == 0, shown.err
    assert json.loads(shown.out)["error"]["retry_decision"] == decision
    tail = await cli("outbox", "tail", "--run", str(run_id), "--json", "-n", "100")
    assert tail.code == 0, tail.err
    events = [json.loads(line) for line in tail.out.splitlines()]
    said = {e["type"]: e["data"]["error"]["retry_decision"] for e in events if "error" in e["data"]}
    assert said == {"step.failed": decision, "workflow.failed": decision}
