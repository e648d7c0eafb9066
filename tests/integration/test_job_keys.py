"""FLOWFORGE_JOB_KEY at the edge: required outside the local default, found in the data dir,
created there (owner-only) when private servers are started."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr

from flowforge_orchestrator.cli import main
from flowforge_orchestrator.cli.common import JOB_KEY_FILE, with_job_key
from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.errors import ConfigError
from flowforge_orchestrator.worker.runtime import run_worker


def _settings(tmp_path: Path, key: str | None = None) -> Settings:
    return Settings(data_dir=tmp_path / "data", job_key=SecretStr(key) if key else None)


def test_a_set_key_wins_and_no_file_is_written(tmp_path: Path) -> None:
    settings = with_job_key(_settings(tmp_path, "set-in-the-environment"), create=True)
    assert settings.job_key is not None
    assert settings.job_key.get_secret_value() == "set-in-the-environment"
    assert not (tmp_path / "data" / JOB_KEY_FILE).exists()


def test_private_servers_create_a_key_only_the_owner_reads_and_others_find_it(
    tmp_path: Path,
) -> None:
    assert with_job_key(_settings(tmp_path), create=False).job_key is None  # nothing yet
    created = with_job_key(_settings(tmp_path), create=True).job_key
    assert created is not None and len(created.get_secret_value()) >= 32
    path = tmp_path / "data" / JOB_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # A worker started with the printed URLs (no key set) signs nothing, but verifies with it.
    found = with_job_key(_settings(tmp_path), create=False).job_key
    assert found is not None and found.get_secret_value() == created.get_secret_value()
    again = with_job_key(_settings(tmp_path), create=True).job_key  # not replaced
    assert again is not None and again.get_secret_value() == created.get_secret_value()


def test_an_empty_key_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "data" / JOB_KEY_FILE
    path.parent.mkdir()
    path.write_text("\n")
    with pytest.raises(ConfigError, match=str(path)):
        with_job_key(_settings(tmp_path), create=True)


@pytest.mark.parametrize("command", ["run", "worker"])
def test_daemons_without_a_key_refuse_to_start_naming_the_setting(
    command: str,
    db_url: str,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in list(os.environ):
        if name.startswith("FLOWFORGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FLOWFORGE_DATABASE_URL", db_url)
    monkeypatch.setenv("FLOWFORGE_REDIS_URL", redis_url)
    monkeypatch.setenv("FLOWFORGE_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("FLOWFORGE_HTTP_PORT", "0")

    assert main([command]) == 2

    err = capsys.readouterr().err
    assert "FLOWFORGE_JOB_KEY" in err
    assert f"the {'orchestrator' if command == 'run' else 'worker'} needs" in err


async def test_a_worker_refuses_a_secret_too_short_to_redact(settings: Settings) -> None:
    with pytest.raises(ConfigError) as info:
        await run_worker(settings, {}, secrets={"PIN": "1234"}, serve_http=False)
    assert "FLOWFORGE_SECRET_PIN" in str(info.value)
    assert "1234" not in str(info.value)


async def test_a_worker_refuses_a_key_too_short(settings: Settings) -> None:
    short = settings.model_copy(update={"job_key": SecretStr("too-short")})
    with pytest.raises(ConfigError, match="FLOWFORGE_JOB_KEY: key 1 has 9 characters"):
        await run_worker(short, {}, serve_http=False)
