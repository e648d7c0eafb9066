"""`runs show|watch|list` and `outbox tail` on runs driven by a real engine (in process), with
the CLI's `main` in a thread (it calls asyncio.run) pointed at the same database."""

from __future__ import annotations

import asyncio
import json
import re
import warnings
from uuid import UUID

from tests.helpers import wait_for
from tests.integration.cli_helpers import Cli, cli
from tests.integration.conftest import Engine, Steps

with warnings.catch_warnings():  # pydot's grammar still uses pyparsing's old method names
    warnings.simplefilter("ignore", DeprecationWarning)
    import pydot
    import pydot.dot_parser

__all__ = ["cli"]  # the fixture

TREE = """
name: tree
version: 1
steps:
  - {id: fetch, type: echo, with: {items: [1, 2, 3], total: "${{ input.total }}"}}
  - id: route
    type: condition
    depends_on: [fetch]
    if: "steps.fetch.output.total > 3"
    then: [{id: big, type: echo, with: {size: big}}]
    else: [{id: small, type: echo, with: {size: small}}]
  - id: charge_all
    type: parallel
    depends_on: [fetch]
    for_each: "steps.fetch.output.items"
    step: {id: charge, type: echo, with: {n: "${{ item }}"}}
  - {id: shape, type: transform, depends_on: [route, charge_all], output: {ok: true}}
"""

SLOW = """
name: slow
version: 1
steps:
  - {id: wait, type: hold}
  - {id: after, type: echo, depends_on: [wait], with: {done: true}}
"""

REFUSED = """
name: refused
version: 1
steps:
  - {id: boom, type: refuse}
"""

FAILING = """
name: failing
version: 1
steps:
  - {id: wait, type: hold}
  - {id: boom, type: refuse, depends_on: [wait]}
"""


async def completed_tree_run(engine: Engine, total: int = 5) -> UUID:
    await engine.register(TREE)
    run_id = await engine.submit("tree", {"total": total})
    assert (await engine.finished(run_id))["status"] == "completed"
    return run_id


async def test_runs_show_draws_the_tree_of_steps_with_state_attempts_and_timing(
    steps_engine: Engine, cli: Cli
) -> None:
    run_id = await completed_tree_run(steps_engine)

    result = await cli("runs", "show", str(run_id))

    assert result.code == 0, result.err
    out = result.out
    assert f"run       {run_id}" in out and "status    completed" in out
    tree = out[out.index("steps:\n") : out.index("attempts:\n")].splitlines()[1:]
    shape = [re.sub(r"(?<=[\w\])]) {2,}.*$", "", line) for line in tree]
    assert shape == [
        "  ├─ fetch",
        "  ├─ route",
        "  │  ├─ then (taken)",
        "  │  │  └─ big",
        "  │  └─ else (not taken)",
        "  │     └─ small",
        "  ├─ charge_all",
        "  │  ├─ charge[0]",
        "  │  ├─ charge[1]",
        "  │  └─ charge[2]",
        "  └─ shape",
    ], out
    timed = r" +\d+\.\d{3}s$"
    assert re.search(rf"^  ├─ fetch +echo +succeeded +attempt 1{timed}", out, re.M)
    assert re.search(rf"^  ├─ route +condition +succeeded{timed}", out, re.M)
    assert re.search(r"^  │     └─ small +echo +skipped$", out, re.M)
    assert re.search(rf"^  ├─ charge_all +for_each of 3 +succeeded{timed}", out, re.M)
    assert re.search(rf"^  │  └─ charge\[2\] +echo +succeeded +attempt 1{timed}", out, re.M)
    assert re.search(r"^  └─ shape +transform +succeeded", out, re.M)
    assert re.search(r"^  charge\[1\] +#1 echo +succeeded +queued", out, re.M)


async def test_runs_show_as_json_carries_the_tree_and_the_checkpoint(
    steps_engine: Engine, cli: Cli
) -> None:
    run_id = await completed_tree_run(steps_engine, total=1)

    result = await cli("runs", "show", str(run_id), "--json")

    assert result.code == 0, result.err
    details = json.loads(result.out)
    assert details["checkpoint"]["steps"]["small"] == "S1"
    steps = {s["key"]: s for s in details["steps"]}
    assert list(steps) == ["fetch", "route", "charge_all", "shape"]
    route = steps["route"]["lists"]
    assert [(c["label"], c["taken"]) for c in route] == [("then", False), ("else", True)]
    assert route[0]["steps"][0]["status"] == "skipped"
    elements = [c["steps"][0] for c in steps["charge_all"]["lists"]]
    assert [(e["key"], e["status"], e["attempts"]) for e in elements] == [
        (f"charge[{i}]", "succeeded", 1) for i in range(3)
    ]


