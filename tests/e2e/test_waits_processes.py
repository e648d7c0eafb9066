"""Waits and heartbeats with real processes: an orchestrator SIGKILLed while 100 runs wait,
then an event for each (every run completes once, no event taken twice); a beating step
outlives its heartbeat timeout; the same step whose worker is SIGSTOPped is timed out at
about its heartbeat timeout and retried on the other worker from its last heartbeat."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from flowforge_orchestrator.client import send_event
from tests.e2e.test_processes import Cluster, cluster

__all__ = ["cluster"]  # the fixture

WAITING = """
name: waiting
version: 1
steps:
  - {id: paid, type: wait, event: paid, key: "input.order"}
  - id: ship
    type: echo
    depends_on: [paid]
    with: {amount: "${{ steps.paid.output.payload.amount }}"}
"""

BEATING = """
name: beating
version: 1
steps:
  - id: crunch
    type: beat
    heartbeat_timeout: 2s
    timeout: 1m
    retry: {max_retries: 2, initial_interval: 0.1s, jitter: false}
    with: {pages: "${{ input.pages }}", calls: "${{ input.calls }}"}
"""

RUNS = 100


async def test_waiting_runs_of_a_killed_orchestrator_each_take_their_event_once(
    cluster: Cluster,
) -> None:
    await cluster.worker()
    first = await cluster.orchestrator("a")
    await cluster.register(WAITING)
    runs = [await cluster.submit("waiting", {"order": f"o-{i}"}) for i in range(RUNS)]

    async def all_waiting() -> bool:
        waiting = await cluster.conn.fetchval(
            "SELECT count(DISTINCT run_id) FROM flowforge.outbox WHERE type = 'step.waiting'"
        )
        return bool(waiting == RUNS)

    await cluster.until(all_waiting, "not every run reached its wait step", timeout=60)
    first.kill()
    for i in range(RUNS // 2):  # while no orchestrator runs
        await send_event(cluster.conn, "paid", {"amount": i}, key=f"o-{i}")
    await cluster.orchestrator("b")
    for i in range(RUNS // 2, RUNS):
        await send_event(cluster.conn, "paid", {"amount": i}, key=f"o-{i}")

    for i, run_id in enumerate(runs):
        run = await cluster.finished(run_id, timeout=60)
        assert run["status"] == "completed", run
        assert run["output"] == {"ship": {"amount": i}}
    taken = await cluster.conn.fetch(
        "SELECT run_id, count(*) AS n FROM flowforge.event_consumptions GROUP BY run_id"
    )
    assert len(taken) == RUNS and all(row["n"] == 1 for row in taken)
    duplicates = await cluster.conn.fetchval(
        "SELECT count(*) FROM (SELECT run_id, data ->> 'step_id', type FROM flowforge.outbox"
        " WHERE type IN ('step.event_received', 'step.succeeded', 'workflow.completed')"
        " GROUP BY 1, 2, 3 HAVING count(*) > 1) d"
    )
    assert duplicates == 0


def _calls(path: Path) -> list[tuple[str, int, int]]:
    if not path.exists():
        return []
    lines = [line.split() for line in path.read_text().splitlines()]
    return [(node, int(attempt), int(start)) for node, attempt, start in lines]


async def test_a_beating_step_survives_and_a_stopped_workers_step_is_retried_elsewhere(
    cluster: Cluster, tmp_path: Path
) -> None:
    one = await cluster.worker("w1")
    two = await cluster.worker("w2")
    await cluster.orchestrator("a")
    await cluster.register(BEATING)

    # 4 s of work with a 2 s heartbeat timeout, twice over: it beats, it lives.
    calls = tmp_path / "long.txt"
    long_run = await cluster.submit("beating", {"pages": 20, "calls": str(calls)})
    run = await cluster.finished(long_run, timeout=60)
    assert run["status"] == "completed"
    assert run["output"]["crunch"]["attempt"] == 1

    # The worker holding the attempt stops (SIGSTOP) a second in: the attempt is timed out
    # at about 2 s and retried on the other worker, from the last page it reported.
    calls = tmp_path / "stopped.txt"
    run_id = await cluster.submit("beating", {"pages": 25, "calls": str(calls)})
    await cluster.until(lambda: _calls(calls), "the step never started")
    holder = one if _calls(calls)[0][0] == "w1" else two
    await cluster.until(
        lambda: cluster.conn.fetchval(
            "SELECT count(*) FROM flowforge.heartbeats"
            " WHERE run_id = $1 AND (details ->> 'page')::int >= 4",
            run_id,
        ),
        "no heartbeat reached the database",
    )
    holder.popen.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        await cluster.until(lambda: len(_calls(calls)) == 2, "never retried", timeout=30)
        retried_after = time.monotonic() - stopped_at
        run = await cluster.finished(run_id, timeout=60)
    finally:
        holder.popen.send_signal(signal.SIGCONT)
    assert run["status"] == "completed"
    (node1, _, _), (node2, attempt2, resumed) = _calls(calls)
    assert node2 != node1 and attempt2 == 2
    assert resumed >= 4  # from the last heartbeat the database had, not from the start
    assert run["output"]["crunch"] == {"pages": 25, "attempt": 2, "resumed_from": resumed}
    assert 1.5 <= retried_after < 10, retried_after
    events = await cluster.outbox(run_id)
    retrying = [e for e in events if e["type"] == "step.retrying"]
    assert retrying[0]["data"]["error"]["category"] == "heartbeat_timeout"
