"""A run goes from a row to completion through real PostgreSQL, Redis and an arq worker."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import pytest
import respx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.integration.conftest import Engine

CHAIN = """
name: chain
version: 1
steps:
  - id: user
    type: http
    with: {url: "http://svc.test/users/${{ input.user }}"}
  - id: account
    type: http
    depends_on: [user]
    with:
      method: POST
      url: "http://svc.test/accounts"
      json:
        user_id: "${{ steps.user.output.body.id }}"
        name: "${{ steps.user.output.body.name }}"
  - id: welcome
    type: http
    depends_on: [account]
    with: {url: "http://svc.test/accounts/${{ steps.account.output.body.account }}/welcome"}
"""


@pytest.fixture
def svc() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        router.get("http://svc.test/users/42").respond(json={"id": 7, "name": "ada"})
        router.post("http://svc.test/accounts").respond(json={"account": "acc-7"})
        router.get("http://svc.test/accounts/acc-7/welcome").respond(json={"ok": True})
        router.get("http://svc.test/boom").respond(500, text="exploded")
        yield router


async def test_three_http_steps_pass_outputs_and_complete(
    engine: Engine, svc: respx.MockRouter, spans: InMemorySpanExporter
) -> None:
    await engine.register(CHAIN)
    run_id = await engine.submit("chain", {"user": 42})

    run = await engine.finished(run_id)

    assert run["status"] == "completed", run["error"]
    assert run["output"]["welcome"]["body"] == {"ok": True}
    assert run["output"]["welcome"]["status"] == 200
    account_call = svc.calls[1].request
    assert json.loads(account_call.content) == {"user_id": 7, "name": "ada"}
    assert str(svc.calls[2].request.url) == "http://svc.test/accounts/acc-7/welcome"

    events = await engine.events(run_id)
    expected = ["workflow.started"]
    for _ in ("user", "account", "welcome"):
        expected += ["step.dispatched", "step.started", "step.succeeded"]
    expected.append("workflow.completed")
    assert [e["type"] for e in events] == expected
    assert [e["seq"] for e in events] == list(range(1, len(expected) + 1))
    assert [e["data"].get("step_id") for e in events[1:4]] == ["user"] * 3

    transitions = await engine.transitions(run_id)
    assert [t["seq"] for t in transitions] == [e["seq"] for e in events]
    assert [t["to_status"] for t in transitions][:4] == [
        "running",
        "dispatched",
        "running",
        "succeeded",
    ]
    assert transitions[-1]["to_status"] == "completed"

    finished = spans.get_finished_spans()
    run_span = next(s for s in finished if s.name == "workflow chain")
    step_spans = [s for s in finished if s.name.startswith("step ")]
    assert sorted(s.name for s in step_spans) == ["step account", "step user", "step welcome"]
    for span in step_spans:
        assert span.context.trace_id == run_span.context.trace_id
        assert span.parent is not None and span.parent.span_id == run_span.context.span_id
    http_spans = [s for s in finished if s.name.startswith("HTTP ")]
    assert len(http_spans) == 3
    step_ids = {s.context.span_id for s in step_spans}
    assert all(s.parent is not None and s.parent.span_id in step_ids for s in http_spans)
    # The callee receives the trace context of the attempt.
    assert all("traceparent" in call.request.headers for call in svc.calls)


async def test_failing_http_step_fails_the_run(engine: Engine, svc: respx.MockRouter) -> None:
    await engine.register(
        """
name: failing
version: 1
steps:
  - {id: boom, type: http, with: {url: "http://svc.test/boom"}}
  - {id: after, type: http, depends_on: [boom], with: {url: "http://svc.test/users/42"}}
