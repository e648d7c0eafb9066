"""deploy/Dockerfile: hadolint-clean at every severity, a digest-pinned multi-stage build of
one non-root image whose entry point serves every role. (Images cannot be built here.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from flowforge_orchestrator.cli import main
from tests.deploy.paths import DEPLOY, ROOT, venv_tool

DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, rest = line.strip().partition(" ")
            found.append((instruction.upper(), rest.strip()))
    return found


def _hadolint(dockerfile: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    tool = venv_tool("hadolint")
    assert tool, "hadolint is missing: install the dev extra (pip install -e '.[dev]')"
    # Strictest threshold, no inline ignores, no user configuration (HOME is empty).
    return subprocess.run(
        [
            tool,
            "--no-color",
            "--failure-threshold",
            "style",
            "--disable-ignore-pragma",
            str(dockerfile),
        ],
        cwd=cwd,
        env={"HOME": str(cwd), "XDG_CONFIG_HOME": str(cwd)},
        capture_output=True,
        text=True,
    )


def test_hadolint_passes(tmp_path: Path) -> None:
    result = _hadolint(DOCKERFILE, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_find_problems(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    result = _hadolint(bad, tmp_path)
    assert result.returncode != 0
    assert "DL3007" in result.stdout


def test_base_image_is_pinned_by_tag_and_digest() -> None:
    args = dict(rest.split("=", 1) for kind, rest in _instructions() if kind == "ARG")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+@sha256:[0-9a-f]{64}", args["PYTHON_IMAGE"])
    stages = [rest.split()[0] for kind, rest in _instructions() if kind == "FROM"]
    assert stages == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]  # build, then final


def test_runs_as_a_numeric_non_root_user() -> None:
    users = [rest for kind, rest in _instructions() if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert users[-1].split(":")[0].isdigit()


def test_pip_keeps_no_cache_in_either_stage() -> None:
    envs = [rest for kind, rest in _instructions() if kind == "ENV"]
    assert len(envs) == 2 and all("PIP_NO_CACHE_DIR=1" in env for env in envs)


@pytest.mark.parametrize("role", ["run", "worker", "migrate"])
def test_entry_point_serves_each_role(role: str, capsys: pytest.CaptureFixture[str]) -> None:
    instructions = dict(_instructions())
    assert instructions["ENTRYPOINT"] == '["flowforge-orchestrator"]'
    assert instructions["CMD"] == '["run"]'
    assert main([role, "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: flowforge-orchestrator " + role)


def test_dockerignore_keeps_exactly_what_is_copied() -> None:
    lines = [line for line in DOCKERIGNORE.read_text().splitlines() if line and line[0] != "#"]
    assert lines[0] == "*"  # deny by default
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        source.rstrip("/")
        for kind, rest in _instructions()
        if kind == "COPY" and "--from" not in rest
        for source in rest.split()[:-1]
    }
    assert copied == kept
    assert all((ROOT / path).exists() for path in copied)
