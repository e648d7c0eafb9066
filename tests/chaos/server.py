"""The HTTP server the chaos run's steps call: asyncio, in the chaos process.

It fails some requests with 503 (so retries happen), slows some down and stalls a few past
the step timeout (so attempts time out), and counts what it served:

* `tracked_http` requests carry their attempt id (`tests.chaos.steps`): `executions` counts
  them per attempt, exactly;
* built-in `http` requests name their run and step in the path (`/http/<run>/<step>`,
  `/items/<run>`): `plain` counts them per (run, step), to compare with the attempts the
  engine recorded.

Whether a request fails is decided by the seed and what the request is (run, step, attempt
number), not by arrival order, so a replay with the same seed makes the same decisions.

Routes: `POST /work/<label>` and `POST /http/<run>/<step>` echo `{"x": ...}` of the JSON
body; `GET /items/<run>?n=N` gives `{"items": [0..N-1]}`; `POST /fail/<label>` is always 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from tests.chaos.steps import ATTEMPT_HEADER, RUN_HEADER, STEP_HEADER, TRY_HEADER

__all__ = ["FaultServer", "Faults"]

_REASONS = {200: "OK", 404: "Not Found", 500: "Internal Server Error", 503: "Unavailable"}


@dataclass(frozen=True)
class Faults:
    """Shares of requests answered 503, slowed down, and stalled past the step timeout."""

    fail: float = 0.15
    slow: float = 0.10
    stall: float = 0.02
    slow_seconds: tuple[float, float] = (0.1, 0.8)
    stall_seconds: float = 3.0


@dataclass
class Tracked:
    """One attempt of a `tracked_http` step, as the server saw it."""

    run_id: str
    step_id: str
    attempt: int
    served: list[float] = field(default_factory=list)  # wall-clock time of each request


@dataclass
class FaultServer:
    """`async with FaultServer(seed) as server:`; `server.url` is its base URL."""

    seed: int
    faults: Faults = field(default_factory=Faults)
    tracked: dict[str, Tracked] = field(default_factory=dict)  # by attempt id
    # (run id, step key) -> wall-clock time of each request
    plain: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    answered: Counter[int] = field(default_factory=Counter)  # by status
    url: str = ""
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):  # 3.11's wait_closed does not wait for connections
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- HTTP/1.1, just enough for httpx (keep-alive, Content-Length bodies) -----------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while await self._exchange(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # a killed worker's connection, or a request we cannot parse
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        line = await reader.readline()
        if not line:
            return False
        method, target, _ = line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, value = header.decode("latin-1").split(":", 1)
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length") or 0))
        status, payload = await self._handle(method, target, headers, body)
        self.answered[status] += 1
        data = json.dumps(payload).encode()
        head = f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
        writer.write(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()
        return True

    # -- routes ------------------------------------------------------------------------------

    async def _handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, Any]:
        url = urlsplit(target)
        parts = url.path.strip("/").split("/")
        key = self._count(parts, headers)
        if parts[0] == "fail":
            return 500, {"error": "this endpoint always fails"}
        if parts[0] not in ("work", "http", "items"):
            return 404, {"error": f"no route {method} {url.path}"}
        decided = random.Random(f"{self.seed}:{key}").random()
        faults = self.faults
        if decided < faults.fail:
            return 503, {"error": "injected failure"}
        if decided < faults.fail + faults.slow:
            low, high = faults.slow_seconds
            await asyncio.sleep(low + (high - low) * (decided - faults.fail) / faults.slow)
        elif decided < faults.fail + faults.slow + faults.stall:
            await asyncio.sleep(faults.stall_seconds)
        if parts[0] == "items":
            n = int(parse_qs(url.query).get("n", ["0"])[0])
            return 200, {"items": list(range(n))}
        sent = json.loads(body) if body else {}
        return 200, {"x": sent.get("x") if isinstance(sent, dict) else None}

    def _count(self, parts: list[str], headers: dict[str, str]) -> str:
        """Record the request; the key its fault decision is drawn for."""
        attempt_id = headers.get(ATTEMPT_HEADER)
        if attempt_id is not None:
            seen = self.tracked.get(attempt_id)
            if seen is None:
                seen = Tracked(headers[RUN_HEADER], headers[STEP_HEADER], int(headers[TRY_HEADER]))
                self.tracked[attempt_id] = seen
            seen.served.append(time.time())
            return f"{seen.run_id}:{seen.step_id}:{seen.attempt}"
        if parts[0] == "http" and len(parts) == 3:
            where = (parts[1], parts[2])
        elif parts[0] == "items" and len(parts) == 2:
            where = (parts[1], "items")
        else:
            return "/".join(parts)
        served = self.plain.setdefault(where, [])
        served.append(time.time())
        return f"{where[0]}:{where[1]}:{len(served)}"
