"""sql/roles.sql: PostgreSQL itself allows and refuses what each role may and may not do.

Each test logs in as a fresh user inside each group role (and one in none), the way a
deployment does.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import yaml

from flowforge_orchestrator import store
from flowforge_orchestrator.client import enqueue
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.definition.parse import parse_definition
from flowforge_orchestrator.core.records import StepResult
from flowforge_orchestrator.engine.orchestrator import run_orchestrator
from flowforge_orchestrator.errors import StoreError
from flowforge_orchestrator.ops import metrics
from flowforge_orchestrator.worker.runtime import StepContext, run_worker
from tests.conftest import Services, _admin, database_dsn
from tests.helpers import wait_for

WORKFLOW = """
name: roles-check
version: 1
steps:
  - {id: echo, type: echo, with: {n: "${{ input.n }}"}}
  - {id: done, type: transform, depends_on: [echo], output: "${{ steps.echo.output.n + 1 }}"}
"""

# What a compromised worker must not be able to do.
WORKER_REFUSED = [
    "SELECT id FROM flowforge.runs",
    "SELECT id FROM flowforge.runs FOR KEY SHARE",
    "SELECT secret FROM flowforge.engine_secret",
    "SELECT flowforge.attempt_token(gen_random_uuid())",
    "SELECT attempt_id, token FROM flowforge.step_results",
    "SELECT count(*) FROM flowforge.step_results",
    "INSERT INTO flowforge.cancel_requests (run_id) VALUES (gen_random_uuid())",
    "SELECT flowforge.lock_concurrency_keys(ARRAY['k'])",
    "UPDATE flowforge.runs SET status = 'cancelled'",
    "UPDATE flowforge.runs SET cancel_requested = true",
    "DELETE FROM flowforge.runs",
    "INSERT INTO flowforge.runs (workflow_name) VALUES ('x')",
    "INSERT INTO flowforge.outbox (run_id, seq, type, time, data)"
    " VALUES (gen_random_uuid(), 1, 'workflow.failed', now(), '{}')",
    "UPDATE flowforge.outbox SET published_at = now()",
    "SELECT * FROM flowforge.outbox_cloudevents",
    "INSERT INTO flowforge.workflow_definitions (name, version, spec) VALUES ('x', 1, '{}')",
    "UPDATE flowforge.workflow_definitions SET spec = '{}'",
    "SELECT spec FROM flowforge.workflow_definitions",
    "SELECT * FROM flowforge.step_attempts",
    "INSERT INTO flowforge.transitions (run_id, seq, to_status, at)"
    " VALUES (gen_random_uuid(), 1, 'running', now())",
    "SELECT output FROM flowforge.step_results",
    "UPDATE flowforge.step_results SET outcome = 'failed'",
    "DELETE FROM flowforge.step_results",
    "DELETE FROM flowforge.step_types",
    "TRUNCATE flowforge.step_results",
    "CREATE TABLE flowforge.evil (x int)",
]

# What an API must not be able to do: forge state, read results or history, touch the outbox.
API_REFUSED = [
    # No lock on a run row, of any strength: the API's transactions never hold back a commit.
    "SELECT id FROM flowforge.runs FOR UPDATE",
    "SELECT id FROM flowforge.runs FOR NO KEY UPDATE",
    "SELECT id FROM flowforge.runs FOR SHARE",
    "SELECT id FROM flowforge.runs FOR KEY SHARE",
    "LOCK TABLE flowforge.runs IN ROW SHARE MODE",
    "UPDATE flowforge.runs SET cancel_requested = true",
    "UPDATE flowforge.runs SET waiting = false",
    "UPDATE flowforge.runs SET status = 'cancelled'",
    # No function of the engine: PUBLIC's EXECUTE is taken back.
    "SELECT flowforge.lock_concurrency_keys(ARRAY['workflow:roles-check'])",
    "SELECT * FROM flowforge.acquire_concurrency(ARRAY[gen_random_uuid()], ARRAY['k'], ARRAY[1])",
    "SELECT flowforge.attempt_token(gen_random_uuid())",
    "SELECT secret FROM flowforge.engine_secret",
    "SELECT * FROM flowforge.cancel_requests",
    "UPDATE flowforge.cancel_requests SET handled_at = now()",
    "DELETE FROM flowforge.cancel_requests",
    "INSERT INTO flowforge.cancel_requests (run_id, handled_at) VALUES (gen_random_uuid(), now())",
    "UPDATE flowforge.runs SET checkpoint = '{}', epoch = epoch + 1",
    "INSERT INTO flowforge.runs (workflow_name, status) VALUES ('x', 'completed')",
    "INSERT INTO flowforge.runs (workflow_name, owner) VALUES ('roles-check', 'me')",
    "DELETE FROM flowforge.runs",
    "TRUNCATE flowforge.runs",
    "INSERT INTO flowforge.step_results (attempt_id, run_id, step_id, outcome)"
    " VALUES (gen_random_uuid(), gen_random_uuid(), 's', 'succeeded')",
    "SELECT output FROM flowforge.step_results",
    "SELECT * FROM flowforge.step_attempts",
    "SELECT * FROM flowforge.transitions",
    "SELECT * FROM flowforge.outbox",
    "UPDATE flowforge.outbox SET published_at = now()",
    "INSERT INTO flowforge.workflow_definitions (name, version, spec) VALUES ('x', 2, '{}')",
    "DELETE FROM flowforge.workflow_definitions",
    "INSERT INTO flowforge.step_types (name, worker) VALUES ('x', 'y')",
    "SELECT * FROM flowforge.schema_migrations",
]


# A login in no group role: PUBLIC may not even look into the schema.
NOBODY_REFUSED = [
    "SELECT id FROM flowforge.runs",
    "INSERT INTO flowforge.runs (workflow_name) VALUES ('x')",
    "INSERT INTO flowforge.cancel_requests (run_id) VALUES (gen_random_uuid())",
    "SELECT flowforge.lock_concurrency_keys(ARRAY['k'])",
    "SELECT flowforge.attempt_token(gen_random_uuid())",
]


@dataclass(frozen=True)
class Logins:
    admin: str
    orchestrator: str
    worker: str
    api: str
    nobody: str


def _login_dsn(dsn: str, user: str, password: str) -> str:
    parts = urlsplit(dsn)
    netloc = f"{user}:{password}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
async def logins(db_url: str) -> AsyncIterator[Logins]:
    """Roles applied to this test's database, and one login user in each group role."""
    await store.apply_roles(db_url)
    suffix = uuid.uuid4().hex[:10]
    password = uuid.uuid4().hex
    users = {kind: f"ff_{kind}_{suffix}" for kind in [*store.ROLES, "nobody"]}
    await _admin(
        db_url,
        *(
            f"CREATE ROLE {user} LOGIN PASSWORD '{password}'"
            + (f" IN ROLE {store.ROLES[kind]}" if kind in store.ROLES else "")
            for kind, user in users.items()
        ),
    )
    try:
        yield Logins(
            admin=db_url,
            **{kind: _login_dsn(db_url, user, password) for kind, user in users.items()},
        )
    finally:
        # Their sessions may outlive the test by a moment; end them so the roles can go.
        await _admin(
            db_url,
            *(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{u}'"
                for u in users.values()
            ),
            *(f"DROP OWNED BY {user}" for user in users.values()),
            *(f"DROP ROLE IF EXISTS {user}" for user in users.values()),
        )


