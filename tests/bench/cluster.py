"""What the benchmark runs on: servers, a database, the three processes, and resets.

PostgreSQL and Redis are private, durable servers (fsync and synchronous_commit on, Redis
append-only file synced every second) unless URLs are given. Either way the benchmark works
in a database of its own, created here and dropped at the end. The processes are real ones:
`flowforge-orchestrator run`, `flowforge-orchestrator worker --types-module
tests.bench.steps`, and the raw arq worker of `tests.bench.baseline`, all with the same
`poll_delay` and `max_jobs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

from redis.asyncio import Redis
from redis.exceptions import RedisError

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.errors import DefinitionError
from flowforge_orchestrator.local_services import LocalPostgres, LocalRedis
from flowforge_orchestrator.queue.dispatch import queue_name
from tests.bench.baseline import RAW_QUEUE, RawArq
from tests.bench.processes import Proc, start

__all__ = ["REPO", "Cluster"]

REPO = Path(__file__).resolve().parents[2]
STEP_MODULE = "tests.bench.steps"
STEP_TYPE = "noop"
_HEALTH = ":health-check"  # arq's per-queue key, written by a worker's first poll
_RUN_TABLES = (
    "flowforge.runs, flowforge.step_results, flowforge.outbox_packed, flowforge.parked_waits,"
    " flowforge.run_parts"
)
# A fan-out's output lists its elements' (37 B each for a no-op step): the default limits
# (256 KiB a step, 4 MiB a run) refuse it past ~7,000 elements, so the bench raises them
# for `--fanout-items` 100,000 (3.7 MB of output, 0.6 MB of input); and its `for_each`
# over 100,000 items takes longer than the default expression timeout (100 ms) to
# evaluate in the sandbox. Nothing else nears these limits.
BIG_FAN_OUTS = {
    "FLOWFORGE_MAX_OUTPUT_BYTES": str(64 * 1024 * 1024),
    "FLOWFORGE_MAX_CONTEXT_BYTES": str(256 * 1024 * 1024),
    "FLOWFORGE_EXPRESSION_TIMEOUT": "10",
}
# What a reset clears in Redis: the engine's queues and arq's per-job keys (both workers').
_ENGINE_KEYS = (queue_name("*"), "arq:job:*", "arq:in-progress:*", "arq:retry:*", "arq:result:*")
_UNFINISHED_RUNS = "SELECT count(*) FROM flowforge.runs WHERE status IN ('pending', 'running')"
_DISPATCHED_ATTEMPTS = "SELECT count(*) FROM flowforge.step_attempts WHERE status = 'dispatched'"
_STATS = """
SELECT pg_current_wal_lsn() AS lsn,
       pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xid
