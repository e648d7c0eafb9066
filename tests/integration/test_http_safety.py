"""Safe http steps through the real orchestrator and worker: a denied destination fails its
run at once, and a URL injection reaches the server as one encoded path segment.

Only servers of the test on 127.0.0.1 are involved; the denied one is denied because loopback
is not allowed in that test, and it counts the connections it gets (none).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from tests.integration.conftest import Engine, start_engine


@dataclass
class EchoServer:
    """A real HTTP/1.1 server on 127.0.0.1: answers each request with its request line."""

    port: int = 0
    connections: int = 0
    targets: list[str] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("ascii")
            self.targets.append(target)
            body = ('{"target": "' + target + '"}').encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def echo_server() -> AsyncIterator[EchoServer]:
    echo = EchoServer()
    server = await asyncio.start_server(echo.handle, "127.0.0.1", 0)
    echo.port = server.sockets[0].getsockname()[1]
    try:
        yield echo
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def engine_with(settings: Settings) -> AsyncIterator[Engine]:
    await store.apply_migrations(settings.database_url or "")
    stop, tasks = await start_engine(settings)
    conn = await store.connect(settings.database_url or "")
    try:
        yield Engine(settings, conn)
    finally:
        await conn.close()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


DENIED = """
name: denied
version: 1
steps:
  - id: call
    type: http
    with: {{url: "http://127.0.0.1:{port}/internal?token=S3CR3T"}}
    # Even a policy that retries everything does not retry a denied destination.
    retry:
      max_retries: 5
      initial_interval: 0.01s
      retry_on: [destination_denied, connection_error]
  - {{id: after, type: transform, depends_on: [call], output: "never"}}
"""


async def test_a_denied_destination_fails_the_run_at_once_without_a_retry(
    settings: Settings,
) -> None:
    # Loopback is denied by default; this test does not allow it (the fixture's default does).
    denying = settings.model_copy(update={"http_allow": None})
    async with echo_server() as server, engine_with(denying) as engine:
        await engine.register(DENIED.format(port=server.port))
        run_id = await engine.submit("denied")
        run = await engine.finished(run_id)
        attempts = await store.run_attempts(engine.conn, run_id)
        events = await engine.events(run_id)

    assert run["status"] == "failed"
    error = run["error"]
    assert (error["category"], error["retryable"], error["step_id"]) == (
        "destination_denied",
        False,
        "call",
    )
    assert "127.0.0.1 is denied: loopback (127.0.0.0/8) is denied by default" in error["message"]
    assert error["details"]["address"] == "127.0.0.1"
    assert "S3CR3T" not in repr(error)
    assert [(a["attempt"], a["status"]) for a in attempts] == [(1, "failed")]
    assert not [e for e in events if e["type"] == "step.retrying"]
    assert server.connections == 0  # refused before connecting


INJECTION = """
name: injection
version: 1
steps:
  - id: call
    type: http
    with:
      url: "http://127.0.0.1:{port}/users/${{{{ input.p }}}}/profile?q=${{{{ input.q }}}}&page=1"
"""


async def test_a_url_injection_reaches_the_server_as_one_encoded_segment(
    settings: Settings,
) -> None:
    async with echo_server() as server, engine_with(settings) as engine:
        await engine.register(INJECTION.format(port=server.port))
        run_id = await engine.submit(
            "injection", {"p": "../../admin/delete?all=1#", "q": "x&page=99"}
        )
        run = await engine.finished(run_id)

    assert run["status"] == "completed", run["error"]
    expected = "/users/..%2F..%2Fadmin%2Fdelete%3Fall%3D1%23/profile?q=x%26page%3D99&page=1"
    assert server.targets == [expected]
    assert run["output"]["call"]["body"] == {"target": expected}
