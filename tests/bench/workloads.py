"""The engine's side of each workload, and the definitions they run.

Every function runs one repeat on a `Cluster` whose run tables are empty, and returns its
measurements; a run that did not end as expected raises `WorkloadFailed` with that run's
error, so a workload the engine cannot run yet is reported, not fatal.

Times come from what PostgreSQL recorded (`runs.finished_at`, `step_results.started_at` and
`finished_at`, `step_attempts.dispatched_at`) compared with the harness's clock at the
enqueue commit: the same machine, the same clock.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from itertools import pairwise
from typing import Any

from flowforge_orchestrator.client import enqueue, send_event
from tests.bench.cluster import STEP_TYPE, Cluster
from tests.bench.processes import WorkloadFailed, until

__all__ = [
    "CHAIN_5",
    "CHAIN_10",
    "CHILD",
    "CHILDREN",
    "DEFINITIONS",
    "FANOUT",
    "PARK",
    "WAIT",
    "WAIT_EVENT",
    "children",
    "events",
    "fanout",
    "hibernated",
    "latency",
    "parked",
    "plain_fanout",
    "scale",
    "throughput",
]

CHAIN_5 = "bench-chain-5"
CHAIN_10 = "bench-chain-10"
FANOUT = "bench-fanout"
PARK = "bench-park"
WAIT = "bench-wait"  # parked on an event that never comes
PARK_HOUR = "bench-park-hour"  # hibernated: a 1-hour delay
PARK_DUE = "bench-park-due"  # hibernated, then due: a delay of DUE_DELAY seconds
DUE_DELAY = 30.0
DUE_AFTER = "10"  # FLOWFORGE_HIBERNATE_AFTER while they are due (claimed 5 s ahead)
# What the workloads measuring runs held in memory (scale, parked) set: no hibernation.
IN_MEMORY = {"FLOWFORGE_HIBERNATE_AFTER": "0"}
WAIT_EVENT = "bench-event"  # two steps, a wait, a step: the event's handoff and a step's
CHILD = "bench-child"  # one no-op step: what each child run of CHILDREN runs
CHILDREN = "bench-children"  # the fan-out of FANOUT, one child run per item
_ENDED = ("completed", "failed", "cancelled")


def _chain(name: str, steps: int) -> dict[str, Any]:
    """`steps` no-op steps, each depending on the one before."""
    chain: list[dict[str, Any]] = []
    for i in range(1, steps + 1):
        step: dict[str, Any] = {"id": f"s{i:02d}", "type": STEP_TYPE}
        if i > 1:
            step["depends_on"] = [f"s{i - 1:02d}"]
        chain.append(step)
    return {"name": name, "version": 1, "steps": chain}


DEFINITIONS: list[dict[str, Any]] = [
    _chain(CHAIN_5, 5),
    _chain(CHAIN_10, 10),
    {
        "name": FANOUT,
        "version": 1,
        "steps": [
            {
                "id": "fan",
                "type": "parallel",
                "for_each": "input.items",
                "step": {"id": "touch", "type": STEP_TYPE, "with": {"item": "${{ item }}"}},
            }
        ],
    },
    {"name": CHILD, "version": 1, "steps": [{"id": "touch", "type": STEP_TYPE}]},
    {
        "name": CHILDREN,
        "version": 1,
        "steps": [
            {
                "id": "fan",
                "type": "parallel",
                "for_each": "input.items",
                "step": {
                    "id": "call",
                    "type": "workflow",
                    "workflow": CHILD,
                    "input": {"item": "${{ item }}"},
                },
            }
        ],
    },
    {"name": PARK, "version": 1, "steps": [{"id": "park", "type": "delay", "duration": "10m"}]},
    {"name": PARK_HOUR, "version": 1, "steps": [{"id": "park", "type": "delay", "duration": "1h"}]},
    {
        "name": PARK_DUE,
        "version": 1,
        "steps": [{"id": "park", "type": "delay", "duration": f"{DUE_DELAY:g}s"}],
    },
    {
        "name": WAIT,
        "version": 1,
        "steps": [{"id": "park", "type": "wait", "event": "never", "key": "string(input.n)"}],
    },
    {
        "name": WAIT_EVENT,
        "version": 1,
        "steps": [
            {"id": "s1", "type": STEP_TYPE},
            {"id": "s2", "type": STEP_TYPE, "depends_on": ["s1"]},
            {"id": "w", "type": "wait", "event": "go", "depends_on": ["s2"]},
            {"id": "s3", "type": STEP_TYPE, "depends_on": ["w"]},
        ],
    },
]


# -- shared ----------------------------------------------------------------------------------


def _require(cluster: Cluster, workflow: str) -> None:
    refused = cluster.definition_errors.get(workflow)
    if refused:
        raise WorkloadFailed(f"definition {workflow} was refused: {refused}")


async def _enqueue_all(cluster: Cluster, workflow: str, inputs: list[Any]) -> float:
    """Enqueue every run in one transaction; the wall-clock time of its commit."""
    async with cluster.conn.transaction():
        for payload in inputs:
            await enqueue(cluster.conn, workflow, payload)
    return time.time()


async def _statuses(cluster: Cluster) -> dict[str, int]:
    rows = await cluster.conn.fetch(
        "SELECT status, count(*) AS n FROM flowforge.runs GROUP BY status ORDER BY status"
    )
    return {row["status"]: int(row["n"]) for row in rows}


async def _wait(cluster: Cluster, sql: str, target: int, timeout: float, what: str) -> None:
    """Until `sql` counts `target`; on timeout, say where the runs stand."""

    async def reached() -> bool:
        return int(await cluster.conn.fetchval(sql)) >= target

    try:
        await until(reached, timeout, what, interval=0.01, alive=cluster.check)
    except WorkloadFailed as exc:
        cluster.check()  # a dead process explains it better than a timeout
        raise WorkloadFailed(f"{exc} (runs by status: {await _statuses(cluster)})") from None


async def _wait_ended(cluster: Cluster, runs: int, timeout: float) -> None:
    sql = "SELECT count(*) FROM flowforge.runs WHERE status IN ('completed', 'failed', 'cancelled')"
    await _wait(cluster, sql, runs, timeout, f"{runs} runs did not end")


def _message(error: Any) -> str:
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return json.dumps(error) if error is not None else "no error recorded"


async def _expect(cluster: Cluster, status: str) -> None:
    """Every run has `status`; otherwise WorkloadFailed with the first other run's error."""
    counts = await _statuses(cluster)
    others = {s: n for s, n in counts.items() if s != status}
    if not others:
        return
    row = await cluster.conn.fetchrow(
        "SELECT id, status, error FROM flowforge.runs WHERE status <> $1 "
        "ORDER BY finished_at NULLS LAST, created_at LIMIT 1",
        status,
    )
    ended = ", ".join(f"{n} {s}" for s, n in others.items())
    raise WorkloadFailed(
        f"{ended} of {sum(counts.values())} runs (expected all {status}); "
        f"run {row['id']} is {row['status']}: {_message(row['error'])}"
    )


