"""`submit`, and `runs show|watch|list|cancel|retry|export`."""

from __future__ import annotations

import argparse
import difflib
import gzip
import json
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime

from flowforge_orchestrator import store
from flowforge_orchestrator.cli.common import (
    Subcommands,
    add_command,
    connection,
    point_in_time,
    run_id_arg,
)
from flowforge_orchestrator.cli.follow import (
    follow_run,
    format_run,
    run_details,
    run_steps,
    steps_json,
)
from flowforge_orchestrator.client import enqueue, redrive
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.durations import format_duration
from flowforge_orchestrator.core.state import RunStatus
from flowforge_orchestrator.errors import ConfigError, NotFound, RedriveError
from flowforge_orchestrator.store import reads
from flowforge_orchestrator.views.pictures import render_dot, render_mermaid
from flowforge_orchestrator.views.render import MAX_ELEMENTS, render_tree
from flowforge_orchestrator.views.tables import format_table

__all__ = ["add_commands"]

# Every status a run can have, from the state machine: a status added there is accepted here.
_STATUSES = [status.value for status in RunStatus]


async def cmd_submit(settings: Settings, args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.input)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--input is not valid JSON: {exc}") from exc
    async with connection(settings) as conn:
        await _known_workflow(conn, args.workflow, args.version)
        run = await enqueue(
            conn,
            args.workflow,
            payload,
            run_id=args.run_id,
            version=args.version,
            idempotency_key=args.idempotency_key,
        )
        print(str(run.id) if run.created else f"{run.id} (existing run for this idempotency key)")
        if not args.wait:
            return 0
        status = await follow_run(conn, run.id, out=sys.stdout, timeout=args.timeout)
    return 0 if status == "completed" else 1


async def _known_workflow(conn: store.Connection, name: str, version: int | None) -> None:
    """Refuse a workflow (or version) that is not registered before inserting anything,
    with the registered names closest to a typo."""
    if await store.get_definition(conn, name, version) is not None:
        return
    if version is not None and await store.get_definition(conn, name) is not None:
        raise NotFound(
            f"workflow '{name}' has no version {version} (see `definitions list {name}`)"
        )
    names = [row["name"] for row in await store.list_definitions(conn)]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = (
        f": did you mean {' or '.join(repr(c) for c in close)}?"
        if close
        else " (see `definitions list`)"
    )
    raise NotFound(f"workflow '{name}' is not registered{hint}")


def _title(run: Mapping[str, object]) -> str:
    version = run["workflow_version"] or "?"
    return f"{run['workflow_name']} v{version} · run {run['id']} · {run['status']}"


async def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(settings) as conn:
        details = await run_details(conn, args.run_id)
        steps = await run_steps(conn, details, max_elements=args.max_elements)
    now = datetime.now(UTC)
    if args.json:
        print(json.dumps({**details, "steps": steps_json(steps)}, indent=2, default=str))
    elif args.format == "mermaid":
        print(render_mermaid(steps, now, title=_title(details)), end="")
    elif args.format == "dot":
        print(render_dot(steps, now, title=_title(details)), end="")
    else:
        print(format_run(details, steps, now=now))
    return 0


