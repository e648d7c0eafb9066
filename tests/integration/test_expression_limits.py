"""CEL bombs among good runs, on the in-process engine: the event loop stays free (/healthz,
polled from another process, answers within 1 s throughout), the good runs complete, and
each bomb fails alone with expression_error naming the limit, logged once."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.engine.orchestrator import run_orchestrator
from flowforge_orchestrator.worker.runtime import load_step_types, run_worker
from tests.helpers import free_port, wait_for
from tests.integration.conftest import Engine

GOOD = """
name: good
version: 1
steps:
  - {id: double, type: transform, output: "${{ input.n * 2 }}"}
  - id: tags
    type: transform
    output: "${{ input.tags.map(t, t + '!') }}"
  - id: total
    type: transform
    depends_on: [double, tags]
    output: {n: "${{ steps.double.output }}", tags: "${{ steps.tags.output }}"}
"""
# Three nested maps over 150 elements run about a minute: refused on the estimate.
BOMB = """
name: bomb
version: 1
steps:
  - id: explode
    type: transform
    output: "${{ input.l.map(x, input.l.map(y, input.l.map(z, x + y + z))) }}"
"""
# Two nested maps over 400: seconds, not refused on the estimate, stopped by the sandbox.
SLOW = """
name: slow
version: 1
steps:
  - id: grind
    type: transform
    output: "${{ input.l.map(x, input.l.map(y, x * y)) }}"
"""


# Runs in a process of its own: a blocked event loop cannot time itself, and a thread of the
# test's process competes with the engine for the GIL (such a prober missed its 1 s now and
# then on a loaded machine even with no expression at all; a process never did).
PROBE = r"""
import http.client, json, sys, time
port = int(sys.argv[1])
while True:
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        ok = (response.status, response.read()) == (200, b"ok\n")
        outcome = "ok" if ok else f"status {response.status}"
    except OSError as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()
    print(json.dumps([started, time.monotonic() - started, outcome]), flush=True)
    time.sleep(0.02)
"""


@dataclass
class Prober:
    """Asks /healthz every 20 ms from another process; keeps when each answer was asked for
    and how long it took (CLOCK_MONOTONIC is the same in both processes), and failures."""

    port: int
    asked: list[tuple[float, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", PROBE, str(self.port)], stdout=subprocess.PIPE, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            started, took, outcome = json.loads(line)
            if outcome == "ok":
                self.asked.append((started, took))
            else:
                self.failures.append(outcome)

    def stop(self) -> None:
        self._process.kill()
        self._process.wait()
        self._reader.join(timeout=5)
        assert self._process.stdout is not None
        self._process.stdout.close()


@pytest.fixture
async def engine_with_health(settings: Settings) -> AsyncIterator[Engine]:
    """The in-process engine, its orchestrator serving /healthz on a free port."""
    await store.apply_migrations(settings.database_url or "")
    local = settings.model_copy(update={"http_host": "127.0.0.1", "http_port": free_port()})
    stop, ready = asyncio.Event(), asyncio.Event()
    tasks = [
        asyncio.create_task(run_orchestrator(local, stop, ready=ready)),
        # the worker serves no health port (settings' 0): the port is the orchestrator's
        asyncio.create_task(run_worker(settings, load_step_types([]), stop=stop)),
    ]
    await asyncio.wait_for(ready.wait(), timeout=20)
    conn = await store.connect(local.database_url or "")
    try:
        yield Engine(local, conn)
    finally:
        await conn.close()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_cel_bombs_among_good_runs(
    engine_with_health: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    engine = engine_with_health
    caplog.set_level(logging.ERROR)
    for text in (GOOD, BOMB, SLOW):
        await engine.register(text)
    prober = Prober(engine.settings.http_port)
    try:
        await wait_for(lambda: prober.asked, message="/healthz never answered")
        submitted = time.monotonic()
        good = [await engine.submit("good", {"n": i, "tags": [f"t{i}", "x"]}) for i in range(25)]
        bomb = await engine.submit("bomb", {"l": list(range(150))})
        slow = await engine.submit("slow", {"l": list(range(400))})
        good += [
            await engine.submit("good", {"n": i, "tags": [f"t{i}", "x"]}) for i in range(25, 50)
        ]
        finished = {run_id: await engine.finished(run_id, timeout=60) for run_id in good}
        bombed, slowed = await engine.finished(bomb, 60), await engine.finished(slow, 60)
        done = time.monotonic()
        await wait_for(lambda: prober.asked[-1][0] > done, message="no probe after the runs")
    finally:
        prober.stop()

    for i, run_id in enumerate(good):
        assert finished[run_id]["status"] == "completed"
        assert finished[run_id]["output"] == {"total": {"n": 2 * i, "tags": [f"t{i}!", "x!"]}}

    for row, step, limit in [
        (bombed, "explode", "refused before evaluation"),
        (slowed, "grind", "evaluation ran past FLOWFORGE_EXPRESSION_TIMEOUT (100 ms)"),
    ]:
        assert row["status"] == "failed"
        error = row["error"]
        assert error["category"] == "expression_error", error
        assert error["step_id"] == step
        assert limit in error["message"]
        assert "FLOWFORGE_EXPRESSION_TIMEOUT (100 ms)" in error["message"]
        assert f"step '{step}'" in error["message"]

    for run_id in (bomb, slow):
        logged = [
            r
            for r in caplog.records
            if r.levelno >= logging.ERROR and getattr(r, "run_id", None) == str(run_id)
        ]
        assert len(logged) == 1, [r.getMessage() for r in logged]
        assert "expression over its limits" in logged[0].getMessage()

    # Asked every 20 ms from before the first run was submitted until after the last one
    # finished: a loop blocked for a second would have made one of them wait that long.
    assert prober.failures == []
    assert prober.asked[0][0] < submitted
    assert max(took for _, took in prober.asked) < 1.0
