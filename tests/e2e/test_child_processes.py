"""Child runs with real processes: an orchestrator SIGKILLed once the child runs exist,
before their parents' next commit; the orchestrator that adopts the parents starts no
second child, and every parent completes with its one child's output."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.test_processes import Cluster, cluster

__all__ = ["cluster"]  # the fixture

CHILD = """
name: child
version: 1
steps:
  - id: work
    type: slow
    with: {n: "${{ input.n }}", calls: "${{ input.calls }}", release: "${{ input.release }}"}
output: "${{ steps.work.output.n }}"
"""

PARENT = """
name: parent
version: 1
steps:
  - id: call
    type: workflow
    workflow: child
    input: {n: "${{ input.n }}", calls: "${{ input.calls }}", release: "${{ input.release }}"}
  - {id: after, type: echo, depends_on: [call], with: {got: "${{ steps.call.output }}"}}
"""

PARENTS = 20


async def test_an_orchestrator_killed_after_starting_children_leaves_one_child_each(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.worker()
    first = await cluster.orchestrator("a")
    await cluster.register(CHILD)
    await cluster.register(PARENT)
    calls, release = tmp_path / "calls.txt", tmp_path / "release"
    parents = [
        await cluster.submit("parent", {"n": i, "calls": str(calls), "release": str(release)})
        for i in range(PARENTS)
    ]
    count = "SELECT count(*) FROM flowforge.runs WHERE parent_run_id = ANY($1::uuid[])"

    async def all_children_exist() -> bool:
        return bool(await cluster.conn.fetchval(count, parents) == PARENTS)

    await cluster.until(all_children_exist, "the children were not all started", timeout=60)
    first.kill()  # no parent can have committed again: no child has answered yet
    await cluster.orchestrator("b")
    release.touch()

    for i, run_id in enumerate(parents):
        run = await cluster.finished(run_id, timeout=60)
        assert run["status"] == "completed", run
        assert run["output"] == {"after": {"got": i}}
    children = await cluster.conn.fetch(
        "SELECT parent_run_id, count(*) AS n, bool_and(status = 'completed') AS done"
        " FROM flowforge.runs WHERE parent_run_id = ANY($1::uuid[]) GROUP BY parent_run_id",
        parents,
    )
    assert len(children) == PARENTS
    assert all(row["n"] == 1 and row["done"] for row in children)
    dispatched = await cluster.conn.fetchval(
        "SELECT count(*) FROM flowforge.outbox"
        " WHERE run_id = ANY($1::uuid[]) AND type = 'step.dispatched' AND step_id = 'call'",
        parents,
    )
    assert dispatched == PARENTS
    adopted = await cluster.conn.fetchval(
        "SELECT count(*) FROM flowforge.runs WHERE id = ANY($1::uuid[]) AND epoch > 1", parents
    )
    assert adopted > 0  # the parents did change hands