async def _last_finish(cluster: Cluster) -> float:
    value = await cluster.conn.fetchval(
        "SELECT extract(epoch FROM max(finished_at))::float8 FROM flowforge.runs"
    )
    return float(value)


# -- workloads -------------------------------------------------------------------------------


async def throughput(cluster: Cluster, runs: int, timeout: float) -> dict[str, Any]:
    """Workload 1 (and 5): `runs` runs of 5 no-op steps enqueued in one transaction.

    Database cost, cluster-wide from a CHECKPOINT: transaction ids assigned (= write
    transactions; the enqueue's own is left out, it is the caller's) and WAL bytes.
    """
    _require(cluster, CHAIN_5)
    assert cluster.orchestrator is not None and cluster.worker is not None
    procs = {"orchestrator": cluster.orchestrator, "worker": cluster.worker}
    await cluster.checkpoint()
    before = await cluster.db_stats()
    cpu = {name: proc.cpu_s() for name, proc in procs.items()}
    committed = await _enqueue_all(cluster, CHAIN_5, [{"n": i} for i in range(runs)])
    await _wait_ended(cluster, runs, timeout)
    after = await cluster.db_stats()
    cpu = {name: proc.cpu_s() - cpu[name] for name, proc in procs.items()}
    await _expect(cluster, "completed")
    wall = await _last_finish(cluster) - committed
    steps = runs * 5
    writes = after["xid"] - before["xid"] - 1
    wal = after["lsn"] - before["lsn"]
    return {
        "runs": runs,
        "steps": steps,
        "wall_s": wall,
        "steps_per_s": steps / wall,
        "write_transactions": writes,
        "write_transactions_per_step": writes / steps,
        "wal_bytes": wal,
        "wal_bytes_per_step": wal / steps,
        "wal_lsn_range": [before["lsn"], after["lsn"]],  # for pg_walinspect
        "cpu_ms_per_step": {name: seconds * 1000 / steps for name, seconds in cpu.items()},
    }


