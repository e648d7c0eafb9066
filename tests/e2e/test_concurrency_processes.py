"""A concurrency slot outlives the orchestrator that took it: real processes, SIGKILL."""

from __future__ import annotations

import signal
from pathlib import Path

from flowforge_orchestrator import store
from tests.e2e.test_processes import Cluster, SlowFiles
from tests.e2e.test_processes import cluster as cluster  # the fixture

GUARDED = """
name: guarded
version: 1
max_concurrency: 1
steps:
  - id: hold
    type: slow
    with: {calls: "${{ input.calls }}", release: "${{ input.release }}"}
"""
KEY = "workflow:guarded"


async def test_a_slot_held_by_a_killed_orchestrators_run_is_kept_until_that_run_ends(
    cluster: Cluster, tmp_path: Path
) -> None:
    first, second, third = (SlowFiles.under(tmp_path / str(n)) for n in (1, 2, 3))
    for files in (first, second, third):
        files.calls.parent.mkdir()
    await cluster.worker()
    orchestrator_a = await cluster.orchestrator("a")
    await cluster.register(GUARDED)
    holder = await cluster.submit("guarded", first.input())
    waiter = await cluster.submit("guarded", second.input())
    await cluster.until(first.started, "the first run never started")
    await cluster.wait_run(waiter, lambda r: r["waiting"], "the second run is not waiting")

    assert orchestrator_a.kill() == -signal.SIGKILL
    await cluster.orchestrator("b")
    await cluster.wait_run(holder, lambda r: r["owner"] == "b", "was not adopted by b")

    # b adopted the run with its slot: a new run, which b claims, is refused and queued.
    late = await cluster.submit("guarded", third.input())
    await cluster.wait_run(late, lambda r: r["waiting"], "the late run is not waiting")
    assert await store.concurrency_slots(cluster.conn, KEY) == [holder]
    assert await store.concurrency_queue(cluster.conn, KEY) == [waiter, late]
    assert (await cluster.run(waiter))["status"] == "pending"
    assert (second.started(), third.started()) == (0, 0)

    first.release_it()
    assert (await cluster.finished(holder))["status"] == "completed"
    await cluster.until(second.started, "the second run did not start once the slot freed")
    assert await store.concurrency_slots(cluster.conn, KEY) == [waiter]
    assert third.started() == 0
    second.release_it()
    await cluster.until(third.started, "the late run did not start after the second")
    third.release_it()
    runs = [await cluster.finished(run_id) for run_id in (waiter, late)]

    assert [(r["status"], r["owner"]) for r in runs] == [("completed", "b")] * 2
    assert (first.started(), second.started(), third.started()) == (1, 1, 1)
    assert await store.concurrency_slots(cluster.conn, KEY) == []
    assert await store.concurrency_queue(cluster.conn, KEY) == []
