"""sql/0011: the engine secret and the results stored before it, against a real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.store.migrations import Migration, load_migrations
from tests.conftest import Services, _admin, database_dsn
from tests.helpers import verifier

BOOTSTRAP = """
CREATE SCHEMA flowforge;
CREATE TABLE flowforge.schema_migrations (
    version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


@pytest.fixture
async def empty_db(services: Services) -> AsyncIterator[str]:
    name = f"empty_{uuid.uuid4().hex}"
    await _admin(services.database_url, f"CREATE DATABASE {name}")
    yield database_dsn(services.database_url, name)
    await _admin(services.database_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_results_stored_before_the_migration_get_their_tokens(empty_db: str) -> None:
    """An upgrade keeps the results of runs in flight: each gets the token the orchestrator
    derives, so a run adopted or redriven after it still sees its earlier outputs."""
    migrations = load_migrations()
    before = [m for m in migrations if m.version < _version_of(migrations, "verified_results")]
    conn = await asyncpg.connect(empty_db)
    try:
        await conn.execute(BOOTSTRAP)
        for m in before:
            await conn.execute(m.sql)
            await conn.execute(
                "INSERT INTO flowforge.schema_migrations (version, name, checksum)"
                " VALUES ($1, $2, $3)",
                m.version,
                m.name,
                m.checksum,
            )
        old = [uuid.uuid4() for _ in range(3)]
        run_id = uuid.uuid4()
        await conn.execute(
            "INSERT INTO flowforge.step_results (attempt_id, run_id, step_id, outcome, output)"
            " SELECT a, $2, 's', 'succeeded', '{\"old\": true}' FROM unnest($1::uuid[]) AS a",
            old,
            run_id,
        )
    finally:
        await conn.close()

    await store.apply_migrations(empty_db)

    conn = await store.connect(empty_db)
    try:
        check = await verifier(conn)
        restored = await store.fetch_run_results(conn, [run_id], check)
        assert set(restored[run_id]) == set(old)
        assert all(r.output == {"old": True} for r in restored[run_id].values())
        secrets = await conn.fetchval("SELECT count(*) FROM flowforge.engine_secret")
        assert secrets == 1
    finally:
        await conn.close()


async def test_each_database_has_its_own_secret(empty_db: str, db_url: str) -> None:
    await store.apply_migrations(empty_db)
    first, second = await store.connect(empty_db), await store.connect(db_url)
    try:
        mine, theirs = await store.engine_secret(first), await store.engine_secret(second)
        assert len(mine) == 32 and mine != theirs
    finally:
        await first.close()
        await second.close()


def _version_of(migrations: list[Migration], name: str) -> int:
    return next(m.version for m in migrations if m.name == name)
