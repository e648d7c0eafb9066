"""The worker's HTTP client: every connection is checked against the destination policy at
connect time, on the addresses it will really use.

httpx hands connections to httpcore, which asks its network backend to `connect_tcp(host,
port)`. `GuardedBackend` wraps that backend: it resolves the host once, checks every address
it got (one denied address refuses the connection), then connects to those checked addresses
and never to the name, so a DNS answer that changes between check and connect (rebinding)
cannot swap the destination. TLS still verifies the host name: httpcore passes the URL's
host as `server_hostname` (SNI) whatever address the stream is connected to.

Proxies from the environment are off (`trust_env=False`, and httpx ignores them anyway when
given a transport): a proxy would be the only address checked, and would hide the real
destination. Redirects are not followed.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence

import httpcore
import httpx

from flowforge_orchestrator.core.destinations import DestinationPolicy
from flowforge_orchestrator.errors import DestinationDenied

__all__ = ["GuardedBackend", "Resolver", "make_http_client", "system_resolver"]

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)  # httpx's defaults


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses of `host`, in the resolver's order, each once (an IP literal gives
    itself, in whatever form `inet_aton` reads: `2130706433` and `0x7f.1` are 127.0.0.1)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """A network backend that connects only where the policy allows."""

    def __init__(
        self,
        policy: DestinationPolicy,
        *,
        resolver: Resolver = system_resolver,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self.policy = policy
        self._resolver = resolver
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        addresses = await self._resolve(host, port, timeout)
        for address in addresses:
            verdict = self.policy.check(host, address)
            if not verdict.allowed:
                raise DestinationDenied(host=host, address=address, reason=verdict.reason)
        error: Exception | None = None
        for address in addresses:  # as the resolver ordered them, like a plain connect
            left = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=left,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def _resolve(self, host: str, port: int, timeout: float | None) -> Sequence[str]:
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._resolver(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        except OSError as exc:  # socket.gaierror: no such name, no DNS server, ...
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from exc
        if not addresses:
            raise httpcore.ConnectError(f"{host} resolved to no address")
        return addresses

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        # The client never configures one; were it asked, there is no address to check.
        raise httpcore.ConnectError("http steps connect over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (request mapping, errors, streaming) over a pool that uses our
    backend. httpx does not take a network backend, so the pool it built is replaced by one
    built alike; the unit tests show every connection going through the backend."""

    def __init__(self, backend: httpcore.AsyncNetworkBackend, limits: httpx.Limits) -> None:
        ssl_context = httpx.create_ssl_context()  # SSL_CERT_FILE / SSL_CERT_DIR still apply
        super().__init__(verify=ssl_context, trust_env=False, limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )


def make_http_client(
    policy: DestinationPolicy,
    *,
    resolver: Resolver = system_resolver,
    network_backend: httpcore.AsyncNetworkBackend | None = None,
    limits: httpx.Limits = LIMITS,
) -> httpx.AsyncClient:
    """The client http steps use: no proxies, no redirects, every connection checked."""
    backend = GuardedBackend(policy, resolver=resolver, inner=network_backend)
    return httpx.AsyncClient(
        transport=_GuardedTransport(backend, limits),
        trust_env=False,
        follow_redirects=False,
    )