"""


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("flowforge-orchestrator")
    return (
        [str(script)] if script.exists() else [sys.executable, "-m", "flowforge_orchestrator.cli"]
    )


def _database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


async def _all(*starts: Coroutine[Any, Any, Proc]) -> list[Proc]:
    """Start processes together; if one fails, stop the others before raising."""
    done = await asyncio.gather(*starts, return_exceptions=True)
    failure = next((d for d in done if isinstance(d, BaseException)), None)
    if failure is not None:
        await asyncio.gather(*(d.stop() for d in done if isinstance(d, Proc)))
        raise failure
    return [d for d in done if isinstance(d, Proc)]


class Cluster:
    """Servers, the bench database and the processes; `async with` starts and stops it all."""

    def __init__(
        self,
        *,
        poll_delay: float,
        max_jobs: int,
        logs: Path,
        definitions: list[dict[str, Any]],
        database_url: str | None = None,
        redis_url: str | None = None,
    ) -> None:
        """`database_url`: an admin DSN that may create databases; None: a private server."""
        self.poll_delay = poll_delay
        self.max_jobs = max_jobs
        self.logs = logs
        self.definitions = definitions
        self.definition_errors: dict[str, str] = {}
        self.servers: dict[str, str] = {}
        self._admin_url = database_url
        self.redis_url = redis_url or ""
        self.db_url = ""
        self._stack = contextlib.AsyncExitStack()
        self._generation = 0
        self.orchestrator: Proc | None = None
        self.worker: Proc | None = None
        self.raw_worker: Proc | None = None
        self.job_key = secrets.token_urlsafe(32)  # signs the jobs of this cluster

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    async def _start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        await self._servers()
        name = f"flowforge_bench_{uuid4().hex[:8]}"
        assert self._admin_url
        await self._admin(f"CREATE DATABASE {name}")
        self._stack.push_async_callback(self._admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.db_url = _database(self._admin_url, name)
        await store.apply_migrations(self.db_url)
        self.conn = await store.connect(self.db_url)
        self._stack.push_async_callback(self.conn.close)
        await self.conn.execute("SET lock_timeout = '30s'")
        await self._register()
        self.redis = Redis.from_url(self.redis_url, decode_responses=True)
        self._stack.push_async_callback(self.redis.aclose)
        self._stack.push_async_callback(self._stop_processes)
        self.orchestrator, self.worker, self.raw_worker = await _all(
            self._start_orchestrator(), self._start_worker(), self._start_raw_worker()
        )
        raw_worker = self.raw_worker
        self.raw = await RawArq.connect(self.redis_url, self.poll_delay, alive=raw_worker.check)
        self._stack.push_async_callback(self.raw.close)

    async def _servers(self) -> None:
        if self._admin_url is None:
            postgres = LocalPostgres(durable=True)
            self._stack.callback(postgres.stop)
            await asyncio.to_thread(postgres.start)
            self._admin_url = postgres.url
            self.servers["postgres"] = f"{postgres.source}, durable (private)"
        if not self.redis_url:
            redis = LocalRedis(durable=True)
            self._stack.callback(redis.stop)
            await asyncio.to_thread(redis.start)
            self.redis_url = redis.url
            self.servers["redis"] = f"{redis.source}, appendonly everysec (private)"

    async def _admin(self, statement: str) -> None:
        assert self._admin_url
        conn = await store.connect(self._admin_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    async def _register(self) -> None:
        for spec in self.definitions:
            try:
                definition = parse_definition(spec, known_types={STEP_TYPE})
            except DefinitionError as exc:  # reported by the workloads that need it
                self.definition_errors[spec["name"]] = str(exc)
                continue
            await store.register_definition(self.conn, definition)

    # -- processes ---------------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWFORGE_", "OTEL_"))}
        path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        env.update(
            PYTHONPATH=os.pathsep.join(path),
            FLOWFORGE_DATABASE_URL=self.db_url,
            FLOWFORGE_REDIS_URL=self.redis_url,
            FLOWFORGE_HTTP_PORT="0",
            FLOWFORGE_WORKER_POLL_DELAY=repr(self.poll_delay),
            FLOWFORGE_WORKER_MAX_JOBS=str(self.max_jobs),
            FLOWFORGE_JOB_KEY=self.job_key,
            **BIG_FAN_OUTS,
        )
        env.update(extra)
        return env

    def cli(self) -> list[str]:
        """The command that starts `flowforge-orchestrator` (the soak wraps it)."""
        return _cli()

    def check(self) -> None:
        """Raise WorkloadFailed if one of the processes died."""
        for proc in (self.orchestrator, self.worker, self.raw_worker):
            if proc is not None:
                proc.check()

    async def _start_orchestrator(self, **env: str) -> Proc:
        """`env`: settings of this orchestrator only (FLOWFORGE_HIBERNATE_AFTER=...)."""
        self._generation += 1
        node = f"bench-orchestrator-{self._generation}"
        line = f"orchestrator {node} running"
        return await start(
            "orchestrator",
            [*self.cli(), "run"],
            env=self.env(FLOWFORGE_NODE_ID=node, **env),
            cwd=REPO,
            log=self.logs / "orchestrator.log",
            ready=lambda proc: line in proc.output(),
        )

    async def _health_key_ready(self, key: str) -> bool:
        return bool(await self.redis.exists(key))

    async def _start_worker(self) -> Proc:
        key = queue_name(STEP_TYPE) + _HEALTH
        await self.redis.delete(key)
        return await start(
            "worker",
            [*self.cli(), "worker", "--types-module", STEP_MODULE],
            env=self.env(FLOWFORGE_NODE_ID="bench-worker"),
            cwd=REPO,
            log=self.logs / "worker.log",
            ready=lambda _: self._health_key_ready(key),
        )

    async def _start_raw_worker(self) -> Proc:
        key = RAW_QUEUE + _HEALTH
        await self.redis.delete(key)
        command = [sys.executable, "-m", "tests.bench.baseline", "--redis-url", self.redis_url]
        command += ["--poll-delay", repr(self.poll_delay), "--max-jobs", str(self.max_jobs)]
        return await start(
            "raw arq worker",
            command,
            env=self.env(),
            cwd=REPO,
            log=self.logs / "raw-worker.log",
            ready=lambda _: self._health_key_ready(key),
        )

    async def _stop_processes(self) -> None:
        procs = [p for p in (self.orchestrator, self.worker, self.raw_worker) if p is not None]
        await asyncio.gather(*(p.stop() for p in procs))

    async def restart_orchestrator(self, **env: str) -> Proc:
        """A fresh orchestrator process (it releases its runs' leases as it stops), with
        `env` as settings of its own."""
        if self.orchestrator is not None:
            await self.orchestrator.stop()
        self.orchestrator = None
        self.orchestrator = await self._start_orchestrator(**env)
        return self.orchestrator

    # -- state -------------------------------------------------------------------------------

    async def truncate(self) -> None:
        """Empty the run tables (definitions and step types stay)."""
        await self.conn.execute(f"TRUNCATE {_RUN_TABLES}")

    async def _count(self, sql: str) -> int:
        return int(await self.conn.fetchval(sql))

    async def reset(self) -> None:
        """Empty the run tables for the next repeat.

        Runs left unfinished (parked on purpose, or a failed repeat) belong to the running
        orchestrator, so it is replaced; attempts still out on the queue would write results
        into the next repeat, so then the worker is replaced too and the queues emptied.
        """
        if not await self._count(_UNFINISHED_RUNS):
            await self.truncate()
            return
        in_flight = await self._count(_DISPATCHED_ATTEMPTS)
        stopping = [self.orchestrator, self.worker if in_flight else None]
        await asyncio.gather(*(p.stop() for p in stopping if p is not None))
        self.orchestrator = None
        if in_flight:
            self.worker = None
            for pattern in _ENGINE_KEYS:
                keys = [key async for key in self.redis.scan_iter(match=pattern, count=1000)]
                if keys:
                    await self.redis.delete(*keys)
        await self.truncate()
        if in_flight:
            self.orchestrator, self.worker = await _all(
                self._start_orchestrator(), self._start_worker()
            )
        else:
            self.orchestrator = await self._start_orchestrator()

    async def clear_raw_queue(self) -> None:
        """Drop the baseline's leftover jobs after one of its measurements failed."""
        await self.redis.delete(RAW_QUEUE)

    async def checkpoint(self) -> None:
        """Start from a checkpoint, so every repeat pays the same full-page images."""
        with contextlib.suppress(Exception):  # CHECKPOINT needs privileges a DSN may lack
            await self.conn.execute("CHECKPOINT")

    poll_interval: float = Settings.model_fields["poll_interval"].default  # the orchestrator's

    async def transactions(self) -> int:
        """Transactions the database has served (commits and rollbacks, every session); the
        statistics lag up to a second, so measure over longer than that."""
        value = await self.conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database"
            " WHERE datname = current_database()"
        )
        return int(value)

    async def db_stats(self) -> dict[str, int]:
        """Cluster-wide counters: the WAL position (asyncpg reads a pg_lsn as the byte
        offset it is) and the next transaction id."""
        row = await self.conn.fetchrow(_STATS)
        return {"lsn": int(row["lsn"]), "xid": int(row["xid"])}

    async def describe(self) -> dict[str, Any]:
        """The servers and their durability settings, for the report."""
        settings = await self.conn.fetch(
            "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])",
            ["fsync", "synchronous_commit", "full_page_writes", "wal_level", "shared_buffers"],
        )
        info = await self.redis.info("server")
        try:
            persistence = await self.redis.config_get("append*")
        except RedisError:  # a managed Redis may refuse CONFIG
            persistence = {}
        return {
            "postgres": await self.conn.fetchval("SELECT version()"),
            "postgres_settings": {r["name"]: r["setting"] for r in settings},
            "postgres_source": self.servers.get("postgres", "given by --database-url"),
            "redis": f"{info.get('redis_version')} ({info.get('server_name', 'redis')})",
            "redis_settings": {k: str(v) for k, v in persistence.items()},
            "redis_source": self.servers.get("redis", "given by --redis-url"),
        }
