"""A worker whose Redis is gone for good says so and exits 3: a real worker process, a real
Redis stopped (tests/integration/test_worker_redis_outages.py: shorter outages are ridden
out)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.local_services import LocalRedis
from tests.e2e.test_processes import STEP_MODULE, Cluster
from tests.helpers import wait_for

GIVE_UP = 3.0
LATE = "name: late\nversion: 1\nsteps:\n  - {id: a, type: echo, with: {n: 1}}\n"


@pytest.fixture
def own_redis() -> Iterator[LocalRedis]:
    server = LocalRedis(durable=False).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def cluster(db_url: str, own_redis: LocalRedis, tmp_path: Path) -> AsyncIterator[Cluster]:
    conn = await store.connect(db_url)
    processes = Cluster(db_url, own_redis.url, tmp_path, conn)
    try:
        yield processes
    finally:
        try:
            processes.stop_all()
        finally:
            await conn.close()


async def test_a_worker_whose_redis_is_gone_says_so_and_exits_3(
    cluster: Cluster, own_redis: LocalRedis
) -> None:
    worker = await cluster.start(
        "worker-w",
        ["worker", "--types-module", STEP_MODULE],
        "worker w serving step types",
        FLOWFORGE_NODE_ID="w",
        FLOWFORGE_WORKER_REDIS_GIVE_UP=f"{GIVE_UP:g}",
    )
    worker.expect_exit, worker.expected_code = True, 3

    own_redis.stop()
    stopped = time.monotonic()
    await wait_for(lambda: worker.popen.poll() is not None, timeout=30, message="no exit")
    took = time.monotonic() - stopped

    out = worker.output()
    assert worker.popen.returncode == 3, out
    assert GIVE_UP <= took < GIVE_UP + 15, (took, out)
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out
    assert errors[0].startswith("error: Redis not reached for "), errors
    assert f"the worker gives up (FLOWFORGE_WORKER_REDIS_GIVE_UP={GIVE_UP:g})" in errors[0]