"""
    )
    run_id = await engine.submit("failing")

    run = await engine.finished(run_id)

    assert run["status"] == "failed"
    assert run["error"]["step_id"] == "boom"
    assert run["error"]["category"] == "http_500"
    events = [e["type"] for e in await engine.events(run_id)]
    assert events[-1] == "workflow.failed"
    assert "step.failed" in events
    assert "step.cancelled" in events  # `after` can never run
    assert not any(c.request.url.path == "/users/42" for c in svc.calls)


async def test_missing_definition_fails_the_run_and_others_still_run(
    engine: Engine, svc: respx.MockRouter
) -> None:
    await engine.register(CHAIN)
    # The insert trigger refuses such a run (sql/0014); one written behind the triggers'
    # back (a restore, a hand edit) still fails alone.
    async with engine.conn.transaction():
        await engine.conn.execute("SET LOCAL session_replication_role = replica")
        orphan = await engine.conn.fetchval(
            "INSERT INTO flowforge.runs (workflow_name, input) VALUES ('no-such-workflow', '{}')"
            " RETURNING id"
        )
    good = await engine.submit("chain", {"user": 42})

    orphan_run = await engine.finished(orphan)
    good_run = await engine.finished(good)

    assert orphan_run["status"] == "failed"
    assert "no-such-workflow" in orphan_run["error"]["message"]
    assert [e["type"] for e in await engine.events(orphan)] == ["workflow.failed"]
    assert good_run["status"] == "completed"


async def test_output_over_the_limit_fails_with_a_clear_error(
    engine: Engine, svc: respx.MockRouter
) -> None:
    limit = engine.settings.max_output_bytes
    svc.get("http://svc.test/big").respond(json={"blob": "x" * (limit + 10)})
    await engine.register(
        """
name: big
version: 1
steps:
  - {id: fetch, type: http, with: {url: "http://svc.test/big"}}
"""
    )
    run_id = await engine.submit("big")

    run = await engine.finished(run_id)

    assert run["status"] == "failed"
    assert run["error"]["category"] == "payload_too_large"
    assert run["error"]["retryable"] is False
    assert str(limit) in run["error"]["message"]


async def test_transform_output_over_the_limit_names_step_size_and_limit(
    engine: Engine, svc: respx.MockRouter
) -> None:
    await engine.register(
        """
name: bigtransform
version: 1
steps:
  - id: grow
    type: transform
    output: {text: "${{ 'x' + input.pad }}"}
"""
    )
    limit = engine.settings.max_output_bytes
    run_id = await engine.submit("bigtransform", {"pad": "y" * limit})

    run = await engine.finished(run_id)

    assert run["status"] == "failed"
    message = run["error"]["message"]
    assert "step 'grow'" in message and str(limit) in message
    assert run["error"]["details"]["size"] > limit


async def test_duplicate_result_delivery_is_applied_once(
    engine: Engine, svc: respx.MockRouter
) -> None:
    await engine.register(CHAIN)
    run_id = await engine.submit("chain", {"user": 42})
    await engine.finished(run_id)
    before = await engine.transitions(run_id)
    result = await engine.conn.fetchrow(
        "SELECT * FROM flowforge.step_results WHERE run_id = $1 AND step_id = 'user'", run_id
    )
    # The same result again (a worker re-ran the job) and its notification again.
    inserted = await engine.conn.execute(
        "INSERT INTO flowforge.step_results (attempt_id, run_id, step_id, outcome, output,"
        " token) VALUES ($1, $2, 'user', 'succeeded', '{}'::jsonb, $3) ON CONFLICT DO NOTHING",
        result["attempt_id"],
        run_id,
        result["token"],
    )
    assert inserted == "INSERT 0 0"
    await engine.conn.execute(
        "SELECT pg_notify('flowforge_results', $1)", str(result["attempt_id"])
    )
    # A later run proves the orchestrator processed the notification before we look.
    second = await engine.submit("chain", {"user": 42})
    await engine.finished(second)

    assert await engine.transitions(run_id) == before


async def test_secrets_are_resolved_by_the_worker_and_stored_nowhere(
    engine: Engine, svc: respx.MockRouter
) -> None:
    route = svc.post("http://svc.test/charge").respond(json={"ok": True})
    await engine.register(
        """
name: secretive
version: 1
steps:
  - id: charge
    type: http
    with:
      method: POST
      url: "http://svc.test/charge"
      headers: {Authorization: "Bearer ${{ secrets.TOKEN }}"}
      json: {note: "${{ input.note }}"}