async def _refusals(dsn: str, statements: list[str]) -> list[str]:
    """The statements PostgreSQL did NOT refuse for lack of privilege (should be none)."""
    conn = await store.connect(dsn)
    allowed = []
    try:
        for sql in statements:
            try:
                async with conn.transaction():  # LOCK TABLE needs one; a refusal ends it
                    await conn.execute(sql)
            except asyncpg.InsufficientPrivilegeError:
                continue
            allowed.append(sql)
    finally:
        await conn.close()
    return allowed


async def _register(dsn: str) -> None:
    conn = await store.connect(dsn)
    try:
        definition = parse_definition(yaml.safe_load(WORKFLOW), source="test")
        await store.register_definition(conn, definition)
    finally:
        await conn.close()


async def test_roles_exist_without_login_and_own_by_need(logins: Logins) -> None:
    # What a later migration adds is handed over by the next run, and granted to no one else.
    await _admin(logins.admin, "CREATE TABLE flowforge.added_later (id serial PRIMARY KEY)")
    await store.apply_roles(logins.admin)
    conn = await asyncpg.connect(logins.admin)
    try:
        roles = await conn.fetch(
            "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY($1::text[])",
            list(store.ROLES.values()),
        )
        assert {r["rolname"]: r["rolcanlogin"] for r in roles} == dict.fromkeys(
            store.ROLES.values(), False
        )
        owners = await conn.fetch(
            "SELECT c.relname, pg_get_userbyid(c.relowner) AS owner FROM pg_class c"
            " WHERE c.relnamespace = 'flowforge'::regnamespace AND c.relkind IN ('r', 'v', 'S')"
        )
        assert "added_later" in {r["relname"] for r in owners}
        assert {r["owner"] for r in owners} == {"flowforge_orchestrator"}
    finally:
        await conn.close()
    refused = [
        "SELECT * FROM flowforge.added_later",
        "INSERT INTO flowforge.added_later DEFAULT VALUES",
    ]
    assert await _refusals(logins.worker, refused) == []
    assert await _refusals(logins.api, refused) == []
    orchestrator = await store.connect(logins.orchestrator)
    try:
        await orchestrator.execute("INSERT INTO flowforge.added_later DEFAULT VALUES")
        # Alone in reading the engine secret, and in computing tokens from it.
        secret = await store.engine_secret(orchestrator)
        token = await orchestrator.fetchval(
            "SELECT flowforge.attempt_token('00000000-0000-4000-8000-000000000000')"
        )
        assert len(secret) == 32 and len(token) == 16
    finally:
        await orchestrator.close()


