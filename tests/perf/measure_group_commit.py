"""Write transactions and WAL bytes per step for N demo-order runs on a durable PostgreSQL.

    .venv/bin/python -m tests.perf.measure_group_commit 200

Not a test and not the benchmark harness (`just bench` will be): a quick reading of what the
group commit saves. Write transactions are counted by the transaction ids assigned
(`pg_current_snapshot()` xmax), WAL by `pg_current_wal_lsn()` deltas. Each demo run has four
steps: three http steps on workers and one inline transform.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.definitions import parse_definition
from flowforge_orchestrator.demo import DemoShop, example_definition
from flowforge_orchestrator.enqueue import enqueue
from flowforge_orchestrator.local_services import LocalPostgres, LocalRedis
from flowforge_orchestrator.orchestrator import run_orchestrator
from flowforge_orchestrator.worker import load_step_types, run_worker

_STATS = """
SELECT xact_commit, pg_current_wal_lsn() AS lsn,
       pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xid
FROM pg_stat_database WHERE datname = current_database()
"""


async def _stats(conn: store.Connection) -> Any:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return await conn.fetchrow(_STATS)


async def measure(settings: Settings, runs: int) -> None:
    assert settings.database_url
    await store.apply_migrations(settings.database_url)
    definition = parse_definition(example_definition())
    stop, ready_o, ready_w = asyncio.Event(), asyncio.Event(), asyncio.Event()
    with DemoShop() as shop:
        tasks = [
            asyncio.create_task(run_orchestrator(settings, stop, ready=ready_o)),
            asyncio.create_task(
                run_worker(settings, load_step_types([]), stop=stop, ready=ready_w)
            ),
        ]
        await ready_o.wait()
        await ready_w.wait()
        conn = await store.connect(settings.database_url)
        try:
            await store.register_definition(conn, definition)
            before = await _stats(conn)
            started = time.perf_counter()
            async with conn.transaction():
                for i in range(runs):
                    await enqueue(
                        conn, definition.name, {"order_id": f"o{i}", "base_url": shop.base_url}
                    )
            unfinished = (
                "SELECT count(*) FROM flowforge.runs WHERE status IN ('pending', 'running')"
            )
            while await conn.fetchval(unfinished):
                await asyncio.sleep(0.05)
            wall = time.perf_counter() - started
            after = await _stats(conn)
            wal = await conn.fetchval("SELECT pg_wal_lsn_diff($1, $2)", after["lsn"], before["lsn"])
            failed = await conn.fetchval(
                "SELECT count(*) FROM flowforge.runs WHERE status <> 'completed'"
            )
        finally:
            await conn.close()
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
    steps = runs * 4
    writes = after["xid"] - before["xid"] - 1  # less the stats query's own snapshot
    commits = after["xact_commit"] - before["xact_commit"]
    print(
        f"runs {runs} (not completed: {failed}), steps {steps}, {wall:.2f} s, "
        f"{steps / wall:.0f} steps/s"
    )
    print(f"write transactions {writes} ({writes / steps:.2f} per step, workers' results included)")
    print(f"all commits {commits} ({commits / steps:.2f} per step, reads included)")
    print(f"WAL {wal / steps:.0f} bytes per step")


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    postgres = LocalPostgres(durable=True).start()
    redis = LocalRedis(durable=False).start()
    try:
        settings = Settings(database_url=postgres.url, redis_url=redis.url, worker_poll_delay=0.01)
        asyncio.run(measure(settings, runs))
    finally:
        postgres.stop()
        redis.stop()


if __name__ == "__main__":
    main()
