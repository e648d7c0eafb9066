"""The chaos run's plan: every random choice, drawn from the seed before anything starts.

What is submitted when (workflow, input, run id), and which fault happens when (which
process, how long it stays down). Timing still varies between two runs of one seed, so a
replay makes the same choices, not the same interleaving.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

from tests.chaos.workflows import WORKFLOWS

__all__ = ["ALL", "ChaosConfig", "Fault", "Plan", "Submission", "make_plan"]

ALL = -1  # a fault target: every process of the kind at once
FaultKind = Literal[
    "orchestrator",  # SIGKILL, then a new process
    "worker",
    "orchestrator_pause",  # SIGSTOP, then SIGCONT
    "worker_pause",
    "orchestrator_restart",  # SIGTERM (graceful), then a new process
    "worker_restart",
    "redis",  # a restart that loses every key
    "postgres",  # a restart: every connection drops, nothing is lost
    "connections",  # every engine connection to PostgreSQL terminated, the server stays up
]


@dataclass(frozen=True)
class Submission:
    at: float  # seconds after the start of the chaos phase
    index: int
    run_id: UUID
    workflow: str
    input: dict[str, Any]


@dataclass(frozen=True)
class Fault:
    at: float
    kind: FaultKind
    target: int  # slot index among its kind, or ALL (servers: 0)
    down: float  # seconds before the process or server is started again


@dataclass(frozen=True)
class Plan:
    submissions: list[Submission]
    faults: list[Fault]


@dataclass(frozen=True)
class ChaosConfig:
    """The size of a chaos run and of its faults; the seed decides everything random."""

    seed: int
    runs: int = 300
    duration: float = 60.0  # the chaos phase: submissions and faults
    drain_timeout: float = 120.0  # after it, until every run has finished
    orchestrators: int = 3
    workers: int = 2
    orchestrator_kills: int = 6
    worker_kills: int = 6
    redis_restarts: int = 1
    postgres_restarts: int = 1
    pauses: int = 4  # SIGSTOP an orchestrator or a worker past its lease or timeout, SIGCONT
    graceful_restarts: int = 3  # SIGTERM an orchestrator or a worker under load, start anew
    connection_drops: int = 1
    lease_seconds: float = 3.0
    # FLOWFORGE_HIBERNATE_AFTER: short, so that runs on a delay or a backoff of a second
    # hibernate and come back while processes are killed around them; 0 turns it off.
    hibernate_after: float = 0.5
    work_dir: Path | None = None  # None: .flowforge/chaos/<time>-<seed>
    keep: bool = False  # keep the logs even when all went well
    verbose: bool = False


def make_plan(config: ChaosConfig) -> Plan:
    """Runs are submitted over the first 85% of `duration`, 60% of them one by one and the
    rest in five bursts (a claim batch, a group commit of many runs); faults land in
    10%..90% of it."""
    rng = random.Random(config.seed)
    runs, duration = config.runs, config.duration
    weights = [w.weight for w in WORKFLOWS]
    bursts = [rng.uniform(0, 0.85 * duration) for _ in range(5)]
    times = [
        rng.uniform(0, 0.85 * duration) if rng.random() < 0.6 else rng.choice(bursts)
        for _ in range(runs)
    ]
    submissions = []
    for index, at in enumerate(sorted(times)):
        workflow = rng.choices(WORKFLOWS, weights)[0]
        run_id = UUID(int=rng.getrandbits(128), version=4)
        submissions.append(Submission(at, index, run_id, workflow.name, workflow.make_input(rng)))

    counts: dict[FaultKind, int] = {
        "orchestrator": config.orchestrator_kills,
        "worker": config.worker_kills,
        "redis": config.redis_restarts,
        "postgres": config.postgres_restarts,
        "connections": config.connection_drops,
    }
    kinds = [kind for kind, n in counts.items() for _ in range(n)]
    pauses: list[FaultKind] = ["orchestrator_pause", "worker_pause"]
    kinds += [rng.choice(pauses) for _ in range(config.pauses)]
    restarts: list[FaultKind] = ["orchestrator_restart", "worker_restart"]
    kinds += [rng.choice(restarts) for _ in range(config.graceful_restarts)]
    rng.shuffle(kinds)
    times = sorted(rng.uniform(0.1 * duration, 0.9 * duration) for _ in kinds)
    # With three kills or more, one takes every orchestrator down at once: results then
    # arrive while no orchestrator runs.
    kills = config.orchestrator_kills
    everyone = rng.randrange(kills) if kills >= 3 else None
    faults = []
    orchestrator_kills = 0
    for at, kind in zip(times, kinds, strict=True):
        faults.append(
            _fault(rng, config, at, kind, kind == "orchestrator" and orchestrator_kills == everyone)
        )
        orchestrator_kills += kind == "orchestrator"
    return Plan(submissions, faults)


def _fault(
    rng: random.Random, config: ChaosConfig, at: float, kind: FaultKind, everyone: bool
) -> Fault:
    """One fault: its target, and how long the process or server stays down (a paused
    orchestrator past its lease, a paused worker past the step deadline)."""
    lease = config.lease_seconds
    if kind == "orchestrator":
        target = ALL if everyone else rng.randrange(config.orchestrators)
        return Fault(at, kind, target, rng.uniform(0, 1.5 * lease))
    if kind == "orchestrator_pause":
        return Fault(at, kind, rng.randrange(config.orchestrators), rng.uniform(1.5, 2.5) * lease)
    if kind == "worker":
        return Fault(at, kind, rng.randrange(config.workers), rng.uniform(0, 2))
    if kind == "worker_pause":
        return Fault(at, kind, rng.randrange(config.workers), rng.uniform(3, 6))
    if kind in ("orchestrator_restart", "worker_restart"):
        slots = config.orchestrators if kind == "orchestrator_restart" else config.workers
        return Fault(at, kind, rng.randrange(slots), 0.0)
    if kind == "redis":
        return Fault(at, kind, 0, rng.uniform(0.5, 2))
    if kind == "postgres":
        return Fault(at, kind, 0, rng.uniform(1, 3))
    return Fault(at, kind, 0, 0.0)