async def test_roles_need_a_migrated_schema(services: Services) -> None:
    name = f"test_{uuid.uuid4().hex}"
    admin = services.database_url
    await _admin(admin, f"CREATE DATABASE {name}")
    try:
        with pytest.raises(StoreError) as info:
            await store.apply_roles(database_dsn(admin, name))
        assert "migrate" in str(info.value)
    finally:
        await _admin(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_worker_reports_results_and_nothing_else(logins: Logins) -> None:
    listener = await asyncpg.connect(logins.admin)
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("flowforge_results", lambda *args: heard.put_nowait(args[3]))
    conn = await store.connect(logins.worker)
    try:
        attempt = uuid.uuid4()
        now = datetime.now(UTC)
        result = StepResult(
            attempt_id=attempt,
            run_id=uuid.uuid4(),
            step_id="s",
            outcome="succeeded",
            output={"ok": True},
            error=None,
            worker="w1",
            started_at=now,
            finished_at=now,
            token=bytes(16),
        )
        assert await store.insert_result(conn, result)
        assert not await store.insert_result(conn, result)  # a duplicate delivery
        assert await asyncio.wait_for(heard.get(), 5) == str(attempt)  # the trigger's NOTIFY
        await store.register_step_types(conn, ["echo", "http"], "w1")
        await store.register_step_types(conn, ["echo"], "w2")  # the upsert path
        assert await store.pending_migrations(logins.worker) == []
    finally:
        await conn.close()
        await listener.close()

    assert await _refusals(logins.worker, WORKER_REFUSED) == []


async def test_api_enqueues_reads_and_cancels_only(logins: Logins) -> None:
    await _register(logins.admin)
    listener = await asyncpg.connect(logins.admin)
    woken = asyncio.Event()
    cancels: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("flowforge_runs", lambda *_: woken.set())
    await listener.add_listener("flowforge_cancel", lambda *args: cancels.put_nowait(args[3]))
    conn = await store.connect(logins.api)
    try:
        first = await enqueue(conn, "roles-check", {"n": 1}, idempotency_key="order-1")
        again = await enqueue(conn, "roles-check", {"n": 1}, idempotency_key="order-1")
        assert first.created and not again.created and again.id == first.id
        await asyncio.wait_for(woken.wait(), 5)  # the statement trigger's NOTIFY
        run = await store.get_run(conn, first.id)
        assert run is not None and run["workflow_version"] == 1  # pinned by the trigger
        assert [d["name"] for d in await store.list_definitions(conn)] == ["roles-check"]

        # Cancelling is an INSERT, and holds no lock on the run while its transaction lasts.
        woken.clear()
        before = await listener.fetchval("SELECT xmin FROM flowforge.runs WHERE id = $1", first.id)
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO flowforge.cancel_requests (run_id, reason) VALUES ($1, 'asked')",
                first.id,
            )
            locked = await listener.fetchval(
                "SELECT id FROM flowforge.runs WHERE id = $1 FOR UPDATE NOWAIT", first.id
            )
            assert locked == first.id  # not even a KEY SHARE lock stands in the way
        assert await asyncio.wait_for(cancels.get(), 5) == str(first.id)
        await asyncio.wait_for(woken.wait(), 5)  # a pending run: the claim cancels it
        after = await listener.fetchval("SELECT xmin FROM flowforge.runs WHERE id = $1", first.id)
        assert after == before  # the run row itself was not written
        assert await store.request_cancel(conn, first.id, "again") == (True, "pending")
        assert await store.request_cancel(conn, uuid.uuid4()) == (False, None)
    finally:
        await conn.close()
        await listener.close()

    assert await _refusals(logins.api, API_REFUSED) == []


async def test_a_login_in_no_role_may_do_nothing(logins: Logins) -> None:
    assert await _refusals(logins.nobody, NOBODY_REFUSED) == []


