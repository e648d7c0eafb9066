"""Reading runs for people: `runs show` (with its step tree), and following a run for
`submit --wait` and `runs watch`. The drawing itself is `views.render`'s (pure)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import IO, Any
from uuid import UUID

from flowforge_orchestrator import store
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.core.definition.plan import CompiledWorkflow
from flowforge_orchestrator.errors import NotFound, WaitTimedOut
from flowforge_orchestrator.store import events as store_events
from flowforge_orchestrator.store import reads
from flowforge_orchestrator.views.render import MAX_ELEMENTS, StepNode, build_tree, render_tree

__all__ = [
    "follow_run",
    "format_run",
    "load_workflow",
    "run_details",
    "run_steps",
    "steps_json",
]

_FINAL = {"completed", "failed", "cancelled"}


async def run_details(conn: store.Connection, run_id: UUID) -> dict[str, Any]:
    """A run with its checkpoint, attempts and transitions, as plain JSON-able data."""
    row = await store.get_run(conn, run_id)
    if row is None:
        raise NotFound(f"no run with id {run_id}")
    run = dict(row)
    state = await reads.run_checkpoint(conn, run_id)
    run["checkpoint"] = state["checkpoint"] if state else None
    run["redrives"] = state["redrives"] if state else 0
    run["attempts"] = [dict(a) for a in await store.run_attempts(conn, run_id)]
    run["transitions"] = [dict(t) for t in await store.run_transitions(conn, run_id)]
    run["waiting"] = await store_events.run_waits(conn, run_id)
    run["events_not_taken"] = await store_events.run_events_not_taken(conn, run_id)
    run["children"] = [dict(c) for c in await reads.child_runs(conn, run_id)]
    beats = await store_events.run_heartbeats(conn, run_id)
    for attempt in run["attempts"]:
        attempt["last_heartbeat"] = beats.get(attempt["id"])
    return run


async def load_workflow(
    conn: store.Connection, name: str, version: int | None
) -> CompiledWorkflow | None:
    """The run's definition, compiled; None when that version is not registered."""
    found = await store.get_definition(conn, name, version) if version else None
    if found is None:
        return None
    return CompiledWorkflow(parse_definition(found.spec, source=f"{name} v{version} (database)"))


async def run_steps(
    conn: store.Connection, run: dict[str, Any], *, max_elements: int = MAX_ELEMENTS
) -> list[StepNode]:
    """The step tree of a run read by `run_details`."""
    workflow = await load_workflow(conn, run["workflow_name"], run["workflow_version"])
    return build_tree(
        workflow,
        run["checkpoint"],
        attempts=run["attempts"],
        transitions=run["transitions"],
        max_elements=max_elements,
    )


def steps_json(nodes: Sequence[StepNode]) -> list[dict[str, Any]]:
    """The tree as JSON-able data (`runs show --json`)."""
    return [_node_json(node) for node in nodes]


def _node_json(node: StepNode) -> dict[str, Any]:
    data = asdict(node)
    data["lists"] = [
        {"label": c.label, "taken": c.taken, "steps": steps_json(c.steps)} for c in node.lists
    ]
    data["hidden"] = dict(node.hidden) if node.hidden else None
    return data


def _seconds(start: datetime | None, end: datetime | None) -> str:
    return f"{(end - start).total_seconds():.3f}s" if start and end else "-"


def _facts(run: dict[str, Any]) -> list[str]:
    """The run's own lines: ids, status, its parent (a child run), times, input, outcome."""
    lines = [
        f"run       {run['id']}",
        f"workflow  {run['workflow_name']} v{run['workflow_version'] or '?'}",
        f"status    {run['status']}",
    ]
    if run.get("parent_run_id") is not None:
        lines.append(f"parent    {run['parent_run_id']} (step {run['parent_step']})")
    lines += [
        f"created   {run['created_at']}",
        f"took      {_seconds(run['started_at'], run['finished_at'])}",
        f"input     {json.dumps(run['input'])}",
    ]
    if run["output"] is not None:
        lines.append(f"output    {json.dumps(run['output'])}")
    if run["error"] is not None:
        lines.append(f"error     {json.dumps(run['error'])}")
    return lines