async def test_runs_show_pictures_are_mermaid_and_dot(steps_engine: Engine, cli: Cli) -> None:
    run_id = await completed_tree_run(steps_engine)

    mermaid = await cli("runs", "show", str(run_id), "--format", "mermaid")
    dot = await cli("runs", "show", str(run_id), "--format", "dot")

    assert mermaid.code == 0 and dot.code == 0
    lines = mermaid.out.splitlines()
    assert lines[0] == "---" and lines[1].startswith(f"title: tree v1 · run {run_id}")
    assert "flowchart TD" in lines
    assert sum(line.strip().startswith("subgraph ") for line in lines) == 3
    assert sum(line.strip() == "end" for line in lines) == 3
    assert re.search(
        r'^\s+s\d+\{"route<br/>condition · succeeded · [\d.]+s"\}:::succeeded$', mermaid.out, re.M
    )
    assert re.search(r"^\s+s\d+ -\.->\|else\| s\d+$", mermaid.out, re.M)

    graphs = pydot.graph_from_dot_data(dot.out)
    assert graphs is not None
    (graph,) = graphs
    names = {
        n.get_name(): n.get("label").strip('"').split("\\n")[0]
        for g in [graph, *graph.get_subgraphs()]
        for n in g.get_nodes()
        if n.get("label")
    }
    edges = {
        (names[str(e.get_source())], names[str(e.get_destination())]) for e in graph.get_edges()
    }
    assert {("fetch", "route"), ("route", "big"), ("charge_all", "charge[1]")} <= edges
    assert {("route", "shape"), ("charge_all", "shape")} <= edges


async def test_runs_watch_follows_a_run_until_it_ends(
    steps_engine: Engine, steps: Steps, cli: Cli
) -> None:
    await steps_engine.register(SLOW)
    run_id = await steps_engine.submit("slow")
    await wait_for(lambda: "wait" in steps.started, message="the hold step did not start")

    watching = asyncio.create_task(cli("runs", "watch", str(run_id), "--timeout", "20"))
    # It prints the events so far, then waits for more: the rest are written after that.
    await wait_for(
        lambda: "step.dispatched wait" in cli.seen(), message="the watch printed nothing"
    )
    steps.release.set()
    result = await watching

    assert result.code == 0, result.out + result.err
    lines = result.out.splitlines()
    assert lines[0] == f"watching slow v1 · run {run_id} · running"
    events = [
        line.split("  ", 1)[1] for line in lines if re.match(r"^\d\d:\d\d:\d\d\.\d{3}  ", line)
    ]
    assert events == [
        "workflow.started",
        "step.dispatched wait (attempt 1)",
        "step.started wait (attempt 1)",
        "step.succeeded wait (attempt 1)",
        "step.dispatched after (attempt 1)",
        "step.started after (attempt 1)",
        "step.succeeded after (attempt 1)",
        "workflow.completed",
    ]
    assert f"run {run_id} completed" in lines
    assert re.search(r"^└─ after +echo +succeeded +attempt 1", result.out, re.M)


async def test_runs_watch_exits_1_when_the_run_fails_and_4_on_timeout(
    steps_engine: Engine, steps: Steps, cli: Cli
) -> None:
    await steps_engine.register(FAILING)
    run_id = await steps_engine.submit("failing")
    await wait_for(lambda: "wait" in steps.started, message="the hold step did not start")

    timed_out = await cli("runs", "watch", str(run_id), "--timeout", "0.3")
    steps.release.set()
    failed = await cli("runs", "watch", str(run_id), "--timeout", "20")

    assert timed_out.code == 4  # gave up waiting: not a usage error
    assert f"error: run {run_id} still running after 0.3s" in timed_out.err
    assert failed.code == 1
    assert "step.failed boom (attempt 1): ValueError: boom refuses" in failed.out
    assert f"run {run_id} failed" in failed.out
    assert re.search(r"^└─ boom +refuse +failed +attempt 1", failed.out, re.M)
    assert re.search(r"^      error: ValueError: boom refuses$", failed.out, re.M)


