"""`python -m tests.bench` (`just bench`): the engine against raw arq, in the same invocation.

    python -m tests.bench                      # every workload, 3 repeats, full sizes
    python -m tests.bench --quick --repeat 1   # tiny sizes: does the harness still work?
    python -m tests.bench --workloads latency --poll-delay 0.01

Each workload runs `--repeat` times, engine and baseline repeats interleaved so that drift of
the machine touches both; a repeat is bounded by `--timeout`. A workload the engine cannot
run (a run fails, a deadline passes) is reported as failed with the run's error, and the
harness goes on. Exit status: 0 when every figure was measured (met or not), 1 when a
workload failed, 2 when the harness itself could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.errors import FlowForgeError
from tests.bench import failover, workloads
from tests.bench.cluster import REPO, Cluster
from tests.bench.processes import WorkloadFailed
from tests.bench.report import figures, format_table

__all__ = ["BenchConfig", "Sizes", "main", "run"]

WORKLOADS = (
    "throughput",
    "latency",
    "fanout",
    "scale",
    "events",
    "parked",
    "children",
    "failover",
    "replicas",
)
# Asked for by name only (`--workloads hibernated`): minutes at full size.
EXTRA_WORKLOADS = ("hibernated",)
QUICK_SCALE = 0.01
# The sides of a workload that run on the engine (the others are raw arq): each leaves runs
# that the next repeat must not see.
_ENGINE_SIDES = ("engine", "steps")


@dataclass(frozen=True)
class Sizes:
    """The issue's sizes; `scaled()` shrinks them for a quick run."""

    throughput_runs: int = 1000  # of 5 steps: 5,000 steps against 5,000 raw jobs
    latency_runs: int = 50  # of 10 steps: 450 handoffs against 450 single raw jobs
    fanout_items: int = 1000
    scale_runs: int = 10_000
    event_runs: int = 50  # one after the other: 50 event handoffs and 50 step handoffs
    parked_runs: int = 10_000
    child_runs: int = 1000  # children of one fan-out, against as many plain steps
    hibernated_runs: int = 100_000  # on a 1-hour delay: hibernated
    due_runs: int = 10_000  # hibernated, then due: do their timers fire on time?
    failover_runs: int = 200  # running on the orchestrator that is killed
    replica_runs: int = 1000  # of 5 steps, on 2 orchestrators + 2 workers, then on 1 + 1

    def scaled(self, factor: float) -> Sizes:
        return Sizes(
            **{
                f.name: max(2, round(getattr(self, f.name) * factor))
                for f in dataclasses.fields(self)
            }
        )


@dataclass(frozen=True)
class BenchConfig:
    repeat: int = 3
    scale: float = 1.0
    workloads: tuple[str, ...] = WORKLOADS
    poll_delay: float = Settings.model_fields["worker_poll_delay"].default
    max_jobs: int = Settings.model_fields["worker_max_jobs"].default
    timeout: float = 300.0  # per repeat of a workload, engine or baseline
    out: Path | None = None
    database_url: str | None = None  # admin DSN; None: a private durable server
    redis_url: str | None = None
    hibernated_runs: int | None = None  # the hibernated workload's sizes, unscaled
    due_runs: int | None = None
    fanout_items: int | None = None  # the fan-out's size, unscaled


Measure = Callable[[], Awaitable[dict[str, Any]]]


