"""Child runs (`type: workflow` steps) through the engine: real PostgreSQL, Redis and a
worker; a real HTTP server on loopback for the step a cancellation must abort."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from tests.helpers import wait_for
from tests.integration.cli_helpers import Cli, cli
from tests.integration.conftest import Engine, Steps

__all__ = ["cli"]  # the fixture

MAX_DEPTH = 3
DEADLINE = 60.0  # seconds any wait here may take on a loaded machine (never slept)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """A shallow depth limit, so that the recursion test stops soon."""
    return settings.model_copy(update={"max_child_depth": MAX_DEPTH})


class Hanging:
    """An HTTP server on 127.0.0.1 that never answers, and notes each request that
    arrives and each whose client went away (the worker aborted it)."""

    def __init__(self) -> None:
        self.arrived = 0
        self.gone = 0
        self.url = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.arrived += 1
            while await reader.read(1024):  # b"": the client closed the connection
                pass
            self.gone += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            self.gone += 1
        finally:
            writer.close()


@pytest.fixture
async def hanging() -> AsyncIterator[Hanging]:
    found = Hanging()
    server = await asyncio.start_server(found.serve, "127.0.0.1", 0)
    found.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield found
    finally:
        server.close()


async def children_of(engine: Engine, run_id: UUID) -> list[dict[str, Any]]:
    rows = await engine.conn.fetch(
        "SELECT id, status, parent_step, parent_attempt_id, depth, error, workflow_version"
        " FROM flowforge.runs WHERE parent_run_id = $1"
        " ORDER BY created_at, length(parent_step), parent_step, id",
        run_id,
    )
    return [dict(r) for r in rows]


CHILD = """
name: child
version: 1
steps:
  - {id: a, type: echo, with: {n: "${{ input.n }}"}}
  - {id: b, type: echo, depends_on: [a], with: {twice: "${{ steps.a.output.n * 2 }}"}}
  - {id: c, type: transform, depends_on: [b], output: {result: "${{ steps.b.output.twice + 1 }}"}}
output: "${{ steps.c.output }}"
"""


async def test_a_parent_calls_a_three_step_child_and_uses_its_output(
    steps_engine: Engine, steps: Steps
) -> None:
    await steps_engine.register(CHILD)
    await steps_engine.register("""
name: parent
version: 1
steps:
  - {id: call, type: workflow, workflow: child, input: {n: "${{ input.n }}"}}
  - {id: use, type: transform, depends_on: [call], output: "${{ steps.call.output.result * 10 }}"}
""")
    run_id = await steps_engine.submit("parent", {"n": 20})
    run = await steps_engine.finished(run_id, DEADLINE)
    assert run["status"] == "completed", run["error"]
    assert run["output"] == {"use": 410}
    (child,) = await children_of(steps_engine, run_id)
    assert child["status"] == "completed" and child["parent_step"] == "call"
    assert child["depth"] == 1 and child["workflow_version"] == 1
    # The child is a run of its own: its own history, its own steps on the worker.
    types = [e["type"] for e in await steps_engine.events(child["id"])]
    assert types[0] == "workflow.started" and types[-1] == "workflow.completed"
    assert sorted(steps.started) == ["a", "b"]
    dispatched = [e for e in await steps_engine.events(run_id) if e["type"] == "step.dispatched"]
    assert dispatched[0]["data"]["child_run_id"] == str(child["id"])
    # Its outbox events name the parent (the `parentrunid` extension attribute).
    events = await steps_engine.conn.fetch(
        "SELECT event FROM flowforge.outbox_cloudevents WHERE run_id = $1", child["id"]
    )
    assert events and all(e["event"]["parentrunid"] == str(run_id) for e in events)
    parent_events = await steps_engine.conn.fetch(
        "SELECT event FROM flowforge.outbox_cloudevents WHERE run_id = $1", run_id
    )
    assert all("parentrunid" not in e["event"] for e in parent_events)


async def test_a_failing_child_fails_the_step_and_a_retry_starts_a_new_child(
    steps_engine: Engine,
) -> None:
    await steps_engine.register("""
name: flaky
version: 1
steps: [{id: boom, type: refuse}]
""")
    await steps_engine.register("""
name: parent
version: 1
steps:
  - id: call
    type: workflow
    workflow: flaky
    retry: {max_retries: 1, initial_interval: 100ms, retry_on: [child_failed]}
""")
    run_id = await steps_engine.submit("parent")
    run = await steps_engine.finished(run_id, DEADLINE)
    assert run["status"] == "failed"
    error = run["error"]
    assert error["category"] == "child_failed" and error["step_id"] == "call"
    assert "workflow 'flaky' failed" in error["message"] and "boom refuses" in error["message"]
    children = await children_of(steps_engine, run_id)
    assert len(children) == 2 and {c["status"] for c in children} == {"failed"}
    assert len({c["parent_attempt_id"] for c in children}) == 2  # one child per attempt
    assert error["details"]["child_run_id"] == str(children[1]["id"])
    assert error["details"]["error"]["category"] == "ValueError"


async def test_cancelling_the_parent_cancels_the_child_and_aborts_its_http_step(
    engine: Engine, hanging: Hanging
) -> None:
    await engine.register(f"""
