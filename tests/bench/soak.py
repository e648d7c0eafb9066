"""`python -m tests.bench.soak [--minutes 20]`: sustained mixed load with a short retention
and a consumer reading the outbox feed; do the tables, memory and latency stay flat?

The bench's cluster (durable private PostgreSQL and Redis, a real orchestrator and worker)
runs with FLOWFORGE_RUN_RETENTION (default 60 s). Runs of three workflows (a 5-step chain,
a 10-step chain, a 5-item fan-out) are enqueued at a steady rate; a consumer reads the feed
in transactions of up to 1,000 events. Every `--sample-every` seconds the report records
each table's and index's size (`pg_total_relation_size`), dead tuples, the consumer's lag,
the orchestrator's and the worker's RSS, and step latency p50/p99 (dispatch to result)
over the interval. At the end the load stops, the runs finish, the consumer drains, and
every event it got is checked: none twice, each run's `seq` without a gap, every run's
last event read. Verdict: after the warm-up (the first retention period and a sample), the
last third of the samples against the first third must not grow beyond the noise allowed
below, and the idle windows must export no span. Writes JSON (and a PNG when matplotlib is
installed: `pip install -e '.[soak]'`) to `--out`.

Spans: the orchestrator and the worker run under `tests.bench.spancount`, which counts every
span they end (tracing on, as with an exporter). The report gives spans per minute in an
idle window (`--idle` seconds) before the load and after the drain, and spans per step
executed under load (per sample and in total, by span name).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from uuid import UUID

from flowforge_orchestrator import store
from flowforge_orchestrator.client import enqueue, read_outbox, register_consumer
from flowforge_orchestrator.core.durations import parse_duration
from tests.bench.cluster import Cluster
from tests.bench.spancount import ENV as SPAN_COUNTS
from tests.bench.spancount import WRITE_EVERY, read_counts
from tests.bench.workloads import CHAIN_5, CHAIN_10, DEFINITIONS, FANOUT
from tests.helpers import poll

log = logging.getLogger("soak")

CONSUMER = "soak"
MIX: list[tuple[str, Any]] = [(CHAIN_5, {}), (CHAIN_10, {}), (FANOUT, {"items": [1, 2, 3, 4, 5]})]
# Allowed growth, last third of the samples over the first third (after the warm-up).
SIZE_GROWTH = 1.25  # tables and indexes: vacuum reuses space, some slack for bloat
RSS_GROWTH = 1.20
LATENCY_GROWTH = 2.0  # p99 on a shared 2-core machine is noisy

SIZES = """
SELECT c.relname AS name, c.relkind AS kind, pg_total_relation_size(c.oid) AS bytes
FROM pg_class c
WHERE c.relnamespace = 'flowforge'::regnamespace AND c.relkind IN ('r', 'i')
ORDER BY c.relname
"""
DEAD = """
SELECT relname AS name, n_dead_tup AS dead, n_live_tup AS live
FROM pg_stat_user_tables WHERE schemaname = 'flowforge'
"""
LATENCY = """
SELECT count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - dispatched_at))
           AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - dispatched_at))
           AS p99
