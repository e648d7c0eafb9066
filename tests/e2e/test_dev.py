"""`flowforge-orchestrator dev` as a person uses it: it comes up on private servers, applies
a definition dropped into its folder, another terminal's `submit --wait` finds it without
any URL, a changed file becomes a new version, and Ctrl-C leaves nothing running."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CLI = Path(sys.executable).with_name("flowforge-orchestrator")

HELLO = "name: hello\nversion: 1\nsteps:\n  - {id: greet, type: transform, output: {hi: 1}}\n"


class Lines:
    """A process's output lines, read by a thread, awaited with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        assert proc.stdout is not None
        self.thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self.cond:
                self.lines.append(str(line).rstrip("\n"))
                self.cond.notify_all()

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [line for line in self.lines if text in line]
                if found:
                    return found[-1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line with {text!r} in:\n" + "\n".join(self.lines))
                self.cond.wait(left)


def _environment(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWFORGE_")}
    env |= {"FLOWFORGE_DATA_DIR": str(data_dir), "FLOWFORGE_HTTP_PORT": "0"}
    env["FLOWFORGE_LOG_FORMAT"] = "text"
    return env


def _accepting(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="flowforge-dev-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_dev_applies_a_folder_serves_other_terminals_and_stops_everything(workdir: Path) -> None:
    folder, data_dir = workdir / "workflows", workdir / "data"
    folder.mkdir()
    env = _environment(data_dir)
    proc = subprocess.Popen(
        [str(CLI), "dev", "--definitions", str(folder), "--interval", "0.1"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = Lines(proc)
    worker: subprocess.Popen[str] | None = None
    try:
        out.wait_for("export FLOWFORGE_REDIS_URL=")
        session = json.loads((data_dir / "dev.json").read_text())
        (folder / "hello.yaml").write_text(HELLO)
        out.wait_for("registered hello version 1")

        submitted = subprocess.run(
            [str(CLI), "submit", "hello", "--wait", "--timeout", "60"],
            cwd=workdir,
            env=env,  # no URL: the running dev's servers are found in the data dir
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        assert "workflow.completed" in submitted.stdout

        (folder / "hello.yaml").write_text(HELLO.replace("{hi: 1}", "{hi: 2}"))
        out.wait_for("registered hello version 2")
        (folder / "broken.yaml").write_text("name: broken\nversion: 1\nsteps: 7\n")
        out.wait_for("broken.yaml")  # one bad file is reported; dev goes on

        # A worker of another terminal, on the dev's servers without any URL...
        worker = subprocess.Popen(
            [str(CLI), "worker"],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        worker_out = Lines(worker)
        worker_out.wait_for("serving step types")

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        # ...says its servers went away and exits 3, instead of polling a dead Redis forever.
        assert worker.wait(timeout=30) == 3
        worker_out.thread.join(timeout=5)
        assert worker_out.lines[-1] == (
            "error: the `dev` whose servers this process used has stopped"
        ), worker_out.lines
    finally:
        for process in (proc, worker):
            if process is not None:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                if process.stdout is not None:
                    process.stdout.close()
    out.thread.join(timeout=5)
    assert "FlowForge dev stopped" in out.lines
    assert "Traceback" not in "\n".join(out.lines)
    assert not (data_dir / "dev.json").exists()
    for port in (session["postgres_port"], session["redis_port"]):
        assert not _accepting(port), f"a server still listens on {port}"

    # Started again, it asks for the same ports: exported URLs stay right.
    again = subprocess.Popen(
        [str(CLI), "dev", "--definitions", str(folder)],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    again_out = Lines(again)
    try:
        again_out.wait_for("hello.yaml: hello version 2 is up to date")
        second = json.loads((data_dir / "dev.json").read_text())
        again.send_signal(signal.SIGINT)
        assert again.wait(timeout=60) == 0
    finally:
        if again.poll() is None:
            again.kill()
            again.wait()
        assert again.stdout is not None
        again.stdout.close()
    assert (second["postgres_port"], second["redis_port"]) == (
        session["postgres_port"],
        session["redis_port"],
    )
