"""Concurrency limits through the engine: real PostgreSQL, Redis, worker, and a real local
HTTP endpoint that counts the requests it holds at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from uuid import UUID

import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.engine.orchestrator import run_orchestrator
from tests.helpers import wait_for
from tests.integration.conftest import Engine


class Endpoint:
    """An HTTP/1.1 server on 127.0.0.1 that holds every request until the test releases it
    (by path), and counts how many it holds at once."""

    def __init__(self) -> None:
        self.arrived: list[str] = []  # request paths, in order of arrival
        self.in_flight = 0
        self.most = 0
        self._gates: dict[str, asyncio.Future[int]] = {}
        self.url = ""

    def _gate(self, path: str) -> asyncio.Future[int]:
        return self._gates.setdefault(path, asyncio.get_running_loop().create_future())

    def release(self, path: str, status: int = 200) -> None:
        """Answer the request for `path` (now, or as soon as it comes) with `status`."""
        gate = self._gate(path)
        if not gate.done():
            gate.set_result(status)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            self.arrived.append(path)
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            try:
                status = await self._gate(path)
            finally:
                self.in_flight -= 1  # before the response leaves: the run cannot be done yet
            body = b'{"ok": true}'
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    found = Endpoint()
    server = await asyncio.start_server(found.serve, "127.0.0.1", 0)
    found.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield found
    finally:
        for gate in found._gates.values():
            if not gate.done():
                gate.set_result(503)
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def another_orchestrator(settings: Settings) -> AsyncIterator[None]:
    """A second replica in this process, with a node id of its own."""
    stop, ready = asyncio.Event(), asyncio.Event()
    replica = settings.model_copy(update={"node_id": "second-replica"})
    task = asyncio.create_task(run_orchestrator(replica, stop, ready=ready))
    await asyncio.wait_for(ready.wait(), timeout=20)
    try:
        yield
    finally:
        stop.set()
        await task


def _workflow(name: str, url: str, limits: str) -> str:
    return f"""
name: {name}
version: 1
{limits}
steps:
  - id: call
    type: http
    with: {{url: "{url}/{name}/${{{{ input.n }}}}"}}
