"""`flowforge-orchestrator`: the daemon, the worker, migrations, definitions and runs.

Settings are read here, once, from `FLOWFORGE_*` variables, and passed down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any
from uuid import UUID

from pydantic import ValidationError

from flowforge_orchestrator import sdnotify, store, telemetry
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.definitions import (
    definition_json_schema,
    load_definition,
)
from flowforge_orchestrator.enqueue import enqueue, redrive
from flowforge_orchestrator.errors import ConfigError, FlowForgeError, NotFound, RedriveError
from flowforge_orchestrator.runs_view import follow_run, format_run, run_details

__all__ = ["main"]

log = logging.getLogger("flowforge_orchestrator")


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"FLOWFORGE_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None


SECRET_PREFIX = "FLOWFORGE_SECRET_"


def _secrets() -> dict[str, str]:
    """`${{ secrets.NAME }}` reads `FLOWFORGE_SECRET_NAME`, and nothing else of the
    environment, so a definition cannot read the worker's database password."""
    return {
        k.removeprefix(SECRET_PREFIX): v
        for k, v in os.environ.items()
        if k.startswith(SECRET_PREFIX)
    }


def _need_db(settings: Settings) -> str:
    if not settings.database_url:
        raise ConfigError("set FLOWFORGE_DATABASE_URL (a PostgreSQL DSN)")
    return settings.database_url


@contextlib.asynccontextmanager
async def _connection(settings: Settings) -> AsyncIterator[store.Connection]:
    conn = await store.connect(_need_db(settings))
    try:
        yield conn
    finally:
        await conn.close()


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def stopping() -> None:
        sdnotify.stopping()  # systemd shows "deactivating" while we finish what is in hand
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping)


@contextlib.asynccontextmanager
async def _services(settings: Settings) -> AsyncIterator[Settings]:
    """Use the configured URLs, or start private servers in the data dir for this process."""
    if settings.database_url and settings.redis_url:
        yield settings
        return
    from flowforge_orchestrator.local_services import local_services

    with local_services(settings.data_dir) as services:
        print(f"PostgreSQL: {services.postgres.url} ({services.postgres.source})", flush=True)
        print(f"Redis:      {services.redis.url} ({services.redis.source})", flush=True)
        yield settings.model_copy(
            update={
                "database_url": settings.database_url or services.postgres.url,
                "redis_url": settings.redis_url or services.redis.url,
            }
        )


# -- commands ----------------------------------------------------------------------------------


async def cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    applied = await store.apply_migrations(_need_db(settings))
    print("applied: " + ", ".join(applied) if applied else "the schema is up to date")
    return 0


async def _require_schema(dsn: str) -> None:
    """Refuse to start on a schema this code does not match (run `migrate` first)."""
    pending = await store.pending_migrations(dsn)
    if pending:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in pending)
        raise ConfigError(
            f"the database lacks migrations {names}: run `flowforge-orchestrator migrate` "
            "(or start with --migrate)"
        )


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from flowforge_orchestrator.orchestrator import run_orchestrator
    from flowforge_orchestrator.worker import load_step_types, run_worker

    console = settings.otel_console or args.otel_console
    telemetry.setup_tracing(service_name="flowforge-orchestrator", console=console)
    telemetry.instrument_asyncpg()
    local = not (settings.database_url and settings.redis_url)
    async with _services(settings) as live:
        if args.migrate or local:
            await store.apply_migrations(_need_db(live))
        else:
            await _require_schema(_need_db(live))
        stop = asyncio.Event()
        _stop_on_signals(stop)
        tasks = [asyncio.create_task(run_orchestrator(live, stop))]
        if args.with_worker:
            types = load_step_types(args.types_module)
            tasks.append(
                asyncio.create_task(run_worker(live, types, stop=stop, secrets=_secrets()))
            )
        try:
            await asyncio.gather(*tasks)
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            telemetry.shutdown_tracing()
    return 0


