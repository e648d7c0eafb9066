"""Shared paths for the deployment tests: they read deploy/ and run offline linters only."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def venv_tool(name: str) -> str | None:
    """A console script of this environment (the dev extra's), else one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def required_tool(found: str | None, what: str) -> str:
    """`found`, or skip the test: `what` (the tool and how to get it) is missing. In CI
    (`CI` set) a missing tool fails the test instead: .ci/run installs every one, and a
    deploy check must never pass there by not running."""
    if found:
        return found
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} is missing in CI: .ci/run should have installed it")
    pytest.skip(f"{what} is not installed")
