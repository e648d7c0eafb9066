"""The benchmark's child processes, and what /proc says about them (RSS, CPU time).

Each process writes stdout and stderr to a log file of its own; a process that dies is
reported with the tail of its log.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from flowforge_orchestrator.errors import FlowForgeError
from tests.helpers import poll

__all__ = ["Proc", "WorkloadFailed", "start", "until"]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class WorkloadFailed(FlowForgeError):
    """A workload could not be measured: a run failed, a deadline passed, a process died."""


async def until(
    done: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    what: str,
    *,
    interval: float = 0.01,
    alive: Callable[[], None] = lambda: None,
) -> None:
    """Poll `done` until it is true; WorkloadFailed naming `what` after `timeout` seconds.

    `alive` is called each round and raises if a process the wait depends on died.
    """

    async def check() -> bool:
        alive()
        value = done()
        return bool(await value if inspect.isawaitable(value) else value)

    if not await poll(check, timeout=timeout, interval=interval):
        raise WorkloadFailed(f"{what} after {timeout:g} s")


@dataclass
class Proc:
    """One child process; its output goes to `log`."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def check(self) -> None:
        """Raise WorkloadFailed, with the end of its log, if the process has exited."""
        code = self.popen.poll()
        if code is not None:
            tail = "\n".join(self.output().splitlines()[-20:])
            raise WorkloadFailed(f"{self.name} exited with code {code}; its log ends:\n{tail}")

    def rss_kb(self) -> int:
        """Resident set size (VmRSS of /proc/PID/status), KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise WorkloadFailed(f"{self.name}: no VmRSS in /proc/{self.pid}/status")

    def cpu_s(self) -> float:
        """User + system CPU time so far, seconds."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime

    async def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; always reaps it."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.popen.wait, grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        await asyncio.to_thread(self.popen.wait)


async def start(
    name: str,
    command: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    log: Path,
    ready: Callable[[Proc], bool | Awaitable[bool]],
    timeout: float = 60.0,
) -> Proc:
    """Start `command` and wait until `ready(proc)` holds."""
    with log.open("ab") as out:
        popen = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proc = Proc(name, popen, log)
    try:
        await until(lambda: ready(proc), timeout, f"{name} did not start", alive=proc.check)
    except BaseException:
        await proc.stop(grace=5.0)
        raise
    return proc
