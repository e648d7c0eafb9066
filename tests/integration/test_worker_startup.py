"""A worker started while PostgreSQL is unreachable waits for it instead of exiting."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from flowforge_orchestrator import store
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.worker.runtime import run_worker
from tests.helpers import free_port, wait_for
from tests.integration.conftest import Steps


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) > 1 else host))


@contextlib.asynccontextmanager
async def _forwarder(port: int, target: str) -> AsyncIterator[None]:
    """A TCP relay from `port` to the real database: the database 'comes back'."""
    parts = urlsplit(target)
    host, dest = parts.hostname or "127.0.0.1", parts.port or 5432

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, dest)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()


async def test_a_worker_waits_for_the_database_to_come_up(
    settings: Settings, steps: Steps, caplog: pytest.LogCaptureFixture
) -> None:
    await store.apply_migrations(settings.database_url or "")
    port = free_port()
    down = settings.model_copy(
        update={"database_url": _with_port(settings.database_url or "", port)}
    )
    stop, ready = asyncio.Event(), asyncio.Event()
    caplog.set_level(logging.WARNING)
    task = asyncio.create_task(
        run_worker(down, {"echo": steps.echo}, stop=stop, ready=ready, serve_http=False)
    )
    try:
        await wait_for(
            lambda: task.done() or "retrying" in caplog.text,
            message="the worker neither retried nor exited",
        )
        assert not task.done(), task.exception()
        async with _forwarder(port, settings.database_url or ""):
            await wait_for(ready.is_set, timeout=20, message="the worker never became ready")
            conn = await store.connect(settings.database_url or "")
            try:
                served = await conn.fetchval(
                    "SELECT count(*) FROM flowforge.step_types WHERE name = 'echo'"
                )
            finally:
                await conn.close()
            assert served == 1
            stop.set()
            await asyncio.wait_for(task, 20)
    finally:
        stop.set()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
