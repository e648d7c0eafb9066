"""A small HTTP server for probes and scrapes: `/healthz`, `/readyz`, `/metrics`.

Three GET routes do not need a web framework: this is asyncio streams, one request per
connection (`Connection: close`), which every probe and Prometheus scraper handles.

* `/healthz`: 200 whenever the event loop answers; a blocked loop fails the probe by itself.
* `/readyz`: runs every readiness check at once, each under a timeout; 200 when all pass,
  else 503. The JSON body names each check and, for a failing one, why. The report is
  kept for `cache_seconds`, and probes that arrive while it is made wait for that one: a
  storm of probes costs one round of checks per interval, not one per probe.
* `/metrics`: the registry in the Prometheus text format (OpenMetrics when the scraper asks
  for it), by prometheus_client's own encoder.

A readiness check is an async callable: returning None or True means ready; returning False
or a string (the reason), or raising, means not ready. `database_check`, `redis_check`,
`listening_check` and `migrations_check` build the usual ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.errors import ConfigError

__all__ = [
    "HealthServer",
    "ReadinessCheck",
    "database_check",
    "listening_check",
    "migrations_check",
    "redis_check",
    "serve_health",
]

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Awaitable[object]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
_MAX_HEADERS = 100


def database_check(ping: Callable[[], Awaitable[object]]) -> ReadinessCheck:
    """PostgreSQL answers (`store.answers`: a round trip on a pooled connection)."""

    async def check() -> None:
        await ping()

    return check


def redis_check(ping: Callable[[], Awaitable[object]]) -> ReadinessCheck:
    """Redis answers a PING (e.g. `Dispatcher.ping`, or an arq pool's `ping`)."""

    async def check() -> object:
        return bool(await ping()) or "Redis did not answer PING"

    return check


def listening_check(connected: asyncio.Event) -> ReadinessCheck:
    """The LISTEN connection is up (the listener sets and clears `connected`)."""

    async def check() -> object:
        return connected.is_set() or "the LISTEN connection is down"

    return check


def migrations_check(missing: Callable[[], Awaitable[list[str]]]) -> ReadinessCheck:
    """The database has exactly the migrations this code knows (`store.missing_migrations`:
    on a pooled connection, so a probe never opens a connection of its own)."""

    async def check() -> object:
        names = await missing()
        return f"migrations not applied: {', '.join(names)}" if names else True

    return check


async def _run_check(check: ReadinessCheck, timeout: float) -> str | None:
    """None when the check passes, else the reason it does not."""
    try:
        async with asyncio.timeout(timeout):
            outcome = await check()
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if outcome is None or outcome is True:
        return None
    if isinstance(outcome, str):
        return outcome
    return "not ready"


class HealthServer:
    """`async with HealthServer(...) as server:` serves until the block ends.

    `port=0` binds a free port (read it back from `server.port`); `registry=None` serves no
    `/metrics`.
    """

    def __init__(
        self,
        *,
        host: str = "0.0.0.0",
        port: int = 9464,
        registry: CollectorRegistry | None = None,
        checks: Mapping[str, ReadinessCheck] | None = None,
        check_timeout: float = 2.0,
        request_timeout: float = 5.0,
        cache_seconds: float = 1.0,
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.checks = dict(checks or {})
        self.check_timeout = check_timeout
        self.request_timeout = request_timeout
        self.cache_seconds = cache_seconds
        self._report: tuple[float, tuple[bool, dict[str, str]]] | None = None  # (at, report)
        self._checking: asyncio.Task[tuple[bool, dict[str, str]]] | None = None
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[object], asyncio.StreamWriter] = {}

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> HealthServer:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve health and metrics on {self.host}:{self.port}: {exc} "
                "(set FLOWFORGE_HTTP_PORT to another port, or 0 to disable)"
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("serving /healthz, /readyz and /metrics on %s", self.url)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Abort open connections rather than cancel their handlers: each handler then sees
        # the end of its stream and returns (a cancelled one is logged as an error by 3.11).
        for writer in self._connections.values():
            writer.transport.abort()
        await asyncio.gather(*self._connections, return_exceptions=True)
        # A round of checks outlives the request that started it; not the server: what it
        # checks (pools, connections) is closed next.
        checking, self._checking = self._checking, None
        if checking is not None:
            checking.cancel()
            await asyncio.gather(checking, return_exceptions=True)
        await server.wait_closed()

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        """(all passed, {name: "ok" or the reason}): the last report if it is fresh, else
        the round of checks under way, else a new one."""
        now = asyncio.get_running_loop().time()
        if self._report is not None and now - self._report[0] < self.cache_seconds:
            return self._report[1]
        if self._checking is None or self._checking.done():
            self._checking = asyncio.create_task(self._check_all())
        return await asyncio.shield(self._checking)

    async def _check_all(self) -> tuple[bool, dict[str, str]]:
        """Run every check concurrently."""
        names = list(self.checks)
        reasons = await asyncio.gather(
            *(_run_check(self.checks[name], self.check_timeout) for name in names)
        )
        report = {name: reason or "ok" for name, reason in zip(names, reasons, strict=True)}
        outcome = all(reason is None for reason in reasons), report
        self._report = asyncio.get_running_loop().time(), outcome
        return outcome

    # -- HTTP ----------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            async with asyncio.timeout(self.request_timeout):
                request = await self._read_request(reader)
                if request is None:
                    response = self._response(400, "text/plain", b"bad request\n")
                else:
                    response = await self._route(*request)
                writer.write(response)
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a client that went away or never finished its request
        finally:
            self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _read_request(
        reader: asyncio.StreamReader,
    ) -> tuple[str, str, dict[str, str]] | None:
        """(method, path, headers) of one request, or None when it is malformed."""
        try:
            first = await reader.readline()
            if not first:
                raise ConnectionResetError("closed before a request")
            parts = first.decode("latin-1").split()
            headers: dict[str, str] = {}
            for _ in range(_MAX_HEADERS):
                line = (await reader.readline()).decode("latin-1")
                if line in ("\r\n", "\n", ""):
                    break
                name, sep, value = line.partition(":")
                if not sep:
                    return None
                headers[name.strip().lower()] = value.strip()
            else:
                return None
        except ValueError:  # a line over the stream's limit
            return None
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return None
        return parts[0].upper(), parts[1].split("?", 1)[0], headers

    async def _route(self, method: str, path: str, headers: dict[str, str]) -> bytes:
        if path not in ("/healthz", "/readyz", "/metrics") or (
            path == "/metrics" and self.registry is None
        ):
            return self._response(404, "text/plain", b"not found\n", head=method == "HEAD")
        if method not in ("GET", "HEAD"):
            return self._response(405, "text/plain", b"method not allowed\n", allow="GET, HEAD")
        head = method == "HEAD"
        if path == "/healthz":
            return self._response(200, "text/plain; charset=utf-8", b"ok\n", head=head)
        if path == "/readyz":
            ready, report = await self.readiness()
            body: dict[str, Any] = {"status": "ready" if ready else "not ready", "checks": report}
            if not ready:
                body["failing"] = [name for name, reason in report.items() if reason != "ok"]
            payload = (json.dumps(body, indent=2) + "\n").encode()
            return self._response(200 if ready else 503, "application/json", payload, head=head)
        assert self.registry is not None
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        return self._response(200, content_type, encoder(self.registry), head=head)

    @staticmethod
    def _response(
        status: int, content_type: str, body: bytes, *, head: bool = False, allow: str = ""
    ) -> bytes:
        lines = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        if allow:
            lines.append(f"Allow: {allow}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body)


@asynccontextmanager
async def serve_health(
    settings: Settings,
    registry: CollectorRegistry | None,
    checks: Mapping[str, ReadinessCheck] | None = None,
) -> AsyncIterator[HealthServer | None]:
    """The server on `settings.http_host:http_port`; yields None when the port is 0."""
    if settings.http_port == 0:
        yield None
        return
    async with HealthServer(
        host=settings.http_host, port=settings.http_port, registry=registry, checks=checks
    ) as server:
        yield server
