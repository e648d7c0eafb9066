"""The health server on a real socket, scraped with httpx; checks against real servers."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flowforge_orchestrator import store
from flowforge_orchestrator.client import read_outbox, register_consumer
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.engine.sampler import sample_database
from flowforge_orchestrator.errors import ConfigError
from flowforge_orchestrator.ops.health import (
    HealthServer,
    database_check,
    listening_check,
    migrations_check,
    redis_check,
    serve_health,
)
from flowforge_orchestrator.ops.metrics import OrchestratorMetrics, new_registry
from flowforge_orchestrator.queue.dispatch import Dispatcher
from tests.conftest import Services, database_dsn
from tests.helpers import free_port, migration_names, register_workflows
from tests.integration.conftest import Engine

WORKFLOW = """
name: inline
version: 1
steps:
  - {id: double, type: transform, output: "${{ input.n * 2 }}"}
"""


def _metric(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[store.Pool]:
    p = await store.create_pool(db_url, size=2)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def dispatcher(redis_url: str) -> AsyncIterator[Dispatcher]:
    d = await Dispatcher.connect(redis_url)
    try:
        yield d
    finally:
        await d.close()


async def test_probes_and_readiness_against_real_servers(
    db_url: str, pool: store.Pool, dispatcher: Dispatcher
) -> None:
    listening = asyncio.Event()
    listening.set()
    checks = {
        "database": database_check(functools.partial(store.answers, pool)),
        "redis": redis_check(dispatcher.ping),
        "listen": listening_check(listening),
        "migrations": migrations_check(functools.partial(store.missing_migrations, pool)),
    }
    async with (
        HealthServer(host="127.0.0.1", port=0, checks=checks, cache_seconds=0) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        assert server.port != 0
        healthz = await http.get("/healthz")
        assert (healthz.status_code, healthz.text) == (200, "ok\n")

        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready", "checks": dict.fromkeys(checks, "ok")}

        listening.clear()  # the listener lost its connection
        not_ready = await http.get("/readyz")
        assert not_ready.status_code == 503
        body = not_ready.json()
        assert body["status"] == "not ready" and body["failing"] == ["listen"]
        assert body["checks"]["listen"] == "the LISTEN connection is down"
        assert body["checks"]["database"] == "ok"


async def test_readiness_names_what_fails_and_why(services: Services, template_db: str) -> None:
    async def hangs() -> None:
        await asyncio.Event().wait()

    async def raises() -> None:
        raise ConnectionRefusedError("connection refused")

    async def says_no() -> bool:
        return False

    # the admin database has no flowforge schema at all
    admin = await store.create_pool(database_dsn(services.database_url, "postgres"), size=2)
    checks = {
        "migrations": migrations_check(functools.partial(store.missing_migrations, admin)),
        "slow": hangs,
        "down": raises,
        "no": says_no,
    }
    server = HealthServer(host="127.0.0.1", port=0, checks=checks, check_timeout=0.2)
    try:
        async with server, httpx.AsyncClient(base_url=server.url) as http:
            response = await http.get("/readyz")
    finally:
        await admin.close()
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["migrations", "slow", "down", "no"]
    assert body["checks"] == {
        "migrations": "migrations not applied: " + ", ".join(migration_names()),
        "slow": "no answer within 0.2s",
        "down": "ConnectionRefusedError: connection refused",
        "no": "not ready",
    }


async def test_a_storm_of_probes_costs_one_round_of_checks_per_interval(pool: store.Pool) -> None:
    calls = 0
    database = database_check(functools.partial(store.answers, pool))

    async def counted() -> None:
        nonlocal calls
        calls += 1
        await database()

    checks = {
        "database": counted,
        "migrations": migrations_check(functools.partial(store.missing_migrations, pool)),
    }
    server = HealthServer(host="127.0.0.1", port=0, checks=checks, cache_seconds=60)
    # 100 probes at once, each on its own connection: as many as the backlog asyncio listens
    # with. Beyond it the kernel drops connects and the client sends them again a second or
    # more later, which on a loaded machine ended in connect timeouts. A round per probe
    # would count 100 calls.
    probes = 100
    limits = httpx.Limits(max_connections=probes)
    async with server, httpx.AsyncClient(base_url=server.url, limits=limits) as http:
        answers = await asyncio.gather(*(http.get("/readyz") for _ in range(probes)))
        assert {a.status_code for a in answers} == {200}
        assert calls == 1
        server.cache_seconds = 0  # an old report is not reused: a new round runs
        assert (await http.get("/readyz")).status_code == 200
        assert calls == 2


async def test_metrics_are_served_in_both_formats(pool: store.Pool) -> None:
    metrics = OrchestratorMetrics(new_registry())
    metrics.reconciled("adopted", 2)
    async with HealthServer(host="127.0.0.1", port=0, registry=metrics.registry) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            text = await http.get("/metrics")
            open_metrics = await http.get(
                "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
            )
    assert text.status_code == 200
    assert text.headers["content-type"].startswith("text/plain")
    assert _metric(text.text, "flowforge_reconciler_actions_total", action="adopted") == 2
    assert _metric(text.text, "process_cpu_seconds_total") is not None
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.text.endswith("# EOF\n")


async def test_http_edges() -> None:
    async with HealthServer(host="127.0.0.1", port=0) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.get("/metrics")).status_code == 404  # no registry given
            assert (await http.get("/nope")).status_code == 404
            post = await http.post("/healthz")
            assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"
            head = await http.head("/readyz")  # no checks: ready
            assert head.status_code == 200 and head.content == b""
            assert (await http.get("/healthz?verbose=1")).status_code == 200
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"garbage\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 400 Bad Request\r\n")
        writer.close()
        # a second server on the same port explains itself
        with pytest.raises(ConfigError, match="FLOWFORGE_HTTP_PORT"):
            async with HealthServer(host="127.0.0.1", port=server.port):
                pass
        # a client that connects and says nothing does not hold the shutdown up
        _, idle = await asyncio.open_connection("127.0.0.1", server.port)
    idle.close()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as http:
            await http.get(f"{server.url}/healthz")


async def test_a_round_of_checks_still_running_ends_with_the_server() -> None:
    # The round outlives the request that started it (a shielded task the next probes
    # share): a check still running when the server closes must not outlive it, since the
    # daemon closes the pools the check uses next.
    started, ended = asyncio.Event(), asyncio.Event()

    async def hangs() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            ended.set()

    server = HealthServer(
        host="127.0.0.1", port=0, checks={"slow": hangs}, check_timeout=60, request_timeout=0.2
    )
    async with server, httpx.AsyncClient(base_url=server.url) as http:
        with pytest.raises(httpx.HTTPError):  # the server gives up on the request at 0.2 s
            await http.get("/readyz")
        assert started.is_set() and not ended.is_set()
    assert ended.is_set()


async def test_serve_health_follows_settings(settings: Settings) -> None:
    async with serve_health(settings.model_copy(update={"http_port": 0}), None) as none:
        assert none is None
    local = settings.model_copy(update={"http_host": "127.0.0.1", "http_port": free_port()})
    async with serve_health(local, new_registry(process=False)) as server:
        assert server is not None and server.port == local.http_port
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{server.url}/metrics")).status_code == 200


async def test_sampled_gauges_follow_runs_and_outbox(engine: Engine) -> None:
    """Values change as runs progress: open runs, then the outbox backlog a registered
    consumer drains."""
    await engine.register(WORKFLOW)
    metrics = OrchestratorMetrics(new_registry(process=False))
    pool = await store.create_pool(engine.settings.database_url or "", size=2)
    try:
        async with (
            HealthServer(host="127.0.0.1", port=0, registry=metrics.registry) as server,
            httpx.AsyncClient(base_url=server.url) as http,
        ):

            async def scrape(name: str, **labels: str) -> float | None:
                await sample_database(pool, metrics)
                return _metric((await http.get("/metrics")).text, name, **labels)

            assert await scrape("flowforge_outbox_unpublished") == 0
            assert await scrape("flowforge_outbox_oldest_unpublished_age_seconds") == 0
            await register_consumer(engine.conn, "relay")
            run_ids = [await engine.submit("inline", {"n": n}) for n in range(3)]
            for run_id in run_ids:
                assert (await engine.finished(run_id))["status"] == "completed"
            # started, step succeeded, completed (at least) per run
            assert (await scrape("flowforge_outbox_unpublished") or 0) >= 3 * len(run_ids)
            assert (await scrape("flowforge_outbox_oldest_unpublished_age_seconds") or 0) > 0
            assert await scrape("flowforge_runs", status="pending") == 0
            assert await scrape("flowforge_runs", status="running") == 0

            while await read_outbox(engine.conn, "relay", 1000):
                pass
            assert await scrape("flowforge_outbox_unpublished") == 0
            assert await scrape("flowforge_outbox_oldest_unpublished_age_seconds") == 0
    finally:
        await pool.close()


async def test_pending_runs_are_counted(db_url: str, pool: store.Pool) -> None:
    metrics = OrchestratorMetrics(new_registry(process=False))
    conn = await store.connect(db_url)
    try:
        await register_workflows(conn, "nobody-runs-this")
        for key in ("a", "b"):
            await store.enqueue_run(conn, "nobody-runs-this", {}, idempotency_key=key)
    finally:
        await conn.close()
    await sample_database(pool, metrics)
    assert metrics.registry.get_sample_value("flowforge_runs", {"status": "pending"}) == 2
    assert metrics.registry.get_sample_value("flowforge_runs", {"status": "running"}) == 0