class Gate:
    """An echo step that waits until the test lets it finish."""

    def __init__(self) -> None:
        self.started: dict[str, asyncio.Event] = {}
        self.release: dict[str, asyncio.Event] = {}

    def _event(self, events: dict[str, asyncio.Event], n: Any) -> asyncio.Event:
        return events.setdefault(str(n), asyncio.Event())

    async def echo(self, params: Any, ctx: StepContext) -> Any:
        self._event(self.started, params["n"]).set()
        await self._event(self.release, params["n"]).wait()
        return params


def _refused(measures: metrics.OrchestratorMetrics, reason: str) -> float:
    value = measures.registry.get_sample_value(
        "flowforge_results_refused_total", {"reason": reason}
    )
    return value or 0.0


async def test_a_run_completes_with_each_process_in_its_role_and_forgeries_change_nothing(
    logins: Logins, redis_url: str, settings: Settings
) -> None:
    """The engine needs nothing beyond its grants: orchestrator, worker and API each log in
    as their role, and a run goes from enqueue to completed. A worker's login that guesses
    an attempt id (they are derived) and inserts a result for it changes nothing: the
    orchestrator ignores the forged row and counts it, and the real result lands. The API
    cancels a running run by inserting a request."""
    orchestrator = settings.model_copy(update={"database_url": logins.orchestrator})
    worker = settings.model_copy(update={"database_url": logins.worker, "node_id": "w1"})
    assert await store.pending_migrations(logins.orchestrator) == []  # its start-up check
    await _register(logins.orchestrator)
    gate = Gate()
    measures = metrics.OrchestratorMetrics(metrics.new_registry(process=False))
    stop = asyncio.Event()
    ready_o, ready_w = asyncio.Event(), asyncio.Event()
    tasks = [
        asyncio.create_task(run_orchestrator(orchestrator, stop, ready=ready_o, measures=measures)),
        asyncio.create_task(run_worker(worker, {"echo": gate.echo}, stop=stop, ready=ready_w)),
    ]
    api = await store.connect(logins.api)
    forger = await store.connect(logins.worker)
    try:
        await asyncio.wait_for(asyncio.gather(ready_o.wait(), ready_w.wait()), timeout=20)
        run_id, doomed = uuid.uuid4(), uuid.uuid4()
        await enqueue(api, "roles-check", {"n": 41}, run_id=run_id)
        await enqueue(api, "roles-check", {"n": 7}, run_id=doomed)
        await asyncio.wait_for(gate._event(gate.started, 41).wait(), 20)

        # The attempt id is derived (run, created_at, step, attempt): a reader of runs can
        # compute it, so the forger is given it here.
        admin = await store.connect(settings.database_url or "")
        try:
            attempt = await admin.fetchval(
                "SELECT attempt_id FROM flowforge.outbox"
                " WHERE run_id = $1 AND type = 'step.dispatched'",
                run_id,
            )
        finally:
            await admin.close()
        now = datetime.now(UTC)
        for token in (bytes(16), uuid.uuid4().bytes):
            assert await store.insert_result(
                forger,
                StepResult(
                    attempt_id=attempt,
                    run_id=run_id,
                    step_id="echo",
                    outcome="succeeded",
                    output={"n": 999},
                    error=None,
                    worker="forger",
                    started_at=now,
                    finished_at=now,
                    token=token,
                ),
            )
        await wait_for(lambda: _refused(measures, "bad_token") == 2, message="not refused")
        gate._event(gate.release, 41).set()

        await asyncio.wait_for(gate._event(gate.started, 7).wait(), 20)
        assert await store.request_cancel(api, doomed, "changed my mind") == (True, "running")

        async def finished(run: uuid.UUID) -> asyncpg.Record | None:
            row = await store.get_run(api, run)
            assert row is not None
            return row if row["status"] in ("completed", "failed", "cancelled") else None

        row: asyncpg.Record = await wait_for(
            lambda: finished(run_id), timeout=20, message="the run did not finish"
        )
        assert row["status"] == "completed", row["error"]
        assert row["output"] == {"done": 42}  # not 1000: the forged output never counted
        cancelled = await wait_for(lambda: finished(doomed), timeout=20, message="not cancelled")
        assert cancelled["status"] == "cancelled"
        assert _refused(measures, "bad_token") == 2  # each forged row counted once
    finally:
        gate._event(gate.release, 7).set()
        await api.close()
        await forger.close()
        stop.set()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result
    admin = await store.connect(logins.admin)
    try:
        attempts = await store.run_attempts(admin, run_id)  # what `runs show` reads
        assert [(a["step_id"], a["worker"]) for a in attempts] == [("echo", "w1")]
    finally:
        await admin.close()