async def test_outbox_tail_prints_the_latest_events_and_follows_a_run_to_its_end(
    steps_engine: Engine, steps: Steps, cli: Cli
) -> None:
    first = await completed_tree_run(steps_engine)
    await steps_engine.register(SLOW)
    run_id = await steps_engine.submit("slow")

    async def dispatched() -> bool:
        return "step.dispatched" in [e["type"] for e in await steps_engine.events(run_id)]

    await wait_for(dispatched, message="the hold step was not dispatched")
    latest = await cli("outbox", "tail", "-n", "2")
    of_first = await cli("outbox", "tail", "--run", str(first), "-n", "100", "--json")
    following = asyncio.create_task(
        cli("outbox", "tail", "--run", str(run_id), "-n", "1", "-f", "--interval", "0.05")
    )
    # The run's own id: the output seen so far may still be the previous command's.
    await wait_for(lambda: f"{run_id}/2" in cli.seen(), message="the tail printed nothing")
    steps.release.set()
    followed = await asyncio.wait_for(following, timeout=20)

    assert latest.code == 0
    assert [line.split()[1:3] for line in latest.out.splitlines()] == [
        [f"{run_id}/1", "workflow.started"],
        [f"{run_id}/2", "step.dispatched"],
    ]
    events = [json.loads(line) for line in of_first.out.splitlines()]
    assert [e["id"] for e in events] == [f"{first}/{n}" for n in range(1, len(events) + 1)]
    assert all(e["specversion"] == "1.0" and e["subject"] == str(first) for e in events)
    assert events[0]["type"] == "workflow.started"
    assert events[-1]["type"] == "workflow.completed"
    assert followed.code == 0
    types = [line.split()[2] for line in followed.out.splitlines()]
    assert types[0] == "step.dispatched" and types[-1] == "workflow.completed"
    assert "step.succeeded" in types
    assert re.search(rf"  {run_id}/\d+ +step\.succeeded  after \(attempt 1\)$", followed.out, re.M)
    # Started mid-run: the latest event, then only newer ones, in order (never seq 1 late).
    seqs = [int(line.split()[1].rsplit("/", 1)[1]) for line in followed.out.splitlines()]
    assert seqs[0] == 2 and seqs == sorted(seqs) and len(seqs) == len(set(seqs)), seqs


async def test_outbox_tail_follow_without_a_run_prints_the_latest_and_then_only_new_ones(
    steps_engine: Engine, cli: Cli
) -> None:
    await completed_tree_run(steps_engine)
    await completed_tree_run(steps_engine)

    followed = await cli(
        "outbox", "tail", "-n", "3", "-f", "--interval", "0.05", "--timeout", "0.5"
    )

    assert followed.code == 0
    assert len(followed.out.splitlines()) == 3, followed.out  # not every older event after them


async def test_runs_list_filters_by_workflow_status_and_time(
    steps_engine: Engine, cli: Cli
) -> None:
    done = await completed_tree_run(steps_engine)
    await steps_engine.register(SLOW)
    old = await steps_engine.submit("slow")
    older = await steps_engine.submit("slow")
    await steps_engine.conn.execute(
        "UPDATE flowforge.runs SET created_at = now() - interval '3 hours' WHERE id = $1", old
    )
    await steps_engine.conn.execute(
        "UPDATE flowforge.runs SET created_at = now() - interval '3 days' WHERE id = $1", older
    )

    async def ids(*argv: str) -> list[str]:
        result = await cli("runs", "list", *argv)
        assert result.code == 0, result.err
        header, *lines = result.out.splitlines()
        assert header.split() == ["RUN", "WORKFLOW", "STATUS", "CREATED", "TOOK"]
        as_json = await cli("runs", "list", *argv, "--json")
        assert [run["id"] for run in json.loads(as_json.out)] == [ln.split()[0] for ln in lines]
        return [line.split()[0] for line in lines]

    assert await ids() == [str(done), str(old), str(older)]
    assert await ids("--since", "1h") == [str(done)]
    assert await ids("--since", "1d", "--until", "1h") == [str(old)]
    assert await ids("--until", "PT1H", "--workflow", "slow") == [str(old), str(older)]
    assert await ids("--status", "completed", "--since", "2020-01-01T00:00Z") == [str(done)]
    assert await ids("--workflow", "tree", "--status", "failed") == []
    bad = await cli("runs", "list", "--since", "yesterday")
    assert bad.code == 2 and "neither a duration" in bad.err


async def test_runs_list_takes_every_status_and_a_cancelled_run_retried_says_so(
    steps_engine: Engine, cli: Cli
) -> None:
    done = await completed_tree_run(steps_engine)
    await steps_engine.register(SLOW)
    await steps_engine.register(REFUSED)
    held, cancelled = await steps_engine.submit("slow"), await steps_engine.submit("slow")
    failed = await steps_engine.submit("refused")
    assert (await steps_engine.finished(failed))["status"] == "failed"
    assert (await cli("runs", "cancel", str(cancelled))).code == 0
    assert (await steps_engine.finished(cancelled))["status"] == "cancelled"

    async def held_runs() -> bool:
        return bool((await steps_engine.run(held))["status"] == "running")

    await wait_for(held_runs, message="the held run did not start")

    listed = {}
    for status in ("pending", "running", "completed", "failed", "cancelled"):
        result = await cli("runs", "list", "--status", status, "--json")
        assert result.code == 0, (status, result.err)
        listed[status] = [run["id"] for run in json.loads(result.out)]
    assert listed == {
        "pending": [],
        "running": [str(held)],
        "completed": [str(done)],
        "failed": [str(failed)],
        "cancelled": [str(cancelled)],
    }

    retried = await cli("runs", "retry", str(cancelled))
    assert (retried.code, retried.out.strip()) == (
        0,
        f"run {cancelled}: runs again from the steps that failed or were cancelled (redrive 1)",
    )