name: slow
version: 1
steps: [{{id: fetch, type: http, timeout: 60s, with: {{url: "{hanging.url}/slow"}}}}]
""")
    await engine.register("""
name: parent
version: 1
steps: [{id: call, type: workflow, workflow: slow}]
""")
    run_id = await engine.submit("parent")
    await wait_for(
        lambda: hanging.arrived == 1, timeout=DEADLINE, message="the child's http step never ran"
    )
    assert (await store.request_cancel(engine.conn, run_id, "enough"))[0]
    run = await engine.finished(run_id, DEADLINE)
    assert run["status"] == "cancelled"
    (child,) = await children_of(engine, run_id)
    child_run = await engine.finished(child["id"], DEADLINE)
    assert child_run["status"] == "cancelled"
    await wait_for(
        lambda: hanging.gone == 1, timeout=DEADLINE, message="the child's http step was not aborted"
    )
    history = await engine.events(child["id"])
    events = {(e["type"], (e["data"] or {}).get("step_id")) for e in history}
    assert ("step.cancelled", "fetch") in events


async def test_a_child_cancelled_on_its_own_fails_the_step_with_child_cancelled(
    steps_engine: Engine, steps: Steps
) -> None:
    await steps_engine.register("""
name: held
version: 1
steps: [{id: h, type: hold}]
""")
    await steps_engine.register("""
name: parent
version: 1
steps: [{id: call, type: workflow, workflow: held, retry: {max_retries: 3}}]
""")
    run_id = await steps_engine.submit("parent")
    await wait_for(
        lambda: steps.started == ["h"], timeout=DEADLINE, message="the child never ran its step"
    )
    (child,) = await children_of(steps_engine, run_id)
    await store.request_cancel(steps_engine.conn, child["id"], "not needed")
    run = await steps_engine.finished(run_id, DEADLINE)
    assert run["status"] == "failed"
    assert run["error"]["category"] == "child_cancelled"
    assert len(await children_of(steps_engine, run_id)) == 1  # not retried


async def test_a_child_with_max_concurrency_1_holds_five_parents_children_to_one_at_a_time(
    steps_engine: Engine, steps: Steps
) -> None:
    await steps_engine.register("""
name: single
version: 1
max_concurrency: 1
steps: [{id: h, type: hold}]
""")
    await steps_engine.register("""
name: parent
version: 1
steps: [{id: call, type: workflow, workflow: single}]
""")
    parents = [await steps_engine.submit("parent") for _ in range(5)]
    count = "SELECT count(*) FROM flowforge.runs WHERE workflow_name = 'single' AND status = $1"

    async def one_running_four_held() -> bool:
        running = await steps_engine.conn.fetchval(count, "running")
        pending = await steps_engine.conn.fetchval(count, "pending")
        return bool(running == 1 and pending == 4 and steps.running == 1)

    await wait_for(
        one_running_four_held, timeout=DEADLINE, message="the children were not held to one"
    )
    steps.release.set()
    for run_id in parents:
        assert (await steps_engine.finished(run_id, DEADLINE))["status"] == "completed"
    assert steps.most_running == 1 and len(steps.started) == 5


async def test_a_fan_out_of_200_children_with_max_parallel_20(
    steps_engine: Engine, steps: Steps
) -> None:
    await steps_engine.register("""
name: item
version: 1
steps: [{id: h, type: hold, with: {n: "${{ input.n }}"}}]
output: "${{ steps.h.output.n }}"
""")
    await steps_engine.register("""
name: batch
version: 1
steps:
  - id: each
    type: parallel
    for_each: input.items
    max_parallel: 20
    step: {id: one, type: workflow, workflow: item, input: {n: "${{ item }}"}}
""")
    run_id = await steps_engine.submit("batch", {"items": list(range(200))})
    await wait_for(
        lambda: steps.running == 20, timeout=DEADLINE, message="20 children never ran at once"
    )
    # max_parallel bounds the children started, not only the steps running.
    assert len(await children_of(steps_engine, run_id)) == 20
    steps.release.set()
    run = await steps_engine.finished(run_id, DEADLINE)
    assert run["status"] == "completed", run["error"]
    assert [b["output"] for b in run["output"]["each"]] == list(range(200))
    children = await children_of(steps_engine, run_id)
    assert len(children) == 200 and {c["status"] for c in children} == {"completed"}
    assert steps.most_running == 20


async def test_a_self_recursive_workflow_stops_at_the_depth_limit_naming_it(
    engine: Engine,
) -> None:
    await engine.register("""