async def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from flowforge_orchestrator.worker import load_step_types, run_worker

    if not settings.database_url or not settings.redis_url:
        raise ConfigError(
            "the worker needs FLOWFORGE_DATABASE_URL and FLOWFORGE_REDIS_URL "
            "(`flowforge-orchestrator run` prints them when it starts private servers)"
        )
    console = settings.otel_console or args.otel_console
    telemetry.setup_tracing(service_name="flowforge-worker", console=console)
    telemetry.instrument_asyncpg()
    types = load_step_types(args.types_module)
    await _require_schema(settings.database_url)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    try:
        await run_worker(settings, types, queues=args.queues or None, stop=stop, secrets=_secrets())
    finally:
        telemetry.shutdown_tracing()
    return 0


async def cmd_definitions_apply(settings: Settings, args: argparse.Namespace) -> int:
    async with _connection(settings) as conn:
        known = set(await store.list_step_types(conn)) | set(args.allow_type or [])
        definition = load_definition(Path(args.file), known_types=known)
        created, existing = await store.register_definition(conn, definition)
        if not created:
            if existing is not None and existing.spec != store.definition_spec(definition):
                raise ConfigError(
                    f"{args.file}: {definition.name} version {definition.version} is already "
                    "registered with a different spec; raise `version` to register a change"
                )
            print(f"{definition.name} version {definition.version} is already registered")
            return 0
    print(f"registered {definition.name} version {definition.version}")
    return 0


async def cmd_definitions_validate(_settings: Settings, args: argparse.Namespace) -> int:
    known = set(args.allow_type or []) if args.allow_type else None
    definition = load_definition(Path(args.file), known_types=known)
    steps = sum(1 for _ in definition.all_steps())
    print(f"{args.file}: {definition.name} version {definition.version} is valid ({steps} steps)")
    return 0


async def cmd_definitions_schema(_settings: Settings, _args: argparse.Namespace) -> int:
    print(json.dumps(definition_json_schema(), indent=2))
    return 0


async def cmd_definitions_list(settings: Settings, _args: argparse.Namespace) -> int:
    async with _connection(settings) as conn:
        for row in await store.list_definitions(conn):
            limit = row["max_concurrency"] or "-"
            print(f"{row['name']}\tv{row['version']}\tmax_concurrency={limit}")
    return 0


async def cmd_submit(settings: Settings, args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.input)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--input is not valid JSON: {exc}") from exc
    async with _connection(settings) as conn:
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


async def cmd_runs_show(settings: Settings, args: argparse.Namespace) -> int:
    async with _connection(settings) as conn:
        details = await run_details(conn, args.run_id)
    if args.json:
        print(json.dumps(details, indent=2, default=str))
    else:
        print(format_run(details))
    return 0


async def cmd_runs_cancel(settings: Settings, args: argparse.Namespace) -> int:
    async with _connection(settings) as conn:
        requested, status = await store.request_cancel(conn, args.run_id)
    if status is None:
        print(f"error: there is no run {args.run_id}", file=sys.stderr)
        return 1
    if not requested:
        print(f"run {args.run_id} already ended ({status}): nothing to cancel")
        return 0
    print(f"run {args.run_id}: cancellation requested (it was {status})")
    return 0


