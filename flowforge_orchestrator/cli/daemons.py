"""The long-running commands: `migrate`, `run` (the orchestrator), `worker`, `demo`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from secrets import token_urlsafe

from pydantic import SecretStr
from redis.asyncio import Redis
from redis.exceptions import RedisError

from flowforge_orchestrator import store
from flowforge_orchestrator.cli.common import (
    Subcommands,
    add_command,
    need_db,
    secrets,
    with_job_key,
)
from flowforge_orchestrator.cli.config_view import mask_url
from flowforge_orchestrator.cli.dev import watch_dev_servers
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.destinations import allow_loopback
from flowforge_orchestrator.errors import ConfigError, ServiceUnavailable
from flowforge_orchestrator.ops import sdnotify, telemetry

__all__ = ["add_commands", "require_redis", "require_schema"]


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def stopping() -> None:
        sdnotify.stopping()  # systemd shows "deactivating" while we finish what is in hand
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping)


@contextlib.asynccontextmanager
async def _services(settings: Settings) -> AsyncIterator[Settings]:
    """Use the configured URLs, or start private servers in the data dir for this process
    (then, without FLOWFORGE_JOB_KEY, the job key is `<data_dir>/job.key`, created if need
    be, which a `worker` started with the printed URLs finds too)."""
    if settings.database_url and settings.redis_url:
        yield with_job_key(settings, create=False)
        return
    from flowforge_orchestrator.local_services import local_services

    with local_services(settings.data_dir) as services:
        print(f"PostgreSQL: {services.postgres.url} ({services.postgres.source})", flush=True)
        print(f"Redis:      {services.redis.url} ({services.redis.source})", flush=True)
        live = settings.model_copy(
            update={
                "database_url": settings.database_url or services.postgres.url,
                "redis_url": settings.redis_url or services.redis.url,
                # The local default: http steps may call services on this machine.
                "http_allow": allow_loopback(settings.http_allow),
            }
        )
        yield with_job_key(live, create=True)


async def require_schema(dsn: str) -> None:
    """Refuse to start on a schema this code does not match (run `migrate` first)."""
    pending = await store.pending_migrations(dsn)
    if pending:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in pending)
        raise ServiceUnavailable(
            f"the database lacks migrations {names}: run `flowforge-orchestrator migrate` "
            "(or start with --migrate)"
        )


async def require_redis(url: str, *, timeout: float = 5.0) -> None:
    """Refuse to start on a Redis that does not answer now: a daemon outlives a Redis
    restart, but one started against a wrong URL would wait for it forever."""
    client = Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        raise ServiceUnavailable(f"Redis unavailable at {mask_url(url)}: {exc}") from exc
    finally:
        await client.aclose()


async def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    applied = await store.apply_migrations(need_db(settings))
    print("applied: " + ", ".join(applied) if applied else "the schema is up to date")
    if args.roles:
        await store.apply_roles(need_db(settings))
        print("roles: flowforge_orchestrator, flowforge_worker, flowforge_api granted")
    return 0


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from flowforge_orchestrator.engine.orchestrator import run_orchestrator
    from flowforge_orchestrator.worker.runtime import load_step_types, run_worker

    console = settings.otel_console or args.otel_console
    telemetry.configure(service_name="flowforge-orchestrator", console=console)
    local = not (settings.database_url and settings.redis_url)
    async with _services(settings) as live:
        if args.migrate or local:
            await store.apply_migrations(need_db(live))
        else:
            await require_schema(need_db(live))
        assert live.redis_url is not None
        await require_redis(live.redis_url)
        stop = asyncio.Event()
        _stop_on_signals(stop)
        tasks = [asyncio.create_task(run_orchestrator(live, stop))]
        if args.with_worker:
            types = load_step_types(args.types_module)
            # One process, one health server: the orchestrator's.
            worker = run_worker(live, types, stop=stop, secrets=secrets(), serve_http=False)
            tasks.append(asyncio.create_task(worker))
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
    from flowforge_orchestrator.worker.runtime import load_step_types, run_worker

    if not settings.database_url or not settings.redis_url:
        raise ConfigError(
            "the worker needs FLOWFORGE_DATABASE_URL and FLOWFORGE_REDIS_URL "
            "(`flowforge-orchestrator dev` or `run` prints them when it starts private servers; "
            "commands find the servers of a running `dev` by themselves)"
        )
    dsn, redis_url = settings.database_url, settings.redis_url
    settings = with_job_key(settings, create=False)
    console = settings.otel_console or args.otel_console
    telemetry.configure(service_name="flowforge-worker", console=console)
    types = load_step_types(args.types_module)
    await require_schema(dsn)
    await require_redis(redis_url)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    moved = asyncio.create_task(watch_dev_servers(settings, stop))
    try:
        await run_worker(settings, types, queues=args.queues or None, stop=stop, secrets=secrets())
    finally:
        stop.set()
        reason = await moved
        telemetry.shutdown_tracing()
    if reason:  # its servers went away: a worker that polled on would wait forever
        raise ServiceUnavailable(reason)
    return 0


async def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from flowforge_orchestrator.cli.demo import run_demo

    async with _services(settings) as live:
        # The demo serves its endpoints on 127.0.0.1, whichever servers it uses.
        live = live.model_copy(update={"http_allow": allow_loopback(settings.http_allow)})
        if live.job_key is None:
            # The demo's orchestrator and worker share this process: a key of their own
            # that no one else needs to know.
            live = live.model_copy(update={"job_key": SecretStr(token_urlsafe(32))})
        return await run_demo(live, order_id=args.order_id)


def add_commands(sub: Subcommands) -> None:
    migrate = add_command(sub, "migrate", cmd_migrate, "apply the missing SQL migrations")
    migrate.add_argument(
        "--roles",
        action="store_true",
        help="then (re)apply sql/roles.sql: the three least-privilege roles (needs a superuser)",
    )
    run = add_command(sub, "run", cmd_run, "run the orchestrator daemon")
    run.add_argument("--migrate", action="store_true", help="apply migrations first")
    run.add_argument("--with-worker", action="store_true", help="also run a worker in-process")
    run.add_argument("--types-module", action="append", default=[], metavar="MODULE")
    run.add_argument("--otel-console", action="store_true", help="print spans to stderr")
    worker = add_command(sub, "worker", cmd_worker, "run an arq worker for step types")
    worker.add_argument(
        "--types-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import @step_type functions from this module (repeatable)",
    )
    worker.add_argument("--queues", nargs="*", metavar="TYPE", help="serve only these types")
    worker.add_argument("--otel-console", action="store_true", help="print spans to stderr")


def add_demo(sub: Subcommands) -> None:
    demo = add_command(
        sub, "demo", cmd_demo, "run the example workflow end to end on private servers"
    )
    demo.add_argument("--order-id", default="A-1001")
