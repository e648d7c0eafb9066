"""What every command shares: settings, the database connection, argument types."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from pydantic import ValidationError

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.durations import ACCEPTED_FORMS, parse_duration
from flowforge_orchestrator.errors import ConfigError

__all__ = [
    "SECRET_PREFIX",
    "Command",
    "add_command",
    "connection",
    "load_settings",
    "need_db",
    "point_in_time",
    "run_id_arg",
    "secrets",
]

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]

SECRET_PREFIX = "FLOWFORGE_SECRET_"


def load_settings() -> Settings:
    """The settings from `FLOWFORGE_*` variables; a bad value is named in the error."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"FLOWFORGE_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None


def secrets() -> dict[str, str]:
    """`${{ secrets.NAME }}` reads `FLOWFORGE_SECRET_NAME`, and nothing else of the
    environment, so a definition cannot read the worker's database password."""
    return {
        k.removeprefix(SECRET_PREFIX): v
        for k, v in os.environ.items()
        if k.startswith(SECRET_PREFIX)
    }


def need_db(settings: Settings) -> str:
    if not settings.database_url:
        raise ConfigError("set FLOWFORGE_DATABASE_URL (a PostgreSQL DSN)")
    return settings.database_url


@contextlib.asynccontextmanager
async def connection(settings: Settings) -> AsyncIterator[store.Connection]:
    conn = await store.connect(need_db(settings))
    try:
        yield conn
    finally:
        await conn.close()


def run_id_arg(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def point_in_time(text: str, now: datetime) -> datetime:
    """`1h` (that long before `now`) or an ISO 8601 time (local time when it has no zone)."""
    try:
        return now - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration ({ACCEPTED_FORMS}) nor an ISO 8601 time "
            "like 2024-05-01T12:00 or 2024-05-01T12:00+02:00"
        ) from None
    return moment if moment.tzinfo else moment.astimezone()


def add_command(
    parent: Any, name: str, fn: Command, help: str, **defaults: Any
) -> argparse.ArgumentParser:
    """A subcommand that runs `fn(settings, args)`."""
    parser: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
    parser.set_defaults(fn=fn, **defaults)
    return parser
