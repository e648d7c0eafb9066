"""deploy/systemd: install.sh lays out units that `systemd-analyze verify` accepts, sandboxed,
with stop timeouts over the graceful-shutdown bounds of the settings."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.errors import ConfigError
from flowforge_orchestrator.queue.jobs import JobKeys
from tests.deploy.paths import DEPLOY, required_tool, venv_tool

SYSTEMD = DEPLOY / "systemd"
ORCHESTRATOR = "flowforge-orchestrator.service"
WORKER = "flowforge-worker@.service"
# systemd-analyze's exposure score in tenths (0 best, 100 worst); 2.0 and under reads "OK".
MAX_EXPOSURE = 20


def _directives(*paths: Path) -> dict[str, list[str]]:
    """`Key=value` lines of unit files, later files last (as drop-ins apply); repeats kept."""
    found: dict[str, list[str]] = {}
    for path in paths:
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if line and not line.startswith(("#", ";", "[")):
                key, _, value = line.partition("=")
                found.setdefault(key.strip(), []).append(value.strip())
    return found


def _seconds(value: str) -> float:
    assert value.endswith("s") and value[:-1].isdigit(), f"expected N s, got {value!r}"
    return float(value[:-1])


def _env_example() -> dict[str, str]:
    lines = (SYSTEMD / "flowforge.env.example").read_text().splitlines()
    pairs = (line.partition("=") for line in lines if line and not line.startswith("#"))
    return {key: value for key, _, value in pairs}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units as install.sh lays them out, pointing at this environment's executable
    (`systemd-analyze verify` refuses an ExecStart= that does not exist)."""
    executable = venv_tool("flowforge-orchestrator")
    assert executable, "flowforge-orchestrator is not installed (pip install -e .)"
    prefix = Path(executable).resolve().parent.parent
    root = tmp_path_factory.mktemp("root")
    subprocess.run(
        ["sh", str(SYSTEMD / "install.sh"), "--root", str(root), "--prefix", str(prefix)],
        check=True,
        capture_output=True,
    )
    return root / "etc/systemd/system"


@pytest.fixture(scope="module")
def analyze() -> str:
    return required_tool(
        shutil.which("systemd-analyze"), "systemd-analyze (Debian: apt-get install systemd)"
    )


def test_install_lays_out_units_drop_ins_and_a_private_env_file(installed: Path) -> None:
    for unit in (ORCHESTRATOR, WORKER):
        assert (installed / unit).is_file()
        drop_in = installed / f"{unit}.d/10-hardening.conf"
        assert drop_in.read_text() == (SYSTEMD / "hardening.conf").read_text()
        assert "/opt/flowforge/bin/" not in (installed / unit).read_text()
    etc = installed.parents[1] / "flowforge"
    assert (etc / "flowforge.env").stat().st_mode & 0o077 == 0
    assert (etc / "workers").stat().st_mode & 0o077 == 0


def test_systemd_analyze_verify_accepts_the_units(installed: Path, analyze: str) -> None:
    # The template is verified through an instance; the drop-ins load from the unit's folder.
    result = subprocess.run(
        [analyze, "verify", "--man=no", ORCHESTRATOR, "flowforge-worker@test.service"],
        cwd=installed,
        capture_output=True,
        text=True,
    )
    # verify exits 0 on unknown keys and bad values, only warning: any output is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_units_are_sandboxed(installed: Path, analyze: str) -> None:
    result = subprocess.run(
        [
            analyze,
            "security",
            "--offline=yes",
            f"--threshold={MAX_EXPOSURE}",
            ORCHESTRATOR,
            "flowforge-worker@test.service",
        ],
        cwd=installed,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("unit", "setting"),
    [(ORCHESTRATOR, "shutdown_timeout"), (WORKER, "worker_shutdown_grace")],
)
def test_stop_timeout_exceeds_the_graceful_shutdown_bound(unit: str, setting: str) -> None:
    unit_file = _directives(SYSTEMD / unit)
    env_name = f"FLOWFORGE_{setting.upper()}"
    bound = max(Settings.model_fields[setting].default, float(_env_example()[env_name]))
    # Margin past the bound: releasing leases / closing connections after it.
    assert _seconds(unit_file["TimeoutStopSec"][-1]) >= bound + 10
    assert unit_file["KillSignal"] == ["SIGTERM"]
    assert unit_file["Restart"] == ["on-failure"]


def test_orchestrator_reports_readiness_and_migrates_first() -> None:
    unit = _directives(SYSTEMD / ORCHESTRATOR)
    assert unit["Type"] == ["notify"]
    assert unit["ExecStartPre"] == ["/opt/flowforge/bin/flowforge-orchestrator migrate"]
    assert unit["ExecStart"] == ["/opt/flowforge/bin/flowforge-orchestrator run"]


def test_the_shared_environment_file_sets_the_job_key_for_every_unit() -> None:
    # flowforge.env reaches the orchestrator and every worker instance: one key for all.
    with pytest.raises(ConfigError, match="placeholder"):  # installed unchanged: refused
        JobKeys.parse(_env_example()["FLOWFORGE_JOB_KEY"])
    for unit in (ORCHESTRATOR, WORKER):
        assert "/etc/flowforge/flowforge.env" in _directives(SYSTEMD / unit)["EnvironmentFile"]


def test_worker_instances_have_their_own_environment_file() -> None:
    unit = _directives(SYSTEMD / WORKER)
    assert "-/etc/flowforge/workers/%i.env" in unit["EnvironmentFile"]
    assert unit["ExecStart"] == ["/opt/flowforge/bin/flowforge-orchestrator worker $WORKER_ARGS"]
    assert "flowforge-orchestrator.service" in unit["After"][0].split()
    # Instances on one host cannot share the orchestrator's port: none unless NAME.env says.
    assert "FLOWFORGE_HTTP_PORT=0" in unit["Environment"]
    assert "FLOWFORGE_HTTP_PORT" not in _env_example()  # it would override that for all


@pytest.mark.parametrize("unit", [ORCHESTRATOR, WORKER])
def test_never_root_even_without_the_drop_in(unit: str) -> None:
    own = _directives(SYSTEMD / unit)
    assert (own["DynamicUser"], own["User"]) == (["yes"], ["flowforge"])


def test_hardening_has_the_expected_sandbox() -> None:
    conf = _directives(SYSTEMD / "hardening.conf")
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter": "@system-service",
    }
    for key, value in expected.items():
        assert value in conf[key], key