async def latency(cluster: Cluster, runs: int, timeout: float) -> dict[str, Any]:
    """Workload 2: `runs` runs of 10 no-op steps, one after the other on an idle engine.

    A handoff is step N's result (`step_results.finished_at`, stamped by the worker just
    before its insert commits) to step N+1's start (`step_results.started_at`, when the
    worker began it). It splits at `step_attempts.dispatched_at` (the orchestrator's clock
    when its graph dispatched step N+1, before that commit and the arq enqueue).
    """
    _require(cluster, CHAIN_10)
    deadline = time.monotonic() + timeout
    for i in range(runs):
        run = await enqueue(cluster.conn, CHAIN_10, {"n": i})

        async def ended(run_id: Any = run.id) -> bool:
            status = await cluster.conn.fetchval(
                "SELECT status FROM flowforge.runs WHERE id = $1", run_id
            )
            return status in _ENDED

        left = max(0.0, deadline - time.monotonic())
        await until(
            ended, left, f"run {i + 1} of {runs} did not end", interval=0.005, alive=cluster.check
        )
    await _expect(cluster, "completed")
    rows = await cluster.conn.fetch(
        "SELECT r.run_id, r.step_id, r.started_at, r.finished_at, a.dispatched_at "
        "FROM flowforge.step_results r JOIN flowforge.step_attempts a "
        "ON a.run_id = r.run_id AND a.id = r.attempt_id "
        "WHERE r.outcome = 'succeeded' ORDER BY r.run_id, r.step_id"
    )
    by_run: dict[Any, list[Any]] = defaultdict(list)
    for row in rows:
        by_run[row["run_id"]].append(row)
    handoff, to_dispatch, to_start = [], [], []
    for steps in by_run.values():
        for done, nxt in pairwise(steps):
            handoff.append((nxt["started_at"] - done["finished_at"]).total_seconds() * 1000)
            to_dispatch.append((nxt["dispatched_at"] - done["finished_at"]).total_seconds() * 1000)
            to_start.append((nxt["started_at"] - nxt["dispatched_at"]).total_seconds() * 1000)
    return {
        "runs": runs,
        "handoff_ms": handoff,
        "result_to_dispatch_ms": to_dispatch,
        "dispatch_to_start_ms": to_start,
    }