"""


async def _count(engine: Engine, status: str) -> int:
    query = "SELECT count(*) FROM flowforge.runs WHERE status = $1"
    return int(await engine.conn.fetchval(query, status))


async def _waiting(engine: Engine, run_id: UUID) -> bool:
    query = "SELECT waiting FROM flowforge.runs WHERE id = $1"
    return bool(await engine.conn.fetchval(query, run_id))


@pytest.mark.parametrize("orchestrators", [1, 2])
async def test_a_limit_of_two_lets_two_runs_at_a_time_into_the_endpoint(
    engine: Engine, endpoint: Endpoint, orchestrators: int
) -> None:
    async with contextlib.AsyncExitStack() as replicas:
        if orchestrators == 2:
            await replicas.enter_async_context(another_orchestrator(engine.settings))
        await engine.register(_workflow("limited", endpoint.url, "max_concurrency: 2"))
        ids = [await engine.submit("limited", {"n": n}) for n in range(10)]

        for done in range(10):
            # `done` requests answered: the next one (if any) has come in, and no other.
            def next_one_in(done: int = done) -> bool:
                return len(endpoint.arrived) == min(done + 2, 10) and endpoint.in_flight == min(
                    2, 10 - done
                )

            await wait_for(next_one_in)
            assert await _count(engine, "running") <= 2
            endpoint.release(endpoint.arrived[done])
        runs = [await engine.finished(run_id) for run_id in ids]

        assert [r["status"] for r in runs] == ["completed"] * 10
        assert endpoint.most == 2
        if orchestrators == 1:  # FIFO: every run that waited started in order of creation
            assert sorted(endpoint.arrived[:2]) == ["/limited/0", "/limited/1"]
            assert endpoint.arrived[2:] == [f"/limited/{n}" for n in range(2, 10)]
        assert await store.concurrency_slots(engine.conn, "workflow:limited") == []
        assert await store.concurrency_queue(engine.conn, "workflow:limited") == []
        owners = await engine.conn.fetch("SELECT DISTINCT owner FROM flowforge.runs")
        assert len(owners) <= orchestrators


KEYED = "concurrency: {key: 'input.customer', limit: 1}"


async def test_a_key_is_shared_across_workflows_and_only_by_equal_values(
    engine: Engine, endpoint: Endpoint
) -> None:
    await engine.register(_workflow("orders", endpoint.url, KEYED))
    await engine.register(_workflow("refunds", endpoint.url, KEYED))
    first = await engine.submit("orders", {"n": 1, "customer": "c1"})
    same_key = await engine.submit("refunds", {"n": 2, "customer": "c1"})
    other_key = await engine.submit("orders", {"n": 3, "customer": "c2"})

    # c1's refund waits for c1's order; c2's order does not share c1's slot.
    await wait_for(lambda: len(endpoint.arrived) == 2)
    assert sorted(endpoint.arrived) == ["/orders/1", "/orders/3"]
    await wait_for(lambda: _waiting(engine, same_key))
    assert await store.concurrency_queue(engine.conn, 'key:"c1"') == [same_key]
    assert await store.concurrency_slots(engine.conn, 'key:"c1"') == [first]

    endpoint.release("/orders/1")
    await wait_for(lambda: len(endpoint.arrived) == 3)
    assert endpoint.arrived[2] == "/refunds/2"
    assert (await engine.finished(first))["status"] == "completed"
    for path in ("/refunds/2", "/orders/3"):
        endpoint.release(path)
    for run_id in (same_key, other_key):
        assert (await engine.finished(run_id))["status"] == "completed"
    assert endpoint.most == 2


async def test_a_failed_run_frees_its_slot(engine: Engine, endpoint: Endpoint) -> None:
    await engine.register(_workflow("single", endpoint.url, "max_concurrency: 1"))
    failing = await engine.submit("single", {"n": 1})
    next_one = await engine.submit("single", {"n": 2})
    await wait_for(lambda: endpoint.arrived == ["/single/1"])
    await wait_for(lambda: _waiting(engine, next_one))

    endpoint.release("/single/1", status=400)  # not retried: the run fails

    assert (await engine.finished(failing))["status"] == "failed"
    await wait_for(lambda: endpoint.arrived == ["/single/1", "/single/2"])
    endpoint.release("/single/2")
    assert (await engine.finished(next_one))["status"] == "completed"
    assert await store.concurrency_slots(engine.conn, "workflow:single") == []


async def test_a_key_that_cannot_be_evaluated_fails_the_run_and_holds_nothing(
    engine: Engine, endpoint: Endpoint
) -> None:
    await engine.register(_workflow("orders", endpoint.url, KEYED))
    broken = await engine.submit("orders", {"n": 1})  # no customer
    fine = await engine.submit("orders", {"n": 2, "customer": "c1"})
    endpoint.release("/orders/2")

    run = await engine.finished(broken)
    assert run["status"] == "failed"
    assert run["error"]["category"] == "expression_error"
    assert "concurrency.key" in run["error"]["message"]
    assert "input.customer" in run["error"]["message"]
    assert (await engine.finished(fine))["status"] == "completed"
    assert endpoint.arrived == ["/orders/2"]


async def test_a_waiting_run_can_be_cancelled(engine: Engine, endpoint: Endpoint) -> None:
    await engine.register(_workflow("single", endpoint.url, "max_concurrency: 1"))
    holder = await engine.submit("single", {"n": 1})
    waiter = await engine.submit("single", {"n": 2})
    last = await engine.submit("single", {"n": 3})
    await wait_for(lambda: _waiting(engine, last))

    await store.request_cancel(engine.conn, waiter)

    run = await engine.finished(waiter)
    assert run["status"] == "cancelled"
    assert await store.concurrency_queue(engine.conn, "workflow:single") == [last]
    endpoint.release("/single/1")
    endpoint.release("/single/3")
    for run_id in (holder, last):
        assert (await engine.finished(run_id))["status"] == "completed"
    assert endpoint.arrived == ["/single/1", "/single/3"]
