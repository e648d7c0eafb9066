"""Running `flowforge-orchestrator` commands in tests that also drive an engine in process."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import pytest

from flowforge_orchestrator.cli import main
from flowforge_orchestrator.config import Settings
from tests.conftest import TEST_JOB_KEY

__all__ = ["Cli", "Result", "cli"]


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


class Cli:
    """Runs one command at a time in a thread; `seen()` is what it printed so far."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.out: list[str] = []
        self.err: list[str] = []

    def seen(self) -> str:
        captured = self.capsys.readouterr()
        self.out.append(captured.out)
        self.err.append(captured.err)
        return "".join(self.out)

    async def __call__(self, *argv: str) -> Result:
        self.capsys.readouterr()
        self.out, self.err = [], []
        code = await asyncio.to_thread(main, list(argv))
        self.seen()
        return Result(code, "".join(self.out), "".join(self.err))


@pytest.fixture
def cli(
    settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Cli:
    """The CLI pointed at this test's database and Redis, and nothing else of the environment."""
    for name in list(os.environ):
        if name.startswith("FLOWFORGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FLOWFORGE_DATABASE_URL", settings.database_url or "")
    monkeypatch.setenv("FLOWFORGE_REDIS_URL", settings.redis_url or "")
    monkeypatch.setenv("FLOWFORGE_JOB_KEY", TEST_JOB_KEY)
    return Cli(capsys)