async def cmd_runs_retry(settings: Settings, args: argparse.Namespace) -> int:
    async with _connection(settings) as conn:
        try:
            count = await redrive(conn, args.run_id, from_step=args.from_step)
        except (NotFound, RedriveError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    where = f"from step '{args.from_step}'" if args.from_step else "from its failed steps"
    print(f"run {args.run_id}: runs again {where} (redrive {count})")
    return 0


async def cmd_runs_list(settings: Settings, args: argparse.Namespace) -> int:
    async with _connection(settings) as conn:
        rows = await store.list_runs(
            conn, workflow=args.workflow, status=args.status, limit=args.limit
        )
    for row in rows:
        took = ""
        if row["started_at"] and row["finished_at"]:
            took = f"{(row['finished_at'] - row['started_at']).total_seconds():.2f}s"
        print(
            f"{row['id']}  {row['workflow_name']} v{row['workflow_version'] or '?'}  "
            f"{row['status']:<9}  {row['created_at']:%Y-%m-%d %H:%M:%S}  {took}"
        )
    return 0


async def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from flowforge_orchestrator.demo import run_demo

    async with _services(settings) as live:
        return await run_demo(live, order_id=args.order_id)


# -- parser ------------------------------------------------------------------------------------


def _uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowforge-orchestrator", description="Durable workflow engine on PostgreSQL + arq."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Command, help: str, parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    add("migrate", cmd_migrate, "apply the missing SQL migrations")
    run = add("run", cmd_run, "run the orchestrator daemon")
    run.add_argument("--migrate", action="store_true", help="apply migrations first")
    run.add_argument("--with-worker", action="store_true", help="also run a worker in-process")
    run.add_argument("--types-module", action="append", default=[], metavar="MODULE")
    run.add_argument("--otel-console", action="store_true", help="print spans to stderr")
    worker = add("worker", cmd_worker, "run an arq worker for step types")
    worker.add_argument(
        "--types-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import @step_type functions from this module (repeatable)",
    )
    worker.add_argument("--queues", nargs="*", metavar="TYPE", help="serve only these types")
    worker.add_argument("--otel-console", action="store_true", help="print spans to stderr")

    defs = sub.add_parser("definitions", help="workflow definitions").add_subparsers(
        dest="definitions_command", required=True
    )
    apply = add("apply", cmd_definitions_apply, "validate and register a definition", defs)
    apply.add_argument("file")
    apply.add_argument(
        "--allow-type",
        action="append",
        metavar="TYPE",
        help="accept this custom step type even if no worker registered it",
    )
    validate = add("validate", cmd_definitions_validate, "validate a definition file", defs)
    validate.add_argument("file")
    validate.add_argument(
        "--allow-type",
        action="append",
        metavar="TYPE",
        help="check step types against the built-ins and these",
    )
    add("schema", cmd_definitions_schema, "print the JSON Schema of definitions", defs)
    add("list", cmd_definitions_list, "list registered workflows (latest versions)", defs)

    submit = add("submit", cmd_submit, "enqueue a run of a workflow")
    submit.add_argument("workflow")
    submit.add_argument("--input", default="{}", help="the run input as JSON")
    submit.add_argument("--wait", action="store_true", help="follow the run until it ends")
    submit.add_argument("--timeout", type=float, default=None, help="give up waiting after N s")
    submit.add_argument("--version", type=int, default=None)
    submit.add_argument("--run-id", type=_uuid, default=None, help="use this UUID as the run id")
    submit.add_argument("--idempotency-key", default=None)

    runs = sub.add_parser("runs", help="inspect runs").add_subparsers(
        dest="runs_command", required=True
    )
    show = add("show", cmd_runs_show, "a run with its steps, attempts and timings", runs)
    show.add_argument("run_id", type=_uuid)
    show.add_argument("--json", action="store_true")
    cancel = add("cancel", cmd_runs_cancel, "cancel a pending or running run", runs)
    cancel.add_argument("run_id", type=_uuid)
    retry = add(
        "retry", cmd_runs_retry, "run a failed or cancelled run again, keeping what succeeded", runs
    )
    retry.add_argument("run_id", type=_uuid)
    retry.add_argument("--from", dest="from_step", default=None, help="run again from this step")
    lst = add("list", cmd_runs_list, "recent runs", runs)
    lst.add_argument("--workflow")
    lst.add_argument("--status", choices=["pending", "running", "completed", "failed", "cancelled"])
    lst.add_argument("--limit", type=int, default=20)

    demo = add("demo", cmd_demo, "run the example workflow end to end on private servers")
    demo.add_argument("--order-id", default="A-1001")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already explained
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("arq", "httpx", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        settings = _settings()
        code: int = asyncio.run(args.fn(settings, args))
        return code
    except FlowForgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
