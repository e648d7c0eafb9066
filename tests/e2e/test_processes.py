"""Real processes: `flowforge-orchestrator run` and `worker` subprocesses, killed with signals.

The `slow` step of `tests.e2e.steps_fixture` records each execution in a file and waits for a
release file, so a test knows exactly when the worker holds the attempt and decides when it
finishes; nothing here waits on time, only on conditions with a deadline.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml

from flowforge_orchestrator import store
from flowforge_orchestrator.client import enqueue
from flowforge_orchestrator.core.definition.parse import parse_definition
from tests.chaos.audit import audit
from tests.conftest import TEST_JOB_KEY
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("flowforge-orchestrator")
STEP_MODULE = "tests.e2e.steps_fixture"

# echo -> slow -> echo; the slow step's files come from the run input.
ADOPT = """
name: adopt
version: 1
steps:
  - {id: first, type: echo, with: {n: 1}}
  - id: hold
    type: slow
    depends_on: [first]
    with: {calls: "${{ input.calls }}", release: "${{ input.release }}"}
  - {id: last, type: echo, depends_on: [hold], with: {n: "${{ steps.first.output.n + 2 }}"}}
"""

# slow -> echo
SLOW_FIRST = """
name: slow-first
version: 1
steps:
  - id: hold
    type: slow
    with: {calls: "${{ input.calls }}", release: "${{ input.release }}"}
  - {id: last, type: echo, depends_on: [hold], with: {done: true}}
