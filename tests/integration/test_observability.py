"""A running orchestrator and worker serve /healthz, /readyz and /metrics that move with runs."""

from __future__ import annotations

import asyncio
import re

import httpx

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.engine.orchestrator import run_orchestrator
from flowforge_orchestrator.local_services import free_port
from flowforge_orchestrator.worker.runtime import load_step_types, run_worker
from tests.helpers import stop_tasks, wait_for
from tests.integration.conftest import Engine, Steps


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when it is absent)."""
    for line in text.splitlines():
        found = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if found is None or found.group(1) != name:
            continue
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', found.group(2) or ""))
        if pairs == labels:
            return float(found.group(3))
    return 0.0


async def test_probes_and_metrics_of_a_running_orchestrator_and_worker(
    settings: Settings, steps: Steps
) -> None:
    await store.apply_migrations(settings.database_url or "")
    o_port, w_port = free_port(), free_port()
    stop, ready_o, ready_w = asyncio.Event(), asyncio.Event(), asyncio.Event()
    types = {**load_step_types([]), "echo": steps.echo}
    tasks = [
        asyncio.create_task(
            run_orchestrator(settings.model_copy(update={"http_port": o_port}), stop, ready=ready_o)
        ),
        asyncio.create_task(
            run_worker(
                settings.model_copy(update={"http_port": w_port}), types, stop=stop, ready=ready_w
            )
        ),
    ]
    conn = await store.connect(settings.database_url or "")
    try:
        await asyncio.wait_for(asyncio.gather(ready_o.wait(), ready_w.wait()), timeout=20)
        engine = Engine(settings, conn)
        async with httpx.AsyncClient() as http:
            orchestrator = f"http://127.0.0.1:{o_port}"
            worker = f"http://127.0.0.1:{w_port}"
            assert (await http.get(f"{orchestrator}/healthz")).status_code == 200

            async def ready(url: str) -> bool:
                return (await http.get(f"{url}/readyz")).status_code == 200

            await wait_for(lambda: ready(orchestrator), message="orchestrator not ready")
            await wait_for(lambda: ready(worker), message="worker not ready")
            before = (await http.get(f"{orchestrator}/metrics")).text
            assert metric(before, "flowforge_run_transitions_total", status="completed") == 0

            await engine.register(
                "name: two\nversion: 1\nsteps:\n"
                "  - {id: a, type: echo, with: {n: 1}}\n"
                "  - {id: b, type: echo, depends_on: [a], with: {n: 2}}\n"
            )
            for _ in range(3):
                await engine.finished(await engine.submit("two"))

            after = (await http.get(f"{orchestrator}/metrics")).text
            assert metric(after, "flowforge_run_transitions_total", status="completed") == 3
            assert metric(after, "flowforge_group_commit_runs_count", kind="claim") >= 1
            assert (
                metric(
                    after,
                    "flowforge_step_duration_seconds_count",
                    step_type="echo",
                    outcome="succeeded",
                )
                == 6
            )
            worked = (await http.get(f"{worker}/metrics")).text
            assert (
                metric(
                    worked, "flowforge_worker_attempts_total", step_type="echo", outcome="succeeded"
                )
                == 6
            )
    finally:
        stop.set()
        try:
            await stop_tasks(tasks)
        finally:
            await conn.close()