async def fanout(cluster: Cluster, items: int, timeout: float) -> dict[str, Any]:
    """Workload 3: one run whose `for_each` runs a no-op step per item; enqueue commit to
    the run's end."""
    _require(cluster, FANOUT)
    assert cluster.orchestrator is not None and cluster.worker is not None
    procs = {"orchestrator": cluster.orchestrator, "worker": cluster.worker}
    await cluster.checkpoint()
    before = await cluster.db_stats()
    cpu = {name: proc.cpu_s() for name, proc in procs.items()}
    committed = await _enqueue_all(cluster, FANOUT, [{"items": list(range(items))}])
    await _wait_ended(cluster, 1, timeout)
    after = await cluster.db_stats()
    cpu = {name: proc.cpu_s() - cpu[name] for name, proc in procs.items()}
    await _expect(cluster, "completed")
    wall = await _last_finish(cluster) - committed
    ran = int(
        await cluster.conn.fetchval(
            "SELECT count(*) FROM flowforge.step_results WHERE outcome = 'succeeded'"
        )
    )
    if ran < items:
        raise WorkloadFailed(f"the fan-out run completed with {ran} of {items} item steps")
    wal = after["lsn"] - before["lsn"]
    writes = after["xid"] - before["xid"] - 1
    # Where the wall time goes: until the first element ran (for_each, the expansion, the
    # commit of every dispatch, their enqueue), until the worker finished the last one, and
    # the rest (the last results applied, the run's end).
    span = await cluster.conn.fetchrow(
        "SELECT extract(epoch FROM min(started_at))::float8 AS first,"
        " extract(epoch FROM max(finished_at))::float8 AS last"
        " FROM flowforge.step_results WHERE outcome = 'succeeded' AND worker <> 'orchestrator'"
    )
    # What a commit of a big fan-out writes grows with what changed (its parts), not with
    # the fan-out's size.
    return {
        "items": items,
        "wall_s": wall,
        "first_element_started_s": span["first"] - committed,
        "last_element_finished_s": span["last"] - committed,
        "cpu_ms_per_item": {name: seconds * 1000 / items for name, seconds in cpu.items()},
        "wal_bytes": wal,
        "wal_bytes_per_item": wal / max(items, 1),
        "wal_lsn_range": [before["lsn"], after["lsn"]],  # for pg_walinspect
        "write_transactions_per_item": writes / max(items, 1),
    }


async def children(cluster: Cluster, items: int, timeout: float) -> dict[str, Any]:
    """One run whose `for_each` starts a child run per item (each a run of one no-op step):
    enqueue commit to the end of the last run, against `plain_fanout` (the same fan-out of
    plain steps) in the same workload."""
    _require(cluster, CHILD)
    _require(cluster, CHILDREN)
    await cluster.checkpoint()
    before = await cluster.db_stats()
    committed = await _enqueue_all(cluster, CHILDREN, [{"items": list(range(items))}])
    await _wait_ended(cluster, items + 1, timeout)
    after = await cluster.db_stats()
    await _expect(cluster, "completed")
    wall = await _last_finish(cluster) - committed
    started = int(
        await cluster.conn.fetchval(
            "SELECT count(*) FROM flowforge.runs WHERE parent_run_id IS NOT NULL"
        )
    )
    if started != items:
        raise WorkloadFailed(f"the fan-out started {started} child runs for {items} items")
    return {
        "children": items,
        "wall_s": wall,
        "children_per_s": items / wall,
        "wal_bytes_per_child": (after["lsn"] - before["lsn"]) / max(items, 1),
    }


async def plain_fanout(cluster: Cluster, items: int, timeout: float) -> dict[str, Any]:
    """`fanout`, with its rate: what `children` is compared with."""
    result = await fanout(cluster, items, timeout)
    result["steps_per_s"] = items / result["wall_s"]
    return result


