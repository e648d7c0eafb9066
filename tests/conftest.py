"""Shared fixtures: one real PostgreSQL and Redis per session, a fresh database per test.

The servers are private ones started by `flowforge_orchestrator.local_services` (fsync off,
temporary data), unless FLOWFORGE_TEST_DATABASE_URL / FLOWFORGE_TEST_REDIS_URL name existing
ones (an admin DSN that may create databases, and a Redis that may be flushed).

Isolation as procrastinate does it: migrations are applied once to `flowforge_template`, each
test gets `CREATE DATABASE test_<hex> TEMPLATE flowforge_template` (dropped afterwards), and
Redis is flushed before each test.

Under pytest-xdist (`-n 2`, as `just test` runs) each worker is a session of its own: its own
private servers on free ports in their own temporary directories. With servers from the
environment, the workers share them: each has its own template (`flowforge_template_gw1`)
and its own Redis database (the worker's number), flushed alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis
from hypothesis import settings as hypothesis_settings
from pydantic import SecretStr

from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.local_services import LocalPostgres, LocalRedis

# Property tests check behaviour, not speed: no per-example deadline (hypothesis's default
# 200 ms failed a CPU-bound example on a machine loaded by other work), and no example
# database (every run explores the same derandomized or seeded examples).
hypothesis_settings.register_profile("flowforge", deadline=None, database=None)
hypothesis_settings.load_profile("flowforge")

# pytest-xdist names its workers gw0, gw1, ...; unset when the session runs alone.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
TEMPLATE_DB = f"flowforge_template_{XDIST_WORKER}" if XDIST_WORKER else "flowforge_template"
# Signs the jobs of every engine a test starts, in process or as processes.
TEST_JOB_KEY = "test-job-key-0123456789abcdef"

T = TypeVar("T")


@dataclass(frozen=True)
class Services:
    """The session's servers. `postgres`/`redis` are None when given by the environment."""

    database_url: str  # admin DSN: database "postgres", may CREATE/DROP DATABASE
    redis_url: str
    postgres: LocalPostgres | None
    redis: LocalRedis | None


def database_dsn(dsn: str, name: str) -> str:
    """`dsn` with its database replaced by `name`."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from a sync fixture, on its own loop in a thread.

    A thread keeps it away from the event loop pytest-asyncio may have set for the test.
    """
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _admin(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    """One PostgreSQL and one Redis for the whole session, stopped at its end."""
    with contextlib.ExitStack() as stack:
        postgres = redis_server = None
        database_url = os.environ.get("FLOWFORGE_TEST_DATABASE_URL")
        if not database_url:
            postgres = LocalPostgres(durable=False)
            stack.callback(postgres.stop)
            database_url = postgres.start().url
        redis_url = os.environ.get("FLOWFORGE_TEST_REDIS_URL")
        if redis_url and XDIST_WORKER:
            redis_url = _redis_database(redis_url, int(XDIST_WORKER.removeprefix("gw")))
        if not redis_url:
            redis_server = LocalRedis(durable=False)
            stack.callback(redis_server.stop)
            redis_url = redis_server.start().url
        yield Services(database_url, redis_url, postgres, redis_server)


def _redis_database(url: str, number: int) -> str:
    """`url` with its database replaced by `number` (one per xdist worker on a shared Redis)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{number}"))


async def _create_template(admin_url: str) -> None:
    from flowforge_orchestrator.store.migrations import apply_migrations

    await _admin(
        admin_url,
        f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)",
        f"CREATE DATABASE {TEMPLATE_DB}",
    )
    await apply_migrations(database_dsn(admin_url, TEMPLATE_DB))
    # Nobody may connect to it any more: a connection would make CREATE ... TEMPLATE fail.
    await _admin(admin_url, f"ALTER DATABASE {TEMPLATE_DB} ALLOW_CONNECTIONS false")


@pytest.fixture(scope="session")
def template_db(services: Services) -> Iterator[str]:
    """Database `flowforge_template`, migrated once per session; yields its DSN."""
    run_sync(_create_template(services.database_url))
    yield database_dsn(services.database_url, TEMPLATE_DB)
    run_sync(_admin(services.database_url, f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)"))


@pytest.fixture
def db_url(services: Services, template_db: str) -> Iterator[str]:
    """DSN of a fresh, migrated database of this test's own, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex}"
    run_sync(_admin(services.database_url, f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}"))
    yield database_dsn(services.database_url, name)
    run_sync(_admin(services.database_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def redis_url(services: Services) -> str:
    """The session's Redis, flushed for this test (only its database: another worker may
    share the server)."""
    with redis.Redis.from_url(services.redis_url) as client:
        client.flushdb()
    return services.redis_url


@pytest.fixture
def settings(db_url: str, redis_url: str, tmp_path: Path) -> Settings:
    """Settings for this test's database and Redis, with short intervals."""
    return Settings(
        database_url=db_url,
        redis_url=redis_url,
        data_dir=tmp_path / "flowforge",
        poll_interval=0.5,
        lease_seconds=5,
        worker_poll_delay=0.01,
        http_port=0,  # no health server unless a test asks for one (on a free port)
        http_allow="127.0.0.0/8,::1",  # http steps call servers of the test on loopback
        job_key=SecretStr(TEST_JOB_KEY),
    )
