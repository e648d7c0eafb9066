"""Replicas: the failover of a SIGKILLed orchestrator, and 2 orchestrators + 2 workers
against 1 + 1 on the same servers.

`failover`: `runs` runs parked on the cluster's orchestrator (A); a second orchestrator (B)
is started and judges liveness; A is SIGKILLed. Each run's time is from the kill to the
moment the harness first sees it committed under B (polled every 10 ms, so up to 10 ms
late: an upper bound), and, for comparison, to B's claim transaction's start
(`runs.updated_at`, PostgreSQL's clock, the same machine's).

`replicas`: the throughput workload (runs of 5 no-op steps enqueued in one transaction) with
`count` orchestrators and `count` workers: steps/s, and the CPU time per step of each
process (user + system, from /proc), so that scaling can be judged per core.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from flowforge_orchestrator import store
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.queue.dispatch import queue_name
from tests.bench.cluster import REPO, STEP_MODULE, STEP_TYPE, Cluster
from tests.bench.processes import Proc, WorkloadFailed, start, until
from tests.bench.report import percentile
from tests.bench.workloads import (
    CHAIN_5,
    IN_MEMORY,
    _enqueue_all,
    _expect,
    _last_finish,
    _wait_ended,
)

__all__ = ["FAILOVER", "failover", "replicas"]

FAILOVER = "bench-failover"  # a no-op step, then parked on a delay: in flight on its owner
_SPEC: dict[str, Any] = {
    "name": FAILOVER,
    "version": 1,
    "steps": [
        {"id": "s1", "type": STEP_TYPE},
        {"id": "park", "type": "delay", "duration": "10m", "depends_on": ["s1"]},
    ],
}
_POLL = 0.01


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("flowforge-orchestrator")
    return (
        [str(script)] if script.exists() else [sys.executable, "-m", "flowforge_orchestrator.cli"]
    )


async def _orchestrator(cluster: Cluster, node: str, *, watching: bool = False, **env: str) -> Proc:
    """Another orchestrator; `watching`: ready once it judges the others' liveness."""
    line = (
        f"orchestrator {node} watching other orchestrators' liveness"
        if watching
        else f"orchestrator {node} running"
    )
    return await start(
        node,
        [*_cli(), "run"],
        env=cluster.env(FLOWFORGE_NODE_ID=node, **env),
        cwd=REPO,
        log=cluster.logs / f"{node}.log",
        ready=lambda proc: line in proc.output(),
    )


async def _worker(cluster: Cluster, node: str) -> Proc:
    """Another worker; ready once its log says it serves."""
    return await start(
        node,
        [*_cli(), "worker", "--types-module", STEP_MODULE],
        env=cluster.env(FLOWFORGE_NODE_ID=node),
        cwd=REPO,
        log=cluster.logs / f"{node}.log",
        ready=lambda proc: f"worker {node} serving" in proc.output(),
    )


async def _register(cluster: Cluster) -> None:
    await store.register_definition(cluster.conn, parse_definition(_SPEC, known_types={STEP_TYPE}))


async def _count(cluster: Cluster, sql: str, *args: Any) -> int:
    return int(await cluster.conn.fetchval(sql, *args))


async def failover(cluster: Cluster, runs: int, timeout: float) -> dict[str, Any]:
    """Kill the owner of `runs` running runs; how long until a running replica commits
    each of them (see the module docstring)."""
    await _register(cluster)
    # The runs stay in their owner's memory (no hibernation): a hibernated run has no owner,
    # so nothing of it fails over; what is measured is the in-flight runs of a dead process.
    a = await cluster.restart_orchestrator(**IN_MEMORY)
    await _enqueue_all(cluster, FAILOVER, [{"n": i} for i in range(runs)])
    parked = (
        "SELECT count(*) FROM flowforge.outbox WHERE type = 'step.started' AND step_id = 'park'"
    )

    async def all_parked() -> bool:
        return await _count(cluster, parked) >= runs

    await until(all_parked, timeout, f"{runs} runs not parked", alive=cluster.check)
    generation = int(time.time() * 1000) % 1_000_000
    node_b = f"bench-failover-b-{generation}"
    b = await _orchestrator(cluster, node_b, watching=True, **IN_MEMORY)
    try:
        return await _kill_and_watch(cluster, a, b, runs, timeout)
    finally:
        await cluster.truncate()  # B drops what it holds at its next commit or renewal
        await b.stop()
        await cluster.restart_orchestrator()  # A is dead: a fresh one for the next workload