FROM flowforge.step_attempts
WHERE finished_at > now() - make_interval(secs => $1)
"""


class SoakCluster(Cluster):
    """The bench's cluster, its processes started with extra settings and their spans
    counted into `spans` (see tests/bench/spancount.py)."""

    def __init__(self, extra: dict[str, str], spans: Path, **kw: Any) -> None:
        super().__init__(**kw)
        self.extra = {**extra, SPAN_COUNTS: str(spans)}

    def cli(self) -> list[str]:
        return [sys.executable, "-m", "tests.bench.spancount"]

    def env(self, **extra: str) -> dict[str, str]:
        return super().env(**{**self.extra, **extra})


SPAN_FILES = {"orchestrator": "run.json", "worker": "worker.json"}


def _kind(name: str) -> str:
    """A span name without the run's or step's own part ("step charge" -> "step")."""
    return name.split(" ", 1)[0] if name.startswith(("step ", "workflow ")) else name


class Spans:
    """The span counts the orchestrator and the worker write, and differences of them."""

    def __init__(self, where: Path) -> None:
        self.where = where

    def read(self) -> dict[str, dict[str, Any]]:
        return {proc: read_counts(self.where / name) for proc, name in SPAN_FILES.items()}

    @staticmethod
    def delta(
        before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        """Spans ended between two reads: per process, roots, and by kind of name."""
        by_kind: dict[str, int] = defaultdict(int)
        for proc in SPAN_FILES:
            old = before[proc]["by_name"]
            for name, count in after[proc]["by_name"].items():
                by_kind[_kind(name)] += count - old.get(name, 0)
        per_process = {p: after[p]["total"] - before[p]["total"] for p in SPAN_FILES}
        return {
            "total": sum(per_process.values()),
            "roots": sum(after[p]["roots"] - before[p]["roots"] for p in SPAN_FILES),
            "per_process": per_process,
            "by_kind": {k: v for k, v in sorted(by_kind.items()) if v},
        }


def per_step(delta: dict[str, Any]) -> float | None:
    """Spans per step attempt executed (the worker's `step` spans); None when none ran."""
    steps = delta["by_kind"].get("step", 0)
    return round(delta["total"] / steps, 2) if steps else None


async def _idle(spans: Spans, seconds: float) -> dict[str, Any]:
    """Spans ended while nothing is enqueued for `seconds`, and their rate per minute."""
    await asyncio.sleep(2 * WRITE_EVERY)  # the last spans of what came before are written
    before = spans.read()
    await asyncio.sleep(seconds + 2 * WRITE_EVERY)
    delta = Spans.delta(before, spans.read())
    return {"seconds": seconds, "per_minute": round(delta["total"] * 60 / seconds, 2), **delta}


class Consumer:
    """Reads the feed until told to drain; remembers what it got for the final check."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.events = 0
        self.seqs: dict[UUID, list[int]] = defaultdict(list)
        self.ids: set[str] = set()
        self.duplicates = 0
        self.last_types: dict[UUID, str] = {}

    async def run(self, stop: asyncio.Event) -> None:
        conn = await store.connect(self.cluster.db_url)
        try:
            while True:
                draining = stop.is_set()
                async with conn.transaction():
                    got = await read_outbox(conn, CONSUMER, 1000)
                for e in got:
                    event_id = str(e.event["id"])
                    if event_id in self.ids:
                        self.duplicates += 1
                    self.ids.add(event_id)
                    self.seqs[e.run_id].append(e.seq)
                    self.last_types[e.run_id] = e.type
                self.events += len(got)
                if not got:
                    if draining:
                        return
                    await asyncio.sleep(0.2)
        finally:
            await conn.close()

    def gaps(self) -> int:
        return sum(1 for seqs in self.seqs.values() if seqs != list(range(1, len(seqs) + 1)))


async def _load(cluster: Cluster, rate: float, stop: asyncio.Event, runs: list[UUID]) -> None:
    conn = await store.connect(cluster.db_url)
    try:
        started = time.monotonic()
        while not stop.is_set():
            workflow, payload = MIX[len(runs) % len(MIX)]
            runs.append((await enqueue(conn, workflow, payload)).id)
            delay = started + len(runs) / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    finally:
        await conn.close()


async def _sample(cluster: Cluster, interval: float, at: float) -> dict[str, Any]:
    conn = cluster.conn
    sizes = {r["name"]: int(r["bytes"]) for r in await conn.fetch(SIZES)}
    dead = {r["name"]: int(r["dead"]) for r in await conn.fetch(DEAD)}
    lags = {lag.name: lag for lag in await store.consumer_lags(conn)}
    latency = await conn.fetchrow(LATENCY, interval)
    statuses = {
        r["status"]: int(r["n"])
        for r in await conn.fetch("SELECT status, count(*) AS n FROM flowforge.runs GROUP BY 1")
    }
    lag = lags[CONSUMER]
    assert cluster.orchestrator is not None and cluster.worker is not None
    return {
        "minute": round(at / 60, 2),
        "sizes": sizes,
        "total_bytes": sum(sizes.values()),
        "dead_tuples": dead,
        "runs": statuses,
        "lag_events": lag.events_behind,
        "lag_seconds": lag.seconds_behind or 0.0,
        "rss_kb": {
            "orchestrator": cluster.orchestrator.rss_kb(),
            "worker": cluster.worker.rss_kb(),
        },
        "steps": int(latency["n"]),
        "p50_ms": round(1000 * float(latency["p50"] or 0), 1),
        "p99_ms": round(1000 * float(latency["p99"] or 0), 1),
    }


def _growth(samples: list[dict[str, Any]], value: Any) -> float:
    third = max(1, len(samples) // 3)
    first = statistics.mean(value(s) for s in samples[:third])
    last = statistics.mean(value(s) for s in samples[-third:])
    return last / first if first else 1.0


def verdict(
    samples: list[dict[str, Any]],
    warmup: float,
    checks: dict[str, Any],
    idle_spans: int = 0,
) -> dict[str, Any]:
    steady = [s for s in samples if s["minute"] * 60 >= warmup]
    growth = {
        "total_bytes": _growth(steady, lambda s: s["total_bytes"]),
        "rss_orchestrator": _growth(steady, lambda s: s["rss_kb"]["orchestrator"]),
        "rss_worker": _growth(steady, lambda s: s["rss_kb"]["worker"]),
        "p99": _growth(steady, lambda s: s["p99_ms"]),
    }
    limits = {
        "total_bytes": SIZE_GROWTH,
        "rss_orchestrator": RSS_GROWTH,
        "rss_worker": RSS_GROWTH,
        "p99": LATENCY_GROWTH,
    }
    failed = [k for k, g in growth.items() if g > limits[k]]
    if checks["duplicates"] or checks["gaps"] or checks["unfinished_reads"]:
        failed.append("feed")
    if idle_spans:
        failed.append("idle_spans")
    return {
        "steady_samples": len(steady),
        "growth": {k: round(v, 3) for k, v in growth.items()},
        "limits": limits,
        "failed": failed,
        "pass": len(steady) >= 3 and not failed,
    }


def _plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    samples = report["samples"]
    minutes = [s["minute"] for s in samples]
    fig, axes = plt.subplots(5, 1, figsize=(8, 12), sharex=True)
    axes[0].plot(minutes, [s["total_bytes"] / 2**20 for s in samples])
    axes[0].set_ylabel("tables+indexes MiB")
    axes[1].plot(minutes, [s["rss_kb"]["orchestrator"] / 1024 for s in samples], label="orch")
    axes[1].plot(minutes, [s["rss_kb"]["worker"] / 1024 for s in samples], label="worker")
    axes[1].set_ylabel("RSS MiB")
    axes[1].legend()
    axes[2].plot(minutes, [s["p50_ms"] for s in samples], label="p50")
    axes[2].plot(minutes, [s["p99_ms"] for s in samples], label="p99")
    axes[2].set_ylabel("step ms")
    axes[2].legend()
    axes[3].plot(minutes, [s["lag_events"] for s in samples])
    axes[3].set_ylabel("consumer lag (events)")
    axes[4].plot(minutes, [s["spans_per_step"] or 0 for s in samples])
    axes[4].set_ylabel("spans per step")
    axes[4].set_xlabel("minute")
    fig.tight_layout()
    fig.savefig(path)
    return True


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    retention = parse_duration(args.retention)
    extra = {"FLOWFORGE_RUN_RETENTION": repr(retention), "FLOWFORGE_OUTBOX_MAX_AGE": "1d"}
    out: Path = args.out
    spans = Spans(out / "spans")
    async with SoakCluster(
        extra,
        spans.where,
        poll_delay=0.05,
        max_jobs=100,
        logs=out / "logs",
        definitions=DEFINITIONS,
    ) as cluster:
        await register_consumer(cluster.conn, CONSUMER)
        idle_before = await _idle(spans, args.idle)
        log.info("idle before the load: %s", json.dumps(idle_before))
        consumer = Consumer(cluster)
        stop_load, stop_reading = asyncio.Event(), asyncio.Event()
        runs: list[UUID] = []
        tasks = [
            asyncio.create_task(_load(cluster, args.rate, stop_load, runs)),
            asyncio.create_task(consumer.run(stop_reading)),
        ]
        samples = []
        started = time.monotonic()
        end = started + args.minutes * 60
        load_counts = last_counts = spans.read()
        while time.monotonic() < end:
            await asyncio.sleep(min(args.sample_every, max(0.0, end - time.monotonic())))
            cluster.check()
            sample = await _sample(cluster, args.sample_every, time.monotonic() - started)
            counts = spans.read()
            delta = Spans.delta(last_counts, counts)
            last_counts = counts
            sample["spans"] = delta["total"]
            sample["root_spans"] = delta["roots"]
            sample["spans_per_step"] = per_step(delta)
            samples.append(sample)
            log.info(
                "sample %s",
                json.dumps(
                    {k: v for k, v in samples[-1].items() if k not in ("sizes", "dead_tuples")}
                ),
            )
        stop_load.set()
        await tasks[0]
        under_load = Spans.delta(load_counts, spans.read())

        async def all_ended() -> bool:
            open_runs = await cluster.conn.fetchval(
                "SELECT count(*) FROM flowforge.runs WHERE status IN ('pending', 'running')"
            )
            return int(open_runs) == 0

        await poll(all_ended, timeout=120, interval=0.5)  # the drain, bounded
        stop_reading.set()
        await tasks[1]
        idle_after = await _idle(spans, args.idle)
        log.info("idle after the drain: %s", json.dumps(idle_after))
        unfinished = [r for r in runs if consumer.last_types.get(r) != "workflow.completed"]
        checks = {
            "runs_enqueued": len(runs),
            "events_read": consumer.events,
            "duplicates": consumer.duplicates,
            "gaps": consumer.gaps(),
            "unfinished_reads": len(unfinished),
        }
        warmup = retention + args.sample_every
        idle_spans = idle_before["total"] + idle_after["total"]
        report = {
            "config": {
                "minutes": args.minutes,
                "rate_runs_per_s": args.rate,
                "retention_s": retention,
                "sample_every_s": args.sample_every,
                "idle_s": args.idle,
                "servers": cluster.servers,
            },
            "samples": samples,
            "checks": checks,
            "spans": {
                "idle_before_load": idle_before,
                "idle_after_drain": idle_after,
                "under_load": {"per_step": per_step(under_load), **under_load},
            },
            "verdict": verdict(samples, warmup, checks, idle_spans),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    # 5 runs/s (~33 steps/s) is what this shared 2-core machine sustains with room to spare
    # while other test suites run: at 20 the backlog grew (p50 6-8 s), and an overloaded
    # engine's tables grow by definition. The soak looks for drift; tests/bench for capacity.
    parser.add_argument("--rate", type=float, default=5.0, help="runs enqueued per second")
    parser.add_argument("--retention", default="60s", help="FLOWFORGE_RUN_RETENTION")
    parser.add_argument("--sample-every", type=float, default=60.0, help="seconds")
    parser.add_argument(
        "--idle", type=float, default=60.0, help="seconds of each idle window (spans counted)"
    )
    parser.add_argument("--out", type=Path, default=Path(".flowforge/soak"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(soak(args))
    (args.out / "soak.json").write_text(json.dumps(report, indent=2, default=str))
    plotted = _plot(report, args.out / "soak.png")
    summary = {k: report[k] for k in ("checks", "verdict")}
    summary["spans_per_minute_idle"] = [
        report["spans"][w]["per_minute"] for w in ("idle_before_load", "idle_after_drain")
    ]
    summary["spans_per_step_under_load"] = report["spans"]["under_load"]["per_step"]
    print(json.dumps(summary, indent=2))
    print(
        f"report: {args.out / 'soak.json'}"
        + (f", plot: {args.out / 'soak.png'}" if plotted else "")
    )


if __name__ == "__main__":
    main()
