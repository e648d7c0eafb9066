"""Hibernation with real processes: an orchestrator SIGKILLed while its runs sleep (on a
delay, on an event) loses none of them. Another orchestrator, started later, wakes each
delay when it is due and each wait when its event comes (events sent while no
orchestrator ran included); every run completes once, no event is taken twice."""

from __future__ import annotations

from flowforge_orchestrator.client import send_event
from tests.chaos.audit import audit
from tests.e2e.test_processes import Cluster, cluster

__all__ = ["cluster"]  # the fixture

DELAYED = """
name: delayed
version: 1
steps:
  - {id: pause, type: delay, duration: 8s}
  - {id: after, type: echo, depends_on: [pause], with: {n: "${{ input.n }}"}}
"""

WAITING = """
name: waiting
version: 1
steps:
  - {id: paid, type: wait, event: paid, key: "input.order"}
  - {id: ship, type: echo, depends_on: [paid], with: {paid: "${{ steps.paid.output.payload }}"}}
"""

RUNS = 40


async def test_runs_hibernated_by_a_killed_orchestrator_all_wake_and_complete_once(
    cluster: Cluster,
) -> None:
    await cluster.worker()
    first = await cluster.orchestrator("a", FLOWFORGE_HIBERNATE_AFTER="1")
    await cluster.register(DELAYED)
    await cluster.register(WAITING)
    delayed = [await cluster.submit("delayed", {"n": i}) for i in range(RUNS)]
    waiting = [await cluster.submit("waiting", {"order": f"o-{i}"}) for i in range(RUNS)]

    async def all_hibernated() -> bool:
        parked = await cluster.conn.fetchval(
            "SELECT count(*) FROM flowforge.runs WHERE wake_at IS NOT NULL AND owner IS NULL"
        )
        return bool(parked == 2 * RUNS)

    await cluster.until(all_hibernated, "not every run hibernated", timeout=30)
    first.kill()  # SIGKILL: nothing of the sleeping runs was in it
    for i in range(RUNS // 2):  # while no orchestrator runs
        await send_event(cluster.conn, "paid", {"i": i}, key=f"o-{i}")
    await cluster.orchestrator("b", FLOWFORGE_HIBERNATE_AFTER="1")
    for i in range(RUNS // 2, RUNS):
        await send_event(cluster.conn, "paid", {"i": i}, key=f"o-{i}")

    for i, run_id in enumerate(waiting):
        run = await cluster.finished(run_id, timeout=60)
        assert run["status"] == "completed" and run["output"] == {"ship": {"paid": {"i": i}}}
    for run_id in delayed:
        run = await cluster.finished(run_id, timeout=60)
        assert run["status"] == "completed", run
    late = await cluster.conn.fetchval(
        "SELECT min(extract(epoch FROM f.time - s.time)) FROM flowforge.outbox s"
        " JOIN flowforge.outbox f ON f.run_id = s.run_id AND f.step_id = s.step_id"
        " WHERE s.type = 'step.started' AND f.type = 'step.succeeded' AND s.step_id = 'pause'"
    )
    assert late >= 8  # no delay fired early
    taken = await cluster.conn.fetch(
        "SELECT run_id, count(*) AS n FROM flowforge.event_consumptions GROUP BY run_id"
    )
    assert len(taken) == RUNS and all(row["n"] == 1 for row in taken)
    found = await audit(cluster.conn)
    assert (found.duplicate_events, found.broken_histories) == (0, 0)
    assert await cluster.conn.fetchval("SELECT count(*) FROM flowforge.parked_waits") == 0