async def cmd_watch(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(settings) as conn:
        details = await run_details(conn, args.run_id)
        print(f"watching {_title(details)}", flush=True)
        status = await follow_run(
            conn, args.run_id, out=sys.stdout, timeout=args.timeout, interval=args.interval
        )
        details = await run_details(conn, args.run_id)
        steps = await run_steps(conn, details)
    print(f"run {args.run_id} {status}")
    if steps:
        print(render_tree(steps, datetime.now(UTC)))
    return 0 if status == "completed" else 1


async def cmd_cancel(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(settings) as conn:
        requested, status = await store.request_cancel(conn, args.run_id, args.reason)
    if status is None:
        print(f"error: there is no run {args.run_id}", file=sys.stderr)
        return 1
    if not requested:
        print(f"run {args.run_id} already ended ({status}): nothing to cancel")
        return 0
    print(f"run {args.run_id}: cancellation requested (it was {status})")
    return 0


async def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(settings) as conn:
        try:
            count = await redrive(conn, args.run_id, from_step=args.from_step)
        except (NotFound, RedriveError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    where = (
        f"from step '{args.from_step}'"
        if args.from_step
        else "from the steps that failed or were cancelled"
    )
    print(f"run {args.run_id}: runs again {where} (redrive {count})")
    return 0


async def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(settings) as conn:
        rows = await reads.find_runs(
            conn,
            workflow=args.workflow,
            status=args.status,
            since=args.since,
            until=args.until,
            limit=args.limit,
            parent=args.parent,
        )
    if args.json:
        print(json.dumps([dict(row) for row in rows], indent=2, default=str))
        return 0
    print(
        format_table(
            ["run", "workflow", "status", "created", "took"],
            [
                [
                    row["id"],
                    f"{row['workflow_name']} v{row['workflow_version'] or '?'}",
                    row["status"],
                    f"{row['created_at'].astimezone():%Y-%m-%d %H:%M:%S}",
                    _took(row["started_at"], row["finished_at"]),
                ]
                for row in rows
            ],
        )
    )
    return 0


def _took(started: datetime | None, finished: datetime | None) -> str:
    if started is None or finished is None:
        return ""
    return format_duration((finished - started).total_seconds())


async def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    """One JSON line per finished run that ended before `--before`, with its history and
    results; written to a temporary file renamed into place, so a half-written export is
    never mistaken for a whole one. `.gz` compresses."""
    target: str = args.to
    partial = f"{target}.partial"
    count = 0
    opener = gzip.open if target.endswith(".gz") else open
    try:
        async with connection(settings) as conn:
            with opener(partial, "wt", encoding="utf-8") as out:
                async with conn.transaction(readonly=True, isolation="repeatable_read"):
                    async for record in store.export_runs(conn, before=args.before):
                        out.write(json.dumps(record, sort_keys=True, separators=(",", ":")))
                        out.write("\n")
                        count += 1
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    print(f"exported {count} runs that ended before {args.before.isoformat()} to {target}")
    return 0


def _when(text: str) -> datetime:
    return point_in_time(text, datetime.now(UTC))


def add_commands(sub: Subcommands) -> None:
    submit = add_command(sub, "submit", cmd_submit, "enqueue a run of a workflow")
    submit.add_argument("workflow")
    submit.add_argument("--input", default="{}", help="the run input as JSON")
    submit.add_argument("--wait", action="store_true", help="follow the run until it ends")
    submit.add_argument("--timeout", type=float, default=None, help="give up waiting after N s")
    submit.add_argument("--version", type=int, default=None)
    submit.add_argument(
        "--run-id", type=run_id_arg, default=None, help="use this UUID as the run id"
    )
    submit.add_argument("--idempotency-key", default=None)

    runs = sub.add_parser("runs", help="inspect runs").add_subparsers(
        dest="runs_command", required=True
    )
    show = add_command(runs, "show", cmd_show, "a run: its step tree, attempts and timings")
    show.add_argument("run_id", type=run_id_arg)
    show.add_argument(
        "--format",
        choices=["tree", "mermaid", "dot"],
        default="tree",
        help="tree (terminal), or a picture: Mermaid flowchart or Graphviz dot text",
    )
    show.add_argument("--json", action="store_true", help="everything, as JSON")
    show.add_argument(
        "--max-elements",
        type=int,
        default=MAX_ELEMENTS,
        metavar="N",
        help=f"for_each elements drawn before the rest are summarised (default {MAX_ELEMENTS})",
    )
    watch = add_command(runs, "watch", cmd_watch, "follow a run's events live until it ends")
    watch.add_argument("run_id", type=run_id_arg)
    watch.add_argument("--timeout", type=float, default=None, help="give up after N s")
    watch.add_argument("--interval", type=float, default=0.2, help="poll interval, s")
    cancel = add_command(runs, "cancel", cmd_cancel, "cancel a pending or running run")
    cancel.add_argument("run_id", type=run_id_arg)
    cancel.add_argument("--reason", default=None, help="why, kept with the request")
    retry = add_command(
        runs, "retry", cmd_retry, "run a failed or cancelled run again, keeping what succeeded"
    )
    retry.add_argument("run_id", type=run_id_arg)
    retry.add_argument("--from", dest="from_step", default=None, help="run again from this step")
    listing = add_command(runs, "list", cmd_list, "recent runs, newest first")
    listing.add_argument("--workflow")
    listing.add_argument("--status", choices=_STATUSES)
    listing.add_argument(
        "--since", type=_when, help="created at or after: a duration ago (1h, 2d) or a time"
    )
    listing.add_argument(
        "--until", type=_when, help="created before: a duration ago (30m) or an ISO 8601 time"
    )
    listing.add_argument(
        "--parent", type=run_id_arg, metavar="RUN_ID", help="only the child runs of this run"
    )
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--json", action="store_true", help="the runs as a JSON array")
    export = add_command(
        runs, "export", cmd_export, "write finished runs with their history to a JSON-lines file"
    )
    export.add_argument(
        "--before",
        type=_when,
        required=True,
        help="runs that ended before: a duration ago (30d) or an ISO 8601 time",
    )
    export.add_argument(
        "--to", required=True, metavar="FILE", help="FILE.jsonl, or FILE.jsonl.gz to compress"
    )
