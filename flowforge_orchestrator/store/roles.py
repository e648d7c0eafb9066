"""Least-privilege database roles: apply `sql/roles.sql` (documented in the script itself).

The script is not a numbered migration because it grants on what the migrations created:
run it after every `migrate`, as a superuser or the schema's owner with CREATEROLE.
"""

from __future__ import annotations

import asyncpg

from flowforge_orchestrator.errors import StoreError

# One place finds sql/ in both a source checkout and an installed wheel.
from flowforge_orchestrator.store.migrations import _sql_dir

__all__ = ["ROLES", "apply_roles", "roles_sql"]

# The group roles the script creates, by what uses them.
ROLES = {
    "orchestrator": "flowforge_orchestrator",
    "worker": "flowforge_worker",
    "api": "flowforge_api",
}


def roles_sql() -> str:
    """The text of `sql/roles.sql`."""
    return (_sql_dir() / "roles.sql").read_text(encoding="utf-8")


async def apply_roles(dsn: str) -> None:
    """Create the group roles and (re)grant them on schema flowforge; idempotent.

    The script carries its own BEGIN/COMMIT (so psql runs it atomically too): it either
    applies whole or changes nothing.
    """
    sql = roles_sql()
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StoreError(f"cannot connect to apply sql/roles.sql: {exc}") from exc
    try:
        await conn.execute(sql)
    except asyncpg.PostgresError as exc:
        raise StoreError(f"sql/roles.sql failed: {exc}") from exc
    finally:
        await conn.close()
