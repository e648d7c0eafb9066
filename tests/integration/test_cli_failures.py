"""Every command against servers it cannot use: one `error:` line, no traceback, the
documented exit code (cli/failures.py)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowforge_orchestrator.cli.failures import EXIT_TIMED_OUT, EXIT_UNAVAILABLE, explain
from flowforge_orchestrator.errors import NotFound, WaitTimedOut
from tests.conftest import TEST_JOB_KEY, Services, _admin, database_dsn
from tests.integration.cli_helpers import Cli, cli

__all__ = ["cli"]

# A fixed id: it names the parametrized tests, which every xdist worker must collect alike.
RUN = "3f0b6c1e-5d2a-4c8e-9a71-0e6d2b4f8c15"
DEFINITION = "name: typo-check\nversion: 1\nsteps:\n  - {id: a, type: transform, output: 1}\n"

# Every command that talks to PostgreSQL, with arguments that would otherwise be valid.
DATABASE_COMMANDS: list[list[str]] = [
    ["migrate"],
    ["run"],
    ["worker"],
    ["definitions", "apply", "{file}"],
    ["definitions", "list"],
    ["definitions", "show", "typo-check"],
    ["definitions", "diff", "typo-check", "1"],
    ["submit", "typo-check"],
    ["runs", "show", RUN],
    ["runs", "watch", RUN],
    ["runs", "list"],
    ["runs", "cancel", RUN],
    ["runs", "retry", RUN],
    ["runs", "export", "--before", "1d", "--to", "{dir}/export.jsonl"],
    ["events", "send", "paid", "--run", RUN],
    ["events", "complete", RUN, "token", "--output", "{}"],
    ["outbox", "tail"],
    ["outbox", "consumers"],
    ["outbox", "register", "relay"],
    ["outbox", "drop", "relay"],
    ["demo"],
]
REDIS_COMMANDS: list[list[str]] = [["run"], ["worker"]]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening: every connection to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


def _argv(command: list[str], tmp_path: Path) -> list[str]:
    file = tmp_path / "typo-check.yaml"
    file.write_text(DEFINITION)
    return [part.replace("{file}", str(file)).replace("{dir}", str(tmp_path)) for part in command]


@pytest.mark.parametrize("command", DATABASE_COMMANDS, ids=" ".join)
async def test_an_unreachable_database_is_one_error_line_and_exit_3(
    command: list[str],
    cli: Cli,
    closed_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLOWFORGE_DATABASE_URL", f"postgresql://postgres@127.0.0.1:{closed_port}/x")
    monkeypatch.setenv("FLOWFORGE_REDIS_URL", f"redis://127.0.0.1:{closed_port}/0")
    monkeypatch.setenv("FLOWFORGE_DATA_DIR", str(tmp_path / "data"))
    result = await cli(*_argv(command, tmp_path))
    line = _one_error_line(result.err)
    assert "database unavailable" in line and str(closed_port) in line
    assert result.code == EXIT_UNAVAILABLE


@pytest.mark.parametrize("command", REDIS_COMMANDS, ids=" ".join)
async def test_an_unreachable_redis_is_one_error_line_and_exit_3(
    command: list[str], cli: Cli, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOWFORGE_REDIS_URL", f"redis://127.0.0.1:{closed_port}/0")
    result = await cli(*command)
    line = _one_error_line(result.err)
    assert line.startswith("error: Redis unavailable") and str(closed_port) in line
    assert result.code == EXIT_UNAVAILABLE


async def test_a_refused_login_and_a_missing_schema_are_named(
    cli: Cli, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = database_dsn(services.database_url, f"nowhere_{uuid.uuid4().hex}")
    monkeypatch.setenv("FLOWFORGE_DATABASE_URL", missing)
    result = await cli("runs", "list")
    assert "the database refused us" in _one_error_line(result.err)
    assert result.code == EXIT_UNAVAILABLE

    empty = f"empty_{uuid.uuid4().hex}"
    await _admin(services.database_url, f"CREATE DATABASE {empty}")
    try:
        monkeypatch.setenv("FLOWFORGE_DATABASE_URL", database_dsn(services.database_url, empty))
        for command in (["runs", "list"], ["worker"]):
            result = await cli(*command)
            line = _one_error_line(result.err)
            assert "migrate" in line, line
            assert result.code == EXIT_UNAVAILABLE
        result = await cli("runs", "list")
        assert "no FlowForge schema" in result.err
        assert result.code == EXIT_UNAVAILABLE
    finally:
        await _admin(services.database_url, f"DROP DATABASE IF EXISTS {empty} WITH (FORCE)")


async def test_submit_wait_giving_up_is_its_own_exit_code(cli: Cli, tmp_path: Path) -> None:
    file = tmp_path / "typo-check.yaml"
    file.write_text("name: slow\nversion: 1\nsteps:\n  - {id: nap, type: delay, duration: 1h}\n")
    assert (await cli("definitions", "apply", str(file))).code == 0
    result = await cli("submit", "slow", "--wait", "--timeout", "0.2")  # no orchestrator
    assert "still pending" in _one_error_line(result.err)
    assert result.code == EXIT_TIMED_OUT


def test_explain_keeps_usage_errors_and_names_bugs() -> None:
    assert explain(NotFound("no run"))[1] == 2
    assert explain(WaitTimedOut("still running"))[1] == EXIT_TIMED_OUT
    message, code = explain(KeyError("x"))
    assert (code, "--debug" in message, "KeyError" in message) == (70, True, True)
    assert TEST_JOB_KEY  # the cli fixture's environment signs nothing here
