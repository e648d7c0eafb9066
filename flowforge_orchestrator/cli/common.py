"""What every command shares: settings, the database connection, argument types."""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets as random_secrets
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias
from uuid import UUID

from pydantic import SecretStr, ValidationError

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.durations import ACCEPTED_FORMS, parse_duration
from flowforge_orchestrator.errors import ConfigError

__all__ = [
    "JOB_KEY_FILE",
    "SECRET_PREFIX",
    "Command",
    "Subcommands",
    "add_command",
    "connection",
    "load_settings",
    "need_db",
    "point_in_time",
    "run_id_arg",
    "secrets",
    "with_job_key",
]

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What `add_subparsers` returns: where the modules of this package add their commands."""

SECRET_PREFIX = "FLOWFORGE_SECRET_"
JOB_KEY_FILE = "job.key"


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


def with_job_key(settings: Settings, *, create: bool) -> Settings:
    """`settings` with a job key: FLOWFORGE_JOB_KEY if set, else `<data_dir>/job.key` if it
    exists, else (`create`: this process starts private servers) a new random key written
    there, readable by its owner only. Without any, the settings are returned as they are,
    and the orchestrator or worker refuses to start, naming FLOWFORGE_JOB_KEY."""
    if settings.job_key is not None:
        return settings
    path = settings.data_dir / JOB_KEY_FILE
    key = _read_key(path)
    if key is None and create:
        key = _create_key(path)
    if key is None:
        return settings
    return settings.model_copy(update={"job_key": SecretStr(key)})


def _read_key(path: Path) -> str | None:
    try:
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the job key in {path}: {exc}") from exc
    if not key:
        raise ConfigError(f"{path} is empty: delete it, or set FLOWFORGE_JOB_KEY")
    return key


def _create_key(path: Path) -> str:
    """A new key in a file created with mode 0600; if another process just created it,
    theirs."""
    key = random_secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        found = _read_key(path)
        assert found is not None
        return found
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(key + "\n")
    return key


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
    parent: Subcommands, name: str, fn: Command, help: str, **defaults: object
) -> argparse.ArgumentParser:
    """A subcommand that runs `fn(settings, args)`."""
    parser = parent.add_parser(name, help=help, description=help)
    parser.set_defaults(fn=fn, **defaults)
    return parser