def _measures(cluster: Cluster, name: str, sizes: Sizes, timeout: float) -> dict[str, Measure]:
    """The measurements of one workload: `engine`, and the baselines it is compared with."""
    raw = cluster.raw

    async def raw_batch(jobs: int) -> dict[str, Any]:
        assert cluster.raw_worker is not None
        cpu = cluster.raw_worker.cpu_s()
        result = await raw.batch(jobs, timeout)
        result["cpu_ms_per_job"] = (cluster.raw_worker.cpu_s() - cpu) * 1000 / jobs
        return result

    handoffs = sizes.latency_runs * 9
    table: dict[str, dict[str, Measure]] = {
        "throughput": {
            "engine": lambda: workloads.throughput(cluster, sizes.throughput_runs, timeout),
            "baseline": lambda: raw_batch(sizes.throughput_runs * 5),
        },
        "latency": {
            "engine": lambda: workloads.latency(cluster, sizes.latency_runs, timeout),
            "baseline": lambda: raw.singles(handoffs, timeout),
            # Context only (how arq's poll cycle alone paces a chain): fewer suffice.
            "chained": lambda: raw.chained(min(handoffs, 100) + 1, timeout),
        },
        "fanout": {
            "engine": lambda: workloads.fanout(cluster, sizes.fanout_items, timeout),
            "baseline": lambda: raw_batch(sizes.fanout_items),
        },
        "scale": {"engine": lambda: workloads.scale(cluster, sizes.scale_runs, timeout)},
        "events": {"engine": lambda: workloads.events(cluster, sizes.event_runs, timeout)},
        "parked": {"engine": lambda: workloads.parked(cluster, sizes.parked_runs, timeout)},
        "children": {
            "engine": lambda: workloads.children(cluster, sizes.child_runs, timeout),
            "steps": lambda: workloads.plain_fanout(cluster, sizes.child_runs, timeout),
        },
        "hibernated": {
            "engine": lambda: workloads.hibernated(
                cluster, sizes.hibernated_runs, sizes.due_runs, timeout
            )
        },
        "failover": {"engine": lambda: failover.failover(cluster, sizes.failover_runs, timeout)},
        "replicas": {  # "engine": 2 orchestrators + 2 workers; "single": 1 + 1
            "engine": lambda: failover.replicas(cluster, sizes.replica_runs, timeout, 2),
            "single": lambda: failover.replicas(cluster, sizes.replica_runs, timeout, 1),
        },
    }
    return table[name]


async def _workload(cluster: Cluster, name: str, sizes: Sizes, config: BenchConfig) -> Any:
    """All repeats of one workload; a side that fails once is not repeated."""
    measures = _measures(cluster, name, sizes, config.timeout)
    result: dict[str, Any] = {}
    for side in measures:
        result[side], result[f"{side}_error"] = [], None
    for i in range(config.repeat):
        for side, measure in measures.items():
            if result[f"{side}_error"] is not None:
                continue
            began = time.monotonic()
            try:
                result[side].append(await measure())
            except WorkloadFailed as exc:
                result[f"{side}_error"] = str(exc)
                if side not in _ENGINE_SIDES:
                    await cluster.clear_raw_queue()
            finally:
                if side in _ENGINE_SIDES:
                    await cluster.reset()
            status = (result[f"{side}_error"] or "ok").partition("\n")[0]
            took = time.monotonic() - began
            print(f"  {name} {side} {i + 1}/{config.repeat}: {took:.1f} s, {status}", flush=True)
    return result


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for path, key, field in (
        ("/proc/cpuinfo", "cpu", "model name"),
        ("/proc/meminfo", "memory", "MemTotal"),
    ):
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        info[key] = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(field)), "")
    for package in ("arq", "asyncpg", "redis"):
        info[package] = importlib.metadata.version(package)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    info["commit"] = commit.stdout.strip() or None
    return info


def _default_out() -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return REPO / ".flowforge" / "bench" / f"bench-{stamp}.json"