async def scale(cluster: Cluster, runs: int, timeout: float) -> dict[str, Any]:
    """Workload 4: `runs` runs each parked on a 10-minute delay, claimed by a fresh
    orchestrator; its RSS before and after, and enqueue commit to the last claim seen."""
    _require(cluster, PARK)
    orchestrator = await cluster.restart_orchestrator(**IN_MEMORY)
    rss_before = orchestrator.rss_kb()
    committed = await _enqueue_all(cluster, PARK, [{"n": i} for i in range(runs)])
    pending = "SELECT count(*) = 0 FROM flowforge.runs WHERE status = 'pending'"
    await _wait(cluster, f"SELECT ({pending})::int", 1, timeout, f"{runs} runs not claimed")
    claimed = time.time() - committed
    rss_after = orchestrator.rss_kb()
    await _expect(cluster, "running")
    return {
        "runs": runs,
        "claim_s": claimed,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_per_run_kib": (rss_after - rss_before) / runs,
    }


async def events(cluster: Cluster, runs: int, timeout: float) -> dict[str, Any]:
    """Workload 5: `runs` runs one after the other, each a step, a step, a wait, a step. An
    event's handoff is its insert's commit (the harness's clock) to the next step's
    dispatch (the orchestrator's); a step's is step 1's result to step 2's dispatch, in the
    same runs, for comparison."""
    _require(cluster, WAIT_EVENT)
    deadline = time.monotonic() + timeout
    sent_at: dict[Any, float] = {}
    for i in range(runs):
        run = await enqueue(cluster.conn, WAIT_EVENT, {"n": i})

        async def waiting(run_id: Any = run.id) -> bool:
            found = await cluster.conn.fetchval(
                "SELECT count(*) FROM flowforge.outbox WHERE run_id = $1 AND type = 'step.waiting'",
                run_id,
            )
            return bool(found)

        left = max(0.0, deadline - time.monotonic())
        await until(waiting, left, f"run {i + 1} never waited", interval=0.005, alive=cluster.check)
        await send_event(cluster.conn, "go", {"i": i}, run_id=run.id)
        sent_at[run.id] = time.time()
    await _wait_ended(cluster, runs, max(1.0, deadline - time.monotonic()))
    await _expect(cluster, "completed")
    rows = await cluster.conn.fetch(
        "SELECT a.run_id, a.step_id, a.dispatched_at, r.finished_at FROM flowforge.step_attempts a "
        "LEFT JOIN flowforge.step_results r ON r.attempt_id = a.id"
    )
    by_run: dict[Any, dict[str, Any]] = defaultdict(dict)
    for row in rows:
        by_run[row["run_id"]][row["step_id"]] = row
    event_ms, step_ms = [], []
    for run_id, steps in by_run.items():
        s1, s2, s3 = steps["s1"], steps["s2"], steps["s3"]
        step_ms.append((s2["dispatched_at"] - s1["finished_at"]).total_seconds() * 1000)
        event_ms.append((s3["dispatched_at"].timestamp() - sent_at[run_id]) * 1000)
    return {"runs": runs, "event_to_dispatch_ms": event_ms, "result_to_dispatch_ms": step_ms}


async def parked(cluster: Cluster, runs: int, timeout: float) -> dict[str, Any]:
    """Workload 6: `runs` runs each waiting on an event that never comes, claimed by a fresh
    orchestrator: its RSS per parked run, and the transactions the database serves per slow
    poll while they wait (what parked runs cost it: no query per run)."""
    _require(cluster, WAIT)
    orchestrator = await cluster.restart_orchestrator(**IN_MEMORY)
    rss_before = orchestrator.rss_kb()
    await _enqueue_all(cluster, WAIT, [{"n": i} for i in range(runs)])
    waits = "SELECT count(*) FROM flowforge.outbox WHERE type = 'step.waiting'"
    await _wait(cluster, waits, runs, timeout, f"{runs} runs not waiting")
    rss_after = orchestrator.rss_kb()
    await _expect(cluster, "running")
    # Over four polls; a quick run (the suite's smoke test) only checks the figure is there.
    window = 4 * cluster.poll_interval if runs >= 1000 else 1.0
    before = await cluster.transactions()
    await asyncio.sleep(window)
    after = await cluster.transactions()
    return {
        "runs": runs,
        "rss_per_run_kib": (rss_after - rss_before) / runs,
        "transactions_per_poll": (after - before) * cluster.poll_interval / window,
    }


