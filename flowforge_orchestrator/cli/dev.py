"""`flowforge-orchestrator dev`: the whole local loop in one process tree.

PostgreSQL and Redis (private servers in the data dir, on the ports they had last time when
those are free), migrations, the orchestrator, one worker and the health/metrics server; the
definitions of a folder applied at start and again whenever a file changes (a changed spec
under a version already registered becomes the next version); Ctrl-C stops everything.

While it runs, `<data_dir>/dev.json` names its servers: commands started without
FLOWFORGE_DATABASE_URL and FLOWFORGE_REDIS_URL (`submit`, `worker`, `runs ...`) use them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from pathlib import Path

from flowforge_orchestrator import store
from flowforge_orchestrator.cli.common import Subcommands, add_command, secrets, with_job_key
from flowforge_orchestrator.cli.definitions import load_definition
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.definition.checks import BUILTIN_STEP_TYPES
from flowforge_orchestrator.core.destinations import allow_loopback
from flowforge_orchestrator.errors import FlowForgeError

__all__ = ["DEV_FILE", "add_commands", "watch_dev_servers", "with_dev_servers"]

DEV_FILE = "dev.json"  # while a `dev` runs: its pid and servers
PORTS_FILE = "dev-ports.json"  # kept: the next `dev` asks for the same ports
_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class DevSession:
    """What a running `dev` wrote in its data dir."""

    pid: int
    database_url: str
    redis_url: str
    postgres_port: int | None = None
    redis_port: int | None = None


def _read_session(data_dir: Path) -> DevSession | None:
    try:
        data = json.loads((data_dir / DEV_FILE).read_text(encoding="utf-8"))
        return DevSession(**data)
    except (OSError, ValueError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def with_dev_servers(settings: Settings) -> Settings:
    """`settings` with the servers of a `dev` running on this data dir, when neither URL is
    set; as they are otherwise."""
    if settings.database_url or settings.redis_url:
        return settings
    session = _read_session(settings.data_dir)
    if session is None or not _alive(session.pid):
        return settings
    return settings.model_copy(
        update={"database_url": session.database_url, "redis_url": session.redis_url}
    )


def _serves(session: DevSession | None, settings: Settings) -> bool:
    return (
        session is not None
        and _alive(session.pid)
        and (session.database_url, session.redis_url) == (settings.database_url, settings.redis_url)
    )


async def watch_dev_servers(settings: Settings, stop: asyncio.Event, interval: float = 1.0) -> str:
    """For a process using the servers of a running `dev` (found by `with_dev_servers`):
    when that `dev` stops or its servers move, say why, set `stop` and return the reason;
    never returns for servers that did not come from a `dev` (until `stop`)."""
    if not _serves(_read_session(settings.data_dir), settings):
        await stop.wait()
        return ""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        session = _read_session(settings.data_dir)
        if not _serves(session, settings):
            reason = (
                "the `dev` whose servers this process used has stopped"
                if session is None or not _alive(session.pid)
                else f"the `dev` servers moved (now {session.redis_url}): start this again"
            )
            stop.set()
            return reason
    return ""


def _free(port: int | None) -> int | None:
    """`port` if nothing listens on it (a remembered one), else None."""
    if not port:
        return None
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return None
    return port


@contextlib.asynccontextmanager
async def _servers(settings: Settings) -> AsyncIterator[tuple[Settings, int | None, int | None]]:
    """The configured URLs, or private servers on the ports they had last time (and the
    ports, to remember)."""
    if settings.database_url and settings.redis_url:
        yield settings, None, None
        return
    from flowforge_orchestrator.local_services import LocalPostgres, LocalRedis

    ports = _last_ports(settings.data_dir)
    postgres = LocalPostgres(settings.data_dir / "postgres", port=_free(ports[0]))
    redis = LocalRedis(settings.data_dir / "redis", port=_free(ports[1]))
    with contextlib.ExitStack() as stack:
        stack.callback(postgres.stop)
        stack.callback(redis.stop)
        await asyncio.to_thread(postgres.start)
        await asyncio.to_thread(redis.start)
        for server, port in ((postgres, ports[0]), (redis, ports[1])):
            if port and server.port != port:
                print(f"{server.name}: port {port} is taken, now on {server.port}", flush=True)
        live = settings.model_copy(
            update={
                "database_url": settings.database_url or postgres.url,
                "redis_url": settings.redis_url or redis.url,
            }
        )
        _remember_ports(settings.data_dir, postgres.port, redis.port)
        yield live, postgres.port, redis.port


def _last_ports(data_dir: Path) -> tuple[int | None, int | None]:
    """The ports the private servers of the last `dev` had (None, None: none yet)."""
    try:
        data = json.loads((data_dir / PORTS_FILE).read_text(encoding="utf-8"))
        return int(data["postgres"]), int(data["redis"])
    except (OSError, ValueError, TypeError, KeyError):
        return None, None


def _remember_ports(data_dir: Path, postgres: int, redis: int) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"postgres": postgres, "redis": redis}) + "\n"
    (data_dir / PORTS_FILE).write_text(text, encoding="utf-8")


def _write_session(
    data_dir: Path, pg_port: int | None, redis_port: int | None, db: str, redis: str
) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    session = {
        "pid": os.getpid(),
        "database_url": db,
        "redis_url": redis,
        "postgres_port": pg_port,
        "redis_port": redis_port,
    }
    path = data_dir / DEV_FILE
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(session, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


class DefinitionWatcher:
    """Applies every definition file of a folder, then each one that changes."""

    def __init__(self, folder: Path, known_types: Collection[str]) -> None:
        self.folder = folder
        self.known_types = set(known_types)
        self.seen: dict[Path, tuple[int, int]] = {}

    def changed(self) -> list[Path]:
        found: dict[Path, tuple[int, int]] = {}
        with contextlib.suppress(FileNotFoundError):
            for path in sorted(self.folder.iterdir()):
                if path.suffix.lower() in _SUFFIXES and path.is_file():
                    with contextlib.suppress(FileNotFoundError):
                        stat = path.stat()
                        found[path] = (stat.st_mtime_ns, stat.st_size)
        fresh = [path for path, mark in found.items() if self.seen.get(path) != mark]
        self.seen = found
        return fresh

    async def apply(self, conn: store.Connection, path: Path) -> str:
        """Register the file's definition; a changed spec under a registered version is
        registered as the next version. Returns what happened, for a person."""
        definition = load_definition(path, known_types=self.known_types)
        created, existing = await store.register_definition(conn, definition)
        if created:
            return f"{path.name}: registered {definition.name} version {definition.version}"
        if existing is not None and existing.spec == store.definition_spec(definition):
            return f"{path.name}: {definition.name} version {definition.version} is up to date"
        latest = await store.get_definition(conn, definition.name)
        assert latest is not None  # this name has at least the version just found
        same = definition.model_copy(update={"version": latest.version})
        if latest.spec == store.definition_spec(same):  # saved again, or dev restarted
            return f"{path.name}: {definition.name} version {latest.version} is up to date"
        for version in range(latest.version + 1, latest.version + 100):
            candidate = definition.model_copy(update={"version": version})
            created, _ = await store.register_definition(conn, candidate)
            if created:
                return (
                    f"{path.name}: registered {definition.name} version {version} "
                    f"(changed; the file says version {definition.version})"
                )
        raise FlowForgeError(f"{path}: no free version for {definition.name}")  # pragma: no cover

    async def watch(self, dsn: str, stop: asyncio.Event, interval: float) -> None:
        conn = await store.connect(dsn)
        try:
            while not stop.is_set():
                for path in self.changed():
                    try:
                        print(await self.apply(conn, path), flush=True)
                    except FlowForgeError as exc:  # one bad file fails alone
                        print(f"error: {exc}", flush=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        finally:
            await conn.close()


def _print_exports(live: Settings, folder: Path) -> None:
    print(
        "\n".join(
            [
                "FlowForge dev is up. In another terminal, commands find these servers; to "
                "export them:",
                f"  export FLOWFORGE_DATABASE_URL={live.database_url}",
                f"  export FLOWFORGE_REDIS_URL={live.redis_url}",
                f"Definitions: {folder.resolve()} (applied when a file changes). Ctrl-C stops.",
            ]
        ),
        flush=True,
    )


async def cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    from flowforge_orchestrator.engine.orchestrator import run_orchestrator
    from flowforge_orchestrator.worker.runtime import load_step_types, run_worker

    if os.getcwd() not in sys.path:  # `--types-module steps` finds ./steps.py
        sys.path.insert(0, os.getcwd())
    types = load_step_types(args.types_module)
    folder = Path(args.definitions)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with _servers(settings) as (live, pg_port, redis_port):
        dsn, redis_url = live.database_url, live.redis_url
        assert dsn is not None and redis_url is not None
        live = with_job_key(live, create=True).model_copy(
            update={"http_allow": allow_loopback(settings.http_allow)}
        )
        await store.apply_migrations(dsn)
        _write_session(settings.data_dir, pg_port, redis_port, dsn, redis_url)
        try:
            _print_exports(live, folder)
            watcher = DefinitionWatcher(folder, BUILTIN_STEP_TYPES | set(types))
            tasks = [
                asyncio.create_task(run_orchestrator(live, stop)),
                asyncio.create_task(
                    run_worker(live, types, stop=stop, secrets=secrets(), serve_http=False)
                ),
                asyncio.create_task(watcher.watch(dsn, stop, args.interval)),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()  # a part that failed ends dev with its error
            finally:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            with contextlib.suppress(FileNotFoundError):
                (settings.data_dir / DEV_FILE).unlink()
    print("FlowForge dev stopped", flush=True)
    return 0


def add_commands(sub: Subcommands) -> None:
    dev = add_command(
        sub,
        "dev",
        cmd_dev,
        "servers, orchestrator, a worker and definitions that apply themselves, in one command",
    )
    dev.add_argument(
        "--definitions",
        default="workflows",
        metavar="DIR",
        help="apply every .yaml/.yml/.json definition here, and each one that changes "
        "(default ./workflows)",
    )
    dev.add_argument(
        "--types-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import @step_type functions from this module (repeatable)",
    )
    dev.add_argument(
        "--interval", type=float, default=0.5, help="seconds between looks at the folder"
    )
