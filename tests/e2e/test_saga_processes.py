"""A saga's compensations survive the death of the orchestrator running them: real
`flowforge-orchestrator run` and `worker` processes, http steps calling a server of the test
on loopback, which counts every call and holds the first compensation until told."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from tests.e2e.test_processes import Cluster, Process
from tests.e2e.test_processes import cluster as cluster  # the fixture

ALLOW = {"FLOWFORGE_HTTP_ALLOW": "127.0.0.0/8"}  # the test's server is on 127.0.0.1

SAGA = """
name: saga-kill
version: 1
steps:
  - id: reserve
    type: http
    with: {method: POST, url: "BASE/do/reserve"}
    compensate:
      - {id: release, type: http, with: {method: POST, url: "BASE/undo/release"}}
  - id: charge
    type: http
    depends_on: [reserve]
    with: {method: POST, url: "BASE/do/charge"}
    compensate:
      - id: refund
        type: http
        with: {method: POST, url: "BASE/hold/refund", json: {why: "${{ error.message }}"}}
  - id: ship
    type: http
    depends_on: [charge]
    retry: {max_retries: 0}
    with: {method: POST, url: "BASE/fail/ship"}
  - id: notify
    type: http
    depends_on: [ship]
    with: {method: POST, url: "BASE/do/notify"}
    compensate:
      - {id: unnotify, type: http, with: {method: POST, url: "BASE/undo/unnotify"}}
"""


@dataclass
class CountingServer:
    """Answers every request 200 `{}`, but `/fail/...` 500 and `/hold/...` only once
    `release` is set; counts requests by path."""

    calls: Counter[str] = field(default_factory=Counter)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            length = next(
                (int(h.split(":", 1)[1]) for h in lines if h.lower().startswith("content-length")),
                0,
            )
            await reader.readexactly(length)
            self.calls[path] += 1
            if path.startswith("/hold/"):
                await self.release.wait()
            status = "500 Internal Server Error" if path.startswith("/fail/") else "200 OK"
            body = b"{}"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        writer.close()


@pytest.fixture
async def server() -> AsyncIterator[CountingServer]:
    counting = CountingServer()
    listener = await asyncio.start_server(counting.handle, "127.0.0.1", 0)
    counting.port = listener.sockets[0].getsockname()[1]
    try:
        yield counting
    finally:
        counting.release.set()
        listener.close()


async def orchestrator(cluster: Cluster, node: str) -> Process:
    return await cluster.start(
        f"orchestrator-{node}",
        ["run"],
        f"orchestrator {node} running",
        FLOWFORGE_NODE_ID=node,
        FLOWFORGE_LEASE_SECONDS="2",
        **ALLOW,
    )


async def test_an_orchestrator_killed_while_compensating_is_replaced_and_each_runs_once(
    cluster: Cluster, server: CountingServer
) -> None:
    await cluster.start(
        "worker-w",
        ["worker", "--types-module", "tests.e2e.steps_fixture"],
        "worker w serving step types",
        FLOWFORGE_NODE_ID="w",
        **ALLOW,
    )
    orchestrator_a = await orchestrator(cluster, "a")
    await cluster.register(SAGA.replace("BASE", f"http://127.0.0.1:{server.port}"))
    run_id = await cluster.submit("saga-kill", {})

    # ship failed; charge's compensation (the later completion) is in the worker's hands.
    await cluster.until(lambda: server.calls["/hold/refund"] == 1, "refund was never called")
    run = await cluster.run(run_id)
    assert run["status"] == "running" and run["owner"] == "a"
    events = [e["type"] for e in await cluster.outbox(run_id)]
    assert "workflow.compensating" in events and "step.compensated" not in events

    assert orchestrator_a.kill() == -signal.SIGKILL
    await orchestrator(cluster, "b")
    await cluster.wait_run(run_id, lambda r: r["owner"] == "b", "was not adopted by b")
    server.release.set()  # refund answers now: its result reaches b
    run = await cluster.finished(run_id, timeout=30)

    assert run["status"] == "failed"
    assert run["error"]["step_id"] == "ship"
    assert run["error"]["compensation"] == {
        "steps": {"charge": "compensated", "reserve": "compensated"}
    }
    # Each compensation ran exactly once, in reverse order; notify never ran, nor its undo.
    assert server.calls == Counter(
        {
            "/do/reserve": 1,
            "/do/charge": 1,
            "/fail/ship": 1,
            "/hold/refund": 1,
            "/undo/release": 1,
        }
    )
    outbox = await cluster.outbox(run_id)
    phase = [(e["type"], e["data"].get("step_id")) for e in outbox if "compensat" in e["type"]]
    assert phase == [
        ("workflow.compensating", None),
        ("step.compensating", "charge"),
        ("step.compensated", "charge"),
        ("step.compensating", "reserve"),
        ("step.compensated", "reserve"),
    ]
    assert [e["seq"] for e in outbox] == list(range(1, len(outbox) + 1))
    assert await cluster.count("step_results", run_id, "refund") == 1
    assert await cluster.count("step_attempts", run_id, "refund") == 1