name: recurse
version: 1
steps: [{id: again, type: workflow, workflow: recurse}]
""")
    run_id = await engine.submit("recurse")
    run = await engine.finished(run_id, DEADLINE)
    assert run["status"] == "failed"
    chain = [run_id]
    for _ in range(MAX_DEPTH):
        (child,) = await children_of(engine, chain[-1])
        chain.append(child["id"])
    deepest = await engine.finished(chain[-1], DEADLINE)
    assert deepest["error"]["category"] == "child_depth_exceeded"
    message = deepest["error"]["message"]
    assert "'recurse'" in message and f"{MAX_DEPTH + 1} deep" in message
    assert f"the limit is {MAX_DEPTH}" in message
    assert await children_of(engine, chain[-1]) == []
    # Each level above fails with child_failed, the cause nested in its details.
    assert run["error"]["category"] == "child_failed"
    assert "child_depth_exceeded" in str(run["error"]["details"])


async def test_a_workflow_that_is_not_registered_fails_only_its_step(engine: Engine) -> None:
    await engine.register("""
name: parent
version: 1
steps:
  - {id: call, type: workflow, workflow: nowhere, continue_on_failure: true}
  - {id: after, type: transform, depends_on: [call], output: "${{ steps.call.status }}"}
""")
    run_id = await engine.submit("parent")
    run = await engine.finished(run_id, DEADLINE)
    assert run["status"] == "completed" and run["output"] == {"after": "failed"}
    assert await children_of(engine, run_id) == []
    failed = [e for e in await engine.events(run_id) if e["type"] == "step.failed"]
    assert failed[0]["data"]["error"]["category"] == "definition_error"
    assert "workflow 'nowhere' is not registered" in failed[0]["data"]["error"]["message"]


async def test_the_trace_of_a_parent_with_two_children_is_one_trace(
    steps_engine: Engine, spans: InMemorySpanExporter
) -> None:
    await steps_engine.register(CHILD)
    await steps_engine.register("""
name: parent
version: 1
steps:
  - {id: first, type: workflow, workflow: child, input: {n: 1}}
  - {id: second, type: workflow, workflow: child, input: {n: 2}}
""")
    run_id = await steps_engine.submit("parent")
    assert (await steps_engine.finished(run_id, DEADLINE))["status"] == "completed"
    children = {c["parent_step"]: c["id"] for c in await children_of(steps_engine, run_id)}

    def runs_spans() -> list[Any]:
        return [s for s in spans.get_finished_spans() if s.name.startswith("workflow ")]

    await wait_for(
        lambda: len(runs_spans()) == 3, timeout=DEADLINE, message="the runs' spans did not end"
    )
    finished = spans.get_finished_spans()
    by_run = {s.attributes["flowforge.run_id"]: s for s in runs_spans() if s.attributes}
    parent = by_run[str(run_id)]
    assert {s.context.trace_id for s in finished} == {parent.context.trace_id}
    step_spans = {s.name: s for s in finished if s.name in ("step first", "step second")}
    assert set(step_spans) == {"step first", "step second"}
    for step, child_id in children.items():
        step_span = step_spans[f"step {step}"]
        assert step_span.parent is not None and step_span.parent.span_id == parent.context.span_id
        child_span = by_run[str(child_id)]
        assert child_span.parent is not None
        assert child_span.parent.span_id == step_span.context.span_id


async def test_runs_show_and_list_link_parents_and_children(
    steps_engine: Engine, cli: Cli, tmp_path: Path
) -> None:
    await steps_engine.register(CHILD)
    await steps_engine.register("""
name: parent
version: 1
steps:
  - {id: call, type: workflow, workflow: child, input: {n: 1}}
  - id: each
    type: parallel
    for_each: "[1, 2]"
    step: {id: one, type: workflow, workflow: child, input: {n: "${{ item }}"}}
""")
    run_id = await steps_engine.submit("parent")
    assert (await steps_engine.finished(run_id, DEADLINE))["status"] == "completed"
    children = await children_of(steps_engine, run_id)
    assert [c["parent_step"] for c in children] == ["call", "one[0]", "one[1]"]

    shown = await cli("runs", "show", str(run_id))
    assert shown.code == 0, shown.err
    listed = shown.out.split("children:\n", 1)[1].splitlines()
    assert listed[0].strip() == "call"
    assert f"{children[0]['id']}  child v1  completed" in listed[1]
    assert listed[2].strip() == "one"
    assert f"{children[1]['id']}  child v1  completed one[0]" in listed[3]

    child = await cli("runs", "show", str(children[0]["id"]))
    assert f"parent    {run_id} (step call)" in child.out

    only = await cli("runs", "list", "--parent", str(run_id), "--json")
    assert only.code == 0, only.err
    assert sorted(row["id"] for row in json.loads(only.out)) == sorted(
        str(c["id"]) for c in children
    )

    recursive = tmp_path / "recurse.yaml"
    recursive.write_text(
        "name: recurse\nversion: 1\nsteps: [{id: again, type: workflow, workflow: recurse}]\n"
    )
    applied = await cli("definitions", "apply", str(recursive))
    assert applied.code == 0, applied.err
    assert "warning:" in applied.err and "step 'again' starts a run of 'recurse'" in applied.err