"""
    )
    # Data that looks like a template is data: it must not be rendered with secrets.
    run_id = await engine.submit("secretive", {"note": "${{ secrets.TOKEN }}"})

    run = await engine.finished(run_id)

    assert run["status"] == "completed", run["error"]
    request = route.calls.last.request
    assert request.headers["authorization"] == "Bearer s3cret-value"
    assert json.loads(request.content) == {"note": "${{ secrets.TOKEN }}"}
    dump = await engine.conn.fetchval(
        "SELECT concat_ws(' ', (SELECT json_agg(r) FROM flowforge.runs r),"
        " (SELECT json_agg(o) FROM flowforge.outbox o),"
        " (SELECT json_agg(a) FROM flowforge.step_attempts a),"
        " (SELECT json_agg(s) FROM flowforge.step_results s))"
    )
    assert "s3cret-value" not in dump


async def test_a_missing_secret_fails_the_step_without_retry(
    engine: Engine, svc: respx.MockRouter
) -> None:
    await engine.register(
        """
name: nosecret
version: 1
steps:
  - id: call
    type: http
    with:
      url: "http://svc.test/users/42"
      headers: {X-Key: "${{ secrets.NOT_CONFIGURED }}"}
"""
    )
    run_id = await engine.submit("nosecret")

    run = await engine.finished(run_id)

    assert run["status"] == "failed"
    assert run["error"]["category"] == "expression_error"
    assert "secrets.NOT_CONFIGURED" in run["error"]["message"]
    assert not svc.calls


async def test_an_output_postgres_cannot_store_fails_the_step_cleanly(
    engine: Engine, svc: respx.MockRouter
) -> None:
    svc.get("http://svc.test/nul").respond(json={"text": "a\u0000b"})
    await engine.register(
        """
name: nul
version: 1
steps:
  - {id: fetch, type: http, with: {url: "http://svc.test/nul"}}
"""
    )
    run_id = await engine.submit("nul")

    run = await engine.finished(run_id)

    assert run["status"] == "failed"
    assert run["error"]["category"] == "unstorable_result"


async def test_runs_complete_after_every_database_connection_was_killed(
    engine: Engine, svc: respx.MockRouter
) -> None:
    await engine.register(CHAIN)
    first = await engine.submit("chain", {"user": 42})
    assert (await engine.finished(first))["status"] == "completed"

    killed = await engine.conn.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    assert killed >= 2  # at least the LISTEN connection and a pooled one
    second = await engine.submit("chain", {"user": 42})

    assert (await engine.finished(second))["status"] == "completed"


async def test_transitions_ready_together_are_committed_together(
    engine: Engine, svc: respx.MockRouter
) -> None:
    await engine.register(CHAIN)
    async with engine.conn.transaction():  # all 20 become visible (and notified) at once
        run_ids = [await engine.submit("chain", {"user": 42}) for _ in range(20)]
    for run_id in run_ids:
        assert (await engine.finished(run_id))["status"] == "completed"

    rows = await engine.conn.fetch(
        "SELECT run_id, seq, xid::text AS xid, type FROM flowforge.outbox"
        " WHERE run_id = ANY($1::uuid[]) ORDER BY run_id, seq",
        run_ids,
    )
    # Events written by one transaction share its id (`xid`; sql/0012).
    started = {r["xid"] for r in rows if r["type"] == "workflow.started"}
    assert len(started) == 1, "the 20 runs were claimed and started in one transaction"
    by_run: dict[object, list[dict[str, object]]] = {}
    for row in rows:
        by_run.setdefault(row["run_id"], []).append(dict(row))
    for events in by_run.values():
        for done, nxt in itertools.pairwise(events):
            if done["type"] == "step.succeeded":
                # The result that finishes a step and the dispatch it unblocks: one commit.
                assert nxt["xid"] == done["xid"], (done, nxt)
    assert len({r["xid"] for r in rows}) < len(rows) / 4
