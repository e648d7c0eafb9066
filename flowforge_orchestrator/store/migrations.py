"""Apply the numbered SQL migrations in `sql/`, each in its own transaction.

Two replicas starting at once are safe: the whole run holds a session advisory lock, and each
applied file is recorded with its checksum, so an edited migration is refused, not re-run.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

from flowforge_orchestrator.errors import MigrationError

__all__ = ["Migration", "apply_migrations", "load_migrations", "pending_migrations", "pending_on"]

_LOCK_KEY = 0x466C6F77  # "Flow": one advisory lock id for the migration runner
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def _sql_dir() -> Path:
    # Installed wheel: sql/ is force-included inside the package. Source checkout (editable
    # install, tests): the top-level sql/ beside the package.
    packaged = Path(str(resources.files("flowforge_orchestrator"))) / "sql"
    if packaged.is_dir():
        return packaged
    source = Path(__file__).resolve().parents[2] / "sql"
    if source.is_dir():
        return source
    raise MigrationError(f"no sql/ directory found (looked in {packaged} and {source})")


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """Every `NNNN_name.sql` file in order; a gap or a duplicate number is an error."""
    directory = directory or _sql_dir()
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            continue
        found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise MigrationError(
                f"{directory}: migration {expected:04d} is missing or duplicated "
                f"(found {migration.version:04d}_{migration.name}.sql)"
            )
    return found


_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS flowforge;
CREATE TABLE IF NOT EXISTS flowforge.schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


async def _applied(conn: asyncpg.Connection) -> dict[int, str]:
    exists = await conn.fetchval("SELECT to_regclass('flowforge.schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM flowforge.schema_migrations")
    return {row["version"]: row["checksum"] for row in rows}


def _check(applied: dict[int, str], migrations: list[Migration]) -> list[Migration]:
    by_version = {m.version: m for m in migrations}
    for version, checksum in applied.items():
        known = by_version.get(version)
        if known is None:
            raise MigrationError(
                f"the database has migration {version:04d}, which this version of FlowForge "
                "does not know: it is newer than this code"
            )
        if known.checksum != checksum:
            raise MigrationError(
                f"migration {version:04d}_{known.name}.sql was changed after it was applied"
            )
    return [m for m in migrations if m.version not in applied]


async def pending_migrations(dsn: str) -> list[Migration]:
    """Migrations not yet applied, on a connection of its own (start-up checks)."""
    conn = await asyncpg.connect(dsn)
    try:
        return await pending_on(conn)
    finally:
        await conn.close()


async def pending_on(conn: asyncpg.Connection) -> list[Migration]:
    """Migrations not yet applied, on the caller's connection (readiness checks: pooled)."""
    return _check(await _applied(conn), load_migrations())


async def apply_migrations(dsn: str) -> list[str]:
    """Apply what is missing, in order; returns the names applied."""
    migrations = load_migrations()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await conn.execute(_BOOTSTRAP)
            todo = _check(await _applied(conn), migrations)
            done: list[str] = []
            for migration in todo:
                label = f"{migration.version:04d}_{migration.name}"
                try:
                    async with conn.transaction():
                        await conn.execute(migration.sql)
                        await conn.execute(
                            "INSERT INTO flowforge.schema_migrations (version, name, checksum)"
                            " VALUES ($1, $2, $3)",
                            migration.version,
                            migration.name,
                            migration.checksum,
                        )
                except asyncpg.PostgresError as exc:
                    raise MigrationError(f"migration {label}.sql failed: {exc}") from exc
                done.append(label)
            return done
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()