_INSERT_PENDING = """
INSERT INTO flowforge.runs (workflow_name, input)
SELECT $1, jsonb_build_object('n', n) FROM generate_series($2::int, $3::int) AS n
"""
_PARKED = "SELECT count(*) FROM flowforge.runs WHERE wake_at IS NOT NULL AND owner IS NULL"
_LATENESS = """
SELECT extract(epoch FROM f.time - s.time)::float8 * 1000 - $1 * 1000 AS late_ms
FROM flowforge.outbox s
JOIN flowforge.outbox f ON f.run_id = s.run_id AND f.step_id = s.step_id
JOIN flowforge.runs r ON r.id = s.run_id
WHERE r.workflow_name = $2 AND s.type = 'step.started' AND f.type = 'step.succeeded'
"""


async def hibernated(cluster: Cluster, runs: int, due: int, timeout: float) -> dict[str, Any]:
    """Workload 7: `runs` runs on a 1-hour delay, inserted by SQL in batches, claimed by a
    fresh orchestrator (FLOWFORGE_HIBERNATE_AFTER at its default): each claim hibernates its
    runs again. Its RSS before, at its highest while claiming (sampled every 0.2 s) and
    once all are parked; then `due` runs on a DUE_DELAY-second delay among them, under an
    orchestrator with HIBERNATE_AFTER=10 s: how late each timer fires after it is due."""
    _require(cluster, PARK_HOUR)
    _require(cluster, PARK_DUE)
    orchestrator = await cluster.restart_orchestrator()
    rss_before = orchestrator.rss_kb()
    began = time.monotonic()
    for first in range(1, runs + 1, 10_000):
        await cluster.conn.execute(_INSERT_PENDING, PARK_HOUR, first, min(first + 9_999, runs))
    peak = orchestrator.rss_kb()

    async def all_parked() -> bool:
        nonlocal peak
        peak = max(peak, orchestrator.rss_kb())
        return int(await cluster.conn.fetchval(_PARKED)) >= runs

    await until(all_parked, timeout, f"{runs} runs not parked", interval=0.2, alive=cluster.check)
    parked_s = time.monotonic() - began
    rss_after = orchestrator.rss_kb()
    window = 2 * cluster.poll_interval if runs >= 1000 else 1.0
    before = await cluster.transactions()
    await asyncio.sleep(window)
    after = await cluster.transactions()
    rss_idle = orchestrator.rss_kb()

    await cluster.restart_orchestrator(FLOWFORGE_HIBERNATE_AFTER=DUE_AFTER)
    await cluster.conn.execute(_INSERT_PENDING, PARK_DUE, 1, due)
    ended = (
        "SELECT count(*) FROM flowforge.runs WHERE workflow_name = 'bench-park-due'"
        " AND status = 'completed'"
    )
    await _wait(cluster, ended, due, timeout + DUE_DELAY, f"{due} due runs did not complete")
    late = [row["late_ms"] for row in await cluster.conn.fetch(_LATENESS, DUE_DELAY, PARK_DUE)]
    woke = await cluster.conn.fetchval(
        "SELECT count(*) FROM flowforge.runs WHERE workflow_name = 'bench-park-due'"
        " AND epoch >= 2"  # claimed twice: parked once at least
    )
    return {
        "runs": runs,
        "park_s": parked_s,
        "park_rate": runs / parked_s,
        "rss_before_kib": rss_before,
        "rss_peak_kib": peak,
        "rss_after_kib": rss_after,
        "rss_idle_kib": rss_idle,
        "rss_peak_mb": peak / 1024,
        "transactions_per_poll": (after - before) * cluster.poll_interval / window,
        "due_runs": due,
        "due_woken_from_hibernation": int(woke),
        "late_ms": late,
    }