async def run(config: BenchConfig, command: str = "python -m tests.bench") -> dict[str, Any]:
    """Run the workloads; write the JSON report, print the table; return the report."""
    sizes = Sizes().scaled(config.scale)
    chosen = {
        "hibernated_runs": config.hibernated_runs,
        "due_runs": config.due_runs,
        "fanout_items": config.fanout_items,
    }
    sizes = dataclasses.replace(sizes, **{k: v for k, v in chosen.items() if v is not None})
    out = config.out or _default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.with_name(out.stem + "-logs")
    started = datetime.now(UTC)
    load_before = os.getloadavg()  # other work on the machine shows in the figures
    print(
        f"FlowForge benchmarks: {', '.join(config.workloads)}; {config.repeat} repeats; "
        f"poll_delay {config.poll_delay:g} s, max_jobs {config.max_jobs}; sizes {sizes}",
        flush=True,
    )
    async with Cluster(
        poll_delay=config.poll_delay,
        max_jobs=config.max_jobs,
        logs=logs,
        definitions=workloads.DEFINITIONS,
        database_url=config.database_url,
        redis_url=config.redis_url,
    ) as cluster:
        servers = await cluster.describe()
        results = {}
        for name in config.workloads:
            results[name] = await _workload(cluster, name, sizes, config)
    rows = figures(results)
    report = {
        "command": command,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "machine": {
            **machine(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "servers": servers,
        "config": {
            **{k: v for k, v in dataclasses.asdict(config).items() if not k.endswith("url")},
            "out": str(out),
            "sizes": dataclasses.asdict(sizes),
        },
        "figures": [f.to_json() for f in rows],
        "workloads": results,
        "logs": str(logs),
    }
    out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print()
    print(format_table(rows))
    print(f"\nresults: {out}\nprocess logs: {logs}")
    return report


def _parser() -> argparse.ArgumentParser:
    defaults = BenchConfig()
    p = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="Benchmark the engine against raw arq on durable PostgreSQL and Redis.",
    )
    p.add_argument("--repeat", type=int, default=defaults.repeat, help="repeats per workload")
    p.add_argument("--scale", type=float, default=None, help="size factor (default 1)")
    p.add_argument("--quick", action="store_true", help=f"tiny sizes (scale {QUICK_SCALE:g})")
    p.add_argument("--hibernated-runs", type=int, default=None, help="runs parked by `hibernated`")
    p.add_argument("--due-runs", type=int, default=None, help="runs due in `hibernated`")
    p.add_argument(
        "--fanout-items", type=int, default=None, help="items of `fanout` (and its baseline)"
    )
    p.add_argument(
        "--workloads",
        nargs="+",
        choices=WORKLOADS + EXTRA_WORKLOADS,
        default=list(WORKLOADS),
        metavar="NAME",
        help=f"run only these ({', '.join(WORKLOADS)}; db cost comes with throughput; "
        f"by name only: {', '.join(EXTRA_WORKLOADS)})",
    )
    p.add_argument(
        "--poll-delay",
        type=float,
        default=defaults.poll_delay,
        help="FLOWFORGE_WORKER_POLL_DELAY and the raw worker's poll_delay",
    )
    p.add_argument(
        "--max-jobs",
        type=int,
        default=defaults.max_jobs,
        help="FLOWFORGE_WORKER_MAX_JOBS and the raw worker's max_jobs",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=defaults.timeout,
        help="seconds one repeat of a workload may take",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON report (default .flowforge/bench/)")
    p.add_argument(
        "--database-url",
        default=None,
        help="an admin DSN (may CREATE DATABASE) instead of a private server",
    )
    p.add_argument("--redis-url", default=None, help="a Redis instead of a private server")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.repeat < 1:
        print("error: --repeat must be at least 1", file=sys.stderr)
        return 2
    config = BenchConfig(
        repeat=args.repeat,
        scale=args.scale if args.scale is not None else (QUICK_SCALE if args.quick else 1.0),
        workloads=tuple(dict.fromkeys(args.workloads)),
        poll_delay=args.poll_delay,
        max_jobs=args.max_jobs,
        timeout=args.timeout,
        out=args.out,
        database_url=args.database_url,
        redis_url=args.redis_url,
        hibernated_runs=args.hibernated_runs,
        due_runs=args.due_runs,
        fanout_items=args.fanout_items,
    )
    command = " ".join(["python -m tests.bench", *(argv if argv is not None else sys.argv[1:])])
    try:
        report = asyncio.run(run(config, command))
    except FlowForgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    failed = any(
        v for w in report["workloads"].values() for k, v in w.items() if k.endswith("_error")
    )
    return 1 if failed else 0