"""


# The exit code a daemon must end with after each signal: a clean stop after SIGTERM or
# SIGINT, death by the signal after SIGKILL.
EXIT_AFTER = {signal.SIGTERM: 0, signal.SIGINT: 0, signal.SIGKILL: -signal.SIGKILL}


@dataclass
class Process:
    """One CLI subprocess; its stdout and stderr go to a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    expect_exit: bool = False  # killed or stopped on purpose: exiting is not a failure
    expected_code: int | None = None  # what its exit code must be, after the first signal

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.expect_exit = True
        if self.popen.poll() is None:
            if self.expected_code is None:
                self.expected_code = EXIT_AFTER.get(sig)
            self.popen.send_signal(sig)

    def kill(self) -> int:
        """SIGKILL, and reap it."""
        self.signal(signal.SIGKILL)
        return self.popen.wait(timeout=10)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM; SIGKILL if it is still there after `grace` seconds (and then its exit
        code is not the 0 that `exit_problem` expects)."""
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)

    def exit_problem(self) -> str | None:
        """Why its exit code is wrong, with the end of its output; None if it is right."""
        code = self.popen.returncode
        if code is None or code == self.expected_code:
            return None
        expected = "no exit" if self.expected_code is None else f"{self.expected_code}"
        return f"{self.name} exited with {code}, expected {expected}:\n{self.output()[-4000:]}"


@dataclass
class Cluster:
    """Orchestrators and workers of one test, on the test's database and Redis."""

    db_url: str
    redis_url: str
    dir: Path
    conn: store.Connection
    processes: list[Process] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWFORGE_", "OTEL_"))}
        env.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            FLOWFORGE_DATABASE_URL=self.db_url,
            FLOWFORGE_REDIS_URL=self.redis_url,
            FLOWFORGE_HTTP_PORT="0",
            FLOWFORGE_POLL_INTERVAL="0.5",
            FLOWFORGE_WORKER_POLL_DELAY="0.01",
            FLOWFORGE_WORKER_SHUTDOWN_GRACE="1",
            FLOWFORGE_JOB_KEY=TEST_JOB_KEY,
        )
        env.update(extra)
        return env

    def check(self) -> None:
        """Fail at once, with its output, if a process exited that should not have."""
        for process in self.processes:
            code = process.popen.poll()
            if code is not None and not process.expect_exit:
                raise AssertionError(
                    f"{process.name} exited with {code}:\n{process.output()[-4000:]}"
                )

    async def until(self, predicate: Callable[[], Any], message: str, timeout: float = 20) -> None:
        """Wait for `predicate` (sync or async); fail at once if a process died meanwhile."""

        async def met() -> bool:
            self.check()
            value = predicate()
            return bool(await value if inspect.isawaitable(value) else value)

        await wait_for(met, timeout=timeout, message=message)

    async def start(self, name: str, args: list[str], ready: str, **env: str) -> Process:
        log = self.dir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [str(CLI), *args],
                cwd=REPO,
                env=self.env(**env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        await self.until(lambda: ready in process.output(), f"{name} did not start", timeout=30)
        return process

    async def orchestrator(self, node: str, lease_seconds: float = 2, **env: str) -> Process:
        return await self.start(
            f"orchestrator-{node}",
            ["run"],
            f"orchestrator {node} running",
            FLOWFORGE_NODE_ID=node,
            FLOWFORGE_LEASE_SECONDS=str(lease_seconds),
            **env,
        )

    async def worker(self, node: str = "w") -> Process:
        return await self.start(
            f"worker-{node}",
            ["worker", "--types-module", STEP_MODULE],
            f"worker {node} serving step types: beat, echo, http, slow",
            FLOWFORGE_NODE_ID=node,
        )

    def stop_all(self) -> None:
        """Stop every process, the last started first; all are tried even if one fails.
        Then each exit code must be what its signal calls for: 0 after SIGTERM (a daemon
        that crashed, or needed a SIGKILL to stop, fails the test), -9 after SIGKILL."""
        with contextlib.ExitStack() as stack:
            for process in self.processes:
                stack.callback(process.stop)
        problems = [p for p in (process.exit_problem() for process in self.processes) if p]
        if problems:
            raise AssertionError("\n\n".join(problems))

    # -- the database ---------------------------------------------------------------------

    async def register(self, text: str) -> None:
        definition = parse_definition(yaml.safe_load(text), source="test")
        await store.register_definition(self.conn, definition)

    async def submit(self, workflow: str, input: dict[str, Any]) -> UUID:
        return (await enqueue(self.conn, workflow, input)).id

    async def run(self, run_id: UUID) -> dict[str, Any]:
        row = await self.conn.fetchrow(
            "SELECT *, lease_expires_at <= now() AS lease_released FROM flowforge.runs"
            " WHERE id = $1",
            run_id,
        )
        assert row is not None
        return dict(row)

    async def wait_run(
        self,
        run_id: UUID,
        predicate: Callable[[dict[str, Any]], bool],
        what: str,
        timeout: float = 20,
    ) -> None:
        async def met() -> bool:
            return predicate(await self.run(run_id))

        await self.until(met, f"run {run_id}: {what}", timeout)

    async def finished(self, run_id: UUID, timeout: float = 20) -> dict[str, Any]:
        await self.wait_run(
            run_id,
            lambda r: r["status"] in ("completed", "failed", "cancelled"),
            "did not finish",
            timeout,
        )
        return await self.run(run_id)

    async def outbox(self, run_id: UUID) -> list[dict[str, Any]]:
        rows = await self.conn.fetch(
            "SELECT seq, type, time, data FROM flowforge.outbox WHERE run_id = $1 ORDER BY seq",
            run_id,
        )
        return [dict(r) for r in rows]

    async def transitions(self, run_id: UUID) -> list[dict[str, Any]]:
        rows = await self.conn.fetch(
            "SELECT seq, step_id, attempt_id, to_status, at FROM flowforge.transitions"
            " WHERE run_id = $1 ORDER BY seq",
            run_id,
        )
        return [dict(r) for r in rows]

    async def count(self, table: str, run_id: UUID, step_id: str) -> int:
        assert table in ("step_results", "step_attempts")
        value = await self.conn.fetchval(
            f"SELECT count(*) FROM flowforge.{table} WHERE run_id = $1 AND step_id = $2",
            run_id,
            step_id,
        )
        return int(value)


@pytest.fixture
async def cluster(db_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    conn = await store.connect(db_url)
    cluster = Cluster(db_url, redis_url, tmp_path, conn)
    try:
        yield cluster
    finally:
        try:
            cluster.stop_all()
        finally:
            await conn.close()


@dataclass
class SlowFiles:
    """The files through which a test watches and releases the `slow` step."""

    calls: Path
    release: Path

    @classmethod
    def under(cls, directory: Path) -> SlowFiles:
        return cls(directory / "slow-calls.txt", directory / "slow-release")

    def input(self) -> dict[str, str]:
        return {"calls": str(self.calls), "release": str(self.release)}

    def started(self) -> int:
        """How many times the worker started the slow step."""
        return len(self.calls.read_text().splitlines()) if self.calls.exists() else 0

    def release_it(self) -> None:
        self.release.touch()


# The status each event moves its run or step to.
STATUS_OF_EVENT = {
    "workflow.started": "running",
    "step.dispatched": "dispatched",
    "step.started": "running",
    "step.succeeded": "succeeded",
    "workflow.completed": "completed",
}


def assert_history(events: list[dict[str, Any]], transitions: list[dict[str, Any]]) -> None:
    """Seqs 1..N without gaps, and the transitions table matches the outbox row for row."""
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [(t["seq"], t["at"], t["step_id"], t["to_status"]) for t in transitions] == [
        (e["seq"], e["time"], e["data"].get("step_id"), STATUS_OF_EVENT[e["type"]]) for e in events
    ]


async def test_a_killed_orchestrator_is_replaced_and_the_run_completes_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    slow = SlowFiles.under(tmp_path)
    await cluster.worker()
    orchestrator_a = await cluster.orchestrator("a")
    await cluster.register(ADOPT)
    run_id = await cluster.submit("adopt", slow.input())

    # The slow step is dispatched (committed) and the worker is running it.
    await cluster.until(slow.started, "the slow step never started")
    events = await cluster.outbox(run_id)
    assert ("step.dispatched", "hold") in [(e["type"], e["data"].get("step_id")) for e in events]
    assert (await cluster.run(run_id))["owner"] == "a"

    assert orchestrator_a.kill() == -signal.SIGKILL
    await cluster.orchestrator("b")
    # B adopts the run once A's lease has expired, while the attempt is still running...
    await cluster.wait_run(run_id, lambda r: r["owner"] == "b", "was not adopted by b")
    # ... and the worker's result reaches B.
    slow.release_it()
    run = await cluster.finished(run_id)

    assert run["status"] == "completed", run["error"]
    assert run["owner"] == "b"
    assert run["epoch"] >= 2
    assert run["output"] == {"last": {"n": 3}}
    assert slow.started() == 1
    assert await cluster.count("step_results", run_id, "hold") == 1
    assert await cluster.count("step_attempts", run_id, "hold") == 1

    events = await cluster.outbox(run_id)
    assert Counter(e["type"] for e in events) == {
        "workflow.started": 1,
        "step.dispatched": 3,
        "step.started": 3,
        "step.succeeded": 3,
        "workflow.completed": 1,
    }
    assert events[0]["type"] == "workflow.started"
    assert events[-1]["type"] == "workflow.completed"
    for step_id in ("first", "hold", "last"):
        assert [e["type"] for e in events if e["data"].get("step_id") == step_id] == [
            "step.dispatched",
            "step.started",
            "step.succeeded",
        ]
    assert_history(events, await cluster.transitions(run_id))


async def test_a_result_written_while_no_orchestrator_runs_is_applied_on_adoption(
    cluster: Cluster, tmp_path: Path
) -> None:
    slow = SlowFiles.under(tmp_path)
    await cluster.worker()
    orchestrator_a = await cluster.orchestrator("a")
    await cluster.register(SLOW_FIRST)
    run_id = await cluster.submit("slow-first", slow.input())
    await cluster.until(slow.started, "the slow step never started")

    assert orchestrator_a.kill() == -signal.SIGKILL
    # No orchestrator at all now: the worker finishes the attempt and writes its result.
    slow.release_it()

    async def result_written() -> int:
        return await cluster.count("step_results", run_id, "hold")

    await cluster.until(result_written, "the worker did not write the result")
    assert (await cluster.run(run_id))["status"] == "running"

    await cluster.orchestrator("b")
    run = await cluster.finished(run_id)

    assert run["status"] == "completed", run["error"]
    assert run["owner"] == "b"
    assert run["output"] == {"last": {"done": True}}
    assert slow.started() == 1  # the step function ran exactly once
    assert await cluster.count("step_results", run_id, "hold") == 1
    assert await cluster.count("step_attempts", run_id, "hold") == 1
    events = await cluster.outbox(run_id)
    assert Counter(e["type"] for e in events) == {
        "workflow.started": 1,
        "step.dispatched": 2,
        "step.started": 2,
        "step.succeeded": 2,
        "workflow.completed": 1,
    }
    assert_history(events, await cluster.transitions(run_id))


async def test_sigterm_exits_promptly_and_releases_the_leases(
    cluster: Cluster, tmp_path: Path
) -> None:
    slow = SlowFiles.under(tmp_path)
    await cluster.worker()
    # A long lease: only an explicit release lets another replica adopt the run quickly.
    orchestrator_a = await cluster.orchestrator("a", lease_seconds=60)
    await cluster.register(SLOW_FIRST)
    run_id = await cluster.submit("slow-first", slow.input())
    await cluster.until(slow.started, "the slow step never started")
    before = await cluster.run(run_id)
    assert before["owner"] == "a" and not before["lease_released"]

    began = time.monotonic()
    orchestrator_a.signal(signal.SIGTERM)
    code = orchestrator_a.popen.wait(timeout=10)
    took = time.monotonic() - began

    assert code == 0, orchestrator_a.output()
    assert took < 5, f"SIGTERM took {took:.1f}s"
    run = await cluster.run(run_id)
    assert run["status"] == "running"
    assert run["owner"] == "a"
    assert run["lease_released"], run["lease_expires_at"]

    # Released, not expired: a new replica adopts the run at once, not after 60 s.
    await cluster.orchestrator("b", lease_seconds=60)
    slow.release_it()
    run = await cluster.finished(run_id, timeout=15)
    assert run["status"] == "completed", run["error"]
    assert run["owner"] == "b"
    assert slow.started() == 1


PARKED = """
name: parked
version: 1
steps:
  - {id: first, type: echo, with: {n: 1}}
  - {id: pause, type: delay, duration: 4s, depends_on: [first]}
  - {id: last, type: echo, depends_on: [pause], with: {done: true}}
"""


async def test_a_delay_survives_a_killed_orchestrator_and_fires_once_at_its_time(
    cluster: Cluster,
) -> None:
    await cluster.worker()
    orchestrator_a = await cluster.orchestrator("a")
    await cluster.register(PARKED)
    run_id = await cluster.submit("parked", {})

    async def parked() -> dict[str, Any] | None:
        return next(
            (
                e
                for e in await cluster.outbox(run_id)
                if e["type"] == "step.started" and e["data"]["step_id"] == "pause"
            ),
            None,
        )

    await cluster.until(parked, "the delay never started")
    assert orchestrator_a.kill() == -signal.SIGKILL
    await cluster.orchestrator("b")
    run = await cluster.finished(run_id)

    assert run["status"] == "completed", run["error"]
    assert run["owner"] == "b"  # the timer lived on in the checkpoint, not in process a
    events = await cluster.outbox(run_id)
    pause = [e for e in events if e["data"].get("step_id") == "pause"]
    assert [e["type"] for e in pause] == ["step.started", "step.succeeded"]  # once, not reset
    due = datetime.fromisoformat(pause[0]["data"]["until"])
    assert pause[1]["time"] >= due
    last = next(e for e in events if e["data"].get("step_id") == "last")
    assert last["time"] >= due
    assert_history(events, await cluster.transitions(run_id))


DIES = """
name: dies
version: 1
steps:
  - id: hold
    type: slow
    timeout: 1.5s
    retry: {max_retries: 1, initial_interval: 0.1s, retry_on: [timeout]}
    with: {calls: "${{ input.calls }}", release: "${{ input.release }}"}
"""


async def test_a_worker_killed_mid_step_times_the_attempt_out_and_it_is_retried(
    cluster: Cluster, tmp_path: Path
) -> None:
    slow = SlowFiles.under(tmp_path)
    worker_a = await cluster.worker()
    await cluster.orchestrator("a")
    await cluster.register(DIES)
    run_id = await cluster.submit("dies", slow.input())
    await cluster.until(slow.started, "the worker never started the step")

    assert worker_a.kill() == -signal.SIGKILL
    slow.release_it()  # the next attempt finishes at once
    await cluster.worker()
    run = await cluster.finished(run_id)

    assert run["status"] == "completed", run["error"]
    attempts = await cluster.conn.fetch(
        "SELECT attempt, status, error FROM flowforge.step_attempts WHERE run_id = $1"
        " ORDER BY attempt",
        run_id,
    )
    assert [(a["attempt"], a["status"]) for a in attempts] == [(1, "timed_out"), (2, "succeeded")]
    assert "did its worker stop?" in attempts[0]["error"]["message"]
    assert slow.started() == 2


SPREAD = """
name: spread
version: 1
steps:
  - {id: a, type: echo, with: {n: 1}}
  - {id: b, type: echo, depends_on: [a], with: {n: 2}}
"""


async def test_two_orchestrators_share_a_burst_of_runs(cluster: Cluster) -> None:
    await cluster.worker()
    await cluster.orchestrator("a", lease_seconds=10)
    await cluster.orchestrator("b", lease_seconds=10)
    await cluster.register(SPREAD)
    async with cluster.conn.transaction():
        ids = [await cluster.submit("spread", {"i": i}) for i in range(600)]

    async def all_done() -> bool:
        done = await cluster.conn.fetchval(
            "SELECT count(*) FROM flowforge.runs WHERE status = 'completed'"
        )
        return bool(done == len(ids))

    await cluster.until(all_done, "the runs did not all complete", timeout=60)
    owners = dict(
        await cluster.conn.fetch("SELECT owner, count(*) FROM flowforge.runs GROUP BY owner")
    )
    print(f"runs per orchestrator: {owners}")
    assert set(owners) == {"a", "b"}  # both took part; how evenly is printed, not asserted

    # Exactly once, run by run: claimed once (epoch 1: never claimed twice, never changed
    # hands), each step dispatched, started and succeeded once, on one attempt with one
    # result, and a history numbered 1..n that matches the outbox.
    found = await audit(cluster.conn)
    assert not found.lost
    assert (found.duplicate_transitions, found.duplicate_events) == (0, 0), (
        found.dup_transitions[:5],
        found.dup_events[:5],
    )
    assert found.broken_histories == 0, (found.gaps[:5], found.ends[:5])
    assert await cluster.conn.fetchval("SELECT count(*) FROM flowforge.runs WHERE epoch <> 1") == 0
    once: Counter[tuple[str, str | None]] = Counter(
        [("workflow.started", None), ("workflow.completed", None)]
    )
    for step in "ab":
        once.update((kind, step) for kind in ("step.dispatched", "step.started", "step.succeeded"))
    events: dict[UUID, Counter[tuple[str, str | None]]] = {run_id: Counter() for run_id in ids}
    for row in await cluster.conn.fetch(
        "SELECT run_id, type, data->>'step_id' AS step FROM flowforge.outbox"
    ):
        events[row["run_id"]][(row["type"], row["step"])] += 1
    assert [r for r, seen in events.items() if seen != once] == []
    steps = await cluster.conn.fetch(
        "SELECT a.run_id, a.step_id, a.attempt, a.status, count(r.attempt_id) AS results"
        " FROM flowforge.step_attempts a"
        " LEFT JOIN flowforge.step_results r ON r.attempt_id = a.id"
        " GROUP BY a.run_id, a.step_id, a.attempt, a.status"
    )
    assert len(steps) == 2 * len(ids)
    assert {(r["step_id"], r["attempt"], r["status"], r["results"]) for r in steps} == {
        ("a", 1, "succeeded", 1),
        ("b", 1, "succeeded", 1),
    }
    results = await cluster.conn.fetchval("SELECT count(*) FROM flowforge.step_results")
    assert results == 2 * len(ids)