def format_run(
    run: dict[str, Any], steps: Sequence[StepNode] = (), *, now: datetime | None = None
) -> str:
    """The run's facts, its step tree (when given), then every attempt."""
    lines = _facts(run)
    if steps:
        lines.append("steps:")
        tree = render_tree(steps, now or run["updated_at"])
        lines += ["  " + line for line in tree.splitlines()]
    lines.append("attempts:")
    for a in run["attempts"]:
        waited = _seconds(a["dispatched_at"], a["started_at"])
        ran = _seconds(a["started_at"], a["finished_at"])
        line = (
            f"  {a['step_id']:<20} #{a['attempt']} {a['step_type']:<10} {a['status']:<10} "
            f"queued {waited:>8}  ran {ran:>8}"
        )
        if a["error"]:
            line += f"  error: {a['error'].get('message')}"
        beat = a.get("last_heartbeat")
        if beat:
            line += f"  last heartbeat {beat['at']}: {json.dumps(beat['details'])}"
        lines.append(line)
    if run.get("waiting"):
        lines.append("waiting:")
        for w in run["waiting"]:
            key = f" key {json.dumps(w['key'])}" if w["key"] is not None else ""
            until = f" until {w['deadline']}" if w["deadline"] else " (no timeout)"
            lines.append(f"  {w['step_id']:<20} event {w['event']}{key}{until}")
    if run.get("children"):
        lines.append("children:")
        lines += _children(run["children"])
    if run.get("events_not_taken"):
        lines.append("events not taken:")
        for e in run["events_not_taken"]:
            lines.append(
                f"  #{e['id']:<8} {e['name']:<20} {e['created_at']}  {json.dumps(e['payload'])}"
            )
    return "\n".join(lines)


MAX_CHILDREN_SHOWN = 20  # per step; a fan-out of a thousand is summarised


def _children(children: Sequence[dict[str, Any]]) -> list[str]:
    """The child runs under the step that started them (its key: `charge[3]` for one
    fan-out element), a step's attempts in order."""
    by_step: dict[str, list[dict[str, Any]]] = {}
    for child in children:
        step = str(child["parent_step"])
        by_step.setdefault(step.split("[", 1)[0] if "[" in step else step, []).append(child)
    lines: list[str] = []
    for step, runs in by_step.items():
        lines.append(f"  {step}")
        for child in runs[:MAX_CHILDREN_SHOWN]:
            where = f" {child['parent_step']}" if child["parent_step"] != step else ""
            lines.append(
                f"    {child['id']}  {child['workflow_name']} "
                f"v{child['workflow_version'] or '?'}  {child['status']}{where}"
            )
        if len(runs) > MAX_CHILDREN_SHOWN:
            counts: dict[str, int] = {}
            for child in runs[MAX_CHILDREN_SHOWN:]:
                counts[child["status"]] = counts.get(child["status"], 0) + 1
            summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
            lines.append(f"    ... and {len(runs) - MAX_CHILDREN_SHOWN} more ({summary})")
    return lines


async def follow_run(
    conn: store.Connection,
    run_id: UUID,
    *,
    out: IO[str],
    timeout: float | None = None,
    interval: float = 0.2,
) -> str:
    """Print each event of the run as it is committed; returns the final status."""
    seq = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout if timeout else None
    while True:
        # The run row first: a final status is committed with its last event, so the events
        # read after it are complete.
        row = await store.get_run(conn, run_id)
        if row is None:
            raise NotFound(f"no run with id {run_id}")
        for event in await store.run_events(conn, run_id, seq):
            seq = event["seq"]
            out.write(_describe(event) + "\n")
            out.flush()
        if row["status"] in _FINAL:
            if row["status"] == "completed":
                out.write("output: " + json.dumps(row["output"], indent=2) + "\n")
            elif row["error"] is not None:
                out.write("error: " + json.dumps(row["error"], indent=2) + "\n")
            return str(row["status"])
        if deadline is not None and loop.time() > deadline:
            raise WaitTimedOut(f"run {run_id} still {row['status']} after {timeout}s")
        await asyncio.sleep(interval)


def _describe(event: store.Record) -> str:
    data = event["data"] or {}
    where = f" {data['step_id']}" if "step_id" in data else ""
    attempt = f" (attempt {data['attempt']})" if "attempt" in data else ""
    extra = ""
    if data.get("error"):
        extra = f": {data['error'].get('message')}"
    return f"{event['time']:%H:%M:%S.%f}"[:-3] + f"  {event['type']}{where}{attempt}{extra}"
