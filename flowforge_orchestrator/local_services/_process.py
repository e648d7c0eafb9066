"""Processes and ports, for the servers: a free port, liveness, who uses a directory, ending.

Linux details: `/proc` tells zombies from live processes and which processes work in a
directory (servers chdir into their data); without `/proc`, `kill(pid, 0)` is trusted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

_HAVE_PROC = Path("/proc/self").exists()


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (SO_REUSEADDR: TIME_WAIT is no conflict)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie nobody reaps (no init in a container) is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return not _HAVE_PROC  # no /proc: trust kill(0); with /proc: it has just exited


def _proc_link(pid: int, name: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/{name}")
    except OSError:
        return None


def processes_using(directory: Path, names: tuple[str, ...] = ()) -> list[int]:
    """Pids whose working directory is `directory` (servers chdir into their data; Linux only).

    `names`: only processes whose command name (`/proc/PID/comm`) is one of these.
    """
    target = str(directory.resolve())
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid() or _proc_link(pid, "cwd") != target:
            continue
        with contextlib.suppress(OSError):
            if not names or (entry / "comm").read_text().strip() in names:
                pids.append(pid)
    return sorted(pids)


def _end(pid: int, sig: signal.Signals, timeout: float) -> None:
    """Signal a process that is not our child, wait up to `timeout`, then SIGKILL it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.02)


def _end_child(proc: subprocess.Popen[bytes], sig: signal.Signals, timeout: float) -> None:
    """Signal our child, wait up to `timeout`, then SIGKILL it; always reaps it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()