async def _kill_and_watch(
    cluster: Cluster, a: Proc, b: Proc, runs: int, timeout: float
) -> dict[str, Any]:
    node_b = b.name
    owned_by_a = await _count(
        cluster,
        "SELECT count(*) FROM flowforge.runs WHERE status = 'running' AND owner <> $1",
        node_b,
    )
    if owned_by_a != runs:
        raise WorkloadFailed(f"{owned_by_a} of {runs} runs were on the killed orchestrator")
    seen: dict[Any, float] = {}
    stamped: dict[Any, float] = {}
    killed = time.time()
    os.kill(a.pid, signal.SIGKILL)
    await asyncio.to_thread(a.popen.wait)
    deadline = time.monotonic() + timeout
    while len(seen) < runs:
        if time.monotonic() > deadline:
            raise WorkloadFailed(f"{len(seen)} of {runs} runs adopted after {timeout:g} s")
        b.check()
        rows = await cluster.conn.fetch(
            "SELECT id, extract(epoch FROM updated_at)::float8 AS at FROM flowforge.runs"
            " WHERE owner = $1",
            node_b,
        )
        now = time.time()
        for row in rows:
            if row["id"] not in seen:
                seen[row["id"]] = now - killed
                stamped[row["id"]] = row["at"] - killed
        await asyncio.sleep(_POLL)
    observed = sorted(seen.values())
    return {
        "runs": runs,
        "kill_to_commit_s": observed,
        "kill_to_claim_start_s": sorted(stamped.values()),
        "p50_s": percentile(observed, 50),
        "max_s": max(observed),
        "claim_start_p50_s": percentile(list(stamped.values()), 50),
    }


async def replicas(cluster: Cluster, runs: int, timeout: float, count: int) -> dict[str, Any]:
    """The throughput workload with `count` orchestrators and `count` workers."""
    assert cluster.orchestrator is not None and cluster.worker is not None
    await cluster.truncate()
    extra: list[Proc] = []
    try:
        for i in range(1, count):
            extra.append(await _orchestrator(cluster, f"bench-replica-{i}"))
            extra.append(await _worker(cluster, f"bench-worker-{i}"))
        procs = [cluster.orchestrator, cluster.worker, *extra]
        result = await _measure(cluster, procs, runs, timeout)
    finally:
        await asyncio.gather(*(p.stop() for p in extra))
        await cluster.redis.delete(queue_name(STEP_TYPE))  # nothing may be left for the next
        await cluster.truncate()
    return result


async def _measure(
    cluster: Cluster, procs: list[Proc], runs: int, timeout: float
) -> dict[str, Any]:
    def check() -> None:
        for proc in procs:
            proc.check()

    await cluster.checkpoint()
    cpu = {proc.name: proc.cpu_s() for proc in procs}
    committed = await _enqueue_all(cluster, CHAIN_5, [{"n": i} for i in range(runs)])
    check()
    await _wait_ended(cluster, runs, timeout)
    cpu = {proc.name: proc.cpu_s() - cpu[proc.name] for proc in procs}
    check()
    await _expect(cluster, "completed")
    wall = await _last_finish(cluster) - committed
    steps = runs * 5
    per_step = {name: seconds * 1000 / steps for name, seconds in cpu.items()}
    kinds = {proc.name: "worker" if "worker" in proc.name else "orchestrator" for proc in procs}
    owners = dict(
        await cluster.conn.fetch("SELECT owner, count(*) FROM flowforge.runs GROUP BY owner")
    )
    return {
        "processes": len(procs),
        "runs": runs,
        "steps": steps,
        "wall_s": wall,
        "steps_per_s": steps / wall,
        "cpu_ms_per_step": per_step,
        "orchestrators_cpu_ms_per_step": sum(
            v for k, v in per_step.items() if kinds[k] == "orchestrator"
        ),
        "workers_cpu_ms_per_step": sum(v for k, v in per_step.items() if kinds[k] == "worker"),
        "runs_per_orchestrator": {str(k): int(v) for k, v in owners.items()},
    }
