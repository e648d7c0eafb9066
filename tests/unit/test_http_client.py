"""The worker's HTTP client checks each connection at connect time, on the resolved address.

Denied destinations are shown refused before any connection: a recording network backend
proves nothing was attempted; only 127.0.0.1 (a real server of the test) is ever reached.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx
import pytest

from flowforge_orchestrator.core.destinations import DestinationPolicy
from flowforge_orchestrator.errors import StepError
from flowforge_orchestrator.worker.steps.http import run_http_step
from flowforge_orchestrator.worker.steps.http_client import (
    GuardedBackend,
    Resolver,
    make_http_client,
)

LOOPBACK_ALLOWED = DestinationPolicy.parse(allow="127.0.0.0/8")


@dataclass
class Recording(httpcore.AsyncNetworkBackend):
    """Wraps a backend (the real one by default) and records every connection asked of it."""

    inner: httpcore.AsyncNetworkBackend = field(default_factory=httpcore.AnyIOBackend)
    connects: list[tuple[str, int]] = field(default_factory=list)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connects.append((host, port))
        return await self.inner.connect_tcp(host, port, timeout, local_address, socket_options)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class TlsProbe(httpcore.AsyncNetworkBackend, httpcore.AsyncNetworkStream):
    """Connects nowhere; records the TLS server name it is asked for, then fails."""

    def __init__(self) -> None:
        self.connects: list[str] = []
        self.server_names: list[str | None] = []

    async def connect_tcp(self, host: str, port: int, *args: Any, **kw: Any) -> TlsProbe:
        self.connects.append(host)
        return self

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.server_names.append(server_hostname)
        raise httpcore.ConnectError("the probe stops here")

    async def aclose(self) -> None:
        pass

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def resolver(*answers: Sequence[str]) -> tuple[Resolver, list[str]]:
    """A resolver giving `answers` in turn (the last one again after), and the names asked."""
    asked: list[str] = []

    async def resolve(host: str, port: int) -> Sequence[str]:
        asked.append(host)
        return answers[min(len(asked), len(answers)) - 1]

    return resolve, asked


@dataclass
class Server:
    port: int
    requests: list[bytes]


@asynccontextmanager
async def echo_server(close: bool = False) -> AsyncIterator[Server]:
    """A real HTTP/1.1 server on 127.0.0.1 that records each request head."""
    server_state = Server(0, [])

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                server_state.requests.append(head)
                extra = b"Connection: close\r\n" if close else b""
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + extra + b"\r\nok")
                await writer.drain()
                if close:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    server_state.port = server.sockets[0].getsockname()[1]
    try:
        yield server_state
    finally:
        server.close()
        await server.wait_closed()


async def get(client: httpx.AsyncClient, url: str, **params: Any) -> dict[str, Any]:
    return await run_http_step(
        {"url": url, **params}, client=client, default_timeout=5.0, max_body_bytes=1024
    )


async def get_error(client: httpx.AsyncClient, url: str, **params: Any) -> StepError:
    with pytest.raises(StepError) as info:
        await get(client, url, **params)
    return info.value


async def test_a_name_that_resolves_to_a_denied_address_is_refused_before_connecting() -> None:
    resolve, asked = resolver(["169.254.169.254"])
    backend = Recording()
    async with make_http_client(
        DestinationPolicy(), resolver=resolve, network_backend=backend
    ) as client:
        error = await get_error(client, "http://metadata.attacker.test/latest?token=S3CR3T")
    assert (error.category, error.retryable) == ("destination_denied", False)
    assert "metadata.attacker.test (169.254.169.254) is denied: link-local" in error.message
    assert "S3CR3T" not in error.message
    assert error.details["host"] == "metadata.attacker.test"
    assert error.details["address"] == "169.254.169.254"
    assert backend.connects == []  # nothing was attempted
    assert asked == ["metadata.attacker.test"]


async def test_one_denied_address_among_several_refuses_the_connection() -> None:
    resolve, _ = resolver(["10.0.0.5", "127.0.0.1"])
    backend = Recording()
    async with make_http_client(
        DestinationPolicy(), resolver=resolve, network_backend=backend
    ) as client:
        error = await get_error(client, "http://mixed.test/")
    assert error.category == "destination_denied" and "loopback" in error.message
    assert backend.connects == []


@pytest.mark.parametrize(
    "host",
    ["2130706433", "0x7f.1", "127.1", "017700000001", "[::ffff:127.0.0.1]", "0.0.0.0", "localhost"],
)
async def test_loopback_in_any_spelling_is_refused_with_the_system_resolver(host: str) -> None:
    backend = Recording()
    async with make_http_client(DestinationPolicy(), network_backend=backend) as client:
        error = await get_error(client, f"http://{host}:9/")
    assert error.category == "destination_denied"
    assert ("loopback" in error.message) or ("unspecified" in error.message)
    assert backend.connects == []


async def test_an_allowed_name_is_connected_by_its_checked_address() -> None:
    resolve, asked = resolver(["127.0.0.1"])
    backend = Recording()
    async with (
        echo_server() as server,
        make_http_client(LOOPBACK_ALLOWED, resolver=resolve, network_backend=backend) as client,
    ):
        result = await get(client, f"http://api.test:{server.port}/hello")
    assert result["status"] == 200
    assert backend.connects == [("127.0.0.1", server.port)]  # the address, not the name
    assert asked == ["api.test"]
    assert f"Host: api.test:{server.port}".encode() in server.requests[0]


async def test_rebinding_cannot_swap_the_address_of_a_new_connection() -> None:
    # The name first resolves to an allowed address, then to the metadata address.
    resolve, asked = resolver(["127.0.0.1"], ["169.254.169.254"])
    backend = Recording()
    async with (
        echo_server(close=True) as server,
        make_http_client(LOOPBACK_ALLOWED, resolver=resolve, network_backend=backend) as client,
    ):
        first = await get(client, f"http://rebind.test:{server.port}/a")
        error = await get_error(client, f"http://rebind.test:{server.port}/b")
    assert first["status"] == 200
    assert error.category == "destination_denied" and "169.254.169.254" in error.message
    assert asked == ["rebind.test", "rebind.test"]  # resolved once per connection
    assert backend.connects == [("127.0.0.1", server.port)]
    assert len(server.requests) == 1


async def test_tls_verifies_the_host_name_not_the_address() -> None:
    resolve, _ = resolver(["127.0.0.1"])
    probe = TlsProbe()
    async with make_http_client(
        LOOPBACK_ALLOWED, resolver=resolve, network_backend=probe
    ) as client:
        error = await get_error(client, "https://api.test/")
    assert error.category == "connection_error"
    assert probe.connects == ["127.0.0.1"]
    assert probe.server_names == ["api.test"]


async def test_the_next_address_is_tried_when_one_refuses() -> None:
    # Nothing listens on 127.0.0.2 (the server is bound to 127.0.0.1 only).
    resolve, _ = resolver(["127.0.0.2", "127.0.0.1"])
    backend = Recording()
    async with (
        echo_server() as server,
        make_http_client(LOOPBACK_ALLOWED, resolver=resolve, network_backend=backend) as client,
    ):
        result = await get(client, f"http://two.test:{server.port}/")
    assert result["status"] == 200
    assert backend.connects == [("127.0.0.2", server.port), ("127.0.0.1", server.port)]


async def test_a_name_that_does_not_resolve_is_a_retryable_connection_error() -> None:
    async def no_such_name(host: str, port: int) -> Sequence[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def nothing(host: str, port: int) -> Sequence[str]:
        return []

    for resolve in (no_such_name, nothing):
        async with make_http_client(DestinationPolicy(), resolver=resolve) as client:
            error = await get_error(client, "http://nowhere.test/")
        assert (error.category, error.retryable) == ("connection_error", True)
        assert "nowhere.test" in error.message


async def test_a_resolver_that_hangs_is_bounded_by_the_timeout() -> None:
    async def hang(host: str, port: int) -> Sequence[str]:
        await asyncio.Event().wait()
        return []

    async with make_http_client(DestinationPolicy(), resolver=hang) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        error = await get_error(client, "http://slow-dns.test/", timeout=0.2)
        assert loop.time() - started < 2.0
    assert (error.category, error.retryable) == ("timeout", True)


async def test_proxies_from_the_environment_are_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # Were the proxy used, the request would go to this closed port and fail.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{closed}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    backend = Recording()
    async with (
        echo_server() as server,
        make_http_client(LOOPBACK_ALLOWED, network_backend=backend) as client,
    ):
        result = await get(client, f"http://127.0.0.1:{server.port}/direct")
    assert result["status"] == 200
    assert backend.connects == [("127.0.0.1", server.port)]
    assert b"GET /direct HTTP/1.1" in server.requests[0]


async def test_unix_sockets_are_refused() -> None:
    backend = GuardedBackend(DestinationPolicy())
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_unix_socket("/tmp/anything.sock")
