"""`python -m tests.chaos` (`just chaos`): kill the engine's processes while runs go through.

    python -m tests.chaos                 # 300 runs, a 60 s chaos phase, 3 orchestrators
    python -m tests.chaos --seed 1234     # replay the choices of an earlier run
    python -m tests.chaos --smoke         # 40 runs, one fault of each kind (the test suite's)

It starts a private durable PostgreSQL, a Redis that keeps nothing across a restart, the
fault-injecting HTTP server (`tests.chaos.server`), and orchestrators and workers as real
processes. It registers the workflows of `tests.chaos.workflows`, then during the chaos
phase submits the runs of the plan (`tests.chaos.plan`) and carries out its faults, each at
its time (they may overlap): SIGKILL an orchestrator (once all of them), SIGKILL a worker,
restart Redis, restart PostgreSQL, terminate every engine connection to PostgreSQL, SIGSTOP
an orchestrator past its lease or a worker past the step deadline (then SIGCONT), SIGTERM an
orchestrator or a worker under load (it must exit 0), each process started again after a
random time down. Processes that exit on their own are crashes: recorded and replaced. After
the phase it waits, at most `--drain-timeout` seconds, until every run has finished; a run
still pending or running then is lost. It stops the processes (SIGTERM), audits the database
(`tests.chaos.audit`) and prints one line of figures.

Exit status 0 only when nothing was lost, duplicated, broken or wrong, no process crashed
and every process stopped cleanly; 1 otherwise (the reasons follow the figures, on
stderr, and the logs are kept); 2 when the chaos run itself could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowforge_orchestrator import store
from flowforge_orchestrator.client import enqueue
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.errors import FlowForgeError
from tests.bench.cluster import REPO
from tests.chaos.audit import audit, histories
from tests.chaos.cluster import ChaosCluster, Kind, Slot
from tests.chaos.figures import Figures, figures_of
from tests.chaos.plan import ALL, ChaosConfig, Fault, Submission, make_plan
from tests.chaos.probes import probe_readiness, redis_recovery
from tests.chaos.server import FaultServer
from tests.chaos.workflows import WORKFLOWS
from tests.helpers import poll

__all__ = ["ChaosConfig", "main", "run", "smoke"]


def smoke(config: ChaosConfig) -> ChaosConfig:
    """The small version, in the test suite: 40 runs, 2 orchestrators, one fault of each kind."""
    return replace(
        config,
        runs=40,
        duration=15.0,
        drain_timeout=45.0,
        orchestrators=2,
        workers=2,
        orchestrator_kills=1,
        worker_kills=1,
        pauses=1,
        graceful_restarts=1,
    )


class Journal:
    """What happened when, in `chaos.log`; on stderr too with --verbose."""

    def __init__(self, path: Path, verbose: bool) -> None:
        self.path = path
        self.verbose = verbose
        self.t0 = time.monotonic()
        self.wall0 = time.time()  # the same moment, on the clock the server's times use

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.2f}s] {message}"
        with self.path.open("a", encoding="utf-8") as out:
            out.write(line + "\n")
        if self.verbose:
            print(line, file=sys.stderr, flush=True)


# -- the chaos phase ---------------------------------------------------------------------------


async def _register(cluster: ChaosCluster) -> None:
    async with cluster.pool.acquire() as conn:
        for workflow in WORKFLOWS:
            definition = parse_definition(
                workflow.spec, source=workflow.name, known_types={"tracked_http"}
            )
            await store.register_definition(conn, definition)


async def _submit(
    cluster: ChaosCluster, server: FaultServer, submissions: list[Submission], t0: float
) -> None:
    loop = asyncio.get_running_loop()
    for sub in submissions:
        await asyncio.sleep(max(0.0, t0 + sub.at - loop.time()))

        async def one(sub: Submission = sub) -> None:
            async with cluster.pool.acquire() as conn:
                # The idempotency key makes a retry after a lost commit reply harmless.
                await enqueue(
                    conn,
                    sub.workflow,
                    {**sub.input, "base": server.url},
                    run_id=sub.run_id,
                    idempotency_key=f"chaos-{sub.run_id}",
                )

        await store.retrying(one, what=f"submitting run {sub.index}")


async def _live(cluster: ChaosCluster, kind: Kind, needed: int, wait: float = 15.0) -> list[Slot]:
    """The live slots of `kind`, waiting a little for `needed` of them (other faults hold
    some down); fewer if the wait ends first."""
    await poll(lambda: len(cluster.live(kind)) >= needed, timeout=wait, interval=0.1)
    return cluster.live(kind)


async def _fault(cluster: ChaosCluster, fault: Fault, counts: Counter[str], note: Any) -> None:
    """Carry out one fault; a process fault takes the planned slot, or another live one of
    its kind when that one is down already."""
    if fault.kind in ("redis", "postgres", "connections"):
        note(f"fault: {fault.kind}")
        if fault.kind == "connections":
            await cluster.drop_connections()
        else:
            restart = cluster.restart_redis if fault.kind == "redis" else cluster.restart_postgres
            await restart(fault.down)
        counts["connection_drops" if fault.kind == "connections" else f"{fault.kind}_restarts"] += 1
        return
    kind: Kind = "worker" if fault.kind.startswith("worker") else "orchestrator"
    action = fault.kind.partition("_")[2] or "kill"
    targets = await _targets(cluster, kind, fault.target)
    if not targets:
        note(f"fault: no live {kind} to {action}")
        counts["skipped"] += 1
        return
    note(f"fault: {action} {', '.join(s.node for s in targets)} for {fault.down:.1f}s")
    for slot in targets:
        slot.held = True
    try:
        await asyncio.gather(*(_act(cluster, action, s, fault.down) for s in targets))
        counts[f"{kind}_{action}s"] += len(targets)
        counts["all_orchestrators_at_once"] += fault.target == ALL
    finally:
        for slot in targets:
            slot.held = False


async def _act(cluster: ChaosCluster, action: str, slot: Slot, down: float) -> None:
    if action == "pause":
        await cluster.pause(slot, down)
        return
    if action == "restart":
        await cluster.terminate(slot)
    else:
        await cluster.kill(slot)
    await asyncio.sleep(down)
    await cluster.start_slot(slot)


async def _targets(cluster: ChaosCluster, kind: Kind, target: int) -> list[Slot]:
    """The planned slot, another live one if it is down, or all (ALL). One process is
    taken down only while another of its kind serves (the planned "all at once" aside):
    with every worker gone for long, retries run out by design."""
    slots = cluster.of_kind(kind)
    needed = 1 if target == ALL or len(slots) == 1 else 2
    live = await _live(cluster, kind, needed)
    if len(live) < needed:
        return []
    if target == ALL:
        return live
    return [slots[target]] if slots[target] in live else live[:1]


async def _faults(
    cluster: ChaosCluster, faults: list[Fault], t0: float, counts: Counter[str], note: Any
) -> None:
    """Each fault at its time, whether or not the previous ones are over."""
    loop = asyncio.get_running_loop()
    tasks = []
    try:
        for fault in faults:
            await asyncio.sleep(max(0.0, t0 + fault.at - loop.time()))
            tasks.append(asyncio.create_task(_fault(cluster, fault, counts, note)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _open_runs(cluster: ChaosCluster) -> int:
    async def count() -> int:
        async with cluster.pool.acquire() as conn:
            return sum((await store.count_open_runs(conn)).values())

    return await store.retrying(count, what="counting open runs")


async def _drain(cluster: ChaosCluster, timeout: float) -> float | None:
    """Seconds until no run is pending or running; None if `timeout` passed first."""
    began = time.monotonic()

    async def drained() -> bool:
        return not await _open_runs(cluster)

    if await poll(drained, timeout=timeout, interval=0.2):
        return time.monotonic() - began
    return None


# -- figures -------------------------------------------------------------------------------------


# -- the whole run -------------------------------------------------------------------------------


def _work_dir(config: ChaosConfig) -> Path:
    if config.work_dir is not None:
        return config.work_dir
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return REPO / ".flowforge" / "chaos" / f"{stamp}-{config.seed}"


async def run(config: ChaosConfig, work: Path) -> Figures:
    """Set up, break things while runs go through, drain, audit."""
    note = Journal(work / "chaos.log", config.verbose)
    plan = make_plan(config)
    figures = Figures(config.seed)
    servers_and_processes = ChaosCluster.running(
        work,
        orchestrators=config.orchestrators,
        workers=config.workers,
        lease_seconds=config.lease_seconds,
        hibernate_after=config.hibernate_after,
        note=note,
    )
    async with servers_and_processes as cluster, FaultServer(config.seed) as server:
        await _register(cluster)
        await cluster.start_all()
        supervisor = asyncio.create_task(cluster.supervise())
        prober = asyncio.create_task(
            probe_readiness(cluster.readiness_ports, cluster.pool, figures.recovery)
        )
        try:
            t0 = asyncio.get_running_loop().time()
            note(f"chaos phase: {len(plan.submissions)} runs, {len(plan.faults)} faults")
            await asyncio.gather(
                _submit(cluster, server, plan.submissions, t0),
                _faults(cluster, plan.faults, t0, figures.faults, note),
            )
            note("chaos phase over; draining")
            figures.drain_s = await _drain(cluster, config.drain_timeout)
            note(f"drained in {figures.drain_s}s" if figures.drain_s is not None else "deadline")
        finally:
            for task in (supervisor, prober):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await cluster.stop_processes()
        figures.crashes, figures.unclean_stops = cluster.crashes, cluster.unclean_stops
        async with cluster.pool.acquire() as conn:
            found = await audit(conn)
            figures_of(found, server, figures, cluster.redis_losses, note.wall0)
            await redis_recovery(conn, cluster.redis_starts, figures.recovery)
            if figures.suspects:
                found_runs = await histories(conn, figures.suspects[:20])
                text = json.dumps(found_runs, indent=1, default=str)
                (work / "findings.json").write_text(text, encoding="utf-8")
    note(f"HTTP answers by status: {dict(server.answered)}")
    return figures


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seed", type=int, help="replay the choices of an earlier run")
    parser.add_argument("--smoke", action="store_true", help="the small version of the tests")
    defaults = ChaosConfig(seed=0)
    small = smoke(defaults)
    for name in (
        "runs",
        "duration",
        "drain_timeout",
        "orchestrators",
        "workers",
        "orchestrator_kills",
        "worker_kills",
        "redis_restarts",
        "postgres_restarts",
        "pauses",
        "graceful_restarts",
        "connection_drops",
        "lease_seconds",
        "hibernate_after",
    ):
        value = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        parser.add_argument(
            flag, type=type(value), help=f"default {value} ({getattr(small, name)} with --smoke)"
        )
    parser.add_argument(
        "--work-dir", type=Path, help="servers' data and logs (default .flowforge/chaos/...)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir when all went well")
    parser.add_argument("-v", "--verbose", action="store_true", help="each fault on stderr")
    return parser


def config_from(argv: list[str] | None) -> ChaosConfig:
    args = _parser().parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    config = ChaosConfig(seed=seed, work_dir=args.work_dir, keep=args.keep, verbose=args.verbose)
    if args.smoke:
        config = smoke(config)
    given = {k: v for k, v in vars(args).items() if k in ChaosConfig.__dataclass_fields__}
    given = {k: v for k, v in given.items() if v is not None and k not in ("seed", "work_dir")}
    return replace(config, **given)


def _replay(argv: list[str], seed: int) -> str:
    """The command line that makes the same choices: these arguments with this seed."""
    kept = [
        a for i, a in enumerate(argv) if "--seed" not in (a.split("=")[0], argv[i - 1] if i else "")
    ]
    return " ".join(["python -m tests.chaos", *kept, "--seed", str(seed)])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = config_from(argv)
    work = _work_dir(config)
    work.mkdir(parents=True, exist_ok=True)
    print(f"chaos: seed {config.seed} (replay: {_replay(argv, config.seed)}); work dir {work}")
    # The harness's own pool complains while PostgreSQL is down: into a file, not the terminal.
    logging.basicConfig(filename=work / "harness.log", level=logging.WARNING)
    try:
        figures = asyncio.run(run(config, work))
    except (FlowForgeError, OSError) as exc:
        print(f"chaos: could not run: {exc} (logs in {work})", file=sys.stderr)
        return 2
    print(figures.line(), flush=True)
    for detail in figures.details:
        print(f"  {detail}", file=sys.stderr)
    if not figures.ok:
        print(f"chaos: FAILED; logs (and findings.json) kept in {work}", file=sys.stderr)
    elif figures.suspects:
        print(f"chaos: extra executions to look at: findings.json in {work}", file=sys.stderr)
    elif not config.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if figures.ok else 1
