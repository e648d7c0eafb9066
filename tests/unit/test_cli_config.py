"""`config`: effective settings with secrets masked; the README's settings table is the one
generated from the settings model."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowforge_orchestrator.cli.config_view import (
    MASK,
    TABLE_END,
    TABLE_START,
    effective_settings,
    mask_url,
    replace_settings_table,
    settings_table,
)
from flowforge_orchestrator.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:s3cret@db:5432/ff", "postgresql://app:***@db:5432/ff"),
        (
            "postgresql://app:p%40ss:w@db/ff?sslmode=require",
            "postgresql://app:***@db/ff?sslmode=require",
        ),
        ("postgresql://app@db/ff", "postgresql://app@db/ff"),
        ("postgresql://db/ff?user=app&password=s3cret", "postgresql://db/ff?user=app&password=***"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://cache:6379", "redis://cache:6379"),
        ("host=db user=app password=s3cret dbname=ff", "host=db user=app password=*** dbname=ff"),
        ("host=db password='a b' dbname=ff", "host=db password=*** dbname=ff"),
    ],
)
def test_mask_url_hides_passwords_and_nothing_else(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_effective_settings_mask_secrets_and_say_where_each_value_comes_from() -> None:
    environ = {
        "FLOWFORGE_DATABASE_URL": "postgresql://app:s3cret@db/ff",
        "flowforge_lease_seconds": "12",  # pydantic-settings reads names in any case
        "FLOWFORGE_SECRET_PAY_TOKEN": "tok-123",
        "HOME": "/root",
    }
    settings = Settings(database_url=environ["FLOWFORGE_DATABASE_URL"], lease_seconds=12)

    values = {v.env: (v.value, v.source) for v in effective_settings(settings, environ)}

    assert values["FLOWFORGE_DATABASE_URL"] == ("postgresql://app:***@db/ff", "environment")
    assert values["FLOWFORGE_LEASE_SECONDS"] == ("12", "environment")
    assert values["FLOWFORGE_REDIS_URL"] == ("", "unset")
    assert values["FLOWFORGE_POLL_INTERVAL"] == ("5", "default")
    assert values["FLOWFORGE_OTEL_CONSOLE"] == ("false", "default")
    assert values["FLOWFORGE_SECRET_PAY_TOKEN"] == (MASK, "environment")
    assert "HOME" not in values
    assert set(Settings.model_fields) <= {e.removeprefix("FLOWFORGE_").lower() for e in values}
    assert not any("s3cret" in v or "tok-123" in v for v, _ in values.values())


def test_the_table_has_a_row_with_a_default_for_every_setting() -> None:
    rows = settings_table().splitlines()

    assert rows[:2] == ["| variable | default | meaning |", "| --- | --- | --- |"]
    names = [row.split("|")[1].strip().strip("`") for row in rows[2:]]
    assert names == [f"FLOWFORGE_{n.upper()}" for n in Settings.model_fields] + [
        "FLOWFORGE_SECRET_<NAME>"
    ]
    cells = {row.split(" | ")[0].strip("| `"): row.split(" | ")[1] for row in rows[2:]}
    assert cells["FLOWFORGE_DATABASE_URL"] == "unset"
    assert cells["FLOWFORGE_NODE_ID"] == "`<hostname>-<pid>`"
    assert cells["FLOWFORGE_LEASE_SECONDS"] == "`30` s"
    assert cells["FLOWFORGE_MAX_OUTPUT_BYTES"] == "`262144` (256 KiB)"
    assert cells["FLOWFORGE_DATA_DIR"] == "`.flowforge`"
    assert all(row.count(" | ") == 2 and row.split(" | ")[2] != "|" for row in rows[2:])


def test_the_readme_table_is_the_generated_one() -> None:
    text = README.read_text(encoding="utf-8")

    assert TABLE_START in text and TABLE_END in text
    assert replace_settings_table(text, settings_table()) == text, (
        "README's settings table differs from the settings model: run "
        "`flowforge-orchestrator config --update-readme README.md`"
    )


def test_replacing_the_table_keeps_the_text_around_it() -> None:
    text = f"intro\n{TABLE_START}do not edit -->\n| old |\n{TABLE_END}\noutro\n"

    assert replace_settings_table(text, "| new |\n") == (
        f"intro\n{TABLE_START}do not edit -->\n| new |\n{TABLE_END}\noutro\n"
    )
    with pytest.raises(ValueError, match="no settings table markers"):
        replace_settings_table("no table here", "| new |\n")


@pytest.mark.parametrize(
    ("environ", "argv", "expected"),
    [
        ({}, [], ("INFO", None)),  # auto: text on a terminal, JSON lines otherwise
        ({"FLOWFORGE_LOG_FORMAT": "json", "FLOWFORGE_LOG_LEVEL": "warning"}, [], ("WARNING", True)),
        ({"FLOWFORGE_LOG_FORMAT": "text"}, ["-v"], ("DEBUG", False)),
    ],
)
def test_main_configures_logging_from_the_settings_and_removes_its_handler(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    environ: dict[str, str],
    argv: list[str],
    expected: tuple[str, bool | None],
) -> None:
    import logging

    from flowforge_orchestrator import cli
    from flowforge_orchestrator.ops.logs import configure_logging as configure

    for name in ("FLOWFORGE_LOG_FORMAT", "FLOWFORGE_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    seen: list[tuple[str, bool | None]] = []

    def recording(level: str, *, json: bool | None = None) -> logging.Handler:
        seen.append((level, json))
        return configure(level, json=json)

    monkeypatch.setattr(cli, "configure_logging", recording)
    root = logging.getLogger()
    before = (list(root.handlers), root.level)

    assert cli.main([*argv, "config", "--markdown"]) == 0

    assert seen == [expected]
    assert (root.handlers, root.level) == before
    assert capsys.readouterr().out == settings_table()
