"""`doctor`, `config` and `definitions list|show|diff` against real PostgreSQL and Redis."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio
import yaml

from flowforge_orchestrator import store
from flowforge_orchestrator.cli.config_view import settings_table
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.queue import presence
from flowforge_orchestrator.queue.dispatch import queue_name
from tests.conftest import Services, _admin, database_dsn, run_sync
from tests.helpers import migration_names, wait_for
from tests.integration.cli_helpers import Cli, cli
from tests.integration.conftest import Engine

__all__ = ["cli"]  # the fixture

GREET = """
name: greet
version: 1
description: says hello
steps:
  - {id: user, type: echo, with: {id: "${{ input.user }}"}}
  - {id: hello, type: echo, depends_on: [user], with: {to: "${{ steps.user.output.id }}"}}
"""


def lines_of(out: str) -> dict[str, list[tuple[str, str]]]:
    """doctor's lines by check: [(status, detail)]."""
    found: dict[str, list[tuple[str, str]]] = {}
    for line in out.splitlines():
        m = re.match(r"^(ok|warn|FAIL|skip) +(\w+) +(.*)$", line)
        if m:
            found.setdefault(m[2], []).append((m[1], m[3]))
    return found


@pytest.fixture
def empty_db(services: Services) -> Iterator[str]:
    """A brand-new database, not made from the migrated template."""
    name = f"empty_{uuid.uuid4().hex}"
    run_sync(_admin(services.database_url, f"CREATE DATABASE {name}"))
    try:
        yield database_dsn(services.database_url, name)
    finally:
        run_sync(_admin(services.database_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


async def live_workers(settings: Settings, types: list[str]) -> None:
    """Until every type's queue has a worker in its presence set (from its first poll)."""
    client = redis.asyncio.Redis.from_url(settings.redis_url or "")
    try:
        await wait_for(lambda: _all(client, types), message="no worker announced itself")
    finally:
        await client.aclose()


async def _all(client: redis.asyncio.Redis, types: list[str]) -> bool:
    return all([await presence.live_workers(client, queue_name(t)) for t in types])


# -- doctor ----------------------------------------------------------------------------------


async def test_doctor_says_all_is_well_when_it_is(
    steps_engine: Engine, settings: Settings, cli: Cli
) -> None:
    await store.apply_roles(settings.database_url or "")
    await steps_engine.register(GREET)
    await live_workers(settings, ["echo", "hold", "http", "refuse"])

    result = await cli("doctor")

    assert result.code == 0, result.out + result.err
    checks = lines_of(result.out)
    assert list(checks) == [
        "configuration",
        "postgresql",
        "redis",
        "migrations",
        "roles",
        "workers",
        "outbox",
    ]
    assert all(status == "ok" for found in checks.values() for status, _ in found), result.out
    assert re.match(r"postgresql://\S+ answers: PostgreSQL \d+", checks["postgresql"][0][1])
    names = migration_names()
    assert checks["migrations"] == [("ok", f"all {len(names)} applied (latest {names[-1]})")]
    assert "flowforge_orchestrator, flowforge_worker, flowforge_api exist" in result.out
    assert "registered step types: echo (" in result.out
    assert result.out.rstrip().endswith("all is well")


def test_doctor_names_what_is_unreachable_and_unmigrated(
    empty_db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flowforge_orchestrator.cli import main

    monkeypatch.setenv("FLOWFORGE_DATABASE_URL", empty_db)
    monkeypatch.setenv("FLOWFORGE_REDIS_URL", "redis://127.0.0.1:1/0")

    code = main(["doctor", "--timeout", "3"])

    out = capsys.readouterr().out
    checks = lines_of(out)
    assert code == 1
    assert checks["postgresql"][0][0] == "ok"
    (redis_status, redis_detail), *_ = checks["redis"]
    assert redis_status == "FAIL" and "127.0.0.1:1" in redis_detail, out
    names = migration_names()
    assert checks["migrations"] == [
        (
            "FAIL",
            f"{len(names)} of {len(names)} not applied ({', '.join(names)}): "
            "run `flowforge-orchestrator migrate`",
        )
    ]
    assert (
        checks["roles"]
        == checks["workers"]
        == [("skip", "needs the schema: run `flowforge-orchestrator migrate`")]
    )
    assert "2 problem(s): fix the lines marked FAIL" in out


def test_doctor_reports_bad_settings_and_a_missing_database_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_url: str
) -> None:
    from flowforge_orchestrator.cli import main

    for name in ("FLOWFORGE_DATABASE_URL", "FLOWFORGE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLOWFORGE_LEASE_SECONDS", "soon")
    bad = main(["doctor"])
    bad_out = capsys.readouterr().out
    monkeypatch.delenv("FLOWFORGE_LEASE_SECONDS")
    monkeypatch.setenv("FLOWFORGE_REDIS_URL", redis_url)
    no_db = main(["doctor"])
    no_db_out = capsys.readouterr().out

    assert bad == 1
    ((status, detail),) = lines_of(bad_out)["configuration"]
    assert status == "FAIL" and detail.startswith("invalid settings: FLOWFORGE_LEASE_SECONDS:")
    assert lines_of(bad_out)["postgresql"] == [("skip", "needs valid settings")]
    assert no_db == 1
    checks = lines_of(no_db_out)
    assert checks["postgresql"] == [("FAIL", "FLOWFORGE_DATABASE_URL is not set")]
    assert checks["redis"][0][0] == "ok"
    assert checks["workers"] == [("skip", "needs PostgreSQL")]


async def test_doctor_finds_ungranted_tables_and_unserved_step_types(
    settings: Settings, cli: Cli, tmp_path: Path
) -> None:
    dsn = settings.database_url or ""
    await store.apply_roles(dsn)
    conn = await store.connect(dsn)
    try:
        # A migration applied after roles.sql, and a worker that registered http only.
        await conn.execute("CREATE TABLE flowforge.extra (x int)")
        await conn.execute("INSERT INTO flowforge.step_types (name, worker) VALUES ('http', 'w-1')")
    finally:
        await conn.close()
    sms = tmp_path / "sms.yaml"
    sms.write_text(
        "name: sms\nversion: 2\nsteps:\n  - {id: send, type: sms_send}\n", encoding="utf-8"
    )
    assert (await cli("definitions", "apply", str(sms), "--allow-type", "sms_send")).code == 0

    result = await cli("doctor")

    assert result.code == 1
    checks = lines_of(result.out)
    assert checks["roles"] == [
        (
            "FAIL",
            "not handed to flowforge_orchestrator: extra (a migration ran after sql/roles.sql); "
            "apply sql/roles.sql as a superuser (README: Database roles) again",
        )
    ]
    assert checks["workers"][0] == (
        "FAIL",
        "step type 'sms_send' (used by sms v2) is served by no registered worker: start a "
        "worker with the --types-module that provides it",
    )
    assert ("ok", "registered step types: http (w-1)") in checks["workers"]
    assert (  # registered once, none running now: a FAIL, like none registered
        "FAIL",
        "no running worker seen for: http (none is in the presence set of their queues in "
        "Redis): "
        "nothing will run until one starts",
    ) in checks["workers"]


# -- config ----------------------------------------------------------------------------------


async def test_config_prints_effective_settings_with_secrets_masked(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    url = (settings.database_url or "").replace("postgres@", "postgres:hunter2@")
    monkeypatch.setenv("FLOWFORGE_DATABASE_URL", url)
    monkeypatch.setenv("FLOWFORGE_POLL_INTERVAL", "2.5")
    monkeypatch.setenv("FLOWFORGE_SECRET_PAY_TOKEN", "tok-123")

    text = await cli("config")
    as_json = await cli("config", "--json")
    markdown = await cli("config", "--markdown")

    assert text.code == as_json.code == markdown.code == 0
    assert "hunter2" not in text.out + as_json.out and "tok-123" not in text.out + as_json.out
    assert re.search(
        r"^FLOWFORGE_DATABASE_URL=postgresql://postgres:\*\*\*@\S+ +# environment$", text.out, re.M
    )
    assert re.search(r"^FLOWFORGE_POLL_INTERVAL=2.5 +# environment$", text.out, re.M)
    assert re.search(r"^FLOWFORGE_LEASE_SECONDS=30 +# default$", text.out, re.M)
    assert re.search(r"^FLOWFORGE_SECRET_PAY_TOKEN=\*\*\* +# environment$", text.out, re.M)
    values = json.loads(as_json.out)
    assert values["FLOWFORGE_CLAIM_BATCH"] == {"value": "100", "source": "default"}
    assert markdown.out == settings_table()


# -- definitions list, show, diff --------------------------------------------------------------


async def test_definitions_show_and_diff_print_stored_specs_as_yaml(
    cli: Cli, tmp_path: Path
) -> None:
    v1 = tmp_path / "v1.yaml"
    v1.write_text(GREET, encoding="utf-8")
    v2 = tmp_path / "v2.yaml"
    v2.write_text(
        GREET.replace("version: 1", "version: 2").replace("to:", "greet:"), encoding="utf-8"
    )
    for path in (v1, v2):
        assert (await cli("definitions", "apply", str(path), "--allow-type", "echo")).code == 0

    latest = await cli("definitions", "show", "greet")
    first = await cli("definitions", "show", "greet", "--version", "1")
    as_json = await cli("definitions", "show", "greet", "--json")
    diff = await cli("definitions", "diff", "greet", "1", "2")
    to_latest = await cli("definitions", "diff", "greet", "1")
    same = await cli("definitions", "diff", "greet", "2", "2")
    missing = await cli("definitions", "show", "greet", "--version", "7")
    versions = await cli("definitions", "list", "greet")

    assert latest.code == first.code == as_json.code == 0
    spec = yaml.safe_load(latest.out)
    assert spec == json.loads(as_json.out)
    assert (spec["name"], spec["version"], spec["description"]) == ("greet", 2, "says hello")
    assert latest.out.startswith("name: greet\nversion: 2\n")  # the model's order, not sorted
    assert yaml.safe_load(first.out)["steps"][1]["with"] == {"to": "${{ steps.user.output.id }}"}
    assert diff.code == 0
    assert diff.out.splitlines()[:2] == ["--- greet v1", "+++ greet v2"]
    changed = [ln for ln in diff.out.splitlines()[2:] if ln[:1] in "+-"]
    assert changed == [
        "-version: 1",
        "+version: 2",
        "-    to: ${{ steps.user.output.id }}",
        "+    greet: ${{ steps.user.output.id }}",
    ]
    assert to_latest.out == diff.out
    assert same.out.strip() == "v2 and v2 have the same spec"
    assert missing.code == 2
    assert missing.err.strip() == (
        "error: version 7 of workflow 'greet' is not registered (see `definitions list --all`)"
    )
    assert [line.split()[:2] for line in versions.out.splitlines()[1:]] == [
        ["greet", "v1"],
        ["greet", "v2"],
    ]
