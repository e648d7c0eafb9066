"""`doctor` sees which workers serve now: two real worker processes, one stopped.

A stopping worker used to delete its queue's arq health-check key, shared by every worker of
the queue (and written again only hourly): `doctor` then said no worker ran while the other
served. Each worker now keeps its own entry in the queue's presence set.
"""

from __future__ import annotations

import re
import subprocess

from tests.e2e.test_processes import CLI, REPO, STEP_MODULE, Cluster, Process
from tests.e2e.test_processes import cluster as cluster  # the fixture

TYPES = "beat, echo, http, slow"


async def worker(cluster: Cluster, node: str) -> Process:
    return await cluster.start(
        f"worker-{node}",
        ["worker", "--types-module", STEP_MODULE],
        f"worker {node} serving step types: {TYPES}",
        FLOWFORGE_NODE_ID=node,
    )


def doctor(cluster: Cluster) -> tuple[int, list[tuple[str, str]]]:
    """doctor's exit code and its `workers` lines: [(status, detail)]."""
    done = subprocess.run(
        [str(CLI), "doctor"], cwd=REPO, env=cluster.env(), capture_output=True, text=True
    )
    found = re.findall(r"^(ok|warn|FAIL|skip) +workers +(.*)$", done.stdout, re.M)
    assert found, done.stdout + done.stderr
    return done.returncode, found


def running(lines: list[tuple[str, str]]) -> str | None:
    return next((d for s, d in lines if s == "ok" and d.startswith("running now: ")), None)


async def test_doctor_sees_the_worker_that_serves_on_when_another_stops(
    cluster: Cluster,
) -> None:
    first = await worker(cluster, "w1")
    await worker(cluster, "w2")

    def both() -> bool:
        return running(doctor(cluster)[1]) == "running now: " + ", ".join(
            f"{t} (w1, w2)" for t in TYPES.split(", ")
        )

    await cluster.until(both, "doctor did not see both workers")

    first.stop()
    assert first.popen.returncode == 0, first.output()
    code, lines = doctor(cluster)

    assert code == 0, lines
    assert running(lines) == "running now: " + ", ".join(f"{t} (w2)" for t in TYPES.split(", "))
    assert not [d for s, d in lines if s != "ok"], lines  # no "no running worker seen for"

    cluster.processes[-1].stop()
    code, lines = doctor(cluster)

    assert code == 1, lines
    assert running(lines) is None
    assert (
        "FAIL",
        f"no running worker seen for: {TYPES} (none is in the presence set of their queues "
        "in Redis): nothing will run until one starts",
    ) in lines
